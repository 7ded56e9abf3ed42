"""AnomalyDataset: ImageRecords to normalised model inputs and masks."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..image_files import ON_ERROR_CHOICES
from .image_io import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnreadableImageError,
    check_image_file,
    check_mask_size,
    read_mask,
    read_rgb,
    resize_image,
    resize_mask,
)
from .records import ImageRecord

VALIDATE_CHOICES = ("header", "full")


class AnomalyDataset(Dataset):
    """Map-style dataset over ImageRecords.

    Item i is a dict:
        image: (3, S, S) float32, resized (bilinear, antialias) and normalised with mean/std;
            grayscale images are repeated to RGB.
        label: int, 0 normal / 1 anomalous.
        mask: (1, S, S) float32 in {0, 1} (mask != 0, resized with nearest neighbour);
            all zeros when the record has no mask file.
        has_mask: bool, True when `mask` is pixel ground truth: the record has a mask file,
            or it is a normal image (all-zero is then exact). False for anomalous images
            without a mask.
        orig_size: (H, W) of the original image.  index: int.  class_name, defect_type, path: str.

    At construction every image is checked (validate="header": header + Pillow verify(),
    which catches truncated PNG/JPEG files without decoding pixels; validate="full": full
    decode), and every mask's header size is compared with its image's. An unreadable
    image or mask raises (on_error="raise") or drops the record with a warning naming the
    file (on_error="skip"; dropped paths are kept in `skipped_paths`). A mask whose size
    differs from its image always raises ValueError naming the mask file.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int = DEFAULT_IMAGE_SIZE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_error: str = "raise",
        validate: str = "header",
        progress: bool = True,
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if validate not in VALIDATE_CHOICES:
            raise ValueError(f"validate must be one of {VALIDATE_CHOICES}, got {validate!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must have 3 values and std must be > 0, got mean={mean}, std={std}")
        records = list(records)
        if not records:
            raise ValueError("records is empty: the dataset needs at least one ImageRecord")
        for record in records:
            if not isinstance(record, ImageRecord):
                raise TypeError(f"records must hold ImageRecord objects, got {type(record).__name__}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.skipped_paths: list[str] = []
        self.records = self._check_records(records, on_error, validate == "full", progress)
        if not self.records:
            raise ValueError(f"no readable images left: all {len(records)} records were skipped")
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def _check_records(
        self, records: list[ImageRecord], on_error: str, full_decode: bool, progress: bool
    ) -> list[ImageRecord]:
        kept = []
        for record in tqdm(records, desc="checking images", disable=not progress, leave=False):
            try:
                size = check_image_file(record.path, full_decode)
                if record.mask_path is not None:
                    check_image_file(record.mask_path, full_decode)
            except (FileNotFoundError, UnreadableImageError) as exc:
                if on_error == "raise":
                    raise
                warnings.warn(f"skipping unreadable image {record.path}: {exc}", stacklevel=2)
                self.skipped_paths.append(record.path)
                continue
            if record.mask_path is not None:
                check_mask_size(record.mask_path, record.path, size)
            kept.append(record)
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        rgb = read_rgb(record.path)
        orig_size = rgb.shape[:2]
        target = (self.image_size, self.image_size)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        image = (resize_image(image, target) - self._mean) / self._std
        if record.mask_path is not None:
            mask = torch.from_numpy(read_mask(record.mask_path, expected_size=orig_size)).float()[None]
            mask = resize_mask(mask, target)
        else:
            mask = torch.zeros(1, *target)
        return {
            "image": image,
            "label": record.label,
            "mask": mask,
            "has_mask": record.mask_path is not None or record.label == 0,
            "orig_size": tuple(orig_size),
            "index": index,
            "class_name": record.class_name,
            "defect_type": record.defect_type,
            "path": record.path,
        }
