"""Benchmark of grad_ext.grid_sample against the pure-torch code it replaces, side by side.

Cases (see :func:`default_cases`): GRAD's global shape (one table of 216·28·28 channels at B
points) in the model's form (grid (B, 1, 1, 2): one point per image, the headline) against
F.grid_sample as the reference code calls it (grid (1, B, 1, 2), output transposed to
(B, C·H·W)), and both sides in the reference code's form; the local shape (one 216×8×8
table shared by B images of 28×28 points, which the reference code repeats over the batch),
drop-in 2-D/3-D F.grid_sample shapes, 1-D and 4-D tables against
``grad_ext.reference.multilinear_sample``, deterministic mode, and in-kernel jitter against
"torch noise, then F.grid_sample". Each case is timed forward (no_grad) and forward+backward
(gradients for table and grid), warm-up first, then the median of repeated calls that rotate
between input copies larger than the last-level cache together.

Bytes that must move (E = element size, P = grid points N·prod(O), C = channels, T = table
elements N_in·C·prod(S), K = 2^d corners for bilinear, 1 for nearest, and the table read
R = min(T, P·C·K): a call reads no more than the whole table and no more than its corners; K = 4^d
for bicubic):

    forward          = E · (R + P·d + P·C)                       table, grid read; output written
    backward         = E · (P·C + P·d + R + T + P·d)             grad_out, grid, table read;
                                                                 grad_table, grad_grid written
    forward+backward = forward + backward

FLOPs (for the roofline; per-point coordinate arithmetic, C times rarer, left out):
forward 2·K·P·C (K multiply-adds per output value), backward 2·K·P·C·(1 + d) (the table
gradient and d grid-gradient components).

    python benchmarks/bench_grid_sample.py [--device auto|cpu|cuda] [--groups local global] [--json out.json]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch
from tqdm import tqdm

import grad_ext
import grad_ext.reference as reference
from benchmarks.timing import TimingSettings, default_timing, input_copies, measure_interleaved
from gradad.config import ModelConfig

# GRAD's shapes: C = 216 feature channels (EfficientNet-B4), 28×28 features, local grid 8×8,
# global grid 4×4 storing whole C×28×28 maps.
GRAD_CHANNELS = 216
GRAD_FEATURE_SIZE = 28
LOCAL_GRID_RES = 8
GLOBAL_GRID_RES = 4
BATCHES = (1, 16, 64)
FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
DIRECTIONS = (FORWARD, FORWARD_BACKWARD)
# Jitter of the GRAD defaults, drawn per point ('pixel': the mode where every point needs noise).
_GRAD_DEFAULTS = ModelConfig()
JITTER_STD = _GRAD_DEFAULTS.jitter_std
JITTER_PROB = _GRAD_DEFAULTS.jitter_prob
JITTER_MODE = "pixel"
SEED = 0


@dataclass(frozen=True)
class SampleCase:
    """One benchmark case. input_shape (N_in, C, S_1..S_d), grid_shape (N, O_1..O_d, d);
    batch: GRAD's B where the case is a GRAD shape (for throughput plots), else None;
    deterministic: run both sides under torch.use_deterministic_algorithms(True);
    jitter: in-kernel jitter (JITTER_STD, JITTER_PROB, JITTER_MODE) vs torch noise first;
    reference_grid_shape: the reference side samples the same points in this layout (the
    reference code's (1, B, 1, 2) global grid) and transposes its output to output_shape."""

    group: str
    label: str
    input_shape: Tuple[int, ...]
    grid_shape: Tuple[int, ...]
    dtype: str = "float32"
    mode: str = "bilinear"
    batch: Optional[int] = None
    deterministic: bool = False
    jitter: bool = False
    directions: Tuple[str, ...] = DIRECTIONS
    reference_grid_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        d = len(self.input_shape) - 2
        if not 1 <= d <= 4 or len(self.grid_shape) != d + 2 or self.grid_shape[-1] != d:
            raise ValueError(f"case {self.label!r}: input {self.input_shape} and grid {self.grid_shape} do not fit "
                             f"(input (N_in, C, S_1..S_d), grid (N, O_1..O_d, d), d in 1..4)")
        if self.input_shape[0] not in (1, self.grid_shape[0]):
            raise ValueError(f"case {self.label!r}: input batch must be 1 or the grid batch, got {self.input_shape}")
        if self.mode not in ("bilinear", "nearest", "bicubic"):
            raise ValueError(f"case {self.label!r}: mode must be 'bilinear', 'nearest' or 'bicubic', got {self.mode!r}")
        unknown = set(self.directions) - set(DIRECTIONS)
        if unknown or not self.directions:
            raise ValueError(f"case {self.label!r}: directions must be among {DIRECTIONS}, got {self.directions}")
        if self.reference_grid_shape is not None and (
                math.prod(self.reference_grid_shape) != math.prod(self.grid_shape)
                or self.reference_grid_shape[0] != 1 or self.reference_grid_shape[-1] != d):
            raise ValueError(f"case {self.label!r}: reference_grid_shape {self.reference_grid_shape} must hold the "
                             f"grid's points as (1, ..., {d})")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"case {self.label!r}: unknown dtype {self.dtype!r}")

    @property
    def dim(self) -> int:
        return len(self.input_shape) - 2

    @property
    def points(self) -> int:
        return math.prod(self.grid_shape[:-1])

    @property
    def channels(self) -> int:
        return self.input_shape[1]

    @property
    def output_shape(self) -> Tuple[int, ...]:
        return (self.grid_shape[0], self.channels, *self.grid_shape[1:-1])

    @property
    def reference_name(self) -> str:
        """What the ext kernel is compared with."""
        if self.dim in (1, 4):
            base = "reference.multilinear_sample"
        elif self.reference_grid_shape is not None:
            base = f"F.grid_sample on a {self.reference_grid_shape} grid, transposed"
        elif self.input_shape[0] == 1 and self.grid_shape[0] > 1:
            base = "F.grid_sample(table.repeat(B))"
        else:
            base = "F.grid_sample"
        return f"torch noise + {base}" if self.jitter else base


