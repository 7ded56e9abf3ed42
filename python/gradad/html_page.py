"""``report.html``: one page a person can open to see what a test, predict or demo run found.

The page holds the metrics table (one row per class, the mean last), the image-level ROC
curves, the decision threshold, the operating points of a test run (what the threshold costs
on the test split, the thresholds of target false-positive rates), a gallery of heatmap
overlays sorted by score (highest first) with each image's name, label and decision, and the
run's config.

This module needs the standard library only, so that the torch-free predict of an exported
model (gradad.deploy) writes the same page as the torch side (gradad.report.html, which
draws the ROC curves and dumps the config before calling :func:`write_page`). Inputs are
plain data (numbers, strings, lists, dicts, PNG bytes).

Images: the ROC plot is embedded as a base64 data URI, so it needs no file of its own; the
heatmap overlays are PNG files the run has already written into the same output folder and
are referenced by relative path. Embedding those would duplicate every overlay inside the
page, which for ``predict`` on a folder of thousands of images makes a page of hundreds of
megabytes; by relative path the folder (report.html with its heatmaps/) can be moved or
copied as a whole and still shows every image. No resource outside the folder is used (no
scripts, fonts or styles from the network).
"""
from __future__ import annotations

import base64
import html
import math
import numbers
import os
import urllib.parse
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .io_utils import atomic_write_text

REPORT_HTML = "report.html"
ANOMALOUS = "anomalous"
NORMAL = "normal"
NO_THRESHOLD = "no threshold"

