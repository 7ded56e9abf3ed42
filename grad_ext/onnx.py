"""ONNX export of the grad_ext operators through the exporter torch ships
(``torch.onnx.export(..., dynamo=True)``): ``grad_ext::sample_grid`` becomes ONNX GridSample or a
gather decomposition, ``grad_ext::refine`` standard ONNX arithmetic.

Usage::

    import grad_ext.onnx
    torch.onnx.export(model.eval(), args, "model.onnx", dynamo=True, opset_version=20,
                      custom_translation_table=grad_ext.onnx.translation_table(opset=20))
    # or, with the opsets kept consistent, errors unwrapped and the file written atomically:
    grad_ext.onnx.export(model.eval(), args, "model.onnx", opset=20)

How a ``sample_grid`` call on a d-dimensional table is expressed (``sampler``), and where it runs:

    d    'gridsample': native ONNX GridSample        least opset   onnxruntime   OpenVINO
    1    2-D GridSample of a (C, 1, W) table         16            yes           yes
    2    2-D GridSample                              16            yes           yes
    3    3-D GridSample (5-D input)                  20            yes           no
    4    none (6-D GridSample is opset 20 spec, but no runtime runs it)
    any  'gather': source indices and 2^d Gathers    16            yes           yes
    any  'matmul': dense weights and one MatMul      16            yes           yes

``sampler='auto'`` (the default) takes GridSample where the table above has it at the requested
opset and the gather decomposition otherwise (d = 4, and d = 3 below opset 20), except for a
shared table with fewer points per image than cells (below), which takes 'matmul'. For OpenVINO
pick ``'gather'`` when a table is 3-D. Bicubic sampling has the GridSample form only (2-D).

A table shared by the whole batch (input batch 1, grid batch N; GRAD's grids) is never copied per
image unless that is the cheaper copy. ONNX GridSample wants equal batches, so either the batch
is folded into the grid's first output axis, grid (N, O_1, ..., O_d, d) -> (1, N·O_1, O_2, ...,
O_d, d), sampled once, and the output (1, C, N·O_1, ...) reshaped to (C, N, O_1, ...) and
transposed to (N, C, O_1, ...) (one copy of the output: C·prod(O) values per image), or the table
is expanded to N copies (C·prod(S) values per image); the smaller one is taken at export time.
GRAD's local grid (res^d cells, H x W points) is expanded when res^d < H·W. The gather
decomposition reads the table as rows of C values with every image's indices and never copies
it per image, but holds K = 2^d times the output in temporaries. The matmul form builds every
point's weight on every cell (N, prod(O), prod(S)) and multiplies the table as rows of C values
by it: prod(S) multiply-adds per output value, which for GRAD's global grid (res^d cells of
C·H·W values, one point per image) is one pass over the table, where 'auto' would otherwise fold.

Measured with onnxruntime 1.32 on 2 threads of a shared CPU (times vary by half), C = 272,
28 x 28 features, batch 32 (time per run; peak memory of the run): global grid (13 MB table)
fold 50 ms / 82 MB, expand 77 ms / 891 MB, gather 18 ms / 287 MB; local grid (8 x 8 table) fold
22-45 ms / 84 MB, expand 33-54 ms / 57 MB, gather 53 ms / 310 MB (the output alone is 26 MB).
In the Lite demo detector (C = 152, 30 x 30 features, 4 x 4 global and 8 x 8 local grids, batch
32, onnxruntime 1.32, 2 threads): global grid fold 9.8 ms, matmul 1.4 ms; local grid expand 4-5 ms,
matmul 6.4 ms.

Jitter is training-time noise and has no ONNX form: :func:`export` raises :class:`ExportError`
when the program contains a call with ``jitter_std > 0`` and ``jitter_prob > 0`` (put the model in
eval mode first), and so does the translation itself when it meets one.

onnx and onnxscript are optional dependencies (``pip install grad-ext[export]``); they are
imported by this module only, so ``import grad_ext`` does not need them.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Callable

import onnxscript
import torch
from onnxscript import ir

from . import _ops  # noqa: F401  (registers the ops whose overloads the table keys on)
from ._common import COSINE_EPS, INTERPOLATIONS, PADDINGS, SAMPLERS, jitter_requested

__all__ = ["DEFAULT_OPSET", "GRIDSAMPLE_MIN_OPSET", "MIN_OPSET", "SAMPLERS", "ExportError", "check_no_jitter",
           "export", "jitter_calls", "sampler_for", "translation_table"]

# The lowest opset at which every translation here runs: GridSample appeared in opset 16.
MIN_OPSET = 16
# The opset this module exports at unless told otherwise (torch.onnx's own default).
DEFAULT_OPSET = 20
# Least opset at which ONNX GridSample expresses a d-dimensional table in a form onnxruntime
# runs (its kernel takes 4-D and 5-D inputs only); d = 4 has no such form.
GRIDSAMPLE_MIN_OPSET = {1: 16, 2: 16, 3: 20}
# The exporter builds graphs at this opset or above and converts lower targets down afterwards
# (torch.onnx._internal.exporter._constants.TORCHLIB_OPSET); translations are written for it.
_BUILD_OPSET_FLOOR = 18

_MODE_NAMES = {code: name for name, code in INTERPOLATIONS.items()}
_PADDING_NAMES = {code: name for name, code in PADDINGS.items()}


class ExportError(ValueError):
    """A grad_ext call that has no ONNX form at the requested opset and sampler, or with jitter."""


def _check_opset(opset) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset must be >= {MIN_OPSET} (ONNX GridSample first appears in opset 16), "
                          f"got opset {opset}")
    return opset


def _check_sampler(sampler) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    return sampler


def sampler_for(dim: int, opset: int = DEFAULT_OPSET, sampler: str = "auto") -> str:
    """How a d-dimensional table is sampled at ``opset``: 'gridsample', 'gather' or 'matmul'
    ('auto' may still take 'matmul' for a shared table with few points, see the module docstring).

    Raises ExportError naming the opset when ``sampler='gridsample'`` cannot express ``dim``.
    """
    _check_opset(opset)
    _check_sampler(sampler)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 4:
        raise ValueError(f"dim must be an int in 1..4, got {dim!r}")
    least = GRIDSAMPLE_MIN_OPSET.get(dim)
    native = least is not None and opset >= least
    if sampler in ("gather", "matmul"):
        return sampler
    if sampler == "auto" and not native:
        return "gather"
    if not native:
        if least is None:
            raise ExportError(f"a {dim}-D table has no ONNX GridSample form that onnxruntime runs (its "
                              f"GridSample takes 4-D and 5-D inputs only; requested opset {opset}); "
                              f"use sampler='gather'")
        raise ExportError(f"a {dim}-D table needs ONNX GridSample of opset >= {least} ({dim + 2}-D input), "
                          f"requested opset {opset}; export at opset >= {least} or use sampler='gather'")
    return "gridsample"


# ---- helpers on the exporter's symbolic tensors ------------------------------------------------

def _static(dim) -> int | None:
    """A dimension as an int when it is known at export time, else None."""
    return dim if isinstance(dim, int) else None


def _ints(op, values) -> object:
    return op.Constant(value_ints=[int(v) for v in values])


def _shape(op, x, start: int, end: int | None = None):
    return op.Shape(x, start=start) if end is None else op.Shape(x, start=start, end=end)


def _is_shared(input, grid) -> bool:
    # One table for every image: its batch is 1 at export time while the grid's is not known to be.
    return _static(input.shape[0]) == 1 and _static(grid.shape[0]) != 1


def _shared_form(input, grid) -> str:
    """How GridSample, which wants equal batches, reads a table: 'direct' (batches equal), or
    for a table shared by the batch the cheaper of two copies: 'expand' (N copies of the table,
    C·prod(S) values per image) or 'fold' (the batch folded into the grid's first output axis and
    the output transposed back: C·prod(O) values per image)."""
    if not _is_shared(input, grid):
        return "direct"
    cells = [_static(s) for s in input.shape[2:]]
    points = [_static(s) for s in grid.shape[1:-1]]
    if None not in cells and None not in points and math.prod(cells) < math.prod(points):
        return "expand"
    return "fold"


def _check_graph_opset(build_opset: int, opset: int) -> None:
    # A table built for one opset and registered with an export at another would write GridSample
    # attributes of the wrong opset (opset 20 renamed 'bilinear' to 'linear'); the exporter's
    # tracer knows the graph's opset while it calls us, so check it where it is readable.
    core = sys.modules.get("torch.onnx._internal.exporter._core")
    tracer = getattr(core, "current_tracer", None)
    version = getattr(getattr(tracer, "opset", None), "version", None)
    if isinstance(version, int) and version != build_opset:
        raise ExportError(f"grad_ext.onnx.translation_table(opset={opset}) was registered with an export at "
                          f"opset {version}; pass the same opset_version to torch.onnx.export")


# ---- sample_grid -------------------------------------------------------------------------------

def _gridsample(op, build_opset: int, input, grid, mode: str, padding: str, align_corners: bool):
    """ONNX GridSample for d = 1..3 with the shared-table fold; input (N_in, C, S..), grid (N, O.., d)."""
    d = len(input.shape) - 2
    # opset 20 renamed the modes: bilinear -> linear, bicubic -> cubic
    renamed = {"bilinear": "linear", "bicubic": "cubic"} if build_opset >= 20 else {}
    attrs = dict(mode=renamed.get(mode, mode), padding_mode=padding,
                 align_corners=int(align_corners))
    table, points = input, grid
    if d == 1:
        # A 1-D table as a (C, 1, W) image sampled on its only row: y = 0 maps to row 0 exactly for
        # both align_corners settings and every padding, so the result is the 1-D interpolation.
        table = op.Unsqueeze(input, _ints(op, [2]))
        zeros = op.Expand(op.CastLike(0.0, grid), op.Shape(grid))
        points = op.Unsqueeze(op.Concat(grid, zeros, axis=-1), _ints(op, [1]))  # (N, 1, W_out, 2)
    rank = len(input.shape) + (1 if d == 1 else 0)
    form = _shared_form(input, grid)
    if form == "fold":
        folded = op.Reshape(points, op.Concat(_ints(op, [1, -1]), _shape(op, points, 2), axis=0))
        out = op.GridSample(table, folded, **attrs)  # (1, C, N·O_1, O_2, ...)
        out = op.Reshape(out, op.Concat(_shape(op, table, 1, 2), _shape(op, points, 0, rank - 1), axis=0))
        out = op.Transpose(out, perm=[1, 0, *range(2, rank)])  # (C, N, O..) -> (N, C, O..)
    else:
        if form == "expand":
            table = op.Expand(table, op.Concat(_shape(op, points, 0, 1), _shape(op, table, 1), axis=0))
        out = op.GridSample(table, points, **attrs)
    return op.Squeeze(out, _ints(op, [2])) if d == 1 else out


def _source_index(op, coord, size: int, padding: str, align_corners: bool):
    """Normalised coordinates (N, M) -> table positions along an axis of ``size`` cells, with
    F.grid_sample's unnormalisation and border/reflection padding."""
    if align_corners:
        x = op.Mul(op.Add(coord, 1.0), (size - 1) / 2.0)
    else:
        x = op.Div(op.Sub(op.Mul(op.Add(coord, 1.0), float(size)), 1.0), 2.0)
    if padding == "reflection":
        low, span = (0.0, size - 1.0) if align_corners else (-0.5, float(size))
        if span <= 0:
            x = op.Mul(x, 0.0)  # a single cell with align_corners: every coordinate reads it
        else:
            y = op.Abs(op.Sub(x, low))
            flips = op.Floor(op.Div(y, span))
            extra = op.Mod(y, op.CastLike(span, y), fmod=1)
            even = op.Equal(op.Mod(flips, op.CastLike(2.0, flips), fmod=1), op.CastLike(0.0, flips))
            x = op.Where(even, op.Add(extra, low), op.Add(op.Sub(span, extra), low))
    if padding in ("border", "reflection"):
        x = op.Clip(x, op.CastLike(0.0, x), op.CastLike(float(size - 1), x))
    return x


