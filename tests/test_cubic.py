"""mode='bicubic': 2-D against F.grid_sample, 1-D and 3-D against the pure-torch
grad_ext.reference.cubic_sample (itself checked against F.grid_sample in 2-D), gradcheck in
float64, every padding and align_corners, both CPU loop kinds."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_sample_grid import PADDINGS, _assert_matches_f_grid_sample, stable_seed

import grad_ext
from grad_ext import reference

ALIGNS = [False, True]


def _table_and_grid(gen, table_shape, grid_shape, spread):
    table = torch.randn(table_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    grid = ((torch.rand(grid_shape, generator=gen, dtype=torch.float64) * 2 - 1) * spread).requires_grad_()
    return table, grid


def _assert_matches(fn, ref_fn, table, grid, gen, tol=1e-12, grid_tol=1e-10):
    out, ref = fn(table, grid), ref_fn(table, grid)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (table, grid), gout)
    want = torch.autograd.grad(ref, (table, grid), gout)
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=grid_tol, atol=grid_tol)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, ALIGNS)))
def test_2d_matches_f_grid_sample(shared, padding, align):
    # Spread 1.6: points inside, on the border band where taps fall outside, and beyond it.
    gen = torch.Generator().manual_seed(stable_seed("bicubic", shared, padding, align))
    for table_shape, grid_shape in (((3, 5, 6, 7), (3, 4, 5, 2)), ((3, 2, 1, 5), (3, 3, 3, 2)),
                                    ((3, 3, 2, 2), (3, 6, 1, 2))):
        if shared:
            table_shape = (1, *table_shape[1:])
        table, grid = _table_and_grid(gen, table_shape, grid_shape, 1.6)
        _assert_matches_f_grid_sample(table, grid, "bicubic", padding, align, gen)


# Small tables take the cell-major loops (channel blocks of 64 in lanes of 8); large ones
# read by few taps per cell the row loops (and by many, the cell-major loops again).
@pytest.mark.parametrize("channels", [1, 9, 70])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("padding", PADDINGS)
def test_2d_channel_blocks_match_f_grid_sample(channels, shared, padding):
    gen = torch.Generator().manual_seed(stable_seed("bicubic blocks", channels, shared, padding))
    table, grid = _table_and_grid(gen, (1 if shared else 3, channels, 4, 5), (3, 5, 6, 2), 1.4)
    _assert_matches_f_grid_sample(table, grid, "bicubic", padding, False, gen)


@pytest.mark.parametrize("points_side", [4, 40])
@pytest.mark.parametrize("shared", [True, False])
def test_2d_large_tables_match_f_grid_sample(points_side, shared):
    gen = torch.Generator().manual_seed(stable_seed("bicubic large", points_side, shared))
    table, grid = _table_and_grid(gen, (1 if shared else 2, 64, 24, 24), (2, points_side, points_side, 2), 1.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the channel tiles, and so the loops chosen, depend on the thread count
    try:
        _assert_matches_f_grid_sample(table, grid, "bicubic", "border", False, gen)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, ALIGNS)))
def test_2d_special_coordinates_match_f_grid_sample(padding, align):
    """On borders and cell centres, far outside, +-inf and NaN; values and both gradients."""
    vals = torch.tensor([-1.0, 1.0, 0.0, -0.75, 0.75, 1.25, -1.25, 7.0, -9.5, 1e3, -1e3, float("inf"),
                         float("-inf"), float("nan")], dtype=torch.float64)
    grid = torch.cartesian_prod(vals, vals).reshape(1, -1, 1, 2).requires_grad_()
    table = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
    out = grad_ext.grid_sample(table, grid, "bicubic", padding, align)
    ref = F.grid_sample(table, grid, "bicubic", padding, align)
    torch.testing.assert_close(out, ref, equal_nan=True)
    gout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for a, b in zip(torch.autograd.grad(out, (table, grid), gout), torch.autograd.grad(ref, (table, grid), gout)):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, ALIGNS)))
def test_2d_float32_matches_f_grid_sample(padding, align):
    gen = torch.Generator().manual_seed(stable_seed("bicubic f32", padding, align))
    table = torch.randn(2, 19, 7, 6, generator=gen, requires_grad=True)
    grid = ((torch.rand(2, 5, 8, 2, generator=gen) * 2 - 1) * 1.3).requires_grad_()
    out = grad_ext.grid_sample(table, grid, "bicubic", padding, align)
    ref = F.grid_sample(table, grid, "bicubic", padding, align)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn(ref.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (table, grid), gout), torch.autograd.grad(ref, (table, grid), gout)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cubic_reference_matches_f_grid_sample():
    """The reference used for 1-D/3-D is itself checked against F.grid_sample in 2-D."""
    gen = torch.Generator().manual_seed(13)
    for padding, align in itertools.product(PADDINGS, ALIGNS):
        table, grid = _table_and_grid(gen, (3, 4, 6, 5), (3, 5, 4, 2), 2.5)
        _assert_matches(lambda t, g: reference.cubic_sample(t, g, padding, align),
                        lambda t, g: F.grid_sample(t, g, "bicubic", padding, align), table, grid, gen)


def test_cubic_kernel_values():
    # Keys' kernel with A = -0.75: W(0) = 1, W(+-1) = W(+-2) = 0, W(0.5) = 1 - 0.25 * (A + 3) + 0.125 * (A + 2),
    # and the four weights of any fraction sum to 1.
    s = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    want = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1 - 0.25 * 2.25 + 0.125 * 1.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(reference.cubic_kernel(s), want)
    t = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    total = sum(reference.cubic_kernel(t + 1 - i) for i in range(4))
    torch.testing.assert_close(total, torch.ones_like(t))


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, ALIGNS)))
def test_1d_and_3d_match_cubic_reference(d, shared, padding, align):
    gen = torch.Generator().manual_seed(stable_seed("cubic", d, shared, padding, align))
    sizes = {1: [(9,), (1,), (2,)], 3: [(4, 5, 3), (1, 3, 2), (5, 2, 4)]}[d]
    outs = {1: [(7,), (5,), (3,)], 3: [(2, 3, 2), (3, 1, 2), (2, 2, 2)]}[d]
    for size, out in zip(sizes, outs):
        table, grid = _table_and_grid(gen, (1 if shared else 3, 6, *size), (3, *out, d), 1.6)
        _assert_matches(lambda t, g: grad_ext.grid_sample(t, g, "bicubic", padding, align),
                        lambda t, g: reference.cubic_sample(t, g, padding, align), table, grid, gen)
        # grad_ext.reference.grid_sample picks the same reference for these dimensions
        torch.testing.assert_close(reference.grid_sample(table, grid, "bicubic", padding, align),
                                   reference.cubic_sample(table, grid, padding, align))


def test_3d_many_channels_and_points_match_cubic_reference():
    # enough channels for several cell-major blocks and enough points for several tiles
    gen = torch.Generator().manual_seed(21)
    table, grid = _table_and_grid(gen, (1, 70, 4, 4, 4), (2, 6, 6, 5, 3), 1.2)
    _assert_matches(lambda t, g: grad_ext.grid_sample(t, g, "bicubic", "reflection", False),
                    lambda t, g: reference.cubic_sample(t, g, "reflection", False), table, grid, gen)


def test_1d_equals_2d_with_a_flat_axis():
    """1-D cubic is 2-D bicubic on a height-1 table sampled at y = 0 with border padding
    (its vertical taps then all fall on the one row, weights summing to 1)."""
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    x = torch.rand(2, 9, 1, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    out = grad_ext.grid_sample(table, x, "bicubic", "border", True)
    grid2 = torch.cat([x, torch.zeros_like(x)], dim=-1)[:, None]
    ref = F.grid_sample(table[:, :, None], grid2, "bicubic", "border", True)[:, :, 0]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("d,shared", [(1, False), (2, False), (2, True), (3, True)])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(d, shared, padding):
    gen = torch.Generator().manual_seed(stable_seed("cubic gradcheck", d, shared, padding))
    sizes = {1: [5], 2: [4, 3], 3: [3, 2, 3]}[d]
    table = torch.randn(1 if shared else 2, 2, *sizes, dtype=torch.float64, generator=gen, requires_grad=True)
    out = {1: [4], 2: [3, 2], 3: [2, 1, 2]}[d]
    # away from cell boundaries the cubic is smooth; the band outside the table is included
    grid = (torch.rand(2, *out, d, dtype=torch.float64, generator=gen) * 2.4 - 1.2).requires_grad_()
    for align in ALIGNS:
        assert torch.autograd.gradcheck(lambda a, b: grad_ext.grid_sample(a, b, "bicubic", padding, align),
                                        (table, grid))


def test_module_and_opcheck():
    m = grad_ext.GridSample("bicubic", "reflection", True)
    table, grid = torch.randn(1, 2, 5, 4), torch.rand(2, 3, 3, 2) * 2 - 1
    torch.testing.assert_close(m(table, grid), F.grid_sample(table.expand(2, -1, -1, -1), grid, "bicubic",
                                                             "reflection", True))
    gen = torch.Generator().manual_seed(0)
    shapes = (((2, 3, 4, 5), (2, 3, 2, 2)), ((1, 3, 6), (2, 5, 1)), ((1, 2, 3, 4, 3), (2, 2, 1, 2, 3)))
    for table_shape, grid_shape in shapes:
        table = torch.randn(table_shape, generator=gen).requires_grad_()
        grid = (torch.rand(grid_shape, generator=gen) * 2 - 1).requires_grad_()
        for padding in range(3):
            torch.library.opcheck(torch.ops.grad_ext.sample_grid, (table, grid, 2, padding, False, 0.0, 0.0, 0, None))


def test_jittered_bicubic_equals_bicubic_at_the_jittered_points():
    gen = torch.Generator().manual_seed(8)
    table, grid = _table_and_grid(gen, (1, 4, 6, 6), (2, 5, 5, 2), 1.0)
    kw = dict(jitter_std=0.1, jitter_prob=0.5, jitter_seed=(7, 3))
    out = grad_ext.grid_sample(table, grid, "bicubic", **kw)
    noise = grad_ext.jitter_noise((7, 3), grid[..., 0].numel(), 2, 0.1, 0.5)
    ref = F.grid_sample(table.expand(2, -1, -1, -1), reference.jitter_grid(grid, noise.noise), "bicubic",
                        align_corners=False)
    torch.testing.assert_close(out, ref)
    # the reference draws the same noise in Python; its float32 log/cos may differ by an ulp
    torch.testing.assert_close(reference.grid_sample(table, grid, "bicubic", **kw), ref, rtol=1e-5, atol=1e-5)