def default_cases(device: torch.device) -> List[SampleCase]:
    """The full case list for ``device`` (bfloat16 drop-in only on CUDA: the CPU kernels are
    float32/float64)."""
    c, s = GRAD_CHANNELS, GRAD_FEATURE_SIZE
    local_table = (1, c, LOCAL_GRID_RES, LOCAL_GRID_RES)
    global_table = (1, c * s * s, GLOBAL_GRID_RES, GLOBAL_GRID_RES)
    # The model's call (one point per image) against the reference code's call; then both
    # sides in the reference code's form.
    cases = [SampleCase("global", f"global B={b}", global_table, (b, 1, 1, 2), batch=b,
                        reference_grid_shape=(1, b, 1, 2)) for b in BATCHES]
    cases += [SampleCase("global (1,B,1,2)", f"global B={b} (1,B,1,2)", global_table, (1, b, 1, 2), batch=b)
              for b in BATCHES]
    cases += [SampleCase("local", f"local B={b}", local_table, (b, s, s, 2), batch=b) for b in BATCHES]
    dtypes = ("float32", "bfloat16") if device.type == "cuda" else ("float32",)
    cases += [SampleCase("drop-in 2-D", f"2-D N=16 C=64 64²→64² {dt}", (16, 64, 64, 64), (16, 64, 64, 2), dtype=dt)
              for dt in dtypes]
    cases += [
        SampleCase("drop-in 2-D bicubic", "2-D bicubic N=16 C=64 64²→64²", (16, 64, 64, 64), (16, 64, 64, 2),
                   mode="bicubic"),
        SampleCase("drop-in 3-D", "3-D N=4 C=32 32³→32³", (4, 32, 32, 32, 32), (4, 32, 32, 32, 3)),
        SampleCase("1-D", "1-D N=16 C=64 4096→4096", (16, 64, 4096), (16, 4096, 1)),
        SampleCase("4-D", "4-D N=2 C=16 8⁴→16⁴", (2, 16, 8, 8, 8, 8), (2, 16, 16, 16, 16, 4)),
        SampleCase("deterministic", "local B=64 deterministic", local_table, (64, s, s, 2), batch=64,
                   deterministic=True, directions=(FORWARD_BACKWARD,)),
    ]
    cases += [SampleCase("jitter", f"local B={b} jitter", local_table, (b, s, s, 2), batch=b, jitter=True)
              for b in (16, 64)]
    return cases


# ---- bytes and FLOPs -----------------------------------------------------------------------

def _corners(case: SampleCase) -> int:
    return {"bilinear": 2**case.dim, "bicubic": 4**case.dim, "nearest": 1}[case.mode]


