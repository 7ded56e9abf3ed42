"""Operating points of a decision threshold on the image score: what a threshold costs on a
labelled test split (good parts rejected, defects missed) and which threshold gives a chosen
false-alarm rate.

Conventions (the same everywhere in gradad): label 1 = anomalous; an image is called
anomalous when its score is **strictly above** the threshold (score > t). The counts:

- tp: anomalous images called anomalous; fn: anomalous images called normal (defects missed);
- fp: normal images called anomalous (good parts rejected); tn: normal images called normal;
- precision = tp / (tp + fp), None when nothing is called anomalous;
- recall = tp / (tp + fn), None when there is no anomalous image;
- fpr = fp / (fp + tn), None when there is no normal image.

Thresholds for a target false-positive rate come from the validation normals only
(:func:`threshold_for_fpr`, :func:`target_point`), so they are honest estimates for deployment;
the F1-max threshold (:func:`f1_max_threshold`) is tuned on the test split itself and only
shows the best a single threshold could do there. :func:`operating_points` builds the record
of a whole test run.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

# The target false-positive rates of the operating-point table: 0.1 %, 1 % and 5 %.
TARGET_FPRS = (0.001, 0.01, 0.05)
# The key of the record that pools every test image.
ALL_KEY = "all"
TUNED_ON_TEST = "test split"

Thresholds = Union[float, np.ndarray, Sequence[float]]
StoredThreshold = Union[None, float, Mapping[str, Optional[float]]]


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same length, got {labels.size} and {scores.size}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contains NaN or infinite values")
    return labels.astype(bool), scores


def _ratio(numerator: int, denominator: int) -> Optional[float]:
    return numerator / denominator if denominator else None


def confusion(labels, scores, thresholds: Thresholds) -> Dict[str, object]:
    """Confusion counts and rates of the decision score > threshold.

    Args:
        labels: (N,) 0/1, 1 = anomalous.
        scores: (N,) finite image scores.
        thresholds: one threshold for every image, or (N,) thresholds, one per image (e.g. each
            image's own class's threshold).

    Returns:
        {'tp', 'fp', 'tn', 'fn': int, 'precision', 'recall', 'fpr': float or None where
        undefined (see the module docstring)}.
    """
    is_anomalous, scores = _labels_scores(labels, scores)
    limits = np.asarray(thresholds, dtype=np.float64)
    if limits.ndim and limits.shape != scores.shape:
        raise ValueError(f"thresholds must be one value or one per image ({scores.size}), got {limits.shape}")
    if not np.isfinite(limits).all():
        raise ValueError("thresholds must be finite")
    flagged = scores > limits
    tp, fp = int((flagged & is_anomalous).sum()), int((flagged & ~is_anomalous).sum())
    fn, tn = int(is_anomalous.sum()) - tp, int((~is_anomalous).sum()) - fp
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn), "fpr": _ratio(fp, fp + tn)}


def threshold_for_fpr(normal_scores, target: float) -> float:
    """The threshold for a target false-positive rate, from normal (validation) images only.

    The threshold t is the lowest of the normals' scores such that the fraction of them with
    score > t is at most ``target``: with the scores sorted ascending s_1 <= ... <= s_n and
    k = floor(target * n) normals allowed above it, t = s_(n - k) (tied scores all fall on one
    side of t, so fewer than k may be above it). With fewer than 1 / target normals (k = 0) no
    normal may be flagged and t is their maximum (see :func:`target_point`, which says so).

    Args:
        normal_scores: the image scores of normal images (the validation normals), at least one.
        target: the false-positive rate aimed at, in [0, 1).
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1), got {target!r}")
    _, scores = _labels_scores(np.zeros(np.size(normal_scores), dtype=int), normal_scores)
    if scores.size == 0:
        raise ValueError("threshold_for_fpr needs at least one normal score")
    allowed = math.floor(target * scores.size + 1e-9)  # the tolerance absorbs the rounding of target * n
    return float(np.sort(scores)[max(scores.size - 1 - allowed, 0)])


