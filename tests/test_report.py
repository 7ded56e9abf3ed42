"""Report outputs and atomic writes."""

import csv
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from gradad import io_utils, report
from gradad.metrics import METRIC_KEYS
from gradad.operating_points import operating_points
from gradad.report.figures import roc_curves_png
from gradad.report.tables import OPERATING_POINT_COLUMNS


def _results():
    full = dict(zip(METRIC_KEYS, [0.9531, 0.5, 1.0, 0.12345, 0.0, 0.999, 0.8768]))
    no_pixels = {key: (0.25 if key.startswith("image") else None) for key in METRIC_KEYS}
    mean = {key: 0.5 for key in METRIC_KEYS}
    return {"mean": mean, "bottle": full, "elpv": no_pixels}  # mean given first on purpose


def test_format_table():
    lines = report.format_table(_results()).splitlines()
    assert lines[0].split() == ["class", *METRIC_KEYS]
    assert set(lines[1]) == {"-"}
    assert [line.split()[0] for line in lines[2:]] == ["bottle", "elpv", "mean"]
    assert lines[2].split()[1:] == ["95.3", "50.0", "100.0", "12.3", "0.0", "99.9", "87.7"]
    assert lines[3].split()[1:] == ["25.0", "25.0", "25.0", "n/a", "n/a", "n/a", "n/a"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_format_table_rejects_missing_metric():
    with pytest.raises(ValueError, match="'bottle'.*aupro"):
        report.format_table({"bottle": {k: 0.5 for k in METRIC_KEYS if k != "aupro"}})


def test_write_metrics_round_trip(tmp_path):
    results = _results()
    extra = {"protocol": "strict", "model": {"name": "grad", "epochs": 50}}
    json_path, csv_path = report.write_metrics(tmp_path / "run", results, extra)
    assert json.loads(json_path.read_text()) == {**extra, "results": results}
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["class", *METRIC_KEYS]
    assert [row[0] for row in rows[1:]] == ["bottle", "elpv", "mean"]
    assert [float(v) for v in rows[1][1:]] == [results["bottle"][k] for k in METRIC_KEYS]
    assert rows[2][4:] == ["", "", "", ""]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.csv", "metrics.json"]


def _points(per_class):
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 0])
    scores = np.array([0.1, 0.6, 0.7, 0.3, 0.2, 0.9, 0.4, 0.5])
    classes = ["bottle"] * 4 + ["elpv"] * 4
    threshold = {"bottle": 0.5, "elpv": 0.45} if per_class else 0.5
    normals = ({"bottle": list(np.linspace(0, 0.5, 30)), "elpv": list(np.linspace(0, 0.4, 120))} if per_class
               else {None: list(np.linspace(0, 0.5, 200))})
    return operating_points(labels, scores, classes, threshold, "validation quantile 0.99", normals)


@pytest.mark.parametrize("per_class", [False, True])
def test_write_metrics_with_operating_points(tmp_path, per_class):
    results, points = _results(), _points(per_class)
    json_path, csv_path = report.write_metrics(tmp_path, results, {"protocol": "strict"}, points)
    assert json.loads(json_path.read_text()) == {"protocol": "strict", "results": results,
                                                 "operating_points": points}
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["class", *METRIC_KEYS, *OPERATING_POINT_COLUMNS]
    assert "f1max_threshold_tuned_on_test" in rows[0] and "val_fpr_0.001_test_recall" in rows[0]
    for row, key in zip(rows, ["bottle", "elpv", "all"]):  # the mean row carries the pooled 'all' record
        record = points[key]
        stored = record["stored"]
        for name in ("tp", "fp", "tn", "fn"):
            assert int(row[f"stored_{name}"]) == stored[name]
        for name in ("precision", "recall", "fpr"):
            assert row[f"stored_{name}"] == ("" if stored[name] is None else repr(stored[name]))
        for target, entry in zip(("0.001", "0.01", "0.05"), record["targets"]):
            threshold = "" if isinstance(entry["threshold"], dict) else repr(entry["threshold"])
            assert (row[f"val_fpr_{target}_threshold"], float(row[f"val_fpr_{target}_test_recall"]),
                    float(row[f"val_fpr_{target}_test_fpr"])) == (threshold, entry["recall"], entry["fpr"])
        f1_threshold = record["f1_max"]["threshold"]
        assert row["f1max_threshold_tuned_on_test"] == ("" if isinstance(f1_threshold, dict) else repr(f1_threshold))
    assert rows[2]["class"] == "mean" and int(rows[2]["stored_tp"]) == points["all"]["stored"]["tp"]
    assert rows[2]["stored_threshold"] == ("" if per_class else "0.5")
    assert rows[0]["stored_threshold"] == "0.5"
    # 30 normals: 0.1 % and 1 % are their maximum; the pooled 'all' of a per-class run has per-class thresholds
    assert points["bottle"]["targets"][0]["note"] is not None
    with pytest.raises(ValueError, match="operating_points"):
        report.write_metrics(tmp_path, results, {"operating_points": 1}, points)