Threshold = Union[None, float, Mapping[str, Optional[float]]]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; }
td.text { text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: 420px; border: 1px solid #ccc; padding: 0.4em; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9em; margin-top: 0.3em; word-break: break-all; }
.anomalous { color: #b00; font-weight: bold; }
.normal { color: #060; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
"""


def _text(value: object) -> str:
    """A user-given value as HTML text: every string that reaches the page goes through here."""
    return html.escape(str(value), quote=True)


def _finite(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return value


def _check_thresholds(threshold: Threshold) -> Threshold:
    if threshold is None:
        return None
    if isinstance(threshold, Mapping):
        return {str(k): None if v is None else _finite(v, f"threshold[{k!r}]") for k, v in threshold.items()}
    return _finite(threshold, "threshold")


def _threshold_of(threshold: Threshold, class_name: Optional[str]) -> Optional[float]:
    if isinstance(threshold, Mapping):
        return threshold.get(class_name) if class_name is not None else None
    return threshold


def _metrics_section(metrics: Optional[Mapping[str, Mapping[str, Optional[float]]]],
                     mean_row: Optional[str]) -> str:
    if metrics is None:
        return "<p>No metrics: the images have no labels.</p>"
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"metrics must be None or a non-empty mapping {{class: {{metric: value}}}}, got {metrics!r}")
    names = [n for n in metrics if n != mean_row] + ([mean_row] if mean_row in metrics else [])
    first = metrics[names[0]]
    if not isinstance(first, Mapping):
        raise TypeError(f"metrics[{names[0]!r}] must be a mapping {{metric: value}}, got {first!r}")
    columns = list(first)
    rows = []
    for name in names:
        row = metrics[name]
        if not isinstance(row, Mapping) or set(row) != set(columns):
            raise ValueError(f"metrics[{name!r}] must have the metrics {columns}, got "
                             f"{list(row) if isinstance(row, Mapping) else row!r}")
        cells = ["n/a" if row[key] is None else f"{100.0 * _finite(row[key], f'metrics[{name!r}][{key!r}]'):.1f}"
                 for key in columns]
        css = ' class="mean"' if name == mean_row else ""
        rows.append(f"<tr{css}><td>{_text(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr><th>class</th>" + "".join(f"<th>{_text(c)}</th>" for c in columns) + "</tr>"
    return (f'<table id="metrics">\n{header}\n' + "\n".join(rows) + "\n</table>\n"
            "<p>Values in percent; n/a: not computed (e.g. pixel metrics without masks).</p>")


def _roc_section(roc_png: Optional[bytes]) -> str:
    if roc_png is None:
        return "<p>No ROC curve: it needs normal and anomalous images of a class.</p>"
    if not isinstance(roc_png, bytes) or not roc_png.startswith(b"\x89PNG"):
        raise TypeError(f"roc_png must be PNG bytes or None, got {type(roc_png).__name__}")
    data = base64.b64encode(roc_png).decode("ascii")
    return f'<img id="roc" src="data:image/png;base64,{data}" alt="image-level ROC curves" width="600" height="600">'


def _threshold_section(threshold: Threshold, source: Optional[str]) -> str:
    where = f" ({_text(source)})" if source else ""
    if threshold is None:
        return "<p>No decision threshold: decisions are not made.</p>"
    if isinstance(threshold, Mapping):
        rows = "".join(f"<tr><td>{_text(k)}</td><td>{'n/a' if v is None else f'{v:.6g}'}</td></tr>"
                       for k, v in threshold.items())
        return (f"<p>An image is anomalous when its score is above its class's threshold{where}.</p>"
                f'<table id="threshold"><tr><th>class</th><th>threshold</th></tr>{rows}</table>')
    return (f'<p>An image is anomalous when its score is above <b id="threshold">{threshold:.6g}</b>'
            f"{where}.</p>")


def _fraction(value: object, where: str, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    value = _finite(value, where)
    return f"{100.0 * value:.2f}%" if percent else f"{value:.6g}"


def _count(record: Optional[Mapping[str, object]], key: str) -> str:
    return "n/a" if record is None else str(int(_finite(record[key], f"operating_points: {key}")))


def _limit(value: object, where: str) -> str:
    """A threshold cell: a number, 'per class' for a {class: threshold} map, n/a for None."""
    return "per class" if isinstance(value, Mapping) else _fraction(value, where, percent=False)


def _line_sentence(pooled: Mapping[str, object]) -> str:
    """What the stored threshold means for a production line, from the pooled record."""
    stored = pooled.get("stored")
    general = ("A target FPR row rejects about that share of good parts (1% = 10 in 1000, as measured on the "
               "validation normals; its test FPR is what it gave here); 1 − recall is the share of defects missed.")
    if not stored or stored.get("fpr") is None or stored.get("recall") is None:
        return f'<p id="op-line">{_text(general)}</p>'
    rejected = 1000 * _finite(stored["fpr"], "operating_points: fpr")
    missed = 1000 * (1 - _finite(stored["recall"], "operating_points: recall"))
    defective = int(_finite(stored["tp"], "operating_points: tp")) + int(_finite(stored["fn"], "operating_points: fn"))
    return (f'<p id="op-line">For a line, at the stored threshold on this test split: about {rejected:.1f} of every '
            f"1000 good parts are rejected (false positives) and {missed:.1f} of every 1000 defective parts are "
            f"missed ({_count(stored, 'fn')} of the {defective} defective test images). {_text(general)}</p>")


def _row(css: str, cells: Sequence[str], text_columns: Sequence[int] = ()) -> str:
    """A table row of HTML cells (already escaped); ``text_columns`` are aligned left."""
    return f"<tr{css}>" + "".join(f'<td class="text">{c}</td>' if i in text_columns else f"<td>{c}</td>"
                                  for i, c in enumerate(cells)) + "</tr>"


def _operating_points_section(points: Mapping[str, Mapping[str, object]], pooled_key: str) -> str:
    """Two tables: the stored threshold's confusion counts per class (the pooled record last) and
    the operating points (stored, target FPRs from the validation normals, F1-max)."""
    if not isinstance(points, Mapping) or not points or not all(isinstance(r, Mapping) for r in points.values()):
        raise TypeError("operating_points must be a non-empty mapping {class: record}")
    names = [n for n in points if n != pooled_key] + ([pooled_key] if pooled_key in points else [])
    stored_rows, point_rows = [], []
    for name in names:
        record, css = points[name], ' class="mean"' if name == pooled_key else ""
        stored = record.get("stored")
        cells = [_limit(None if stored is None else stored["threshold"], f"operating_points[{name!r}]")]
        cells += [_count(stored, k) for k in ("tp", "fp", "tn", "fn")]
        cells += [_fraction(None if stored is None else stored[k], f"operating_points[{name!r}][{k!r}]")
                  for k in ("precision", "recall", "fpr")]
        stored_rows.append(_row(css, [_text(name), *cells]))
        how = "none (or chosen under another protocol)" if stored is None else stored.get("source") or "stored"
        rows = [("stored threshold", stored, how)]
        for entry in record.get("targets") or []:
            if entry is None:
                continue
            where = (f"validation normals: {_fraction(entry['validation_fpr'], 'validation_fpr')} of "
                     f"n = {int(entry['n_validation'])} above it")
            rows.append((f"FPR ≤ {100 * _finite(entry['target_fpr'], 'target_fpr'):g}%", entry,
                         where + (f"; {entry['note']}" if entry.get("note") else "")))
        best = record.get("f1_max")
        if best is not None:
            rows.append(("F1-max", best, f"tuned on the test split, not for deployment "
                                         f"(F1 {_fraction(best['f1'], 'f1')})"))
        for label, entry, how in rows:
            cells = [_text(label), _limit(None if entry is None else entry["threshold"], f"{name!r}: {label}"),
                     _text(how)] + [_fraction(None if entry is None else entry[k], f"{name!r}: {label}: {k}")
                                    for k in ("recall", "fpr")] + [_count(entry, "fn"), _count(entry, "fp")]
            point_rows.append(_row(css, [_text(name), *cells], text_columns=(1, 3)))
    head = "".join(f"<th>{h}</th>" for h in ("class", "threshold", "TP", "FP", "TN", "FN", "precision", "recall",
                                              "FPR"))
    point_head = "".join(f"<th>{h}</th>" for h in ("class", "operating point", "threshold", "chosen from",
                                                    "test recall", "test FPR", "defects missed (FN)",
                                                    "good parts rejected (FP)"))
    return ("<p>An image is anomalous when its score is above the threshold. At the stored threshold, on the "
            f"test split ({_text(pooled_key)}: every test image, each judged by its own class's threshold):</p>"
            f'<table id="op-stored"><tr>{head}</tr>\n' + "\n".join(stored_rows) + "\n</table>\n"
            "<p>Operating points: the thresholds for target false-positive rates come from the validation "
            "normals only; recall and FPR are measured on the test split.</p>"
            f'<table id="op-points"><tr>{point_head}</tr>\n' + "\n".join(point_rows) + "\n</table>\n"
            + (_line_sentence(points[pooled_key]) if pooled_key in points else ""))


def _gallery_items(gallery: Sequence[Mapping[str, object]], out_dir: Path, threshold: Threshold):
    """Checked gallery entries, sorted by score (highest first, ties in the given order)."""
    if isinstance(gallery, (str, bytes, Mapping)):
        raise TypeError(f"gallery must be a sequence of mappings, got {type(gallery).__name__}")
    # real paths, so that a symlinked output folder still contains its own heatmaps
    root = Path(os.path.realpath(out_dir))
    items = []
    for i, entry in enumerate(gallery):
        where = f"gallery[{i}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a mapping with name, image and score, got {entry!r}")
        missing = [k for k in ("name", "image", "score") if k not in entry]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {missing}")
        name = entry["name"]
        if not isinstance(name, str):
            raise TypeError(f"{where}['name'] must be a string, got {name!r}")
        label = entry.get("label")
        if label is not None and (isinstance(label, bool) or label not in (0, 1)):
            raise ValueError(f"{where}['label'] must be 0, 1 or None, got {label!r}")
        image = Path(os.path.realpath(os.fspath(entry["image"])))
        if not image.is_file():
            raise FileNotFoundError(f"{where}['image']: heatmap file not found: {entry['image']}")
        if root not in image.parents:
            raise ValueError(f"{where}['image'] must be a file inside the output folder {out_dir} (the page "
                             f"refers to it by relative path), got {entry['image']}")
        class_name = entry.get("class")
        limit = _threshold_of(threshold, None if class_name is None else str(class_name))
        score = _finite(entry["score"], f"{where}['score']")
        decision = NO_THRESHOLD if limit is None else (ANOMALOUS if score > limit else NORMAL)
        items.append({"name": name, "src": image.relative_to(root).as_posix(), "score": score,
                      "label": label, "class": class_name, "detail": entry.get("detail"), "decision": decision})
    # sorted() is stable, so equal scores keep the caller's order
    return sorted(items, key=lambda item: -item["score"])


def _gallery_section(items) -> str:
    if not items:
        return "<p>No heatmaps were saved.</p>"
    figures = []
    for item in items:
        label = {None: "unknown", 0: "normal", 1: "anomalous"}[item["label"]]
        where = [_text(item[k]) for k in ("class", "detail") if item[k] is not None]
        extra = f"<br>{' / '.join(where)}" if where else ""
        css = {ANOMALOUS: "anomalous", NORMAL: "normal"}.get(item["decision"], "")
        figures.append(
            f'<figure><img src="{_text(urllib.parse.quote(item["src"]))}" alt="{_text(item["name"])}">'
            f'<figcaption><span class="name">{_text(item["name"])}</span>{extra}<br>'
            f'score <span class="score">{item["score"]:.6g}</span> · label {label} · '
            f'decision <span class="decision {css}">{_text(item["decision"])}</span></figcaption></figure>')
    return '<div class="gallery" id="gallery">\n' + "\n".join(figures) + "\n</div>"


def write_page(
    out_dir: str | os.PathLike,
    *,
    title: str = "gradad report",
    metrics: Optional[Mapping[str, Mapping[str, Optional[float]]]] = None,
    mean_row: Optional[str] = None,
    roc_png: Optional[bytes] = None,
    threshold: Threshold = None,
    threshold_source: Optional[str] = None,
    gallery: Sequence[Mapping[str, object]] = (),
    config_text: Optional[str] = None,
    config_title: str = "Config",
    notes: Sequence[str] = (),
    operating_points: Optional[Mapping[str, Mapping[str, object]]] = None,
    pooled_key: str = "all",
) -> Path:
    """Write ``<out_dir>/report.html`` (the folder is created if needed) and return its path.

    Args:
        out_dir: the run's output folder; the heatmap PNGs of ``gallery`` must lie inside it.
        title: the page's heading.
        metrics: {class: {metric key: float in [0, 1] or None}}, every class with the same
            keys (e.g. gradad.metrics.METRIC_KEYS). Shown in percent, None as "n/a". None: the
            run has no metrics (e.g. predict).
        mean_row: the class name of the mean row of ``metrics``, shown last and in bold.
        roc_png: the image-level ROC curves as PNG bytes (embedded in the page), or None.
        threshold: the decision threshold on the image score: a float, a {class: float or
            None} mapping (per-class runs), or None (no decisions).
        threshold_source: where the threshold came from, e.g. "validation quantile 0.99".
        gallery: one mapping per heatmap overlay: 'name' (str, e.g. the image's file name),
            'image' (path of its PNG, absolute or relative to the current folder, inside
            out_dir), 'score' (float); optional 'label' (0, 1 or None for unknown), 'class'
            (str; picks the threshold from a mapping) and 'detail' (str, e.g. the defect type).
            Shown sorted by score, highest first; decision "anomalous" when score > threshold.
        config_text: text shown verbatim under ``config_title`` (the run's config as YAML,
            an exported model's metadata); None: omitted.
        notes: lines shown under the metrics table (e.g. what the pixel metrics cover).
        operating_points: {class: record, ..., pooled_key: record} as
            gradad.operating_points.operating_points builds them (plain data: 'stored',
            'targets', 'f1_max' with their thresholds, counts and rates), shown in a section
            "Operating points"; None: no such section.
        pooled_key: the key of the record of every image pooled, shown last and in bold.

    Everything is checked and the whole page built before anything is written; the file is
    written atomically (readers see the old page or the new one, never part of one). Bad
    input raises TypeError / ValueError / FileNotFoundError naming the argument.
    """
    for name, value in (("title", title), ("config_title", config_title)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r}")
    for name, value in (("threshold_source", threshold_source), ("config_text", config_text)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {value!r}")
    out = Path(out_dir)
    threshold = _check_thresholds(threshold)
    items = _gallery_items(gallery, out, threshold)
    flagged = sum(item["decision"] == ANOMALOUS for item in items)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
        "<h2>Metrics</h2>", _metrics_section(metrics, mean_row), *(f'<p class="note">{_text(n)}</p>' for n in notes),
        "<h2>ROC curves</h2>", _roc_section(roc_png),
        "<h2>Decision threshold</h2>", _threshold_section(threshold, threshold_source),
        *(() if operating_points is None else
          ("<h2>Operating points</h2>", _operating_points_section(operating_points, pooled_key))),
        f"<h2>Heatmaps ({len(items)} images, {flagged} anomalous at the threshold)</h2>",
        "<p>Sorted by image score, highest first.</p>", _gallery_section(items),
        f"<h2>{_text(config_title)}</h2>",
        f"<p>No {_text(config_title.lower())} given.</p>" if config_text is None
        else f'<pre id="config">{_text(config_text)}</pre>',
        "</body></html>",
    ]
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / REPORT_HTML, "\n".join(parts) + "\n")
