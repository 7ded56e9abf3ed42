"""Metrics as text and files: the printed table, metrics.json and metrics.csv."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Mapping

from ..evaluation import MEAN_KEY
from ..io_utils import atomic_write_text
from ..metrics import METRIC_KEYS
from ..operating_points import ALL_KEY, TARGET_FPRS

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"

Results = Mapping[str, Mapping[str, "float | None"]]
COUNT_KEYS = ("tp", "fp", "tn", "fn", "precision", "recall", "fpr")
# metrics.csv's operating-point columns (see write_metrics): the stored threshold with its counts
# and rates on the test split, per target FPR the threshold from the validation normals with
# the recall and FPR it gives on the test split, and the F1-max threshold tuned on the test split.
OPERATING_POINT_COLUMNS = (
    ("stored_threshold", *(f"stored_{k}" for k in COUNT_KEYS))
    + tuple(f"val_fpr_{t:g}_{k}" for t in TARGET_FPRS for k in ("threshold", "test_recall", "test_fpr"))
    + ("f1max_threshold_tuned_on_test",))


def _cell(value: object) -> str:
    """A CSV cell: '' for None or a per-class {class: threshold} map, ints as ints, floats by repr."""
    if value is None or isinstance(value, Mapping):
        return ""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(float(value))


def _operating_point_cells(record: Mapping[str, object] | None) -> list[str]:
    """The OPERATING_POINT_COLUMNS cells of one record of gradad.operating_points.operating_points."""
    if record is None:
        return [""] * len(OPERATING_POINT_COLUMNS)
    stored = record.get("stored") or {}
    cells = [_cell(stored.get("threshold"))] + [_cell(stored.get(k)) for k in COUNT_KEYS]
    targets = list(record.get("targets") or [])
    for i in range(len(TARGET_FPRS)):
        entry = (targets[i] if i < len(targets) else None) or {}
        cells += [_cell(entry.get("threshold")), _cell(entry.get("recall")), _cell(entry.get("fpr"))]
    return cells + [_cell((record.get("f1_max") or {}).get("threshold"))]


def _ordered_rows(results: Results) -> list[str]:
    """Class names in their given order, the mean last; checks that every row has all metrics."""
    for name, row in results.items():
        missing = [key for key in METRIC_KEYS if key not in row]
        if missing:
            raise ValueError(f"results[{name!r}] lacks the metrics {missing}")
    return [n for n in results if n != MEAN_KEY] + ([MEAN_KEY] if MEAN_KEY in results else [])


def format_table(results: Results) -> str:
    """A plain-text table: one row per class then 'mean', one column per metric.

    Args: results, {class: {metric key: float or None}} as returned by ``evaluation.evaluate``.
    Returns: the table; values in percent with one decimal, 'n/a' for None.
    """
    header = ["class", *METRIC_KEYS]
    rows = [[name] + ["n/a" if results[name][key] is None else f"{100.0 * results[name][key]:.1f}"
                      for key in METRIC_KEYS] for name in _ordered_rows(results)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def pixel_notes(pixel_masks: Mapping[str, tuple]) -> list[str]:
    """One line per kind of class whose pixel metrics do not cover all its anomalous images:
    none of them has a mask (pixel metrics n/a), or only some have (metrics of that subset).

    Args: pixel_masks, {class: (anomalous images with a mask, anomalous images)}.
    """
    without = [name for name, (masked, _) in pixel_masks.items() if masked == 0]
    notes = []
    if without:
        notes.append(f"pixel metrics n/a: no masks for {', '.join(repr(n) for n in without)}")
    for name, (masked, anomalous) in pixel_masks.items():
        if 0 < masked < anomalous:
            notes.append(f"pixel metrics of {name!r}: the masked subset, {masked} of its {anomalous} anomalous "
                         f"images (with every normal image)")
    return notes


def write_metrics(out_dir: str | os.PathLike, results: Results,
                  extra: Mapping[str, object] | None = None,
                  operating_points: Mapping[str, Mapping[str, object]] | None = None) -> tuple[Path, Path]:
    """Write metrics.json ({**extra, 'results': results}) and metrics.csv into ``out_dir``.

    The CSV has the header ``class,<METRIC_KEYS>``, one row per class then 'mean', values as
    fractions, empty cells for None. Both texts are built (NaN rejected) before anything is
    written; each file is written atomically. Returns (json path, csv path).

    operating_points: {class: record, ..., 'all': record} of
    :func:`gradad.operating_points.operating_points`, or None (the files are then as without
    it). Given, metrics.json holds it under 'operating_points' and the CSV gets the
    OPERATING_POINT_COLUMNS: stored_threshold and stored_tp/fp/tn/fn/precision/recall/fpr (the
    stored threshold on the test split); per target FPR t of TARGET_FPRS,
    val_fpr_<t>_threshold (from the validation normals) and val_fpr_<t>_test_recall /
    val_fpr_<t>_test_fpr (what it gives on the test split); f1max_threshold_tuned_on_test (the
    F1-max threshold, tuned on the test split itself). A class row holds its class's record;
    the 'mean' row holds the pooled 'all' record (every test image, each judged by its own
    class's thresholds), not a mean over classes. A threshold that differs between classes (the
    'all' record of a per-class run) is an empty cell, like None.
    """
    extra = dict(extra or {})
    if "results" in extra:
        raise ValueError("extra must not contain the key 'results' (it holds the metrics)")
    if operating_points is not None and "operating_points" in extra:
        raise ValueError("extra must not contain the key 'operating_points' when operating_points is given")
    names = _ordered_rows(results)
    payload = {**extra, "results": {name: dict(results[name]) for name in names}}
    if operating_points is not None:
        payload["operating_points"] = {name: operating_points[name] for name in operating_points}
    json_text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *METRIC_KEYS, *(OPERATING_POINT_COLUMNS if operating_points is not None else ())])
    for name in names:
        points = [] if operating_points is None else _operating_point_cells(
            operating_points.get(ALL_KEY if name == MEAN_KEY else name))
        writer.writerow([name] + ["" if results[name][k] is None else repr(float(results[name][k]))
                                  for k in METRIC_KEYS] + points)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return (atomic_write_text(out_dir / METRICS_JSON, json_text),
            atomic_write_text(out_dir / METRICS_CSV, buffer.getvalue()))


