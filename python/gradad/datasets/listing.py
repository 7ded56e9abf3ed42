"""Listing functions: turn a dataset on disk into a list of ImageRecord for one split.

Every function raises FileNotFoundError for a missing folder or file and ValueError for an
unknown class (listing the available ones), an unknown split, or a split without images.
"""

from __future__ import annotations

import csv
import os
from typing import Iterable, Sequence

from .records import (
    NORMAL_DEFECT_TYPE,
    ImageRecord,
    check_split,
    find_mask,
    list_image_files,
    normalize_classes,
    require_dir,
    seeded_holdout,
    select_classes,
)

VISA_SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
ELPV_CLASS_NAME = "elpv"
# ELPV defect probabilities (annotator confidence) and the defect_type given to each.
ELPV_PROBABILITY_TYPES = {0.0: NORMAL_DEFECT_TYPE, 1 / 3: "uncertain_p33", 2 / 3: "uncertain_p67", 1.0: "defective"}
DATASET_NAMES = ("mvtec", "visa", "goodsad", "folder", "elpv")


def list_mvtec(
    root: str | os.PathLike,
    split: str,
    classes: str | Iterable[str] | None = None,
    require_masks: bool = True,
) -> list[ImageRecord]:
    """List an MVTec-AD-layout dataset.

    Layout: `<class>/train/good/*`, `<class>/test/{good,<defect>}/*`,
    masks `<class>/ground_truth/<defect>/<stem>_mask.png` (or `<stem>.png`).
    classes=None takes every sub-folder of `root` that has a `train` or `test` folder.
    A defect image without a mask raises FileNotFoundError unless require_masks=False
    (then its mask_path is None).
    """
    check_split(split)
    root = require_dir(root, "dataset root")
    available = sorted(
        name
        for name in os.listdir(root)
        if any(os.path.isdir(os.path.join(root, name, s)) for s in ("train", "test"))
    )
    if not available:
        raise FileNotFoundError(f"no class folders (with train/ or test/ inside) found in {root}")
    records: list[ImageRecord] = []
    for class_name in select_classes(normalize_classes(classes), available, root):
        records.extend(_list_mvtec_class(root, class_name, split, require_masks))
    return records


def _list_mvtec_class(root: str, class_name: str, split: str, require_masks: bool) -> list[ImageRecord]:
    split_dir = require_dir(os.path.join(root, class_name, split), f"{split} split of class {class_name!r}")
    if split == "train":
        defect_types = [NORMAL_DEFECT_TYPE]
        require_dir(os.path.join(split_dir, NORMAL_DEFECT_TYPE), f"normal training images of class {class_name!r}")
    else:
        defect_types = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    records = []
    for defect_type in defect_types:
        label = int(defect_type != NORMAL_DEFECT_TYPE)
        mask_dir = os.path.join(root, class_name, "ground_truth", defect_type)
        for image_path in list_image_files(os.path.join(split_dir, defect_type)):
            mask_path = find_mask(mask_dir, image_path) if label else None
            if label and mask_path is None and require_masks:
                stem = os.path.splitext(os.path.basename(image_path))[0]
                raise FileNotFoundError(
                    f"no mask for anomalous image {image_path}: expected {os.path.join(mask_dir, stem + '_mask.png')} "
                    "(pass require_masks=False to list images without masks)"
                )
            records.append(ImageRecord(image_path, label, mask_path, class_name, defect_type, split))
    if not records:
        raise ValueError(f"no images found for class {class_name!r}, split {split!r} in {split_dir}")
    return records


def list_goodsad(
    root: str | os.PathLike,
    split: str,
    classes: str | Iterable[str] | None = None,
    require_masks: bool = True,
) -> list[ImageRecord]:
    """List GoodsAD, which uses the MVTec AD layout (see list_mvtec)."""
    return list_mvtec(root, split, classes, require_masks)


def list_visa(
    root: str | os.PathLike,
    split: str,
    classes: str | Iterable[str] | None = None,
    require_masks: bool = True,
) -> list[ImageRecord]:
    """List VisA from its split file `split_csv/1cls.csv` (columns object,split,label,image,mask).

    label is "normal" or "anomaly"; image and mask paths are relative to `root`.
    defect_type is "good" or "anomaly" (VisA does not name defect types).
    """
    check_split(split)
    root = require_dir(root, "VisA root")
    csv_path = os.path.join(root, VISA_SPLIT_CSV)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"VisA split file not found: {csv_path}")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing_columns = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise ValueError(f"{csv_path} lacks column(s) {missing_columns}; expected columns {list(VISA_COLUMNS)}")
        rows = [(line, {k: (v or "").strip() for k, v in row.items() if k}) for line, row in enumerate(reader, 2)]
    available = sorted({row["object"] for _, row in rows})
    selected = select_classes(normalize_classes(classes), available, csv_path)
    records = [
        _visa_record(root, csv_path, line, row, require_masks)
        for line, row in rows
        if row["split"] == split and row["object"] in selected
    ]
    for class_name in selected:
        if not any(r.class_name == class_name for r in records):
            raise ValueError(f"no {split!r} images for class {class_name!r} in {csv_path}")
    return records


