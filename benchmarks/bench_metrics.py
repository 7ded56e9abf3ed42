"""Benchmark of gradad.metrics.compute_metrics on millions of pixels: every image and pixel
metric (AUROC, AP, F1-max, AUPRO) of a test split, timed and its peak memory measured.

Speed is measured and recorded here, never asserted in tests (tests/test_metrics.py checks
the same call's values against scikit-learn). Default case: 80 maps of 224×224 (4.0 M pixels,
float32), half of the images with a 40×30 anomalous region scored 0.2 higher — an MVTec
class's test split at the model's resolution.

    python benchmarks/bench_metrics.py [--images 80] [--side 224] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Optional

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import numpy as np
import torch

from benchmarks.timing import PeakMemory, TimingSettings, measure
from gradad import metrics
from gradad.io_utils import atomic_write_text

CPU = torch.device("cpu")
# compute_metrics takes seconds: one warm-up, a median of at least three calls.
DEFAULT_TIMING = TimingSettings(warmup=1, min_reps=3, max_reps=7, budget_s=20.0)


@dataclass(frozen=True)
class MetricsCase:
    images: int = 80
    side: int = 224
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 2 or self.side < 8:
            raise ValueError(f"MetricsCase needs images >= 2 and side >= 8, got {self}")


def make_inputs(case: MetricsCase):
    """(labels (N,), image scores (N,), masks (N, S, S) bool, maps (N, S, S) float32): every other
    image anomalous, its region a block scaled to the side (40×30 at 224)."""
    rng = np.random.default_rng(case.seed)
    maps = rng.random((case.images, case.side, case.side), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    top, left = case.side * 50 // 224, case.side * 100 // 224
    masks[::2, top:top + max(1, case.side * 40 // 224), left:left + max(1, case.side * 30 // 224)] = True
    maps[masks] += 0.2
    labels = (np.arange(case.images) % 2 == 0).astype(int)
    return labels, maps.max(axis=(1, 2)), masks, maps


def run(case: MetricsCase = MetricsCase(), timing: TimingSettings = DEFAULT_TIMING) -> Dict[str, object]:
    """Times compute_metrics on ``case`` and measures its peak memory (first call, separately).
    Returns the results section: case, timing, pixels, throughput and memory."""
    labels, scores, masks, maps = make_inputs(case)
    with PeakMemory(CPU) as memory:
        metrics.compute_metrics(labels, scores, masks, maps)
    result = measure(lambda _: metrics.compute_metrics(labels, scores, masks, maps), CPU, timing)
    pixels = int(maps.size)
    return {"status": "ok", "case": asdict(case), "timing": asdict(timing), "pixels": pixels,
            "ms": 1e3 * result.median_s, "min_ms": 1e3 * result.min_s, "max_ms": 1e3 * result.max_s,
            "reps": result.reps, "mpixels_per_s": pixels / result.median_s / 1e6,
            "input_mb": (maps.nbytes + masks.nbytes) / 2**20, "peak_increase_mb": memory.increase_bytes / 2**20,
            "memory_method": memory.method}


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=MetricsCase.images)
    parser.add_argument("--side", type=int, default=MetricsCase.side)
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run(MetricsCase(args.images, args.side))
    print(f"compute_metrics on {result['pixels'] / 1e6:.1f} M pixels: {result['ms']:.0f} ms median "
          f"(min {result['min_ms']:.0f}, {result['reps']} calls), {result['mpixels_per_s']:.1f} M pixels/s, "
          f"peak +{result['peak_increase_mb']:.0f} MiB over {result['input_mb']:.0f} MiB of inputs")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