def test_roc_marks_the_stored_threshold():
    labels, scores = np.array([0, 0, 1, 1, 0, 1]), np.array([0.1, 0.6, 0.7, 0.3, 0.2, 0.9])
    plain = roc_curves_png({"a": (labels, scores)})
    assert roc_curves_png({"a": (labels, scores)}, None) == plain
    marked = roc_curves_png({"a": (labels, scores)}, 0.5)
    assert marked != plain and roc_curves_png({"a": (labels, scores)}, {"a": 0.5}) == marked
    assert roc_curves_png({"a": (labels, scores)}, {"a": None}) == plain
    assert roc_curves_png({"a": (labels, scores)}, 0.25) != marked  # another point
    with pytest.raises(ValueError, match="class 'a': the threshold must be a finite number"):
        roc_curves_png({"a": (labels, scores)}, float("inf"))


def test_write_metrics_rejects_bad_input_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        report.write_metrics(tmp_path, _results(), {"results": 1})
    bad = _results()
    bad["bottle"]["pixel_ap"] = float("nan")
    with pytest.raises(ValueError):
        report.write_metrics(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_serialising_leaves_no_file(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(RuntimeError):
        report.write_metrics(tmp_path, _results())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    io_utils.atomic_write_text(target, "old contents")

    def fail(fd):
        raise OSError("fsync failed")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        io_utils.atomic_write_bytes(target, b"new contents that never land")
    assert target.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_text_contents_and_permissions(tmp_path):
    path = io_utils.atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(FileNotFoundError):
        io_utils.atomic_write_text(tmp_path / "missing" / "a.txt", "x")


def test_hash_file_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)  # over two of hash_file's 1 MiB chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert io_utils.hash_file(path).hexdigest() == hashlib.sha256(data).hexdigest()
    both = hashlib.md5()
    io_utils.hash_file(path, both)
    io_utils.hash_file(path, both)  # an existing digest is updated, not replaced
    assert both.hexdigest() == hashlib.md5(data + data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert io_utils.hash_file(tmp_path / "empty").hexdigest() == hashlib.sha256(b"").hexdigest()


def test_save_heatmap_overlays(tmp_path):
    # Gray images: every colourful pixel of the PNG comes from the heatmap (or its colour bar).
    images = [np.full((48, 64, 3), 128, dtype=np.uint8), np.full((30, 30), 90, dtype=np.uint8)]
    maps = [np.tile(np.linspace(0, 1, 64), (48, 1)), np.tile(np.linspace(0, 3, 30)[:, None], (1, 30))]
    paths = report.save_heatmap_overlays(tmp_path / "heat", images, maps, ["cut_000", "gray_001"])
    assert [p.name for p in paths] == ["cut_000.png", "gray_001.png"]
    for path, gray in zip(paths, (128, 90)):
        with Image.open(path) as png:
            assert png.format == "PNG" and png.mode == "RGB"
            assert png.size == (800, 400)
            pixels = np.asarray(png)
        colourfulness = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
        assert colourfulness[:, :400].max() <= 2  # left: the gray original only
        assert (pixels[:, :400] == gray).all(axis=2).mean() > 0.1  # with its own gray level
        assert (colourfulness[:, 400:] > 40).mean() > 0.05  # right: the jet overlay
    assert sorted(p.name for p in (tmp_path / "heat").iterdir()) == ["cut_000.png", "gray_001.png"]


def test_save_heatmap_overlays_errors(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"maps\[0\] has shape"):
        report.save_heatmap_overlays(tmp_path, [image], [np.zeros((8, 9))], ["a"])
    with pytest.raises(ValueError, match="plain file names"):
        report.save_heatmap_overlays(tmp_path, [image], [np.zeros((8, 8))], ["../a"])
    with pytest.raises(ValueError, match="unique"):
        report.save_heatmap_overlays(tmp_path, [image, image], [np.zeros((8, 8))] * 2, ["a", "a"])
    with pytest.raises(ValueError, match=r"images\[0\] must be"):
        report.save_heatmap_overlays(tmp_path, [image.astype(float)], [np.zeros((8, 8))], ["a"])
    with pytest.raises(ValueError, match="same length"):
        report.save_heatmap_overlays(tmp_path, [image], [], ["a"])
    assert list(tmp_path.iterdir()) == []


def test_save_roc_curves(tmp_path):
    rng = np.random.default_rng(1)
    per_class = {name: (np.arange(20) % 2, rng.random(20) + 0.3 * (np.arange(20) % 2))
                 for name in ("bottle", "cable")}
    path = report.save_roc_curves(tmp_path, per_class)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (600, 600)
    with pytest.raises(ValueError, match="class 'bad'.*one class"):
        report.save_roc_curves(tmp_path / "x", {"bad": (np.zeros(4), np.arange(4.0))})
