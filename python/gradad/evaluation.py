"""The two evaluation protocols of docs/method.md §5: map post-processing, masks, per-class metrics.

- ``paper`` (the reference code's): maps at the model's input resolution, smoothed with a
  21×21 average pool (stride 1, zero padding 10, padded zeros counted); image score = max of a
  32×32 average pool (stride 1, no padding) of the smoothed map; masks resized to the map size
  with nearest neighbour, mask > 0.
- ``strict``: maps upsampled (bilinear, align_corners=False) to each image's original size and
  Gaussian-smoothed (σ = 4); image score = max of the smoothed map; original masks, != 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .metrics import METRIC_KEYS, compute_metrics

PROTOCOLS = ("paper", "strict")
PAPER_SMOOTH_KERNEL = 21
PAPER_SCORE_KERNEL = 32
PAPER_MASK_SIZE = 224
STRICT_SIGMA = 4.0
STRICT_TRUNCATE = 4.0  # kernel radius = round(4σ) = 16 pixels, as scipy.ndimage's default
MEAN_KEY = "mean"


@dataclass(frozen=True)
class EvalRecord:
    """One test image.

    class_name: category; label: 0 normal, 1 anomalous;
    anomaly_map: (h, w) float map at the model's input resolution (tensor or array);
    mask: (H, W) ground truth at the original resolution, or None (normal images without a
    mask file are taken as all-normal; anomalous images without one mean "no pixel labels");
    image_size: (H, W) of the original image.
    """

    class_name: str
    label: int
    anomaly_map: torch.Tensor | np.ndarray
    mask: torch.Tensor | np.ndarray | None
    image_size: tuple[int, int]


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _stack_if_same_shape(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays


def reflect_indices(size: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of an axis of ``size`` cells padded by ``radius`` on each side with half-sample
    symmetric reflection (d c b a | a b c d | d c b a), repeated for pads longer than the axis,
    as scipy.ndimage's mode='reflect' does: (size + 2·radius,) int64."""
    positions = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(positions < size, positions, 2 * size - 1 - positions)


def gaussian_smooth(image: torch.Tensor, sigma: float = STRICT_SIGMA,
                    truncate: float = STRICT_TRUNCATE) -> torch.Tensor:
    """Separable Gaussian blur of a (H, W) tensor, same shape out.

    Kernel: exp(-x²/2σ²) on x ∈ [-r, r], r = int(truncate·σ + 0.5), normalised to sum 1.
    Border: :func:`reflect_indices`, i.e. the ``mode='reflect'`` of
    scipy.ndimage.gaussian_filter, for images of any size (1×1 included).
    """
    if image.dim() != 2 or image.numel() == 0:
        raise ValueError(f"image must be a non-empty (H, W) tensor, got shape {tuple(image.shape)}")
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    kernel = kernel / kernel.sum()
    out = image[None, None]
    for dim, weight in ((3, kernel.view(1, 1, 1, -1)), (2, kernel.view(1, 1, -1, 1))):
        padded = out.index_select(dim, reflect_indices(out.shape[dim], radius, image.device))
        out = F.conv2d(padded, weight)
    return out[0, 0]


