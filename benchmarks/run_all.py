"""Runs the whole benchmark suite on one device and writes its results.

    python benchmarks/run_all.py --out benchmarks/results [--device auto|cpu|cuda]
        [--only grid_sample refine detector metrics]

Results go to ``<out>/<device-slug>/`` (``cpu-<model>`` or the GPU's name): results.json
(environment, measured roofs, every figure), results.md (tables) and PNG plots (see
:mod:`benchmarks.reporting`). Parts: grid_sample kernels (bench_grid_sample), the whole
detector (bench_detector), the refinement op (bench_refine) and the evaluation metrics on
millions of pixels (bench_metrics, on the CPU whatever the device: they are numpy code).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch

from benchmarks import bench_detector, bench_grid_sample, bench_metrics, bench_refine
from benchmarks.device_info import (
    device_name,
    device_slug,
    environment,
    load_average,
    measure_copy_bandwidth,
    measure_matmul_throughput,
    resolve_device,
)
from benchmarks.reporting import RESULTS_JSON, write_results
from benchmarks.timing import TimingSettings, default_timing

PARTS = ("grid_sample", "refine", "detector", "metrics")  # in the order they run: the kernels first
DEFAULT_OUT = os.path.join("benchmarks", "results")
# Repetitions of bench_refine (which takes fixed counts, not a time budget).
REFINE_REPEATS = {"cpu": (2, 10), "cuda": (10, 100)}  # (warm-up, repeats)


def refine_config(device: torch.device) -> "bench_refine.BenchConfig":
    """bench_refine's configuration for ``device``: its GRAD batch shape, fewer repeats on CPU."""
    warmup, repeats = REFINE_REPEATS[device.type]
    return bench_refine.BenchConfig(device=str(device), warmup=warmup, repeats=repeats)


def run_refine(config: "bench_refine.BenchConfig", copy_gbps: Optional[float] = None) -> Dict[str, object]:
    """The refine benchmark (benchmarks/bench_refine.py), as a results section."""
    rows = bench_refine.run(config, copy_gbps)
    return {"status": "ok", "config": dataclasses.asdict(config), "rows": rows}