def bytes_moved(case: SampleCase, direction: str) -> int:
    """Bytes that must move for one call (formula in the module docstring)."""
    elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    p, c, d = case.points, case.channels, case.dim
    table = math.prod(case.input_shape)
    corners = _corners(case)
    table_read = min(table, p * c * corners)
    forward = table_read + p * d + p * c
    backward = p * c + p * d + table_read + table + p * d
    if direction == FORWARD:
        return elem * forward
    if direction == FORWARD_BACKWARD:
        return elem * (forward + backward)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def flops(case: SampleCase, direction: str) -> int:
    """Approximate FLOPs of one call (formula in the module docstring)."""
    corners = _corners(case)
    forward = 2 * corners * case.points * case.channels
    if direction == FORWARD:
        return forward
    if direction == FORWARD_BACKWARD:
        return forward + forward * (1 + case.dim)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


# ---- the two sides -------------------------------------------------------------------------

@dataclass
class _Inputs:
    table: torch.Tensor
    grid: torch.Tensor
    grad_output: torch.Tensor


def _make_inputs(case: SampleCase, device: torch.device, copies: int, seed: int = SEED) -> List[_Inputs]:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    made = []
    for _ in range(copies):
        table = torch.randn(case.input_shape, generator=gen, device=device).to(dtype).requires_grad_(True)
        grid = (torch.rand(case.grid_shape, generator=gen, device=device) * 2 - 1).to(dtype).requires_grad_(True)
        grad_output = torch.randn(case.output_shape, generator=gen, device=device).to(dtype)
        made.append(_Inputs(table, grid, grad_output))
    return made


def _torch_jittered(grid: torch.Tensor) -> torch.Tensor:
    """The grid plus per-point noise drawn with torch ops, as a torch implementation jitters."""
    noise = torch.randn(grid.shape, device=grid.device, dtype=grid.dtype) * JITTER_STD
    keep = torch.rand(grid.shape[:-1], device=grid.device) < JITTER_PROB
    return grid + noise * keep.unsqueeze(-1).to(grid.dtype)


def ext_sampler(case: SampleCase) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """grad_ext.grid_sample with the case's settings (the batch-1 table shared, not copied)."""
    jitter = dict(jitter_std=JITTER_STD, jitter_prob=JITTER_PROB, jitter_mode=JITTER_MODE) if case.jitter else {}
    return lambda table, grid: grad_ext.grid_sample(table, grid, case.mode, "zeros", False, **jitter)


