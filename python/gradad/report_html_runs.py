"""report.html for the ``test`` / ``demo`` and ``predict`` commands: what each run already has
(records, scores, the checkpoint's threshold, the heatmap files, the config), turned into the
plain inputs of :func:`gradad.report_html.write_report_html`.

Kept apart from gradad.inference so that the commands call it in one line each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from .config import Config, config_to_dict
from .report_html import write_report_html


def _config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def _validation_threshold(checkpoint: Mapping[str, object], protocol: str) -> Tuple[Optional[float], Optional[str]]:
    """The threshold stored at training time, or None when there is none or it was chosen
    under another evaluation protocol (its scores would not be comparable)."""
    validation = checkpoint.get("validation")
    if not validation or validation.get("protocol") != protocol:
        return None, None
    return float(validation["threshold"]), f"validation quantile {validation['quantile']}"


def write_test_report(out_dir: str | os.PathLike, models: Mapping[Optional[str], object], cfg: Config,
                      results: Mapping[str, Mapping[str, Optional[float]]], records: Sequence[object],
                      scores: np.ndarray, shown: Sequence[int], heatmaps: Sequence[str | os.PathLike]) -> Path:
    """report.html of a test run (gradad.inference.run_test).

    models: {None: model} or {class: model} (objects with a ``checkpoint`` dict, as LoadedModel);
    results: the metrics per class and 'mean'; records: the ImageRecords scored, in the order of
    ``scores`` (N,); shown: indices into records of the saved heatmap overlays, heatmaps: their
    PNG paths (same length).
    The decision threshold is each checkpoint's validation threshold when it was chosen under
    cfg.eval.protocol. Returns the page's path.
    """
    if len(shown) != len(heatmaps):
        raise ValueError(f"shown and heatmaps must have the same length, got {len(shown)} and {len(heatmaps)}")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.array([r.label for r in records])
    by_class: Dict[str, list] = {}
    for i, record in enumerate(records):
        by_class.setdefault(record.class_name, []).append(i)
    roc = {name: (labels[idx], scores[idx]) for name, idx in by_class.items() if 0 < labels[idx].sum() < len(idx)}
    if None in models:
        threshold, source = _validation_threshold(models[None].checkpoint, cfg.eval.protocol)
    else:
        found = {name: _validation_threshold(m.checkpoint, cfg.eval.protocol) for name, m in models.items()}
        threshold = {name: value for name, (value, _) in found.items()}
        sources = {s for _, s in found.values() if s is not None}
        source = sources.pop() if len(sources) == 1 else None
    gallery = [{"name": os.path.basename(records[i].path), "image": path, "score": float(scores[i]),
                "label": int(records[i].label), "class": records[i].class_name,
                "detail": records[i].defect_type} for i, path in zip(shown, heatmaps)]
    return write_report_html(out_dir, title=f"gradad test: {cfg.data.dataset}", metrics=results, roc=roc,
                             threshold=threshold, threshold_source=source, gallery=gallery,
                             config=_config_yaml(cfg))


def write_predict_report(out_dir: str | os.PathLike, summary: Mapping[str, object], cfg: Config) -> Path:
    """report.html of a predict run (gradad.inference.predict) from its results.json summary
    (threshold, threshold_source, images: [{path, score, heatmap}]). Labels are unknown, so
    there are no metrics and no ROC. Returns the page's path."""
    gallery = [{"name": os.path.basename(row["path"]), "image": row["heatmap"], "score": row["score"],
                "label": None, "detail": row["path"]} for row in summary["images"]]
    return write_report_html(out_dir, title="gradad predict", threshold=summary["threshold"],
                             threshold_source=summary.get("threshold_source"), gallery=gallery,
                             config=_config_yaml(cfg))
