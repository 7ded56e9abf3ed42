"""The images a config names: the listing of ``cfg.data`` for a split, with the options every
dataset kind reads from it (masks required or not; the folder dataset's folders)."""

from __future__ import annotations

import os
from typing import List, Optional

from .config import Config
from .datasets import ImageRecord, list_dataset


def _under_root(root: Optional[str], folder: Optional[str]) -> Optional[str]:
    if folder is None or root is None or os.path.isabs(folder):
        return folder
    return os.path.join(root, folder)


def config_listing(cfg: Config, split: str) -> List[ImageRecord]:
    """The records of ``split`` ('train' or 'test') of cfg.data's dataset, root and classes."""
    data = cfg.data
    if data.dataset.lower() != "folder":
        options = {"require_masks": data.require_masks} if split == "test" and data.dataset.lower() != "elpv" else {}
        return list_dataset(data.dataset, data.root, split, data.classes, **options)
    if data.root is None and data.normal_dir is None:
        raise ValueError("dataset 'folder' needs data.root or data.normal_dir (the normal images)")
    normal_dir = _under_root(data.root, data.normal_dir) if data.normal_dir is not None else data.root
    abnormal = [_under_root(data.root, d) for d in data.abnormal_dirs or []]
    return list_dataset("folder", normal_dir, split, abnormal_dir=abnormal or None,
                        mask_dir=_under_root(data.root, data.mask_dir),
                        normal_test_dir=_under_root(data.root, data.normal_test_dir),
                        test_normal_fraction=data.test_normal_fraction, seed=cfg.train.seed,
                        require_masks=data.require_masks)
