"""Coordinate jitter inside grad_ext.grid_sample."""
import math

import pytest
import torch

import grad_ext
from grad_ext import reference

# The reference draws the same Philox numbers in torch's float32 log/cos/sin, a few ulp from the
# kernels' libm: jittered results agree to float32 precision of the noise, not bit for bit.
NOISE_TOL = dict(rtol=1e-5, atol=1e-6)


def test_philox_known_answers():
    """Known-answer vectors of Philox4x32-10 from its authors' test suite."""
    cases = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, expected in cases:
        assert reference.philox4x32_10(torch.tensor([ctr]), key)[0].tolist() == expected


@pytest.mark.parametrize("mode", ["pixel", "batch"])
@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_kernel_noise_equals_independent_reimplementation(mode, dim):
    seed, offset = 2**40 + 12345, 2**33 + 7
    got = grad_ext.jitter_noise((seed, offset), 3000, dim, 0.07, 0.4, mode)
    noise, flags = reference.jitter_noise((seed, offset), 3000, dim, 0.07, 0.4, mode)
    assert torch.equal(got.jittered, flags)
    torch.testing.assert_close(got.noise, noise, rtol=1e-5, atol=1e-7)


def test_jittered_sampling_equals_reference_with_the_same_noise():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1, 5, 8, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    grid = (torch.rand(4, 6, 6, 2, dtype=torch.float64, generator=gen) * 1.8 - 0.9).requires_grad_()
    for mode in ("pixel", "batch"):
        seed = (99, 3)
        out = grad_ext.grid_sample(table, grid, jitter_std=0.05, jitter_prob=0.5, jitter_mode=mode, jitter_seed=seed)
        ref = reference.grid_sample(table, grid, jitter_std=0.05, jitter_prob=0.5, jitter_mode=mode, jitter_seed=seed)
        assert not torch.equal(ref, reference.grid_sample(table, grid))  # the noise moved something
        torch.testing.assert_close(out, ref, **NOISE_TOL)
        gout = torch.randn_like(out)
        g1 = torch.autograd.grad(out, (table, grid), gout)
        g2 = torch.autograd.grad(ref, (table, grid), gout)
        torch.testing.assert_close(g1[0], g2[0], **NOISE_TOL)
        # the coordinate gradient is the gradient at the jittered point
        torch.testing.assert_close(g1[1], g2[1], **NOISE_TOL)


# The dense (matrix product) path of the CPU kernel serves a shared table with many channels
# sampled at one point per image or one image of points; the row loops serve large tables.
@pytest.mark.parametrize("table_shape,grid_shape", [
    ((1, 300, 4, 4), (6, 1, 1, 2)), ((1, 300, 4, 4), (1, 9, 1, 2)), ((1, 8, 40, 40), (2, 5, 5, 2)),
])
def test_jitter_on_every_cpu_path_equals_reference(table_shape, grid_shape):
    gen = torch.Generator().manual_seed(21)
    table = torch.randn(table_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    grid = (torch.rand(grid_shape, dtype=torch.float64, generator=gen) * 1.8 - 0.9).requires_grad_()
    kw = dict(jitter_std=0.1, jitter_prob=0.7, jitter_seed=(17, 4))
    out = grad_ext.grid_sample(table, grid, **kw)
    ref = reference.grid_sample(table, grid, **kw)
    assert not torch.equal(ref, reference.grid_sample(table, grid))
    torch.testing.assert_close(out, ref, **NOISE_TOL)
    gout = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (table, grid), gout), torch.autograd.grad(ref, (table, grid), gout)):
        torch.testing.assert_close(a, b, **NOISE_TOL)


def test_reference_draws_the_same_seed_from_torch_rng():
    table = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    grid = torch.rand(2, 5, 5, 2, dtype=torch.float64) * 2 - 1
    kw = dict(jitter_std=0.1, jitter_prob=0.5)
    torch.manual_seed(8)
    ext = grad_ext.grid_sample(table, grid, **kw)
    torch.manual_seed(8)
    ref = reference.grid_sample(table, grid, **kw)
    torch.testing.assert_close(ext, ref, **NOISE_TOL)
    assert not torch.equal(ref, reference.grid_sample(table, grid))


def test_statistics_within_binomial_bounds():
    n, std, p = 200_000, 0.05, 0.3
    noise, flags = grad_ext.jitter_noise((7, 0), n, 2, std, p, "pixel")
    k = int(flags.sum())
    assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p))
    jittered = noise[flags].double()
    assert abs(jittered.mean()) < 5 * std / math.sqrt(jittered.numel())
    assert abs(jittered.std() / std - 1) < 0.01
    assert torch.count_nonzero(noise[~flags]) == 0
    # the two components are uncorrelated and Gaussian (fourth moment 3 sigma^4)
    z = jittered / std
    assert abs((z[:, 0] * z[:, 1]).mean()) < 0.02
    assert abs((z ** 4).mean() - 3) < 0.1


