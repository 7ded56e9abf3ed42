"""gradad.operating_points against scikit-learn and against plain counting written here."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from gradad.metrics import f1_max
from gradad.operating_points import (
    ALL_KEY,
    TARGET_FPRS,
    confusion,
    f1_max_threshold,
    operating_points,
    target_point,
    threshold_for_fpr,
)


def _counts(labels, flagged):
    """tp, fp, tn, fn by scikit-learn's confusion matrix (rows: true 0/1, columns: called 0/1)."""
    (tn, fp), (fn, tp) = skm.confusion_matrix(labels, flagged, labels=[0, 1])
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _brute_threshold(normals, target):
    """The lowest normal score t with (normals above t) / n <= target, by trying every one."""
    n = len(normals)
    for t in sorted(set(normals)):
        if sum(s > t for s in normals) <= target * n + 1e-9:
            return t
    raise AssertionError("unreachable: the maximum always qualifies")


# ------------------------------------------------------------------------------ confusion

@pytest.mark.parametrize("seed", range(5))
def test_confusion_matches_scikit_learn_with_ties_at_the_threshold(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 8, 60).astype(float)  # many ties
    threshold = float(scores[0])  # images at exactly the threshold are called normal
    got = confusion(labels, scores, threshold)
    flagged = (scores > threshold).astype(int)
    assert {k: got[k] for k in ("tp", "fp", "tn", "fn")} == _counts(labels, flagged)
    assert got["precision"] == pytest.approx(skm.precision_score(labels, flagged, zero_division=np.nan)) \
        if flagged.any() else got["precision"] is None
    assert got["recall"] == pytest.approx(skm.recall_score(labels, flagged))
    assert got["fpr"] == pytest.approx(got["fp"] / (labels == 0).sum())
    assert (scores == threshold).sum() >= 1 and got["tp"] + got["fp"] == (scores > threshold).sum()


