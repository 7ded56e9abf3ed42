"""Using a trained GRAD checkpoint: load it, evaluate it on a test split, score new images.

- :func:`load_model`: checkpoint → GRAD + frozen backbone, refusing a checkpoint that does not
  fit the config (other backbone, weights, channels, input size or model settings).
- :func:`run_test`: anomaly maps of a dataset's test split, spec §5 metrics per class and
  their mean, and the report files (metrics.json/csv, per-image scores.csv, ROC plot, heatmaps).
- :func:`predict`: scores, decisions at the checkpoint's validation threshold and a heatmap
  for image files or folders; results.json and results.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import FeatureExtractor, build_backbone
from .config import Config, config_from_dict, config_to_dict
from .data import AnomalyDataset, ImageRecord, list_dataset, load_mask, load_rgb
from .datasets.image_io import image_size_of
from .datasets.records import IMAGE_EXTENSIONS, list_image_files
from .evaluation import MEAN_KEY, EvalRecord, _class_masks, _mean_over_classes, postprocess, prepare_masks
from .metrics import compute_metrics
from .io_utils import atomic_write_text
from .model import GRAD
from .report import format_table, save_heatmap_overlays, save_roc_curves, write_metrics
from .report_html_runs import write_predict_report, write_test_report
from .training import (
    CHECKPOINT_NAME,
    config_differences,
    extract_features,
    feature_cache,
    library_versions,
    build_model,
    model_feature_size,
    planned_epochs,
    read_checkpoint,
    resolve_device,
    score_features,
)

SCORES_CSV = "scores.csv"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
HEATMAP_DIR = "heatmaps"
PREDICT_CLASS = "predict"
# predict scores images in chunks of this many, so memory does not grow with their number
PREDICT_CHUNK = 32
# Config keys a test/predict run must keep as the checkpoint has them: they shape the model.
MODEL_KEYS = ("model.",)
# The bigrid keys that shape a Bi-Grid model (the schedule keys do not).
BIGRID_KEYS = ("bigrid.abnormal_branch", "bigrid.combine", "bigrid.mix_lambda", "bigrid.standardize_eps")


@dataclass
class LoadedModel:
    """A trained GRAD ready for inference: model (eval mode) and backbone on ``device``, the
    run's config and the raw checkpoint dict (validation scores, versions, ...)."""

    model: GRAD
    backbone: FeatureExtractor
    config: Config
    checkpoint: Dict[str, object]
    device: torch.device

    @property
    def path(self) -> str:
        """The checkpoint file this model came from."""
        return self.checkpoint["path"]


def checkpoint_config(path: str | os.PathLike) -> Config:
    """The Config stored in a checkpoint file (or run folder holding checkpoint.pt)."""
    return config_from_dict(read_checkpoint(path)["config"])


