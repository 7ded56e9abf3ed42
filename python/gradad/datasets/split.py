"""The training listing split into the images a model trains on and the normal images held out
to choose its decision threshold (the config's ``split`` section)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .records import ImageRecord


def split_training_records(records: Sequence[ImageRecord], max_train_images: Optional[int],
                           val_fraction: float, seed: int) -> tuple[List[ImageRecord], List[ImageRecord]]:
    """(training records, validation records) from a training listing.

    Per class, in listing order: first a seeded subset when ``max_train_images`` caps the
    total (each class keeps its share of the cap, see :func:`class_quotas`), then a seeded
    ``val_fraction`` of the kept normals goes to validation. Every class keeps >= 1 training
    image. The draws depend only on (seed, class index), so they are the same in every process.
    """
    by_class: Dict[str, List[ImageRecord]] = {}
    for record in records:
        if record.label != 0:
            raise ValueError(f"training images must be normal (label 0), got an anomalous one: {record.path}")
        by_class.setdefault(record.class_name, []).append(record)
    quotas = class_quotas({name: len(rs) for name, rs in by_class.items()}, max_train_images)
    train, validation = [], []
    for class_index, (name, class_records) in enumerate(by_class.items()):
        rng = np.random.default_rng([seed, class_index])
        if quotas[name] < len(class_records):
            kept = np.sort(rng.permutation(len(class_records))[:quotas[name]])
            class_records = [class_records[i] for i in kept]
        held = round(val_fraction * len(class_records))
        if held >= len(class_records):
            raise ValueError(f"class {name!r}: split.val_fraction={val_fraction} leaves no training "
                             f"image of its {len(class_records)}")
        is_held = np.zeros(len(class_records), dtype=bool)
        is_held[rng.permutation(len(class_records))[:held]] = True
        train += [r for r, h in zip(class_records, is_held) if not h]
        validation += [r for r, h in zip(class_records, is_held) if h]
    return train, validation


def class_quotas(counts: Dict[str, int], cap: Optional[int]) -> Dict[str, int]:
    """Images kept per class under a total ``cap``: shares of the cap in proportion to the class
    sizes, rounded by largest remainder so that they add up to the cap exactly."""
    total = sum(counts.values())
    if cap is None or total <= cap:
        return dict(counts)
    if cap < len(counts):
        raise ValueError(f"split.max_train_images={cap} is less than the {len(counts)} classes: every "
                         f"class needs at least one training image")
    exact = {name: cap * count / total for name, count in counts.items()}
    quotas = {name: max(1, int(share)) for name, share in exact.items()}
    by_remainder = sorted(counts, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    for name in by_remainder[:max(0, cap - sum(quotas.values()))]:
        quotas[name] += 1
    while sum(quotas.values()) > cap:  # the minimum of one image pushed small classes over
        quotas[max(quotas, key=quotas.get)] -= 1
    return quotas
