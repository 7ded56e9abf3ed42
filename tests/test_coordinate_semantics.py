"""The coordinate arithmetic the CUDA kernels use (csrc/grid_common.h with the CUDA policies),
run on the host, against an independent model of F.grid_sample's CUDA code.

F.grid_sample's CUDA kernels compute a source index with ``grid_sampler_compute_source_index``
in the forward pass and with its ``_set_grad`` twin in the backward pass; the two differ for
NaN (the forward clips it to 0, the backward lets it through to the downgrade, so the point is
outside and gets no gradient), and the reflection's ``static_cast<int>(floor(x / span))``
saturates to INT_MAX (odd) for huge coordinates. The model below follows those functions in
float32 with numpy; the header is compiled with the host compiler and run on the same values,
so this needs no GPU.
"""

import itertools
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
f32 = np.float32
INT_MAX, INT_MIN = 2**31 - 1, -(2**31)


def _cuda_float_to_int(x: np.float32) -> int:
    """static_cast<int>(float) on the GPU (cvt.rzi.s32): NaN -> 0, out of range saturates."""
    if math.isnan(x):
        return 0
    if not math.isfinite(x):
        return INT_MAX if x > 0 else INT_MIN
    return int(max(min(math.trunc(float(x)), INT_MAX), INT_MIN))


def _unnormalize(coord, size, align):
    if align:
        return ((coord + f32(1)) / f32(2)) * f32(size - 1), f32(size - 1) / f32(2)
    return ((coord + f32(1)) * f32(size) - f32(1)) / f32(2), f32(size) / f32(2)


def _clip(x, size):  # forward: ::min(size - 1, ::max(x, 0)), fmaxf/fminf drop NaN
    x = f32(0) if math.isnan(x) else max(x, f32(0))
    return min(f32(size - 1), x)


def _clip_set_grad(x, size):
    if x <= 0:
        return f32(0), f32(0)
    if x >= f32(size - 1):
        return f32(size - 1), f32(0)
    return x, f32(1)  # also NaN: both comparisons are false


def _reflect(x, twice_low, twice_high, with_grad):
    if twice_low == twice_high:
        return f32(0), f32(0)
    low, span = f32(twice_low) / f32(2), f32(twice_high - twice_low) / f32(2)
    x = f32(x - low)
    sign = f32(1)
    if with_grad and x < 0:
        sign, x = f32(-1), -x
    elif not with_grad:
        x = f32(abs(x))
    extra = f32(np.fmod(x, span))
    flips = _cuda_float_to_int(f32(np.floor(f32(x / span))))
    if flips % 2 == 0:
        return f32(extra + low), sign
    return f32(span - extra + low), -sign


def _downgrade(x):
    if not math.isfinite(x) or x > INT_MAX - 1 or x < INT_MIN:
        return f32(-100)
    return x


def torch_cuda_source_index(coord, size, padding, align, backward):
    """(index, d index / d coord) as F.grid_sample's CUDA kernels compute them."""
    with np.errstate(all="ignore"):
        x, grad = _unnormalize(f32(coord), size, align)
        if padding == 1:
            if backward:
                x, g_clip = _clip_set_grad(x, size)
                grad = grad * g_clip
            else:
                x = _clip(x, size)
        elif padding == 2:
            bounds = (0, 2 * (size - 1)) if align else (-1, 2 * size - 1)
            x, g_refl = _reflect(x, *bounds, with_grad=backward)
            if backward:
                x, g_clip = _clip_set_grad(x, size)
                grad = grad * g_refl * g_clip
            else:
                x = _clip(x, size)
        return _downgrade(x), grad


PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "grid_common.h"
using namespace grad_ext;
int main(int argc, char** argv) {
  float coord; long size; int padding, align, backward;
  while (std::scanf("%a %ld %d %d %d", &coord, &size, &padding, &align, &backward) == 5) {
    float grad = 0.f;
    const NonFinitePolicy policy = backward ? cuda_backward_policy() : cuda_policy();
    const float x = source_index<float>(coord, size, padding, align != 0, policy, &grad);
    std::printf("%a %a\n", x, grad);
  }
  return 0;
}
"""

COORDS = [-1.0, 1.0, 0.0, 0.75, -0.3, 1.25, -1.25, -9.5, 7.0, 1e3, 3e9, 1e10, -1e10, 4e38,
          math.inf, -math.inf, math.nan]
CASES = list(itertools.product(COORDS, [1, 2, 4, 5], [0, 1, 2], [0, 1], [0, 1]))


def run_header_program(folder: Path, program: str, cases) -> list:
    """Compiles `program` against csrc/ with the host compiler and feeds it one case per line
    ("coord size padding align backward", the coordinate in hex); returns its output lines split."""
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler is needed to build the host check of csrc/grid_common.h"
    (folder / "check.cpp").write_text(program)
    exe = folder / "check"
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(folder / "check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    lines = "".join(f"{float(c).hex()} {s} {p} {a} {b}\n" for c, s, p, a, b in cases)
    done = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True, timeout=60)
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == len(cases)
    return rows


@pytest.fixture(scope="module")
def header_results(tmp_path_factory):
    rows = run_header_program(tmp_path_factory.mktemp("coords"), PROGRAM, CASES)
    return [(f32(float.fromhex(x)), f32(float.fromhex(g))) for x, g in rows]


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("backward", [0, 1], ids=["forward", "backward"])
def test_cuda_source_index_matches_f_grid_sample(header_results, backward):
    mismatches = []
    for (coord, size, padding, align, bwd), (x, grad) in zip(CASES, header_results):
        if bwd != backward:
            continue
        want_x, want_grad = torch_cuda_source_index(coord, size, padding, align, bool(backward))
        if not _same(x, want_x):
            mismatches.append((coord, size, padding, align, float(x), float(want_x)))
        # the gradient only matters where the point can be inside
        elif backward and want_x != -100 and not _same(grad, want_grad):
            mismatches.append((coord, size, padding, align, "grad", float(grad), float(want_grad)))
    assert not mismatches, mismatches[:10]


def test_nan_is_outside_in_the_backward_only(header_results):
    # Border padding, size 4: the forward samples cell 0, the backward drops the point.
    lookup = {case: result for case, result in zip(CASES, header_results)}
    for padding in (1, 2):
        fwd_x, _ = _find(lookup, padding, 0)
        bwd_x, _ = _find(lookup, padding, 1)
        assert fwd_x == 0 and bwd_x == -100


def _find(lookup, padding, backward):
    for (coord, size, pad, align, bwd), result in lookup.items():
        if math.isnan(coord) and size == 4 and pad == padding and align == 0 and bwd == backward:
            return result
    raise KeyError(padding)


def test_huge_reflected_coordinates_take_the_saturated_parity(header_results):
    # size 4, align_corners=False, coordinate 1e10: CUDA's int cast saturates to INT_MAX (odd),
    # so F.grid_sample reflects to the last cell, not the first.
    for (coord, size, padding, align, bwd), (x, _) in zip(CASES, header_results):
        if coord == 1e10 and size == 4 and padding == 2 and align == 0:
            assert x == torch_cuda_source_index(coord, size, padding, align, bool(bwd))[0]
            assert x > 1.5


# ---- Bicubic taps -------------------------------------------------------------------------
# F.grid_sample's CUDA bicubic code (GridSampler.cu with GridSampler.cuh and UpSample.cuh):
# the source index is only unnormalised; tap i of 4 sits at floor(ix) - 1 + i, and each tap is
# padded by ``compute_coordinates`` (the forward clip and reflection, in both passes), cast
# with static_cast<int> and read only when it lies inside. The weights are Keys' cubic
# convolution with A = -0.75 at t = ix - floor(ix); the backward's grid gradient subtracts
# ``get_cubic_coefficients_grad``, so d weight / d ix is its negation.
CUBIC_A = f32(-0.75)


def _cubic_conv1(x):
    return ((CUBIC_A + f32(2)) * x - (CUBIC_A + f32(3))) * x * x + f32(1)


def _cubic_conv2(x):
    return ((CUBIC_A * x - f32(5) * CUBIC_A) * x + f32(8) * CUBIC_A) * x - f32(4) * CUBIC_A


def _cubic_coefficients(t):
    x2 = f32(1) - t
    return [_cubic_conv2(f32(t + f32(1))), _cubic_conv1(t), _cubic_conv1(x2), _cubic_conv2(f32(x2 + f32(1)))]


def _cubic_coefficients_grad(t):
    a = CUBIC_A
    x0, x1, x2, x3 = f32(-1) - t, -t, f32(1) - t, f32(2) - t
    return [(f32(-3) * a * x0 - f32(10) * a) * x0 - f32(8) * a,
            (f32(-3) * (a + f32(2)) * x1 - f32(2) * (a + f32(3))) * x1,
            (f32(3) * (a + f32(2)) * x2 - f32(2) * (a + f32(3))) * x2,
            (f32(3) * a * x3 - f32(10) * a) * x3 + f32(8) * a]


def _compute_coordinates(x, size, padding, align):
    if padding == 1:
        return _clip(x, size)
    if padding == 2:
        bounds = (0, 2 * (size - 1)) if align else (-1, 2 * size - 1)
        return _clip(_reflect(x, *bounds, with_grad=False)[0], size)
    return x


def torch_cuda_cubic_taps(coord, size, padding, align):
    """([cell or None] * 4, weights, d weight / d index, d index / d coord) as F.grid_sample's CUDA bicubic."""
    with np.errstate(all="ignore"):
        ix, mult = _unnormalize(f32(coord), size, align)
        ix_nw = f32(np.floor(ix))
        t = f32(ix - ix_nw)
        cells = []
        for i in range(4):
            tap = f32(f32(ix_nw - f32(1)) + f32(i))
            idx = _cuda_float_to_int(_compute_coordinates(tap, size, padding, align))
            cells.append(idx if 0 <= idx < size else None)
        weights = [f32(w) for w in _cubic_coefficients(t)]
        grads = [f32(-g) for g in _cubic_coefficients_grad(t)]
        return cells, weights, grads, f32(mult)


