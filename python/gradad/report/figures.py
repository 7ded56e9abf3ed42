"""Figures: heatmap overlays and ROC curves as PNG files.

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed). Every file
is written atomically through :mod:`gradad.io_utils`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from ..io_utils import atomic_write_bytes
from ..metrics import auroc, roc_curve
from ..operating_points import confusion

ROC_PNG = "roc_curves.png"
HEATMAP_COLORMAP = "jet"
HEATMAP_ALPHA = 0.5
FIGURE_DPI = 100


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


def roc_curves_png(per_class: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   thresholds: Union[None, float, Mapping[str, Optional[float]]] = None) -> bytes:
    """The image-level ROC curve of every class in one plot, as PNG bytes; the legend gives
    each class's AUROC in percent.

    Args:
        per_class: {class: (labels (N,) binary, scores (N,) float)}; each class needs both labels.
        thresholds: the stored decision threshold, one for every class or {class: threshold or
            None}; each class's point at it (FPR, TPR of score > threshold, a vertex of its curve)
            is marked with an "o" in the curve's colour, and the legend says "o: stored threshold".
            None: no marks.
    """
    if not isinstance(per_class, Mapping) or not per_class:
        raise ValueError(f"per_class must be a non-empty mapping {{class: (labels, scores)}}, got {per_class!r:.80}")
    figure = Figure(figsize=(6, 6), dpi=FIGURE_DPI)
    axis = figure.subplots()
    marked = False
    for name, pair in per_class.items():
        limit = thresholds.get(name) if isinstance(thresholds, Mapping) else thresholds
        try:
            labels, scores = (np.asarray(a) for a in pair)
            fpr, tpr, _ = roc_curve(labels, scores)
            area = auroc(labels, scores)
            if limit is not None and (isinstance(limit, (bool, str)) or not np.isfinite(float(limit))):
                raise ValueError(f"the threshold must be a finite number, got {limit!r}")
        except (TypeError, ValueError) as error:
            raise ValueError(f"class {name!r}: {error}") from error
        line, = axis.plot(fpr, tpr, label=f"{name} (AUROC {100.0 * area:.1f}%)")
        if limit is not None:
            point = confusion(labels, scores, float(limit))
            axis.plot(point["fpr"], point["recall"], "o", color=line.get_color(),
                      markeredgecolor="black", markersize=8, zorder=3, clip_on=False)
            marked = True
    if marked:
        axis.plot([], [], "o", color="white", markeredgecolor="black", label="o: stored threshold")
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
             ylabel="true positive rate", title="image-level ROC")
    axis.legend(loc="lower right", fontsize="small")
    return _figure_png(figure)


def save_roc_curves(out_dir: str | os.PathLike, per_class: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    thresholds: Union[None, float, Mapping[str, Optional[float]]] = None) -> Path:
    """``<out_dir>/roc_curves.png``: :func:`roc_curves_png` of ``per_class`` (with the stored
    ``thresholds`` marked); returns the path."""
    png = roc_curves_png(per_class, thresholds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out_dir / ROC_PNG, png)
