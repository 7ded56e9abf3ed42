"""GRAD against Bi-Grid GRAD on ELPV: same backbone, features, seed and wall-clock budget.

Both models are BiGridGRAD instances trained by gradad.engine.train_bigrid, GRAD being the one
without the abnormal branch (which is GRAD exactly). Features of a seeded subset of ELPV's
train/test split are extracted once with the frozen backbone; each model trains for the same
number of seconds (stopping after the first epoch past the budget); image scores follow the
'paper' protocol of gradad.evaluation; image AUROC from scikit-learn.

    python benchmarks/bigrid_vs_grad_elpv.py [--seconds 75] [--train 256] [--test 256] [--out r.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from gradad.backbones import build_backbone
from gradad.config import preset_config
from gradad.datasets import AnomalyDataset, list_elpv
from gradad.engine import train_bigrid
from gradad.evaluation import postprocess
from gradad.io_utils import atomic_write_text
from gradad.models.bigrid import BiGridGRAD


def subset(records, count, seed):
    """``count`` records drawn without replacement with a seeded permutation (all if fewer)."""
    order = np.random.default_rng(seed).permutation(len(records))[:count]
    return [records[i] for i in sorted(order)]


def extract(backbone, records, image_size):
    """Backbone features of ``records``, (N, C, S/8, S/8), and their labels (N,)."""
    dataset = AnomalyDataset(records, image_size=image_size, mean=backbone.mean, std=backbone.std, progress=False)
    features, labels = [], []
    for batch in tqdm(DataLoader(dataset, batch_size=32), desc="features", leave=False):
        features.append(backbone(batch["image"]))
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels).numpy()


def image_auroc(model, features, labels, image_size):
    """Image AUROC of ``model`` with the 'paper' protocol's image scores."""
    model.eval()
    maps = torch.cat([model.anomaly_map(chunk, image_size) for chunk in features.split(32)])
    _, scores = postprocess(maps, "paper")
    return float(roc_auc_score(labels, scores))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bigrid-lite", help="config preset giving backbone, model and batch size")
    parser.add_argument("--train", type=int, default=256, help="normal training images (seeded subset)")
    parser.add_argument("--test", type=int, default=256, help="test images (seeded subset)")
    parser.add_argument("--seconds", type=float, default=75.0, help="training budget per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = preset_config(args.preset)
    backbone = build_backbone(preset.model.backbone, preset.model.backbone_weights)
    train_records = subset(list_elpv("train", seed=args.seed), args.train, args.seed)
    test_records = subset(list_elpv("test", seed=args.seed), args.test, args.seed)
    train_features, _ = extract(backbone, train_records, preset.image_size)
    test_features, test_labels = extract(backbone, test_records, preset.image_size)
    channels, size = train_features.shape[1], train_features.shape[-1]

    model_cfg = preset.model
    # no learning-rate steps inside the short budget
    train_cfg = dataclasses.replace(preset.train, seed=args.seed, lr_step=1000)
    # many short cycles so that the time budget, not the plan, ends the run
    variants = {
        "grad": dataclasses.replace(preset.bigrid, abnormal_branch=False, abnormal_epochs=0, normal_epochs=1000),
        "bigrid": dataclasses.replace(preset.bigrid, schedule="alternating", abnormal_epochs=1, normal_epochs=1,
                                      cycles=500),
    }
    results = {"preset": args.preset, "backbone": backbone.weights_id, "train_images": len(train_records),
               "test_images": len(test_records), "test_anomalous": int(test_labels.sum()),
               "seconds_budget": args.seconds, "seed": args.seed, "threads": args.threads,
               "model": dataclasses.asdict(model_cfg), "models": {}}
    for name, bigrid in variants.items():
        torch.manual_seed(args.seed)
        model = BiGridGRAD(model_cfg, bigrid, channels, size)
        started = time.perf_counter()
        history = train_bigrid(model, train_features, train_cfg, progress=False, max_seconds=args.seconds)
        elapsed = time.perf_counter() - started
        auroc = image_auroc(model, test_features, test_labels, preset.image_size)
        results["models"][name] = {"image_auroc": auroc, "train_seconds": elapsed, "epochs": len(history["stage"]),
                                   "epochs_by_stage": {s: history["stage"].count(s) for s in set(history["stage"])},
                                   "parameters": model.count_parameters()}
        print(f"{name:7s} image AUROC {auroc:.4f}  ({len(history['stage'])} epochs, {elapsed:.0f} s)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
