"""Tests for gradad.datasets: listing, loading, masks, error handling and the feature cache."""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from gradad.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    ImageRecord,
    list_dataset,
    list_elpv,
    list_folder,
    list_goodsad,
    list_mvtec,
    list_visa,
    load_mask,
    load_rgb,
)
from gradad.features import FeatureCache
from tests.synthetic import make_folder, make_mvtec, make_visa


@pytest.fixture
def mvtec(tmp_path):
    return make_mvtec(tmp_path / "mvtec", classes=("a", "b"), n_train=4, n_test_good=2, n_test_bad=3)


@pytest.fixture
def visa(tmp_path):
    return make_visa(tmp_path / "visa", classes=("a", "b"), n_train=4, n_test_good=2, n_test_bad=3, mask_values=(1, 3))


# ---------------------------------------------------------------- listing: MVTec / GoodsAD


def test_mvtec_train_lists_every_good_image(mvtec):
    records = list_mvtec(mvtec, "train")
    expected = sorted(str(p) for p in mvtec.glob("*/train/good/*.png"))
    assert sorted(r.path for r in records) == expected
    assert len(records) == 8
    assert all(r.label == 0 and r.mask_path is None and r.split == "train" for r in records)
    assert {r.class_name for r in records} == {"a", "b"}


def test_mvtec_test_labels_and_masks(mvtec):
    records = list_mvtec(mvtec, "test")
    assert len(records) == 2 * (2 + 3)
    for r in records:
        is_bad = Path(r.path).parent.name != "good"
        assert r.label == int(is_bad)
        if is_bad:
            assert r.defect_type == "broken"
            expected = mvtec / r.class_name / "ground_truth" / "broken" / (Path(r.path).stem + "_mask.png")
            assert r.mask_path == str(expected)
        else:
            assert r.mask_path is None and r.defect_type == "good"


def test_mvtec_class_filter_and_single_name(mvtec):
    only_a = list_mvtec(mvtec, "test", classes=["a"])
    assert {r.class_name for r in only_a} == {"a"} and len(only_a) == 5
    assert list_mvtec(mvtec, "test", classes="a") == only_a


def test_unknown_class_lists_available(mvtec):
    with pytest.raises(ValueError, match=r"zzz.*available classes: \['a', 'b'\]"):
        list_mvtec(mvtec, "train", classes=["a", "zzz"])


def test_missing_root_and_split_folder(mvtec, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_mvtec(tmp_path / "nowhere", "train")
    shutil.rmtree(mvtec / "b" / "test")
    with pytest.raises(FileNotFoundError, match=os.path.join("b", "test")):
        list_mvtec(mvtec, "test")


def test_empty_train_split_is_an_error(mvtec):
    for p in (mvtec / "a" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"class 'a'.*train"):
        list_mvtec(mvtec, "train", classes="a")


def test_bad_split_name(mvtec):
    with pytest.raises(ValueError, match="split"):
        list_mvtec(mvtec, "val")


def test_missing_mask_raises_unless_allowed(mvtec):
    missing = mvtec / "a" / "ground_truth" / "broken" / "001_mask.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="001_mask.png"):
        list_mvtec(mvtec, "test")
    records = list_mvtec(mvtec, "test", require_masks=False)
    no_mask = [r for r in records if r.label == 1 and r.mask_path is None]
    assert [Path(r.path).name for r in no_mask] == ["001.png"]


def test_goodsad_uses_mvtec_layout(mvtec):
    assert list_goodsad(mvtec, "test") == list_mvtec(mvtec, "test")


# ---------------------------------------------------------------- listing: VisA


def test_visa_listing_matches_csv(visa):
    with open(visa / "split_csv" / "1cls.csv") as handle:
        rows = list(csv.DictReader(handle))
    for split in ("train", "test"):
        records = list_visa(visa, split)
        expected = [(str(visa / r["image"]), int(r["label"] == "anomaly")) for r in rows if r["split"] == split]
        assert [(r.path, r.label) for r in records] == expected
    test = list_visa(visa, "test")
    assert sum(r.label for r in test) == 6
    assert all((r.mask_path is not None) == bool(r.label) for r in test)
    assert all(os.path.isfile(r.mask_path) for r in test if r.label)


def test_visa_class_filter_and_errors(visa, tmp_path):
    assert {r.class_name for r in list_visa(visa, "train", classes=["b"])} == {"b"}
    with pytest.raises(ValueError, match=r"available classes: \['a', 'b'\]"):
        list_visa(visa, "train", classes="candle")
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        list_visa(tmp_path, "train")


def test_visa_csv_missing_column_and_missing_image(visa):
    csv_path = visa / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("object,split,label,image,mask", "object,split,label,image"))
    with pytest.raises(ValueError, match=r"\['mask'\]"):
        list_visa(visa, "train")
    csv_path.write_text(text)
    (visa / "a" / "Data" / "Images" / "Normal" / "0001.JPG").unlink()
    with pytest.raises(FileNotFoundError, match="0001.JPG"):
        list_visa(visa, "train")


