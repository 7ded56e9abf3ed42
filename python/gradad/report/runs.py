"""The files of a test run and of a predict run, from what :mod:`gradad.inference` returns.

- test: metrics.json / metrics.csv (with the operating points of gradad.operating_points),
  scores.csv (path, class, defect type, label, image score), roc_curves.png (the stored
  threshold marked), heatmap overlays in heatmaps/, and report.html;
- predict: one heatmap per image in heatmaps/, results.json, results.csv and report.html.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Sequence

import numpy as np

from ..config import config_to_yaml
from ..datasets import ImageRecord, load_rgb
from ..inference import Prediction, TestResult
from ..io_utils import atomic_write_text
from ..operating_points import operating_points
from ..prediction_files import HEATMAP_DIR, file_stem, unique_names, write_prediction_files
from .figures import save_heatmap_overlays, save_roc_curves
from .html import write_report_html
from .tables import pixel_notes, write_metrics

SCORES_CSV = "scores.csv"


def _write_scores_csv(path: str, records: Sequence[ImageRecord], scores: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "defect_type", "label", "score"])
    for record, score in zip(records, scores):
        writer.writerow([record.path, record.class_name, record.defect_type, record.label, repr(float(score))])
    atomic_write_text(path, buffer.getvalue())
    return path


def write_test_report(result: TestResult, out_dir: str | os.PathLike, progress: bool = True) -> List[str]:
    """Write the files of a test run into ``out_dir``; returns their paths."""
    out_dir = os.fspath(out_dir)
    records, scores = result.records, result.scores
    labels = np.array([r.label for r in records])
    points = operating_points(labels, scores, [r.class_name for r in records], result.threshold,
                              result.threshold_source, result.validation_scores)
    files = [str(p) for p in write_metrics(out_dir, result.results, result.info, points)]
    files.append(_write_scores_csv(os.path.join(out_dir, SCORES_CSV), records, scores))
    by_class: Dict[str, List[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(record.class_name, []).append(i)
    roc_classes = {name: (labels[idx], scores[idx]) for name, idx in by_class.items()
                   if 0 < labels[idx].sum() < len(idx)}
    if roc_classes:
        files.append(str(save_roc_curves(out_dir, roc_classes, result.threshold)))
    gallery = []
    if result.heatmaps:
        shown = list(result.heatmaps)
        images, names = [], []
        for i in shown:
            amap = result.heatmaps[i]
            images.append(load_rgb(records[i], None if amap.shape == result.image_sizes[i] else amap.shape))
            names.append(file_stem(records[i].class_name, records[i].defect_type,
                                   os.path.splitext(os.path.basename(records[i].path))[0]))
        paths = save_heatmap_overlays(os.path.join(out_dir, HEATMAP_DIR), images,
                                      [result.heatmaps[i] for i in shown], unique_names(names),
                                      scores=[scores[i] for i in shown], progress=progress)
        files += [str(p) for p in paths]
        gallery = [{"name": os.path.basename(records[i].path), "image": path, "score": float(scores[i]),
                    "label": int(records[i].label), "class": records[i].class_name, "detail": records[i].defect_type}
                   for i, path in zip(shown, paths)]
    files.append(str(write_report_html(
        out_dir, title=f"gradad test: {result.config.data.dataset}", metrics=result.results, roc=roc_classes,
        threshold=result.threshold, threshold_source=result.threshold_source, gallery=gallery,
        config=config_to_yaml(result.config), operating_points=points,
        notes=pixel_notes(result.pixel_masks) + list(result.info.get("training_notes", [])))))
    return files


def write_predictions(prediction: Prediction, out_dir: str | os.PathLike,
                      config_yaml: str | None = None) -> List[Dict[str, object]]:
    """Consume ``prediction``'s chunks, writing heatmaps/<stem>.png per image as each chunk is
    scored, then results.json (with the images left out: unreadable ones under
    skipped_images, ones that failed while scored under failed_images), results.csv and
    report.html (with ``config_yaml``, the run's config, when given).
    Returns one dict per scored image: path, score, anomalous, heatmap.

    Heatmaps share one colour scale, 0 to twice the threshold, so colours past the middle of
    the scale mark regions whose value exceeds the decision threshold."""
    out_dir = os.fspath(out_dir)
    threshold = prediction.threshold
    vmax = 2 * threshold if threshold > 0 else None
    used: Dict[str, int] = {}
    results: List[Dict[str, object]] = []
    for chunk in prediction.chunks:
        names = unique_names([file_stem(os.path.splitext(os.path.basename(r.path))[0]) for r in chunk.records], used)
        size = None if prediction.protocol == "strict" else prediction.image_size
        images = [load_rgb(r, size) for r in chunk.records]
        heatmaps = save_heatmap_overlays(os.path.join(out_dir, HEATMAP_DIR), images, chunk.maps, names,
                                         vmin=0.0 if vmax else None, vmax=vmax, scores=list(chunk.scores),
                                         progress=False)
        results += [{"path": r.path, "score": float(s), "anomalous": bool(s > threshold), "heatmap": str(h)}
                    for r, s, h in zip(chunk.records, chunk.scores, heatmaps)]
    write_prediction_files(out_dir, results, checkpoint=prediction.checkpoint, threshold=threshold,
                           threshold_source=prediction.threshold_source, protocol=prediction.protocol,
                           on_error=prediction.on_error, skipped=prediction.skipped, failed=prediction.failed,
                           config_text=config_yaml)
    return results
