"""Runs the whole benchmark suite on one device and writes its results.

    python benchmarks/run_all.py --out benchmarks/results [--device auto|cpu|cuda]
        [--only grid_sample refine detector metrics] [--allocators glibc glibc-tuned jemalloc tcmalloc]

Results go to ``<out>/<device-slug>/`` (``cpu-<model>`` or the GPU's name): results.json
(environment, measured roofs, every figure), results.md (tables) and PNG plots (see
:mod:`benchmarks.reporting`). Parts: grid_sample kernels (bench_grid_sample), the whole
detector (bench_detector), the refinement op (bench_refine) and the evaluation metrics on
millions of pixels (bench_metrics, on the CPU whatever the device: they are numpy code).

On the CPU, the kernel and detector parts run once per memory allocator setting (``--allocators``,
default glibc as it comes and glibc tuned to reuse its heap; see benchmarks/allocators.py), each
in a child process started under it, and the tables put the speed-ups side by side: grad_ext
and its reference always run in the same process, so both sides of every figure share one
allocator. ``--in-process`` runs once under this process's own allocator.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch

from benchmarks import bench_detector, bench_grid_sample, bench_metrics, bench_refine
from benchmarks.allocators import DEFAULT_SETTINGS, allocator_env, check_settings
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


def keep_earlier_parts(results: Dict[str, object], folder: str, parts: Sequence[str]) -> None:
    """Copies into ``results`` the parts of ``folder``'s earlier results.json that ``parts`` does
    not redo (with their wall times and notes); nothing when there is no earlier file."""
    earlier_path = os.path.join(folder, RESULTS_JSON)
    if not os.path.exists(earlier_path):
        return
    with open(earlier_path) as f:
        earlier = json.load(f)
    for part in PARTS:
        if part not in parts and part in earlier:
            results[part] = earlier[part]
            results["part_wall_time_s"][part] = earlier.get("part_wall_time_s", {}).get(part)
    results["notes"].extend(n for n in earlier.get("notes", []) if n not in results["notes"])


def run_suite(out_root: str, device: torch.device, parts: Sequence[str] = PARTS,
              grid_cases: Optional[Sequence[bench_grid_sample.SampleCase]] = None,
              detector_specs: Optional[Sequence[bench_detector.DetectorSpec]] = None,
              refine: Optional["bench_refine.BenchConfig"] = None,
              metrics: Optional["bench_metrics.MetricsCase"] = None,
              kernel_timing: Optional[TimingSettings] = None, model_timing: Optional[TimingSettings] = None,
              roof_sizes: Tuple[Optional[int], Optional[int]] = (None, None),
              progress: bool = True, merge: bool = False, plots: bool = True) -> Tuple[str, Dict[str, object]]:
    """Runs ``parts`` on ``device`` and writes the results to ``out_root/<device-slug>/``: the
    JSON and tables after each part (so a run stopped part-way keeps what it finished), the
    plots at the end.

    grid_cases / detector_specs / refine / metrics: what to run (defaults: the full suite);
    kernel_timing / model_timing: repetition settings (defaults: timing.default_timing; the
    metrics part uses model_timing when given, else bench_metrics.DEFAULT_TIMING);
    roof_sizes: (copy-probe bytes, matmul side) for the roofs (defaults in device_info);
    merge: keep the parts of an earlier results.json in the folder that this run does not redo;
    plots: draw the PNG plots at the end. Runs under this process's allocator (recorded in the
    environment; see run_under_allocators for several). Returns (folder, results)."""
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
    if merge:
        keep_earlier_parts(results, folder, parts)

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
    write_results(results, folder, plots=plots)
    return folder, results


# Each part's rows, and what identifies a row across runs of the same cases.
_ROW_KEYS = {
    "grid_sample": (lambda results: results.get("grid_sample") or [], lambda r: (r["label"], r["direction"])),
    "refine": (lambda results: (results.get("refine") or {}).get("rows") or [], lambda r: r["case"]),
    "detector": (lambda results: (results.get("detector") or {}).get("speedups") or [],
                 lambda r: (r["spec"], r["phase"], r["batch"], r["precision"], r["compiled"])),
}
ALLOCATOR_PARTS = ("grid_sample", "refine", "detector")  # the metrics part is numpy code: run once


def merge_allocator_runs(runs: Sequence[Tuple[str, Dict[str, object]]]) -> Dict[str, object]:
    """One results mapping from runs of the same cases under several allocator settings
    ``[(setting name, results), ...]``: the first run's figures, every later run's speed-up and
    times beside each row as ``row["by_allocator"][name]``, the settings in order as
    ``results["allocators"]``, wall times summed and notes joined."""
    if not runs:
        raise ValueError("merge_allocator_runs needs at least one run")
    merged = copy.deepcopy(runs[0][1])
    merged["allocators"] = [{**r["environment"]["allocator"], "name": name} for name, r in runs]
    for name, other in runs[1:]:
        for rows_of, key in _ROW_KEYS.values():
            theirs = {key(r): r for r in rows_of(other)}
            for row in rows_of(merged):
                match = theirs.get(key(row))
                if match is not None:
                    row.setdefault("by_allocator", {})[name] = {
                        k: match[k] for k in ("speedup", "ext_ms", "reference_ms", "ext_min_ms", "reference_min_ms")}
        for part, seconds in (other.get("part_wall_time_s") or {}).items():
            times = merged.setdefault("part_wall_time_s", {})
            times[part] = (times.get(part) or 0) + (seconds or 0)
        merged["wall_time_s"] = merged.get("wall_time_s", 0) + other.get("wall_time_s", 0)
        merged["notes"] += [n for n in other.get("notes", []) if n not in merged["notes"]]
        merged["load_average_end"] = other.get("load_average_end")
    return merged


def run_under_allocators(out_root: str, allocators: Sequence[str], parts: Sequence[str], child_args: Sequence[str],
                         merge: bool = False) -> Tuple[str, Dict[str, object]]:
    """Runs ``parts`` on the CPU once per allocator setting, each in a child process started
    under that setting (``run_all.py --in-process`` with ``child_args``), and writes the merged
    results (:func:`merge_allocator_runs`) to ``out_root/<cpu slug>/``. The metrics part runs
    only under the first setting. Returns (folder, results)."""
    check_settings(allocators)
    runs = []
    with tempfile.TemporaryDirectory(prefix="run_all-") as scratch:
        for index, name in enumerate(allocators):
            child_parts = [p for p in parts if index == 0 or p in ALLOCATOR_PARTS]
            if not child_parts:
                continue
            out = os.path.join(scratch, name)
            print(f"== allocator {name}: {' '.join(child_parts)}", flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--in-process", "--no-plots", "--device", "cpu",
                       "--out", out, "--only", *child_parts, *child_args]
            done = subprocess.run(command, env=allocator_env(name))
            if done.returncode != 0:
                raise RuntimeError(f"the benchmarks under allocator {name!r} failed (exit {done.returncode})")
            (slug,) = os.listdir(out)
            with open(os.path.join(out, slug, RESULTS_JSON), encoding="utf-8") as handle:
                runs.append((name, json.load(handle)))
    results = merge_allocator_runs(runs)
    folder = os.path.join(out_root, slug)
    if merge:
        keep_earlier_parts(results, folder, parts)
    write_results(results, folder)
    return folder, results


def summary(results: Dict[str, object]) -> str:
    """The key speed-ups, one per line, for the terminal."""
    lines = []
    others = [a["name"] for a in (results.get("allocators") or [])[1:]]
    if others:
        lines.append(f"speed-ups under: {', '.join(a['name'] for a in results['allocators'])}")

    def speedups(row: Dict[str, object]) -> str:
        values = [row["speedup"]] + [(row.get("by_allocator") or {}).get(n, {}).get("speedup") for n in others]
        return "  ".join(f"{v:6.2f}×" if v is not None else "   n/a" for v in values)
    for r in results.get("grid_sample", []):
        lines.append(f"grid_sample {r['label']:<28} {r['direction']:<17} {speedups(r)}")
    for r in (results.get("detector") or {}).get("speedups", []):
        lines.append(f"detector {r['spec'][:30]:<31} {r['phase']:<22} B={r['batch']:<3} {speedups(r)}")
    refine = results.get("refine") or {}
    for r in refine.get("rows", []):
        lines.append(f"refine {r['case']:<30} {speedups(r)}")
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
    parser.add_argument("--allocators", nargs="+", default=None, metavar="SETTING",
                        help="CPU: run the kernel and detector parts once per memory allocator setting, each in a "
                        "child process, and put the speed-ups side by side (settings in benchmarks/allocators.py; "
                        f"default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process, under the allocator it was started with")
    parser.add_argument("--no-plots", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    parts = args.only or PARTS
    if device.type != "cpu" and args.allocators:
        parser.error("--allocators is for CPU runs (the GPU kernels' memory comes from PyTorch's CUDA allocator)")
    if device.type == "cpu" and not args.in_process:
        allocators = args.allocators or DEFAULT_SETTINGS
        try:
            check_settings(allocators)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"--allocators: {err}")
        child_args = ["--threads", str(torch.get_num_threads()), "--detector-weights", args.detector_weights]
        print(f"benchmarking on {device_name(device)} ({torch.get_num_threads()} threads) under the allocator "
              f"settings {', '.join(allocators)}")
        folder, results = run_under_allocators(args.out, allocators, parts, child_args, merge=args.merge)
        print(summary(results))
        print(f"results written to {folder} in {results['wall_time_s']:.0f} s")
        return
    print(f"benchmarking on {device_name(device)} ({device}, {torch.get_num_threads()} threads)")
    specs = None
    if args.detector_weights == "random" and "detector" in parts:
        specs = bench_detector.DEFAULT_SPECS
        specs = [s if s.backbone_weights == "random" else
                 dataclasses.replace(s, title=f"{s.title.split(' (')[0]} (RANDOM backbone weights: timing only)",
                                     backbone_weights="random") for s in specs]
    folder, results = run_suite(args.out, device, parts=parts, detector_specs=specs, merge=args.merge,
                                plots=not args.no_plots)
    print(summary(results))
    print(f"results written to {folder} in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
