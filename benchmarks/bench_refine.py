"""Benchmark of grad_ext.refine against the pure-torch formulation (grad_ext.reference.refine).

Cases, on a GRAD batch (default B=64, C=216, 28x28):
  train: the loss, forward + backward with respect to the reconstruction;
  infer: sim and the anomaly map under torch.no_grad().
Prints a table of median times (after warm-up) and the speed-up; writes JSON with --out.

    python benchmarks/bench_refine.py [--device cuda] [--dtype float32] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import grad_ext
from grad_ext import reference
from grad_ext.refine import COS_WEIGHT, MSE_THRESHOLD, MSE_WEIGHT


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of step() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(cfg: BenchConfig) -> list[dict]:
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.channels, cfg.height, cfg.width)
    feat = torch.randn(shape, generator=gen).to(device, dtype)
    rec = (feat.float().cpu() + 2 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_(True)

    def train_step(fn):
        def step():
            rec.grad = None
            fn(rec, feat).backward()
        return step

    def infer_step(fn):
        def step():
            with torch.no_grad():
                fn(rec, feat)
        return step

    rows = []
    for case, kernel, baseline, wrap in (("train: loss fwd+bwd", kernel_train, torch_train, train_step),
                                         ("infer: sim+map fwd", kernel_infer, torch_infer, infer_step)):
        t_kernel = median_seconds(wrap(kernel), device, cfg.warmup, cfg.repeats)
        t_torch = median_seconds(wrap(baseline), device, cfg.warmup, cfg.repeats)
        rows.append({"case": case, "grad_ext_ms": 1e3 * t_kernel, "torch_ms": 1e3 * t_torch,
                     "speedup": t_torch / t_kernel})
    return rows


def write_json_atomic(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench_refine.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    print(f"{'case':<22}{'grad_ext ms':>13}{'torch ms':>11}{'speed-up':>10}")
    for r in rows:
        print(f"{r['case']:<22}{r['grad_ext_ms']:>13.2f}{r['torch_ms']:>11.2f}{r['speedup']:>9.2f}x")
    if args.out:
        device_name = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else "cpu"
        write_json_atomic(args.out, {"config": asdict(cfg), "threads": torch.get_num_threads(), "device": device_name,
                                     "torch": torch.__version__, "grad_ext": grad_ext.__version__, "results": rows})


if __name__ == "__main__":
    main()
