"""Image- and pixel-level anomaly detection metrics (docs/method.md §5).

All functions take numpy arrays (or, for pixel metrics, lists of per-image 2-D arrays of
different sizes) and return Python floats. Labels are binary, 1 = anomalous.

Tied scores form a single threshold, as in scikit-learn's roc_curve and
precision_recall_curve (a sample is predicted anomalous when score >= threshold).
Speed on tens of millions of pixels: TPR, precision and PRO change only at thresholds equal
to a positive score, so the negatives are sorted once (``np.sort``, far faster than
``argsort``) and counted at the distinct positive scores with ``searchsorted``; positives are
accumulated with ``bincount``/``cumsum`` (int64 counts, float64 weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from scipy import ndimage

AUPRO_FPR_LIMIT = 0.3
METRIC_KEYS = (
    "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro",
)
# 8-connectivity for ground-truth regions.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)

ImageStack = Union[np.ndarray, Sequence[np.ndarray]]


@dataclass(frozen=True)
class _Steps:
    """Curve statistics at the distinct positive scores t_1 > t_2 > … > t_K.

    Only positive scores change TPR/PRO, so every curve is exactly described by its points
    at these thresholds plus the horizontal runs between them, where only negatives enter.
    """

    tp: np.ndarray  # (K,) int64: positives >= t_k
    weight: np.ndarray | None  # (K,) float64: summed positive weights >= t_k
    fp_ge: np.ndarray  # (K,) int64: negatives >= t_k
    fp_gt: np.ndarray  # (K,) int64: negatives > t_k
    n_pos: int
    n_neg: int


def _steps(neg_scores: np.ndarray, pos_scores: np.ndarray,
           pos_weights: np.ndarray | None = None) -> _Steps:
    """Counts at the distinct values of ``pos_scores`` (1-D); ``neg_scores`` is sorted in place."""
    neg_scores.sort()
    pos_sorted = np.sort(pos_scores)
    is_first = np.empty(pos_sorted.size, dtype=bool)
    is_first[0] = True
    np.not_equal(pos_sorted[1:], pos_sorted[:-1], out=is_first[1:])
    first_index = np.flatnonzero(is_first)
    values = pos_sorted[first_index]  # distinct positive scores, ascending
    weight = None
    if pos_weights is not None:
        slot = np.searchsorted(values, pos_scores)  # exact: every score is one of `values`
        weight = np.cumsum(np.bincount(slot, weights=pos_weights, minlength=values.size)[::-1])
    n_neg = neg_scores.size
    return _Steps(
        tp=(pos_sorted.size - first_index)[::-1],
        weight=weight,
        fp_ge=(n_neg - np.searchsorted(neg_scores, values, side="left"))[::-1],
        fp_gt=(n_neg - np.searchsorted(neg_scores, values, side="right"))[::-1],
        n_pos=int(pos_sorted.size),
        n_neg=int(n_neg),
    )


def _check_binary(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a bool array; raise unless it holds only 0/1 (or bool)."""
    if values.dtype == bool:
        return values
    if not np.issubdtype(values.dtype, np.number) or not ((values == 0) | (values == 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1 values), got dtype {values.dtype} "
                         f"with other values")
    return values != 0