def load_model(path: str | os.PathLike, cfg: Optional[Config] = None, device: str = "auto") -> LoadedModel:
    """Load a checkpoint for inference.

    cfg: the config of this run (None: the checkpoint's own). Its model section and image size
    must equal the checkpoint's, and its backbone must load the same weights (weights_id);
    anything else raises ValueError listing the differences. device: 'auto', 'cpu', 'cuda[:N]'.
    """
    stored = read_checkpoint(path)
    where = stored["path"]
    cfg = config_from_dict(stored["config"]) if cfg is None else cfg
    keys = MODEL_KEYS + (BIGRID_KEYS if cfg.model.architecture == "bigrid" else ())
    differences = config_differences(stored["config"], config_to_dict(cfg), prefixes=keys)
    if cfg.image_size != stored["image_size"]:
        differences.append(f"image size: checkpoint {stored['image_size']}, now {cfg.image_size}")
    if differences:
        raise ValueError(f"checkpoint {where} does not fit this config: {'; '.join(differences)}")
    torch_device = resolve_device(device)
    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights).to(torch_device)
    if backbone.weights_id != stored["backbone"]["weights_id"]:
        raise ValueError(f"checkpoint {where} was trained on backbone weights "
                         f"{stored['backbone']['weights_id']!r}, but {backbone.weights_id!r} were loaded "
                         f"(model.backbone_weights={cfg.model.backbone_weights!r})")
    if backbone.out_channels != stored["in_channels"]:
        raise ValueError(f"checkpoint {where} expects {stored['in_channels']} feature channels, the "
                         f"backbone {backbone.name!r} gives {backbone.out_channels}")
    model = build_model(cfg, backbone.out_channels, model_feature_size(cfg, backbone))
    try:
        model.load_state_dict(stored["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint {where}: its weights do not fit the model of its config: {error}") from error
    if not stored.get("complete"):
        raise ValueError(f"checkpoint {where} is from an unfinished training ({stored['epoch']} of "
                         f"{planned_epochs(cfg)} epochs); finish it with `gradad train --resume`")
    model.to(torch_device).eval()
    return LoadedModel(model, backbone, cfg, stored, torch_device)


def compute_maps(loaded: LoadedModel, dataset: AnomalyDataset, progress: bool = True,
                 use_cache: bool = True) -> torch.Tensor:
    """Anomaly maps of every image of ``dataset`` at the model's input size, (N, S, S) on the CPU.
    Features go through the config's feature cache when ``use_cache``."""
    cfg = loaded.config
    cache = feature_cache(cfg, loaded.backbone) if use_cache else None
    features = extract_features(loaded.backbone, dataset, loaded.device, cfg.train.batch_size, cache,
                                progress, cfg.train.num_workers)
    return score_features(loaded.model, features, cfg.image_size, loaded.device, cfg.train.batch_size,
                          progress, desc="anomaly maps")


# ---------------------------------------------------------------------------------------------
# Test


@dataclass(frozen=True)
class TestOutput:
    """results: {class: {metric: float or None}, 'mean': ...} as gradad.evaluation.evaluate.
    table: the printed metrics table. files: paths written."""

    results: Dict[str, Dict[str, Optional[float]]]
    table: str
    files: List[str]


def _file_stem(*parts: str) -> str:
    """A file-name-safe stem from parts (letters, digits, '-', '_' and '.')."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-.") or "x" for p in parts)


def _unique(names: Sequence[str]) -> List[str]:
    seen: Dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


def heatmap_selection(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` images spread evenly over the score ranking (lowest to highest), so
    that clear normals, borderline cases and clear anomalies are all shown."""
    if count <= 0 or len(scores) == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(scores, kind="stable")
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return order[picks]


def find_checkpoints(path: str | os.PathLike) -> Dict[Optional[str], str]:
    """Checkpoint files of a run: {None: file} for a checkpoint file or a folder holding
    checkpoint.pt; {class: file} for a per-class run folder (``<class>/checkpoint.pt``)."""
    path = os.fspath(path)
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, CHECKPOINT_NAME)):
        return {None: path}
    if os.path.isdir(path):
        per_class = {name: os.path.join(path, name, CHECKPOINT_NAME) for name in sorted(os.listdir(path))
                     if os.path.isfile(os.path.join(path, name, CHECKPOINT_NAME))}
        if per_class:
            return per_class
        raise FileNotFoundError(f"run folder {path} holds neither {CHECKPOINT_NAME} nor "
                                f"<class>/{CHECKPOINT_NAME} files")
    raise FileNotFoundError(f"checkpoint file not found: {path}")


def run_config(path: str | os.PathLike) -> Config:
    """The config of a run (see :func:`find_checkpoints`); for a per-class run, the first
    class's config with data.classes listing every class of the run."""
    checkpoints = find_checkpoints(path)
    cfg = checkpoint_config(next(iter(checkpoints.values())))
    if None in checkpoints:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=list(checkpoints)))


def load_run(path: str | os.PathLike, cfg: Optional[Config] = None,
             device: str = "auto") -> Dict[Optional[str], LoadedModel]:
    """:func:`load_model` for every checkpoint of a run, keyed as :func:`find_checkpoints`."""
    return {name: load_model(file, cfg, device) for name, file in find_checkpoints(path).items()}


def evaluate_class(name: str, records: Sequence[EvalRecord], protocol: str):
    """The metrics of one class as gradad.evaluation.evaluate computes them, together with the
    post-processed maps and the image scores it does not return (post-processing is the costly
    step, so it is done once for metrics, scores.csv, ROC curves and heatmaps).
    Returns (metrics dict, maps as postprocess returns them, (N,) scores)."""
    maps = torch.stack([torch.as_tensor(r.anomaly_map) for r in records])
    maps_out, scores = postprocess(maps, protocol, [r.image_size for r in records])
    masks = _class_masks(name, list(records))
    if masks is not None:
        masks = prepare_masks(masks, protocol, size=tuple(maps.shape[1:]))
    labels = np.array([r.label for r in records])
    try:
        metrics = compute_metrics(labels, scores, masks, None if masks is None else maps_out)
    except ValueError as error:
        raise ValueError(f"class {name!r}: {error}") from error
    return metrics, maps_out, scores


def _score_test_split(loaded: LoadedModel, cfg: Config, progress: bool):
    records = list_dataset(cfg.data.dataset, cfg.data.root, "test", cfg.data.classes)
    dataset = AnomalyDataset(records, cfg.image_size, loaded.backbone.mean, loaded.backbone.std,
                             on_error=cfg.data.on_error, progress=progress)
    return dataset.records, compute_maps(loaded, dataset, progress), dataset.skipped_paths


