"""PyTorch's own OpInfo sample inputs for grid sampling, run through grad_ext.grid_sample.

Every sample that torch's op_db yields for nn.functional.grid_sample, and for grid_sampler_2d
and grid_sampler_3d where the installed torch lists them, is mapped to a grad_ext.grid_sample
call (grid_sampler_*'s integer interpolation and padding codes to their names) and compared with
the torch op itself: the value and the gradients of input and grid. A sample that cannot be
mapped fails the test; each test counts its samples and asserts that all of them ran.

float16/bfloat16: grad_ext computes them in float32 and rounds once, while torch's CPU kernels
compute coordinates in the reduced dtype (nearest can then pick another cell), so those samples
are compared with the torch op in float32 on the same rounded inputs.
"""
import zlib

import pytest
import torch

# expecttest is a test dependency (setup.py extras "test"): without it op_db cannot be imported,
# and this module fails rather than skipping.
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import grad_ext

# torch.grid_sampler_2d/3d codes (aten's GridSamplerInterpolation / GridSamplerPadding enums).
TORCH_INTERPOLATION = {0: "bilinear", 1: "nearest", 2: "bicubic"}
TORCH_PADDING = {0: "zeros", 1: "border", 2: "reflection"}
OP_NAMES = ("nn.functional.grid_sample", "grid_sampler_2d", "grid_sampler_3d")
OPS = {op.name: op for op in op_db if op.name in OP_NAMES and op.variant_test_name == ""}
REDUCED = (torch.float16, torch.bfloat16)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2),
       torch.bfloat16: (5e-2, 5e-2)}


def test_op_db_lists_grid_sample():
    assert "nn.functional.grid_sample" in OPS, sorted(op.name for op in op_db if "grid" in op.name)


def to_grad_ext_call(name, sample):
    """(input, grid, mode, padding_mode, align_corners) of an OpInfo sample; ValueError when the
    sample uses an argument this mapping does not know."""
    if name == "nn.functional.grid_sample":
        if len(sample.args) != 1:
            raise ValueError(f"{name}: expected (input, grid) and keywords, got {len(sample.args)} positional args")
        unknown = set(sample.kwargs) - {"mode", "padding_mode", "align_corners"}
        if unknown:
            raise ValueError(f"{name}: unmapped keyword arguments {sorted(unknown)}")
        kw = sample.kwargs
        return (sample.input, sample.args[0], kw.get("mode", "bilinear"), kw.get("padding_mode", "zeros"),
                bool(kw.get("align_corners") or False))
    if name in ("grid_sampler_2d", "grid_sampler_3d"):
        if len(sample.args) != 4 or sample.kwargs:
            raise ValueError(f"{name}: expected (input, grid, interpolation, padding, align_corners), got "
                             f"{len(sample.args)} args and keywords {sorted(sample.kwargs)}")
        grid, interpolation, padding, align = sample.args
        if interpolation not in TORCH_INTERPOLATION or padding not in TORCH_PADDING:
            raise ValueError(f"{name}: unmapped interpolation {interpolation} or padding {padding}")
        return sample.input, grid, TORCH_INTERPOLATION[interpolation], TORCH_PADDING[padding], bool(align)
    raise ValueError(f"no mapping for op {name}")


def _grads(out, inputs, gout):
    got = torch.autograd.grad(out, inputs, gout, allow_unused=True)
    # torch leaves a nearest sample's grid unused; its gradient is zero
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs)]


CASES = [(name, dtype) for name in OP_NAMES if name in OPS
         for dtype in (torch.float32, torch.float64, *REDUCED) if dtype in OPS[name].supported_dtypes("cpu")]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d).split('.')[-1]}" for n, d in CASES])
def test_op_db_samples_match_torch(name, dtype):
    op = OPS[name]
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, f"op_db yields no samples for {name} in {dtype}"
    rtol, atol = TOL[dtype]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name} {dtype}".encode()))
    mapped = 0
    for sample in samples:
        inp, grid, mode, padding, align = to_grad_ext_call(name, sample)
        inp, grid = inp.detach().requires_grad_(), grid.detach().requires_grad_()
        out = grad_ext.grid_sample(inp, grid, mode, padding, align)
        gout = torch.randn(out.shape, generator=gen).to(dtype)
        grads = _grads(out, (inp, grid), gout)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        # torch's op with the sample's own arguments, in float32 for the reduced dtypes
        ref_dtype = torch.float32 if dtype in REDUCED else dtype
        t_inp = inp.detach().to(ref_dtype).requires_grad_()
        t_grid = grid.detach().to(ref_dtype).requires_grad_()
        ref = op.op(t_inp, t_grid, *sample.args[1:], **sample.kwargs)
        ref_grads = _grads(ref, (t_inp, t_grid), gout.to(ref_dtype))
        what = (f"{name} {dtype} sample {mapped}: input {tuple(inp.shape)} grid {tuple(grid.shape)} "
                f"{mode} {padding} {align}")
        torch.testing.assert_close(out.to(ref_dtype), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what} value: {m}")
        torch.testing.assert_close(grads[0].to(ref_dtype), ref_grads[0], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} input gradient: {m}")
        # the grid gradient sums over channels: an absolute bound scaled by them
        grid_atol = atol * max(1, inp.shape[1])
        torch.testing.assert_close(grads[1].to(ref_dtype), ref_grads[1], rtol=rtol, atol=grid_atol,
                                   msg=lambda m: f"{what} grid gradient: {m}")
        mapped += 1
    assert mapped == len(samples) > 0