def _check_scores(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a float array; raise on non-numeric, NaN or infinite entries."""
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array, got dtype {values.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def _check_both_classes(n_pos: int, n_neg: int, name: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{name} contains only one class ({n_pos} positive, {n_neg} negative); "
                         f"the metric needs both")


def _image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validated, flattened (is_positive bool, scores float) of image-level inputs."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, got {labels.shape} "
                         f"and {scores.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty")
    is_pos = _check_binary(labels.ravel(), "labels")
    flat = _check_scores(scores.ravel(), "scores")
    _check_both_classes(int(is_pos.sum()), int(is_pos.size - is_pos.sum()), "labels")
    return is_pos, flat


def _image_steps(labels, scores) -> _Steps:
    is_pos, flat = _image_inputs(labels, scores)
    return _steps(flat[~is_pos], flat[is_pos])


def _as_image_list(stack: ImageStack, name: str) -> list[np.ndarray]:
    """A (N, H, W) array or a sequence of (H, W) arrays as a list of 2-D arrays."""
    if isinstance(stack, np.ndarray) and stack.ndim != 3:
        raise ValueError(f"{name} must be a (N, H, W) array or a sequence of (H, W) arrays, "
                         f"got an array of shape {stack.shape}")
    images = [np.asarray(image) for image in stack]
    if not images:
        raise ValueError(f"{name} is empty")
    for i, image in enumerate(images):
        if image.ndim != 2:
            raise ValueError(f"{name}[{i}] must be 2-D (H, W), got shape {image.shape}")
    return images


def _pixel_steps(masks: ImageStack, maps: ImageStack) -> tuple[_Steps, int]:
    """Pixel statistics; positives are anomalous pixels weighted by 1 / |own region|.

    Returns the steps and the number of ground-truth regions (8-connected components).
    """
    mask_list, map_list = _as_image_list(masks, "masks"), _as_image_list(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"masks and maps must hold the same number of images, got "
                         f"{len(mask_list)} and {len(map_list)}")
    neg_scores, pos_scores, pos_weights, n_regions = [], [], [], 0
    for i, (mask, amap) in enumerate(zip(mask_list, map_list)):
        if mask.shape != amap.shape:
            raise ValueError(f"masks[{i}] and maps[{i}] must have the same shape, got "
                             f"{mask.shape} and {amap.shape}")
        mask = _check_binary(mask, f"masks[{i}]")
        amap = _check_scores(amap, f"maps[{i}]")
        neg_scores.append(amap[~mask])
        if mask.any():
            region_ids, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
            pos_scores.append(amap[mask])
            pos_weights.append(1.0 / np.bincount(region_ids.ravel())[region_ids[mask]])
            n_regions += count
    n_pos, n_neg = sum(s.size for s in pos_scores), sum(s.size for s in neg_scores)
    _check_both_classes(n_pos, n_neg, "masks")
    # One common dtype so that equal values compare equal between positives and negatives.
    dtype = np.result_type(*[s.dtype for s in neg_scores + pos_scores])
    neg = np.concatenate(neg_scores).astype(dtype, copy=False)
    pos = np.concatenate(pos_scores).astype(dtype, copy=False)
    return _steps(neg, pos, np.concatenate(pos_weights)), n_regions


def _polyline(steps: _Steps, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x = FPR, y) points of the curve whose height is ``heights[k]`` from threshold t_k on.

    From (0, 0): a horizontal run at the previous height to FPR(> t_k), the segment to
    (FPR(>= t_k), heights[k]) (diagonal when negatives tie with t_k), and finally the run to
    (1, heights[-1]). Collinear points of the full curve are left out; the area is unchanged.
    """
    n = steps.n_neg
    x = np.empty(2 * heights.size + 2)
    y = np.empty_like(x)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], x[2:-1:2] = steps.fp_gt / n, steps.fp_ge / n
    y[1:-1:2], y[2:-1:2] = np.concatenate([[0.0], heights[:-1]]), heights
    x[-1], y[-1] = 1.0, heights[-1]
    return x, y


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _auroc(steps: _Steps) -> float:
    fpr, tpr = _polyline(steps, steps.tp / steps.n_pos)
    return _trapezoid(tpr, fpr)


def _average_precision(steps: _Steps) -> float:
    # Step-wise sum Σ (R_k − R_{k−1}) P_k, scikit-learn's definition (no interpolation).
    precision = steps.tp / (steps.tp + steps.fp_ge)
    recall_gain = np.diff(steps.tp, prepend=0) / steps.n_pos
    return float(np.sum(recall_gain * precision))


def _f1_max(steps: _Steps) -> float:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); it is largest at a positive score.
    return float(np.max(2.0 * steps.tp / (steps.tp + steps.fp_ge + steps.n_pos)))


