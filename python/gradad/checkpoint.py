"""The checkpoint file of a trained (or training) GRAD: its format, how it is written and read,
and the config checks of resuming from one or loading one for inference.

A checkpoint holds the GRAD weights (never the backbone's), the full config, library versions
and the backbone's ``weights_id``, and, while training, optimizer, scheduler and RNG state; it
is written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import os
import platform
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import grad_ext

from . import __version__
from .backbones import FeatureExtractor
from .config import Config, config_from_dict, config_to_dict
from .io_utils import atomic_write_bytes
from .runtime import rng_state

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KIND = "gradad-grad-checkpoint"
# 2: the training split is the config's split section (1 kept it beside the config).
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# Config fields that may differ between an interrupted run and its resumption: they change
# neither the model nor the order of the training samples.
RESUMABLE_CHANGES = ("train.epochs", "bigrid.abnormal_epochs", "bigrid.normal_epochs", "bigrid.cycles",
                     "train.device", "train.num_workers", "output_dir")
# Config keys a test/predict run must keep as the checkpoint has them: they shape the model.
MODEL_KEYS = ("model.",)
# convergence_note: the largest relative change of the validation normals' median score over the
# last epoch of a settled run. On the ELPV demo (lite-demo, 40 validation normals) the median
# moved by 83%, 65%, 13%, 7%, 7%, 6%, 4%, 4% and 0.6% in epochs 2 to 10; 3 epochs give image
# AUROC 0.88, the preset's 10 give 0.90. (The threshold, a high quantile of few scores, is noisier.)
SCORE_DRIFT_LIMIT = 0.05
# The bigrid keys that shape a Bi-Grid model (the schedule keys do not).
BIGRID_KEYS = ("bigrid.abnormal_branch", "bigrid.combine", "bigrid.mix_lambda", "bigrid.standardize_eps")


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a checkpoint (or report) was written with."""
    return {"gradad": __version__, "grad_ext": str(grad_ext.__version__), "torch": str(torch.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


def checkpoint_payload(cfg: Config, model: torch.nn.Module, backbone: FeatureExtractor, epoch: int,
                       optimizer: torch.optim.Optimizer, scheduler, losses: Sequence[float],
                       validation: Optional[Dict[str, object]], complete: bool,
                       class_names: Sequence[str] = (),
                       validation_history: Sequence[Dict[str, object]] = ()) -> Dict[str, object]:
    """The dict :func:`save_checkpoint` writes after ``epoch`` epochs (``complete`` once the
    whole plan is trained, with the ``validation`` summary of the threshold); ``class_names``
    are the categories of the training images (sorted); ``validation_history`` holds the
    validation normals' score statistics after each epoch (:func:`validation_statistics`)."""
    return {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(cfg),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "in_channels": model.in_channels,
        "feature_size": model.feature_size,
        "image_size": cfg.image_size,
        "backbone": {"name": backbone.name, "weights_id": backbone.weights_id,
                     "out_channels": backbone.out_channels, "mean": list(backbone.mean),
                     "std": list(backbone.std)},
        "versions": library_versions(),
        "epoch": epoch,
        "complete": complete,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "epoch_losses": list(losses),
        "validation": validation,
        "class_names": sorted({str(c) for c in class_names}),
        "validation_history": [dict(entry) for entry in validation_history],
    }


def threshold_rule(validation: Dict[str, object]) -> str:
    """Where a checkpoint's stored threshold came from, in words: 'validation quantile 0.99' or
    'target FPR 1% of 40 validation normals'."""
    target = validation.get("target_fpr")
    if target is not None:
        return f"target FPR {100 * target:g}% of {len(validation['scores'])} validation normals"
    return f"validation quantile {validation['quantile']}"


def validation_statistics(epoch: int, scores: Sequence[float], threshold: float) -> Dict[str, object]:
    """One entry of a checkpoint's validation_history: after ``epoch`` epochs, the validation
    normals' image scores summarised (count, median, mean, max) with the decision threshold
    they would give."""
    values = np.asarray(scores, dtype=np.float64)
    return {"epoch": int(epoch), "count": int(values.size), "median": float(np.median(values)),
            "mean": float(values.mean()), "max": float(values.max()), "threshold": float(threshold)}


def convergence_note(history: Sequence[Dict[str, object]], limit: float = SCORE_DRIFT_LIMIT) -> Optional[str]:
    """A warning when the validation normals' scores were still moving at the end of training,
    else None (also None with fewer than two epochs of history).

    The measure is the relative change of their median score over the last epoch,
    |m_E - m_(E-1)| / |m_E|: a threshold taken from scores that are still falling (or rising)
    does not yet mean what it says about false alarms. ``limit`` is the largest change accepted."""
    if len(history) < 2:
        return None
    last, previous = history[-1], history[-2]
    drift = abs(last["median"] - previous["median"]) / max(abs(last["median"]), 1e-12)
    if drift <= limit:
        return None
    return (f"under-trained? the validation normals' median score still moved by {100 * drift:.1f}% in the last "
            f"epoch ({previous['median']:.4g} after epoch {previous['epoch']}, {last['median']:.4g} after epoch "
            f"{last['epoch']}; settled runs move less than {100 * limit:g}%): train more epochs (train.epochs) "
            f"before trusting the threshold and the scores")


def save_checkpoint(path: str | os.PathLike, payload: Dict[str, object]) -> str:
    """Serialise ``payload`` in memory, then write it atomically (temp file + os.replace), so
    an interruption leaves the previous checkpoint or none, never a partial file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return os.fspath(path)


def read_checkpoint(path: str | os.PathLike) -> Dict[str, object]:
    """Load a gradad checkpoint file (or the checkpoint.pt of a run folder) onto the CPU;
    clear errors for a missing file, a file that is not a gradad checkpoint, or one of an
    unknown format version. Format 1's separate split options become the config's section."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors come in many types
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a gradad GRAD checkpoint (no kind={CHECKPOINT_KIND!r})")
    if payload.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path} has checkpoint format {payload.get('format')!r}; this gradad "
                         f"{__version__} reads formats {list(READABLE_FORMATS)}")
    if payload["format"] == 1:
        payload["config"]["split"] = payload.pop("split")
        payload["format"] = CHECKPOINT_FORMAT
    payload["path"] = path
    return payload


