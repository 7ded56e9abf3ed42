"""grad_ext.grid_sample against F.grid_sample, the pure-torch reference and gradcheck."""
import itertools
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import grad_ext
from grad_ext import reference

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]


def stable_seed(*parts) -> int:
    """A seed from a test's parameters that is the same in every process (Python salts hash() of strings)."""
    return zlib.crc32(repr(parts).encode())


def _grads(fn, inputs, gout):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, gout, allow_unused=True)


def _random_case(gen, d, shared=False, dtype=torch.float64, spread=1.3):
    n = int(torch.randint(1, 4, (1,), generator=gen))
    c = int(torch.randint(1, 6, (1,), generator=gen))
    sizes = [int(v) for v in torch.randint(1, 7, (d,), generator=gen)]
    if d != 1:
        out = [int(v) for v in torch.randint(1, 6, (d,), generator=gen)]
    else:
        out = [int(torch.randint(1, 9, (1,), generator=gen))]
    inp = torch.randn(1 if shared else n, c, *sizes, generator=gen, dtype=dtype)
    grid_shape = (n, *out, d)
    grid = (torch.rand(grid_shape, generator=gen, dtype=dtype) * 2 - 1) * spread
    return inp.requires_grad_(), grid.requires_grad_()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("mode,padding,align", list(itertools.product(MODES, PADDINGS, [False, True])))
def test_matches_f_grid_sample(d, mode, padding, align):
    gen = torch.Generator().manual_seed(stable_seed(d, mode, padding, align))
    for _ in range(4):
        inp, grid = _random_case(gen, d)
        gout = torch.randn(grid.shape[0], inp.shape[1], *grid.shape[1:-1], dtype=inp.dtype, generator=gen)
        out, (gi, gg) = _grads(lambda a, b: grad_ext.grid_sample(a, b, mode, padding, align), (inp, grid), gout)
        ref, (ri, rg) = _grads(lambda a, b: F.grid_sample(a, b, mode, padding, align), (inp, grid), gout)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gi, ri, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gg, rg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_float32_matches_f_grid_sample(d):
    gen = torch.Generator().manual_seed(7)
    for mode, padding in itertools.product(MODES, PADDINGS):
        inp, grid = _random_case(gen, d, dtype=torch.float32)
        gout = torch.randn(grid.shape[0], inp.shape[1], *grid.shape[1:-1], generator=gen)
        out, (gi, gg) = _grads(lambda a, b: grad_ext.grid_sample(a, b, mode, padding), (inp, grid), gout)
        ref, (ri, rg) = _grads(lambda a, b: F.grid_sample(a, b, mode, padding, False), (inp, grid), gout)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gi, ri, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gg, rg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("padding", PADDINGS)
def test_shared_table_equals_repeated_table(d, padding):
    """A batch-1 input serves every grid batch; its gradient is the sum over batches."""
    gen = torch.Generator().manual_seed(3)
    inp, grid = _random_case(gen, d, shared=True)
    grid = (torch.rand(4, *grid.shape[1:], generator=gen, dtype=grid.dtype) * 2.2 - 1.1).requires_grad_()
    gout = torch.randn(4, inp.shape[1], *grid.shape[1:-1], dtype=inp.dtype, generator=gen)
    out, (gi, gg) = _grads(lambda a, b: grad_ext.grid_sample(a, b, "bilinear", padding), (inp, grid), gout)
    ref, (ri, rg) = _grads(
        lambda a, b: F.grid_sample(a.repeat(4, *([1] * (a.dim() - 1))), b, "bilinear", padding, False),
        (inp, grid), gout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gi, ri, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gg, rg, rtol=1e-10, atol=1e-10)


# The CPU kernel samples small shared tables with many channels (GRAD's global grid) by
# matrix products: one image of points (N = 1) or one point per image (P = 1).
@pytest.mark.parametrize("form", ["one image of points", "one point per image"])
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, [False, True])))
def test_many_channel_small_table_matches_f_grid_sample(form, d, padding, align):
    gen = torch.Generator().manual_seed(stable_seed(form, d, padding, align))
    channels, points = 300, 9
    side = 2 if d == 3 else 3  # at most 4 cells per corner: 3·3·2 cells in 3-D
    shape = (1, points, 1, d) if form == "one image of points" else (points, 1, 1, d)
    grid = ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1.4).requires_grad_()
    grid.data[0, 0, 0] = 1.0  # a point exactly on the border
    if d == 1:  # a 1-D table against F.grid_sample on an (N, C, 1, W) table with y = 0
        table = torch.randn(1, channels, side, generator=gen, dtype=torch.float64, requires_grad=True)
        ext_grid = grid.reshape(grid.shape[0], -1, 1)

        def ref_fn(t, g):
            g2 = torch.cat([g, torch.zeros_like(g)], -1)
            return F.grid_sample(t.unsqueeze(2).expand(g.shape[0], -1, -1, -1), g2, "bilinear", padding, align)
        ext = grad_ext.grid_sample(table, ext_grid, "bilinear", padding, align).reshape(grid.shape[0], channels, -1, 1)
    else:
        table = torch.randn(1, channels, *[side + 1] * (d - 1), side, generator=gen, dtype=torch.float64,
                            requires_grad=True)
        if d == 3:
            grid5 = grid.unsqueeze(1)
            ext = grad_ext.grid_sample(table, grid5, "bilinear", padding, align)

            def ref_fn(t, g):
                return F.grid_sample(t.expand(g.shape[0], *t.shape[1:]), g.unsqueeze(1), "bilinear", padding, align)
        else:
            ext = grad_ext.grid_sample(table, grid, "bilinear", padding, align)

            def ref_fn(t, g):
                return F.grid_sample(t.expand(g.shape[0], *t.shape[1:]), g, "bilinear", padding, align)
    ref = ref_fn(table, grid)
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ext_grads = torch.autograd.grad(ext, (table, grid), gout.reshape(ext.shape))
    ref_grads = torch.autograd.grad(ref, (table, grid), gout)
    torch.testing.assert_close(ext.reshape(ref.shape), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ext_grads[0], ref_grads[0], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ext_grads[1], ref_grads[1], rtol=1e-10, atol=1e-10)


def _assert_matches_f_grid_sample(table, grid, mode, padding, align, gen):
    """float64 values and both gradients of a (possibly shared) table against F.grid_sample."""
    n = grid.shape[0]
    ext = grad_ext.grid_sample(table, grid, mode, padding, align)
    ref = F.grid_sample(table.expand(n, *table.shape[1:]), grid, mode, padding, align)
    torch.testing.assert_close(ext, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ext, (table, grid), gout, allow_unused=True),
                    torch.autograd.grad(ref, (table, grid), gout, allow_unused=True)):
        if a is None or b is None:
            assert mode == "nearest"  # its grid gradient is zero: F.grid_sample returns None
            continue
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


