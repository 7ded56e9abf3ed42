"""Bi-Grid GRAD (docs/method.md §3): GRAD plus an abnormal grid trained on Feature Block Paste anomalies.

The normal branch is :class:`gradad.models.GRAD` itself (this class subclasses it). The abnormal
branch is a second GRAD instance whose coordinate networks are the normal ones (shared modules)
and whose own local and global grids, fusion network and 1×1 output conv give

    a = conv1x1(F_a(standardise(concat[f_g^a, f_l^a]))),

with the sampled features standardised per image and channel over H, W. The reconstruction is
x̂ = x̂_n + w·a (reference code, learnable w) or λ·x̂_n + (1 − λ)·a (paper, fixed λ); refinement,
loss, map and score are GRAD's, applied to that x̂.

Training (:func:`gradad.engine.train_bigrid`, the stages of :func:`stage_plan`): stage 1
('abnormal') trains on FBP features with the truncated-L1 contrastive loss on channel 0 of a,
the normal grids frozen; stage 2 ('normal') trains on clean features with GRAD's loss, the
abnormal grids frozen. Only grids are frozen; the networks stay trainable in both stages
(reference code).

Jitter: the abnormal branch computes its coordinates with the shared networks but draws its own
jitter, so in training mode the two branches see independently jittered local coordinates.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..config import BiGridConfig, ModelConfig
from .fbp import FeatureBlockPaster
from .grad import GRAD

STAGES = ("abnormal", "normal")


class ChannelStandardize(nn.Module):
    """(x − mean) / (std + eps) per image and channel over H, W (population std),
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
        return (x - mean) / (std + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class BiGridGRAD(GRAD):
    """Bi-Grid GRAD on features of ``in_channels`` = C channels and size ``feature_size``².

    forward(features (B, C, H, W)) -> GRADOutput as GRAD, with x̂ the combined reconstruction.
    abnormal_response(features) -> a (B, C, H, W), the abnormal branch output.
    With ``bigrid.abnormal_branch`` false nothing is added: the parameters, their
    initialisation (for the same torch seed) and all outputs are GRAD's.
    """

    def __init__(self, cfg: ModelConfig, bigrid: BiGridConfig, in_channels: int, feature_size: int):
        if not isinstance(bigrid, BiGridConfig):
            raise TypeError(f"bigrid must be a BiGridConfig, got {type(bigrid).__name__}")
        super().__init__(cfg, in_channels, feature_size)
        self.bigrid = bigrid
        if not bigrid.abnormal_branch:
            return
        abnormal = GRAD(cfg, in_channels, feature_size)
        # share the coordinate networks: the abnormal grids are read at the normal coordinates
        for name in ("local_coordinates", "global_coordinates"):
            if hasattr(self, name):
                setattr(abnormal, name, getattr(self, name))
        abnormal.fusion = nn.Sequential(ChannelStandardize(bigrid.standardize_eps), abnormal.fusion)
        self.abnormal = abnormal
        if bigrid.combine == "learned":
            self.abnormal_weight = nn.Parameter(torch.tensor(float(bigrid.abnormal_weight_init)))

    @property
    def has_abnormal_branch(self) -> bool:
        """Whether the abnormal grids exist."""
        return "abnormal" in self._modules

    def normal_grids(self) -> List[nn.Parameter]:
        """The normal branch's grids (local first, then global)."""
        return super().grids()

    def abnormal_grids(self) -> List[nn.Parameter]:
        """The abnormal branch's grids (local first, then global); empty without the branch."""
        return self.abnormal.grids() if self.has_abnormal_branch else []

    def grids(self) -> List[nn.Parameter]:
        """All grids: normal then abnormal (so GRAD.param_groups gives them the grid lr)."""
        return self.normal_grids() + self.abnormal_grids()

    def reset_parameters(self) -> None:
        """GRAD's initialisation of every part (both branches), and w = abnormal_weight_init."""
        super().reset_parameters()
        # also called from GRAD.__init__, before the abnormal branch and w exist
        weight = self._parameters.get("abnormal_weight")
        if weight is not None:
            with torch.no_grad():
                weight.fill_(self.bigrid.abnormal_weight_init)

    def parameter_breakdown(self) -> Dict[str, int]:
        """GRAD's counts (normal branch and shared coordinates) plus 'abnormal_grids',
        'abnormal_fusion' (F_a, its output conv and w) and the new 'total'."""
        parts = super().parameter_breakdown()
        del parts["total"]
        if self.has_abnormal_branch:
            parts["abnormal_grids"] = sum(p.numel() for p in self.abnormal_grids())
            extra = [self.abnormal.fusion, self.abnormal.output]
            parts["abnormal_fusion"] = sum(p.numel() for m in extra for p in m.parameters())
            if "abnormal_weight" in self._parameters:
                parts["abnormal_fusion"] += 1
        parts["total"] = sum(parts.values())
        return parts

    def abnormal_response(self, features: Tensor) -> Tensor:
        """a = conv1x1(F_a(standardise(concat[f_g^a, f_l^a]))), (B, C, H, W) -> (B, C, H, W)."""
        if not self.has_abnormal_branch:
            raise RuntimeError("this BiGridGRAD was built with bigrid.abnormal_branch=False: it has no abnormal branch")
        return self.abnormal.reconstruct(features)

    def reconstruct(self, features: Tensor) -> Tensor:
        """The combined x̂, (B, C, H, W) -> (B, C, H, W): GRAD's x̂_n without the abnormal
        branch, else x̂_n + w·a ('learned') or λ·x̂_n + (1 − λ)·a ('fixed')."""
        normal = super().reconstruct(features)
        if not self.has_abnormal_branch:
            return normal
        abnormal = self.abnormal_response(features).to(normal.dtype)
        if self.bigrid.combine == "learned":
            return normal + self.abnormal_weight.to(normal.dtype) * abnormal
        lam = self.bigrid.mix_lambda
        return lam * normal + (1.0 - lam) * abnormal


# ---- training -----------------------------------------------------------------------------

def contrastive_loss(response: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Truncated-L1 contrastive loss (docs/method.md §3) on ``response`` (B, H, W) (channel 0 of a) with
    the anomaly ``mask`` (B, H, W) bool: mean over masked cells of max(0, th − a) plus mean over
    the other cells of max(0, th + a). A term whose cell set is empty contributes 0."""
    if response.shape != mask.shape or response.dim() != 3:
        raise ValueError(f"response and mask must both have shape (B, H, W), got {tuple(response.shape)} "
                         f"and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    anomalous = mask.to(response.dtype)
    normal = 1.0 - anomalous
    pull_up = (torch.relu(threshold - response) * anomalous).sum() / anomalous.sum().clamp_min(1.0)
    push_down = (torch.relu(threshold + response) * normal).sum() / normal.sum().clamp_min(1.0)
    return pull_up + push_down


def _check_stage(model: BiGridGRAD, stage: str) -> None:
    if not isinstance(model, BiGridGRAD):
        raise TypeError(f"model must be a BiGridGRAD, got {type(model).__name__}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    if not model.has_abnormal_branch:
        raise ValueError("two-stage training needs the abnormal branch (bigrid.abnormal_branch=True)")


def bigrid_stage_parameters(model: BiGridGRAD, stage: str) -> List[nn.Parameter]:
    """The parameters stage ``stage`` trains: 'abnormal' (stage 1) everything but the normal
    grids, 'normal' (stage 2) everything but the abnormal grids."""
    _check_stage(model, stage)
    frozen = {id(p) for p in (model.normal_grids() if stage == "abnormal" else model.abnormal_grids())}
    return [p for p in model.parameters() if id(p) not in frozen]


def set_bigrid_stage(model: BiGridGRAD, stage: str) -> None:
    """Sets requires_grad so that exactly :func:`bigrid_stage_parameters` are trainable."""
    trainable = {id(p) for p in bigrid_stage_parameters(model, stage)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def bigrid_stage_loss(model: BiGridGRAD, features: Tensor, stage: str,
                      paster: Optional[FeatureBlockPaster] = None) -> Tensor:
    """The training loss of one batch ``features`` (B, C, H, W): stage 'abnormal' pastes FBP
    blobs with ``paster`` and returns the contrastive loss on channel 0 of a; stage 'normal'
    returns GRAD's loss of the combined model on the clean features (of GRAD itself when the
    model has no abnormal branch)."""
    if stage == "normal" and isinstance(model, BiGridGRAD):
        return model(features).loss
    _check_stage(model, stage)
    if paster is None:
        raise ValueError("stage 'abnormal' needs a FeatureBlockPaster (paster)")
    pasted, mask = paster(features)
    response = model.abnormal_response(pasted)[:, 0].to(features.dtype)
    return contrastive_loss(response, mask, model.bigrid.contrastive_threshold)


def stage_plan(bigrid: BiGridConfig) -> List[str]:
    """The stage of every epoch, in order: abnormal_epochs × 'abnormal' then normal_epochs ×
    'normal', once ('sequential') or ``cycles`` times ('alternating')."""
    cycle = ["abnormal"] * bigrid.abnormal_epochs + ["normal"] * bigrid.normal_epochs
    return cycle * (bigrid.cycles if bigrid.schedule == "alternating" else 1)