def target_point(normal_scores, target: float) -> Optional[Dict[str, object]]:
    """:func:`threshold_for_fpr` with what it achieves on the normals it came from.

    Returns:
        None without normal scores; else {'target_fpr', 'threshold', 'validation_fpr' (the
        fraction of the normals with score > threshold), 'n_validation' (their number n),
        'note': None, or a sentence when n < 1 / target (the threshold is then their maximum,
        the achieved rate 0, and the true rate below 1 / n is not measured)}.
    """
    if normal_scores is None or np.size(normal_scores) == 0:
        return None
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    threshold = threshold_for_fpr(scores, target)
    n = scores.size
    note = None
    if target > 0 and math.floor(target * n + 1e-9) == 0:
        note = f"only {n} validation normals, fewer than 1/{target:g} = {1 / target:g}: the threshold is their maximum"
    return {"target_fpr": float(target), "threshold": threshold,
            "validation_fpr": int((scores > threshold).sum()) / n, "n_validation": n, "note": note}


def f1_max_threshold(labels, scores) -> Optional[Dict[str, object]]:
    """The threshold that maximises F1 on these labelled images (tuned on them: not for deployment).

    Candidates flag the images with score >= s for every distinct score s; under score > t that
    is t = the next lower distinct score (a test score), or, for flagging every image, the float
    just below the lowest score. Equal F1: the highest threshold (fewest images flagged). The F1
    found equals :func:`gradad.metrics.f1_max`.

    Returns:
        None without anomalous images (F1 is 0 at every threshold); else :func:`confusion` at
        the threshold with 'threshold', 'f1' and 'tuned_on' ('test split').
    """
    is_anomalous, scores = _labels_scores(labels, scores)
    positives = int(is_anomalous.sum())
    if positives == 0:
        return None
    values = np.unique(scores)  # ascending
    # images with score >= values[k]: positives and flagged counts from the top
    tp = positives - np.searchsorted(np.sort(scores[is_anomalous]), values, side="left")
    flagged = scores.size - np.searchsorted(np.sort(scores), values, side="left")
    f1 = 2 * tp / (flagged + positives)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # the highest threshold among equal F1
    threshold = float(values[best - 1]) if best > 0 else float(np.nextafter(values[0], -np.inf))
    return {"threshold": threshold, "f1": float(f1[best]), **confusion(is_anomalous, scores, threshold),
            "tuned_on": TUNED_ON_TEST}


def _pooled_target(per_class: Mapping[str, Optional[Dict[str, object]]]) -> Optional[Dict[str, object]]:
    """One target's validation facts over several classes' own thresholds."""
    if not per_class or any(v is None for v in per_class.values()):
        return None
    n = sum(v["n_validation"] for v in per_class.values())
    above = sum(round(v["validation_fpr"] * v["n_validation"]) for v in per_class.values())
    capped = [name for name, v in per_class.items() if v["note"] is not None]
    first = next(iter(per_class.values()))
    note = (f"fewer than 1/{first['target_fpr']:g} validation normals for {', '.join(capped)}: their "
            f"threshold is the maximum of their normals" if capped else None)
    return {"target_fpr": first["target_fpr"], "threshold": {k: v["threshold"] for k, v in per_class.items()},
            "validation_fpr": above / n, "n_validation": n, "note": note}


def _per_image(values: Mapping[str, Optional[float]], classes: np.ndarray) -> Optional[np.ndarray]:
    """Each image's own class's value, or None when some class of these images has none."""
    if any(values.get(c) is None for c in np.unique(classes)):
        return None
    return np.array([values[c] for c in classes], dtype=np.float64)


def _record(labels, scores, classes, stored, source, targets, f1_max) -> Dict[str, object]:
    """One class's (or the pooled) record. stored: {class: threshold or None}; targets: per
    target (its validation facts or None, {class: target_point or None}); each image is
    judged by its own class's threshold."""
    present = list(dict.fromkeys(classes.tolist()))
    limits = _per_image(stored, classes)
    shown = stored[present[0]] if len({stored[c] for c in present}) == 1 else {c: stored[c] for c in present}
    record = {"images": int(labels.size), "anomalous": int(labels.sum()), "normal": int(labels.size - labels.sum()),
              "stored": None if limits is None else {"threshold": shown, "source": source,
                                                     **confusion(labels, scores, limits)},
              "targets": []}
    for facts, by_class in targets:
        limits = _per_image({c: None if v is None else v["threshold"] for c, v in by_class.items()}, classes)
        record["targets"].append(None if facts is None or limits is None else
                                 {**facts, **confusion(labels, scores, limits)})
    record["f1_max"] = f1_max
    return record