# ---------------------------------------------------------------- listing: plain folder


def test_folder_train_only(tmp_path):
    root = make_folder(tmp_path, n_normal=8, n_abnormal=3)
    records = list_folder(root / "normal")
    assert sorted(r.path for r in records) == sorted(str(p) for p in (root / "normal").glob("*.png"))
    with pytest.raises(ValueError, match="abnormal_dir"):
        list_folder(root / "normal", split="test")


@pytest.mark.parametrize("mask_suffix", ["", "_mask"])
def test_folder_seeded_split_and_masks(tmp_path, mask_suffix):
    root = make_folder(tmp_path, n_normal=8, n_abnormal=3, mask_suffix=mask_suffix)
    kwargs = dict(abnormal_dir=root / "abnormal", mask_dir=root / "masks", test_normal_fraction=0.25, seed=3)
    train = list_folder(root / "normal", split="train", **kwargs)
    test = list_folder(root / "normal", split="test", **kwargs)
    all_normal = {str(p) for p in (root / "normal").glob("*.png")}
    train_paths = {r.path for r in train}
    test_normal = {r.path for r in test if r.label == 0}
    assert len(train_paths) == 6 and len(test_normal) == 2
    assert train_paths.isdisjoint(test_normal) and train_paths | test_normal == all_normal
    assert train == list_folder(root / "normal", split="train", **kwargs)
    for r in test:
        if r.label:
            assert r.mask_path == str(root / "masks" / f"{Path(r.path).stem}{mask_suffix}.png")
    splits = {frozenset(r.path for r in list_folder(root / "normal", split="train", **{**kwargs, "seed": s}))
              for s in range(6)}
    assert len(splits) > 1


def test_folder_missing_mask(tmp_path):
    root = make_folder(tmp_path, n_normal=4, n_abnormal=2)
    (root / "masks" / "x001.png").unlink()
    with pytest.raises(FileNotFoundError, match="x001"):
        list_folder(root / "normal", root / "abnormal", root / "masks", split="test")


# ---------------------------------------------------------------- listing: ELPV


def _elpv_labels():
    """(relative path, probability, type) rows read straight from the package's labels file."""
    import elpv_dataset

    data_dir = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (data_dir / "labels.csv").read_text().splitlines() if line.strip()]
    return data_dir, [(p, float(q), t) for p, q, t in rows]


def test_elpv_split_sizes_disjoint_and_seeded():
    data_dir, rows = _elpv_labels()
    normal = {str(data_dir / p) for p, q, _ in rows if q == 0.0}
    defective = {str(data_dir / p) for p, q, _ in rows if q == 1.0}
    assert len(normal) == 1508 and len(defective) == 715  # counts published with the dataset
    train, test = list_elpv("train", seed=0), list_elpv("test", seed=0)
    n_test_normal = round(0.25 * len(normal))
    assert len(train) == len(normal) - n_test_normal
    assert len(test) == n_test_normal + len(defective)
    train_paths, test_paths = {r.path for r in train}, {r.path for r in test}
    assert train_paths.isdisjoint(test_paths)
    assert train_paths | {r.path for r in test if r.label == 0} == normal
    assert {r.path for r in test if r.label == 1} == defective
    assert all(os.path.isfile(p) for p in list(train_paths)[:20])
    assert list_elpv("train", seed=0) == train
    assert {r.path for r in list_elpv("train", seed=1)} != train_paths


def test_elpv_uncertain_and_by_type():
    data_dir, rows = _elpv_labels()
    uncertain = {str(data_dir / p) for p, q, _ in rows if 0 < q < 1}
    test = list_elpv("test", include_uncertain=True)
    assert uncertain <= {r.path for r in test if r.label == 1}
    assert len(test) == len(list_elpv("test")) + len(uncertain)
    by_type = list_elpv("train", by_type=True)
    cell_type = {str(data_dir / p): t for p, _, t in rows}
    assert all(r.class_name == f"elpv_{cell_type[r.path]}" for r in by_type)
    assert {r.path for r in by_type} == {r.path for r in list_elpv("train")}
    mono = list_elpv("train", by_type=True, classes="elpv_mono")
    assert {r.class_name for r in mono} == {"elpv_mono"}


# ---------------------------------------------------------------- list_dataset


