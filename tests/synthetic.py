"""Tiny synthetic datasets on disk (MVTec AD, VisA and plain-folder layouts) for tests.

Images are seeded random noise; an anomalous image has a bright square, and its mask marks
exactly that square.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _noise_image(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 200, size=(size, size, 3), dtype=np.uint8)


def _defect(rng: np.random.Generator, image: np.ndarray, mask_value: int) -> tuple[np.ndarray, np.ndarray]:
    """(image with a white square, (H, W) uint8 mask holding mask_value on the square)."""
    size = image.shape[0]
    side = max(2, size // 4)
    top, left = rng.integers(0, size - side, size=2)
    image = image.copy()
    image[top : top + side, left : left + side] = 255
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    mask[top : top + side, left : left + side] = mask_value
    return image, mask


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec(
    root,
    classes=("a", "b"),
    n_train=4,
    n_test_good=2,
    n_test_bad=2,
    size=32,
    defects=("broken",),
) -> Path:
    """Write an MVTec-AD-layout dataset under `root` and return root as a Path.

    Per class: n_train train/good PNGs, n_test_good test/good PNGs, and for each defect
    type n_test_bad test/<defect> PNGs with ground_truth/<defect>/<stem>_mask.png (0/255).
    """
    root = Path(root)
    for class_index, class_name in enumerate(classes):
        rng = np.random.default_rng(class_index)
        class_dir = root / class_name
        for i in range(n_train):
            _save(class_dir / "train" / "good" / f"{i:03d}.png", _noise_image(rng, size))
        for i in range(n_test_good):
            _save(class_dir / "test" / "good" / f"{i:03d}.png", _noise_image(rng, size))
        for defect in defects:
            for i in range(n_test_bad):
                image, mask = _defect(rng, _noise_image(rng, size), 255)
                _save(class_dir / "test" / defect / f"{i:03d}.png", image)
                _save(class_dir / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def make_visa(
    root,
    classes=("a", "b"),
    n_train=4,
    n_test_good=2,
    n_test_bad=2,
    size=32,
    mask_values=(1, 3),
) -> Path:
    """Write a VisA-layout dataset under `root` and return root as a Path.

    Per class: Data/Images/Normal/*.JPG (n_train + n_test_good), Data/Images/Anomaly/*.JPG
    (n_test_bad) with Data/Masks/Anomaly/*.png whose non-zero value cycles through
    mask_values (VisA masks are not 0/255), and split_csv/1cls.csv listing them.
    """
    root = Path(root)
    rows = []
    for class_index, class_name in enumerate(classes):
        rng = np.random.default_rng(100 + class_index)
        data_dir = Path(class_name) / "Data"
        for i in range(n_train + n_test_good):
            rel = data_dir / "Images" / "Normal" / f"{i:04d}.JPG"
            _save(root / rel, _noise_image(rng, size))
            rows.append([class_name, "train" if i < n_train else "test", "normal", rel.as_posix(), ""])
        for i in range(n_test_bad):
            image, mask = _defect(rng, _noise_image(rng, size), mask_values[i % len(mask_values)])
            rel = data_dir / "Images" / "Anomaly" / f"{i:03d}.JPG"
            rel_mask = data_dir / "Masks" / "Anomaly" / f"{i:03d}.png"
            _save(root / rel, image)
            _save(root / rel_mask, mask)
            rows.append([class_name, "test", "anomaly", rel.as_posix(), rel_mask.as_posix()])
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def make_folder(root, n_normal=8, n_abnormal=3, size=32, mask_suffix="") -> Path:
    """Write root/normal/*.png, root/abnormal/*.png and root/masks/<stem><mask_suffix>.png; return root."""
    root = Path(root)
    rng = np.random.default_rng(7)
    for i in range(n_normal):
        _save(root / "normal" / f"n{i:03d}.png", _noise_image(rng, size))
    for i in range(n_abnormal):
        image, mask = _defect(rng, _noise_image(rng, size), 255)
        _save(root / "abnormal" / f"x{i:03d}.png", image)
        _save(root / "masks" / f"x{i:03d}{mask_suffix}.png", mask)
    os.makedirs(root / "masks", exist_ok=True)
    return root
