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
