"""Which CPU memory allocator setting helps gradad's own work, measured on that work.

Each setting of benchmarks/allocators.py (glibc as it comes, glibc tuned to reuse its heap,
jemalloc and tcmalloc preloaded) runs, in child processes started under it:

* training: the Lite demo's data (the ELPV cells of ``gradad demo``: 400 training images at
  240 px, EfficientNet-Lite1 with the offline ImageNet weights). Backbone features of every
  training image are extracted (timed: "feature extraction"), then GRAD trains on them with
  ``gradad train``'s objective, optimiser and epoch loop
  (:func:`gradad.engine.epochs.train_on_features`) for ``--epochs`` epochs; the last epoch's time
  is "training epoch" (the first one also pays for warming up);
* predict, torch: ``gradad predict FILES --checkpoint RUN`` on ``--images`` seeded PNGs of 240 px,
  timed by its wall clock (interpreter start, model load, scoring, heatmaps and report), with
  a checkpoint of the Lite demo trained for one epoch on synthetic images (only the speed
  matters; benchmarks/bench_serve.py makes it);
* predict, ONNX: the same files through the same model exported to ONNX (onnxruntime).

The settings take turns in every round (``--rounds``), so that a slow spell of a shared
machine does not fall on one setting only; the tables give the best round and every round.

    python benchmarks/bench_allocators.py [--allocators glibc glibc-tuned jemalloc tcmalloc]
        [--rounds 2] [--epochs 2] [--images 200] [--threads N] [--out benchmarks/results]

Writes ``<out>/<cpu slug>/allocators.json`` and ``allocators.md`` (about 10 minutes on the 2-core VM).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch

from benchmarks.allocators import SETTINGS, allocator_env, check_settings, current_allocator
from benchmarks.bench_serve import ROOT, make_files, make_model, subprocess_env
from benchmarks.device_info import device_slug, environment, load_average
from benchmarks.reporting import allocator_title, markdown_table, write_report
from gradad.io_utils import atomic_write_text

WORK = ("feature extraction", "training epoch", "predict, torch", "predict, ONNX")
PEAK_WORK = ("training", "predict, torch", "predict, ONNX")  # peak resident memory: per process
DEFAULT_ROUNDS = 2
DEFAULT_EPOCHS = 2
DEFAULT_IMAGES = 200
CHILD_TIMEOUT_S = 1800


# ---- the children ----------------------------------------------------------------------------

def measure_training(epochs: int, threads: Optional[int]) -> Dict[str, object]:
    """In this process (started under one allocator setting): feature extraction of the Lite
    demo's training images and ``epochs`` epochs of GRAD training on them."""
    from gradad.backbones import build_backbone
    from gradad.commands import DEMO_OVERRIDES, DEMO_PRESET
    from gradad.config import apply_overrides, preset_config
    from gradad.datasets import AnomalyDataset, split_training_records
    from gradad.engine.epochs import train_on_features
    from gradad.engine.training import list_training_records
    from gradad.features import extract_features
    from gradad.models.factory import build_model, epoch_stages, model_feature_size
    from gradad.runtime import seed_everything

    if threads:
        torch.set_num_threads(threads)
    cfg = apply_overrides(preset_config(DEMO_PRESET), DEMO_OVERRIDES)
    records, _ = split_training_records(list_training_records(cfg), cfg.split.max_train_images,
                                        cfg.split.val_fraction, cfg.train.seed)
    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights)
    dataset = AnomalyDataset(records, cfg.image_size, backbone.mean, backbone.std, on_error=cfg.data.on_error,
                             progress=False)
    cpu = torch.device("cpu")
    started = time.perf_counter()
    features = extract_features(backbone, dataset, cpu, cfg.train.batch_size, None, False)
    extraction = time.perf_counter() - started
    seed_everything(cfg.train.seed)
    model = build_model(cfg, backbone.out_channels, model_feature_size(cfg, backbone))
    history = train_on_features(model, features, cfg.train, epoch_stages(cfg)[:epochs], cpu, progress=False)
    ends = history["seconds"]
    epoch_seconds = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
    return {"allocator": current_allocator(), "images": len(dataset), "batch_size": cfg.train.batch_size,
            "threads": torch.get_num_threads(), "feature extraction": extraction,
            "epoch_seconds": epoch_seconds, "training epoch": epoch_seconds[-1],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(name: str, argv: Sequence[str]) -> Dict[str, object]:
    """Runs this script with ``argv`` in a child process under allocator ``name``; its JSON answer."""
    with tempfile.TemporaryDirectory(prefix="bench-allocators-") as folder:
        answer = os.path.join(folder, "answer.json")
        env = allocator_env(name, subprocess_env())
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--answer", answer], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} under {name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        with open(answer, encoding="utf-8") as handle:
            return json.load(handle)


def time_predict(name: str, model: str, files: Sequence[str], out: str) -> Tuple[float, float]:
    """Wall clock (s) and peak resident memory (MiB) of ``gradad predict FILES --checkpoint MODEL``
    started under allocator ``name``."""
    env = allocator_env(name, subprocess_env())
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-m", "gradad", "predict", *files, "--checkpoint", model, "--out",
                                    out, "--no-progress"], env=env, cwd=ROOT, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        took = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"gradad predict under {name} failed ({process.returncode}):\n"
                               f"{log.read().decode(errors='replace')[-4000:]}")
    return took, usage.ru_maxrss / 1024


