"""GRAD against Bi-Grid GRAD on a synthetic MVTec-layout set with pixel masks.

Normal images are a striped texture (random phase, orientation jitter and sensor noise);
anomalous ones carry a thin scratch or a small faint blob whose pixels the mask marks. Both
models train through the ``gradad`` CLI with the same backbone, seed and number of epochs
('lite-demo' preset: 10 epochs; 'bigrid-lite': 5 abnormal-stage + 5 normal-stage epochs) and
are tested by ``gradad test``; the script prints image AUROC, pixel AUROC and AUPRO of both
with their training times.

    python benchmarks/bigrid_vs_grad_synthetic.py [--work DIR] [--train 60] [--test 40] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

from gradad.cli import main as gradad_main  # noqa: E402

CLASS_NAME = "stripes"
IMAGE_SIZE = 224
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def texture(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A gray striped texture (H, W) float in [0, 255] with random phase, angle and noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.normal(0.0, 0.05)
    period = 14.0 + rng.normal(0.0, 0.3)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    return np.clip(128 + 50 * stripes + rng.normal(0, 8, (size, size)), 0, 255)


def add_defect(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image with a scratch or a faint blob, uint8 mask 255 on the defect)."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    if rng.random() < 0.5:  # a thin scratch: a segment 2-3 px wide, 30-70 px long
        theta = rng.uniform(0, np.pi)
        length, width = rng.uniform(30, 70), rng.uniform(1.0, 1.6)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        mask = (np.abs(u) <= length / 2) & (np.abs(v) <= width)
        image = np.where(mask, image * 0.35, image)
    else:  # a faint blob of radius 6-12 px
        radius = rng.uniform(6, 12)
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
        image = np.where(mask, np.clip(image + 45, 0, 255), image)
    return image, (mask * 255).astype(np.uint8)


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array).astype(np.uint8)).save(path)


def make_dataset(root: str, n_train: int, n_test: int, seed: int) -> str:
    """One MVTec-layout class: n_train normal training images; n_test test images, a third of
    them normal, the rest with a defect and its mask."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, CLASS_NAME)
    for i in range(n_train):
        _save(os.path.join(base, "train", "good", f"{i:03d}.png"), texture(rng))
    n_good = n_test // 3
    for i in range(n_test):
        image = texture(rng)
        if i < n_good:
            _save(os.path.join(base, "test", "good", f"{i:03d}.png"), image)
            continue
        image, mask = add_defect(rng, image)
        _save(os.path.join(base, "test", "defect", f"{i:03d}.png"), image)
        _save(os.path.join(base, "ground_truth", "defect", f"{i:03d}_mask.png"), mask)
    return root


def run_model(model: str, preset: str, root: str, work: str, seed: int) -> dict:
    """Train with the CLI, test, and return the class's metrics plus the training seconds."""
    run_dir, report = os.path.join(work, f"run-{model}"), os.path.join(work, f"test-{model}")
    common = ["--dataset", "mvtec", "--root", root, "--device", "cpu", "--no-progress",
              "--set", f"train.seed={seed}"]
    started = time.perf_counter()
    if gradad_main(["train", "--preset", preset, "--model", model, "--out", run_dir, *common]) != 0:
        raise RuntimeError(f"gradad train --model {model} failed")
    seconds = time.perf_counter() - started
    if gradad_main(["test", "--checkpoint", run_dir, "--out", report, "--no-progress"]) != 0:
        raise RuntimeError(f"gradad test of {run_dir} failed")
    with open(os.path.join(report, "metrics.json"), encoding="utf-8") as handle:
        results = json.load(handle)["results"][CLASS_NAME]
    return {**{k: results[k] for k in METRICS}, "train_seconds": round(seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the dataset and runs (default: a temporary folder)")
    parser.add_argument("--train", type=int, default=60, help="normal training images")
    parser.add_argument("--test", type=int, default=45, help="test images (a third normal)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or scratch
        root = make_dataset(os.path.join(work, "data"), args.train, args.test, args.seed)
        rows = {"GRAD": run_model("grad", "lite-demo", root, work, args.seed),
                "Bi-Grid GRAD": run_model("bigrid", "bigrid-lite", root, work, args.seed)}
    print(f"{'model':<14}" + "".join(f"{k:>15}" for k in (*METRICS, "train_seconds")))
    for name, row in rows.items():
        print(f"{name:<14}" + "".join(f"{row[k]:>15.4f}" if k in METRICS else f"{row[k]:>15}"
                                      for k in (*METRICS, "train_seconds")))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"train_images": args.train, "test_images": args.test, "seed": args.seed, "results": rows},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