def operating_points(labels, scores, classes: Sequence[str], threshold: StoredThreshold,
                     threshold_source: Optional[str],
                     validation_scores: Mapping[Optional[str], Optional[Sequence[float]]],
                     targets: Sequence[float] = TARGET_FPRS) -> Dict[str, Dict[str, object]]:
    """The operating-point record of a test run: {class: record, ..., 'all': record}.

    Args:
        labels, scores, classes: per test image its 0/1 label, image score and class name.
        threshold: the stored decision threshold. A float or None: a unified run (one model
            for every class), whose target thresholds come from ``validation_scores[None]`` and
            are shared by every class. {class: float or None}: a per-class run (one model and
            one validation set per class), each image judged by its own class's thresholds,
            the targets' from ``validation_scores[class]``.
        threshold_source: where it came from (e.g. 'validation quantile 0.99').
        validation_scores: the validation normals' image scores per model, {None: [...]} or
            {class: [...]}; a missing or None entry gives no target thresholds there.
        targets: the target false-positive rates.

    Returns:
        Per class and for 'all' (every test image pooled, each judged by its own class's
        thresholds): {'images', 'anomalous', 'normal'; 'stored': the threshold, its source and
        :func:`confusion` on the test images, or None without a threshold; 'targets': per
        target, :func:`target_point` of the validation normals with the :func:`confusion`
        it gives on the test images, or None without validation scores; 'f1_max':
        :func:`f1_max_threshold` of the test images}. A 'threshold' is a float when one applies
        to all the record's images, else {class: float}. The F1-max of 'all' is tuned on the
        pooled scores in a unified run (one shared threshold); in a per-class run it pools each
        class's own F1-max threshold (a class without anomalies flagging none of its images).
    """
    is_anomalous, scores = _labels_scores(labels, scores)
    labels = is_anomalous.astype(int)
    classes = np.asarray(list(classes), dtype=object)
    if classes.shape != scores.shape:
        raise ValueError(f"classes must have one name per image ({scores.size}), got {classes.size}")
    names = list(dict.fromkeys(classes.tolist()))
    if ALL_KEY in names:
        raise ValueError(f"a class must not be named {ALL_KEY!r} (the key of every image pooled)")
    unified = not isinstance(threshold, Mapping)
    stored = {n: threshold if unified else threshold.get(n) for n in names}
    # per target: {class: target_point of the validation normals that judge its images}
    found = [{n: target_point(validation_scores.get(None if unified else n), t) for n in names}
             for t in targets]
    records: Dict[str, Dict[str, object]] = {}
    for name in names:
        pick = classes == name
        records[name] = _record(labels[pick], scores[pick], classes[pick], stored, threshold_source,
                                [(by_class[name], by_class) for by_class in found],
                                f1_max_threshold(labels[pick], scores[pick]))
    pooled = [(by_class[names[0]] if unified else _pooled_target(by_class), by_class) for by_class in found]
    records[ALL_KEY] = _record(labels, scores, classes, stored, threshold_source, pooled,
                               f1_max_threshold(labels, scores) if unified else
                               _pooled_f1(records, labels, scores, classes))
    return records


def _pooled_f1(records, labels, scores, classes) -> Optional[Dict[str, object]]:
    """Every image judged by its own class's F1-max threshold (per-class runs); a class without
    anomalies flags none of its images (its threshold is its highest score)."""
    if not labels.any():
        return None
    chosen = {n: float(scores[classes == n].max()) if records[n]["f1_max"] is None
              else records[n]["f1_max"]["threshold"] for n in np.unique(classes)}
    counts = confusion(labels, scores, _per_image(chosen, classes))
    return {"threshold": chosen, "f1": 2 * counts["tp"] / (2 * counts["tp"] + counts["fp"] + counts["fn"]),
            **counts, "tuned_on": TUNED_ON_TEST}
