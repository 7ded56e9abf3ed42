"""The whole detector on CUDA: GRAD and Bi-Grid GRAD training steps with the ext kernels against
kernels='reference' (the same loss, gradients and updated weights within tolerance, jitter on), in float32
and under bfloat16 autocast, and torch.compile of the model.

Marked ``cuda``; ``GRAD_EXT_TEST_DEVICE=cpu`` runs them on the CPU kernels instead (a check of
the tests themselves; bfloat16 autocast and compiling then are skipped).
"""

import os

import pytest
import torch

from gradad.config import BiGridConfig, ModelConfig
from gradad.models.bigrid import BiGridGRAD, bigrid_stage_loss, set_bigrid_stage
from gradad.models.fbp import FeatureBlockPaster, fbp_settings
from gradad.models.grad import GRAD

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("GRAD_EXT_TEST_DEVICE", "cuda")
C, S, B = 24, 8, 6
PRECISIONS = ["float32", "bf16-autocast"] if DEVICE == "cuda" else ["float32"]


def model_config(kernels: str) -> ModelConfig:
    # jitter on every pixel: both implementations draw the same Philox noise for the same torch
    # seed, so the jittered steps must agree too
    return ModelConfig(num_blocks=2, fusion="crad-s", jitter_mode="pixel", kernels=kernels)


def features(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, S, S, generator=gen) * 2).to(DEVICE)


def build_pair(architecture: str):
    """The same weights with kernels='ext' and kernels='reference', on the device."""
    models = []
    for kernels in ("ext", "reference"):
        torch.manual_seed(0)
        if architecture == "grad":
            models.append(GRAD(model_config(kernels), C, S))
        else:
            models.append(BiGridGRAD(model_config(kernels), BiGridConfig(), C, S))
    ext, ref = models
    ref.load_state_dict(ext.state_dict())
    return ext.to(DEVICE), ref.to(DEVICE)


def loss_of(model, x, stage):
    if stage is None:
        return model(x).loss
    paster = FeatureBlockPaster(fbp_settings("reference"), seed=3)  # the same blocks for both models
    return bigrid_stage_loss(model, x, stage, paster)


def training_step(model, x, stage, precision):
    """One forward, backward and SGD step (an update proportional to the gradient, so the weights
    compare as the gradients do); returns (loss, {name: grad}, {name: new weight})."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    model.train()
    torch.manual_seed(7)  # the jitter seed
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        loss = loss_of(model, x, stage)
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("architecture,stage", [("grad", None), ("bigrid", "normal"), ("bigrid", "abnormal")])
def test_training_step_ext_matches_reference(architecture, stage, precision):
    ext, ref = build_pair(architecture)
    if stage is not None:
        set_bigrid_stage(ext, stage)
        set_bigrid_stage(ref, stage)
    x = features()
    loss_e, grads_e, weights_e = training_step(ext, x, stage, precision)
    loss_r, grads_r, weights_r = training_step(ref, x, stage, precision)
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "float32" else dict(rtol=3e-2, atol=3e-3)
    assert torch.isfinite(loss_e)
    torch.testing.assert_close(loss_e, loss_r, **tol)
    assert grads_e.keys() == grads_r.keys() and grads_e
    # Relative to the largest gradient entry of the model: some gradients are sums that cancel
    # to round-off (biases before a batch norm), whose relative error means nothing.
    scale = max(g.abs().max() for g in grads_r.values())
    for name in grads_e:
        torch.testing.assert_close(grads_e[name] / scale, grads_r[name] / scale, **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in weights_e:
        torch.testing.assert_close(weights_e[name], weights_r[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("architecture", ["grad", "bigrid"])
def test_compiled_model_matches_eager(architecture):
    if DEVICE != "cuda":
        pytest.skip("compiling with inductor is checked on the GPU")
    ext, _ = build_pair(architecture)
    x = features(1)
    ext.eval()
    with torch.no_grad():
        eager = ext(x)
    compiled = torch.compile(ext, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.anomaly_map, eager.anomaly_map, rtol=1e-4, atol=1e-4)
    ext.train()
    loss = compiled(x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in ext.parameters() if p.requires_grad)