def test_list_dataset_dispatch(mvtec, visa, tmp_path):
    assert list_dataset("mvtec", mvtec, "test", classes="a") == list_mvtec(mvtec, "test", classes="a")
    assert list_dataset("VisA", visa, "train") == list_visa(visa, "train")
    assert list_dataset("elpv", None, "train", seed=2) == list_elpv("train", seed=2)
    folder = make_folder(tmp_path / "f")
    listed = list_dataset("folder", folder / "normal", "test", abnormal_dir=folder / "abnormal",
                          mask_dir=folder / "masks")
    assert listed == list_folder(folder / "normal", folder / "abnormal", folder / "masks", split="test")
    with pytest.raises(ValueError, match="mvtec"):
        list_dataset("imagenet", mvtec, "train")


# ---------------------------------------------------------------- AnomalyDataset


def _reference_input(path, size):
    """Independent model input: PIL bilinear resize (antialiased), then ImageNet normalisation."""
    rgb = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)


def test_dataset_item_matches_independent_preprocessing(mvtec):
    records = list_mvtec(mvtec, "test", classes="a")
    dataset = AnomalyDataset(records, image_size=20, progress=False)
    bad_index = next(i for i, r in enumerate(records) if r.label == 1)
    item = dataset[bad_index]
    assert item["image"].shape == (3, 20, 20) and item["image"].dtype == torch.float32
    expected = _reference_input(records[bad_index].path, 20)
    # PIL rounds its resize to uint8: allow one grey level over std.
    assert np.abs(item["image"].permute(1, 2, 0).numpy() - expected).max() < 1.5 / 255 / min(IMAGENET_STD)
    expected_mask = np.asarray(Image.open(records[bad_index].mask_path).resize((20, 20), Image.NEAREST)) > 0
    assert item["mask"].shape == (1, 20, 20)
    assert np.array_equal(item["mask"][0].numpy(), expected_mask.astype(np.float32))
    assert item["label"] == 1 and item["has_mask"] is True and item["orig_size"] == (32, 32)
    assert item["path"] == records[bad_index].path and item["index"] == bad_index and item["class_name"] == "a"
    good = dataset[next(i for i, r in enumerate(records) if r.label == 0)]
    assert good["mask"].sum() == 0 and good["has_mask"] is True


def test_anomalous_without_mask_has_no_ground_truth(mvtec):
    record = next(r for r in list_mvtec(mvtec, "test") if r.label == 1)
    stripped = ImageRecord(record.path, 1, None, record.class_name, record.defect_type, "test")
    item = AnomalyDataset([stripped], image_size=16, progress=False)[0]
    assert item["has_mask"] is False and item["mask"].sum() == 0
    assert load_mask(stripped) is None


