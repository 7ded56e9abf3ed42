"""Benchmark of grad_ext.refine against the pure-torch formulation (grad_ext.reference.refine).

Cases, on a GRAD batch (default B=64, C=216, 28x28):
  train: the loss, forward + backward with respect to the reconstruction;
  infer: sim and the anomaly map under torch.no_grad().
Both sides are timed interleaved (benchmarks/timing.py: CUDA events on the GPU), median after
warm-up. Bytes that must move, n = B*C*H*W elements and m = B*H*W pixels:
  train: forward reads rec and feat (2n), backward reads them again and writes grad rec (3n);
  infer: reads rec and feat (2n), writes sim and the map (2m).
Prints a table of times, speed-up and achieved bandwidth; writes JSON with --out.

    python benchmarks/bench_refine.py [--device cuda] [--dtype float32] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch

import grad_ext
from benchmarks.timing import TimingSettings, measure_interleaved
from grad_ext import reference
from grad_ext.refine import COS_WEIGHT, MSE_THRESHOLD, MSE_WEIGHT
from gradad.io_utils import atomic_write_text


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 64
    channels: int = 216
    height: int = 28
    width: int = 28
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 3
    repeats: int = 15
    seed: int = 0


def kernel_train(rec, feat):
    return grad_ext.refine(rec, feat).loss


def torch_train(rec, feat):
    return reference.refine(rec, feat, MSE_WEIGHT, COS_WEIGHT, MSE_THRESHOLD)[2]


def kernel_infer(rec, feat):
    out = grad_ext.refine(rec, feat)
    return out.sim, out.anomaly_map


def torch_infer(rec, feat):
    sim, anomaly_map, _, _ = reference.refine(rec, feat, MSE_WEIGHT, COS_WEIGHT, MSE_THRESHOLD)
    return sim, anomaly_map


# Per case: (label, direction, grad_ext step, reference step, elements moved per (n, m)).
CASES = (("train: loss fwd+bwd", "forward+backward", kernel_train, torch_train, (5, 0)),
         ("infer: sim+map fwd", "forward", kernel_infer, torch_infer, (2, 2)))
# Channel reductions per pixel and channel: 4 (rec*feat, rec^2, feat^2, (rec-feat)^2), about
# 2 FLOPs each, and as many again in the backward pass.
FLOPS_PER_ELEMENT = {"forward": 8, "forward+backward": 16}


def run(cfg: BenchConfig, copy_gbps: Optional[float] = None) -> list[dict]:
    """One row per case: times in ms for both sides, speed-up = reference / grad_ext, bytes
    that must move, achieved GB/s and (with ``copy_gbps``) its fraction of the copy bandwidth."""
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.channels, cfg.height, cfg.width)
    feat = torch.randn(shape, generator=gen).to(device, dtype)
    rec = (feat.float().cpu() + 2 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_(True)
    n, m = feat.numel(), cfg.batch * cfg.height * cfg.width
    elem = feat.element_size()
    settings = TimingSettings(warmup=cfg.warmup, min_reps=cfg.repeats, max_reps=cfg.repeats, budget_s=0.0)

    def train_step(fn):
        def step(_):
            rec.grad = None
            fn(rec, feat).backward()
        return step

    def infer_step(fn):
        def step(_):
            with torch.no_grad():
                fn(rec, feat)
        return step

    rows = []
    for label, direction, kernel, baseline, (per_n, per_m) in CASES:
        wrap = train_step if direction == "forward+backward" else infer_step
        timings, _ = measure_interleaved({"ext": wrap(kernel), "reference": wrap(baseline)}, device, settings)
        moved, work = elem * (per_n * n + per_m * m), FLOPS_PER_ELEMENT[direction] * n
        row = {"case": label, "label": f"refine {label.split(':')[0]}", "direction": direction,
               "bytes": moved, "flops": work}
        for side in ("ext", "reference"):
            seconds = timings[side].median_s
            row[f"{side}_ms"] = 1e3 * seconds
            row[f"{side}_min_ms"] = 1e3 * timings[side].min_s
            row[f"{side}_gbps"] = moved / seconds / 1e9
            row[f"{side}_gflops"] = work / seconds / 1e9
            row[f"{side}_copy_fraction"] = row[f"{side}_gbps"] / copy_gbps if copy_gbps else None
        row["speedup"] = row["reference_ms"] / row["ext_ms"]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default if unset)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(**{k: getattr(args, k) for k in asdict(defaults)})

    rows = run(cfg)
    shape = f"{cfg.batch}x{cfg.channels}x{cfg.height}x{cfg.width}"
    print(f"refine on {cfg.device} ({torch.get_num_threads()} CPU threads), {cfg.dtype}, {shape}, "
          f"median of {cfg.repeats} after {cfg.warmup} warm-up")
    print(f"{'case':<22}{'grad_ext ms':>13}{'torch ms':>11}{'speed-up':>10}{'ext GB/s':>10}")
    for r in rows:
        print(f"{r['case']:<22}{r['ext_ms']:>13.2f}{r['reference_ms']:>11.2f}{r['speedup']:>9.2f}x"
              f"{r['ext_gbps']:>10.1f}")
    if args.out:
        device_name = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else "cpu"
        payload = {"config": asdict(cfg), "threads": torch.get_num_threads(), "device": device_name,
                   "torch": torch.__version__, "grad_ext": grad_ext.__version__, "results": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
