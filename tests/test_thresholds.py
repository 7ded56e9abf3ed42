"""The decision threshold's rules and the training's convergence record: split.target_fpr /
--target-fpr in train, test, predict and export (against a threshold counted independently
here), the per-epoch validation statistics in the checkpoint (identical after a resume, the
last one equal to the stored validation), and the under-training note of train and test."""
import json

import numpy as np
import pytest

from gradad.checkpoint import SCORE_DRIFT_LIMIT, convergence_note, read_checkpoint
from gradad.cli import main
from gradad.config import SplitConfig
from gradad.engine import train
from gradad.inference import decision_threshold
from tests.test_cli import TINY_TRAIN
from tests.test_training import Interrupt, _interrupt_epoch, mvtec, tiny_config, with_split  # noqa: F401


def counted_threshold(normals, target):
    """The lowest of the normals' scores that at most ``target`` of them exceed, by counting."""
    normals = np.asarray(normals, dtype=np.float64)
    ok = [t for t in sorted(normals) if np.sum(normals > t) <= target * len(normals) + 1e-9]
    return min(ok)


def test_target_fpr_sets_the_stored_threshold(mvtec, tmp_path):  # noqa: F811
    cfg = with_split(tiny_config(mvtec), target_fpr=0.3)
    train(cfg, tmp_path, progress=False)
    validation = read_checkpoint(tmp_path)["validation"]
    assert validation["target_fpr"] == 0.3 and validation["quantile"] is None
    assert validation["threshold"] == counted_threshold(validation["scores"], 0.3)
    value, source = decision_threshold(read_checkpoint(tmp_path))
    assert value == validation["threshold"] and source == f"target FPR 30% of {len(validation['scores'])} " \
                                                          f"validation normals"


@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.9])
def test_decision_threshold_for_a_target_fpr(target):
    rng = np.random.default_rng(1)
    scores = list(np.round(rng.normal(size=12), 1))  # ties included
    checkpoint = {"path": "c", "validation": {"scores": scores, "threshold": 9.0, "quantile": 0.99}}
    value, source = decision_threshold(checkpoint, target_fpr=target)
    assert value == counted_threshold(scores, target) and np.mean(np.array(scores) > value) <= target
    assert source.startswith(f"target FPR {100 * target:g}%")
    assert decision_threshold(checkpoint) == (9.0, "validation quantile 0.99")
    with pytest.raises(ValueError, match="not quantile and target_fpr"):
        decision_threshold(checkpoint, quantile=0.5, target_fpr=target)
    with pytest.raises(ValueError, match="target_fpr must be in"):
        decision_threshold(checkpoint, target_fpr=1.5)
    with pytest.raises(ValueError, match="split.target_fpr"):
        SplitConfig(target_fpr=-0.1)


def test_target_fpr_on_the_command_line(mvtec, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mvtec", "--root", str(mvtec), "--out", str(run), *TINY_TRAIN,
                 "--target-fpr", "0.5"]) == 0
    validation = read_checkpoint(run)["validation"]
    expected = counted_threshold(validation["scores"], 0.5)
    assert validation["threshold"] == expected
    assert main(["test", "--checkpoint", str(run), "--out", str(tmp_path / "t1"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "t1" / "metrics.json").read_text())
    assert report["operating_points"]["all"]["stored"]["threshold"] == expected
    assert main(["test", "--checkpoint", str(run), "--out", str(tmp_path / "t2"), "--no-progress",
                 "--target-fpr", "0.0"]) == 0
    report = json.loads((tmp_path / "t2" / "metrics.json").read_text())
    assert report["operating_points"]["all"]["stored"]["threshold"] == max(validation["scores"])
    image = next((mvtec / "a" / "test" / "good").iterdir())
    assert main(["predict", str(image), "--checkpoint", str(run), "--out", str(tmp_path / "p"), "--no-progress",
                 "--target-fpr", "0.0"]) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert results["threshold"] == max(validation["scores"]) and "target FPR 0%" in results["threshold_source"]
    # --threshold-quantile over a config file that asked for target_fpr: the quantile decides
    again, config = tmp_path / "again", tmp_path / "config.yaml"
    config.write_text("split:\n  target_fpr: 0.5\n")
    assert main(["train", "--dataset", "mvtec", "--root", str(mvtec), "--out", str(again), *TINY_TRAIN,
                 "--config", str(config), "--threshold-quantile", "0.5"]) == 0
    stored = read_checkpoint(again)["validation"]
    assert stored["target_fpr"] is None and stored["threshold"] == pytest.approx(np.quantile(stored["scores"], 0.5))


def test_export_takes_a_target_fpr(mvtec, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mvtec", "--root", str(mvtec), "--out", str(run), *TINY_TRAIN]) == 0
    scores = read_checkpoint(run)["validation"]["scores"]
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "e"),
                 "--target-fpr", "0.25"]) == 0
    meta = json.loads((tmp_path / "e" / "model.json").read_text())
    assert meta["threshold"] == pytest.approx(counted_threshold(scores, 0.25))
    assert meta["threshold_source"].startswith("target FPR 25%")
    with pytest.raises(SystemExit):  # one rule at a time: argparse refuses both
        main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "f"),
              "--target-fpr", "0.25", "--quantile", "0.5"])


def test_the_checkpoint_records_every_epochs_validation_scores(mvtec, tmp_path, monkeypatch):  # noqa: F811
    cfg = tiny_config(mvtec, epochs=3, lr_step=2, lr_gamma=0.5)
    train(cfg, tmp_path / "straight", progress=False)
    straight = read_checkpoint(tmp_path / "straight")
    history = straight["validation_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    validation = straight["validation"]
    scores = np.array(validation["scores"])
    last = history[-1]
    assert last["threshold"] == validation["threshold"] and last["count"] == len(scores)
    assert last["median"] == pytest.approx(np.median(scores)) and last["max"] == pytest.approx(scores.max())
    with monkeypatch.context() as patch:
        _interrupt_epoch(patch, at_epoch=2)
        with pytest.raises(Interrupt):
            train(cfg, tmp_path / "resumed", progress=False)
    assert [h["epoch"] for h in read_checkpoint(tmp_path / "resumed")["validation_history"]] == [1, 2]
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert read_checkpoint(tmp_path / "resumed")["validation_history"] == history


def _history(*medians):
    return [{"epoch": i + 1, "median": m, "threshold": 2 * m} for i, m in enumerate(medians)]


def test_convergence_note_is_about_the_last_epochs_change():
    assert convergence_note(_history(5.0)) is None
    assert convergence_note([]) is None
    assert convergence_note(_history(9.0, 5.0, 5.0 * (1 + SCORE_DRIFT_LIMIT / 2))) is None
    note = convergence_note(_history(5.0, 4.0))
    assert note.startswith("under-trained?") and "25.0%" in note and "train.epochs" in note
    assert convergence_note(_history(-2.0, -1.0)) is not None  # a negative scale is no excuse


def test_train_and_test_say_when_scores_are_still_moving(mvtec, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    # random weights, 2 epochs, a high learning rate: the validation scores swing between epochs
    with pytest.warns(UserWarning, match="under-trained"):
        assert main(["train", "--dataset", "mvtec", "--root", str(mvtec), "--out", str(run), *TINY_TRAIN,
                     "--set", "train.epochs=2", "--set", "train.lr=0.05"]) == 0
    history = read_checkpoint(run)["validation_history"]
    assert convergence_note(history) is not None
    assert main(["test", "--checkpoint", str(run), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert any("under-trained" in note for note in report["training_notes"])
    assert "under-trained" in (tmp_path / "t" / "report.html").read_text()