def _aupro(steps: _Steps, n_regions: int, fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = _polyline(steps, steps.weight / n_regions)
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    if x[-1] < fpr_limit:  # cut the segment crossing the limit, interpolating linearly
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return _trapezoid(y, x) / fpr_limit


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score.

    Args: labels (N,) binary, scores (N,) float (any equal shapes).
    Returns: fpr, tpr, thresholds, each (K + 1,) float64; the first point is (0, 0) at
    threshold +inf, then thresholds are the distinct scores in descending order. Like
    scikit-learn's ``roc_curve(drop_intermediate=False)``.
    """
    is_pos, flat = _image_inputs(labels, scores)
    flat = flat.astype(np.float64)
    thresholds = np.unique(flat)[::-1]
    pos, neg = np.sort(flat[is_pos]), np.sort(flat[~is_pos])
    tpr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoid over all distinct thresholds; not flipped if < 0.5).

    Args: labels (N,) binary, scores (N,) float (any equal shapes).
    """
    return _auroc(_image_steps(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision Σ_k (R_k − R_{k−1}) P_k over distinct thresholds (scikit-learn's definition).

    Args: labels (N,) binary, scores (N,) float (any equal shapes).
    """
    return _average_precision(_image_steps(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 score over all distinct thresholds (score >= threshold means anomalous).

    Args: labels (N,) binary, scores (N,) float (any equal shapes).
    """
    return _f1_max(_image_steps(labels, scores))


def aupro(masks: ImageStack, maps: ImageStack, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Args:
        masks: (N, H, W) binary array, or a sequence of (H_i, W_i) binary arrays.
        maps: anomaly maps of the same shapes as ``masks``.
        fpr_limit: upper end of the integration, in (0, 1].

    Regions are the 8-connected components of every mask. For a threshold t,
    PRO(t) = mean over all regions of |region ∩ {map >= t}| / |region|, and
    FPR(t) = |normal pixels with map >= t| / |normal pixels| (normal = mask 0, all images).
    The curve is the polyline through (0, 0) and (FPR(t), PRO(t)) for every distinct map
    value t, descending; it is integrated exactly with the trapezoid rule from FPR 0 to
    ``fpr_limit`` (the segment crossing the limit is cut by linear interpolation) and the
    area is divided by ``fpr_limit``, so a perfect map scores 1.
    """
    steps, n_regions = _pixel_steps(masks, maps)
    return _aupro(steps, n_regions, fpr_limit)


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: ImageStack | None = None,
                    maps: ImageStack | None = None,
                    fpr_limit: float = AUPRO_FPR_LIMIT) -> dict[str, float | None]:
    """All §5 metrics of one class.

    Args:
        labels: (N,) binary image labels; scores: (N,) image scores.
        masks, maps: per-image ground truth and anomaly maps as for :func:`aupro`, or both None.
    Returns: dict with the keys of ``METRIC_KEYS``; the pixel keys and ``aupro`` are None
    when ``masks`` is None.
    """
    image = _image_steps(labels, scores)
    result: dict[str, float | None] = {
        "image_auroc": _auroc(image), "image_ap": _average_precision(image),
        "image_f1max": _f1_max(image),
        "pixel_auroc": None, "pixel_ap": None, "pixel_f1max": None, "aupro": None,
    }
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together (or both None)")
    if masks is not None:
        n_images = len(np.asarray(labels).ravel())
        if len(masks) != n_images:
            raise ValueError(f"masks must hold one mask per label ({n_images}), got {len(masks)}")
        # One pass serves all pixel metrics: positives are the anomalous pixels.
        pixel, n_regions = _pixel_steps(masks, maps)
        result.update(pixel_auroc=_auroc(pixel), pixel_ap=_average_precision(pixel),
                      pixel_f1max=_f1_max(pixel), aupro=_aupro(pixel, n_regions, fpr_limit))
    return result
