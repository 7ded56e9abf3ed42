"""The image record type and the small helpers shared by the dataset listing functions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..image_files import IMAGE_EXTENSIONS, list_image_files  # noqa: F401 (the listings' names)

SPLITS = ("train", "test")
NORMAL_DEFECT_TYPE = "good"
# Mask file names tried, in order, for an image with stem <stem>.
MASK_NAME_PATTERNS = ("{stem}_mask.png", "{stem}.png")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    Attributes:
        path: image file on disk (every supported dataset, ELPV included, ships its
            images as files, so records never hold pixel arrays).
        label: 0 for a normal image, 1 for an anomalous one.
        mask_path: ground-truth mask file (non-zero pixels are anomalous), or None.
        class_name: object / category name, e.g. "bottle".
        defect_type: "good" for normal images, otherwise the defect name.
        split: "train" or "test".
    """

    path: str
    label: int
    mask_path: str | None
    class_name: str
    defect_type: str
    split: str

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"ImageRecord.label must be 0 or 1, got {self.label!r} for {self.path}")
        if self.split not in SPLITS:
            raise ValueError(f"ImageRecord.split must be one of {SPLITS}, got {self.split!r} for {self.path}")


def check_split(split: str) -> str:
    """Return `split` if it is "train" or "test", else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def normalize_classes(classes: str | Iterable[str] | None) -> list[str] | None:
    """Turn a class argument (None, one name, or several) into a de-duplicated list or None."""
    if classes is None:
        return None
    if isinstance(classes, str):
        return [classes]
    names = list(dict.fromkeys(classes))
    if not names:
        raise ValueError("classes must be None (all classes) or a non-empty list of class names")
    return names


def select_classes(requested: list[str] | None, available: Sequence[str], where: str) -> list[str]:
    """Return the requested classes (all available ones when None); unknown names raise ValueError."""
    if requested is None:
        return list(available)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ValueError(
            f"unknown class name(s) {unknown} in {where}; available classes: {sorted(available)}"
        )
    return requested


def require_dir(path: str | os.PathLike, what: str) -> str:
    """Return `path` as a string, raising FileNotFoundError naming `what` if it is not a folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def find_mask(mask_dir: str, image_path: str) -> str | None:
    """Mask file for `image_path` in `mask_dir` (`<stem>_mask.png`, then `<stem>.png`), or None."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for pattern in MASK_NAME_PATTERNS:
        candidate = os.path.join(mask_dir, pattern.format(stem=stem))
        if os.path.isfile(candidate):
            return candidate
    return None


def seeded_holdout(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..count-1 into (train, held-out) with a seeded permutation.

    round(fraction * count) indices are held out; both returned arrays are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test_normal_fraction must be in [0, 1), got {fraction!r}")
    n_held_out = int(round(fraction * count))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[n_held_out:]), np.sort(order[:n_held_out])
