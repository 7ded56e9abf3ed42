"""Tests of grad_ext.refine (GRAD's feature refinement, loss and anomaly map).

Ground truth is the pure-torch formulation in grad_ext.reference.refine (torch ops and
autograd, in float64), torch.nn.functional.cosine_similarity for the cosine, finite
differences (gradcheck), and hand-made inputs whose answer is known exactly.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import grad_ext
from grad_ext import reference
from grad_ext.refine import COS_WEIGHT, COSINE_EPS, MSE_THRESHOLD, MSE_WEIGHT, RefineOutput

PARAMS = dict(mse_weight=MSE_WEIGHT, cos_weight=COS_WEIGHT, mse_threshold=MSE_THRESHOLD)
OUTPUT_NAMES = ("sim", "anomaly_map", "loss", "refined")


def make_pair(shape, dtype=torch.float64, device="cpu", seed=0):
    """feat ~ N(0, 1) and rec = feat + noise whose per-pixel scale is spread over [0, 6], so the
    channel mean of (rec - feat)^2 falls on both sides of the threshold 10."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.rand((shape[0], 1, *shape[2:]), generator=g, dtype=torch.float64) * 6
    rec = feat + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return rec.to(device, dtype), feat.to(device, dtype)


def channel_mse(rec, feat):
    return ((rec.double() - feat.double()) ** 2).mean(dim=1)


def upstream_weights(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}


def weighted_sum(outputs, weights, names):
    """sum over the chosen outputs of <output, weight>: its gradient sends `weight` into each."""
    return sum((getattr(outputs, name) * weights[name].to(outputs.sim)).sum() for name in names)


def reference_outputs(rec, feat, **params):
    return reference.refine(rec, feat, **{**PARAMS, **params}, return_refined=True)


# ---- values ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_values_match_reference(dtype, tol):
    rec, feat = make_pair((3, 11, 5, 7), dtype)
    mse = channel_mse(rec, feat)
    assert (mse < MSE_THRESHOLD).any() and (mse >= MSE_THRESHOLD).any()  # both branches of the indicator

    out = grad_ext.refine(rec, feat, return_refined=True)
    expected = reference_outputs(rec.double(), feat.double())
    for name in OUTPUT_NAMES:
        got, want = getattr(out, name), getattr(expected, name)
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=name)


def test_refined_is_none_unless_asked_for():
    rec, feat = make_pair((2, 4, 3, 3))
    out = grad_ext.refine(rec, feat)
    assert isinstance(out, RefineOutput) and out.refined is None
    assert out.sim.shape == out.anomaly_map.shape == (2, 3, 3) and out.loss.shape == ()


def test_custom_weights_and_threshold():
    rec, feat = make_pair((2, 6, 4, 4), seed=3)
    params = dict(mse_weight=-0.5, cos_weight=1.75, mse_threshold=4.0)
    out = grad_ext.refine(rec, feat, return_refined=True, **params)
    expected = reference_outputs(rec, feat, **params)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-12, atol=1e-12, msg=name)


