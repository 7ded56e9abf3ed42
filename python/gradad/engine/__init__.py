"""Training: :func:`train` (files, resume, DDP) in :mod:`.training`; the shared epoch loop and
in-memory training on cached features in :mod:`.epochs`."""

from .epochs import TrainingObjective, make_optimizer, train_bigrid, train_on_features
from .training import TrainResult, list_training_records, train, validation_summary

__all__ = ["TrainResult", "TrainingObjective", "list_training_records", "make_optimizer",
           "train", "train_bigrid", "train_on_features", "validation_summary"]