def test_batch_mode_is_all_or_nothing_with_probability_p():
    outcomes = []
    for offset in range(400):
        flags = grad_ext.jitter_noise((11, offset), 50, 2, 0.05, 0.5, "batch").jittered
        assert bool(flags.all()) or not bool(flags.any())
        outcomes.append(bool(flags.all()))
    k = sum(outcomes)
    assert abs(k - 200) < 5 * math.sqrt(100)


def test_reproducible_under_manual_seed_and_generator():
    table = torch.randn(1, 3, 8, 8)
    grid = torch.rand(2, 5, 5, 2) * 2 - 1
    kw = dict(jitter_std=0.1, jitter_prob=0.5)
    torch.manual_seed(3)
    a = grad_ext.grid_sample(table, grid, **kw)
    b = grad_ext.grid_sample(table, grid, **kw)
    torch.manual_seed(3)
    c = grad_ext.grid_sample(table, grid, **kw)
    assert torch.equal(a, c) and not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(grad_ext.grid_sample(table, grid, generator=g1, **kw),
                       grad_ext.grid_sample(table, grid, generator=g2, **kw))


def test_zero_std_or_prob_is_exactly_the_plain_sampler():
    table = torch.randn(1, 4, 6, 6, requires_grad=True)
    grid = (torch.rand(3, 4, 4, 2) * 2 - 1).requires_grad_()
    plain = grad_ext.grid_sample(table, grid)
    for std, p in ((0.0, 0.5), (0.1, 0.0)):
        out = grad_ext.grid_sample(table, grid, jitter_std=std, jitter_prob=p)
        assert torch.equal(out, plain)
    gp = torch.autograd.grad(plain.sum(), (table, grid))
    gj = torch.autograd.grad(grad_ext.grid_sample(table, grid, jitter_std=0.0, jitter_prob=1.0).sum(), (table, grid))
    assert torch.equal(gp[0], gj[0]) and torch.equal(gp[1], gj[1])


def test_probability_one_moves_every_point():
    table = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    grid = torch.rand(2, 8, 8, 2, dtype=torch.float64) * 1.6 - 0.8
    out = grad_ext.grid_sample(table, grid, jitter_std=0.05, jitter_prob=1.0, jitter_seed=(1, 1))
    moved = (out - grad_ext.grid_sample(table, grid)).abs().amax(1) > 0
    assert bool(moved.all())


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"jitter_std": -0.1, "jitter_prob": 0.5}, ValueError, "jitter_std"),
    ({"jitter_std": 0.1, "jitter_prob": -0.1}, ValueError, "jitter_prob"),
    ({"jitter_std": 0.1, "jitter_prob": 1.1}, ValueError, "jitter_prob"),
    ({"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_mode": "image"}, ValueError, "jitter_mode"),
    ({"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_seed": (1, 2, 3)}, ValueError, "jitter_seed"),
    ({"jitter_std": 0.1, "jitter_prob": 0.5, "jitter_seed": torch.tensor([1.0, 2.0])}, TypeError, "jitter_seed"),
])
def test_bad_jitter_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        grad_ext.grid_sample(torch.randn(1, 2, 4, 4), torch.rand(1, 2, 2, 2), **kwargs)


@pytest.mark.cuda
def test_cpu_and_cuda_draw_the_same_noise():
    for mode in ("pixel", "batch"):
        cpu = grad_ext.jitter_noise((123, 456), 10_000, 3, 0.05, 0.5, mode)
        cuda = grad_ext.jitter_noise((123, 456), 10_000, 3, 0.05, 0.5, mode, device="cuda")
        assert torch.equal(cpu.jittered, cuda.jittered.cpu())
        torch.testing.assert_close(cpu.noise, cuda.noise.cpu(), rtol=1e-5, atol=1e-7)
    table = torch.randn(1, 8, 8, 8)
    grid = torch.rand(4, 7, 7, 2) * 2 - 1
    kw = dict(jitter_std=0.05, jitter_prob=0.5, jitter_seed=(5, 9))
    torch.testing.assert_close(grad_ext.grid_sample(table.cuda(), grid.cuda(), **kw).cpu(),
                               grad_ext.grid_sample(table, grid, **kw), rtol=1e-5, atol=1e-5)
