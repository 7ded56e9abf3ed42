"""Datasets for GRAD: listing, splitting and loading images.

Listings of MVTec AD, VisA, GoodsAD, ELPV and plain folders; the training split; images as
model inputs. (Backbone features and their cache are :mod:`gradad.features`.)
"""

from .dataset import ON_ERROR_CHOICES, AnomalyDataset
from .image_io import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, UnreadableImageError, load_mask, load_rgb
from .listing import (
    DATASET_NAMES,
    list_dataset,
    list_elpv,
    list_folder,
    list_goodsad,
    list_mvtec,
    list_visa,
)
from .records import ImageRecord
from .split import split_training_records

__all__ = [
    "AnomalyDataset",
    "DATASET_NAMES",
    "DEFAULT_IMAGE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageRecord",
    "ON_ERROR_CHOICES",
    "UnreadableImageError",
    "list_dataset",
    "list_elpv",
    "list_folder",
    "list_goodsad",
    "list_mvtec",
    "list_visa",
    "load_mask",
    "load_rgb",
    "split_training_records",
]