def run_suite(out_root: str, device: torch.device, parts: Sequence[str] = PARTS,
              grid_cases: Optional[Sequence[bench_grid_sample.SampleCase]] = None,
              detector_specs: Optional[Sequence[bench_detector.DetectorSpec]] = None,
              refine: Optional["bench_refine.BenchConfig"] = None,
              metrics: Optional["bench_metrics.MetricsCase"] = None,
              kernel_timing: Optional[TimingSettings] = None, model_timing: Optional[TimingSettings] = None,
              roof_sizes: Tuple[Optional[int], Optional[int]] = (None, None),
              progress: bool = True, merge: bool = False) -> Tuple[str, Dict[str, object]]:
    """Runs ``parts`` on ``device`` and writes the results to ``out_root/<device-slug>/``: the
    JSON and tables after each part (so a run stopped part-way keeps what it finished), the
    plots at the end.

    grid_cases / detector_specs / refine / metrics: what to run (defaults: the full suite);
    kernel_timing / model_timing: repetition settings (defaults: timing.default_timing; the
    metrics part uses model_timing when given, else bench_metrics.DEFAULT_TIMING);
    roof_sizes: (copy-probe bytes, matmul side) for the roofs (defaults in device_info);
    merge: keep the parts of an earlier results.json in the folder that this run does not redo.
    Returns (folder, results)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty selection of {PARTS}, got {list(parts)}")
    kernel_timing = kernel_timing or default_timing(device)
    model_timing_given = model_timing is not None
    model_timing = model_timing or default_timing(device, model=True)
    started = time.perf_counter()
    copy_bytes, matmul_side = roof_sizes
    results: Dict[str, object] = {
        "environment": environment(device),
        "roofs": {"copy_bandwidth": measure_copy_bandwidth(device, kernel_timing, copy_bytes),
                  "matmul": measure_matmul_throughput(device, kernel_timing, matmul_side)},
        "timing": {"kernels": dataclasses.asdict(kernel_timing), "models": dataclasses.asdict(model_timing)},
        "notes": [],
    }
    notes = results["notes"]
    copy_gbps = results["roofs"]["copy_bandwidth"]["gbps"]
    part_times = results["part_wall_time_s"] = {}
    folder = os.path.join(out_root, device_slug(device))
    earlier_path = os.path.join(folder, RESULTS_JSON)
    if merge and os.path.exists(earlier_path):
        with open(earlier_path) as f:
            earlier = json.load(f)
        for part in PARTS:
            if part not in parts and part in earlier:
                results[part] = earlier[part]
                part_times[part] = earlier.get("part_wall_time_s", {}).get(part)
        notes.extend(n for n in earlier.get("notes", []) if n not in notes)

    def checkpoint() -> None:
        results["wall_time_s"] = time.perf_counter() - started
        write_results(results, folder, plots=False)
    if "grid_sample" in parts:
        begin = time.perf_counter()
        results["grid_sample"] = bench_grid_sample.run(device, kernel_timing, grid_cases, copy_gbps, progress)
        part_times["grid_sample"] = time.perf_counter() - begin
        if device.type == "cpu":
            notes.append("grid_sample bfloat16 drop-in case: CUDA only (on the CPU, bfloat16 runs the float32 "
                         "kernels on float32 copies).")
        checkpoint()
    if "refine" in parts:
        begin = time.perf_counter()
        results["refine"] = run_refine(refine or refine_config(device), copy_gbps)
        part_times["refine"] = time.perf_counter() - begin
        checkpoint()
    if "detector" in parts:
        begin = time.perf_counter()
        detector_specs = bench_detector.DEFAULT_SPECS if detector_specs is None else detector_specs
        results["detector"] = bench_detector.run(device, model_timing, detector_specs, progress)
        part_times["detector"] = time.perf_counter() - begin
        notes.extend(results["detector"]["notes"])
        notes.extend(f"{spec.preset}: backbone weights '{spec.backbone_weights}'"
                     + (" — random weights, the timings are valid but the detector's outputs are meaningless"
                        if spec.backbone_weights == "random" else "") for spec in detector_specs)
    if "metrics" in parts:
        begin = time.perf_counter()
        results["metrics"] = bench_metrics.run(metrics or bench_metrics.MetricsCase(),
                                               model_timing if model_timing_given else bench_metrics.DEFAULT_TIMING)
        part_times["metrics"] = time.perf_counter() - begin
        checkpoint()
    results["wall_time_s"] = time.perf_counter() - started
    results["load_average_end"] = load_average()
    write_results(results, folder)
    return folder, results


def summary(results: Dict[str, object]) -> str:
    """The key speed-ups, one per line, for the terminal."""
    lines = []
    for r in results.get("grid_sample", []):
        speedup = f"{r['speedup']:6.2f}×" if r["speedup"] is not None else "   n/a"
        lines.append(f"grid_sample {r['label']:<28} {r['direction']:<17} {speedup}")
    for r in (results.get("detector") or {}).get("speedups", []):
        lines.append(f"detector {r['spec'][:30]:<31} {r['phase']:<22} B={r['batch']:<3} {r['speedup']:6.2f}×")
    refine = results.get("refine") or {}
    for r in refine.get("rows", []):
        lines.append(f"refine {r['case']:<30} {r['speedup']:6.2f}×")
    scored = results.get("metrics") or {}
    if scored.get("status") == "ok":
        lines.append(f"metrics on {scored['pixels'] / 1e6:.1f} M pixels {scored['ms']:8.0f} ms")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Run every grad_ext benchmark on one device")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results root folder (default: {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    parser.add_argument("--only", nargs="*", choices=PARTS, default=None, help="run only these parts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default if unset)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the parts of an earlier results.json in the output folder that this run skips")
    parser.add_argument("--detector-weights", choices=("as-specified", "random"), default="as-specified",
                        help="'random': build every detector with random backbone weights (timing only: for "
                        "machines without the offline ImageNet weights); the spec titles say so")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"benchmarking on {device_name(device)} ({device}, {torch.get_num_threads()} threads)")
    specs = None
    if args.detector_weights == "random" and "detector" in (args.only or PARTS):
        specs = bench_detector.DEFAULT_SPECS
        specs = [s if s.backbone_weights == "random" else
                 dataclasses.replace(s, title=f"{s.title.split(' (')[0]} (RANDOM backbone weights: timing only)",
                                     backbone_weights="random") for s in specs]
    folder, results = run_suite(args.out, device, parts=args.only or PARTS, detector_specs=specs, merge=args.merge)
    print(summary(results))
    print(f"results written to {folder} in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
