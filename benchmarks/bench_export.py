"""Images per second of the exported detector (gradad.export.DetectorGraph: resize, normalisation,
backbone, GRAD, strict post-processing, all in one graph) on this CPU, in torch eager (the
grad_ext kernels), onnxruntime (the ONNX file gradad export writes) and OpenVINO (its IR, with
the resize as matrix products), at batch 1 and 32, for the Lite demo (preset lite-demo) and the
paper's configuration (preset grad, EfficientNet-B4). Random backbone weights: only the timing
matters. Input: images at the model's own size (so the resize is the identity's cost). Runtimes timed
in one process take turns call by call (onnxruntime's idle threads do not spin); on a 2-core VM
torch eager still slows by 5-80x beside a loaded OpenVINO/onnxruntime, so the committed figures
time each runtime alone in its own process::

    for r in eager onnxruntime openvino; do python benchmarks/bench_export.py --runtimes $r; done

    python benchmarks/bench_export.py [--specs lite-demo grad] [--out benchmarks/results]

Precisions (``gradad export --precision``) need a trained detector, for its calibration images and
its accuracy check: ``--checkpoint runs/demo`` (the Lite demo, ``gradad demo``) exports it in fp32,
fp16 and int8 to ONNX and OpenVINO and times each file as gradad.deploy.Scorer runs it, with 1 and 2
streams (the batch in one run on every thread, or split in parts scored at once, each on its share
of the threads), spec 'lite-demo-trained'; the AUROC columns are the export's own measurement on
the demo's test split::

    for r in onnxruntime openvino; do python benchmarks/bench_export.py --checkpoint runs/demo --runtimes $r; done

Writes ``<out>/<cpu slug>/export.json`` and ``export.md`` (rows of specs and runtimes not run are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

import grad_ext.onnx
from benchmarks.bench_detector import DetectorSpec, build_detector
from benchmarks.device_info import device_slug, environment
from benchmarks.reporting import markdown_table, write_report
from gradad.deploy import PRECISIONS, Scorer
from gradad.export import DetectorGraph, dynamic_shapes, export_detector
from gradad.quantize import PrecisionConfig

SPECS = {"lite-demo": DetectorSpec("Lite demo (random weights)", "lite-demo", "random"),
         "grad": DetectorSpec("GRAD, EfficientNet-B4 (random weights)", "grad", "random")}
BATCHES = (1, 32)
# the paper's B4 model takes about a second per image on a small CPU: batch 32 is cut to this
CPU_MAX_BATCH = {"grad": 4}
WARMUP, MIN_REPEATS, BUDGET_S = 2, 5, 6.0
# the Scorer's streams the trained detector's files are timed with (a batch smaller than the
# streams is not timed with them)
STREAMS = (1, 2)


def _time_interleaved(steps: Dict[str, object], batch: int, budget_s: float = BUDGET_S) -> Dict[str, Dict[str, float]]:
    """Times the steps round-robin (one call of each in turn, so a busy spell of the shared
    machine slows all of them), at least MIN_REPEATS rounds and about ``budget_s`` seconds."""
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    while min(map(len, times.values())) < MIN_REPEATS or time.perf_counter() - started < budget_s:
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "repeats": len(t),
                   "images_per_s": batch / statistics.median(t)} for name, t in times.items()}


RUNTIMES = {"eager": "torch eager (ext kernels)", "onnxruntime": "onnxruntime", "openvino": "openvino"}
TRAINED_SPEC = "lite-demo-trained"
RUNTIME_FORMATS = {"onnxruntime": "onnx", "openvino": "openvino"}


def _ort_session(path: str, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # idle threads must not spin: the runtimes take turns on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ov_request(path: str, threads: int):
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": threads})
    return compiled.create_infer_request()


def run_precisions(checkpoint: str, threads: int, folder: str, runtimes: Sequence[str],
                   precisions: Sequence[str], budget_s: float = BUDGET_S) -> List[Dict[str, object]]:
    """Rows of the trained detector exported by ``gradad export --precision`` in each precision, per
    runtime (onnxruntime: the .onnx, openvino: the IR), timed through gradad.deploy.Scorer with each
    of STREAMS, all of a runtime's files in turn on the same images, with the export's measured
    accuracy (image AUROC, largest score change)."""
    rows = []
    for runtime in [r for r in RUNTIMES if r in runtimes and r in RUNTIME_FORMATS]:
        scorers, accuracy, side = {}, {}, None
        for precision in precisions:
            out = os.path.join(folder, f"{runtime}-{precision}")
            result = export_detector(checkpoint, RUNTIME_FORMATS[runtime], out, precision=PrecisionConfig(precision))
            side = result.metadata["input"]["height"]
            accuracy[precision] = result.metadata.get("quantization", {}).get("accuracy")
            for streams in STREAMS:
                scorers[precision, streams] = Scorer(result.model_path, backend=runtime, threads=threads,
                                                     streams=streams)
        for batch in BATCHES:
            images = (np.random.default_rng(0).random((batch, 3, side, side)) * 255).astype(np.float32)
            steps = {key: (lambda scorer=scorer: scorer.run(images)) for key, scorer in scorers.items()
                     if key[1] <= batch}
            for (precision, streams), timing in _time_interleaved(steps, batch, budget_s).items():
                measured = accuracy[precision] or {}
                rows.append({"spec": TRAINED_SPEC, "runtime": RUNTIMES[runtime], "precision": precision,
                             "streams": streams, "batch": batch, "requested_batch": batch, "input_size": side,
                             **timing, "auroc_fp32": measured.get("auroc_fp32"), "auroc": measured.get("auroc"),
                             "max_score_change": measured.get("max_score_change")})
                print(f"{TRAINED_SPEC} {runtime} {precision} streams {streams} batch {batch}: "
                      f"{timing['images_per_s']:.1f} images/s", flush=True)
    return rows


def run_spec(name: str, threads: int, folder: str,
             runtimes: Sequence[str] = tuple(RUNTIMES)) -> List[Dict[str, object]]:
    """Rows {spec, runtime, batch, requested_batch, median_ms, min_ms, images_per_s, repeats}
    of ``runtimes`` (keys of :data:`RUNTIMES`)."""
    spec = SPECS[name]
    backbone, model, cfg = build_detector(spec, "ext", torch.device("cpu"))
    side = cfg.model.input_size
    graphs = {"native": DetectorGraph(backbone, model.eval(), side, "native").eval(),
              "matmul": DetectorGraph(backbone, model.eval(), side, "matmul").eval()}
    example = torch.rand(2, 3, side + 8, side + 12) * 255
    onnx_path = os.path.join(folder, f"{name}.onnx")
    ov_onnx = os.path.join(folder, f"{name}-matmul.onnx")
    with torch.no_grad():
        for graph, path, runtime in ((graphs["native"], onnx_path, "onnxruntime"),
                                     (graphs["matmul"], ov_onnx, "openvino")):
            if runtime not in runtimes:
                continue
            grad_ext.onnx.export(graph, (example,), path, dynamic_shapes=dynamic_shapes(),
                                 input_names=["image"], output_names=["anomaly_map", "score"])
    if "onnxruntime" in runtimes:
        session = _ort_session(onnx_path, threads)
    if "openvino" in runtimes:
        request = _ov_request(ov_onnx, threads)

    def eager(images):
        with torch.no_grad():
            return graphs["native"](torch.from_numpy(images))

    rows = []
    for requested in BATCHES:
        batch = min(requested, CPU_MAX_BATCH.get(name, requested))
        images = (np.random.default_rng(0).random((batch, 3, side, side)) * 255).astype(np.float32)
        steps = {"eager": lambda images=images: eager(images),
                 "onnxruntime": lambda images=images: session.run(None, {"image": images}),
                 "openvino": lambda images=images: request.infer({"image": images})}
        steps = {RUNTIMES[key]: step for key, step in steps.items() if key in runtimes}
        for runtime, timing in _time_interleaved(steps, batch).items():
            rows.append({"spec": name, "runtime": runtime, "batch": batch, "requested_batch": requested,
                         "input_size": side, **timing})
            print(f"{name} {runtime} batch {batch}: {timing['images_per_s']:.1f} images/s", flush=True)
    return rows


def _fp32_onnxruntime_best(rows: List[Dict[str, object]]) -> Dict[int, float]:
    """Per batch, the fastest fp32 onnxruntime images/s over the streams timed: the baseline."""
    best: Dict[int, float] = {}
    for r in rows:
        if r["runtime"] == RUNTIMES["onnxruntime"] and r["precision"] == "fp32":
            best[r["batch"]] = max(best.get(r["batch"], 0.0), r["images_per_s"])
    return best


def precision_table(rows: List[Dict[str, object]]) -> str:
    """The trained detector's rows: images/s per runtime, precision and streams, the speed-up over
    the fastest fp32 onnxruntime row at the same batch, and the accuracy the export measured."""
    base = _fp32_onnxruntime_best(rows)
    auroc_fp32 = next((r["auroc_fp32"] for r in rows if r.get("auroc_fp32") is not None), None)

    def auroc(r):
        if r["precision"] == "fp32":
            return "n/a" if auroc_fp32 is None else f"{auroc_fp32:.4f}"
        return f"{r['auroc']:.4f} ({r['auroc'] - r['auroc_fp32']:+.4f})"
    table = [[r["runtime"], r["precision"], str(r.get("streams", 1)), str(r["batch"]), f"{r['median_ms']:.1f}",
              f"{r['images_per_s']:.1f}",
              f"{r['images_per_s'] / base[r['batch']]:.2f}×" if r["batch"] in base else "n/a", auroc(r),
              "0 (reference)" if r["precision"] == "fp32" else f"{r['max_score_change']:.3g}"] for r in rows]
    return markdown_table(["runtime", "precision", "streams", "batch", "median ms", "images/s",
                           "vs fastest fp32 onnxruntime", "image AUROC (change)", "largest score change"], table)


# the quantized export's targets: int8 images/s at batch 32 against fp32 onnxruntime's, and the
# image AUROC it may lose (gradad export's own default limit)
TARGET_BATCH, TARGET_SPEEDUP = 32, 2.0
TARGET_AUROC_DROP = PrecisionConfig().max_auroc_drop


def target_table(rows: List[Dict[str, object]]) -> Optional[str]:
    """Whether each runtime's int8 file meets the targets at batch TARGET_BATCH: its fastest
    images/s (over the streams timed) at least TARGET_SPEEDUP x the fastest fp32 onnxruntime's,
    and an image AUROC drop of at most TARGET_AUROC_DROP. None without an int8 row and an fp32
    onnxruntime row to compare with."""
    base = _fp32_onnxruntime_best(rows).get(TARGET_BATCH)
    int8: Dict[str, Dict[str, object]] = {}
    for r in rows:
        if r["precision"] == "int8" and r["batch"] == TARGET_BATCH and \
                r["images_per_s"] > int8.get(r["runtime"], {}).get("images_per_s", 0.0):
            int8[r["runtime"]] = r
    if base is None or not int8:
        return None

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"
    best = list(int8.values())
    speed = [f"{r['images_per_s'] / base:.2f}×, {verdict(r['images_per_s'] >= TARGET_SPEEDUP * base)}" for r in best]
    drop = [f"{r['auroc_fp32'] - r['auroc']:+.4f}, {verdict(r['auroc_fp32'] - r['auroc'] <= TARGET_AUROC_DROP)}"
            if r.get("auroc") is not None else "n/a" for r in best]
    return markdown_table([f"target (batch {TARGET_BATCH})",
                           *[f"{r['runtime']} int8, streams {r.get('streams', 1)}" for r in best]],
                          [[f"images/s ≥ {TARGET_SPEEDUP:g}× fastest fp32 onnxruntime ({base:.1f})", *speed],
                           [f"image AUROC drop ≤ {TARGET_AUROC_DROP}", *drop]])


def to_markdown(results: Dict[str, object]) -> str:
    """The results as markdown tables: the speed-up over torch eager at each batch, and the
    trained detector's precisions."""
    trained = [r for r in results["rows"] if r["spec"] == TRAINED_SPEC]
    rows = [r for r in results["rows"] if r["spec"] != TRAINED_SPEC]
    eager = {(r["spec"], r["batch"]): r["images_per_s"] for r in rows if r["runtime"].startswith("torch")}
    table = [[r["spec"], str(r["input_size"]), r["runtime"],
              f"{r['batch']}" + (f" (asked {r['requested_batch']})" if r["batch"] != r["requested_batch"] else ""),
              f"{r['median_ms']:.1f}", f"{r['images_per_s']:.1f}",
              f"{r['images_per_s'] / eager[(r['spec'], r['batch'])]:.2f}×" if (r["spec"], r["batch"]) in eager
              else "n/a"] for r in rows]
    lines = [f"# Exported detector throughput: {results['device']}", "",
             f"{results['threads']} threads; image to answer (resize, normalisation, backbone, GRAD, strict "
             "post-processing) at the model's input size; random backbone weights.", "",
             markdown_table(["spec", "input", "runtime", "batch", "median ms", "images/s", "vs eager"], table)]
    if trained:
        side = trained[0]["input_size"]
        lines += ["", f"## Precisions: the Lite demo detector, trained (`gradad demo`), {side} px", "",
                  "`gradad export --precision` of the trained demo checkpoint, each file in its own runtime at "
                  f"{results['threads']} threads, scored by gradad.deploy.Scorer with 1 stream (the batch in one "
                  "run) or 2 (two halves at once, a thread each); AUROC and score change: the export's accuracy "
                  "check against fp32 on the demo's test split (and its validation normals for the score "
                  "change).", "",
                  precision_table(trained)]
        targets = target_table(trained)
        if targets:
            lines += ["", "Targets of the quantized export:", "", targets]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs the benchmark and writes export.json / export.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", choices=sorted(SPECS), default=["lite-demo", "grad"])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runtimes", nargs="+", choices=sorted(RUNTIMES), default=sorted(RUNTIMES),
                        help="runtimes to time (one alone: none of the others is loaded in the process)")
    parser.add_argument("--checkpoint", help="a trained Lite demo run: time its exports in --precisions instead of "
                        "the random-weight specs")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="seconds of interleaved timing per batch size (at least %d rounds)" % MIN_REPEATS)
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        if args.checkpoint:
            rows = run_precisions(args.checkpoint, args.threads, folder, args.runtimes, args.precisions,
                                  args.budget_s)
        else:
            rows = [row for name in args.specs for row in run_spec(name, args.threads, folder, args.runtimes)]
    out = os.path.join(args.out, device_slug(device))
    previous = os.path.join(out, "export.json")
    if os.path.isfile(previous):  # keep the rows of the specs not run this time
        with open(previous, encoding="utf-8") as handle:
            ran = {(r["spec"], r["runtime"], r.get("precision")) for r in rows}
            kept = json.load(handle)["rows"]
            rows = [r for r in kept if (r["spec"], r["runtime"], r.get("precision")) not in ran] + rows
    results = {"device": device_slug(device), "threads": args.threads, "environment": environment(device),
               "rows": sorted(rows, key=lambda r: (r["spec"] != "lite-demo", r["spec"]))}
    write_report(out, "export", results, to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