def _table_rows_and_points(op, input, grid, sampler: str):
    """What the gather and matmul forms share: (table sizes S, channels C as a 1-D shape, the
    points (N, M, d) with M = prod(O), the table as rows of C values (N_in, P, C) with P =
    prod(S)). The rows are a transpose that the runtime folds into a constant at load time when
    the table is a weight. Raises ExportError when S is not known at export time."""
    d = len(input.shape) - 2
    sizes = [_static(s) for s in input.shape[2:]]
    if any(s is None for s in sizes):
        raise ExportError(f"sampler={sampler!r} needs the table's sizes at export time, got input shape "
                          f"{input.shape}")
    channels = _shape(op, input, 1, 2)
    points = op.Reshape(grid, op.Concat(_shape(op, grid, 0, 1), _ints(op, [-1, d]), axis=0))
    rows = op.Transpose(op.Reshape(input, op.Concat(_shape(op, input, 0, 2), _ints(op, [math.prod(sizes)]), axis=0)),
                        perm=[0, 2, 1])
    return sizes, channels, points, rows


def _gather(op, input, grid, mode: str, padding: str, align_corners: bool):
    """Multilinear (or nearest) sampling from one Gather, any d; input (N_in, C, S..), grid (N, O.., d).

    The K = 2^d corners of every point (1 for nearest) are built per axis and combined by
    broadcasting, so the graph grows with d, not with 2^d. One Gather copies the K table rows of
    every point, (N, M, K, C) with M = prod(O), and a MatMul with the weights (N, M, 1, K) sums
    them: K times the output's size in temporaries. The table is read as rows of C values,
    (N_in·P, C) with P = prod(S)."""
    d = len(input.shape) - 2
    sizes, channels, points, rows = _table_rows_and_points(op, input, grid, "gather")
    cells = math.prod(sizes)
    strides = [math.prod(sizes[a + 1:]) for a in range(d)]
    bilinear = mode == "bilinear"
    flat, weight = None, None
    for a in range(d):
        # grid component d - 1 - a addresses table axis a, as in F.grid_sample
        x = _source_index(op, op.Gather(points, d - 1 - a, axis=2), sizes[a], padding, align_corners)  # (N, M)
        if bilinear:
            low = op.Floor(x)
            frac = op.Sub(x, low)
            w = op.Concat(op.Unsqueeze(op.Sub(1.0, frac), _ints(op, [2])), op.Unsqueeze(frac, _ints(op, [2])), axis=2)
            idx = op.Add(op.Unsqueeze(op.Cast(low, to=ir.DataType.INT64), _ints(op, [2])), _ints(op, [0, 1]))
        else:
            # ONNX Round rounds half to even, like the nearbyint of F.grid_sample
            idx = op.Unsqueeze(op.Cast(op.Round(x), to=ir.DataType.INT64), _ints(op, [2]))
            w = None
        if padding == "zeros":
            inside = op.And(op.GreaterOrEqual(idx, 0), op.Less(idx, sizes[a]))
            w = op.CastLike(inside, x) if w is None else op.Where(inside, w, op.CastLike(0.0, w))
        term = op.Mul(op.Clip(idx, op.CastLike(0, idx), op.CastLike(sizes[a] - 1, idx)), strides[a])
        # (N, M, 2) -> (N, M, 1.., 2, ..1) with the pair on axis 2 + a: the corners' outer sum/product
        spread = _ints(op, [2 + j for j in range(d) if j != a]) if d > 1 else None
        if spread is not None:
            term = op.Unsqueeze(term, spread)
            w = None if w is None else op.Unsqueeze(w, spread)
        flat = term if flat is None else op.Add(flat, term)
        weight = w if weight is None or w is None else op.Mul(weight, w)
    flat = op.Reshape(flat, _ints(op, [0, 0, -1]))  # (N, M, K)
    if weight is not None:
        weight = op.Reshape(weight, _ints(op, [0, 0, -1]))
    # every corner one contiguous row of the table as (N_in·P, C)
    rows = op.Reshape(rows, op.Concat(_ints(op, [-1]), channels, axis=0))
    if not _is_shared(input, grid):  # image n reads rows n·P .. n·P + P - 1
        batch = op.Squeeze(_shape(op, grid, 0, 1), _ints(op, [0]))
        flat = op.Add(flat, op.Reshape(op.Mul(op.Range(0, batch, 1), cells), _ints(op, [-1, 1, 1])))
    out = op.Gather(rows, flat, axis=0)  # (N, M, K, C)
    if weight is not None:
        out = op.MatMul(op.Unsqueeze(weight, _ints(op, [2])), out)  # (N, M, 1, K) @ (N, M, K, C)
    out = op.Transpose(out, perm=[0, 3, 1, 2])
    # (N, C, M, 1) -> (N, C, O_1, ..., O_d)
    return op.Reshape(out, op.Concat(_shape(op, grid, 0, 1), channels, _shape(op, grid, 1, d + 1), axis=0))