CUBIC_PROGRAM = r"""
#include <cstdio>
#include "grid_common.h"
using namespace grad_ext;
int main() {
  float coord; long size_in; int padding, align, backward;
  while (std::scanf("%a %ld %d %d %d", &coord, &size_in, &padding, &align, &backward) == 5) {
    const int64_t size = size_in, stride = 1;
    PointCorners<float, 1, 4> pc;
    const NonFinitePolicy policy = backward ? cuda_backward_policy() : cuda_policy();
    setup_corners<float, 1, 4>(&coord, &size, &stride, kBicubic, padding, align != 0, policy, true, pc);
    std::printf("%u %a", static_cast<unsigned>(pc.valid), pc.mult[0]);
    for (int k = 0; k < 4; ++k)
      std::printf(" %lld %a %a", static_cast<long long>(pc.offset[k]), pc.weight[k], pc.dw[0][k]);
    std::printf("\n");
  }
  return 0;
}
"""

CUBIC_COORDS = COORDS + [0.1, -0.97, 0.999, -1.01, 2.3, -3.7]
CUBIC_CASES = list(itertools.product(CUBIC_COORDS, [1, 2, 4, 5], [0, 1, 2], [0, 1], [0, 1]))


@pytest.fixture(scope="module")
def cubic_header_results(tmp_path_factory):
    rows = run_header_program(tmp_path_factory.mktemp("cubic"), CUBIC_PROGRAM, CUBIC_CASES)
    results = []
    for fields in rows:
        valid, mult = int(fields[0]), f32(float.fromhex(fields[1]))
        taps = [(int(fields[2 + 3 * k]), f32(float.fromhex(fields[3 + 3 * k])), f32(float.fromhex(fields[4 + 3 * k])))
                for k in range(4)]
        cells = [off if valid >> k & 1 else None for k, (off, _, _) in enumerate(taps)]
        results.append((cells, [w for _, w, _ in taps], [g for _, _, g in taps], mult))
    return results


def _close(a, b, tol=f32(2e-6)):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(f32(1), abs(b))


@pytest.mark.parametrize("backward", [0, 1], ids=["forward", "backward"])
def test_cuda_bicubic_taps_match_f_grid_sample(cubic_header_results, backward):
    """Which cells the 4 taps read, their weights and weight derivatives, for every padding."""
    mismatches = []
    for (coord, size, padding, align, bwd), got in zip(CUBIC_CASES, cubic_header_results):
        if bwd != backward:
            continue
        cells, weights, grads, mult = got
        want_cells, want_weights, want_grads, want_mult = torch_cuda_cubic_taps(coord, size, padding, align)
        case = (coord, size, padding, align)
        if cells != want_cells:
            mismatches.append((case, "cells", cells, want_cells))
        elif not all(_close(a, b) for a, b in zip(weights, want_weights)):
            mismatches.append((case, "weights", weights, want_weights))
        elif not all(_close(a, b) for a, b in zip(grads, want_grads)):
            mismatches.append((case, "weight grads", grads, want_grads))
        elif mult != want_mult:
            mismatches.append((case, "mult", mult, want_mult))
    assert not mismatches, mismatches[:10]


def test_cuda_bicubic_border_and_reflection_fold_taps_into_the_table(cubic_header_results):
    # size 4, align_corners=False, coordinate -9.5 (index -17.5): every tap lies left of the
    # table; border padding reads cell 0 four times, reflection mirrors them back inside, zeros
    # reads none. A NaN coordinate under zeros padding reads cell 0 (CUDA casts NaN to 0).
    lookup = {case: result for case, result in zip(CUBIC_CASES, cubic_header_results)}
    assert lookup[(-9.5, 4, 0, 0, 0)][0] == [None] * 4
    assert lookup[(-9.5, 4, 1, 0, 0)][0] == [0] * 4
    assert all(c is not None and 0 <= c < 4 for c in lookup[(-9.5, 4, 2, 0, 0)][0])
    nan_case = next(result for case, result in lookup.items() if math.isnan(case[0]) and case[1:] == (4, 0, 0, 1))
    assert nan_case[0] == [0] * 4 and all(math.isnan(w) for w in nan_case[1])