def test_grayscale_becomes_rgb(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, size=(24, 30), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    record = ImageRecord(str(tmp_path / "g.png"), 0, None, "g", "good", "train")
    assert np.array_equal(load_rgb(record), np.repeat(gray[:, :, None], 3, axis=2))
    image = AnomalyDataset([record], image_size=8, progress=False)[0]["image"]
    unnormalised = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(unnormalised[0], unnormalised[1], atol=1e-5)
    assert torch.allclose(unnormalised[0], unnormalised[2], atol=1e-5)


def test_visa_masks_binarised(visa):
    records = [r for r in list_visa(visa, "test") if r.label == 1]
    raw_values = {int(v) for r in records for v in np.unique(np.asarray(Image.open(r.mask_path)))}
    assert raw_values == {0, 1, 3}
    dataset = AnomalyDataset(records, image_size=32, progress=False)
    for i, record in enumerate(records):
        raw = np.asarray(Image.open(record.mask_path))
        assert np.array_equal(load_mask(record), raw != 0)
        assert np.array_equal(dataset[i]["mask"][0].numpy(), (raw != 0).astype(np.float32))


def test_mask_size_mismatch_names_mask(mvtec):
    records = list_mvtec(mvtec, "test", classes="a")
    bad = next(r for r in records if r.label == 1)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(bad.mask_path)
    with pytest.raises(ValueError, match=Path(bad.mask_path).name):
        AnomalyDataset(records, image_size=16, progress=False)
    with pytest.raises(ValueError, match=Path(bad.mask_path).name):
        load_mask(bad)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_skip_warns_and_raise_names_file(mvtec, damage):
    records = list_mvtec(mvtec, "train", classes="a")
    broken = Path(records[1].path)
    data = broken.read_bytes()
    broken.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(OSError, match=broken.name):
        AnomalyDataset(records, image_size=16, progress=False)
    with pytest.warns(UserWarning, match=broken.name):
        dataset = AnomalyDataset(records, image_size=16, on_error="skip", progress=False)
    assert [r.path for r in dataset.records] == [r.path for r in records if r.path != str(broken)]
    assert dataset.skipped_paths == [str(broken)]


def test_load_rgb_and_load_mask_full_resolution(mvtec):
    record = next(r for r in list_mvtec(mvtec, "test") if r.label == 1)
    assert np.array_equal(load_rgb(record), np.asarray(Image.open(record.path).convert("RGB")))
    resized = load_rgb(record, size=(16, 24))
    expected = np.asarray(Image.open(record.path).convert("RGB").resize((24, 16), Image.BILINEAR)).astype(int)
    assert resized.shape == (16, 24, 3) and resized.dtype == np.uint8
    assert np.abs(resized.astype(int) - expected).max() <= 1
    mask = load_mask(record)
    assert mask.dtype == bool and np.array_equal(mask, np.asarray(Image.open(record.mask_path)) == 255)


def test_dataloader_collates(mvtec):
    dataset = AnomalyDataset(list_mvtec(mvtec, "test"), image_size=16, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert batch["label"].tolist() == [r.label for r in dataset.records[:4]]


def test_dataset_rejects_bad_arguments(mvtec):
    records = list_mvtec(mvtec, "train", classes="a")
    with pytest.raises(ValueError, match="on_error"):
        AnomalyDataset(records, on_error="ignore", progress=False)
    with pytest.raises(ValueError, match="image_size"):
        AnomalyDataset(records, image_size=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        AnomalyDataset([], progress=False)


# ---------------------------------------------------------------- FeatureCache


class CountingExtractor:
    """Fake backbone: 4x4 average pooling plus a squared channel; counts the images it sees."""

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        pooled = F.avg_pool2d(images, 4)
        return torch.cat([pooled, pooled[:, :1] ** 2], dim=1)


def _direct_features(dataset):
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return CountingExtractor()(images)


def test_memory_cache_computes_only_missing(mvtec):
    dataset = AnomalyDataset(list_mvtec(mvtec, "test"), image_size=16, progress=False)
    cache = FeatureCache("fake/v1")
    cache.put(dataset.records[2], 16, _direct_features(dataset)[2])
    extractor = CountingExtractor()
    features = cache.features_for(dataset, extractor, batch_size=3, device="cpu", progress=False)
    assert extractor.images_seen == len(dataset) - 1
    assert features.shape == (len(dataset), 4, 4, 4)
    assert torch.allclose(features, _direct_features(dataset), atol=1e-6)
    again = CountingExtractor()
    assert torch.equal(cache.features_for(dataset, again, batch_size=3, progress=False), features)
    assert again.images_seen == 0


def test_disk_cache_survives_and_misses_on_change(mvtec, tmp_path):
    dataset = AnomalyDataset(list_mvtec(mvtec, "train"), image_size=16, progress=False)
    directory = tmp_path / "cache"
    first = FeatureCache("fake/v1", directory).features_for(dataset, CountingExtractor(), 4, progress=False)
    assert sorted(p.suffix for p in directory.iterdir()) == [".pt"] * len(dataset)  # no temp files left
    # Each file holds one image's features, not the storage of the whole batch it came from.
    one_image_bytes = first[0].numel() * first.element_size()
    assert {torch.load(p).untyped_storage().nbytes() for p in directory.iterdir()} == {one_image_bytes}

    reopened = CountingExtractor()
    again = FeatureCache("fake/v1", directory).features_for(dataset, reopened, 4, progress=False)
    assert reopened.images_seen == 0 and torch.equal(again, first)

    # New content with the old mtime (the size differs), and an untouched file with a new mtime.
    changed, touched = Path(dataset.records[0].path), Path(dataset.records[1].path)
    old_stat = changed.stat()
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    assert changed.stat().st_size != old_stat.st_size
    touched_stat = touched.stat()
    os.utime(touched, ns=(touched_stat.st_atime_ns, touched_stat.st_mtime_ns + 10**9))
    after_edit = CountingExtractor()
    updated = FeatureCache("fake/v1", directory).features_for(dataset, after_edit, 4, progress=False)
    assert after_edit.images_seen == 2
    assert torch.allclose(updated, _direct_features(dataset), atol=1e-6)
    assert not torch.allclose(updated[0], first[0])
    assert torch.equal(updated[1:], first[1:])

    other_backbone = CountingExtractor()
    FeatureCache("fake/v2", directory).features_for(dataset, other_backbone, 4, progress=False)
    assert other_backbone.images_seen == len(dataset)
    resized = AnomalyDataset(dataset.records, image_size=24, progress=False)
    other_size = CountingExtractor()
    FeatureCache("fake/v1", directory).features_for(resized, other_size, 4, progress=False)
    assert other_size.images_seen == len(dataset)


def test_cache_rejects_bad_extractor_output(mvtec):
    dataset = AnomalyDataset(list_mvtec(mvtec, "train", classes="a"), image_size=16, progress=False)
    with pytest.raises(ValueError, match="extractor_fn"):
        FeatureCache("fake").features_for(dataset, lambda x: x.mean(dim=1), 2, progress=False)
