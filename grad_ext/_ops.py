"""Loads the compiled operators and registers their autograd formulas and fake kernels."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.grad_ext)

ops = torch.ops.grad_ext


# ---- sample_grid -------------------------------------------------------------------------

def _check_sample_grid_shapes(input, grid, interpolation=None):
    # The shape relations csrc/sample_grid.h checks, so compiled graphs fail as eager calls do.
    torch._check_value(3 <= input.dim() <= 6, lambda: f"sample_grid: input must have shape (N, C, S_1[, ..., S_4]): "
                       f"3 to 6 dimensions, got {tuple(input.shape)}")
    d = input.dim() - 2
    torch._check_value(grid.dim() == d + 2, lambda: f"sample_grid: grid must have {d + 2} dimensions (N, *out, {d}) "
                       f"for a {input.dim()}-D input, got {tuple(grid.shape)}")
    torch._check_value(grid.shape[-1] == d, lambda: f"sample_grid: grid's last dimension must be {d} for a "
                       f"{input.dim()}-D input, got shape {tuple(grid.shape)}")
    torch._check_value(input.shape[0] == 1 or input.shape[0] == grid.shape[0],
                       lambda: f"sample_grid: input batch must be 1 (shared) or equal grid batch {grid.shape[0]}, "
                       f"got input shape {tuple(input.shape)}")
    torch._check_type(input.dtype == grid.dtype, lambda: f"sample_grid: input and grid must have the same dtype, "
                      f"got {input.dtype} and {grid.dtype}")
    torch._check_value(interpolation != 2 or d <= 3, lambda: f"sample_grid: interpolation 2 (bicubic) supports "
                       f"1-D to 3-D tables, got a {d}-D table")


@torch.library.register_fake("grad_ext::sample_grid")
def _sample_grid_fake(input, grid, interpolation, padding, align_corners, jitter_std, jitter_prob,
                      jitter_mode, jitter_seed):
    _check_sample_grid_shapes(input, grid, interpolation)
    return input.new_empty((grid.shape[0], input.shape[1], *grid.shape[1:-1]))


@torch.library.register_fake("grad_ext::sample_grid_backward")
def _sample_grid_backward_fake(grad_output, input, grid, interpolation, padding, align_corners, jitter_std,
                               jitter_prob, jitter_mode, jitter_seed, input_requires_grad, grid_requires_grad):
    _check_sample_grid_shapes(input, grid, interpolation)
    out_shape = (grid.shape[0], input.shape[1], *grid.shape[1:-1])
    torch._check_value(tuple(grad_output.shape) == out_shape, lambda: f"sample_grid_backward: grad_output must "
                       f"have the output's shape {out_shape}, got {tuple(grad_output.shape)}")
    grad_input = input.new_empty(input.shape if input_requires_grad else (0,))
    grad_grid = grid.new_empty(grid.shape if grid_requires_grad else (0,))
    return grad_input, grad_grid


@torch.library.register_fake("grad_ext::jitter_noise")
def _jitter_noise_fake(jitter_seed, num_points, dim, jitter_std, jitter_prob, jitter_mode):
    torch._check_value(num_points >= 0, lambda: f"jitter_noise: num_points must be >= 0, got {num_points}")
    torch._check_value(1 <= dim <= 4, lambda: f"jitter_noise: dim must be 1 to 4, got {dim}")
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


def _check_refine_shapes(rec, feat):
    # The relations csrc/refine.h checks, so compiled graphs fail as eager calls do.
    torch._check_value(rec.dim() == 4, lambda: f"refine: rec must have shape (B, C, H, W), got {tuple(rec.shape)}")
    torch._check_value(tuple(feat.shape) == tuple(rec.shape), lambda: f"refine: rec and feat must have the same "
                       f"shape, got {tuple(rec.shape)} and {tuple(feat.shape)}")
    torch._check_type(rec.dtype == feat.dtype, lambda: f"refine: rec and feat must have the same dtype, got "
                      f"{rec.dtype} and {feat.dtype}")
    torch._check_value(rec.device == feat.device, lambda: f"refine: rec and feat must be on the same device, got "
                       f"{rec.device} and {feat.device}")


@torch.library.register_fake("grad_ext::refine")
def _refine_fake(rec, feat, mse_weight, cos_weight, mse_threshold, return_refined):
    _check_refine_shapes(rec, feat)
    b, c, h, w = rec.shape
    stats_dtype = torch.float64 if rec.dtype == torch.float64 else torch.float32
    return (rec.new_empty((b, h, w)), rec.new_empty((b, h, w)), rec.new_empty(()),
            rec.new_empty((b, c, h, w) if return_refined else (0,)),
            rec.new_empty((_REFINE_STATS_ROWS, b, h, w), dtype=stats_dtype))


@torch.library.register_fake("grad_ext::refine_backward")
def _refine_backward_fake(grad_sim, grad_map, grad_loss, grad_refined, rec, feat, stats, mse_weight, cos_weight,
                          rec_requires_grad, feat_requires_grad):
    _check_refine_shapes(rec, feat)
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
