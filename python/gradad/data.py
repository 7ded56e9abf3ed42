"""Short import path for gradad.datasets (records, listing, AnomalyDataset, FeatureCache)."""

from .datasets import *  # noqa: F401,F403
from .datasets import __all__  # noqa: F401