def test_confusion_with_one_threshold_per_image():
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([0.5, 0.5, 0.9, 0.1, 2.0, 2.0])
    limits = np.array([0.4, 0.5, 1.0, 0.0, 1.0, 3.0])
    flagged = [int(s > t) for s, t in zip(scores, limits)]  # [1, 0, 0, 1, 1, 0]
    got = confusion(labels, scores, limits)
    assert {k: got[k] for k in ("tp", "fp", "tn", "fn")} == _counts(labels, flagged) == \
        {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert (got["precision"], got["recall"], got["fpr"]) == (2 / 3, 2 / 3, 1 / 3)
    with pytest.raises(ValueError, match="one per image"):
        confusion(labels, scores, limits[:3])


def test_confusion_says_none_where_a_rate_is_undefined():
    no_normals = confusion([1, 1], [0.2, 0.8], 0.5)
    assert no_normals["fpr"] is None and no_normals["recall"] == 0.5 and no_normals["precision"] == 1.0
    no_anomalies = confusion([0, 0, 0], [0.2, 0.8, 0.1], 0.5)
    assert no_anomalies["recall"] is None and no_anomalies["fpr"] == pytest.approx(1 / 3)
    nothing_flagged = confusion([0, 1], [0.2, 0.3], 0.5)
    assert nothing_flagged["precision"] is None and nothing_flagged["recall"] == 0.0
    with pytest.raises(ValueError, match="0 .normal. or 1"):
        confusion([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        confusion([0, 1], [0.1, float("nan")], 0.5)


# ------------------------------------------------------------------------------ target FPR

@pytest.mark.parametrize("n", [1, 7, 19, 20, 21, 99, 100, 150, 1000, 2345])
@pytest.mark.parametrize("target", TARGET_FPRS)
def test_threshold_for_fpr_is_the_lowest_normal_score_within_the_target(n, target):
    rng = np.random.default_rng(n)
    normals = list(rng.integers(0, max(n // 3, 2), n).astype(float))  # ties everywhere
    threshold = threshold_for_fpr(normals, target)
    assert threshold == _brute_threshold(normals, target)
    point = target_point(normals, target)
    above = sum(s > threshold for s in normals)
    assert point["threshold"] == threshold and point["n_validation"] == n
    assert point["validation_fpr"] == above / n <= target + 1e-12
    assert (point["note"] is not None) == (n * target < 1)


def test_fewer_normals_than_one_over_the_target_give_their_maximum_and_say_so():
    normals = [0.3, 0.9, 0.1, 0.5]
    for target in TARGET_FPRS:
        point = target_point(normals, target)
        assert point["threshold"] == 0.9 and point["validation_fpr"] == 0.0 and point["n_validation"] == 4
        assert "only 4 validation normals" in point["note"] and "maximum" in point["note"]
    assert threshold_for_fpr(normals, 0.0) == 0.9 and target_point(normals, 0.0)["note"] is None


def test_threshold_for_fpr_at_exact_counts_and_ties():
    normals = list(np.arange(100.0))
    assert threshold_for_fpr(normals, 0.01) == 98.0  # one of 100 above: 99
    assert threshold_for_fpr(normals, 0.05) == 94.0  # five above: 95..99
    assert threshold_for_fpr(list(np.arange(20.0)), 0.05) == 18.0  # 0.05 * 20 = 1 exactly
    tied = [1.0] * 10 + [2.0] * 5  # 5 of 15 above 1.0: more than 1 % / 5 % allows
    assert threshold_for_fpr(tied, 0.05) == 2.0 and threshold_for_fpr(tied, 0.34) == 1.0
    assert target_point(None, 0.01) is None and target_point([], 0.01) is None
    with pytest.raises(ValueError, match="target"):
        threshold_for_fpr(normals, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        threshold_for_fpr([], 0.01)


# ------------------------------------------------------------------------------ F1-max

@pytest.mark.parametrize("seed", range(6))
def test_f1_max_threshold_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 10, 40) + 0.8 * labels
    best = f1_max_threshold(labels, scores)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nanmax(2 * precision * recall / (precision + recall))
    assert best["f1"] == pytest.approx(expected) == pytest.approx(f1_max(labels, scores))
    flagged = (scores > best["threshold"]).astype(int)
    assert best["f1"] == pytest.approx(skm.f1_score(labels, flagged))
    assert best["threshold"] in set(scores) or best["threshold"] < scores.min()
    assert best["tuned_on"] == "test split"
    assert {k: best[k] for k in ("tp", "fp", "tn", "fn")} == _counts(labels, flagged)
    # the highest of the thresholds with that F1
    higher = [t for t in set(scores) if t > best["threshold"]]
    assert all(skm.f1_score(labels, (scores > t).astype(int)) < best["f1"] - 1e-12 for t in higher)


def test_f1_max_threshold_edge_cases():
    flag_all = f1_max_threshold([1, 0, 1], [0.0, 1.0, 2.0])  # flagging every image is best
    assert flag_all["f1"] == pytest.approx(0.8) and flag_all["threshold"] < 0.0 and flag_all["tp"] == 2
    assert flag_all["threshold"] == np.nextafter(0.0, -1.0)
    assert f1_max_threshold([0, 0], [0.1, 0.2]) is None  # no anomalies: F1 is 0 everywhere
    # a normal and an anomaly tied at 0.5 fall on the same side: > 0.5 gives F1 2/3, > 0.1 gives 4/5
    tied = f1_max_threshold([0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1])
    assert tied["threshold"] == 0.1 and (tied["tp"], tied["fp"], tied["f1"]) == (2, 1, pytest.approx(0.8))
    # equal F1 (2/3) at > 0.5 (tp 1, fn 1) and > 0.2 (tp 2, fp 2): the higher threshold, fewer images flagged
    even = f1_max_threshold([1, 0, 0, 1, 0], [0.9, 0.5, 0.4, 0.3, 0.2])
    assert even["threshold"] == 0.5 and even["f1"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ a test run

def _run(seed=0):
    rng = np.random.default_rng(seed)
    classes = np.array(["a"] * 30 + ["b"] * 20 + ["c"] * 10)  # c: normals only
    labels = np.r_[rng.integers(0, 2, 30), rng.integers(0, 2, 20), np.zeros(10, int)]
    labels[[0, 1, 30, 31]] = [0, 1, 0, 1]
    scores = rng.normal(size=60) + 1.5 * labels + (classes == "b") * 3.0  # b's scores sit higher
    return labels, scores, classes


def test_unified_run_shares_the_thresholds_of_its_one_validation_set():
    labels, scores, classes = _run()
    normals = list(np.random.default_rng(9).normal(size=150))
    points = operating_points(labels, scores, classes, 0.8, "validation quantile 0.99", {None: normals})
    assert list(points) == ["a", "b", "c", ALL_KEY]
    for name, pick in [("a", classes == "a"), ("b", classes == "b"), ("c", classes == "c"),
                       (ALL_KEY, np.ones(60, bool))]:
        record = points[name]
        assert (record["images"], record["anomalous"]) == (pick.sum(), labels[pick].sum())
        stored = record["stored"]
        assert stored["threshold"] == 0.8 and stored["source"] == "validation quantile 0.99"
        assert {k: stored[k] for k in ("tp", "fp", "tn", "fn")} == _counts(labels[pick], scores[pick] > 0.8)
        for target, entry in zip(TARGET_FPRS, record["targets"]):
            t = _brute_threshold(normals, target)
            assert entry["threshold"] == t and entry["target_fpr"] == target and entry["n_validation"] == 150
            flagged = scores[pick] > t
            negatives, positives = flagged[labels[pick] == 0], flagged[labels[pick] == 1]
            assert entry["fpr"] == pytest.approx(negatives.mean())
            assert entry["recall"] == (pytest.approx(positives.mean()) if positives.size else None)
    assert points["c"]["f1_max"] is None and points["c"]["stored"]["recall"] is None
    # 'all' is tuned on the pooled scores: one threshold for every image
    pooled = points[ALL_KEY]["f1_max"]
    assert pooled["f1"] == pytest.approx(f1_max(labels, scores)) and isinstance(pooled["threshold"], float)
    # 150 normals: 1 % and 5 % are resolved, 0.1 % is their maximum and says so
    notes = [e["note"] for e in points["a"]["targets"]]
    assert notes[0] is not None and notes[1:] == [None, None]


def test_per_class_run_judges_each_image_by_its_own_class():
    labels, scores, classes = _run(1)
    thresholds = {"a": 0.9, "b": 3.6, "c": 0.2}
    rng = np.random.default_rng(3)
    normals = {"a": list(rng.normal(size=120)), "b": list(rng.normal(size=40) + 3.0), "c": list(rng.normal(size=5))}
    points = operating_points(labels, scores, classes, thresholds, "validation quantile 0.99", normals)
    own = np.array([thresholds[c] for c in classes])
    tp = fp = tn = fn = 0
    for s, y, t in zip(scores, labels, own):  # counted one image at a time
        tp, fp = tp + (s > t and y == 1), fp + (s > t and y == 0)
        tn, fn = tn + (s <= t and y == 0), fn + (s <= t and y == 1)
    pooled = points[ALL_KEY]
    assert {k: pooled["stored"][k] for k in ("tp", "fp", "tn", "fn")} == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert pooled["stored"]["threshold"] == thresholds  # differs per class
    for name in thresholds:
        assert points[name]["stored"]["threshold"] == thresholds[name]
        assert sum(points[name]["stored"][k] for k in ("tp", "fp", "tn", "fn")) == (classes == name).sum()
    for i, target in enumerate(TARGET_FPRS):
        own_t = {n: _brute_threshold(normals[n], target) for n in normals}
        for name in normals:
            assert points[name]["targets"][i]["threshold"] == own_t[name]
            assert points[name]["targets"][i]["n_validation"] == len(normals[name])
        entry = pooled["targets"][i]
        assert entry["threshold"] == own_t and entry["n_validation"] == 165
        above = sum(sum(s > own_t[n] for s in normals[n]) for n in normals)
        assert entry["validation_fpr"] == pytest.approx(above / 165)
        flagged = scores > np.array([own_t[c] for c in classes])
        assert entry["fpr"] == pytest.approx(flagged[labels == 0].mean())
        assert entry["recall"] == pytest.approx(flagged[labels == 1].mean())
        assert "c" in entry["note"]  # 5 normals are too few for every target
    # the pooled F1-max: each class's own threshold, class c (no anomalies) flagging none of its images
    chosen = pooled["f1_max"]["threshold"]
    assert chosen["a"] == points["a"]["f1_max"]["threshold"] and chosen["c"] == scores[classes == "c"].max()
    flagged = scores > np.array([chosen[c] for c in classes])
    assert pooled["f1_max"]["f1"] == pytest.approx(skm.f1_score(labels, flagged))


def test_missing_thresholds_and_validation_scores():
    labels, scores, classes = _run(2)
    points = operating_points(labels, scores, classes, {"a": 0.5, "b": None, "c": 0.1}, None,
                              {"a": [0.1, 0.2], "b": None})
    assert points["b"]["stored"] is None and points[ALL_KEY]["stored"] is None
    assert points["a"]["stored"]["threshold"] == 0.5
    assert points["b"]["targets"] == [None] * 3 and points["c"]["targets"] == [None] * 3
    assert points[ALL_KEY]["targets"] == [None] * 3 and points["a"]["targets"][0]["threshold"] == 0.2
    unified = operating_points(labels, scores, classes, None, None, {})
    assert unified[ALL_KEY]["stored"] is None and unified[ALL_KEY]["targets"] == [None] * 3
    assert math.isclose(unified[ALL_KEY]["f1_max"]["f1"], f1_max(labels, scores))
    with pytest.raises(ValueError, match="named 'all'"):
        operating_points([0, 1], [0.1, 0.2], ["all", "all"], 0.5, None, {})
    with pytest.raises(ValueError, match="one name per image"):
        operating_points([0, 1], [0.1, 0.2], ["a"], 0.5, None, {})
