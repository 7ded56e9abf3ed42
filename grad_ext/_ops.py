"""Loads the compiled operators and registers their autograd formulas and fake kernels."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.grad_ext)

ops = torch.ops.grad_ext


# ---- sample_grid -------------------------------------------------------------------------

@torch.library.register_fake("grad_ext::sample_grid")
def _sample_grid_fake(input, grid, interpolation, padding, align_corners, jitter_std, jitter_prob,
                      jitter_mode, jitter_seed):
    return input.new_empty((grid.shape[0], input.shape[1], *grid.shape[1:-1]))


@torch.library.register_fake("grad_ext::sample_grid_backward")
def _sample_grid_backward_fake(grad_output, input, grid, interpolation, padding, align_corners, jitter_std,
                               jitter_prob, jitter_mode, jitter_seed, input_requires_grad, grid_requires_grad):
    grad_input = input.new_empty(input.shape if input_requires_grad else (0,))
    grad_grid = grid.new_empty(grid.shape if grid_requires_grad else (0,))
    return grad_input, grad_grid


@torch.library.register_fake("grad_ext::jitter_noise")
def _jitter_noise_fake(jitter_seed, num_points, dim, jitter_std, jitter_prob, jitter_mode):
    return (jitter_seed.new_empty((num_points, dim), dtype=torch.float32),
            jitter_seed.new_empty((num_points,), dtype=torch.bool))


def _sample_grid_setup(ctx, inputs, output):
    input, grid, *args = inputs
    ctx.save_for_backward(input, grid)
    ctx.args = args


def _sample_grid_backward(ctx, grad_output):
    input, grid = ctx.saved_tensors
    need_input, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input, grad_grid = ops.sample_grid_backward(grad_output, input, grid, *ctx.args, need_input, need_grid)
    return (grad_input if need_input else None, grad_grid if need_grid else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("grad_ext::sample_grid", _sample_grid_backward, setup_context=_sample_grid_setup)


# ---- refine ------------------------------------------------------------------------------

_REFINE_STATS_ROWS = 5  # kStatsRows in csrc/refine_common.h


@torch.library.register_fake("grad_ext::refine")
def _refine_fake(rec, feat, mse_weight, cos_weight, mse_threshold, return_refined):
    b, c, h, w = rec.shape
    stats_dtype = torch.float64 if rec.dtype == torch.float64 else torch.float32
    return (rec.new_empty((b, h, w)), rec.new_empty((b, h, w)), rec.new_empty(()),
            rec.new_empty((b, c, h, w) if return_refined else (0,)),
            rec.new_empty((_REFINE_STATS_ROWS, b, h, w), dtype=stats_dtype))


@torch.library.register_fake("grad_ext::refine_backward")
def _refine_backward_fake(grad_sim, grad_map, grad_loss, grad_refined, rec, feat, stats, mse_weight, cos_weight,
                          rec_requires_grad, feat_requires_grad):
    grad_rec = rec.new_empty(rec.shape if rec_requires_grad else (0,))
    grad_feat = feat.new_empty(feat.shape if feat_requires_grad else (0,))
    return grad_rec, grad_feat


def _refine_setup(ctx, inputs, output):
    rec, feat, mse_weight, cos_weight, _, return_refined = inputs
    _, _, _, refined, stats = output
    ctx.save_for_backward(rec, feat, stats)
    ctx.weights = (mse_weight, cos_weight)
    ctx.return_refined = return_refined
    ctx.mark_non_differentiable(stats)
    if not return_refined:
        ctx.mark_non_differentiable(refined)
    # Outputs nobody used get None instead of zeros, so the kernel skips them.
    ctx.set_materialize_grads(False)


def _refine_backward(ctx, grad_sim, grad_map, grad_loss, grad_refined, grad_stats):
    rec, feat, stats = ctx.saved_tensors
    need_rec, need_feat = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_rec or need_feat):
        return None, None, None, None, None, None
    grad_rec, grad_feat = ops.refine_backward(grad_sim, grad_map, grad_loss,
                                              grad_refined if ctx.return_refined else None, rec, feat, stats,
                                              *ctx.weights, need_rec, need_feat)
    return (grad_rec if need_rec else None, grad_feat if need_feat else None, None, None, None, None)


torch.library.register_autograd("grad_ext::refine", _refine_backward, setup_context=_refine_setup)
