"""GRAD's feature refinement with its reconstruction loss and anomaly map, fused in one kernel.

For a reconstruction ``rec`` and the backbone features ``feat`` (both (B, C, H, W)):

    sim        = mse_weight * [mean_c (rec - feat)^2 < mse_threshold] + cos_weight * cos(rec, feat)
    refined    = sim * feat + (1 - sim) * rec
    anomaly_map = ||feat - refined||_2 over channels   = |1 - sim| * ||rec - feat||_2
    loss       = mean over B, C, H, W of (refined - feat)^2

The kernel reads each input once in the forward pass and once in the backward pass and builds
no (B, C, H, W) temporary (beyond a contiguous copy of a non-contiguous input): four channel
sums per pixel are all it needs.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._ops import ops

# GRAD's refinement constants (spec §2): λ_mse, λ_cos and the MSE threshold k.
MSE_WEIGHT = 0.3
COS_WEIGHT = 0.7
MSE_THRESHOLD = 10.0
# The eps of torch.nn.functional.cosine_similarity that the cosine term uses (fixed in the kernel).
COSINE_EPS = 1e-8

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class RefineOutput(NamedTuple):
    sim: Tensor                 # (B, H, W) similarity; can be negative
    anomaly_map: Tensor         # (B, H, W) ||feat - refined|| over channels
    loss: Tensor                # () mean of (refined - feat)^2 over B, C, H, W
    refined: Optional[Tensor]   # (B, C, H, W) when return_refined, else None


def _check_tensor_pair(rec, feat) -> None:
    for name, t in (("rec", rec), ("feat", feat)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if rec.shape != feat.shape:
        raise ValueError(f"rec and feat must have the same shape, got {tuple(rec.shape)} and {tuple(feat.shape)}")
    if rec.dtype != feat.dtype:
        raise TypeError(f"rec and feat must have the same dtype, got {rec.dtype} and {feat.dtype}")
    if rec.device != feat.device:
        raise ValueError(f"rec and feat must be on the same device, got {rec.device} and {feat.device}")
    allowed = _CUDA_DTYPES if rec.device.type == "cuda" else _CPU_DTYPES
    if rec.dtype not in allowed:
        raise TypeError(f"rec dtype {rec.dtype} is not supported on {rec.device.type}; use one of {allowed}")
    if rec.numel() == 0:
        raise ValueError(f"rec and feat must not be empty, got shape {tuple(rec.shape)}")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def refine(rec: Tensor, feat: Tensor, mse_weight: float = MSE_WEIGHT, cos_weight: float = COS_WEIGHT,
           mse_threshold: float = MSE_THRESHOLD, return_refined: bool = False) -> RefineOutput:
    """GRAD's feature refinement, loss and anomaly map of a reconstruction.

    Args:
        rec: (B, C, H, W) reconstructed features x̂.
        feat: (B, C, H, W) backbone features x; same shape, dtype and device as ``rec``.
            float32/float64 on CPU; also float16/bfloat16 on CUDA (float32 accumulation).
            Any memory layout (channels_last, views) is accepted.
        mse_weight, cos_weight: finite weights λ_mse, λ_cos of the indicator and the cosine.
        mse_threshold: k >= 0; the indicator is 1 where mean_c (rec - feat)^2 < k (strictly;
            the reference code's ``1 - round(clamp(0.05 * mse, 0, 1))`` also counts mse == k).
        return_refined: also materialise ``refined`` (B, C, H, W); otherwise it is None.

    Returns:
        RefineOutput(sim (B, H, W), anomaly_map (B, H, W), loss (), refined or None), all in
        the inputs' dtype and on their device. ``sim`` uses the cosine of
        ``F.cosine_similarity(rec, feat, dim=1, eps=1e-8)``, value and gradient.

    Differentiable with respect to ``rec`` and ``feat`` through every output; the indicator
    has zero gradient. Where the map is not differentiable its gradient is defined as 0:
    where rec == feat at a pixel (||rec - feat|| = 0), and for the |1 - sim| factor where
    sim == 1. The loss is a deterministic reduction (bitwise reproducible run to run).
    """
    _check_tensor_pair(rec, feat)
    mse_weight = _real("mse_weight", mse_weight)
    cos_weight = _real("cos_weight", cos_weight)
    mse_threshold = _real("mse_threshold", mse_threshold)
    for name, value in (("mse_weight", mse_weight), ("cos_weight", cos_weight)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not mse_threshold >= 0:
        raise ValueError(f"mse_threshold must be >= 0, got {mse_threshold}")
    if not isinstance(return_refined, bool):
        raise TypeError(f"return_refined must be a bool, got {type(return_refined).__name__}")
    sim, anomaly_map, loss, refined, _ = ops.refine(rec, feat, mse_weight, cos_weight, mse_threshold, return_refined)
    return RefineOutput(sim, anomaly_map, loss, refined if return_refined else None)
