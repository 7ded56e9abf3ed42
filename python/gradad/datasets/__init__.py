"""Datasets for GRAD: listing images (MVTec AD, VisA, GoodsAD, ELPV, plain folders),
loading them as model inputs, and caching frozen-backbone features."""

from .cache import FeatureCache
from .dataset import AnomalyDataset
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

__all__ = [
    "AnomalyDataset",
    "DATASET_NAMES",
    "DEFAULT_IMAGE_SIZE",
    "FeatureCache",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageRecord",
    "UnreadableImageError",
    "list_dataset",
    "list_elpv",
    "list_folder",
    "list_goodsad",
    "list_mvtec",
    "list_visa",
    "load_mask",
    "load_rgb",
]
