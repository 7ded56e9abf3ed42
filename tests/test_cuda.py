"""CUDA coverage of the ops beyond tests/test_sample_grid.py::TestCUDA: every kernel and launch
path of csrc/cuda/sample_grid.cu against the CPU kernel (itself checked against F.grid_sample)
or F.grid_sample on the GPU, jitter, reduced precision, layouts, empty tensors, devices and
bitwise determinism of every backward path.

Every test here is marked ``cuda`` and skipped without a GPU. ``GRAD_EXT_TEST_DEVICE=cpu``
runs them on the CPU kernels instead, to check the tests themselves on a machine without a GPU
(comparisons of the device against the CPU then compare the CPU with itself).
"""

import itertools
import json
import os

import pytest
import torch
import torch.nn.functional as F

import grad_ext
from grad_ext import reference

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("GRAD_EXT_TEST_DEVICE", "cuda")
MODES = ["bilinear", "nearest", "bicubic"]  # bicubic: 1-D to 3-D tables
PADDINGS = ["zeros", "border", "reflection"]
REDUCED = [torch.float16, torch.bfloat16]


def _grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout, allow_unused=True)


def _on_device(*tensors, dtype=None):
    return [t.detach().to(DEVICE, dtype).requires_grad_(t.requires_grad) for t in tensors]


def assert_matches_cpu(table, grid, mode="bilinear", padding="zeros", align=False, seed=0, tol=None,
                       need_input=True, need_grid=True, **jitter):
    """Values and both gradients on the device equal the CPU kernel's (float64 inputs)."""
    gen = torch.Generator().manual_seed(seed)
    table = table.detach().requires_grad_(need_input)
    grid = grid.detach().requires_grad_(need_grid)
    cpu = grad_ext.grid_sample(table, grid, mode, padding, align, **jitter)
    gout = torch.randn(cpu.shape, generator=gen, dtype=cpu.dtype)
    wanted = [t for t in (table, grid) if t.requires_grad]
    cpu_grads = _grads(cpu, wanted, gout)
    dt, dg = _on_device(table, grid)
    dev = grad_ext.grid_sample(dt, dg, mode, padding, align, **jitter)
    dev_grads = _grads(dev, [t for t in (dt, dg) if t.requires_grad], gout.to(DEVICE))
    kw = {} if tol is None else dict(rtol=tol, atol=tol)
    torch.testing.assert_close(dev.cpu(), cpu, **kw)
    for a, b in zip(dev_grads, cpu_grads):
        if a is None or b is None:
            assert a is None and b is None or mode == "nearest"
            continue
        torch.testing.assert_close(a.cpu(), b, **kw)


def table_and_grid(table_shape, grid_shape, seed=0, spread=1.2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(table_shape, generator=gen, dtype=dtype)
    grid = (torch.rand(grid_shape, generator=gen, dtype=dtype) * 2 - 1) * spread
    return table, grid


# ---- every launch path, against the CPU kernel -------------------------------------------

# (table shape, grid shape): which CUDA kernels they take (see csrc/cuda/sample_grid.cu).
PATHS = {
    # GRAD's global grid in the model's form: channels forward (P = 1), table backward with the
    # output-gradient tile read along channels, many channel slices, one point group.
    "global-model-form": ((1, 3000, 4, 4), (40, 1, 1, 2)),
    # ... in the reference code's form: points forward, tile along points.
    "global-reference-form": ((1, 3000, 4, 4), (1, 40, 1, 2)),
    # GRAD's local grid: points forward, table backward with many point groups.
    "local": ((1, 216, 8, 8), (6, 28, 28, 2)),
    # channel counts that are no multiple of 32, several slices, odd cells per channel
    "odd-channels": ((1, 70, 3, 5), (5, 9, 7, 2)),
    # per-image small tables: table backward per table batch (grid z), few points (P = 3 < 4)
    "per-image-few-points": ((7, 40, 4, 4), (7, 3, 1, 2)),
    # a batch with 2 to 31 points: channels forward with P > 1
    "few-points-per-image": ((1, 50, 5, 5), (9, 2, 3, 2)),
    # a large table: scatter kernel (sorted-cells kernels when deterministic)
    "large-table": ((2, 20, 48, 48), (2, 17, 13, 2)),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("mode", MODES)
def test_launch_paths_match_cpu(path, mode):
    table, grid = table_and_grid(*PATHS[path], seed=len(path))
    assert_matches_cpu(table, grid, mode)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_gradient_at_a_time_matches_cpu(path):
    table, grid = table_and_grid(*PATHS[path], seed=3)
    for mode in ("bilinear", "bicubic"):
        assert_matches_cpu(table, grid, mode, need_input=True, need_grid=False)
        assert_matches_cpu(table, grid, mode, need_input=False, need_grid=True)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, [False, True])))