def _matmul(op, input, grid, mode: str, padding: str, align_corners: bool):
    """Multilinear (or nearest) sampling as one MatMul with a dense weight matrix, any d; input
    (N_in, C, S..), grid (N, O.., d).

    Every point's weight on every cell, (N, M, P) with M = prod(O) and P = prod(S), is the outer
    product over the axes of the bilinear tent max(0, 1 - |x - i|) (or, nearest, x rounded equal
    to i) at the cells i = 0 .. S_a - 1: cells outside the table do not exist, so zeros padding
    needs no mask, and border/reflection come from clipping x first. The product with the table
    as rows of C values, (N_in, P, C), sums them. It costs P multiply-adds per output value, so it
    suits small tables; for GRAD's global grid (a few cells of C·H·W values, one point per
    image) it reads the table once in a product the runtime runs at memory speed."""
    d = len(input.shape) - 2
    sizes, channels, points, rows = _table_rows_and_points(op, input, grid, "matmul")
    weight = None
    for a in range(d):
        x = op.Unsqueeze(_source_index(op, op.Gather(points, d - 1 - a, axis=2), sizes[a], padding, align_corners),
                         _ints(op, [2]))  # (N, M, 1)
        at = op.CastLike(op.Constant(value_floats=[float(i) for i in range(sizes[a])]), x)  # (S_a,)
        if mode == "bilinear":
            w = op.Relu(op.Sub(1.0, op.Abs(op.Sub(x, at))))
        else:  # ONNX Round rounds half to even, like the nearbyint of F.grid_sample
            w = op.CastLike(op.Equal(op.Round(x), at), x)
        if d > 1:  # (N, M, S_a) -> (N, M, 1.., S_a, ..1) with S_a on axis 2 + a
            w = op.Unsqueeze(w, _ints(op, [2 + j for j in range(d) if j != a]))
        weight = w if weight is None else op.Mul(weight, w)
    weight = op.Reshape(weight, _ints(op, [0, 0, math.prod(sizes)]))  # (N, M, P), table axis 0 slowest
    out = op.MatMul(weight, rows)  # (N, M, C)
    out_points = [_static(s) for s in grid.shape[1:-1]]
    if out_points != [1] * d:  # one point per image needs no transpose
        out = op.Transpose(out, perm=[0, 2, 1])
    return op.Reshape(out, op.Concat(_shape(op, grid, 0, 1), channels, _shape(op, grid, 1, d + 1), axis=0))


