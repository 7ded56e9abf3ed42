"""``gradad predict IMAGES --checkpoint model.onnx|model.xml``: the predict run of an exported model
with numpy, Pillow and onnxruntime / OpenVINO only (no torch, no compiled extension).

It writes the files of gradad's torch-side predict, with the same writer
(gradad.prediction_files: results.json, results.csv and report.html, whose last section shows
the model's metadata), and heatmaps/<stem>.png: the image | its heatmap over it, drawn with
Pillow on one colour scale, 0 to twice the threshold.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..image_files import IMAGE_EXTENSIONS, ON_ERROR_CHOICES, collect_images
from ..io_utils import atomic_write_bytes
from ..prediction_files import HEATMAP_DIR, file_stem, unique_names, write_prediction_files
from .images import heatmap_overlay, load_image
from .scorer import Scorer

__all__ = ["IMAGE_EXTENSIONS", "ON_ERROR_CHOICES", "LightPrediction", "collect_images", "heatmap_png",
           "predict_files"]

def heatmap_png(rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> bytes:
    """PNG bytes of the image (H, W, 3) uint8 beside its map (H, W) drawn over it (colour scale
    vmin..vmax, :func:`gradad.deploy.images.heatmap_overlay`)."""
    _, overlay = heatmap_overlay(rgb, amap, vmin, vmax)
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([rgb, overlay], axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class LightPrediction:
    """A finished light predict run: one row per scored image (path, score, anomalous,
    heatmap), the unreadable images, the ones that failed while scored, and the threshold."""

    rows: list
    threshold: float
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)

    @property
    def problems(self) -> list:
        """The images left out, in the order they were met."""
        return self.skipped + list(self.failed)


def predict_files(model_path: str, images, out_dir: str, *, threshold: float | None = None,
                  backend: str = "auto", on_error: str = "raise", batch_size: int = 8) -> LightPrediction:
    """Scores image files / folders with an exported model and writes results.json,
    results.csv, heatmaps/ and report.html to ``out_dir`` (see the module docstring). An unreadable image is
    left out with a warning and the others are still scored; ``on_error`` says whether the
    caller should then fail the run."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
    scorer = Scorer(model_path, backend=backend, threshold=threshold)
    files = collect_images(images)
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, HEATMAP_DIR), exist_ok=True)
    vmax = 2 * scorer.threshold if scorer.threshold > 0 else None
    result = LightPrediction([], scorer.threshold)
    seen: dict = {}
    for start in range(0, len(files), batch_size):
        part, rgbs = [], []
        for path in files[start:start + batch_size]:
            try:
                rgbs.append(load_image(path, "image"))
                part.append(path)
            except (OSError, ValueError, TypeError) as error:
                warnings.warn(f"cannot read image {path}: {error}; left out")
                result.skipped.append(path)
        for path, rgb in zip(part, rgbs):
            try:
                (pred,) = scorer.predict([rgb], original_size=True)
            except (OSError, ValueError, RuntimeError) as error:
                result.failed[path] = f"{type(error).__name__}: {error}"
                warnings.warn(f"cannot score image {path}: {error}; left out")
                continue
            lo, hi = (0.0, vmax) if vmax else (float(pred.anomaly_map.min()), float(pred.anomaly_map.max()))
            stem = unique_names([file_stem(os.path.splitext(os.path.basename(path))[0])], seen)[0]
            heatmap = os.path.join(out_dir, HEATMAP_DIR, stem + ".png")
            atomic_write_bytes(heatmap, heatmap_png(rgb, pred.anomaly_map, lo, hi))
            result.rows.append({"path": path, "score": pred.score, "anomalous": pred.anomalous, "heatmap": heatmap})
    meta = scorer.metadata
    write_prediction_files(out_dir, result.rows, checkpoint=os.fspath(model_path), threshold=scorer.threshold,
                           threshold_source="given" if threshold is not None
                           else meta.get("threshold_source", "metadata"),
                           protocol=meta.get("protocol", "strict"), on_error=on_error, skipped=result.skipped,
                           failed=result.failed, config_text=json.dumps(meta, indent=2), config_title="Model")
    return result
