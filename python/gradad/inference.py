"""Using a trained GRAD checkpoint: load it, evaluate it on a test split, score new images.
Nothing here writes files: :mod:`gradad.report` turns what these functions return into files.

- :func:`load_model`: checkpoint → GRAD + frozen backbone, refusing a checkpoint that does not
  fit the config (other backbone, weights, channels, input size or model settings).
- :func:`run_test`: anomaly maps of a dataset's test split, the docs/method.md §5 metrics per
  class and their mean, the image scores and the maps of the heatmaps to show.
- :func:`predict`: scores and decisions at the checkpoint's validation threshold for image
  files or folders, in chunks (so memory does not grow with the number of images).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import FeatureExtractor, build_backbone
from .checkpoint import (
    check_fits,
    convergence_note,
    find_checkpoints,
    library_versions,
    read_checkpoint,
    threshold_rule,
)
from .config import Config, config_from_dict
from .datasets import ON_ERROR_CHOICES, AnomalyDataset, ImageRecord, load_mask
from .datasets.image_io import image_size_of
from .evaluation import MEAN_KEY, EvalRecord, evaluate_class, mean_over_classes, postprocess
from .features import extract_features, feature_cache, score_features
from .image_files import collect_images
from .listings import config_listing
from .models.factory import build_model, model_feature_size, planned_epochs
from .models.grad import GRAD
from .operating_points import threshold_for_fpr
from .runtime import resolve_device

PREDICT_CLASS = "predict"
# predict scores images in chunks of this many, so memory does not grow with their number
PREDICT_CHUNK = 32


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


def load_model(path: str | os.PathLike, cfg: Optional[Config] = None, device: str = "auto") -> LoadedModel:
    """Load a checkpoint for inference.

    cfg: the config of this run (None: the checkpoint's own). Its model section and image size
    must equal the checkpoint's, and its backbone must load the same weights (weights_id);
    anything else raises ValueError listing the differences. device: 'auto', 'cpu', 'cuda[:N]'.
    """
    stored = read_checkpoint(path)
    where = stored["path"]
    cfg = config_from_dict(stored["config"]) if cfg is None else cfg
    check_fits(stored, cfg)
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


def load_run(path: str | os.PathLike, cfg: Optional[Config] = None,
             device: str = "auto") -> Dict[Optional[str], LoadedModel]:
    """:func:`load_model` for every checkpoint of a run, keyed as
    :func:`gradad.checkpoint.find_checkpoints`."""
    return {name: load_model(file, cfg, device) for name, file in find_checkpoints(path).items()}


def compute_maps(loaded: LoadedModel, dataset: AnomalyDataset, progress: bool = True,
                 use_cache: bool = True) -> torch.Tensor:
    """Anomaly maps of every image of ``dataset`` at the model's input size, (N, S, S) on the CPU.
    Features go through the config's feature cache when ``use_cache``."""
    cfg = loaded.config
    cache = feature_cache(cfg.data.cache, loaded.backbone, cfg.data.cache_dir) if use_cache else None
    features = extract_features(loaded.backbone, dataset, loaded.device, cfg.train.batch_size, cache,
                                progress, cfg.train.num_workers)
    return score_features(loaded.model, features, cfg.image_size, loaded.device, cfg.train.batch_size,
                          progress, desc="anomaly maps")


# ---------------------------------------------------------------------------------------------
# Test


@dataclass(frozen=True)
class TestResult:
    """What :func:`run_test` found.

    results: {class: {metric: float or None}, 'mean': ...} as gradad.evaluation.evaluate.
    records / image_sizes / scores: every scored test image, its (H, W) and its image score.
    heatmaps: {index into records: post-processed map} of the images chosen for heatmaps.
    pixel_masks: {class: (anomalous images with a mask, anomalous images)}: what the pixel
    metrics cover (gradad.evaluation.ClassEvaluation). threshold / threshold_source: the
    decision threshold stored at training time (per class for a per-class run; None where it
    was chosen under another protocol, see :func:`validation_threshold`). skipped: unreadable images left out
    (data.on_error='skip'). info: run facts for reports.
    """

    __test__ = False  # not a pytest test class

    results: Dict[str, Dict[str, Optional[float]]]
    records: List[ImageRecord]
    image_sizes: List[tuple]
    scores: np.ndarray
    heatmaps: Dict[int, np.ndarray]
    pixel_masks: Dict[str, tuple]
    threshold: Optional[float] | Dict[str, Optional[float]]
    threshold_source: Optional[str]
    skipped: List[str]
    config: Config
    info: Dict[str, object] = field(default_factory=dict)
    # the validation normals' image scores per model key ({None: [...]} for one model, {class:
    # [...]} per class); None where a checkpoint has none or scored them under another protocol
    validation_scores: Dict[Optional[str], Optional[List[float]]] = field(default_factory=dict)


def validation_threshold(checkpoint: Dict[str, object], protocol: str, quantile: Optional[float] = None,
                         target_fpr: Optional[float] = None) -> tuple[Optional[float], Optional[str]]:
    """(threshold, where it came from): the one stored at training time, or the ``quantile`` /
    ``target_fpr`` rule applied to the stored validation scores (:func:`decision_threshold`);
    (None, None) when there are none or they were scored under another evaluation protocol (not
    comparable)."""
    if comparable_validation(checkpoint, protocol) is None:
        return None, None
    return decision_threshold(checkpoint, quantile=quantile, target_fpr=target_fpr)


def comparable_validation(checkpoint: Dict[str, object], protocol: str) -> Optional[Dict[str, object]]:
    """The checkpoint's validation summary when its scores were taken under ``protocol``, else None."""
    validation = checkpoint.get("validation")
    return validation if validation and validation.get("protocol") == protocol else None


def heatmap_selection(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` images spread evenly over the score ranking (lowest to highest), so
    that clear normals, borderline cases and clear anomalies are all shown."""
    if count <= 0 or len(scores) == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(scores, kind="stable")
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return order[picks]


def _score_test_split(loaded: LoadedModel, cfg: Config, progress: bool):
    records = config_listing(cfg, "test")
    dataset = AnomalyDataset(records, cfg.image_size, loaded.backbone.mean, loaded.backbone.std,
                             on_error=cfg.data.on_error, progress=progress)
    return dataset.records, compute_maps(loaded, dataset, progress), dataset.skipped_paths


def run_test(models: LoadedModel | Mapping[Optional[str], LoadedModel], progress: bool = True,
             cfg: Optional[Config] = None, quantile: Optional[float] = None,
             target_fpr: Optional[float] = None) -> TestResult:
    """Evaluate on the test split of ``cfg.data`` (default: the first model's config).

    The decision threshold reported is each model's stored one, or the ``quantile`` or
    ``target_fpr`` rule (:func:`decision_threshold`) applied to its stored validation scores.

    models: one LoadedModel for all classes, or {class: LoadedModel} of a per-class run (each
    class's test images are scored by its own model; {None: model} means one for all).
    cfg.eval.heatmaps maps are kept, spread over each class's score ranking.
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
    results, scores, kept, pixel_masks = {}, np.zeros(len(records)), {}, {}
    for name, indices in tqdm(by_class.items(), desc=f"evaluate ({cfg.eval.protocol})", unit="class",
                              disable=not progress):
        class_records = [EvalRecord(name, records[i].label, maps[i], load_mask(records[i]), sizes[i])
                         for i in indices]
        evaluation = evaluate_class(name, class_records, cfg.eval.protocol)
        results[name], scores[indices] = evaluation.metrics, evaluation.scores
        pixel_masks[name] = (evaluation.masked, evaluation.anomalous)
        for pick in heatmap_selection(evaluation.scores, heatmaps_per_class):
            kept[indices[pick]] = evaluation.maps[pick]
    results[MEAN_KEY] = mean_over_classes(results)
    heatmaps = {i: kept[i] for i in sorted(kept)[:cfg.eval.heatmaps]}
    info = {"checkpoints": [m.path for m in models.values()], "protocol": cfg.eval.protocol,
            "dataset": cfg.data.dataset, "root": cfg.data.root, "classes": sorted(by_class), "images": len(records),
            "skipped_images": skipped, "seconds": round(time.perf_counter() - started, 2),
            "pixel_masks": {name: {"anomalous_with_mask": k, "anomalous": n} for name, (k, n) in pixel_masks.items()},
            "versions": library_versions(),
            "training_notes": [f"{name + ': ' if name else ''}{note}" for name, note in
                               ((name, convergence_note(m.checkpoint.get("validation_history") or []))
                                for name, m in models.items()) if note is not None]}
    found = {name: validation_threshold(m.checkpoint, cfg.eval.protocol, quantile, target_fpr)
             for name, m in models.items()}
    normals = {name: None if validation is None else [float(v) for v in validation["scores"]]
               for name, validation in ((name, comparable_validation(m.checkpoint, cfg.eval.protocol))
                                        for name, m in models.items())}
    sources = {source for _, source in found.values() if source is not None}
    threshold = found[None][0] if None in found else {name: value for name, (value, _) in found.items()}
    return TestResult(results, records, sizes, scores, heatmaps, pixel_masks, threshold,
                      sources.pop() if len(sources) == 1 else None, skipped, cfg, info, normals)


# ---------------------------------------------------------------------------------------------
# Predict


def decision_threshold(checkpoint: Dict[str, object], threshold: Optional[float] = None,
                       quantile: Optional[float] = None, target_fpr: Optional[float] = None) -> tuple[float, str]:
    """The score above which an image is called anomalous, and where it came from: an explicit
    ``threshold``; else ``quantile`` of the checkpoint's validation scores; else the threshold
    that lets at most ``target_fpr`` of them through (:func:`gradad.operating_points.threshold_for_fpr`);
    else the threshold stored at training time (by the run's own rule). At most one may be given."""
    given = [name for name, value in (("threshold", threshold), ("quantile", quantile), ("target_fpr", target_fpr))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one of threshold, quantile and target_fpr, not {' and '.join(given)}")
    if threshold is not None:
        return float(threshold), "given"
    validation = checkpoint.get("validation")
    if validation is None:
        raise ValueError(f"checkpoint {checkpoint['path']} has no validation scores (it was trained "
                         f"with split.val_fraction=0); pass a threshold explicitly")
    if quantile is not None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        return float(np.quantile(validation["scores"], quantile)), f"validation quantile {quantile}"
    if target_fpr is not None:
        if not 0.0 <= target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr!r}")
        return (float(threshold_for_fpr(validation["scores"], target_fpr)),
                threshold_rule({"target_fpr": target_fpr, "scores": validation["scores"]}))
    return float(validation["threshold"]), threshold_rule(validation)


@dataclass(frozen=True)
class PredictedChunk:
    """Up to PREDICT_CHUNK scored images: their records, post-processed maps (at the original
    resolution under 'strict', the model's under 'paper') and image scores (N,)."""

    records: List[ImageRecord]
    maps: List[np.ndarray]
    scores: np.ndarray


@dataclass
class Prediction:
    """A predict run: the decision rule and the images, scored lazily chunk by chunk.

    chunks: an iterator of :class:`PredictedChunk`, consumed once (by gradad.report). skipped:
    the files found unreadable before scoring; failed: {path: error} of readable-looking
    files that failed while scored, filled in as the chunks are consumed. Neither stops the
    others from being scored; on_error says whether the run then counts as failed ('raise')."""

    checkpoint: str
    threshold: float
    threshold_source: str
    protocol: str
    image_size: int
    on_error: str
    skipped: List[str]
    chunks: Iterator[PredictedChunk]
    failed: Dict[str, str] = field(default_factory=dict)

    @property
    def problems(self) -> List[str]:
        """The images left out, skipped or failed, in the order they were met."""
        return self.skipped + list(self.failed)


# What scoring one image can raise for a file whose header looked fine: its pixels cannot be
# decoded (truncated data, an unsupported mode), or it holds something the model cannot take.
SCORING_ERRORS = (OSError, ValueError, RuntimeError)


def predict(loaded: LoadedModel, paths: Sequence[str | os.PathLike], threshold: Optional[float] = None,
            quantile: Optional[float] = None, on_error: Optional[str] = None, target_fpr: Optional[float] = None,
            progress: bool = True) -> Prediction:
    """Score image files / folders with a trained model.

    Decision: score > threshold (see :func:`decision_threshold`), with the image score of the
    protocol the threshold was chosen under. Images of any size and mode Pillow reads are
    scored; one that cannot be read or scored is left out with a warning and every other
    image is still scored. on_error ('raise' or 'skip'; default: the config's data.on_error)
    says whether leaving one out fails the run (see gradad.report.write_predictions).
    """
    cfg = loaded.config
    on_error = on_error or cfg.data.on_error
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
    threshold_value, source = decision_threshold(loaded.checkpoint, threshold, quantile, target_fpr)
    validation = loaded.checkpoint.get("validation")
    protocol = validation["protocol"] if validation is not None else cfg.eval.protocol
    if threshold is None and protocol != cfg.eval.protocol:
        raise ValueError(f"the checkpoint's threshold was chosen under eval.protocol={protocol!r}, "
                         f"this run asks for {cfg.eval.protocol!r}; pass a threshold explicitly")
    files = collect_images(paths)
    records = [ImageRecord(p, 0, None, PREDICT_CLASS, "unknown", "test") for p in files]
    skipped: List[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each skipped file is warned about once, below
        try:
            checked = AnomalyDataset(records, cfg.image_size, loaded.backbone.mean, loaded.backbone.std,
                                     on_error="skip", progress=progress)
            kept, skipped = checked.records, checked.skipped_paths
        except ValueError:  # every file was unreadable
            kept, skipped = [], list(files)
    for path in skipped:
        warnings.warn(f"cannot read image {path}: left out")

    def score(chunk_records: List[ImageRecord]) -> PredictedChunk:
        dataset = AnomalyDataset(chunk_records, cfg.image_size, loaded.backbone.mean, loaded.backbone.std,
                                 progress=False)
        maps = compute_maps(loaded, dataset, progress=False, use_cache=False)
        smoothed, scores = postprocess(maps, protocol, [image_size_of(r.path) for r in dataset.records])
        return PredictedChunk(list(dataset.records), list(smoothed), scores)

    def chunks() -> Iterator[PredictedChunk]:
        for start in tqdm(range(0, len(kept), PREDICT_CHUNK), desc="predict", unit="chunk",
                          disable=not progress or len(kept) <= PREDICT_CHUNK):
            part = kept[start:start + PREDICT_CHUNK]
            try:
                yield score(part)
                continue
            except SCORING_ERRORS:
                pass  # find the image that failed: score this chunk's images one by one
            for record in part:
                try:
                    yield score([record])
                except SCORING_ERRORS as error:
                    prediction.failed[record.path] = f"{type(error).__name__}: {error}"
                    warnings.warn(f"cannot score image {record.path}: {error}; left out")

    prediction = Prediction(loaded.path, threshold_value, source, protocol, cfg.image_size, on_error, skipped,
                            chunks())
    return prediction
