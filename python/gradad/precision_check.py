"""The accuracy check of a reduced-precision export (gradad.quantize): the held-back images
(the checkpoint's validation normals and its run's test split), their scores under the float32
and the reduced file in the same runtime, the refusal of an AUROC drop beyond the limit, and the
decision threshold chosen again from the reduced model's own scores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .deploy import Scorer
from .inference import LoadedModel, decision_threshold
from .listings import config_listing
from .metrics import auroc


class AccuracyError(ValueError):
    """The reduced-precision model lost more image AUROC than allowed: nothing was written."""


@dataclass(frozen=True)
class HeldBack:
    """The images of the accuracy check: the validation normals (paths, in the checkpoint's
    order) and the test split (paths, labels 0/1; empty when the run has none, ``test_note``
    says why)."""

    validation: List[str]
    test: List[str]
    test_labels: np.ndarray
    test_note: Optional[str] = None

    @property
    def paths(self) -> List[str]:
        """All held-back images, validation normals first."""
        return self.validation + self.test


def held_back_images(loaded: LoadedModel) -> HeldBack:
    """The checkpoint's validation normals and its run's test split (re-listed from its config)."""
    validation = list((loaded.checkpoint.get("validation") or {}).get("paths") or [])
    missing = [p for p in validation if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"checkpoint {loaded.path}: its validation normals are needed to measure the "
                                f"reduced precision and to choose its threshold, but {len(missing)} are missing, "
                                f"e.g. {missing[0]}")
    try:
        records = config_listing(loaded.config, "test")
        note = None if records else "the run's test split is empty"
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        records, note = [], f"no test split ({error})"
    return HeldBack(validation, [r.path for r in records], np.array([r.label for r in records], dtype=int), note)


def _scores(scorer: Scorer, paths: Sequence[str], batch_size: int) -> np.ndarray:
    return np.array([p.score for p in scorer.predict(paths, batch_size=batch_size)], dtype=np.float64)


def measure_accuracy(reference: Scorer, reduced: Scorer, held_back: HeldBack, batch_size: int) -> tuple:
    """Scores the held-back images with both models (N,) and compares them.

    Returns (report dict, the reduced model's scores of the validation normals). The report:
    counts, image AUROC on the test split of each model and its drop (None without both normal
    and anomalous test images), and the largest absolute score change over all images, also
    relative to the largest float32 score."""
    if not held_back.paths:
        raise ValueError("the accuracy check needs held-back images: the checkpoint has no validation normals "
                         "and the run no test split")
    ref = _scores(reference, held_back.paths, batch_size)
    low = _scores(reduced, held_back.paths, batch_size)
    count = len(held_back.validation)
    labels = held_back.test_labels
    both = labels.size and 0 < labels.sum() < labels.size
    ref_auroc = auroc(labels, ref[count:]) if both else None
    low_auroc = auroc(labels, low[count:]) if both else None
    change = np.abs(low - ref)
    report = {"validation_normals": count, "test_images": int(labels.size), "test_anomalous": int(labels.sum()),
              "auroc_fp32": ref_auroc, "auroc": low_auroc,
              "auroc_drop": None if ref_auroc is None else ref_auroc - low_auroc,
              "max_score_change": float(change.max()),
              "max_score_change_relative": float(change.max() / max(np.abs(ref).max(), np.finfo(float).tiny))}
    if held_back.test_note:
        report["test_note"] = held_back.test_note
    return report, low[:count]


def check_accuracy(report: dict, precision: str, max_auroc_drop: Optional[float]) -> None:
    """Raises :class:`AccuracyError` when the AUROC dropped by more than ``max_auroc_drop``, or
    ValueError when there is no AUROC to check (no anomalous and normal test images)."""
    if max_auroc_drop is None:
        return
    if report["auroc_drop"] is None:
        raise ValueError(f"cannot check the {precision} model's AUROC: the held-back images have no test split "
                         f"with normal and anomalous images ({report.get('test_note', 'one label only')}); pass "
                         f"--max-auroc-drop none to export with the score change measured only")
    if report["auroc_drop"] > max_auroc_drop:
        raise AccuracyError(f"the {precision} model was not written: its image AUROC on the test split is "
                            f"{report['auroc']:.4f} against {report['auroc_fp32']:.4f} in fp32, a drop of "
                            f"{report['auroc_drop']:.4f} > --max-auroc-drop {max_auroc_drop} (largest score change "
                            f"{report['max_score_change']:.4g}); try fp16, more or other calibration images, "
                            f"or allow a larger drop")


def reduced_threshold(checkpoint: Dict[str, object], validation_scores: np.ndarray, precision: str,
                      threshold: Optional[float] = None, quantile: Optional[float] = None,
                      target_fpr: Optional[float] = None) -> tuple:
    """(threshold, source) for the reduced model: a given ``threshold`` as it is; else the
    ``quantile`` / ``target_fpr`` rule, or the checkpoint's own rule, applied to the reduced
    model's scores of the validation normals (``validation_scores`` (V,), in the checkpoint's
    order), so that the false-positive rate on them is the one chosen."""
    if threshold is not None:
        return decision_threshold(checkpoint, threshold=threshold)
    validation = checkpoint.get("validation")
    if validation is None:
        return decision_threshold(checkpoint)  # raises: no validation scores
    if quantile is None and target_fpr is None:
        quantile, target_fpr = validation["quantile"], validation["target_fpr"]
    rescored = {**checkpoint, "validation": {**validation, "scores": [float(s) for s in validation_scores]}}
    value, source = decision_threshold(rescored, quantile=quantile, target_fpr=target_fpr)
    return value, f"{source}, scored by the {precision} model"