def test_small_tables_every_dimension_match_cpu(d, padding, align):
    sizes = {1: (7,), 2: (5, 6), 3: (3, 4, 3), 4: (2, 3, 2, 3)}[d]
    for n_in, out in ((1, [3] * d), (3, [2] * d)):
        table, grid = table_and_grid((n_in, 37, *sizes), (3, *out, d), seed=d * 10 + n_in, spread=1.4)
        for mode in MODES if d <= 3 else ["bilinear", "nearest"]:
            assert_matches_cpu(table, grid, mode, padding, align)
        table1, grid1 = table_and_grid((1, 300, *sizes), (5, *[1] * d, d), seed=d)  # one point per image
        for mode in ["bilinear", "bicubic"] if d <= 3 else ["bilinear"]:
            assert_matches_cpu(table1, grid1, mode, padding, align)


# ---- jitter --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["global-model-form", "local", "large-table", "few-points-per-image"])
@pytest.mark.parametrize("mode", ["pixel", "batch"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_jittered_backward_matches_cpu_with_the_same_noise(path, mode, interpolation):
    table, grid = table_and_grid(*PATHS[path], seed=11)
    # CUDA's logf/cosf differ from the CPU's by an ulp or two: the noise, and so the
    # results, agree to float32 precision.
    assert_matches_cpu(table, grid, interpolation, tol=1e-5, jitter_std=0.05, jitter_prob=0.5, jitter_mode=mode,
                       jitter_seed=(1234, 5))


def test_jittered_call_draws_from_the_device_generator():
    table, grid = _on_device(*table_and_grid((1, 8, 6, 6), (2, 5, 5, 2)))
    kw = dict(jitter_std=0.1, jitter_prob=0.5)
    torch.manual_seed(1)
    a = grad_ext.grid_sample(table, grid, **kw)
    torch.manual_seed(1)
    b = grad_ext.grid_sample(table, grid, **kw)
    assert torch.equal(a, b) and not torch.equal(a, grad_ext.grid_sample(table, grid))


# ---- reduced precision ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("d,n_in,mode", [(d, n_in, mode) for d in (1, 2, 3, 4) for n_in, mode in
                                         [(1, "bilinear"), (3, "bilinear"), (3, "nearest"), (1, "bicubic"),
                                          (3, "bicubic")] if not (mode == "bicubic" and d == 4)])
def test_reduced_precision_every_dimension_against_float64(dtype, d, n_in, mode):
    sizes = {1: (9,), 2: (6, 5), 3: (4, 3, 5), 4: (3, 2, 3, 2)}[d]
    table, grid = table_and_grid((n_in, 24, *sizes), (3, *[3] * d, d), seed=d, spread=0.9)
    gen = torch.Generator().manual_seed(d)
    # round the inputs to the dtype first: the comparison then measures the kernel's arithmetic
    table, grid = table.to(dtype).double(), grid.to(dtype).double()
    t64, g64 = table.clone().requires_grad_(), grid.clone().requires_grad_()
    ref = grad_ext.grid_sample(t64, g64, mode)
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    r_grads = _grads(ref, (t64, g64), gout.double())
    tl, gl = _on_device(t64, g64, dtype=dtype)
    out = grad_ext.grid_sample(tl, gl, mode)
    assert out.dtype == dtype
    o_grads = _grads(out, (tl, gl), gout.to(DEVICE))
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(o_grads[0].double().cpu(), r_grads[0], rtol=tol, atol=10 * tol)
    if mode != "nearest":
        torch.testing.assert_close(o_grads[1].double().cpu(), r_grads[1], rtol=tol, atol=10 * tol)


# ---- layouts and sizes ---------------------------------------------------------------------

def test_non_contiguous_and_expanded_inputs():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 12, 7, 9, generator=gen, dtype=torch.float64)
    grid = torch.rand(3, 4, 6, 2, generator=gen, dtype=torch.float64) * 2 - 1
    shared = torch.randn(1, 12, 7, 9, generator=gen, dtype=torch.float64)
    for table in (base.to(memory_format=torch.channels_last), base[:, ::2], base.transpose(2, 3),
                  shared.expand(3, -1, -1, -1)):
        assert_matches_cpu(table, grid)
        dt, dg = _on_device(table, grid)
        torch.testing.assert_close(grad_ext.grid_sample(dt, dg), F.grid_sample(dt, dg, align_corners=False))
    strided_grid = (torch.rand(3, 4, 6, 4, generator=gen, dtype=torch.float64) * 2 - 1)[..., ::2]
    assert_matches_cpu(base, strided_grid)


