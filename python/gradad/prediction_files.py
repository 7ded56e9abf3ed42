"""The files of a predict run, written the same way by gradad's torch side (gradad.report.runs,
from a checkpoint) and by the torch-free predict of an exported model (gradad.deploy): needs
the standard library only.

- results.json: checkpoint, threshold, threshold_source, protocol, on_error, skipped_images,
  failed_images, images: [{path, score, anomalous, heatmap}];
- results.csv: path, score, threshold, anomalous, heatmap (one row per scored image);
- report.html (gradad.html_page): the heatmaps by score with their decisions, the images left
  out, and the run's config (or the exported model's metadata).

The heatmap PNGs, one per image under heatmaps/, are drawn by the caller, named with
:func:`file_stem` and :func:`unique_names`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence

from .html_page import write_page
from .io_utils import atomic_write_text

RESULTS_JSON, RESULTS_CSV, HEATMAP_DIR = "results.json", "results.csv", "heatmaps"


def file_stem(*parts: str) -> str:
    """A file-name-safe stem from parts (letters, digits, '-', '_' and '.')."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-.") or "x" for p in parts)


def unique_names(names: Sequence[str], seen: Dict[str, int] | None = None) -> List[str]:
    """``names`` with a _1, _2, ... suffix on repeats, so each can be a file name. ``seen``
    (name → uses so far) carries the count across calls, for names that come in chunks."""
    seen = {} if seen is None else seen
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


def write_prediction_files(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, object]], *, checkpoint: str,
                           threshold: float, threshold_source: str, protocol: str, on_error: str,
                           skipped: Sequence[str], failed: Mapping[str, str], config_text: Optional[str] = None,
                           config_title: str = "Config") -> None:
    """Write results.json, results.csv and report.html into ``out_dir`` (which holds the
    heatmaps already). ``rows``: one {path, score, anomalous, heatmap} per scored image;
    ``skipped``: images that could not be read; ``failed``: {image: error} for images that
    failed while scored; ``config_text`` is shown under ``config_title`` on the page."""
    out_dir = os.fspath(out_dir)
    rows = [dict(row) for row in rows]
    summary = {"checkpoint": checkpoint, "threshold": threshold, "threshold_source": threshold_source,
               "protocol": protocol, "on_error": on_error, "skipped_images": list(skipped),
               "failed_images": dict(failed), "images": rows}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "threshold", "anomalous", "heatmap"])
    for row in rows:
        writer.writerow([row["path"], repr(row["score"]), repr(threshold), int(row["anomalous"]), row["heatmap"]])
    atomic_write_text(os.path.join(out_dir, RESULTS_JSON), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(os.path.join(out_dir, RESULTS_CSV), buffer.getvalue())
    gallery = [{"name": os.path.basename(row["path"]), "image": row["heatmap"], "score": row["score"],
                "label": None, "detail": row["path"]} for row in rows]
    write_page(out_dir, title="gradad predict", threshold=threshold, threshold_source=threshold_source,
               gallery=gallery, config_text=config_text, config_title=config_title,
               notes=[f"left out (unreadable or not scorable): {path}" for path in [*skipped, *failed]])
