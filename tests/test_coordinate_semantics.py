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


@pytest.fixture(scope="module")
def header_results(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler is needed to build the host check of csrc/grid_common.h"
    folder = tmp_path_factory.mktemp("coords")
    (folder / "coords.cpp").write_text(PROGRAM)
    exe = folder / "coords"
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(folder / "coords.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    lines = "".join(f"{float(c).hex()} {s} {p} {a} {b}\n" for c, s, p, a, b in CASES)
    done = subprocess.run([str(exe)], input=lines, capture_output=True, text=True, check=True, timeout=60)
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == len(CASES)
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