def trained_class_names(checkpoint: Dict[str, object], cfg: Config) -> List[str]:
    """The categories the checkpoint's model was trained on: recorded since class_names was
    added to the payload; for older checkpoints, the config's data.classes (empty for a run
    on all classes)."""
    recorded = checkpoint.get("class_names")
    if recorded:
        return [str(c) for c in recorded]
    return [str(c) for c in cfg.data.classes or []]


def checkpoint_config(path: str | os.PathLike) -> Config:
    """The Config stored in a checkpoint file (or run folder holding checkpoint.pt)."""
    return config_from_dict(read_checkpoint(path)["config"])


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


def flatten_config(values: Dict[str, object], prefix: str = "") -> Dict[str, object]:
    """{'model': {'fusion': 'crad'}} → {'model.fusion': 'crad'}."""
    flat: Dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(stored: Dict[str, object], current: Dict[str, object],
                       prefixes: Sequence[str] = ("",), ignore: Sequence[str] = ()) -> List[str]:
    """'key: stored → current' for every flattened config key under one of ``prefixes`` whose
    values differ (keys in ``ignore`` skipped)."""
    stored_flat, current_flat = flatten_config(stored), flatten_config(current)
    keys = sorted(set(stored_flat) | set(current_flat))
    return [f"{key}: checkpoint {stored_flat.get(key)!r}, now {current_flat.get(key)!r}" for key in keys
            if key.startswith(tuple(prefixes)) and key not in ignore
            and stored_flat.get(key) != current_flat.get(key)]


def check_resumable(stored: Dict[str, object], cfg: Config, backbone: FeatureExtractor) -> None:
    """ValueError unless a training of ``cfg`` with ``backbone`` may continue from ``stored``:
    the configs may differ only in :data:`RESUMABLE_CHANGES`, the backbone weights not at all."""
    path = stored["path"]
    differences = config_differences(stored["config"], config_to_dict(cfg), ignore=RESUMABLE_CHANGES)
    if differences:
        raise ValueError(f"cannot resume from {path}: its config differs from this run's in "
                         f"{'; '.join(differences)}")
    if stored["backbone"]["weights_id"] != backbone.weights_id:
        raise ValueError(f"cannot resume from {path}: its backbone weights are "
                         f"{stored['backbone']['weights_id']!r}, this run loaded {backbone.weights_id!r}")


def check_fits(stored: Dict[str, object], cfg: Config) -> None:
    """ValueError listing the differences unless ``cfg`` builds the model ``stored`` holds (its
    model section, the shaping Bi-Grid keys and the image size)."""
    keys = MODEL_KEYS + (BIGRID_KEYS if cfg.model.architecture == "bigrid" else ())
    differences = config_differences(stored["config"], config_to_dict(cfg), prefixes=keys)
    if cfg.image_size != stored["image_size"]:
        differences.append(f"image size: checkpoint {stored['image_size']}, now {cfg.image_size}")
    if differences:
        raise ValueError(f"checkpoint {stored['path']} does not fit this config: {'; '.join(differences)}")