def run_test(models: LoadedModel | Mapping[Optional[str], LoadedModel], out_dir: str | os.PathLike,
             progress: bool = True, cfg: Optional[Config] = None) -> TestOutput:
    """Evaluate on the test split of ``cfg.data`` (default: the first model's config).

    models: one LoadedModel for all classes, or {class: LoadedModel} of a per-class run (each
    class's test images are scored by its own model; {None: model} means one for all).
    Writes into out_dir: metrics.json / metrics.csv (gradad.report), scores.csv (path, class,
    defect type, label, image score), roc_curves.png, and cfg.eval.heatmaps overlays in
    heatmaps/ (spread over each class's score ranking), and report.html (gradad.report_html).
    Returns a :class:`TestOutput`.
    """
    models = {None: models} if isinstance(models, LoadedModel) else dict(models)
    cfg = next(iter(models.values())).config if cfg is None else cfg
    started = time.perf_counter()
    records, maps, skipped = [], [], []
    for class_name, loaded in models.items():
        class_cfg = cfg if class_name is None else dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, classes=[class_name]))
        class_records, class_maps, class_skipped = _score_test_split(loaded, class_cfg, progress)
        records += class_records
        maps.append(class_maps)
        skipped += class_skipped
    maps = torch.cat(maps)
    sizes = [image_size_of(r.path) for r in records]
    by_class: Dict[str, List[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(record.class_name, []).append(i)
    heatmaps_per_class = -(-cfg.eval.heatmaps // len(by_class)) if cfg.eval.heatmaps else 0
    results, scores, smoothed = {}, np.zeros(len(records)), {}
    for name, indices in tqdm(by_class.items(), desc=f"evaluate ({cfg.eval.protocol})", unit="class",
                              disable=not progress):
        class_records = [EvalRecord(name, records[i].label, maps[i], load_mask(records[i]), sizes[i])
                         for i in indices]
        results[name], class_maps, scores[indices] = evaluate_class(name, class_records, cfg.eval.protocol)
        for pick in heatmap_selection(scores[indices], heatmaps_per_class):
            smoothed[indices[pick]] = class_maps[pick]
    results[MEAN_KEY] = _mean_over_classes(results)
    shown = sorted(smoothed)[:cfg.eval.heatmaps]

    out_dir = os.fspath(out_dir)
    extra = {"checkpoints": [m.path for m in models.values()], "protocol": cfg.eval.protocol,
             "dataset": cfg.data.dataset, "root": cfg.data.root, "classes": sorted(by_class), "images": len(records),
             "skipped_images": skipped, "seconds": round(time.perf_counter() - started, 2),
             "versions": library_versions()}
    files = [str(p) for p in write_metrics(out_dir, results, extra)]
    files.append(_write_scores_csv(os.path.join(out_dir, SCORES_CSV), records, scores))
    labels = np.array([r.label for r in records])
    roc_classes = {name: (labels[idx], scores[idx]) for name, idx in by_class.items()
                   if 0 < labels[idx].sum() < len(idx)}
    if roc_classes:
        files.append(str(save_roc_curves(out_dir, roc_classes)))
    if shown:
        images, heat, names = [], [], []
        for i in shown:
            amap = smoothed[i]
            images.append(load_rgb(records[i], None if amap.shape == sizes[i] else amap.shape))
            heat.append(amap)
            names.append(_file_stem(records[i].class_name, records[i].defect_type,
                                    os.path.splitext(os.path.basename(records[i].path))[0]))
        paths = save_heatmap_overlays(os.path.join(out_dir, HEATMAP_DIR), images, heat, _unique(names),
                                      scores=[scores[i] for i in shown], progress=progress)
        files += [str(p) for p in paths]
    files.append(str(write_test_report(out_dir, models, cfg, results, records, scores, shown, paths if shown else [])))
    return TestOutput(results, format_table(results), files)


def _write_scores_csv(path: str, records: Sequence[ImageRecord], scores: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "defect_type", "label", "score"])
    for record, score in zip(records, scores):
        writer.writerow([record.path, record.class_name, record.defect_type, record.label, repr(float(score))])
    atomic_write_text(path, buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# Predict


def collect_images(paths: Sequence[str | os.PathLike]) -> List[str]:
    """Image files named by ``paths``: files as given, folders by their image files (not
    recursive, suffixes IMAGE_EXTENSIONS), each file once. A missing path or an empty folder
    raises."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no image files or folders given to predict on")
    files: List[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = list_image_files(path)
            if not found:
                raise ValueError(f"folder {path} holds no image files (suffixes {', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image file or folder not found: {path}")
    return list(dict.fromkeys(files))


def decision_threshold(checkpoint: Dict[str, object], threshold: Optional[float] = None,
                       quantile: Optional[float] = None) -> tuple[float, str]:
    """The score above which an image is called anomalous, and where it came from: an explicit
    ``threshold``; else ``quantile`` of the checkpoint's validation scores; else the threshold
    stored at training time."""
    if threshold is not None:
        if quantile is not None:
            raise ValueError("give either threshold or quantile, not both")
        return float(threshold), "given"
    validation = checkpoint.get("validation")
    if validation is None:
        raise ValueError(f"checkpoint {checkpoint['path']} has no validation scores (it was trained "
                         f"with val_fraction=0); pass a threshold explicitly")
    if quantile is not None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        return float(np.quantile(validation["scores"], quantile)), f"validation quantile {quantile}"
    return float(validation["threshold"]), f"validation quantile {validation['quantile']}"


def predict(loaded: LoadedModel, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            threshold: Optional[float] = None, quantile: Optional[float] = None,
            on_error: Optional[str] = None, progress: bool = True) -> List[Dict[str, object]]:
    """Score image files / folders with a trained model.

    Decision: score > threshold (see :func:`decision_threshold`), with the image score of the
    protocol the threshold was chosen under. Writes heatmaps/<stem>.png per image,
    results.json, results.csv and report.html into out_dir. on_error: 'raise' or 'skip' for unreadable
    images (default: the config's data.on_error). Returns one dict per scored image: path,
    score, anomalous, heatmap.
    """
    cfg = loaded.config
    threshold_value, source = decision_threshold(loaded.checkpoint, threshold, quantile)
    validation = loaded.checkpoint.get("validation")
    protocol = validation["protocol"] if validation is not None else cfg.eval.protocol
    if threshold is None and protocol != cfg.eval.protocol:
        raise ValueError(f"the checkpoint's threshold was chosen under eval.protocol={protocol!r}, "
                         f"this run asks for {cfg.eval.protocol!r}; pass a threshold explicitly")
    files = collect_images(paths)
    out_dir = os.fspath(out_dir)
    name_of = dict(zip(files, _unique([_file_stem(os.path.splitext(os.path.basename(p))[0]) for p in files])))
    # one colour scale for every heatmap: 0 to twice the threshold, so colours past the middle
    # of the scale mark regions whose value exceeds the decision threshold
    vmax = 2 * threshold_value if threshold_value > 0 else None
    checked = AnomalyDataset([ImageRecord(p, 0, None, PREDICT_CLASS, "unknown", "test") for p in files],
                             cfg.image_size, loaded.backbone.mean, loaded.backbone.std,
                             on_error=on_error or cfg.data.on_error, progress=progress)
    kept = checked.records
    results = []
    for start in tqdm(range(0, len(kept), PREDICT_CHUNK), desc="predict", unit="chunk",
                      disable=not progress or len(kept) <= PREDICT_CHUNK):
        dataset = AnomalyDataset(kept[start:start + PREDICT_CHUNK], cfg.image_size, loaded.backbone.mean,
                                 loaded.backbone.std, progress=False)
        maps = compute_maps(loaded, dataset, progress=False, use_cache=False)
        smoothed, scores = postprocess(maps, protocol, [image_size_of(r.path) for r in dataset.records])
        images = [load_rgb(r, None if protocol == "strict" else cfg.image_size) for r in dataset.records]
        heatmaps = save_heatmap_overlays(os.path.join(out_dir, HEATMAP_DIR), images, list(smoothed),
                                         [name_of[r.path] for r in dataset.records],
                                         vmin=0.0 if vmax else None, vmax=vmax, scores=list(scores),
                                         progress=False)
        results += [{"path": r.path, "score": float(s), "anomalous": bool(s > threshold_value),
                     "heatmap": str(h)} for r, s, h in zip(dataset.records, scores, heatmaps)]
    summary = {"checkpoint": loaded.path, "threshold": threshold_value, "threshold_source": source,
               "protocol": protocol, "skipped_images": checked.skipped_paths, "images": results}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "threshold", "anomalous", "heatmap"])
    for row in results:
        writer.writerow([row["path"], repr(row["score"]), repr(threshold_value), int(row["anomalous"]),
                         row["heatmap"]])
    atomic_write_text(os.path.join(out_dir, RESULTS_JSON), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(os.path.join(out_dir, RESULTS_CSV), buffer.getvalue())
    write_predict_report(out_dir, summary, cfg)
    return results
