"""Pure-torch versions of every grad_ext op: the formulations the kernels replace.

They are written independently of the kernels (torch ops only, autograd for gradients; the
Philox draws in Python integer arithmetic) and serve as the ground truth in tests and the
baseline in benchmarks. :func:`grid_sample`, :func:`jitter_noise` and :func:`refine` take the
same arguments and return the same types as their grad_ext twins, so a caller picks one
implementation (``ops = grad_ext`` or ``ops = grad_ext.reference``) and calls it the same way.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    COS_WEIGHT,
    INTERPOLATIONS,
    JITTER_MODES,
    MSE_THRESHOLD,
    MSE_WEIGHT,
    PADDINGS,
    JitterNoise,
    RefineOutput,
    call_seed,
    check_tensors,
    choice,
    real,
    seed_tensor,
)

__all__ = ["CUBIC_A", "cubic_kernel", "cubic_sample", "grid_sample", "jitter_grid", "jitter_noise",
           "multilinear_sample", "philox4x32_10", "refine"]


def jitter_grid(grid: Tensor, noise: Tensor) -> Tensor:
    """``grid`` (N, *out, d) plus ``noise`` (N * prod(out), d), as the jittered kernels see it."""
    return grid + noise.to(grid.dtype).reshape(grid.shape)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: Tensor, key: tuple) -> Tensor:
    """Philox4x32-10 (Salmon et al., SC'11) on a batch of counters (M, 4) of uint32 values held
    in int64; key = (k0, k1). Returns (M, 4) int64 holding uint32 values."""
    c = [counter[:, i].to(torch.int64) for i in range(4)]
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        # 32x32 -> 64-bit products split in 16-bit halves so int64 never overflows
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return torch.stack(c, dim=1)


def _mulhilo(m: int, x: Tensor) -> tuple:
    m_lo, m_hi = m & 0xFFFF, m >> 16
    x_lo, x_hi = x & 0xFFFF, x >> 16
    lo_lo = m_lo * x_lo
    mid1 = m_hi * x_lo
    mid2 = m_lo * x_hi
    hi_hi = m_hi * x_hi
    carry = ((lo_lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)) >> 16
    lo = (lo_lo + ((mid1 + mid2) << 16)) & _MASK32
    hi = (hi_hi + (mid1 >> 16) + (mid2 >> 16) + carry) & _MASK32
    return hi, lo


def _unit(x: Tensor) -> Tensor:
    return x.to(torch.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10


def _philox_noise(seed: int, offset: int, num_points: int, dim: int, jitter_std: float, jitter_prob: float,
                  jitter_mode: str) -> tuple[Tensor, Tensor]:
    # Point i uses counter (i, 0, offset) for its two Box-Muller pairs and (i, 2^31, offset) for
    # its coin ('pixel'); 'batch' uses one coin on counter (2^32-1, 2^32-1, offset). Key = seed.
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    off = (offset & _MASK32, (offset >> 32) & _MASK32)
    idx = torch.arange(num_points, dtype=torch.int64)

    def counters(hi_bit: int) -> Tensor:
        return torch.stack([idx & _MASK32, (idx >> 32) | hi_bit, torch.full_like(idx, off[0]),
                            torch.full_like(idx, off[1])], dim=1)
    if not (jitter_std > 0 and jitter_prob > 0):
        return torch.zeros(num_points, dim), torch.zeros(num_points, dtype=torch.bool)
    if jitter_mode == "batch":
        coin = philox4x32_10(torch.tensor([[_MASK32, _MASK32, off[0], off[1]]]), key)[0, 0]
        flags = torch.full((num_points,), bool(_unit(coin) < jitter_prob))
    else:
        flags = _unit(philox4x32_10(counters(0x80000000), key)[:, 0]) < jitter_prob
    r = philox4x32_10(counters(0), key)
    rad0 = torch.sqrt(-2 * torch.log(_unit(r[:, 0])))
    rad1 = torch.sqrt(-2 * torch.log(_unit(r[:, 2])))
    a0, a1 = 6.283185307179586 * _unit(r[:, 1]), 6.283185307179586 * _unit(r[:, 3])
    z = torch.stack([rad0 * torch.cos(a0), rad0 * torch.sin(a0), rad1 * torch.cos(a1), rad1 * torch.sin(a1)], 1)
    noise = (jitter_std * z[:, :dim]) * flags[:, None]
    return noise.to(torch.float32), flags


def jitter_noise(jitter_seed, num_points: int, dim: int, jitter_std: float, jitter_prob: float,
                 jitter_mode: str = "pixel", device: str | torch.device = "cpu") -> JitterNoise:
    """Independent re-implementation of the kernels' jitter draws (:func:`grad_ext.jitter_noise`).

    Args:
        jitter_seed: (seed, offset) or an int64 tensor of 2 elements.
        num_points, dim, jitter_std, jitter_prob, jitter_mode, device: as in grad_ext.jitter_noise.

    Returns:
        JitterNoise(noise (num_points, dim) float32, jittered (num_points,) bool) on ``device``.
    """
    choice("jitter_mode", jitter_mode, JITTER_MODES)
    if not 1 <= dim <= 4:
        raise ValueError(f"jitter_noise: dim must be 1 to 4, got {dim}")
    if num_points < 0:
        raise ValueError(f"jitter_noise: num_points must be >= 0, got {num_points}")
    seed, offset = (int(v) for v in seed_tensor(jitter_seed, "cpu").tolist())
    noise, flags = _philox_noise(seed, offset, int(num_points), int(dim), real("jitter_std", jitter_std),
                                 real("jitter_prob", jitter_prob), jitter_mode)
    return JitterNoise(noise.to(device), flags.to(device))


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool | None = False, *, jitter_std: float = 0.0, jitter_prob: float = 0.0,
                jitter_mode: str = "pixel", generator: torch.Generator | None = None, jitter_seed=None) -> Tensor:
    """Reference of :func:`grad_ext.grid_sample`, with the same arguments and result.

    F.grid_sample for 2-D and 3-D tables, a shared table used as the GRAD reference code does:
    repeated over the batch, or, when every grid batch holds one point, sampled once at all N
    points and transposed; the explicit multilinear gather :func:`multilinear_sample` for
    1-D and 4-D, and :func:`cubic_sample` for bicubic on 1-D and 3-D tables. A jittered call
    draws its seed exactly as grad_ext does (so the same torch seed gives the same noise), adds
    :func:`jitter_noise` to the grid and samples there.

    Args:
        input: (N_in, C, S_1, ..., S_d), N_in in {1, N}.
        grid: (N, O_1, ..., O_d, d).
        mode, padding_mode, align_corners, jitter_std, jitter_prob, jitter_mode, generator,
            jitter_seed: as in grad_ext.grid_sample.

    Returns:
        (N, C, O_1, ..., O_d).
    """
    check_tensors(input=input, grid=grid)
    choice("mode", mode, INTERPOLATIONS)
    choice("padding_mode", padding_mode, PADDINGS)
    choice("jitter_mode", jitter_mode, JITTER_MODES)
    jitter_std, jitter_prob = real("jitter_std", jitter_std), real("jitter_prob", jitter_prob)
    seed = call_seed(jitter_std, jitter_prob, jitter_seed, generator, input.device)
    if seed is not None:
        noise = jitter_noise(seed, grid[..., 0].numel(), grid.shape[-1], jitter_std, jitter_prob, jitter_mode,
                             device=grid.device)
        grid = jitter_grid(grid, noise.noise)
    align_corners = bool(align_corners)
    d = input.dim() - 2
    if mode == "bicubic" and d != 2:
        if d > 3:
            raise ValueError(f"sample_grid: interpolation 2 (bicubic) supports 1-D to 3-D tables, got a {d}-D table")
        return cubic_sample(input, grid, padding_mode, align_corners)
    if d in (2, 3):
        n = grid.shape[0]
        if input.shape[0] == 1 and n != 1:
            if grid[0, ..., 0].numel() == 1:
                # One point per grid batch (GRAD's global grid): the batch becomes the points of
                # one sampling, (1, N, 1, .., d), and the (1, C, N, 1, ..) result is transposed,
                # as the reference code does; no copy of the table.
                out = F.grid_sample(input, grid.reshape(1, n, *grid.shape[2:]), mode=mode,
                                    padding_mode=padding_mode, align_corners=align_corners)
                return out.reshape(input.shape[1], n).t().reshape(n, input.shape[1], *grid.shape[1:-1])
            input = input.repeat(n, *([1] * (input.dim() - 1)))  # the reference code's local grid
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return multilinear_sample(input, grid, mode, padding_mode, align_corners)


def _unnormalize(coord: Tensor, size: int, align_corners: bool) -> Tensor:
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _pad(x: Tensor, size: int, padding_mode: str, align_corners: bool) -> Tensor:
    """A coordinate (in cells) brought inside the table by the padding: reflected about the
    borders and clamped, clamped, or left as it is (zeros)."""
    if padding_mode == "reflection":
        low, span = (0.0, size - 1.0) if align_corners else (-0.5, float(size))
        if span <= 0:
            x = x * 0  # a single cell: the coordinate has no effect (kept in the graph)
        else:
            y = (x - low).abs()
            flips = torch.floor(y / span)
            extra = y - flips * span
            x = torch.where(torch.remainder(flips, 2) == 0, extra + low, span - extra + low)
    if padding_mode in ("border", "reflection"):
        x = x.clamp(0, size - 1)
    return x


def _source_index(coord: Tensor, size: int, padding_mode: str, align_corners: bool) -> Tensor:
    return _pad(_unnormalize(coord, size, align_corners), size, padding_mode, align_corners)


def _flat_table(input: Tensor, n: int) -> Tensor:
    table = input.reshape(input.shape[0], input.shape[1], -1)
    return table.expand(n, *table.shape[1:]) if table.shape[0] == 1 else table


def _gather(table: Tensor, sizes: list, idx: list, weight: Tensor) -> Tensor:
    """weight * table[idx] per point (N, C, Q); indices outside the table contribute zero."""
    n, c = table.shape[:2]
    strides = [1] * len(sizes)
    for a in range(len(sizes) - 2, -1, -1):
        strides[a] = strides[a + 1] * sizes[a + 1]
    inside = torch.ones_like(weight, dtype=torch.bool)
    flat = torch.zeros_like(idx[0])
    for a, size in enumerate(sizes):
        inside &= (idx[a] >= 0) & (idx[a] < size)
        flat = flat + idx[a].clamp(0, size - 1) * strides[a]
    vals = torch.gather(table, 2, flat.unsqueeze(1).expand(n, c, flat.shape[1]))
    return vals * (weight * inside).unsqueeze(1)


def multilinear_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                       align_corners: bool = False) -> Tensor:
    """Explicit multilinear (or nearest) interpolation for any table dimension d.

    input (N_in, C, S_1..S_d) with N_in in {1, N}; grid (N, *out, d) -> (N, C, *out). Corners
    outside the table contribute zero; differentiable through torch autograd."""
    n, c = grid.shape[0], input.shape[1]
    d = input.dim() - 2
    sizes = list(input.shape[2:])
    out_shape = grid.shape[1:-1]
    table = _flat_table(input, n)
    pts = grid.reshape(n, -1, d)
    # grid component k addresses table axis d-1-k
    xs = [_source_index(pts[..., d - 1 - a], sizes[a], padding_mode, align_corners) for a in range(d)]

    def gather(idx: list, weight: Tensor) -> Tensor:
        return _gather(table, sizes, idx, weight)

    if mode == "nearest":
        idx = [torch.round(x).long() for x in xs]  # round half to even, like F.grid_sample
        out = gather(idx, torch.ones_like(xs[0]))
    elif mode == "bilinear":
        lows = [torch.floor(x) for x in xs]
        fracs = [x - lo for x, lo in zip(xs, lows)]
        out = 0
        for corner in itertools.product((0, 1), repeat=d):
            weight = torch.ones_like(xs[0])
            for a, hi in enumerate(corner):
                weight = weight * (fracs[a] if hi else 1 - fracs[a])
            idx = [lows[a].long() + hi for a, hi in enumerate(corner)]
            out = out + gather(idx, weight)
    else:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return out.reshape(n, c, *out_shape)


CUBIC_A = -0.75  # the cubic convolution coefficient of F.grid_sample and ONNX


def cubic_kernel(s: Tensor, a: float = CUBIC_A) -> Tensor:
    """Keys' cubic convolution kernel W(s) at distances s (zero from |s| = 2 on)."""
    s = s.abs()
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((s - 5) * s + 8) * s * a - 4 * a
    return torch.where(s <= 1, near, torch.where(s < 2, far, torch.zeros_like(s)))


def cubic_sample(input: Tensor, grid: Tensor, padding_mode: str = "zeros", align_corners: bool = False) -> Tensor:
    """Cubic interpolation for any table dimension d: the tensor product of the 1-D cubic
    convolution (ONNX GridSample's N-D 'cubic', F.grid_sample's 'bicubic' for d = 2).

    Per axis the source index x is the unnormalised coordinate, unpadded; the 4 taps are the
    cells floor(x) - 1 .. floor(x) + 2, each weighted by W(x - tap) and brought inside by the
    padding (zeros: taps outside add nothing). input (N_in, C, S_1..S_d) with N_in in {1, N};
    grid (N, *out, d) -> (N, C, *out); differentiable through torch autograd (no gradient
    flows through a tap's index)."""
    choice("padding_mode", padding_mode, PADDINGS)
    n, c = grid.shape[0], input.shape[1]
    d = input.dim() - 2
    sizes = list(input.shape[2:])
    table = _flat_table(input, n)
    pts = grid.reshape(n, -1, d)
    xs = [_unnormalize(pts[..., d - 1 - a], sizes[a], align_corners) for a in range(d)]
    firsts = [torch.floor(x).detach() - 1 for x in xs]
    out = 0
    for taps in itertools.product(range(4), repeat=d):
        weight = torch.ones_like(xs[0])
        idx = []
        for a, i in enumerate(taps):
            tap = firsts[a] + i
            weight = weight * cubic_kernel(xs[a] - tap)
            # a NaN tap is outside (it only arises with a NaN weight, which makes the result NaN)
            idx.append(torch.nan_to_num(_pad(tap, sizes[a], padding_mode, align_corners), nan=-1.0,
                                        posinf=-1.0, neginf=-1.0).long())
        out = out + _gather(table, sizes, idx, weight)
    return out.reshape(n, c, *grid.shape[1:-1])


def refine(rec: Tensor, feat: Tensor, mse_weight: float = MSE_WEIGHT, cos_weight: float = COS_WEIGHT,
           mse_threshold: float = MSE_THRESHOLD, return_refined: bool = False) -> RefineOutput:
    """Reference of :func:`grad_ext.refine`, written as GRAD's refinement reads in
    docs/method.md §2, with the same arguments and result.

    Args:
        rec, feat: (B, C, H, W).
        mse_weight, cos_weight, mse_threshold, return_refined: as in grad_ext.refine.

    Returns:
        RefineOutput(sim (B, H, W), anomaly_map (B, H, W), loss (), refined (B, C, H, W) or
        None), differentiable through torch autograd (the indicator is a comparison, so it has
        no gradient).
    """
    check_tensors(rec=rec, feat=feat)
    mse_weight, cos_weight = real("mse_weight", mse_weight), real("cos_weight", cos_weight)
    mse_threshold = real("mse_threshold", mse_threshold)
    mse = ((rec - feat) ** 2).mean(dim=1)
    indicator = (mse < mse_threshold).to(rec.dtype)
    sim = mse_weight * indicator + cos_weight * F.cosine_similarity(rec, feat, dim=1, eps=1e-8)
    weight = sim.unsqueeze(1)
    refined = weight * feat + (1 - weight) * rec
    anomaly_map = torch.linalg.vector_norm(feat - refined, dim=1)
    loss = ((refined - feat) ** 2).mean()
    return RefineOutput(sim, anomaly_map, loss, refined if return_refined else None)
