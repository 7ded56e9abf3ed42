"""Outputs of a test run: metrics table, metrics.json / metrics.csv, heatmap overlays, ROC plot.

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed). Every file
is written atomically through :mod:`gradad.io_utils`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from .evaluation import MEAN_KEY
from .io_utils import atomic_write_bytes, atomic_write_text
from .metrics import METRIC_KEYS, auroc, roc_curve

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
ROC_PNG = "roc_curves.png"
HEATMAP_COLORMAP = "jet"
HEATMAP_ALPHA = 0.5
FIGURE_DPI = 100

Results = Mapping[str, Mapping[str, "float | None"]]


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


def write_metrics(out_dir: str | os.PathLike, results: Results,
                  extra: Mapping[str, object] | None = None) -> tuple[Path, Path]:
    """Write metrics.json ({**extra, 'results': results}) and metrics.csv into ``out_dir``.

    The CSV has the header ``class,<METRIC_KEYS>``, one row per class then 'mean', values as
    fractions, empty cells for None. Both texts are built (NaN rejected) before anything is
    written; each file is written atomically. Returns (json path, csv path).
    """
    extra = dict(extra or {})
    if "results" in extra:
        raise ValueError("extra must not contain the key 'results' (it holds the metrics)")
    names = _ordered_rows(results)
    payload = {**extra, "results": {name: dict(results[name]) for name in names}}
    json_text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *METRIC_KEYS])
    for name in names:
        writer.writerow([name] + ["" if results[name][k] is None else repr(float(results[name][k]))
                                  for k in METRIC_KEYS])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return (atomic_write_text(out_dir / METRICS_JSON, json_text),
            atomic_write_text(out_dir / METRICS_CSV, buffer.getvalue()))


def _figure_png(figure: Figure) -> bytes:
    """Render a figure on an Agg canvas to RGB PNG bytes."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_file_stem(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"names must be plain file names without folders, got {name!r}")


def save_heatmap_overlays(out_dir: str | os.PathLike, images: Sequence[np.ndarray],
                          maps: Sequence[np.ndarray], names: Sequence[str],
                          vmin: float | None = None, vmax: float | None = None,
                          scores: Sequence[float] | None = None, progress: bool = True) -> list[Path]:
    """One PNG per image, ``<out_dir>/<name>.png``: original | anomaly heatmap over it.

    Args:
        images: (H, W, 3) uint8 RGB (or (H, W) uint8 grayscale) images.
        maps: (H, W) float anomaly maps, same H, W as their image.
        names: file stems, unique.
        vmin, vmax: colour range of the heatmap; None → min / max over all maps, so that
            colours are comparable between images.
        scores: image scores shown in the titles; None → the maximum of each map.
        progress: show a progress bar.
    Returns: the written paths.
    """
    if not len(images) == len(maps) == len(names):
        raise ValueError(f"images, maps and names must have the same length, got "
                         f"{len(images)}, {len(maps)} and {len(names)}")
    if scores is not None and len(scores) != len(maps):
        raise ValueError(f"scores must have one value per map ({len(maps)}), got {len(scores)}")
    if len(set(names)) != len(names):
        raise ValueError("names must be unique (each is a file name)")
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    for i, (image, amap, name) in enumerate(zip(images, maps, names)):
        _check_file_stem(name)
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"images[{i}] must be (H, W, 3) or (H, W) uint8, got {image.dtype} "
                             f"{image.shape}")
        if amap.shape != image.shape[:2]:
            raise ValueError(f"maps[{i}] has shape {amap.shape}, its image {image.shape[:2]}")
    if maps:
        vmin = min(float(m.min()) for m in maps) if vmin is None else vmin
        vmax = max(float(m.max()) for m in maps) if vmax is None else vmax
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, amap, name) in enumerate(tqdm(list(zip(images, maps, names)), desc="heatmaps",
                                                 unit="image", disable=not progress)):
        score = float(amap.max()) if scores is None else float(scores[i])
        figure = Figure(figsize=(8, 4), dpi=FIGURE_DPI)
        left, right = figure.subplots(1, 2)
        if image.ndim == 2:  # as RGB: a colour map would stretch the gray levels
            image = np.repeat(image[:, :, None], 3, axis=2)
        left.imshow(image)
        left.set_title("original")
        right.imshow(image)
        heat = right.imshow(amap, cmap=HEATMAP_COLORMAP, alpha=HEATMAP_ALPHA, vmin=vmin, vmax=vmax)
        right.set_title(f"{name}: score {score:.4g}")
        figure.colorbar(heat, ax=right, fraction=0.046, pad=0.04)
        for axis in (left, right):
            axis.axis("off")
        paths.append(atomic_write_bytes(out_dir / f"{name}.png", _figure_png(figure)))
    return paths


def save_roc_curves(out_dir: str | os.PathLike,
                    per_class: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """One PNG ``<out_dir>/roc_curves.png`` with the image-level ROC curve of every class.

    Args: per_class, {class: (labels (N,) binary, scores (N,) float)}.
    Returns: the written path. The legend gives each class's AUROC in percent.
    """
    if not per_class:
        raise ValueError("per_class is empty")
    figure = Figure(figsize=(6, 6), dpi=FIGURE_DPI)
    axis = figure.subplots()
    for name, (labels, scores) in per_class.items():
        try:
            fpr, tpr, _ = roc_curve(labels, scores)
            area = auroc(labels, scores)
        except ValueError as error:
            raise ValueError(f"class {name!r}: {error}") from error
        axis.plot(fpr, tpr, label=f"{name} (AUROC {100.0 * area:.1f}%)")
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
             ylabel="true positive rate", title="image-level ROC")
    axis.legend(loc="lower right", fontsize="small")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out_dir / ROC_PNG, _figure_png(figure))