@pytest.mark.parametrize("inp_shape,grid_shape", [
    ((0, 3, 4, 4), (0, 2, 2, 2)), ((2, 0, 4, 4), (2, 2, 2, 2)), ((2, 3, 4, 4), (2, 0, 2, 2)),
    ((1, 3, 4, 4), (0, 2, 2, 2)), ((2, 3, 4, 4, 4), (2, 0, 1, 2, 3)), ((1, 3, 5), (4, 0, 1)),
])
def test_empty_tensors(inp_shape, grid_shape):
    inp = torch.randn(inp_shape, device=DEVICE, requires_grad=True)
    grid = torch.rand(grid_shape, device=DEVICE, requires_grad=True)
    out = grad_ext.grid_sample(inp, grid)
    assert out.shape == (grid_shape[0], inp_shape[1], *grid_shape[1:-1])
    out.sum().backward()
    assert inp.grad.shape == inp.shape and torch.count_nonzero(inp.grad) == 0
    assert grid.grad.shape == grid.shape and torch.count_nonzero(grid.grad) == 0
    noise = grad_ext.jitter_noise((1, 2), 0, 2, 0.1, 0.5, device=DEVICE)
    assert noise.noise.shape == (0, 2) and noise.jittered.shape == (0,)


def test_second_gpu_keeps_its_device():
    if DEVICE != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    table, grid = table_and_grid((1, 16, 6, 6), (2, 5, 5, 2))
    t1, g1 = table.to("cuda:1").requires_grad_(), grid.to("cuda:1").requires_grad_()
    with torch.cuda.device(0):  # the current device is another one
        out = grad_ext.grid_sample(t1, g1, jitter_std=0.05, jitter_prob=0.5, jitter_seed=(3, 4))
        gi, gg = torch.autograd.grad(out.square().sum(), (t1, g1))
    assert out.device == gi.device == gg.device == torch.device("cuda:1")
    ref = grad_ext.grid_sample(table, grid, jitter_std=0.05, jitter_prob=0.5, jitter_seed=(3, 4))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)


# ---- F.grid_sample on the device: special coordinates, backward too ----------------------------