# Many points per table cell (GRAD's local grid): the CPU backward adds the table gradient
# into private row copies; shared and per-image tables, every padding.
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode,padding", list(itertools.product(MODES, PADDINGS)))
def test_many_points_per_cell_match_f_grid_sample(shared, mode, padding):
    gen = torch.Generator().manual_seed(stable_seed(shared, mode, padding))
    n, c = 5, 7
    table = torch.randn(1 if shared else n, c, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    grid = ((torch.rand(n, 9, 11, 2, generator=gen, dtype=torch.float64) * 2 - 1) * 1.2).requires_grad_()
    _assert_matches_f_grid_sample(table, grid, mode, padding, False, gen)


# Small tables are sampled in (cell, channel) layout, kLanes = 8 channels at a time in blocks
# of 64: channel counts around those sizes, several blocks, points partly and wholly outside.
@pytest.mark.parametrize("channels", [1, 7, 8, 9, 70, 130])
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode,align", list(itertools.product(MODES, [False, True])))
def test_channel_blocks_match_f_grid_sample(channels, d, shared, mode, align):
    gen = torch.Generator().manual_seed(stable_seed(channels, d, shared, mode, align))
    n = 3
    table = torch.randn(1 if shared else n, channels, *[3] * d, generator=gen, dtype=torch.float64,
                        requires_grad=True)
    grid = ((torch.rand(n, *[5] * d, d, generator=gen, dtype=torch.float64) * 2 - 1) * 1.5).requires_grad_()
    _assert_matches_f_grid_sample(table, grid, mode, "zeros", align, gen)


# Tables too large for cache take the row-by-row loops when few corners read each cell and
# the cell-major loops when many do (forward and backward choose separately).
@pytest.mark.parametrize("points_side", [6, 40])
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_large_tables_match_f_grid_sample(points_side, d, shared, mode):
    gen = torch.Generator().manual_seed(stable_seed(points_side, d, shared, mode))
    n, c = 2, 64
    side = 24 if d == 2 else 10  # 576 or 1000 cells: a task's 16+ channels exceed 64 KB with 2 threads
    table = torch.randn(1 if shared else n, c, *[side] * d, generator=gen, dtype=torch.float64,
                        requires_grad=True)
    out = [points_side] * d if d == 2 else [points_side // 2, points_side // 2, 4]
    grid = ((torch.rand(n, *out, d, generator=gen, dtype=torch.float64) * 2 - 1) * 1.1).requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the channel tiles, and so the loops chosen, depend on the thread count
    try:
        _assert_matches_f_grid_sample(table, grid, mode, "zeros", False, gen)
    finally:
        torch.set_num_threads(threads)


# float32 row loops run 8 points at a time with AVX2 gathers (masked where corners are outside)
# and the rest of a tile point by point: tables too large for the cell-major loops, points
# partly outside, counts that are no multiple of 8, one tile wholly inside.
@pytest.mark.parametrize("d,mode", [(1, "bilinear"), (2, "bilinear"), (2, "nearest"), (2, "bicubic"),
                                    (3, "bilinear"), (1, "bicubic")])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("spread", [0.5, 1.3])
def test_float32_row_loops_match_f_grid_sample(d, mode, shared, spread):
    gen = torch.Generator().manual_seed(stable_seed("rows f32", d, mode, shared, spread))
    n, c = 2, 20
    sizes = {1: [3000], 2: [40, 37], 3: [12, 13, 11]}[d]
    out = {1: [301], 2: [13, 23], 3: [5, 7, 9]}[d]
    table = torch.randn(1 if shared else n, c, *sizes, generator=gen, requires_grad=True)
    grid = ((torch.rand(n, *out, d, generator=gen) * 2 - 1) * spread).requires_grad_()
    ext = grad_ext.grid_sample(table, grid, mode, "zeros", False)
    if d == 1:
        ref = reference.grid_sample(table, grid, mode, "zeros", False)
    else:
        ref = F.grid_sample(table.expand(n, *table.shape[1:]), grid, mode, "zeros", False)
    torch.testing.assert_close(ext, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn(ref.shape, generator=gen)
    got = torch.autograd.grad(ext, (table, grid), gout, allow_unused=True)
    want = torch.autograd.grad(ref, (table, grid), gout, allow_unused=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if mode != "nearest":
        # d index / d coordinate is size / 2: float32 rounding of the sums over channels scales with it
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6 * max(sizes) / 2 * c)


def test_float32_row_loops_ignore_non_finite_values_outside():
    # A large table (64 channels of 3000 cells: the row loops) with inf/NaN cells: corners
    # outside must read nothing, and a NaN output gradient at points wholly outside must not
    # reach either gradient.
    table = torch.randn(1, 64, 50, 60)
    table[0, :, 0, :] = float("inf")
    table[0, :, -1, :] = float("nan")
    table.requires_grad_()
    grid = torch.rand(1, 7, 9, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid[0, 0, :, 1] = -1.05  # the top row's corners above the table
    grid[0, 1, :, 1] = 3.0    # wholly outside
    grid.requires_grad_()
    ext = grad_ext.grid_sample(table, grid, "bilinear", "zeros", False)
    ref = F.grid_sample(table, grid, "bilinear", "zeros", False)
    torch.testing.assert_close(ext, ref, equal_nan=True)
    gout = torch.randn(ref.shape)
    gout[0, :, 1, :] = float("nan")
    got = torch.autograd.grad(ext, (table, grid), gout)
    want = torch.autograd.grad(ref, (table, grid), gout)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert torch.isfinite(got[1][0, 1]).all()  # the points wholly outside
    torch.testing.assert_close(got[1][0, 2:], want[1][0, 2:], rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("shared", [False, True], ids=["per-image", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_major_backward_with_a_nan_coordinate_in_some_tiles(shared, dtype):
    # Small tables take the cell-major backward, which sums each task's input gradient in a
    # private block and writes it once into the uninitialised gradient; a tile holding a NaN
    # coordinate takes the row loop, which adds to the gradient directly. Both in one task,
    # with channel counts that are not multiples of the vector width (and, for the shared
    # table at 2 threads, several channel tiles).
    gen = torch.Generator().manual_seed(stable_seed("cells nan tiles", shared, str(dtype)))
    table = torch.randn(1 if shared else 2, 37, 16, 16, generator=gen, dtype=dtype, requires_grad=True)
    grid = torch.rand(2, 20, 20, 2, generator=gen, dtype=dtype) * 2.2 - 1.1  # 400 points: 4 tiles of 128
    grid[0, 10, 3, 0] = float("nan")   # point 203: the second tile of image 0
    grid[1, 19, 19, 1] = float("nan")  # the last tile of image 1
    grid.requires_grad_()
    gout = torch.randn(2, 37, 20, 20, generator=gen, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ext = grad_ext.grid_sample(table, grid, "bilinear", "zeros", False)
        got = torch.autograd.grad(ext, (table, grid), gout)
    finally:
        torch.set_num_threads(threads)
    ref = F.grid_sample(table.expand(2, -1, -1, -1), grid, "bilinear", "zeros", False)
    want = torch.autograd.grad(ref, (table, grid), gout)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(ext, ref, equal_nan=True, **tol)
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[1], want[1], equal_nan=True, **({"rtol": 1e-4, "atol": 1e-4} if tol else {}))


def test_corners_outside_ignore_non_finite_table_values_and_gradients():
    # Corners outside the table must add nothing, not 0 * inf: F.grid_sample skips them.
    table = torch.randn(1, 20, 4, 4, dtype=torch.float64)
    table[0, :, 0, 0] = float("inf")
    table[0, :, 3, 3] = float("nan")
    table.requires_grad_()
    grid = torch.tensor([[[[-1.2, 0.1], [0.3, 0.9], [5.0, 5.0]],
                          [[0.0, 0.0], [0.9, -0.2], [-5.0, 0.5]]]], dtype=torch.float64)
    ext = grad_ext.grid_sample(table, grid, "bilinear", "zeros", False)
    ref = F.grid_sample(table, grid, "bilinear", "zeros", False)
    torch.testing.assert_close(ext, ref, equal_nan=True)
    assert torch.isfinite(ext[0, :, 0, 0]).all() and torch.isfinite(ext[0, :, 1, 1]).all()  # valid corners finite
    # a NaN output gradient at points wholly outside must not reach the table gradient
    gout = torch.randn(ref.shape, dtype=torch.float64)
    gout[0, :, 0, 2] = float("nan")
    gout[0, :, 1, 2] = float("inf")
    ext_grad, = torch.autograd.grad(ext, table, gout)
    ref_grad, = torch.autograd.grad(ref, table, gout)
    torch.testing.assert_close(ext_grad, ref_grad, equal_nan=True)
    assert torch.isfinite(ext_grad).all()


@pytest.mark.parametrize("d", [1, 2, 3])
def test_bicubic_point_outside_with_a_non_finite_output_gradient_has_zero_grid_gradient(d):
    # The one kept difference from F.grid_sample (README): with zeros padding its bicubic backward
    # multiplies the output gradient by the zero value of each tap outside, so inf or NaN there
    # gives a NaN grid gradient; taps outside add nothing here.
    table = torch.randn((1, 3) + (5,) * d, dtype=torch.float64, requires_grad=True)
    grid = torch.zeros((1,) + (1,) * (d - 1) + (3, d), dtype=torch.float64)
    grid[..., 0, :] = 4.0  # far outside
    grid[..., 1, :] = 0.3
    grid.requires_grad_()
    out = grad_ext.grid_sample(table, grid, "bicubic", "zeros", False)
    gout = torch.ones_like(out)
    gout[..., 0] = float("inf")
    gout[0, 1, ..., 0] = float("nan")
    got_table, got_grid = torch.autograd.grad(out, (table, grid), gout)
    assert (got_grid[..., 0, :] == 0).all()
    assert torch.isfinite(got_grid).all() and torch.isfinite(got_table).all()
    # the other points as F.grid_sample (2-D) or the float64 reference (1-D, 3-D)
    if d == 2:
        ref = F.grid_sample(table, grid, "bicubic", "zeros", False)
        want_grid = torch.autograd.grad(ref, grid, gout)[0]
        assert want_grid[..., 0, :].isnan().all()  # F.grid_sample's NaN
    else:
        ref = reference.cubic_sample(table, grid, "zeros", False)
        want_grid = torch.autograd.grad(ref, grid, gout.nan_to_num(0.0, 0.0, 0.0))[0]
    torch.testing.assert_close(got_grid[..., 1:, :], want_grid[..., 1:, :])


def test_baseline_simd_build_matches_f_grid_sample(tmp_path):
    # The vector loops are compiled for the baseline ISA and for AVX2; the environment
    # variable forces the baseline one, which this CPU would otherwise not run. 156 points of
    # 8x8 tables: the cell-major loops, per image with a private copy of the table.
    script = tmp_path / "baseline.py"
    script.write_text(
        "import torch, torch.nn.functional as F, grad_ext\n"
        "assert grad_ext.info()['cpu_simd'] == 'baseline', grad_ext.info()\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "for shared in (True, False):\n"
        "    table = torch.randn(1 if shared else 4, 37, 8, 8, generator=gen, requires_grad=True)\n"
        "    grid = ((torch.rand(4, 12, 13, 2, generator=gen) * 2 - 1) * 1.2).requires_grad_()\n"
        "    gout = torch.randn(4, 37, 12, 13, generator=gen)\n"
        "    ext = grad_ext.grid_sample(table, grid, align_corners=False)\n"
        "    ref = F.grid_sample(table.expand(4, -1, -1, -1), grid, align_corners=False)\n"
        "    torch.testing.assert_close(ext, ref, rtol=1e-5, atol=1e-5)\n"
        "    grads = torch.autograd.grad(ext, (table, grid), gout)\n"
        "    for a, b in zip(grads, torch.autograd.grad(ref, (table, grid), gout)):\n"
        "        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n")
    env = {**os.environ, "GRAD_EXT_CPU_SIMD": "baseline"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    bad = subprocess.run([sys.executable, "-c", "import grad_ext; grad_ext.info()"],
                         env={**os.environ, "GRAD_EXT_CPU_SIMD": "sse9"}, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "GRAD_EXT_CPU_SIMD must be" in bad.stderr


def test_large_outputs_are_ordinary_torch_tensors_and_fully_written():
    # Outputs of many megabytes come from PyTorch's allocator like any other tensor's: they can
    # be resized in place, and memory that earlier tensors freed (filled with NaN here, so that
    # a value the kernel failed to write shows) is overwritten everywhere.
    gen = torch.Generator().manual_seed(stable_seed("large outputs"))
    for _ in range(3):
        decoy = torch.full((16 << 20,), float("nan"))  # 64 MiB for the allocator to hand out again
        del decoy
        table = torch.randn(8, 64, 64, 64, generator=gen, requires_grad=True)  # 8 MiB, and its gradient
        grid = (torch.rand(8, 64, 64, 2, generator=gen) * 2.2 - 1.1).requires_grad_()
        ext = grad_ext.grid_sample(table, grid)
        ref = F.grid_sample(table, grid, align_corners=False)
        assert ext.numel() * ext.element_size() >= 8 << 20
        torch.testing.assert_close(ext, ref, rtol=1e-5, atol=1e-5)
        gout = torch.randn(ref.shape, generator=gen)
        got = torch.autograd.grad(ext, (table, grid), gout)
        want = torch.autograd.grad(ref, (table, grid), gout)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-3)
        for t in (ext.detach(), *got):
            t.resize_(t.numel() + 1024)  # a storage PyTorch did not allocate refuses to grow


@pytest.mark.parametrize("points", [(28, 28), (27, 29)])
def test_large_local_grid_outputs_match_f_grid_sample(points):
    # Outputs of 8 MiB and more are written with streaming stores when each channel row of
    # points is a whole number of vectors (28 x 28), with ordinary ones otherwise (27 x 29).
    gen = torch.Generator().manual_seed(stable_seed("large local outputs", *points))
    table = torch.randn(1, 64, 8, 8, generator=gen, requires_grad=True)
    grid = (torch.rand(48, *points, 2, generator=gen) * 2 - 1).requires_grad_()
    ext = grad_ext.grid_sample(table, grid)
    ref = F.grid_sample(table.expand(48, -1, -1, -1), grid, align_corners=False)
    assert ext.numel() * ext.element_size() >= 8 << 20
    torch.testing.assert_close(ext, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn(ref.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(ext, (table, grid), gout), torch.autograd.grad(ref, (table, grid), gout)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_many_channel_small_table_with_non_finite_points_matches_f_grid_sample():
    table = torch.randn(1, 300, 4, 4, dtype=torch.float64, requires_grad=True)
    grid = torch.tensor([[[[0.2, -0.4]], [[float("inf"), 0.0]], [[0.5, float("nan")]]]], dtype=torch.float64)
    for padding in PADDINGS:
        ext = grad_ext.grid_sample(table, grid, "bilinear", padding, False)
        ref = F.grid_sample(table, grid, "bilinear", padding, False)
        torch.testing.assert_close(ext, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_many_channel_small_table_gradcheck():
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(1, 256, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(4, 1, 1, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    # the grid gradient numerically (few inputs); the table gradient is linear and compared above
    assert torch.autograd.gradcheck(lambda g: grad_ext.grid_sample(table.detach(), g, "bilinear", "zeros", False),
                                    (grid,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("mode,padding,align", list(itertools.product(MODES, PADDINGS, [False, True])))
def test_1d_and_4d_match_multilinear_reference(d, mode, padding, align):
    gen = torch.Generator().manual_seed(11 * d)
    for shared in (False, True):
        inp, grid = _random_case(gen, d, shared=shared)
        gout = torch.randn(grid.shape[0], inp.shape[1], *grid.shape[1:-1], dtype=inp.dtype, generator=gen)
        out, (gi, gg) = _grads(lambda a, b: grad_ext.grid_sample(a, b, mode, padding, align), (inp, grid), gout)
        ref, (ri, rg) = _grads(lambda a, b: reference.multilinear_sample(a, b, mode, padding, align), (inp, grid), gout)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gi, ri, rtol=1e-12, atol=1e-12)
        if mode == "bilinear":
            torch.testing.assert_close(gg, rg, rtol=1e-10, atol=1e-10)
        else:
            assert torch.count_nonzero(gg) == 0


def test_1d_equals_2d_with_a_flat_axis():
    """An independent check of the 1-D layout: grid (N, W_out, 1) on (N, C, W)."""
    gen = torch.Generator().manual_seed(5)
    inp = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    x = torch.rand(2, 9, 1, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    out = grad_ext.grid_sample(inp, x, align_corners=True)
    grid2 = torch.cat([x, torch.zeros_like(x)], dim=-1)[:, None]  # y = 0 on a height-1 table
    ref = F.grid_sample(inp[:, :, None], grid2, align_corners=True)[:, :, 0]
    torch.testing.assert_close(out, ref)


def test_multilinear_reference_matches_f_grid_sample():
    """The reference used for 1-D/4-D is itself checked against F.grid_sample in 2-D and 3-D."""
    gen = torch.Generator().manual_seed(9)
    for d, mode, padding, align in itertools.product([2, 3], MODES, PADDINGS, [False, True]):
        inp, grid = _random_case(gen, d, spread=3.0)
        torch.testing.assert_close(reference.multilinear_sample(inp, grid, mode, padding, align),
                                   F.grid_sample(inp, grid, mode, padding, align))


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("mode,padding,align", list(itertools.product(MODES, PADDINGS, [False, True])))
def test_special_coordinates_match_f_grid_sample(d, mode, padding, align):
    """Exactly on borders and cell centres, far outside, +-inf and NaN."""
    inp = torch.randn(1, 2, *([4] * d), dtype=torch.float64)
    specials = [-1.0, 1.0, 0.0, -0.75, 0.75, 1.25, -1.25, 7.0, -9.5, 1e3, -1e3,
                float("inf"), float("-inf"), float("nan")]
    vals = torch.tensor(specials, dtype=torch.float64)
    comb = torch.cartesian_prod(*([vals] * d)) if d > 1 else vals[:, None]
    grid = comb.reshape(1, comb.shape[0], *([1] * (d - 1)), d)
    out = grad_ext.grid_sample(inp, grid, mode, padding, align)
    ref = F.grid_sample(inp, grid, mode, padding, align)
    torch.testing.assert_close(out, ref, equal_nan=True)
    finite = torch.isfinite(grid).all(-1)
    if padding == "zeros" or bool(finite.all()):
        # F.grid_sample's CPU backward for non-finite coordinates is only reliable with zeros padding.
        g1 = grid.clone().requires_grad_()
        i1 = inp.clone().requires_grad_()
        gout = torch.randn_like(out)
        _, (gi, gg) = _grads(lambda a, b: grad_ext.grid_sample(a, b, mode, padding, align), (i1, g1), gout)
        _, (ri, rg) = _grads(lambda a, b: F.grid_sample(a, b, mode, padding, align), (i1, g1), gout)
        torch.testing.assert_close(gi, ri, equal_nan=True)
        torch.testing.assert_close(gg, rg, equal_nan=True)


def test_finite_special_coordinate_gradients_every_padding():
    vals = torch.tensor([-1.0, 1.0, 0.0, -0.75, 0.75, 1.25, -1.25, 7.0, -9.5, 1e3], dtype=torch.float64)
    grid = torch.cartesian_prod(vals, vals).reshape(1, -1, 1, 2)
    inp = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    for mode, padding, align in itertools.product(MODES, PADDINGS, [False, True]):
        i1, g1 = inp.clone().requires_grad_(), grid.clone().requires_grad_()
        gout = torch.randn(1, 3, grid.shape[1], 1, dtype=torch.float64)
        _, (gi, gg) = _grads(lambda a, b: grad_ext.grid_sample(a, b, mode, padding, align), (i1, g1), gout)
        _, (ri, rg) = _grads(lambda a, b: F.grid_sample(a, b, mode, padding, align), (i1, g1), gout)
        torch.testing.assert_close(gi, ri)
        torch.testing.assert_close(gg, rg)


def test_non_contiguous_and_channels_last():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 6, 5, 8, generator=gen)
    grid = torch.rand(3, 4, 9, 2, generator=gen) * 2 - 1
    for inp in (base.to(memory_format=torch.channels_last), base[:, ::2], base.transpose(2, 3)):
        g = grid.transpose(1, 2) if inp.shape[2] != base.shape[2] else grid
        torch.testing.assert_close(grad_ext.grid_sample(inp, g), F.grid_sample(inp, g, align_corners=False))
    g_strided = torch.rand(3, 4, 9, 4, generator=gen)[..., ::2] * 2 - 1
    torch.testing.assert_close(grad_ext.grid_sample(base, g_strided),
                               F.grid_sample(base, g_strided, align_corners=False))
    inp3d = torch.randn(2, 3, 4, 5, 6, generator=gen).to(memory_format=torch.channels_last_3d)
    g3 = torch.rand(2, 2, 3, 4, 3, generator=gen) * 2 - 1
    torch.testing.assert_close(grad_ext.grid_sample(inp3d, g3), F.grid_sample(inp3d, g3, align_corners=False))


@pytest.mark.parametrize("d,shared", [(1, False), (2, False), (2, True), (3, False), (4, True)])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(d, shared, padding):
    gen = torch.Generator().manual_seed(d)
    sizes = [3] * d if d < 4 else [2, 3, 2, 3]
    inp = torch.randn(1 if shared else 2, 2, *sizes, dtype=torch.float64, generator=gen, requires_grad=True)
    out = [3] + [2] * (d - 1)
    # keep coordinates away from cell boundaries, where the interpolation is not differentiable
    grid = (torch.rand(2, *out, d, dtype=torch.float64, generator=gen) * 1.6 - 0.8).requires_grad_()
    for align in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: grad_ext.grid_sample(a, b, "bilinear", padding, align),
                                        (inp, grid))


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(2, 3, 4, 5, generator=gen), torch.rand(2, 3, 2, 2, generator=gen) * 2 - 1),
        (torch.randn(1, 3, 4, 5, generator=gen), torch.rand(2, 3, 2, 2, generator=gen) * 2 - 1),
        (torch.randn(2, 3, 6, generator=gen), torch.rand(2, 5, 1, generator=gen) * 2 - 1),
        (torch.randn(1, 2, 2, 3, 2, 3, generator=gen), torch.rand(2, 2, 1, 1, 2, 4, generator=gen) * 2 - 1),
    ]
    for inp, grid in cases:
        for interp, padding in itertools.product([0, 1], [0, 1, 2]):
            args = (inp.requires_grad_(), grid.requires_grad_(), interp, padding, False, 0.0, 0.0, 0, None)
            torch.library.opcheck(torch.ops.grad_ext.sample_grid, args)
        seed = torch.tensor([5, 6])
        torch.library.opcheck(torch.ops.grad_ext.sample_grid, (inp, grid, 0, 0, False, 0.1, 0.5, 0, seed))
    torch.library.opcheck(torch.ops.grad_ext.jitter_noise, (torch.tensor([1, 2]), 10, 2, 0.1, 0.5, 0))


def test_torch_compile_fullgraph():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(1, 4, 6, 6))
            self.proj = torch.nn.Conv2d(4, 2, 1)
            self.sampler = grad_ext.GridSample()

        def forward(self, x):
            coords = torch.tanh(self.proj(x)).permute(0, 2, 3, 1)
            return self.sampler(self.table, coords).square().mean()

    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(3, 4, 5, 5)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.backward()
    assert model.table.grad is not None and model.proj.weight.grad is not None


def test_module_repr_and_defaults():
    m = grad_ext.GridSample("nearest", "border", True)
    assert "nearest" in repr(m) and "border" in repr(m)
    inp, grid = torch.randn(1, 2, 3, 3), torch.rand(1, 2, 2, 2) * 2 - 1
    torch.testing.assert_close(m(inp, grid), F.grid_sample(inp, grid, "nearest", "border", True))


@pytest.mark.parametrize("inp_shape,grid_shape", [
    ((0, 3, 4, 4), (0, 2, 2, 2)), ((2, 0, 4, 4), (2, 2, 2, 2)), ((2, 3, 4, 4), (2, 0, 2, 2)),
    ((1, 3, 4, 4), (0, 2, 2, 2)), ((2, 3, 4, 4, 4), (2, 0, 1, 2, 3)),
])
def test_empty_shapes_behave_like_f_grid_sample(inp_shape, grid_shape):
    inp = torch.randn(inp_shape, requires_grad=True)
    grid = torch.rand(grid_shape, requires_grad=True)
    out = grad_ext.grid_sample(inp, grid)
    if inp_shape[0] == grid_shape[0]:
        assert out.shape == F.grid_sample(inp, grid, align_corners=False).shape
    assert out.shape == (grid_shape[0], inp_shape[1], *grid_shape[1:-1])
    out.sum().backward()
    assert inp.grad.shape == inp.shape and torch.count_nonzero(inp.grad) == 0
    assert grid.grad.shape == grid.shape


def test_only_one_gradient_requested():
    inp = torch.randn(1, 3, 4, 4, requires_grad=True)
    grid = torch.rand(2, 3, 3, 2) * 2 - 1
    grad_ext.grid_sample(inp, grid).sum().backward()
    ref = torch.autograd.grad(F.grid_sample(inp.repeat(2, 1, 1, 1), grid, align_corners=False).sum(), inp)[0]
    torch.testing.assert_close(inp.grad, ref)
    inp2 = torch.randn(2, 3, 4, 4)
    grid2 = (torch.rand(2, 3, 3, 2) * 2 - 1).requires_grad_()
    grad_ext.grid_sample(inp2, grid2).sum().backward()
    expected = torch.autograd.grad(F.grid_sample(inp2, grid2, align_corners=False).sum(), grid2)[0]
    torch.testing.assert_close(grid2.grad, expected)


def test_cpu_backward_is_bitwise_reproducible_in_both_modes():
    # The CPU backward has no atomics: the same bits with and without deterministic mode.
    gen = torch.Generator().manual_seed(4)
    inp = torch.randn(1, 16, 8, 8, generator=gen, requires_grad=True)
    grid = (torch.rand(8, 7, 7, 2, generator=gen) * 2 - 1).requires_grad_()
    gout = torch.randn(8, 16, 7, 7, generator=gen)
    prev = torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        for deterministic in (True, False, True):
            torch.use_deterministic_algorithms(deterministic)
            runs.append(torch.autograd.grad(grad_ext.grid_sample(inp, grid), (inp, grid), gout))
    finally:
        torch.use_deterministic_algorithms(prev)
    for gi, gg in runs[1:]:
        assert torch.equal(gi, runs[0][0]) and torch.equal(gg, runs[0][1])


# ---- float16 / bfloat16 on the CPU -----------------------------------------------------------

REDUCED_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
REDUCED_CASES = [(d, shared, mode) for d, shared in [(1, False), (2, False), (2, True), (3, False), (4, True)]
                 for mode in ("bilinear", "nearest", "bicubic") if not (mode == "bicubic" and d == 4)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,shared,mode", REDUCED_CASES)
def test_reduced_precision_on_the_cpu(dtype, d, shared, mode):
    """Computed in float32 and rounded once: equal to the float32 kernel's result rounded, and
    close to F.grid_sample in float32 and to float64 on the same rounded inputs. (F.grid_sample
    itself computes CPU float16/bfloat16 coordinates in that dtype, several times less
    accurately, and nearest can then pick another cell, so it is not the yardstick here.)"""
    gen = torch.Generator().manual_seed(stable_seed("reduced", str(dtype), d, shared, mode))
    sizes = {1: (9,), 2: (6, 5), 3: (4, 3, 5), 4: (3, 2, 3, 2)}[d]
    table = torch.randn(1 if shared else 3, 24, *sizes, generator=gen).to(dtype).requires_grad_()
    grid = ((torch.rand(3, *[3] * d, d, generator=gen) * 2 - 1) * 1.1).to(dtype).requires_grad_()
    out = grad_ext.grid_sample(table, grid, mode, "border")
    assert out.dtype == dtype
    gout = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (table, grid), gout)
    assert grads[0].dtype == grads[1].dtype == dtype
    t32, g32 = table.detach().float().requires_grad_(), grid.detach().float().requires_grad_()
    out32 = grad_ext.grid_sample(t32, g32, mode, "border")
    grads32 = torch.autograd.grad(out32, (t32, g32), gout.float())
    assert torch.equal(out, out32.to(dtype))
    for a, b in zip(grads, grads32):
        assert torch.equal(a, b.to(dtype))
    t64, g64 = table.detach().double().requires_grad_(), grid.detach().double().requires_grad_()
    ref = reference.grid_sample(t64, g64, mode, "border")
    ref_grads = torch.autograd.grad(ref, (t64, g64), gout.double(), allow_unused=True)
    tol = REDUCED_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=tol, atol=tol)
    if mode == "nearest":
        assert torch.count_nonzero(grads[1]) == 0
    else:  # a sum over channels of rounded products: a looser absolute bound
        torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=tol, atol=10 * tol)
    if d == 2 or (d == 3 and mode != "bicubic"):  # F.grid_sample in float32
        tf, gf = t32.detach().requires_grad_(), g32.detach().requires_grad_()
        f_out = F.grid_sample(tf.expand(3, *tf.shape[1:]), gf, mode, "border", False)
        torch.testing.assert_close(out.float(), f_out, rtol=tol, atol=tol)
        f_grads = torch.autograd.grad(f_out, (tf, gf), gout.float(), allow_unused=True)
        torch.testing.assert_close(grads[0].float(), f_grads[0], rtol=tol, atol=tol)
        if mode != "nearest":
            torch.testing.assert_close(grads[1].float(), f_grads[1], rtol=tol, atol=10 * tol)


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("inp,grid,kwargs,exc,match", [
    (torch.randn(2, 3), torch.rand(2, 3, 1), {}, ValueError, "input must have shape"),
    (torch.randn(1, 2, 3, 4, 5, 6, 7), torch.rand(1, 2, 2), {}, ValueError, "input must have shape"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3), {}, ValueError, "grid must have 4 dimensions"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 3), {}, ValueError, "last dimension must be 2"),
    (torch.randn(3, 3, 4, 4), torch.rand(2, 3, 3, 2), {}, ValueError, "input batch must be 1"),
    (torch.randint(0, 5, (2, 3, 4, 4)), torch.rand(2, 3, 3, 2), {}, TypeError, "floating point"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2).double(), {}, TypeError, "same dtype"),
    (torch.randn(2, 3, 4, 4).to(torch.complex64), torch.rand(2, 3, 3, 2).to(torch.complex64), {}, TypeError,
     "floating point"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"mode": "cubic"}, ValueError, "mode must be one of"),
    (torch.randn(1, 2, 2, 2, 2, 2), torch.rand(1, 2, 2, 2, 2, 4), {"mode": "bicubic"}, ValueError,
     "bicubic\\) supports 1-D to 3-D tables, got a 4-D table"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"padding_mode": "wrap"}, ValueError, "padding_mode must be"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"jitter_std": -1.0}, ValueError, "jitter_std"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"jitter_prob": 1.5}, ValueError, "jitter_prob"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_mode": "all"},
     ValueError, "jitter_mode"),
    ("x", torch.rand(2, 3, 3, 2), {}, TypeError, "input must be a torch.Tensor"),
    (torch.randn(2, 3, 4, 4), None, {}, TypeError, "grid must be a torch.Tensor"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"jitter_std": "0.1"}, TypeError, "jitter_std must be a real"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"jitter_std": float("nan"), "jitter_prob": 0.5}, ValueError,
     "jitter_std must be finite"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2), {"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_seed": (1,)},
     ValueError, "jitter_seed must be a"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2),
     {"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_seed": torch.tensor([1.0, 2.0])}, TypeError,
     "jitter_seed must be an int64 tensor"),
    (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 3, 2),
     {"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_seed": torch.tensor([1, 2, 3])}, ValueError,
     "jitter_seed must hold 2 elements"),
])
def test_bad_input_raises_clear_error(inp, grid, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        grad_ext.grid_sample(inp, grid, **kwargs)


# Every entry point of the op library checks its own arguments (csrc/sample_grid.h,
# csrc/refine.h): called directly, each bad argument is a ValueError or TypeError naming it,
# never a crash or a silently wrong result.
def raw_op_bad_calls(device):
    """(name, call, exception, message) for each bad argument of each raw op on ``device``."""
    t = lambda *shape, **kw: torch.randn(*shape, device=device, **kw)  # noqa: E731
    g = lambda *shape: torch.rand(*shape, device=device) * 2 - 1  # noqa: E731
    seed = torch.tensor([3, 4], device=device)
    ops = torch.ops.grad_ext
    sg, sgb, jn = ops.sample_grid, ops.sample_grid_backward, ops.jitter_noise
    inp, grid, gout = t(1, 2, 3, 3), g(2, 2, 2, 2), t(2, 2, 2, 2)

    def fwd(*, input=inp, grid=grid, interp=0, padding=0, std=0.0, prob=0.0, mode=0, seed_=None):
        return lambda: sg(input, grid, interp, padding, False, std, prob, mode, seed_)

    def bwd(*, grad=gout, input=inp, grid=grid, interp=0, padding=0, std=0.0, prob=0.0, mode=0, seed_=None):
        return lambda: sgb(grad, input, grid, interp, padding, False, std, prob, mode, seed_, True, True)

    calls = []
    for op_name, make in (("sample_grid", fwd), ("sample_grid_backward", bwd)):
        calls += [
            (f"{op_name}-input-dims", make(input=t(2, 3)), ValueError, "input must have shape"),
            (f"{op_name}-grid-dims", make(grid=g(2, 2, 2)), ValueError, "grid must have 4 dimensions"),
            (f"{op_name}-grid-last", make(grid=g(2, 2, 2, 3)), ValueError, "last dimension must be 2"),
            (f"{op_name}-batch", make(input=t(3, 2, 3, 3)), ValueError, "input batch must be 1"),
            (f"{op_name}-int", make(input=inp.long(), grid=grid.long()), TypeError, "floating point"),
            (f"{op_name}-dtypes", make(grid=grid.double()), TypeError, "same dtype"),
            (f"{op_name}-interpolation", make(interp=5), ValueError, "interpolation must be 0"),
            (f"{op_name}-padding", make(padding=-1), ValueError, "padding must be 0"),
            (f"{op_name}-std", make(std=-0.5, prob=0.5, seed_=seed), ValueError, "jitter_std must be"),
            (f"{op_name}-prob", make(std=0.5, prob=2.0, seed_=seed), ValueError, "jitter_prob must be in"),
            (f"{op_name}-mode", make(std=0.5, prob=0.5, mode=7, seed_=seed), ValueError, "jitter_mode must be"),
            (f"{op_name}-no-seed", make(std=0.5, prob=0.5), ValueError, "jitter needs jitter_seed"),
            (f"{op_name}-seed-dtype", make(std=0.5, prob=0.5, seed_=seed.float()), TypeError, "int64 tensor"),
            (f"{op_name}-seed-size", make(std=0.5, prob=0.5, seed_=seed[:1]), ValueError, "2 elements"),
        ]
        if device == "cuda":
            calls += [(f"{op_name}-seed-device", make(std=0.5, prob=0.5, seed_=seed.cpu()), ValueError,
                       "jitter_seed must be on the input's device")]
        calls += [(f"{op_name}-bicubic-4d", make(input=t(1, 2, 2, 2, 2, 2), grid=g(1, 2, 2, 2, 2, 4), interp=2),
                   ValueError, "supports 1-D to 3-D tables")]
    calls += [
        ("sample_grid_backward-grad-shape", bwd(grad=t(2, 2, 2, 3)), ValueError, "grad_output must have the output"),
        ("sample_grid_backward-grad-dtype", bwd(grad=gout.double()), TypeError, "grad_output must have dtype"),
        ("jitter_noise-points", lambda: jn(seed, -1, 2, 0.1, 0.5, 0), ValueError, "num_points must be >= 0"),
        ("jitter_noise-dim", lambda: jn(seed, 4, 5, 0.1, 0.5, 0), ValueError, "dim must be 1 to 4"),
        ("jitter_noise-std", lambda: jn(seed, 4, 2, -1.0, 0.5, 0), ValueError, "jitter_std must be"),
        ("jitter_noise-prob", lambda: jn(seed, 4, 2, 0.1, -0.5, 0), ValueError, "jitter_prob must be in"),
        ("jitter_noise-mode", lambda: jn(seed, 4, 2, 0.1, 0.5, 2), ValueError, "jitter_mode must be"),
        ("jitter_noise-seed", lambda: jn(seed.float(), 4, 2, 0.1, 0.5, 0), TypeError, "int64 tensor"),
    ]
    if device == "cuda":
        calls += [("sample_grid_backward-grad-device", bwd(grad=gout.cpu()), ValueError, "grad_output must be on")]
    rec, feat = t(2, 3, 4, 4), t(2, 3, 4, 4)
    rf, rfb = torch.ops.grad_ext.refine, torch.ops.grad_ext.refine_backward
    stats = rf(rec, feat, 0.3, 0.7, 10.0, False)[4]
    calls += [
        ("refine-dims", lambda: rf(rec[0], feat[0], 0.3, 0.7, 10.0, False), ValueError, "rec must have shape"),
        ("refine-shape", lambda: rf(rec, feat[:, :2], 0.3, 0.7, 10.0, False), ValueError, "same shape"),
        ("refine-dtype", lambda: rf(rec, feat.double(), 0.3, 0.7, 10.0, False), TypeError, "same dtype"),
        ("refine-int", lambda: rf(rec.long(), feat.long(), 0.3, 0.7, 10.0, False), TypeError, "floating point"),
        ("refine-empty", lambda: rf(rec[:0], feat[:0], 0.3, 0.7, 10.0, False), ValueError, "must not be empty"),
        ("refine-threshold", lambda: rf(rec, feat, 0.3, 0.7, -1.0, False), ValueError, "mse_threshold must be >= 0"),
        ("refine-weight", lambda: rf(rec, feat, float("nan"), 0.7, 10.0, False), ValueError,
         "mse_weight must be finite"),
        ("refine_backward-weight", lambda: rfb(None, None, torch.ones((), device=device), None, rec, feat, stats,
                                               0.3, float("inf"), True, True), ValueError, "cos_weight must be finite"),
        ("refine_backward-stats", lambda: rfb(None, None, torch.ones((), device=device), None, rec, feat,
                                              stats[:2], 0.3, 0.7, True, True), ValueError, "stats must be"),
        ("refine_backward-grad", lambda: rfb(t(2, 4, 5), None, None, None, rec, feat, stats, 0.3, 0.7, True, True),
         ValueError, "grad_sim must have shape"),
    ]
    if device == "cpu":
        calls += [("refine-half", lambda: rf(rec.half(), feat.half(), 0.3, 0.7, 10.0, False), TypeError,
                   "not supported on cpu")]
    return calls


@pytest.mark.parametrize("case", range(len(raw_op_bad_calls("cpu"))), ids=[c[0] for c in raw_op_bad_calls("cpu")])
def test_raw_ops_reject_each_bad_argument(case):
    _, call, exc, match = raw_op_bad_calls("cpu")[case]
    with pytest.raises(exc, match=match):
        call()


def test_compiled_calls_reject_bad_shapes_like_eager():
    # The fake kernels check the same shape relations, so a traced call fails as an eager one does.
    fn = torch.compile(lambda a, b: grad_ext.grid_sample(a, b), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="input batch must be 1"):
        fn(torch.randn(3, 2, 4, 4), torch.rand(2, 3, 3, 2))


@pytest.mark.cuda
def test_mismatched_devices_raise():
    with pytest.raises(ValueError, match="same device"):
        grad_ext.grid_sample(torch.randn(1, 2, 3, 3, device="cuda"), torch.rand(1, 2, 2, 2))


# ---- CUDA ------------------------------------------------------------------------------------

@pytest.mark.cuda
class TestCUDA:
    @pytest.mark.parametrize("d", [1, 2, 3, 4])
    @pytest.mark.parametrize("mode,padding,align", list(itertools.product(MODES, PADDINGS, [False, True])))
    def test_cuda_matches_cpu_and_f_grid_sample(self, d, mode, padding, align):
        gen = torch.Generator().manual_seed(d * 100 + len(padding))
        for shared in (False, True):
            inp, grid = _random_case(gen, d, shared=shared)
            gout = torch.randn(grid.shape[0], inp.shape[1], *grid.shape[1:-1], dtype=inp.dtype, generator=gen)
            fn = lambda a, b: grad_ext.grid_sample(a, b, mode, padding, align)  # noqa: E731
            cpu, (ci, cg) = _grads(fn, (inp, grid), gout)
            ic, gc = inp.detach().cuda().requires_grad_(), grid.detach().cuda().requires_grad_()
            cuda, (ui, ug) = _grads(fn, (ic, gc), gout.cuda())
            torch.testing.assert_close(cuda.cpu(), cpu)
            torch.testing.assert_close(ui.cpu(), ci)
            torch.testing.assert_close(ug.cpu(), cg)
            if d in (2, 3):
                ref, (ri, rg) = _grads(lambda a, b: reference.grid_sample(a, b, mode, padding, align), (ic, gc),
                                       gout.cuda())
                torch.testing.assert_close(cuda, ref)
                torch.testing.assert_close(ui, ri)
                torch.testing.assert_close(ug, rg)

    @pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
    def test_reduced_precision_against_float64(self, dtype, tol):
        gen = torch.Generator().manual_seed(2)
        inp = torch.randn(1, 32, 8, 8, generator=gen, dtype=torch.float64)
        grid = torch.rand(4, 7, 7, 2, generator=gen, dtype=torch.float64) * 2 - 1
        ref = F.grid_sample(inp.repeat(4, 1, 1, 1), grid, align_corners=False)
        out = grad_ext.grid_sample(inp.to("cuda", dtype), grid.to("cuda", dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
        i = inp.to("cuda", dtype).requires_grad_()
        g = grid.to("cuda", dtype).requires_grad_()
        gi, gg = torch.autograd.grad(grad_ext.grid_sample(i, g).float().square().sum(), (i, g))
        i64, g64 = inp.clone().requires_grad_(), grid.clone().requires_grad_()
        ref_loss = F.grid_sample(i64.repeat(4, 1, 1, 1), g64, align_corners=False).square().sum()
        ri, rg = torch.autograd.grad(ref_loss, (i64, g64))
        torch.testing.assert_close(gi.double().cpu(), ri, rtol=10 * tol, atol=10 * tol)
        torch.testing.assert_close(gg.double().cpu(), rg, rtol=10 * tol, atol=10 * tol)

    @pytest.mark.parametrize("shape", ["global", "local", "dropin"])
    def test_grad_shapes_and_determinism(self, shape):
        gen = torch.Generator().manual_seed(6)
        if shape == "global":
            inp = torch.randn(1, 216 * 28 * 28, 4, 4, generator=gen)
            grid = torch.rand(1, 16, 1, 2, generator=gen) * 2 - 1
        elif shape == "local":
            inp, grid = torch.randn(1, 216, 8, 8, generator=gen), torch.rand(16, 28, 28, 2, generator=gen) * 2 - 1
        else:
            inp, grid = torch.randn(4, 64, 64, 64, generator=gen), torch.rand(4, 64, 64, 2, generator=gen) * 2 - 1
        i, g = inp.cuda().requires_grad_(), grid.cuda().requires_grad_()
        gout = torch.randn(grid.shape[0], inp.shape[1], *grid.shape[1:-1], generator=gen).cuda()
        out = grad_ext.grid_sample(i, g)
        gi, gg = torch.autograd.grad(out, (i, g), gout)
        ref = reference.grid_sample(i, g)
        ri, rg = torch.autograd.grad(ref, (i, g), gout)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gi, ri, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gg, rg, rtol=1e-3, atol=1e-3)
        torch.use_deterministic_algorithms(True)
        try:
            runs = [torch.autograd.grad(grad_ext.grid_sample(i, g), (i, g), gout) for _ in range(3)]
        finally:
            torch.use_deterministic_algorithms(False)
        for a, b in runs[1:]:
            assert torch.equal(a, runs[0][0]) and torch.equal(b, runs[0][1])
        torch.testing.assert_close(runs[0][0], ri, rtol=1e-4, atol=1e-4)

    def test_special_coordinates_match_f_grid_sample_on_cuda(self):
        vals = torch.tensor([-1.0, 1.0, 0.0, 0.75, 1.25, -9.5, 1e3, float("inf"), float("-inf"), float("nan")])
        grid = torch.cartesian_prod(vals, vals).reshape(1, -1, 1, 2).cuda()
        inp = torch.randn(1, 3, 4, 4).cuda()
        for mode, padding, align in itertools.product(MODES, PADDINGS, [False, True]):
            torch.testing.assert_close(grad_ext.grid_sample(inp, grid, mode, padding, align),
                                       F.grid_sample(inp, grid, mode, padding, align), equal_nan=True)

    def test_compile_on_cuda(self):
        table = torch.randn(1, 8, 4, 4, device="cuda", requires_grad=True)
        fn = torch.compile(lambda t, g: grad_ext.grid_sample(t, g).sum(), fullgraph=True)
        g = torch.rand(3, 5, 5, 2, device="cuda") * 2 - 1
        out = fn(table, g)
        out.backward()
        torch.testing.assert_close(out, F.grid_sample(table.detach().repeat(3, 1, 1, 1), g, align_corners=False).sum())