# ---- the report ------------------------------------------------------------------------------

def to_markdown(results: Dict[str, object]) -> str:
    """allocators.md: per work, each setting's best time, its speed against glibc as it comes, and every round."""
    env = results["environment"]
    case = results["case"]
    runs = results["runs"]
    names = list(runs)
    lines = [f"# CPU memory allocator settings on {env['cpu']}", "",
             f"{case['threads']} threads, torch {env['torch']}, {case['rounds']} rounds (the settings take turns "
             f"in each); load average {env.get('load_average')} → {results.get('load_average_end')}. "
             f"Work: {case['training']}; {case['predict']}.", "",
             "Settings: " + "; ".join(f"**{n}**: {allocator_title(results['allocators'][n])}" for n in names), ""]
    rows = []
    baseline = runs.get("glibc")
    for work in WORK:
        for name in names:
            values = runs[name][work]
            speed = (min(baseline[work]) / min(values)) if baseline else None
            rows.append((work, name, f"{min(values):.2f}", f"{speed:.2f}×" if speed else "—",
                         ", ".join(f"{v:.2f}" for v in values)))
    lines += [markdown_table(("work", "allocator", "best s", "speed vs glibc", "every round, s"), rows), ""]
    per_image = []
    for name in names:
        r = runs[name]
        per_image.append((name, f"{case['train_images'] / min(r['feature extraction']):.1f}",
                          f"{case['train_images'] / min(r['training epoch']):.1f}",
                          f"{case['images'] / min(r['predict, torch']):.1f}",
                          f"{case['images'] / min(r['predict, ONNX']):.1f}"))
    lines += ["Images per second (best round):", "",
              markdown_table(("allocator", "feature extraction", "training epoch", "predict, torch", "predict, ONNX"),
                             per_image), ""]
    peaks = results.get("peak_rss_mib")
    if peaks:
        rows = [(name, *(f"{max(peaks[name][w]):.0f}" for w in PEAK_WORK)) for name in names]
        lines += ["Peak resident memory of the process, MiB (largest round; training: feature extraction and "
                  "the epochs in one process):", "", markdown_table(("allocator", *PEAK_WORK), rows), ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocators", nargs="+", default=list(SETTINGS), metavar="SETTING",
                        help=f"settings to compare (default: {' '.join(SETTINGS)})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds (%(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs per run (%(default)s)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="files given to predict (%(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in training (torch's default)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", choices=("training",), help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.epochs < 1 or args.images < 1:
        parser.error("--rounds, --epochs and --images must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.child:
        atomic_write_text(args.answer, json.dumps(measure_training(args.epochs, args.threads)) + "\n")
        return
    try:
        check_settings(args.allocators)
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"--allocators: {err}")
    device = torch.device("cpu")
    env = environment(device)
    child_argv = ["--child", "training", "--epochs", str(args.epochs)] + (
        ["--threads", str(args.threads)] if args.threads else [])
    runs: Dict[str, Dict[str, List[float]]] = {n: {w: [] for w in WORK} for n in args.allocators}
    peaks: Dict[str, Dict[str, List[float]]] = {n: {w: [] for w in PEAK_WORK} for n in args.allocators}
    settings: Dict[str, Dict[str, Optional[str]]] = {}  # each setting as its children recorded it
    train_images = threads = None
    with tempfile.TemporaryDirectory(prefix="bench-allocators-") as folder:
        onnx_model = make_model(folder, 240)
        torch_model = os.path.join(folder, "run")
        files = make_files(os.path.join(folder, "images"), args.images, 240)
        for round_index in range(args.rounds):
            for name in args.allocators:
                trained = run_child(name, child_argv)
                assert trained["allocator"]["name"] == name, trained["allocator"]
                settings[name] = trained["allocator"]
                train_images, threads = trained["images"], trained["threads"]
                runs[name]["feature extraction"].append(trained["feature extraction"])
                runs[name]["training epoch"].append(trained["training epoch"])
                peaks[name]["training"].append(trained["peak_rss_mib"])
                out = os.path.join(folder, f"predict-{name}-{round_index}")
                predicts = (("predict, torch", torch_model, "torch"), ("predict, ONNX", onnx_model, "onnx"))
                for work, model, kind in predicts:
                    took, peak = time_predict(name, model, files, f"{out}-{kind}")
                    runs[name][work].append(took)
                    peaks[name][work].append(peak)
                print(f"round {round_index + 1} {name}: " + ", ".join(f"{w} {runs[name][w][-1]:.2f} s" for w in WORK),
                      flush=True)
    results = {
        "device": device_slug(device), "environment": env, "load_average_end": load_average(),
        "case": {"rounds": args.rounds, "epochs": args.epochs, "images": args.images, "train_images": train_images,
                 "threads": threads,
                 "training": f"Lite demo on ELPV, {train_images} training images, {args.epochs} epochs (the last one "
                             f"timed)",
                 "predict": f"gradad predict on {args.images} PNGs of 240 px, Lite demo checkpoint (torch) and its "
                            f"ONNX export (onnxruntime), wall clock of the command"},
        "runs": runs, "peak_rss_mib": peaks,
        "allocators": settings,
    }
    write_report(os.path.join(args.out, device_slug(device)), "allocators", results, to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