def _visa_record(root: str, csv_path: str, line: int, row: dict, require_masks: bool) -> ImageRecord:
    where = f"{csv_path}, line {line}"
    if row["label"] not in VISA_LABELS:
        raise ValueError(f"{where}: label must be one of {list(VISA_LABELS)}, got {row['label']!r}")
    label = VISA_LABELS[row["label"]]
    image_path = os.path.join(root, row["image"])
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"{where}: image file not found: {image_path}")
    mask_path = os.path.join(root, row["mask"]) if row["mask"] else None
    if mask_path is not None and not os.path.isfile(mask_path):
        raise FileNotFoundError(f"{where}: mask file not found: {mask_path}")
    if label and mask_path is None and require_masks:
        raise ValueError(f"{where}: anomalous image {image_path} has no mask (pass require_masks=False to allow)")
    defect_type = NORMAL_DEFECT_TYPE if label == 0 else "anomaly"
    return ImageRecord(image_path, label, mask_path, row["object"], defect_type, row["split"])


def list_folder(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mask_dir: str | os.PathLike | None = None,
    split: str = "train",
    seed: int = 0,
    test_normal_fraction: float = 0.25,
    class_name: str = "folder",
    require_masks: bool = True,
    normal_test_dir: str | os.PathLike | None = None,
) -> list[ImageRecord]:
    """List a plain folder of normal images, optionally with folders of anomalous ones (the
    layout of anomalib's Folder dataset).

    abnormal_dir: one folder or a list of folders of anomalous images, one defect type each
    (named after the folder). Without any, every normal image is a training image and
    split="test" is an error. The normal test images are ``normal_test_dir`` when given (then
    every image of normal_dir trains), else a seeded ``test_normal_fraction`` of normal_dir.
    Masks are looked up by stem (`<stem>.png` or `<stem>_mask.png`) in ``mask_dir/<defect>/``,
    then in ``mask_dir``; a missing one raises unless require_masks=False (its mask_path is then
    None). Folders are not searched recursively.
    """
    check_split(split)
    normal_images = list_image_files(require_dir(normal_dir, "normal images"))
    if not normal_images:
        raise ValueError(f"no images found in normal image folder {os.fspath(normal_dir)}")
    abnormal_dirs = ([] if abnormal_dir is None else [abnormal_dir] if isinstance(abnormal_dir, (str, os.PathLike))
                     else list(abnormal_dir))
    if not abnormal_dirs:
        if split == "test":
            raise ValueError("split='test' needs abnormal_dir (a folder of anomalous images)")
        return [ImageRecord(p, 0, None, class_name, NORMAL_DEFECT_TYPE, "train") for p in normal_images]

    if normal_test_dir is not None:
        normal_test = list_image_files(require_dir(normal_test_dir, "normal test images"))
        if not normal_test:
            raise ValueError(f"no images found in normal test image folder {os.fspath(normal_test_dir)}")
        train_images = normal_images
    else:
        train_idx, test_idx = seeded_holdout(len(normal_images), test_normal_fraction, seed)
        if len(train_idx) == 0:
            raise ValueError(f"test_normal_fraction={test_normal_fraction} leaves no normal training images")
        train_images, normal_test = [normal_images[i] for i in train_idx], [normal_images[i] for i in test_idx]
    if split == "train":
        return [ImageRecord(p, 0, None, class_name, NORMAL_DEFECT_TYPE, "train") for p in train_images]

    mask_dir = require_dir(mask_dir, "mask") if mask_dir is not None else None
    records = [ImageRecord(p, 0, None, class_name, NORMAL_DEFECT_TYPE, "test") for p in normal_test]
    for folder in abnormal_dirs:
        folder = require_dir(folder, "anomalous images")
        images = list_image_files(folder)
        if not images:
            raise ValueError(f"no images found in anomalous image folder {folder}")
        defect_type = os.path.basename(os.path.normpath(folder))
        for image_path in images:
            mask_path = None
            if mask_dir is not None:
                per_defect = os.path.join(mask_dir, defect_type)
                mask_path = (find_mask(per_defect, image_path) if os.path.isdir(per_defect) else None) \
                    or find_mask(mask_dir, image_path)
                if mask_path is None and require_masks:
                    raise FileNotFoundError(
                        f"no mask for anomalous image {image_path} in {mask_dir} "
                        "(expected <stem>.png or <stem>_mask.png; pass require_masks=False to allow)")
            records.append(ImageRecord(image_path, 1, mask_path, class_name, defect_type, "test"))
    return records