def _sample_grid_translation(opset: int, sampler: str) -> Callable:
    build_opset = max(opset, _BUILD_OPSET_FLOOR)
    op = onnxscript.values.Opset("", build_opset)

    def grad_ext_sample_grid(input, grid, interpolation: int, padding: int, align_corners: bool,
                             jitter_std: float, jitter_prob: float, jitter_mode: int, jitter_seed=None):
        _check_graph_opset(build_opset, opset)
        if jitter_requested(jitter_std, jitter_prob):
            raise ExportError(f"grad_ext.grid_sample with jitter (jitter_std={jitter_std}, "
                              f"jitter_prob={jitter_prob}) is training-time noise and has no ONNX form; "
                              f"export the model in eval mode (model.eval()) or without jitter")
        if interpolation not in _MODE_NAMES or padding not in _PADDING_NAMES:
            raise ExportError(f"sample_grid: unknown interpolation {interpolation} or padding {padding} code")
        d = len(input.shape) - 2
        mode, pad = _MODE_NAMES[interpolation], _PADDING_NAMES[padding]
        form = sampler_for(d, opset, sampler)
        if sampler == "auto" and _shared_form(input, grid) == "fold" and None not in map(_static, input.shape[2:]):
            form = "matmul"  # a shared table with more cells than points per image: one product
        if mode == "bicubic" and form != "gridsample":
            raise ExportError(f"bicubic sampling has no {form!r} form; export with sampler='gridsample' "
                              f"(2-D tables)")
        if form == "gridsample":
            return _gridsample(op, build_opset, input, grid, mode, pad, bool(align_corners))
        if form == "matmul":
            return _matmul(op, input, grid, mode, pad, bool(align_corners))
        return _gather(op, input, grid, mode, pad, bool(align_corners))

    return grad_ext_sample_grid


