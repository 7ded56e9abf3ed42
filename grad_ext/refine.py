"""GRAD's feature refinement with its reconstruction loss and anomaly map, fused in one kernel
(docs/method.md §2).

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

from torch import Tensor

from ._common import COS_WEIGHT, COSINE_EPS, MSE_THRESHOLD, MSE_WEIGHT, RefineOutput, check_tensors, real
from ._ops import ops

__all__ = ["COSINE_EPS", "COS_WEIGHT", "MSE_THRESHOLD", "MSE_WEIGHT", "RefineOutput", "refine"]


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
    check_tensors(rec=rec, feat=feat)
    if not isinstance(return_refined, bool):
        raise TypeError(f"return_refined must be a bool, got {type(return_refined).__name__}")
    sim, anomaly_map, loss, refined, _ = ops.refine(rec, feat, real("mse_weight", mse_weight),
                                                    real("cos_weight", cos_weight),
                                                    real("mse_threshold", mse_threshold), return_refined)
    return RefineOutput(sim, anomaly_map, loss, refined if return_refined else None)