def test_map_and_loss_follow_the_definition():
    """Independent of the factorised form: ||feat - refined|| and the mean of (refined - feat)^2
    computed from refined itself, and refined = sim * feat + (1 - sim) * rec."""
    rec, feat = make_pair((2, 5, 3, 4), seed=4)
    out = grad_ext.refine(rec, feat, return_refined=True)
    sim = out.sim.unsqueeze(1)
    torch.testing.assert_close(out.refined, sim * feat + (1 - sim) * rec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.anomaly_map, (feat - out.refined).norm(dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ((out.refined - feat) ** 2).mean(), rtol=1e-12, atol=1e-12)


# ---- the cosine ----------------------------------------------------------------------------

def cosine_test_pair():
    """Pixels with ordinary norms, norms below COSINE_EPS = 1e-8, zero vectors and large norms."""
    rec, feat = make_pair((2, 6, 3, 4), seed=5)
    rec[0, :, 0, 0] *= 1e-10       # ||rec|| < eps
    feat[0, :, 0, 1] *= 1e-11      # ||feat|| < eps
    rec[0, :, 0, 2] = 0            # zero rec
    feat[0, :, 0, 3] = 0           # zero feat
    rec[0, :, 1, 0] = 0            # both zero
    feat[0, :, 1, 0] = 0
    rec[1, :, 2, 3] *= 1e4         # large
    rec[1, :, 1, 1] = feat[1, :, 1, 1] * 3  # parallel
    return rec, feat


def test_cosine_matches_functional_values_and_gradients():
    rec, feat = cosine_test_pair()
    rec.requires_grad_(True)
    feat.requires_grad_(True)
    # mse_weight = 0, cos_weight = 1: sim is the cosine itself
    sim = grad_ext.refine(rec, feat, mse_weight=0.0, cos_weight=1.0).sim
    cos = F.cosine_similarity(rec, feat, dim=1, eps=COSINE_EPS)
    torch.testing.assert_close(sim, cos, rtol=1e-12, atol=1e-14)

    weight = upstream_weights({"sim": sim.shape})["sim"]
    got = torch.autograd.grad((sim * weight).sum(), (rec, feat))
    want = torch.autograd.grad((cos * weight).sum(), (rec, feat))
    for g, w, name in zip(got, want, ("rec", "feat")):
        assert w.abs().max() > 1e6  # the below-eps pixels have huge gradients: they are compared too
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


# ---- gradients -----------------------------------------------------------------------------

OUTPUT_COMBINATIONS = [("loss",), ("anomaly_map",), ("sim",), ("refined",), ("loss", "anomaly_map"),
                       ("sim", "refined"), ("loss", "refined"), ("sim", "anomaly_map", "loss", "refined")]


@pytest.mark.parametrize("names", OUTPUT_COMBINATIONS, ids=lambda n: "+".join(n))
@pytest.mark.parametrize("feat_grad", [True, False], ids=["feat_grad", "feat_const"])
def test_gradients_match_reference(names, feat_grad):
    rec, feat = make_pair((2, 7, 4, 5), seed=6)
    rec.requires_grad_(True)
    feat.requires_grad_(feat_grad)
    inputs = (rec, feat) if feat_grad else (rec,)
    weights = upstream_weights({"sim": (2, 4, 5), "anomaly_map": (2, 4, 5), "loss": (), "refined": rec.shape})

    out = grad_ext.refine(rec, feat, return_refined="refined" in names)
    got = torch.autograd.grad(weighted_sum(out, weights, names), inputs)
    want = torch.autograd.grad(weighted_sum(reference_outputs(rec, feat), weights, names), inputs)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_feat_gradient_without_rec_gradient():
    rec, feat = make_pair((2, 5, 3, 3), seed=7)
    feat.requires_grad_(True)
    out = grad_ext.refine(rec, feat)
    (grad,) = torch.autograd.grad(out.loss + out.anomaly_map.sum(), feat)
    ref = reference_outputs(rec, feat)
    (want,) = torch.autograd.grad(ref.loss + ref.anomaly_map.sum(), feat)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    rec, feat = make_pair((2, 3, 2, 3), seed=8)
    # finite differences must not cross the indicator's jump or the kinks of the map
    assert (channel_mse(rec, feat) - MSE_THRESHOLD).abs().min() > 1e-3
    out = grad_ext.refine(rec, feat)
    assert (1 - out.sim).abs().min() > 1e-3 and out.anomaly_map.min() > 1e-3
    rec.requires_grad_(True)
    feat.requires_grad_(True)

    def fn(r, f):
        return tuple(grad_ext.refine(r, f, return_refined=True))

    assert torch.autograd.gradcheck(fn, (rec, feat))


def test_map_gradient_is_zero_where_rec_equals_feat():
    rec, feat = make_pair((1, 4, 2, 2), seed=9)
    rec[0, :, 1, 0] = feat[0, :, 1, 0]
    rec.requires_grad_(True)
    feat.requires_grad_(True)
    out = grad_ext.refine(rec, feat)
    assert out.anomaly_map[0, 1, 0] == 0
    grad_rec, grad_feat = torch.autograd.grad(out.anomaly_map.sum(), (rec, feat))
    assert torch.all(grad_rec[0, :, 1, 0] == 0) and torch.all(grad_feat[0, :, 1, 0] == 0)
    # the other pixels are differentiable and follow the reference
    ref_rec, ref_feat = torch.autograd.grad(reference_outputs(rec, feat).anomaly_map.sum(), (rec, feat))
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[1, 0] = False
    torch.testing.assert_close(grad_rec[0][:, mask], ref_rec[0][:, mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_feat[0][:, mask], ref_feat[0][:, mask], rtol=1e-10, atol=1e-12)


# ---- the MSE indicator ---------------------------------------------------------------------

def boundary_pair():
    """Four pixels of C = 4 whose mean squared difference is exactly 10, 0, 16 and 7.8125."""
    feat = torch.full((1, 4, 1, 4), 0.5, dtype=torch.float64)
    diffs = torch.tensor([[2.0, 2.0, 4.0, 4.0],     # (4 + 4 + 16 + 16) / 4 = 10
                          [0.0, 0.0, 0.0, 0.0],     # 0
                          [4.0, -4.0, 4.0, -4.0],   # 16
                          [3.0, 3.0, 3.5, 1.0]],    # (9 + 9 + 12.25 + 1) / 4 = 7.8125
                         dtype=torch.float64)
    rec = feat + diffs.T.reshape(1, 4, 1, 4)
    return rec, feat


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mse_threshold_is_strict(dtype):
    rec, feat = (t.to(dtype) for t in boundary_pair())
    mse = channel_mse(rec, feat)[0, 0]
    assert mse.tolist() == [10.0, 0.0, 16.0, 7.8125]
    # mse_weight = 1, cos_weight = 0: sim is the indicator itself
    indicator = grad_ext.refine(rec, feat, mse_weight=1.0, cos_weight=0.0, mse_threshold=10.0).sim[0, 0]
    assert indicator.tolist() == [0.0, 1.0, 0.0, 1.0]
    just_above = math.nextafter(10.0, math.inf) if dtype == torch.float64 else 10.000001
    indicator = grad_ext.refine(rec, feat, mse_weight=1.0, cos_weight=0.0, mse_threshold=just_above).sim[0, 0]
    assert indicator.tolist() == [1.0, 1.0, 0.0, 1.0]
    indicator = grad_ext.refine(rec, feat, mse_weight=1.0, cos_weight=0.0, mse_threshold=7.8125).sim[0, 0]
    assert indicator.tolist() == [0.0, 1.0, 0.0, 0.0]
    # threshold 0: nothing is strictly below it, not even identical features
    indicator = grad_ext.refine(rec, feat, mse_weight=1.0, cos_weight=0.0, mse_threshold=0.0).sim[0, 0]
    assert indicator.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_indicator_has_no_gradient():
    rec, feat = make_pair((2, 4, 3, 3), seed=10)
    rec.requires_grad_(True)
    sim = grad_ext.refine(rec, feat, mse_weight=1.0, cos_weight=0.0).sim
    (grad,) = torch.autograd.grad(sim.sum(), rec)
    assert torch.all(grad == 0)


# ---- layouts, determinism, torch integration -------------------------------------------------

def test_non_contiguous_inputs_give_the_same_results():
    rec, feat = make_pair((2, 6, 5, 8), seed=11)
    wide = torch.zeros(2, 6, 5, 16, dtype=rec.dtype)
    wide[..., ::2] = rec
    layouts = {
        "channels_last": (rec.to(memory_format=torch.channels_last), feat.to(memory_format=torch.channels_last)),
        # every other column of a wider tensor; feat stored as (B, H, W, C)
        "strided_view": (wide[..., ::2], feat.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)),
    }
    weights = upstream_weights({"sim": (2, 5, 8), "anomaly_map": (2, 5, 8), "loss": (), "refined": rec.shape})
    rec_c, feat_c = rec.clone().requires_grad_(True), feat.clone().requires_grad_(True)
    base = grad_ext.refine(rec_c, feat_c, return_refined=True)
    base_grads = torch.autograd.grad(weighted_sum(base, weights, OUTPUT_NAMES), (rec_c, feat_c))
    for name, (r, f) in layouts.items():
        assert not r.is_contiguous() and not f.is_contiguous(), name
        r, f = r.detach().requires_grad_(True), f.detach().requires_grad_(True)
        out = grad_ext.refine(r, f, return_refined=True)
        for field in OUTPUT_NAMES:
            assert torch.equal(getattr(out, field), getattr(base, field)), (name, field)
        grads = torch.autograd.grad(weighted_sum(out, weights, OUTPUT_NAMES), (r, f))
        for g, b in zip(grads, base_grads):
            assert torch.equal(g, b), name


def test_results_do_not_depend_on_the_thread_count():
    rec, feat = make_pair((3, 16, 20, 20), torch.float32, seed=12)
    rec.requires_grad_(True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = grad_ext.refine(rec, feat)
            (grad,) = torch.autograd.grad(out.loss + out.anomaly_map.sum(), rec)
            results.append((out.loss, grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("return_refined", [True, False])
def test_opcheck(return_refined):
    rec, feat = make_pair((2, 5, 3, 4), seed=13)
    rec.requires_grad_(True)
    feat.requires_grad_(True)
    torch.library.opcheck(torch.ops.grad_ext.refine.default, (rec, feat, 0.3, 0.7, 10.0, return_refined))


def test_torch_compile_fullgraph():
    rec, feat = make_pair((2, 6, 4, 4), torch.float32, seed=14)

    def objective(r, f):
        out = grad_ext.refine(r, f)
        return out.loss + 0.1 * out.anomaly_map.mean() + 0.01 * out.sim.sum()

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    r1, r2 = rec.clone().requires_grad_(True), rec.clone().requires_grad_(True)
    eager, comp = objective(r1, feat), compiled(r2, feat)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(torch.autograd.grad(comp, r2)[0], torch.autograd.grad(eager, r1)[0])


# ---- bad input -----------------------------------------------------------------------------

def _bad_calls():
    rec, feat = make_pair((2, 3, 4, 4), torch.float32)
    return [
        ("shape", lambda: grad_ext.refine(rec, feat[:, :2]), ValueError, "same shape"),
        ("dtype", lambda: grad_ext.refine(rec, feat.double()), TypeError, "same dtype"),
        ("device", lambda: grad_ext.refine(rec, feat.to("meta")), ValueError, "same device"),
        ("rec_3d", lambda: grad_ext.refine(rec[0], feat[0]), ValueError, "rec must have shape (B, C, H, W)"),
        ("feat_5d", lambda: grad_ext.refine(rec, feat[None]), ValueError, "feat must have shape (B, C, H, W)"),
        ("rec_not_tensor", lambda: grad_ext.refine(rec.tolist(), feat), TypeError, "rec must be a torch.Tensor"),
        ("feat_not_tensor", lambda: grad_ext.refine(rec, None), TypeError, "feat must be a torch.Tensor"),
        ("integer", lambda: grad_ext.refine(rec.long(), feat.long()), TypeError, "floating point"),
        ("half_on_cpu", lambda: grad_ext.refine(rec.half(), feat.half()), TypeError, "not supported on cpu"),
        ("empty", lambda: grad_ext.refine(rec[:0], feat[:0]), ValueError, "must not be empty"),
        ("negative_threshold", lambda: grad_ext.refine(rec, feat, mse_threshold=-1.0), ValueError, "mse_threshold"),
        ("nan_threshold", lambda: grad_ext.refine(rec, feat, mse_threshold=float("nan")), ValueError, "mse_threshold"),
        ("threshold_not_number", lambda: grad_ext.refine(rec, feat, mse_threshold="10"), TypeError, "mse_threshold"),
        ("weight_not_number", lambda: grad_ext.refine(rec, feat, mse_weight=None), TypeError, "mse_weight"),
        ("weight_inf", lambda: grad_ext.refine(rec, feat, cos_weight=float("inf")), ValueError, "cos_weight"),
        ("return_refined_not_bool", lambda: grad_ext.refine(rec, feat, return_refined=1), TypeError, "return_refined"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises(case):
    _, call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_kernel_checks_its_arguments():
    """The operator itself (reached without the Python wrapper) rejects bad calls with the same
    exception types as the wrapper (tests/test_sample_grid.py checks every argument)."""
    rec, feat = make_pair((2, 3, 4, 4))
    with pytest.raises(ValueError, match="mse_threshold must be >= 0"):
        torch.ops.grad_ext.refine(rec, feat, 0.3, 0.7, -1.0, False)
    with pytest.raises(ValueError, match="rec and feat must have the same shape"):
        torch.ops.grad_ext.refine(rec, feat[:, :2], 0.3, 0.7, 10.0, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.grad_ext.refine(rec.half(), feat.half(), 0.3, 0.7, 10.0, False)


def test_reference_has_the_kernels_signature():
    rec, feat = make_pair((2, 3, 4, 4), torch.float64)
    for fn in (grad_ext.refine, reference.refine):
        out = fn(rec, feat)
        assert isinstance(out, RefineOutput) and out.refined is None
        assert fn(rec, feat, return_refined=True).refined.shape == rec.shape


# ---- CUDA ------------------------------------------------------------------------------------

CUDA_TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES), ids=str)
    def test_values_match_cpu_and_reference(self, dtype):
        tol = CUDA_TOLERANCES[dtype]
        # 70 channels and 37 x 29 pixels: the channel lanes and the last block are uneven
        rec64, feat64 = make_pair((3, 70, 37, 29))
        rec, feat = rec64.to("cuda", dtype), feat64.to("cuda", dtype)
        out = grad_ext.refine(rec, feat, return_refined=True)
        expected = reference_outputs(rec.double().cpu(), feat.double().cpu())
        for name in OUTPUT_NAMES:
            got, want = getattr(out, name), getattr(expected, name)
            assert got.dtype == dtype and got.device.type == "cuda", name
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * scale, msg=name)
        if dtype in (torch.float32, torch.float64):
            cpu = grad_ext.refine(rec.cpu(), feat.cpu(), return_refined=True)
            for name in OUTPUT_NAMES:
                torch.testing.assert_close(getattr(out, name).cpu(), getattr(cpu, name), rtol=tol, atol=tol, msg=name)

    @pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES), ids=str)
    @pytest.mark.parametrize("names", [("loss",), ("sim", "anomaly_map", "loss", "refined")], ids=lambda n: "+".join(n))
    def test_gradients_match_reference(self, dtype, names):
        tol = CUDA_TOLERANCES[dtype]
        rec64, feat64 = make_pair((2, 45, 9, 40), seed=20)
        weights = upstream_weights({"sim": (2, 9, 40), "anomaly_map": (2, 9, 40), "loss": (), "refined": rec64.shape})
        rec = rec64.to("cuda", dtype).requires_grad_(True)
        feat = feat64.to("cuda", dtype).requires_grad_(True)
        out = grad_ext.refine(rec, feat, return_refined="refined" in names)
        got = torch.autograd.grad(weighted_sum(out, {k: v.cuda() for k, v in weights.items()}, names), (rec, feat))
        rec_ref = rec.detach().double().cpu().requires_grad_(True)
        feat_ref = feat.detach().double().cpu().requires_grad_(True)
        want = torch.autograd.grad(weighted_sum(reference_outputs(rec_ref, feat_ref), weights, names),
                                   (rec_ref, feat_ref))
        for g, w in zip(got, want):
            assert g.dtype == dtype
            scale = w.abs().max().item()
            torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * scale)

    def test_deterministic_and_layout_independent(self):
        rec64, feat64 = make_pair((4, 33, 17, 19), seed=21)
        rec, feat = rec64.to("cuda", torch.float32), feat64.to("cuda", torch.float32)
        runs = []
        for r, f in ((rec, feat), (rec, feat), (rec.to(memory_format=torch.channels_last), feat)):
            r = r.detach().requires_grad_(True)
            out = grad_ext.refine(r, f)
            (grad,) = torch.autograd.grad(out.loss + out.anomaly_map.sum(), r)
            runs.append((out.loss, out.anomaly_map, grad))
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert torch.equal(a, b)

    def test_opcheck(self):
        rec, feat = make_pair((2, 5, 3, 4), torch.float32, "cuda", seed=22)
        rec.requires_grad_(True)
        torch.library.opcheck(torch.ops.grad_ext.refine.default, (rec, feat, 0.3, 0.7, 10.0, True))
