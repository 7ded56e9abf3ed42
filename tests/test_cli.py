"""End-to-end tests of the ``gradad`` command line: train → test → predict on tiny synthetic
MVTec- and VisA-layout datasets, and the errors bad input gets.

Random backbone weights (asked for explicitly) and a 32-pixel input keep every run short.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import gradad.io_utils
from gradad.checkpoint import read_checkpoint
from gradad.cli import build_config, build_parser, main
from gradad.config import preset_config
from tests.synthetic import make_folder, make_mvtec, make_visa

TINY = ["--set", "model.backbone=efficientnet_lite0", "--set", "model.backbone_weights=random",
        "--set", "model.input_size=32", "--set", "model.fusion=crad-s", "--set", "model.num_blocks=1",
        "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.num_workers=0",
        "--device", "cpu", "--no-progress"]
TINY_TRAIN = TINY + ["--val-fraction", "0.34"]


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data") / "mvtec", classes=("a", "b"), n_train=6,
                      n_test_good=3, n_test_bad=3, size=40)


@pytest.fixture(scope="module")
def trained(mvtec, tmp_path_factory):
    """A run folder trained once on the MVTec-layout data, shared by the error tests."""
    out = tmp_path_factory.mktemp("run")
    assert run_cli("train", "--dataset", "mvtec", "--root", mvtec, "--out", out, *TINY_TRAIN) == 0
    return out


def _check_test_report(report: Path, classes):
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["results"]) == set(classes) | {"mean"}
    rows = read_csv(report / "scores.csv")
    for name in classes:
        labels = [int(r["label"]) for r in rows if r["class"] == name]
        scores = [float(r["score"]) for r in rows if r["class"] == name]
        assert metrics["results"][name]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
        assert metrics["results"][name]["pixel_auroc"] is not None  # both layouts have masks
    assert (report / "roc_curves.png").is_file() and (report / "metrics.csv").is_file()
    return rows


@pytest.mark.parametrize("layout", ["mvtec", "visa"])
def test_train_test_predict_end_to_end(layout, tmp_path, capsys):
    maker = make_mvtec if layout == "mvtec" else make_visa
    root = maker(tmp_path / layout, classes=("a", "b"), n_train=6, n_test_good=3, n_test_bad=3, size=40)
    run = tmp_path / "run"
    assert run_cli("train", "--dataset", layout, "--root", root, "--out", run, *TINY_TRAIN) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()

    report = tmp_path / "report"
    assert run_cli("test", "--checkpoint", run / "checkpoint.pt", "--out", report, "--set", "eval.heatmaps=4",
                   "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "mean" in printed
    rows = _check_test_report(report, ("a", "b"))
    assert len(rows) == 2 * (3 + 3)
    assert len(list((report / "heatmaps").glob("*.png"))) == 4

    # predict on a folder and a file of class a's test images: same scores as the test run,
    # decisions at the checkpoint's threshold (the 99th percentile of the held-out normals' scores)
    normal = sorted(r["path"] for r in rows if r["class"] == "a" and r["label"] == "0")[0]
    folder = Path(sorted(r["path"] for r in rows if r["class"] == "a" and r["label"] == "1")[0]).parent
    images = sorted([normal] + [str(p) for p in folder.iterdir()])
    predicted = tmp_path / "predicted"
    assert run_cli("predict", folder, normal, "--checkpoint", run, "--out", predicted, "--no-progress") == 0
    results = json.loads((predicted / "results.json").read_text())
    validation = read_checkpoint(run)["validation"]
    assert results["threshold"] == pytest.approx(np.quantile(validation["scores"], 0.99))
    test_scores = {r["path"]: float(r["score"]) for r in rows}
    assert sorted(r["path"] for r in results["images"]) == images
    for row in results["images"]:
        assert row["score"] == pytest.approx(test_scores[row["path"]], rel=1e-5)
        assert row["anomalous"] == (row["score"] > results["threshold"])
        assert Path(row["heatmap"]).is_file()
    csv_rows = read_csv(predicted / "results.csv")
    assert [r["path"] for r in csv_rows] == [r["path"] for r in results["images"]]


def test_train_model_bigrid_runs_both_stages_then_tests_and_predicts(mvtec, tmp_path, capsys):
    run = tmp_path / "bigrid"
    assert run_cli("train", "--model", "bigrid", "--dataset", "mvtec", "--root", mvtec, "--out", run, *TINY_TRAIN,
                   "--set", "bigrid.abnormal_epochs=1", "--set", "bigrid.normal_epochs=1") == 0
    assert "(2 epochs" in capsys.readouterr().out
    stored = read_checkpoint(run)
    assert stored["config"]["model"]["architecture"] == "bigrid" and stored["epoch"] == 2
    assert any(key.startswith("abnormal.") for key in stored["model"])
    assert run_cli("test", "--checkpoint", run, "--out", tmp_path / "report", "--no-progress") == 0
    _check_test_report(tmp_path / "report", ("a", "b"))
    folder = mvtec / "a" / "test" / "broken"
    assert run_cli("predict", folder, "--checkpoint", run, "--out", tmp_path / "predicted", "--no-progress") == 0
    # a bigrid checkpoint is not a GRAD one: asking for the other architecture is refused
    err = _error(capsys, "test", "--checkpoint", run, "--set", "model.architecture=grad", "--no-progress")
    assert "model.architecture" in err


def test_predict_in_chunks_gives_the_same_scores(trained, mvtec, tmp_path, monkeypatch):
    import gradad.inference

    folder = mvtec / "b" / "test" / "broken"
    assert run_cli("predict", folder, "--checkpoint", trained, "--out", tmp_path / "whole", "--no-progress") == 0
    monkeypatch.setattr(gradad.inference, "PREDICT_CHUNK", 2)
    assert run_cli("predict", folder, folder / "000.png", "--checkpoint", trained, "--out", tmp_path / "chunks",
                   "--no-progress") == 0
    whole, chunks = (json.loads((tmp_path / name / "results.json").read_text())["images"]
                     for name in ("whole", "chunks"))
    assert [r["path"] for r in chunks] == [r["path"] for r in whole]  # the repeated file is scored once
    for a, b in zip(whole, chunks):
        assert a["score"] == pytest.approx(b["score"], rel=1e-6)


def test_explicit_threshold_and_quantile(trained, mvtec, tmp_path):
    image = sorted((mvtec / "a" / "test" / "broken").glob("*.png"))[0]
    assert run_cli("predict", image, "--checkpoint", trained, "--out", tmp_path / "t", "--threshold", "-1",
                   "--no-progress") == 0
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert results["threshold"] == -1.0 and results["images"][0]["anomalous"]
    assert run_cli("predict", image, "--checkpoint", trained, "--out", tmp_path / "q", "--quantile", "0.5",
                   "--no-progress") == 0
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    scores = read_checkpoint(trained)["validation"]["scores"]
    assert results["threshold"] == pytest.approx(np.median(scores))


def test_python_dash_m_runs_the_same_cli():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                       str(Path(__file__).parents[1])]))
    done = subprocess.run([sys.executable, "-m", "gradad", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0
    for command in ("train", "test", "predict", "demo"):
        assert command in done.stdout


# ------------------------------------------------------------------------------ configuration


def test_config_layers_preset_yaml_flags_and_set(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  epochs: 7\n  lr: 0.002\ndata:\n  dataset: visa\n")
    args = build_parser().parse_args(["train", "--preset", "lite-demo", "--config", str(yaml_file),
                                      "--dataset", "mvtec", "--classes", "a,b", "--device", "cpu",
                                      "--set", "train.epochs=9", "--set", "model.jitter_std=0.1"])
    cfg = build_config(args)
    preset = preset_config("lite-demo")
    assert cfg.model.backbone == preset.model.backbone  # from the preset
    assert cfg.train.lr == 0.002  # from the YAML file
    assert cfg.data.dataset == "mvtec" and cfg.data.classes == ["a", "b"]  # flags beat YAML
    assert cfg.train.epochs == 9 and cfg.model.jitter_std == 0.1  # --set comes last
    assert cfg.train.device == "cpu"


def test_every_recipe_value_is_a_flag():
    args = build_parser().parse_args(["train", "--set", "train.lr_grid=0.05", "--set", "train.lr=1e-4",
                                      "--set", "train.weight_decay=0", "--set", "train.grad_clip=1",
                                      "--set", "train.lr_step=5", "--set", "train.lr_gamma=0.5",
                                      "--set", "train.epochs=3", "--set", "train.batch_size=8",
                                      "--set", "train.seed=4", "--set", "train.amp_bf16=true"])
    train = build_config(args).train
    assert (train.lr_grid, train.lr, train.weight_decay, train.grad_clip, train.lr_step, train.lr_gamma,
            train.epochs, train.batch_size, train.seed, train.amp_bf16) == (0.05, 1e-4, 0, 1, 5, 0.5, 3, 8, 4, True)


# ------------------------------------------------------------------------------ bad input


def _error(capsys, *argv) -> str:
    assert run_cli(*argv) == 1
    return capsys.readouterr().err


def test_missing_dataset_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    message = _error(capsys, "train", "--dataset", "mvtec", "--root", missing, "--out", tmp_path / "o", *TINY)
    assert str(missing) in message


def test_unknown_class_and_dataset_and_key(mvtec, tmp_path, capsys):
    message = _error(capsys, "train", "--dataset", "mvtec", "--root", mvtec, "--classes", "a,zebra",
                     "--out", tmp_path / "o", *TINY)
    assert "zebra" in message
    assert "bogus" in _error(capsys, "train", "--dataset", "bogus", "--root", mvtec, *TINY)
    assert "train.epoch" in _error(capsys, "train", "--dataset", "mvtec", "--root", mvtec, "--set",
                                   "train.epoch=3", *TINY)


def test_corrupt_training_image_raises_or_is_skipped(tmp_path, capsys):
    root = make_mvtec(tmp_path / "mvtec", classes=("a",), n_train=7, size=40)
    corrupt = root / "a" / "train" / "good" / "003.png"
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated PNG
    message = _error(capsys, "train", "--dataset", "mvtec", "--root", root, "--out", tmp_path / "o", *TINY_TRAIN)
    assert str(corrupt) in message
    with pytest.warns(UserWarning, match="003.png"):  # the warning names the skipped file
        assert run_cli("train", "--dataset", "mvtec", "--root", root, "--out", tmp_path / "skip",
                       *TINY_TRAIN, "--set", "data.on_error=skip") == 0
    stored = read_checkpoint(tmp_path / "skip")
    assert str(corrupt) not in stored["validation"]["paths"]


def test_mask_of_the_wrong_size(trained, tmp_path, capsys):
    root = make_mvtec(tmp_path / "mvtec", classes=("a", "b"), n_train=6, n_test_good=3, n_test_bad=3, size=40)
    mask = root / "a" / "ground_truth" / "broken" / "001_mask.png"
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(mask)
    message = _error(capsys, "test", "--checkpoint", trained, "--root", root, "--out", tmp_path / "r",
                     "--no-progress")
    assert str(mask) in message


def test_checkpoint_of_another_config(trained, tmp_path, capsys):
    out = ["--out", tmp_path / "r", "--no-progress"]
    message = _error(capsys, "test", "--checkpoint", trained, "--set", "model.backbone=efficientnet_lite2", *out)
    assert "model.backbone" in message and "efficientnet_lite2" in message
    message = _error(capsys, "test", "--checkpoint", trained, "--set", "model.num_blocks=3", *out)
    assert "model.num_blocks" in message
    message = _error(capsys, "test", "--checkpoint", trained, "--set", "model.input_size=64", *out)
    assert "model.input_size" in message
    message = _error(capsys, "test", "--checkpoint", trained, "--preset", "grad", *out)
    assert "model.backbone" in message


def test_checkpoint_whose_backbone_weights_or_channels_changed(trained, tmp_path, capsys):
    stored = read_checkpoint(trained)
    stored.pop("path")
    stored["backbone"]["weights_id"] = "file:other.pth:sha256=0123"
    torch.save(stored, tmp_path / "other_weights.pt")
    message = _error(capsys, "test", "--checkpoint", tmp_path / "other_weights.pt", "--no-progress")
    assert "other.pth" in message and "backbone weights" in message
    stored = read_checkpoint(trained)
    stored.pop("path")
    stored["model"]["local_grid"] = torch.zeros(64, 8, 8)  # as if trained on 64-channel features
    torch.save(stored, tmp_path / "other_channels.pt")
    message = _error(capsys, "test", "--checkpoint", tmp_path / "other_channels.pt", "--no-progress")
    assert "other_channels.pt" in message and "local_grid" in message


def test_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert "nothing.pt" in _error(capsys, "test", "--checkpoint", tmp_path / "nothing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert "not a gradad" in _error(capsys, "predict", tmp_path, "--checkpoint", foreign)


def test_predict_bad_images(trained, mvtec, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    assert str(missing) in _error(capsys, "predict", missing, "--checkpoint", trained, "--no-progress")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _error(capsys, "predict", empty, "--checkpoint", trained, "--no-progress")
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((mvtec / "a" / "test" / "good").glob("*.png"))
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    corrupt = folder / "zz_corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "pred"
    assert str(corrupt) in _error(capsys, "predict", folder, "--checkpoint", trained, "--out", out, "--no-progress")
    with pytest.warns(UserWarning, match="zz_corrupt.png"):
        assert run_cli("predict", folder, "--checkpoint", trained, "--out", out, "--on-error", "skip",
                       "--no-progress") == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["path"] for r in results["images"]] == [str(folder / p.name) for p in good]
    assert results["skipped_images"] == [str(corrupt)]


def test_unfinished_checkpoint_is_refused(trained, tmp_path, capsys):
    stored = read_checkpoint(trained)
    stored.pop("path")
    stored["complete"] = False
    torch.save(stored, tmp_path / "unfinished.pt")
    message = _error(capsys, "predict", tmp_path, "--checkpoint", tmp_path / "unfinished.pt", "--no-progress")
    assert "unfinished" in message and "--resume" in message


def test_interrupted_report_leaves_no_partial_file(trained, tmp_path, monkeypatch):
    calls = []
    original_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # metrics.json was written; metrics.csv is interrupted mid-write
            raise KeyboardInterrupt
        return original_fsync(fd)

    monkeypatch.setattr(gradad.io_utils.os, "fsync", failing_fsync)
    report = tmp_path / "report"
    assert run_cli("test", "--checkpoint", trained, "--out", report, "--set", "eval.heatmaps=0",
                   "--no-progress") == 130
    assert sorted(os.listdir(report)) == ["metrics.json"]
    json.loads((report / "metrics.json").read_text())  # complete


def test_per_class_run_is_tested_class_by_class(mvtec, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--dataset", "mvtec", "--root", mvtec, "--out", run, "--set", "data.unified=false",
                   *TINY_TRAIN) == 0
    assert (run / "a" / "checkpoint.pt").is_file() and (run / "b" / "checkpoint.pt").is_file()
    report = tmp_path / "report"
    assert run_cli("test", "--checkpoint", run, "--out", report, "--set", "eval.heatmaps=0", "--no-progress") == 0
    rows = _check_test_report(report, ("a", "b"))
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["checkpoints"] == [str(run / "a" / "checkpoint.pt"), str(run / "b" / "checkpoint.pt")]
    image = rows[0]["path"]
    assert "one class" in _error(capsys, "predict", image, "--checkpoint", run, "--no-progress")
    assert run_cli("predict", image, "--checkpoint", run / "a" / "checkpoint.pt", "--out", tmp_path / "p",
                   "--no-progress") == 0


def _make_elpv_like(root: Path, n_normal=12, n_defective=4, size=40) -> Path:
    """An ELPV-layout folder (labels.csv + images/), grayscale cells; defective ones have a dark bar."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n_normal + n_defective):
        cell = rng.integers(100, 160, size=(size, size), dtype=np.uint8)
        defective = i >= n_normal
        if defective:
            cell[size // 3: size // 3 + 4, :] = 0
        Image.fromarray(cell).save(root / "images" / f"cell{i:04d}.png")
        lines.append(f"images/cell{i:04d}.png  {1.0 if defective else 0.0}  mono")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_demo_trains_evaluates_and_writes_the_report(tmp_path, capsys):
    root = _make_elpv_like(tmp_path / "elpv")
    out = tmp_path / "demo"
    assert run_cli("demo", "--root", root, "--out", out, *TINY, "--max-train-images", "8",
                   "--val-fraction", "0.25") == 0
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "n/a" in printed  # ELPV has no masks: pixel metrics n/a
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "elpv" and set(metrics["results"]) == {"elpv", "mean"}
    assert metrics["results"]["elpv"]["pixel_auroc"] is None
    stored = read_checkpoint(out)
    assert stored["config"]["model"]["backbone"] == "efficientnet_lite0"
    assert len(stored["validation"]["paths"]) == 2  # 8 capped images, a quarter held out
    # test split: the normals left out of training (a quarter, seeded) plus every defective cell
    rows = read_csv(out / "scores.csv")
    assert sum(int(r["label"]) for r in rows) == 4 and len(rows) == 4 + 3
    assert (out / "roc_curves.png").is_file() and list((out / "heatmaps").glob("*.png"))


def _odd_images(folder: Path) -> dict:
    """Readable images of every awkward size and mode, and two files that are not scorable."""
    rng = np.random.default_rng(11)
    folder.mkdir()
    shapes = {"tiny_1x1": (1, 1, 3), "small_30x30": (30, 30, 3), "wide_64x16": (16, 64, 3),
              "big_4000x3000": (3000, 4000, 3)}
    for name, shape in shapes.items():
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)).save(folder / "deep_16bit.png")
    readable = sorted(str(p) for p in folder.iterdir())
    (folder / "not_an_image.png").write_bytes(b"plain text, not a PNG")  # unreadable: skipped
    # a float image: its header is fine, but there is no 8-bit view of it, so it fails when scored
    Image.fromarray(rng.random((20, 24), dtype=np.float32), mode="F").save(folder / "float.tiff")
    return {"readable": readable, "unreadable": str(folder / "not_an_image.png"),
            "unscorable": str(folder / "float.tiff")}