# ---- refine ------------------------------------------------------------------------------------

def _refine_translation(opset: int) -> Callable:
    build_opset = max(opset, _BUILD_OPSET_FLOOR)
    op = onnxscript.values.Opset("", build_opset)

    def grad_ext_refine(rec, feat, mse_weight: float, cos_weight: float, mse_threshold: float,
                        return_refined: bool):
        # The kernel's per-pixel arithmetic (csrc/refine_common.h) from four channel sums.
        _check_graph_opset(build_opset, opset)
        channel_axis = _ints(op, [1])

        def channel_sum(x):
            return op.ReduceSum(x, channel_axis, keepdims=0)  # (B, H, W)

        diff = op.Sub(rec, feat)
        # squares as Pow(x, 2): one reader of x where Mul(x, x) is two, and a quantized graph
        # dequantizes an input once per reader. rec . feat is summed as it is: from the other
        # sums, (|r|^2 + |f|^2 - |r - f|^2) / 2, it is wrong where a norm is near 0
        sq_diff, sq_rec = channel_sum(op.Mul(diff, diff)), channel_sum(op.Pow(rec, 2.0))
        sq_feat, rec_feat = channel_sum(op.Pow(feat, 2.0)), channel_sum(op.Mul(rec, feat))
        # F.cosine_similarity clamps each norm from below by eps
        norm_rec, norm_feat = op.Max(op.Sqrt(sq_rec), COSINE_EPS), op.Max(op.Sqrt(sq_feat), COSINE_EPS)
        cosine = op.Div(rec_feat, op.Mul(norm_rec, norm_feat))
        channels = op.CastLike(_shape(op, rec, 1, 2), rec)
        indicator = op.CastLike(op.Less(op.Div(sq_diff, channels), mse_threshold), rec)
        sim = op.Add(op.Mul(indicator, mse_weight), op.Mul(cosine, cos_weight))
        rest = op.Sub(1.0, sim)
        anomaly_map = op.Mul(op.Abs(rest), op.Sqrt(sq_diff))
        loss = op.Div(op.ReduceSum(op.Mul(op.Mul(rest, rest), sq_diff), keepdims=0), op.CastLike(op.Size(rec), rec))
        if return_refined:
            refined = op.Add(op.Mul(op.Unsqueeze(sim, channel_axis), feat),
                             op.Mul(op.Unsqueeze(rest, channel_axis), rec))
        else:
            refined = op.CastLike(op.ConstantOfShape(_ints(op, [0])), rec)  # the op's empty (0,) tensor
        # The backward pass's saved sums (5, B, H, W), float32 unless the inputs are float64; an
        # inference graph leaves them unused and the exporter drops them.
        stats_type = ir.DataType.DOUBLE if rec.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        rows = [op.Unsqueeze(op.Cast(v, to=stats_type), _ints(op, [0]))
                for v in (sq_diff, sq_rec, sq_feat, rec_feat, indicator)]
        return sim, anomaly_map, loss, refined, op.Concat(*rows, axis=0)

    return grad_ext_refine