def reference_sampler(case: SampleCase) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The torch formulation the kernel replaces (see SampleCase.reference_name)."""
    def sample(table: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if case.jitter:
            grid = _torch_jittered(grid)
        if case.reference_grid_shape is not None:
            out = reference.grid_sample(table, grid.reshape(case.reference_grid_shape), case.mode, "zeros", False)
            return out.reshape(case.channels, -1).t().contiguous().reshape(case.output_shape)
        return reference.grid_sample(table, grid, case.mode, "zeros", False)
    return sample


def _step(sample: Callable, inputs: List[_Inputs], direction: str) -> Callable[[int], object]:
    def forward(i: int):
        x = inputs[i % len(inputs)]
        with torch.no_grad():
            return sample(x.table, x.grid)

    def forward_backward(i: int):
        x = inputs[i % len(inputs)]
        out = sample(x.table, x.grid)
        return torch.autograd.grad(out, (x.table, x.grid), x.grad_output)

    return forward if direction == FORWARD else forward_backward


class _Deterministic:
    """torch.use_deterministic_algorithms(flag) inside the block, the previous setting after."""

    def __init__(self, flag: bool):
        self.flag = flag

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.flag)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)


def run_case(case: SampleCase, direction: str, device: torch.device, settings: TimingSettings,
             copy_gbps: Optional[float] = None) -> Dict[str, object]:
    """Times one case in one direction on both sides, interleaved; returns a result row (times
    in ms, bandwidth in GB/s, speed-up = reference time / ext time). An error of the reference
    side (e.g. an op without a deterministic implementation) is recorded in 'reference_error'."""
    elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    per_copy = elem * (math.prod(case.input_shape) + math.prod(case.grid_shape) + math.prod(case.output_shape))
    inputs = _make_inputs(case, device, input_copies(per_copy, device))
    moved, work = bytes_moved(case, direction), flops(case, direction)
    row: Dict[str, object] = {
        "group": case.group, "label": case.label, "direction": direction, "dtype": case.dtype,
        "input_shape": list(case.input_shape), "grid_shape": list(case.grid_shape), "batch": case.batch,
        "deterministic": case.deterministic, "jitter": case.jitter, "reference": case.reference_name,
        "bytes": moved, "flops": work, "copies": len(inputs),
    }
    steps = {"ext": _step(ext_sampler(case), inputs, direction),
             "reference": _step(reference_sampler(case), inputs, direction)}
    with _Deterministic(case.deterministic):
        if case.deterministic:
            try:
                steps["reference"](0)  # an op without a deterministic implementation raises here
            except RuntimeError as exc:
                row["reference_error"] = str(exc).splitlines()[0]
                del steps["reference"]
        timings, _ = measure_interleaved(steps, device, settings)
    for side in ("ext", "reference"):
        timing = timings.get(side)
        seconds = timing.median_s if timing else None
        row[f"{side}_ms"] = seconds * 1e3 if seconds else None
        row[f"{side}_min_ms"] = timing.min_s * 1e3 if timing else None
        row[f"{side}_reps"] = timing.reps if timing else 0
        row[f"{side}_gbps"] = moved / seconds / 1e9 if seconds else None
        row[f"{side}_gflops"] = work / seconds / 1e9 if seconds else None
        row[f"{side}_copy_fraction"] = (row[f"{side}_gbps"] / copy_gbps) if seconds and copy_gbps else None
    row["speedup"] = (row["reference_ms"] / row["ext_ms"]) if row["reference_ms"] else None
    return row


def run(device: torch.device, settings: Optional[TimingSettings] = None, cases: Optional[Sequence[SampleCase]] = None,
        copy_gbps: Optional[float] = None, progress: bool = True) -> List[Dict[str, object]]:
    """Runs every (case, direction) of ``cases`` (default: :func:`default_cases`) and returns the rows."""
    settings = settings or default_timing(device)
    cases = list(default_cases(device) if cases is None else cases)
    jobs = [(case, direction) for case in cases for direction in case.directions]
    rows = []
    for case, direction in tqdm(jobs, desc="grid_sample", disable=not progress, leave=False):
        rows.append(run_case(case, direction, device, settings, copy_gbps))
    return rows


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """A plain-text table of the rows, for the terminal."""
    def num(value, spec):
        return format(value, spec) if value is not None else "—"

    lines = [f"{'case':<30}{'direction':<18}{'ext ms':>10}{'ref ms':>10}{'speed-up':>10}{'ext GB/s':>10}"
             f"{'% copy':>8}"]
    for r in rows:
        frac = r["ext_copy_fraction"]
        lines.append(f"{r['label']:<30}{r['direction']:<18}{num(r['ext_ms'], '.3f'):>10}"
                     f"{num(r['reference_ms'], '.3f'):>10}{num(r['speedup'], '.2f'):>9}x"
                     f"{num(r['ext_gbps'], '.1f'):>10}{num(frac * 100 if frac else None, '.0f'):>8}")
        if r.get("reference_error"):
            lines.append(f"    reference failed: {r['reference_error']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import json

    from benchmarks.device_info import device_name, environment, measure_copy_bandwidth, resolve_device
    from gradad.io_utils import atomic_write_text

    parser = argparse.ArgumentParser(description="grad_ext.grid_sample vs the torch reference")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    parser.add_argument("--groups", nargs="*", default=None, help="only these case groups (e.g. local global)")
    parser.add_argument("--json", default=None, help="also write the rows and environment to this JSON file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cases = default_cases(device)
    if args.groups:
        known = sorted({c.group for c in cases})
        unknown = sorted(set(args.groups) - set(known))
        if unknown:
            parser.error(f"unknown --groups {unknown}; groups: {known}")
        cases = [c for c in cases if c.group in args.groups]
    settings = default_timing(device)
    copy = measure_copy_bandwidth(device, settings)
    print(f"{device_name(device)} ({torch.get_num_threads()} threads), copy bandwidth {copy['gbps']:.1f} GB/s")
    rows = run(device, settings, cases, copy["gbps"])
    print(format_table(rows))
    if args.json:
        payload = {"environment": environment(device), "copy_bandwidth": copy, "rows": rows}
        atomic_write_text(args.json, json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