def test_predict_scores_every_readable_image_and_keeps_the_rest(trained, tmp_path, monkeypatch, capsys):
    import gradad.inference

    monkeypatch.setattr(gradad.inference, "PREDICT_CHUNK", 3)  # the failing image shares a chunk
    files = _odd_images(tmp_path / "odd")
    for on_error, status in (("skip", 0), ("raise", 1)):
        out = tmp_path / on_error
        with pytest.warns(UserWarning, match="not_an_image.png"):
            assert run_cli("predict", tmp_path / "odd", "--checkpoint", trained, "--out", out,
                           "--on-error", on_error, "--no-progress") == status
        results = json.loads((out / "results.json").read_text())
        assert sorted(r["path"] for r in results["images"]) == files["readable"]
        assert all(np.isfinite(r["score"]) and Path(r["heatmap"]).is_file() for r in results["images"])
        assert results["skipped_images"] == [files["unreadable"]]
        assert list(results["failed_images"]) == [files["unscorable"]]
        assert len(read_csv(out / "results.csv")) == len(files["readable"])
        err = capsys.readouterr().err
        assert ("could not be scored" in err) == (on_error == "raise")


def test_test_without_masks_reports_image_metrics_and_notes_the_pixel_ones(tmp_path, capsys):
    # MVTec layout; class 'b' has no ground_truth/ at all, class 'a' lost one defect mask
    root = make_mvtec(tmp_path / "data", classes=("a", "b"), n_train=6, n_test_good=3, n_test_bad=3, size=40)
    shutil.rmtree(root / "b" / "ground_truth")
    next((root / "a" / "ground_truth").rglob("*.png")).unlink()
    run = tmp_path / "run"
    assert run_cli("train", "--dataset", "mvtec", "--root", root, "--out", run, *TINY_TRAIN) == 0
    capsys.readouterr()
    assert run_cli("test", "--checkpoint", run, "--out", tmp_path / "test", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "pixel metrics n/a: no masks for 'b'" in printed
    assert "pixel metrics of 'a': the masked subset, 2 of its 3 anomalous images" in printed
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert metrics["results"]["b"]["pixel_auroc"] is None and metrics["results"]["b"]["image_auroc"] is not None
    assert metrics["results"]["a"]["pixel_auroc"] is not None
    assert metrics["pixel_masks"] == {"a": {"anomalous_with_mask": 2, "anomalous": 3},
                                      "b": {"anomalous_with_mask": 0, "anomalous": 3}}
    # asking for masks makes the missing ones an error naming the file
    err = _error(capsys, "test", "--checkpoint", run, "--set", "data.require_masks=true", "--no-progress")
    assert "no mask for anomalous image" in err


def test_folder_dataset_trains_tests_and_predicts_from_the_cli(tmp_path, capsys):
    # anomalib's Folder layout: good/, one folder per defect type, masks per defect type, and
    # a separate folder of normal test images
    base = make_folder(tmp_path / "src", n_normal=10, n_abnormal=4)
    root = tmp_path / "parts"
    (root / "good").mkdir(parents=True)
    for i, path in enumerate(sorted((base / "normal").glob("*.png"))):
        target = root / ("good" if i < 7 else "good_test")
        target.mkdir(exist_ok=True)
        shutil.copy(path, target / path.name)
    for i, path in enumerate(sorted((base / "abnormal").glob("*.png"))):
        defect = "crack" if i % 2 else "scratch"
        (root / defect).mkdir(exist_ok=True)
        (root / "masks" / defect).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / defect / path.name)
        shutil.copy(base / "masks" / path.name, root / "masks" / defect / path.name)
    folder_flags = ["--dataset", "folder", "--root", root, "--set", "data.normal_dir=good",
                    "--set", "data.abnormal_dirs=crack,scratch", "--set", "data.mask_dir=masks",
                    "--set", "data.normal_test_dir=good_test"]
    run = tmp_path / "run"
    assert run_cli("train", *folder_flags, "--out", run, *TINY_TRAIN) == 0
    assert run_cli("test", "--checkpoint", run, "--out", tmp_path / "test", "--no-progress") == 0
    scores = read_csv(tmp_path / "test" / "scores.csv")
    assert sorted({row["defect_type"] for row in scores}) == ["crack", "good", "scratch"]
    assert len(scores) == 3 + 4  # the normal test folder and every anomalous image
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert metrics["results"]["folder"]["pixel_auroc"] is not None  # every defect has its mask
    assert run_cli("predict", root / "crack", "--checkpoint", run, "--out", tmp_path / "predict", "--no-progress") == 0
    assert len(json.loads((tmp_path / "predict" / "results.json").read_text())["images"]) == 2
    capsys.readouterr()
    # the folder keys belong to the folder dataset
    assert "data.abnormal_dirs" in _error(capsys, "train", "--dataset", "mvtec", "--root", root,
                                          "--set", "data.abnormal_dirs=crack", *TINY_TRAIN)