def elpv_data_dir() -> str:
    """Folder holding `labels.csv` and `images/` inside the installed `elpv-dataset` package."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ImportError("ELPV needs the PyPI package elpv-dataset: pip install elpv-dataset") from exc
    return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def list_elpv(
    split: str,
    seed: int = 0,
    test_normal_fraction: float = 0.25,
    include_uncertain: bool = False,
    by_type: bool = False,
    classes: str | Iterable[str] | None = None,
    root: str | os.PathLike | None = None,
) -> list[ImageRecord]:
    """List the ELPV solar-cell images (read in place from the `elpv-dataset` package).

    Defect probability 0 = normal, 1.0 = defective. Cells rated 1/3 or 2/3 are left out,
    unless include_uncertain=True: then they are anomalous test images (defect_type
    "uncertain_p33" / "uncertain_p67"). The normal cells are split once with a seeded
    permutation: train = all but round(test_normal_fraction * n_normal) of them, test = the
    rest plus every anomalous cell. The split does not depend on by_type.
    Class name "elpv", or "elpv_mono" / "elpv_poly" when by_type=True.
    root: a folder with `labels.csv` and `images/` (default: the package's own data).
    """
    check_split(split)
    data_dir = require_dir(root, "ELPV data") if root is not None else elpv_data_dir()
    cells = _read_elpv_labels(os.path.join(data_dir, "labels.csv"))
    normal = [c for c in cells if c[1] == NORMAL_DEFECT_TYPE]
    train_idx, test_idx = seeded_holdout(len(normal), test_normal_fraction, seed)
    if split == "train":
        chosen = [(normal[i], 0) for i in train_idx]
    else:
        anomalous_types = {"defective"} | ({"uncertain_p33", "uncertain_p67"} if include_uncertain else set())
        chosen = [(normal[i], 0) for i in test_idx] + [(c, 1) for c in cells if c[1] in anomalous_types]

    def class_of(cell_type: str) -> str:
        return f"{ELPV_CLASS_NAME}_{cell_type}" if by_type else ELPV_CLASS_NAME

    available = sorted({class_of(c[2]) for c in cells})
    selected = select_classes(normalize_classes(classes), available, "ELPV")
    records = [
        ImageRecord(os.path.join(data_dir, rel_path), label, None, class_of(cell_type), defect_type, split)
        for (rel_path, defect_type, cell_type), label in chosen
        if class_of(cell_type) in selected
    ]
    if not records:
        raise ValueError(f"no ELPV {split!r} images for classes {selected}")
    return records


def _read_elpv_labels(labels_path: str) -> list[tuple[str, str, str]]:
    """(relative image path, defect_type, cell type) per line of ELPV's whitespace-separated labels.csv."""
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f"ELPV labels file not found: {labels_path}")
    cells = []
    with open(labels_path) as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(f"{labels_path}, line {line_number}: expected 'path probability type', got {line!r}")
            rel_path, probability, cell_type = fields[0], float(fields[1]), fields[2]
            matches = [t for p, t in ELPV_PROBABILITY_TYPES.items() if abs(probability - p) < 1e-6]
            if not matches:
                raise ValueError(
                    f"{labels_path}, line {line_number}: probability {probability} is not one of 0, 1/3, 2/3, 1"
                )
            cells.append((rel_path, matches[0], cell_type))
    if not cells:
        raise ValueError(f"ELPV labels file is empty: {labels_path}")
    return cells


def list_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    classes: str | Iterable[str] | None = None,
    **options,
) -> list[ImageRecord]:
    """List `split` of dataset `name` (one of DATASET_NAMES).

    root is the dataset folder; for "folder" it is the normal image folder (abnormal_dir,
    mask_dir, ... go in options; use class_name, not classes); for "elpv" it may be None
    (the installed package's data). Extra options go to the matching list_* function.
    """
    key = name.lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {list(DATASET_NAMES)}")
    if key == "elpv":
        return list_elpv(split, classes=classes, root=root, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder")
    if key == "folder":
        if classes is not None:
            raise ValueError("dataset 'folder' has a single class: pass class_name=... instead of classes")
        return list_folder(root, split=split, **options)
    listers = {"mvtec": list_mvtec, "visa": list_visa, "goodsad": list_goodsad}
    return listers[key](root, split, classes, **options)