def test_special_coordinate_gradients_match_f_grid_sample():
    if DEVICE != "cuda":
        pytest.skip("F.grid_sample's CPU backward crashes on NaN coordinates with border/reflection padding")
    vals = torch.tensor([-1.0, 1.0, 0.0, 0.75, 1.25, -9.5, 1e3, 1e10, -3e9, float("inf"), float("-inf"),
                         float("nan")], dtype=torch.float64)
    grid = torch.cartesian_prod(vals, vals).reshape(1, -1, 1, 2).to(DEVICE)
    table = torch.randn(1, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    gout = torch.randn(1, 3, grid.shape[1], 1, dtype=torch.float64, device=DEVICE)
    for mode, padding, align in itertools.product(MODES, PADDINGS, [False, True]):
        t1, g1 = table.clone().requires_grad_(), grid.clone().requires_grad_()
        t2, g2 = table.clone().requires_grad_(), grid.clone().requires_grad_()
        ext = grad_ext.grid_sample(t1, g1, mode, padding, align)
        ref = F.grid_sample(t2, g2, mode, padding, align)
        torch.testing.assert_close(ext, ref, equal_nan=True)
        for a, b in zip(_grads(ext, (t1, g1), gout), _grads(ref, (t2, g2), gout)):
            if b is None:
                assert mode == "nearest" and torch.count_nonzero(a) == 0
                continue
            torch.testing.assert_close(a, b, equal_nan=True)


# ---- determinism -----------------------------------------------------------------------------

DETERMINISM_CASES = {
    **{name: PATHS[name] for name in ("global-model-form", "global-reference-form", "local", "large-table",
                                       "per-image-few-points")},
    "global-full": ((1, 216 * 28 * 28, 4, 4), (64, 1, 1, 2)),
}


@pytest.mark.parametrize("case", sorted(DETERMINISM_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, *REDUCED])
@pytest.mark.parametrize("grads", ["both", "input", "grid"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_deterministic_mode_is_bitwise_reproducible(case, dtype, grads, mode):
    table, grid = table_and_grid(*DETERMINISM_CASES[case], seed=7, dtype=torch.float32)
    table, grid = _on_device(table, grid, dtype=dtype)
    table.requires_grad_(grads in ("both", "input"))
    grid.requires_grad_(grads in ("both", "grid"))
    wanted = [t for t in (table, grid) if t.requires_grad]
    gout = torch.randn(grid.shape[0], table.shape[1], *grid.shape[1:-1], device=DEVICE).to(dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(grad_ext.grid_sample(table, grid, mode), wanted, gout) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    plain = _grads(grad_ext.grid_sample(table, grid, mode), wanted, gout)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(runs[0], plain):  # the same gradient as the default (atomic) path
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# ---- the op interface on the device ------------------------------------------------------------

def test_opcheck_sample_grid_on_device():
    gen = torch.Generator().manual_seed(0)
    cases = [
        ((1, 40, 4, 4), (6, 1, 1, 2)), ((1, 8, 5, 6), (3, 4, 4, 2)), ((3, 8, 5, 6), (3, 4, 4, 2)),
        ((2, 3, 6), (2, 5, 1)), ((1, 2, 2, 3, 2, 3), (2, 2, 1, 1, 2, 4)), ((1, 4, 3, 3, 3), (2, 2, 2, 2, 3)),
    ]
    for table_shape, grid_shape in cases:
        table = torch.randn(table_shape, generator=gen).to(DEVICE).requires_grad_()
        grid = (torch.rand(grid_shape, generator=gen) * 2 - 1).to(DEVICE).requires_grad_()
        for interp, padding in itertools.product([0, 1, 2] if table.dim() <= 5 else [0, 1], [0, 1, 2]):
            torch.library.opcheck(torch.ops.grad_ext.sample_grid,
                                  (table, grid, interp, padding, False, 0.0, 0.0, 0, None))
        seed = torch.tensor([5, 6], device=DEVICE)
        torch.library.opcheck(torch.ops.grad_ext.sample_grid, (table, grid, 0, 0, False, 0.1, 0.5, 0, seed))
    torch.library.opcheck(torch.ops.grad_ext.jitter_noise, (torch.tensor([1, 2], device=DEVICE), 10, 2, 0.1, 0.5, 0))


def test_raw_ops_reject_each_bad_argument_on_device():
    from test_sample_grid import raw_op_bad_calls

    for name, call, exc, match in raw_op_bad_calls(DEVICE):
        with pytest.raises(exc, match=match):
            call()


def test_reference_matches_on_device():
    table, grid = _on_device(*table_and_grid((1, 24, 6, 6), (3, 5, 5, 2)))
    for fn in (grad_ext.grid_sample, reference.grid_sample):
        assert fn(table, grid).device.type == torch.device(DEVICE).type
    torch.testing.assert_close(grad_ext.grid_sample(table, grid), reference.grid_sample(table, grid))


# ---- what the CUDA emulation assumes of the device (tests/test_cuda_emulation.py) -------------

def _launch_log(enable):
    return json.loads(torch.ops.grad_ext.cuda_launch_log(enable))


def _device_table():
    name = torch.cuda.get_device_name()
    table = "h200" if "H200" in name else "h100" if "H100" in name else None
    if DEVICE != "cuda" or table is None:
        pytest.skip(f"the emulation's tables describe the H100 and the H200, this is {name!r}")
    return table


def test_device_limits_match_the_emulations_table():
    table = json.loads(torch.ops.grad_ext.cuda_device_limits(_device_table()))
    current = json.loads(torch.ops.grad_ext.cuda_device_limits("current"))
    for key in ("compute_capability", "sm_count", "smem_per_sm", "smem_per_block", "smem_per_block_optin",
                "reserved_smem_per_block", "max_threads_per_block", "max_threads_per_sm", "max_blocks_per_sm",
                "regs_per_sm", "regs_per_block", "max_grid", "max_block", "warp_size"):
        assert current[key] == table[key], key


def test_occupancy_model_matches_the_cuda_runtime():
    # The launch log holds, for each launch, the occupancy API's blocks per multiprocessor and
    # device_limits.h's model of it from kernel_resources.h (cuobjdump of an sm_90 build).
    _device_table()
    _launch_log(True)
    try:
        for table_shape, grid_shape in [*PATHS.values(), ((1, 216, 8, 8), (64, 28, 28, 2)),
                                        ((1, 216 * 28 * 28, 4, 4), (64, 1, 1, 2))]:
            for mode in MODES:
                table, grid = _on_device(*table_and_grid(table_shape, grid_shape, dtype=torch.float32))
                table.requires_grad_()
                grid.requires_grad_()
                grad_ext.grid_sample(table, grid, mode).sum().backward()
        rec, feat = torch.randn(2, 2, 16, 24, 24, device=DEVICE).unbind(0)
        grad_ext.refine(rec.requires_grad_(), feat, return_refined=True).loss.backward()
    finally:
        log = _launch_log(False)
    assert len(log) > 20
    for launch in log:
        assert launch["model_blocks_per_sm"] == launch["blocks_per_sm"], launch