def postprocess(maps: torch.Tensor, protocol: str,
                image_sizes: Sequence[tuple[int, int]] | None = None
                ) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Smoothed maps and image scores under ``protocol``.

    Args:
        maps: (N, h, w) float anomaly maps at the model's input resolution.
        protocol: 'paper' or 'strict' (see the module docstring).
        image_sizes: (H, W) of every original image; needed by 'strict', unused by 'paper'.
    Returns: maps_out, a (N, h', w') float numpy array, or a list of (H_i, W_i) arrays when
    the sizes differ; scores, (N,) float64 numpy.
    """
    _check_protocol(protocol)
    maps = torch.as_tensor(maps)
    if maps.ndim != 3 or not maps.is_floating_point():
        raise ValueError(f"maps must be a float (N, h, w) tensor, got {maps.dtype} {tuple(maps.shape)}")
    with torch.no_grad():
        if protocol == "paper":
            if min(maps.shape[1:]) < PAPER_SCORE_KERNEL:
                raise ValueError(f"maps of size {tuple(maps.shape[1:])} are smaller than the "
                                 f"{PAPER_SCORE_KERNEL}×{PAPER_SCORE_KERNEL} score window")
            smoothed = F.avg_pool2d(maps[:, None], PAPER_SMOOTH_KERNEL, stride=1,
                                    padding=PAPER_SMOOTH_KERNEL // 2, count_include_pad=True)
            scores = F.avg_pool2d(smoothed, PAPER_SCORE_KERNEL, stride=1).amax(dim=(1, 2, 3))
            return smoothed[:, 0].cpu().numpy(), scores.cpu().double().numpy()
        if image_sizes is None or len(image_sizes) != maps.shape[0]:
            raise ValueError(f"protocol 'strict' needs image_sizes with one (H, W) per map "
                             f"({maps.shape[0]}), got {image_sizes!r:.80}")
        maps_out, scores = [], []
        for amap, (height, width) in zip(maps, image_sizes):
            upsampled = F.interpolate(amap[None, None], size=(int(height), int(width)),
                                      mode="bilinear", align_corners=False)[0, 0]
            smoothed = gaussian_smooth(upsampled)
            maps_out.append(smoothed.cpu().numpy())
            scores.append(float(smoothed.max()))
    return _stack_if_same_shape(maps_out), np.asarray(scores, dtype=np.float64)


def prepare_masks(masks: Sequence[np.ndarray | torch.Tensor], protocol: str,
                  size: int | tuple[int, int] = PAPER_MASK_SIZE) -> np.ndarray | list[np.ndarray]:
    """Ground-truth masks under ``protocol`` as bool numpy arrays.

    Args:
        masks: (N, H, W) or a sequence of (H_i, W_i) masks at the original resolution.
        protocol: 'paper' → nearest-neighbour resize (torch 'nearest') to ``size``, then > 0;
            'strict' → the original masks, != 0 (VisA masks are not 0/255).
        size: output (h, w) for 'paper' (an int means square).
    Returns: (N, h, w) bool array, or a list of (H_i, W_i) bool arrays when sizes differ.
    """
    _check_protocol(protocol)
    out = []
    for i, mask in enumerate(masks):
        mask = torch.as_tensor(np.asarray(mask))
        if mask.ndim != 2:
            raise ValueError(f"masks[{i}] must be 2-D (H, W), got shape {tuple(mask.shape)}")
        if protocol == "paper":
            resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
            out.append((resized > 0).numpy())
        else:
            out.append((mask != 0).numpy())
    if not out:
        raise ValueError("masks is empty")
    return _stack_if_same_shape(out)


def mean_over_classes(per_class: dict[str, dict]) -> dict[str, float | None]:
    """The mean of every metric over classes, ignoring None (None when every class has None)."""
    mean = {}
    for key in METRIC_KEYS:
        values = [metrics[key] for metrics in per_class.values() if metrics[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    return mean


def _pixel_subset(records: list[EvalRecord]) -> list[int]:
    """Indices of the images pixel metrics are computed on: every normal image (a missing mask
    is all-normal) and the anomalous images that have a mask; empty when none of them has one."""
    if not any(r.label == 1 and r.mask is not None for r in records):
        return []
    return [i for i, r in enumerate(records) if r.label == 0 or r.mask is not None]


def _class_masks(name: str, records: list[EvalRecord], subset: list[int]) -> list[np.ndarray]:
    """Original-size masks of ``records[subset]`` (all False for normal images without one)."""
    masks = []
    for i in subset:
        record = records[i]
        size = tuple(int(s) for s in record.image_size)
        mask = np.zeros(size, dtype=bool) if record.mask is None else np.asarray(record.mask)
        if mask.shape != size:
            raise ValueError(f"class {name!r}, record {i}: mask shape {mask.shape} differs from "
                             f"image_size {size}")
        masks.append(mask)
    return masks


def evaluate(records: Iterable[EvalRecord], protocol: str,
             progress: bool = True) -> dict[str, dict[str, float | None]]:
    """Per-class §5 metrics and their mean over classes.

    Args: records, one :class:`EvalRecord` per test image; protocol 'paper' or 'strict';
    progress: show a progress bar over the classes.
    Returns: {class_name: metrics, ..., 'mean': metrics}, where metrics maps every key of
    ``gradad.metrics.METRIC_KEYS`` to a float, or None for pixel metrics of classes without
    masks. The mean ignores None values and is None when every class has None.
    """
    _check_protocol(protocol)
    by_class: dict[str, list[EvalRecord]] = defaultdict(list)
    for record in records:
        if record.label not in (0, 1):
            raise ValueError(f"class {record.class_name!r}: label must be 0 or 1, got {record.label!r}")
        by_class[record.class_name].append(record)
    if not by_class:
        raise ValueError("records is empty")
    if MEAN_KEY in by_class:
        raise ValueError(f"class name {MEAN_KEY!r} is reserved for the mean over classes")
    results: dict[str, dict[str, float | None]] = {}
    for name, class_records in tqdm(by_class.items(), desc=f"evaluate ({protocol})", unit="class",
                                    disable=not progress):
        results[name] = evaluate_class(name, class_records, protocol).metrics
    results[MEAN_KEY] = mean_over_classes(results)
    return results


@dataclass(frozen=True)
class ClassEvaluation:
    """One class's metrics with what they were computed from: the post-processed maps (as
    :func:`postprocess` returns them) and the (N,) image scores, so reports reuse them instead
    of post-processing again (the costly step). masked / anomalous: how many of the class's
    anomalous images have a mask, of how many; pixel metrics cover the normal images and the
    masked anomalous ones (None when masked is 0)."""

    metrics: dict[str, float | None]
    maps: np.ndarray | list[np.ndarray]
    scores: np.ndarray
    masked: int
    anomalous: int

    @property
    def pixel_scope(self) -> str:
        """'all', 'none' (no masks: pixel metrics None) or 'subset' (some anomalous images have none)."""
        return "none" if self.masked == 0 else "all" if self.masked == self.anomalous else "subset"


def evaluate_class(name: str, records: Sequence[EvalRecord], protocol: str) -> ClassEvaluation:
    """The metrics of one class under ``protocol``: the one computation behind :func:`evaluate`
    and ``gradad test``. Image metrics use every image. Pixel metrics use the images with pixel
    ground truth (:class:`ClassEvaluation` says how many), and are None when no anomalous image
    of the class has a mask."""
    _check_protocol(protocol)
    records = list(records)
    maps = torch.stack([torch.as_tensor(r.anomaly_map) for r in records])
    maps_out, scores = postprocess(maps, protocol, [r.image_size for r in records])
    labels = np.array([r.label for r in records])
    subset = _pixel_subset(records)
    try:
        metrics = compute_metrics(labels, scores)
        if subset:
            masks = prepare_masks(_class_masks(name, records, subset), protocol, size=tuple(maps.shape[1:]))
            pixel_maps = maps_out[subset] if isinstance(maps_out, np.ndarray) else [maps_out[i] for i in subset]
            pixel = compute_metrics(labels[subset], scores[subset], masks, pixel_maps)
            metrics.update({k: v for k, v in pixel.items() if not k.startswith("image_")})
    except ValueError as error:
        raise ValueError(f"class {name!r}: {error}") from error
    masked = sum(1 for r in records if r.label == 1 and r.mask is not None)
    return ClassEvaluation(metrics, maps_out, scores, masked, int(labels.sum()))
