"""CUDA kernels without a GPU: csrc/cuda's launchers and kernels, compiled as host C++ and run on
the CPU under CUDA's execution model (csrc/cuda/emulation), against the CPU kernels
(torch.ops.grad_ext on CPU tensors, themselves tested against F.grid_sample) and
grad_ext.reference. Every launch path of tests/test_cuda.py runs here on small shapes, and each
test reads the launch log to check that the kernels it is about ran.

scripts/cuda_emulation.sh runs this file twice: under AddressSanitizer with
UndefinedBehaviorSanitizer, and under ThreadSanitizer. Without that script (no
GRAD_EXT_EMULATION_LIBRARY) the tests are skipped.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from grad_ext import reference
from tests import cuda_emulation as emu
from tests.cuda_emulation import families, launch_log, sample_grid, sample_grid_backward

pytestmark = pytest.mark.emulation
CPU = torch.ops.grad_ext
MODES = ["bilinear", "nearest", "bicubic"]
PADDINGS = ["zeros", "border", "reflection"]
# Relative to the largest magnitude of the expected tensor: the kernels sum in other orders.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def default_settings():
    emu.configure()
    yield
    emu.configure()


def table_and_grid(table_shape, grid_shape, seed=0, spread=1.2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(table_shape, generator=gen, dtype=torch.float64)
    grid = (torch.rand(grid_shape, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    return table.to(dtype), grid.to(dtype)


def close(got, want, dtype, what):
    tol = TOLERANCE[dtype]
    scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def run_both(table, grid, mode="bilinear", padding="zeros", align=False, jitter=None, need_input=True,
             need_grid=True, seed=0):
    """Forward and backward through the emulated CUDA kernels and the CPU kernels; asserts that
    they agree and returns the kernel families the emulation launched (forward, backward)."""
    dtype = table.dtype
    want = sample_grid(CPU, table, grid, mode, padding, align, jitter)
    with launch_log() as forward_log:
        got = sample_grid(emu.ops(), table, grid, mode, padding, align, jitter)
    assert got.dtype == dtype and got.shape == want.shape
    close(got, want, dtype, f"{mode}/{padding}/align={align} forward")
    gen = torch.Generator().manual_seed(seed)
    gout = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(dtype)
    want_grads = sample_grid_backward(CPU, gout, table, grid, mode, padding, align, jitter, need_input, need_grid)
    with launch_log() as backward_log:
        got_grads = sample_grid_backward(emu.ops(), gout, table, grid, mode, padding, align, jitter, need_input,
                                         need_grid)
    for name, a, b, needed in zip(("input", "grid"), got_grads, want_grads, (need_input, need_grid)):
        assert a.shape == b.shape, name
        if needed:
            close(a, b, dtype, f"{mode}/{padding}/align={align} {name} gradient")
    return families(forward_log), families(backward_log)


# ---- the emulation itself ---------------------------------------------------------------------

def expected_shuffle(op, width, arg, lane):
    """CUDA C++ Programming Guide, warp shuffle functions: the lane whose value `lane` gets."""
    start = lane // width * width
    if op == 0:  # __shfl_sync: srcLane modulo width, inside the lane's own group
        return start + arg % width
    if op == 1:  # __shfl_up_sync: lane - delta, unless that leaves the group
        return lane - arg if lane - arg >= start else lane
    if op == 2:  # __shfl_down_sync: lane + delta, unless that leaves the group
        return lane + arg if lane + arg < start + width else lane
    src = lane ^ arg  # __shfl_xor_sync: later groups are out of reach, earlier ones are not
    return src if src < start + width else lane


def test_shuffles_follow_cudas_rules():
    out = emu.ops().selftest("shuffles")
    cases, values = out[:-1, :3].tolist(), out[:, 3:]
    assert len(cases) == 4 * 6 * 9 and values.shape[1] == 64
    for row, (op, width, arg) in enumerate(cases):
        for t in range(64):  # two warps: lanes are t % 32
            warp, lane = divmod(t, 32)
            assert values[row, t] == 1000 + 32 * warp + expected_shuffle(op, width, arg, lane), (op, width, arg, t)
    # two half-warps shuffling at once, each with its own mask
    assert values[-1].tolist() == [1000 + (t ^ 1) for t in range(64)]


def test_order_settings_change_which_thread_runs_first():
    firsts = {}
    for order, seed in (("ascending", 0), ("descending", 0), ("random", 1), ("random", 2)):
        emu.configure(order=order, seed=seed, workers=1)
        firsts[(order, seed)] = emu.ops().selftest("order").tolist()
    n = 4 * 64
    assert firsts[("ascending", 0)] == list(range(n))
    assert firsts[("descending", 0)] == list(range(n))[::-1]
    for seed in (1, 2):
        assert sorted(firsts[("random", seed)]) == list(range(n))
    assert firsts[("random", 1)] not in (firsts[("random", 2)], list(range(n)), list(range(n))[::-1])


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", "divergent __syncthreads"),
    ("barrier_after_return", "returned while threads"),
    ("shuffle_without_own_lane", "leaves out its own lane"),
    ("shuffle_from_inactive_lane", "which is not in the mask"),
    ("shuffle_deadlock", "a deadlock"),
    ("too_many_threads", "block dimension 0 must be 1 to 1024"),
    ("smem_without_opt_in", "at most 49152 bytes of dynamic shared memory"),
])
def test_emulation_reports_misuse_with_the_kernels_name(name, message):
    with pytest.raises(RuntimeError, match=message) as info:
        emu.ops().selftest(name)
    assert f"selftest::{name}" in str(info.value)


# What each sanitizer must report of the deliberately broken kernels, in a process of its own;
# the report's stack names the kernel, and AddressSanitizer's and ThreadSanitizer's end with the
# emulation's line naming the block and thread.
SANITIZER_CASES = {
    "address,undefined": [("shared_out_of_bounds", "heap-buffer-overflow"),
                          ("global_out_of_bounds", "heap-buffer-overflow"),
                          ("misaligned_shared", "misaligned address")],
    "thread": [("shared_race", "data race"), ("global_race", "data race")],
}


def test_sanitizer_reports_name_the_kernel():
    cases = SANITIZER_CASES[emu.info()["sanitizers"]]
    for name, report in cases:
        code = (f"import torch; torch.ops.load_library({emu.LIBRARY!r}); "
                f"torch.ops.grad_ext_emulated.selftest({name!r})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=os.environ)
        assert done.returncode != 0, f"{name}: no sanitizer report\n{done.stderr[-2000:]}"
        assert report in done.stderr, f"{name}: expected {report!r}\n{done.stderr[-3000:]}"
        assert f"in {name}_kernel" in done.stderr or f"#0 {name}_kernel" in done.stderr, done.stderr[-3000:]
        if report != "misaligned address":  # UndefinedBehaviorSanitizer calls no death callback
            assert f"kernel selftest::{name}, block (0, 0, 0)" in done.stderr, done.stderr[-3000:]


def test_launches_are_checked_against_the_device_table():
    limits = {d: json.loads(emu.ops().cuda_device_limits(d)) for d in ("h100", "h200")}
    assert limits["h100"]["sm_count"] == limits["h200"]["sm_count"] == 132
    assert limits["h100"]["smem_per_block_optin"] == 227 * 1024
    assert limits["h200"]["global_memory_bytes"] > limits["h100"]["global_memory_bytes"]
    assert json.loads(emu.ops().cuda_device_limits("current")) == limits["h100"]  # the default
    with pytest.raises(ValueError, match="'h100', 'h200' or 'current'"):
        emu.ops().cuda_device_limits("a100")


# ---- every launch path, against the CPU kernels -------------------------------------------------

# (table shape, grid shape): the kernels each takes on an H100 (csrc/cuda/sample_grid_launch.cuh).
PATHS = {
    # GRAD's global grid in the model's form: channels forward (P = 1), table backward with the
    # output-gradient tile read along channels, 2 channel slices, one point group.
    "global-model-form": ((1, 300, 4, 4), (6, 1, 1, 2)),
    # ... in the reference code's form: points forward, tile along points.
    "global-reference-form": ((1, 300, 4, 4), (1, 40, 1, 2)),
    # GRAD's local grid: points forward, table backward with several point groups (atomics).
    "local": ((1, 24, 8, 8), (2, 12, 12, 2)),
    # channel counts that are no multiple of 32, odd cells per channel
    "odd-channels": ((1, 70, 3, 5), (5, 9, 7, 2)),
    # per-image small tables: table backward per table batch (grid z), few points (P = 3 < 4)
    "per-image-few-points": ((7, 40, 4, 4), (7, 3, 1, 2)),
    # a batch with 2 to 31 points: channels forward with P > 1
    "few-points-per-image": ((1, 50, 5, 5), (9, 2, 3, 2)),
    # a table too large for shared memory: scatter kernel (sorted-cells kernels when deterministic)
    "large-table": ((2, 3, 48, 48), (2, 5, 7, 2)),
}
FORWARD_KERNEL = {"global-model-form": "forward_channels_kernel", "per-image-few-points": "forward_channels_kernel",
                  "few-points-per-image": "forward_channels_kernel"}


def expected_backward(path, mode, need_input, need_grid):
    grid_grad = need_grid and mode != "nearest"
    kernels = set()
    if need_input:
        table_kernel = f"table_backward_kernel<{str(grid_grad).lower()}>"
        kernels.add("scatter_backward_kernel" if path == "large-table" else table_kernel)
    if grid_grad:
        kernels.add("reduce_grid_kernel")
        if not need_input or path == "large-table":
            kernels.add("scatter_backward_kernel")
    return kernels


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("mode", MODES)
def test_launch_paths_match_cpu(path, mode):
    table, grid = table_and_grid(*PATHS[path], seed=len(path), dtype=torch.float32)
    for need_input, need_grid in ((True, True), (True, False), (False, True)):
        forward, backward = run_both(table, grid, mode, need_input=need_input, need_grid=need_grid)
        assert forward == {FORWARD_KERNEL.get(path, "forward_points_kernel")}
        assert backward == expected_backward(path, mode, need_input, need_grid)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("padding,align", list(itertools.product(PADDINGS, [False, True])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_tables_every_dimension_match_cpu_and_reference(d, padding, align, dtype):
    sizes = {1: (7,), 2: (5, 6), 3: (3, 4, 3), 4: (2, 3, 2, 3)}[d]
    for n_in, out in ((1, [3] * d), (3, [2] * d)):
        table, grid = table_and_grid((n_in, 37, *sizes), (3, *out, d), seed=d * 10 + n_in, spread=1.4, dtype=dtype)
        for mode in MODES if d <= 3 else ["bilinear", "nearest"]:
            run_both(table, grid, mode, padding, align)
            want = reference.grid_sample(table.double(), grid.double(), mode, padding, align)
            close(sample_grid(emu.ops(), table, grid, mode, padding, align), want, dtype, "reference")
        table1, grid1 = table_and_grid((1, 40, *sizes), (5, *[1] * d, d), seed=d, dtype=dtype)  # one point per image
        for mode in ["bilinear", "bicubic"] if d <= 3 else ["bilinear"]:
            forward, _ = run_both(table1, grid1, mode, padding, align)
            assert forward == {"forward_channels_kernel"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,n_in,mode", [(d, n_in, mode) for d in (1, 2, 3, 4) for n_in, mode in
                                         [(1, "bilinear"), (3, "bilinear"), (3, "nearest"), (1, "bicubic"),
                                          (3, "bicubic")] if not (mode == "bicubic" and d == 4)])
def test_reduced_precision_every_dimension_match_cpu(dtype, d, n_in, mode):
    sizes = {1: (9,), 2: (6, 5), 3: (4, 3, 5), 4: (3, 2, 3, 2)}[d]
    table, grid = table_and_grid((n_in, 24, *sizes), (3, *[3] * d, d), seed=d, spread=0.9, dtype=dtype)
    run_both(table, grid, mode)
    table1, grid1 = table_and_grid((n_in, 24, *sizes), (3, *[1] * d, d), seed=d, spread=0.9, dtype=dtype)
    run_both(table1, grid1, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_3d_bicubic_with_an_odd_cell_count(dtype):
    # The review of efb92a9, N1: 3-D bicubic's 64-bit tap masks sat in shared memory at 4 (mod 8)
    # behind an odd number of float rows (a misaligned address on the GPU). S = 27 cells: the
    # channels forward (P = 1) and the table backward without the grid gradient.
    table, grid = table_and_grid((1, 4, 3, 3, 3), (2, 1, 1, 1, 3), seed=5, dtype=dtype)
    forward, backward = run_both(table, grid, "bicubic", need_grid=False)
    assert forward == {"forward_channels_kernel"} and backward == {"table_backward_kernel<false>"}
    table, grid = table_and_grid((1, 4, 3, 3, 3), (2, 4, 4, 4, 3), seed=6, dtype=dtype)
    forward, backward = run_both(table, grid, "bicubic", need_grid=False)
    assert forward == {"forward_points_kernel"} and backward == {"table_backward_kernel<false>"}


# ---- jitter ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["global-model-form", "local"])
def test_bicubic_points_outside_with_an_infinite_output_gradient(path):
    # README (the review of efb92a9, N9): with zeros padding, taps outside the table add nothing,
    # so a point outside keeps a grid gradient of 0 under an infinite or NaN output gradient, on
    # the CPU and in the CUDA kernels alike; F.grid_sample multiplies it by the taps' zeros (NaN).
    table_shape, grid_shape = PATHS[path]
    table, grid = table_and_grid(table_shape, grid_shape, seed=9)
    grid.view(-1, 2)[0] = 5.0  # the first point, far outside
    gout = torch.randn(sample_grid(CPU, table, grid, "bicubic").shape, dtype=torch.float64)
    gout[0, :, 0, 0] = float("inf")
    gout[0, 0, 0, 0] = float("nan")
    want = sample_grid_backward(CPU, gout, table, grid, "bicubic")
    with launch_log() as log:
        got = sample_grid_backward(emu.ops(), gout, table, grid, "bicubic")
    assert any("reduce_grid_kernel" in f for f in families(log))
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    assert got[1][0, 0, 0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    grid.requires_grad_()
    out = torch.nn.functional.grid_sample(table.expand(grid.shape[0], *table.shape[1:]), grid, "bicubic", "zeros",
                                          False)
    theirs = torch.autograd.grad(out, grid, gout)[0]
    assert theirs[0, 0, 0].isnan().all()


@pytest.mark.parametrize("path", ["global-model-form", "local", "large-table", "few-points-per-image"])
@pytest.mark.parametrize("jitter_mode", ["pixel", "batch"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_jittered_calls_match_cpu_with_the_same_noise(path, jitter_mode, mode):
    table, grid = table_and_grid(*PATHS[path], seed=11, dtype=torch.float32)
    seed = torch.tensor([1234, 5], dtype=torch.int64)
    run_both(table, grid, mode, jitter=(0.05, 0.5, jitter_mode, seed))


def test_jitter_noise_kernel_matches_cpu():
    seed = torch.tensor([99, 3], dtype=torch.int64)
    for num_points, dim, prob, jmode in ((1000, 2, 0.5, 0), (77, 3, 1.0, 1), (0, 4, 0.5, 0)):
        with launch_log() as log:
            noise, flags = emu.ops().jitter_noise(seed, num_points, dim, 0.1, prob, jmode)
        want_noise, want_flags = CPU.jitter_noise(seed, num_points, dim, 0.1, prob, jmode)
        assert torch.equal(flags, want_flags) and torch.equal(noise, want_noise)
        assert families(log) == ({"jitter_noise_kernel"} if num_points else set())


# ---- deterministic paths ----------------------------------------------------------------------------

@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


SCHEDULES = [dict(order="ascending", workers=2), dict(order="random", seed=3, workers=3),
             dict(order="descending", workers=1)]


@pytest.mark.parametrize("path,kernels", [
    ("local", {"table_backward_kernel<true>", "reduce_partials_kernel", "reduce_grid_kernel"}),
    ("large-table", {"scatter_backward_kernel", "cell_keys_kernel", "sorted_cells_kernel", "reduce_grid_kernel"}),
    ("global-model-form", {"table_backward_kernel<true>", "reduce_grid_kernel"}),
])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_deterministic_paths_agree_bitwise_under_different_schedules(deterministic, path, kernels, mode):
    table, grid = table_and_grid(*PATHS[path], seed=21, dtype=torch.float32)
    gout = torch.randn(sample_grid(CPU, table, grid, mode).shape, generator=torch.Generator().manual_seed(2))
    results = []
    for schedule in SCHEDULES:
        emu.configure(**schedule)
        with launch_log() as log:
            results.append(sample_grid_backward(emu.ops(), gout, table, grid, mode))
        assert families(log) == kernels
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    want = sample_grid_backward(CPU, gout, table, grid, mode)
    for a, b in zip(results[0], want):
        close(a, b, torch.float32, "deterministic")


def test_atomic_path_depends_on_the_schedule():
    # The schedules above do reorder the atomics: without deterministic mode, the large-table
    # backward adds 1e8, 1 and -1e8 to one cell in an order that the block order decides.
    table = torch.zeros(1, 1, 48, 48)
    grid = torch.full((40, 32, 1, 2), -1.0 + 1.0 / 48)  # every point samples cell (0, 0) exactly
    gout = torch.ones(40, 1, 32, 1)
    gout[:, 0, 0, 0] = torch.tensor([1e8, 1.0, -1e8, 1.0] * 10)
    sums = set()
    for schedule in SCHEDULES:
        emu.configure(**schedule)
        grad_input, _ = sample_grid_backward(emu.ops(), gout, table, grid, need_grid=False)
        sums.add(grad_input[0, 0, 0, 0].item())
    assert len(sums) > 1


# ---- refine -----------------------------------------------------------------------------------------

def refine_pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.rand((shape[0], 1, *shape[2:]), generator=g, dtype=torch.float64) * 6
    rec = feat + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return rec.to(dtype), feat.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 20, 5, 7), (1, 3, 1, 1), (3, 9, 4, 11)])
def test_refine_matches_cpu_and_reference(dtype, shape):
    rec, feat = refine_pair(shape, dtype)
    params = (0.3, 0.7, 10.0)
    with launch_log() as log:
        sim, amap, loss, refined, stats = emu.ops().refine(rec, feat, *params, True)
    assert families(log) == {"refine_forward_kernel", "sum_loss_kernel"}
    want = reference.refine(rec.double(), feat.double(), *params, return_refined=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 5e-2
    for got, expected in ((sim, want.sim), (amap, want.anomaly_map), (loss, want.loss), (refined, want.refined)):
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    gen = torch.Generator().manual_seed(1)
    ups = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for t in (sim, amap, loss, refined)]
    with launch_log() as log:
        grad_rec, grad_feat = emu.ops().refine_backward(*ups, rec, feat, stats, 0.3, 0.7, True, True)
    assert families(log) == {"refine_backward_kernel"}
    r64, f64 = rec.double().requires_grad_(), feat.double().requires_grad_()
    out = reference.refine(r64, f64, *params, return_refined=True)
    total = sum((o * u.double()).sum() for o, u in zip((out.sim, out.anomaly_map, out.loss, out.refined), ups))
    want_rec, want_feat = torch.autograd.grad(total, (r64, f64))
    torch.testing.assert_close(grad_rec.double(), want_rec, rtol=tol, atol=10 * tol)
    torch.testing.assert_close(grad_feat.double(), want_feat, rtol=tol, atol=10 * tol)
    if dtype in (torch.float32, torch.float64):  # the CPU kernels take these two
        cpu = CPU.refine(rec, feat, *params, True)
        for got, expected in zip((sim, amap, loss, refined), cpu[:4]):
            close(got, expected, dtype, "refine vs CPU")
        cpu_grads = CPU.refine_backward(*ups, rec, feat, cpu[4], 0.3, 0.7, True, True)
        for got, expected in zip((grad_rec, grad_feat), cpu_grads):
            torch.testing.assert_close(got, expected, rtol=10 * TOLERANCE[dtype], atol=10 * TOLERANCE[dtype])


# ---- launch geometry on the real shapes (launches checked and logged, not run) -----------------

# GRAD's feature maps (channels, side): EfficientNet-B4 at 224 px (GRAD), B6 at 256 px
# (Bi-Grid), Lite1 at 240 px (the demo); python/gradad/backbones.py. Grids of 8x8 and 4x4.
GRAD_FEATURES = {"B4": (216, 28), "B6": (272, 32), "Lite": (152, 30)}
BATCHES = (1, 16, 64)
# benchmarks/bench_grid_sample.py's drop-in shapes: (table, grid, mode)
DROP_IN = {
    "2-D": ((16, 64, 64, 64), (16, 64, 64, 2), "bilinear"),
    "2-D bicubic": ((16, 64, 64, 64), (16, 64, 64, 2), "bicubic"),
    "3-D": ((4, 32, 32, 32, 32), (4, 32, 32, 32, 3), "bilinear"),
    "1-D": ((16, 64, 4096), (16, 4096, 1), "bilinear"),
    "4-D": ((2, 16, 8, 8, 8, 8), (2, 16, 16, 16, 16, 4), "bilinear"),
}


def grad_calls(features):
    channels, side = GRAD_FEATURES[features]
    for b in BATCHES:
        yield f"local B={b}", (1, channels, 8, 8), (b, side, side, 2)
        yield f"global B={b}", (1, channels * side * side, 4, 4), (b, 1, 1, 2)
        yield f"global (1,B,1,2) B={b}", (1, channels * side * side, 4, 4), (1, b, 1, 2)


def dry_run(table_shape, grid_shape, mode="bilinear", dtype=torch.float32, need_input=True, need_grid=True):
    """The launches of a forward and a backward call, checked against the device but not run."""
    table = torch.empty(table_shape, dtype=dtype)
    grid = torch.zeros(grid_shape, dtype=dtype)
    with launch_log() as forward:
        out = sample_grid(emu.ops(), table, grid, mode)
    with launch_log() as backward:
        sample_grid_backward(emu.ops(), torch.empty(out.shape, dtype=dtype), table, grid, mode,
                             need_input=need_input, need_grid=need_grid)
    return forward, backward


def check_within_limits(launch, limits, what):
    """A launch that the CUDA runtime of `limits`' device accepts (compute capability 9.0 rules)."""
    threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
    assert all(1 <= g <= m for g, m in zip(launch["grid"], limits["max_grid"])), what
    assert all(1 <= b <= m for b, m in zip(launch["block"], limits["max_block"])), what
    assert threads <= limits["max_threads_per_block"], what
    assert launch["dynamic_smem"] + launch["static_smem"] <= limits["smem_per_block_optin"], what
    warps = -(-threads // 32)
    regs_per_warp = -(-launch["registers"] * 32 // 256) * 256
    assert regs_per_warp * warps <= limits["regs_per_block"], what
    smem_per_block = launch["dynamic_smem"] + launch["static_smem"] + limits["reserved_smem_per_block"]
    assert launch["blocks_per_sm"] >= 1 and launch["blocks_per_sm"] * warps * 32 <= limits["max_threads_per_sm"], what
    assert launch["blocks_per_sm"] * smem_per_block <= limits["smem_per_sm"], what
    assert launch["executed"] is False and launch["device"] == limits["name"], what


@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("features", sorted(GRAD_FEATURES))
def test_grad_shapes_launch_within_the_device_limits(device, features):
    emu.configure(device=device, execute=False)
    limits = json.loads(emu.ops().cuda_device_limits(device))
    for name, table_shape, grid_shape in grad_calls(features):
        forward, backward = dry_run(table_shape, grid_shape)
        for launch in forward + backward:
            check_within_limits(launch, limits, f"{features} {name}: {launch}")
        points = grid_shape[1] * grid_shape[2]  # per image: fewer than 32 take the channels kernel
        assert families(forward) == {"forward_channels_kernel" if points < 32 else "forward_points_kernel"}, name
        assert families(backward) == {"table_backward_kernel<true>", "reduce_grid_kernel"}, name


@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("case", sorted(DROP_IN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_in_shapes_launch_within_the_device_limits(device, case, dtype, deterministic_off_and_on):
    emu.configure(device=device, execute=False)
    limits = json.loads(emu.ops().cuda_device_limits(device))
    table_shape, grid_shape, mode = DROP_IN[case]
    forward, backward = dry_run(table_shape, grid_shape, mode, dtype)
    for launch in forward + backward:
        check_within_limits(launch, limits, f"{case}: {launch}")
    assert families(forward) == {"forward_points_kernel"}


@pytest.fixture(params=[False, True], ids=["atomics", "deterministic"])
def deterministic_off_and_on(request):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


def test_grid_gradient_reduction_runs_in_parallel():
    # The review of efb92a9, N2: GRAD's global backward (B4, B = 64) left one thread per point to
    # add 662 slices' partial sums in series, 64 threads on one multiprocessor.
    emu.configure(execute=False)
    channels, side = GRAD_FEATURES["B4"]
    _, backward = dry_run((1, channels * side * side, 4, 4), (64, 1, 1, 2))
    table = next(r for r in backward if "table_backward_kernel" in r["kernel"])
    reduce = next(r for r in backward if "reduce_grid_kernel" in r["kernel"])
    parts = -(-channels * side * side // table["block"][0])  # channel slices: one partial sum each
    assert parts > 600
    threads = reduce["grid"][0] * reduce["block"][0]
    assert threads >= 64 * 32, f"{threads} threads add {parts} partial sums for each of 64 points"


def test_deterministic_large_table_backward_fills_the_device(deterministic):
    # The review of efb92a9, N4: a deterministic backward of a 512x512 table with 3 channels ran on
    # 255 threads, each walking 3,084 points, over 256 MB of per-group partial tables.
    emu.configure(execute=False)
    _, backward = dry_run((1, 3, 512, 512), (1, 512, 512, 2), need_grid=False)
    assert backward, "no launch"
    for launch in backward:
        threads = launch["grid"][0] * launch["grid"][1] * launch["block"][0] * launch["block"][1]
        assert threads >= 512 * 512, f"{launch['kernel']}: {threads} threads for 262,144 points"