# ---- public API --------------------------------------------------------------------------------

def translation_table(opset: int = DEFAULT_OPSET, sampler: str = "auto") -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Args:
        opset: the ``opset_version`` the export runs at (pass the same to torch.onnx.export),
            >= :data:`MIN_OPSET`.
        sampler: 'auto', 'gridsample' or 'gather' (see the module docstring).

    Returns:
        {torch.ops.grad_ext.sample_grid.default: ..., torch.ops.grad_ext.refine.default: ...}.
    """
    _check_opset(opset)
    _check_sampler(sampler)
    return {torch.ops.grad_ext.sample_grid.default: _sample_grid_translation(opset, sampler),
            torch.ops.grad_ext.refine.default: _refine_translation(opset)}


def jitter_calls(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the ``sample_grid`` nodes of ``program`` (subgraphs included) that jitter."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram, got {type(program).__name__}")
    target = torch.ops.grad_ext.sample_grid.default
    names = [a.name for a in target._schema.arguments]
    found = []
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op == "call_function" and node.target is target:
                bound = dict(zip(names, node.args), **node.kwargs)
                std, prob = bound.get("jitter_std", 0.0), bound.get("jitter_prob", 0.0)
                # a traced scalar argument (not a Python number) could be anything: count it
                if not (isinstance(std, (int, float)) and isinstance(prob, (int, float))) or \
                        jitter_requested(float(std), float(prob)):
                    found.append(node.name)
    return found


def check_no_jitter(program: torch.export.ExportedProgram) -> None:
    """ExportError when ``program`` contains a jittered grid_sample (training-time noise, which
    has no inference form; its seed draw would also stop the ONNX exporter with an unrelated
    message about aten.randint)."""
    nodes = jitter_calls(program)
    if nodes:
        raise ExportError(f"the exported graph jitters grid_sample coordinates ({', '.join(nodes)}): jitter is "
                          f"training-time noise; export the model in eval mode (model.eval()) or without jitter")


def _own_error(exc: BaseException) -> ExportError | None:
    # The exporter wraps what a translation raises in its own errors; find ours in the chain.
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ExportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _save_atomic(program, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        # mkstemp makes 0600 files; the finished file gets the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export(model: torch.nn.Module | torch.export.ExportedProgram, args: tuple = (),
           f: str | os.PathLike | None = None, *, opset: int = DEFAULT_OPSET, sampler: str = "auto",
           dynamic_shapes=None, input_names=None, output_names=None, **kwargs):
    """Exports ``model`` to ONNX with :func:`translation_table` at ``opset``.

    Runs ``torch.export.export(model, args, dynamic_shapes=..., strict=False)``, checks the
    program for jitter (:func:`check_no_jitter`), then ``torch.onnx.export(program, dynamo=True)``.

    Args:
        model: the module to export (call ``.eval()`` first), or an ExportedProgram.
        args: example inputs (tuple of tensors).
        f: where to write the .onnx file (weights inside it; written to a temporary file beside
            it and moved into place, so a failed export leaves no partial file), or None.
        opset, sampler: as in :func:`translation_table`.
        dynamic_shapes: as in torch.export.export (ignored for an ExportedProgram).
        input_names, output_names, kwargs: passed to torch.onnx.export (verbose defaults to False).

    Returns:
        The torch.onnx.ONNXProgram. Raises :class:`ExportError` (not the exporter's wrapper) when
        a grad_ext call has no ONNX form or jitters.
    """
    table = translation_table(opset, sampler)
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    elif isinstance(model, torch.nn.Module):
        program = torch.export.export(model, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
    else:
        raise TypeError(f"model must be a torch.nn.Module or an ExportedProgram, got {type(model).__name__}")
    check_no_jitter(program)
    kwargs.setdefault("verbose", False)
    try:
        onnx_program = torch.onnx.export(program, tuple(args), dynamo=True, opset_version=opset,
                                         custom_translation_table=table, input_names=input_names,
                                         output_names=output_names, **kwargs)
    except Exception as exc:
        own = _own_error(exc)
        if own is not None:
            raise ExportError(str(own)) from exc
        raise
    if f is not None:
        _save_atomic(onnx_program, os.fspath(f))
    return onnx_program
