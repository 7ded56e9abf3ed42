"""The model a config names (model.architecture, one of gradad.config.ARCHITECTURES): which
class, for which feature size, trained in which epochs."""

from __future__ import annotations

from typing import List, Optional

from ..backbones import INPUT_SIZE_MULTIPLE, FeatureExtractor
from ..config import Config
from .bigrid import BiGridGRAD, stage_plan
from .grad import GRAD


def model_feature_size(cfg: Config, backbone: FeatureExtractor) -> int:
    """Side of the feature map GRAD is built for: the image size over the backbone stride."""
    size = cfg.image_size
    if size % INPUT_SIZE_MULTIPLE:
        raise ValueError(f"image size {size} (data.image_size or model.input_size) must be a multiple "
                         f"of {INPUT_SIZE_MULTIPLE} for the backbone's stride-8 and stride-16 stages")
    return size // backbone.stride


def build_model(cfg: Config, in_channels: int, feature_size: int) -> GRAD:
    """The model ``cfg.model.architecture`` names, on the CPU: GRAD, or BiGridGRAD configured by
    ``cfg.bigrid``, for features of ``in_channels`` channels and size ``feature_size``²."""
    if cfg.model.architecture == "bigrid":
        return BiGridGRAD(cfg.model, cfg.bigrid, in_channels, feature_size)
    return GRAD(cfg.model, in_channels, feature_size)


def epoch_stages(cfg: Config) -> List[Optional[str]]:
    """What every epoch trains, in order: None (GRAD's loss) train.epochs times for GRAD; for
    Bi-Grid GRAD the stage names of :func:`gradad.models.bigrid.stage_plan`."""
    if cfg.model.architecture == "bigrid":
        plan = list(stage_plan(cfg.bigrid))
        if not cfg.bigrid.abnormal_branch and "abnormal" in plan:
            raise ValueError("bigrid.abnormal_branch=False leaves no abnormal grid for the "
                             f"bigrid.abnormal_epochs={cfg.bigrid.abnormal_epochs} stage-1 epochs; set it to 0")
        return plan
    return [None] * cfg.train.epochs


def planned_epochs(cfg: Config) -> int:
    """The number of epochs a complete training of ``cfg`` runs."""
    return len(epoch_stages(cfg))
