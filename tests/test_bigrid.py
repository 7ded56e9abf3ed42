"""Bi-Grid GRAD: GRAD reproduction without the abnormal branch, the combined reconstruction
against a hand computation, stage freezing, the contrastive loss, and a tiny two-stage run."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradad.backbones import BACKBONES
from gradad.config import (
    BiGridConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    preset_config,
)
from gradad.engine import train_bigrid
from gradad.models.bigrid import (
    BiGridGRAD,
    ChannelStandardize,
    bigrid_stage_loss,
    bigrid_stage_parameters,
    contrastive_loss,
    set_bigrid_stage,
    stage_plan,
)
from gradad.models.fbp import FBP_PRESETS, FeatureBlockPaster
from gradad.models.grad import GRAD

C, S, B = 8, 8, 3


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"num_blocks": 1, "fusion": "crad-s", **overrides})


def make_features(batch=B, seed=0):
    return torch.randn(batch, C, S, S, generator=torch.Generator().manual_seed(seed)) * 2


def build_bigrid(cfg=None, seed=0, **bigrid):
    torch.manual_seed(seed)
    return BiGridGRAD(cfg or small_config(), BiGridConfig(**bigrid), C, S)


# ---- GRAD reproduction -----------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["ext", "reference"])
def test_disabled_abnormal_branch_is_grad(kernels):
    cfg = small_config(kernels=kernels)
    torch.manual_seed(0)
    grad = GRAD(cfg, C, S)
    model = build_bigrid(cfg, seed=0, abnormal_branch=False)
    # same seed, same initialisation, same parameter names
    grad_state, model_state = grad.state_dict(), model.state_dict()
    assert list(grad_state) == list(model_state)
    assert all(torch.equal(grad_state[k], model_state[k]) for k in grad_state)
    x = make_features()
    for training in (True, False):
        grad.train(training)
        model.train(training)
        torch.manual_seed(5)
        expected = grad(x)
        torch.manual_seed(5)
        got = model(x)
        for name in ("rec", "loss", "anomaly_map", "sim"):
            assert torch.equal(getattr(expected, name), getattr(got, name)), name
    expected.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(grad.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name


# ---- the combined model against a hand computation -------------------------------------------

def abnormal_by_hand(model: BiGridGRAD, x: torch.Tensor) -> torch.Tensor:
    """a as docs/method.md §3 defines it, with torch.nn.functional.grid_sample and a numpy standardisation."""
    lc, gc = model.local_coordinates, model.global_coordinates
    v_l = torch.tanh(F.conv2d(torch.tanh(F.conv2d(x, lc.hidden.weight, lc.hidden.bias)), lc.out.weight, lc.out.bias))
    v_g = torch.tanh(F.linear(torch.tanh(F.linear(x.mean(dim=(2, 3)), gc.hidden.weight, gc.hidden.bias)),
                              gc.out.weight, gc.out.bias))
    local_grid, global_grid = model.abnormal.local_grid, model.abnormal.global_grid
    f_l = F.grid_sample(local_grid[None].expand(x.shape[0], -1, -1, -1), v_l.permute(0, 2, 3, 1),
                        align_corners=False)
    f_g = F.grid_sample(global_grid[None], v_g.view(1, x.shape[0], 1, 2), align_corners=False)
    f_g = f_g.reshape(-1, x.shape[0]).t().reshape(x.shape)
    stacked = torch.cat([f_g, f_l], dim=1).detach().numpy().astype(np.float64)
    mean = stacked.mean(axis=(2, 3), keepdims=True)
    std = stacked.std(axis=(2, 3), keepdims=True)
    standardised = torch.from_numpy((stacked - mean) / (std + model.bigrid.standardize_eps)).float()
    inner_fusion = model.abnormal.fusion[1]
    return model.abnormal.output(inner_fusion(standardised))


def normal_grad_copy(model: BiGridGRAD, cfg: ModelConfig) -> GRAD:
    grad = GRAD(cfg, C, S)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("abnormal")}
    grad.load_state_dict(state)
    return grad.eval()


@pytest.mark.parametrize("combine", ["learned", "fixed"])
def test_reconstruction_combines_the_two_branches(combine):
    cfg = small_config()
    model = build_bigrid(cfg, combine=combine, mix_lambda=0.3).eval()
    with torch.no_grad():
        model.abnormal.local_grid.normal_()  # make a's contribution visible
    x = make_features()
    with torch.no_grad():
        normal = normal_grad_copy(model, cfg).reconstruct(x)
        abnormal = abnormal_by_hand(model, x)
        expected = normal + -0.2 * abnormal if combine == "learned" else 0.3 * normal + 0.7 * abnormal
        got = model.reconstruct(x)
        assert torch.allclose(model.abnormal_response(x), abnormal, atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, normal, atol=1e-3)
    # forward applies GRAD's refinement to the combined x̂: x̃ − x = (1 − Sim)(x̂ − x)
    out = model(x)
    refined_diff = (1 - out.sim)[:, None] * (out.rec - x)
    assert torch.allclose(out.anomaly_map, refined_diff.norm(dim=1), atol=1e-4)


def test_channel_standardize_matches_numpy():
    x = make_features() + 3
    got = ChannelStandardize(1e-3)(x).numpy()
    arr = x.numpy().astype(np.float64)
    expected = (arr - arr.mean(axis=(2, 3), keepdims=True)) / (arr.std(axis=(2, 3), keepdims=True) + 1e-3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_structure_shares_coordinates_and_counts_parameters():
    model = build_bigrid()
    assert model.abnormal.local_coordinates is model.local_coordinates
    assert model.abnormal.global_coordinates is model.global_coordinates
    assert model.abnormal_weight.item() == pytest.approx(-0.2)
    torch.manual_seed(0)
    grad = GRAD(small_config(), C, S)
    shared = sum(p.numel() for m in (grad.local_coordinates, grad.global_coordinates) for p in m.parameters())
    per_branch = grad.count_parameters() - shared
    total = sum(p.numel() for p in model.parameters())
    assert total == shared + 2 * per_branch + 1
    assert model.parameter_breakdown()["total"] == total
    assert len(model.grids()) == 4 and model.grids()[2] is model.abnormal.local_grid
    groups = {g["name"]: g["params"] for g in model.param_groups(0.1, 1e-3)}
    assert len(groups["grids"]) == 4
    assert sum(p.numel() for g in groups.values() for p in g) == total
    assert "abnormal_weight" not in dict(build_bigrid(combine="fixed").named_parameters())


# ---- stage freezing --------------------------------------------------------------------------

def grads_of(params):
    return [None if p.grad is None else float(p.grad.abs().sum()) for p in params]


def test_abnormal_stage_trains_abnormal_grids_only():
    model = build_bigrid().train()
    set_bigrid_stage(model, "abnormal")
    paster = FeatureBlockPaster(FBP_PRESETS["reference"], seed=0)
    bigrid_stage_loss(model, make_features(), "abnormal", paster).backward()
    assert grads_of(model.normal_grids()) == [None, None]
    assert all(g is not None and g > 0 for g in grads_of(model.abnormal_grids()))
    assert all(g is not None and g > 0 for g in grads_of(model.local_coordinates.parameters()))
    # the contrastive loss does not reach the normal fusion net or w
    assert all(g is None for g in grads_of(model.fusion.parameters()))
    assert model.abnormal_weight.grad is None
    trainable = {id(p) for p in bigrid_stage_parameters(model, "abnormal")}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert trainable.isdisjoint({id(p) for p in model.normal_grids()})


def test_normal_stage_trains_normal_grids_only():
    model = build_bigrid().train()
    set_bigrid_stage(model, "normal")
    bigrid_stage_loss(model, make_features(), "normal").backward()
    assert grads_of(model.abnormal_grids()) == [None, None]
    assert all(g is not None and g > 0 for g in grads_of(model.normal_grids()))
    # networks stay trainable: the abnormal fusion net and w get gradients through x̂ = x̂_n + w·a
    assert model.abnormal_weight.grad is not None and model.abnormal_weight.grad.abs() > 0
    assert any(g is not None and g > 0 for g in grads_of(model.abnormal.output.parameters()))


@pytest.mark.parametrize("stage", ["abnormal", "normal"])
def test_training_a_stage_leaves_the_frozen_grids_unchanged(stage):
    model = build_bigrid()
    frozen = model.normal_grids() if stage == "abnormal" else model.abnormal_grids()
    trained = model.abnormal_grids() if stage == "abnormal" else model.normal_grids()
    frozen_before = [p.detach().clone() for p in frozen]
    trained_before = [p.detach().clone() for p in trained]
    epochs = {"abnormal_epochs": 2, "normal_epochs": 0} if stage == "abnormal" else {"abnormal_epochs": 0,
                                                                                     "normal_epochs": 2}
    model.bigrid = dataclasses.replace(model.bigrid, **epochs)
    history = train_bigrid(model, make_features(batch=8), TrainConfig(batch_size=4, weight_decay=0.01), progress=False)
    assert history["stage"] == [stage, stage]
    assert all(torch.equal(p, q) for p, q in zip(frozen, frozen_before))
    assert all(not torch.equal(p, q) for p, q in zip(trained, trained_before))
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_without_abnormal_branch_training_is_grad_training():
    # GRAD trained by hand with the same recipe (AdamW groups, clipping, StepLR, same shuffling)
    features = make_features(batch=8)
    train = TrainConfig(batch_size=4, seed=3)
    model = build_bigrid(abnormal_branch=False, abnormal_epochs=0, normal_epochs=2)
    torch.manual_seed(0)
    grad = GRAD(small_config(), C, S)
    optimizer = torch.optim.AdamW(grad.param_groups(train.lr_grid, train.lr), weight_decay=train.weight_decay)
    shuffle = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(9)
    grad.train()
    for _ in range(2):
        for index in torch.randperm(8, generator=shuffle).split(4):
            optimizer.zero_grad()
            grad(features[index]).loss.backward()
            torch.nn.utils.clip_grad_norm_(list(grad.parameters()), train.grad_clip)
            optimizer.step()
    torch.manual_seed(9)
    history = train_bigrid(model, features, train, progress=False, max_seconds=1e6)
    assert history["stage"] == ["normal", "normal"] and len(history["seconds"]) == 2
    for (name, p), q in zip(grad.named_parameters(), model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_max_seconds_stops_after_the_first_epoch_past_the_budget():
    model = build_bigrid(abnormal_epochs=3, normal_epochs=3)
    history = train_bigrid(model, make_features(batch=4), TrainConfig(batch_size=4), progress=False,
                           max_seconds=1e-9)
    assert history["stage"] == ["abnormal"]


# ---- loss, schedule, end to end --------------------------------------------------------------

def test_contrastive_loss_against_a_loop():
    response = torch.tensor([[[0.9, 0.1], [-0.7, -0.2]], [[0.4, -0.5], [0.6, 1.0]]])
    mask = torch.tensor([[[True, True], [False, False]], [[False, False], [False, True]]])
    anomalous, normal = [], []
    for r, m in zip(response.flatten().tolist(), mask.flatten().tolist()):
        (anomalous if m else normal).append(max(0.0, 0.5 - r) if m else max(0.0, 0.5 + r))
    expected = sum(anomalous) / len(anomalous) + sum(normal) / len(normal)
    assert contrastive_loss(response, mask, 0.5).item() == pytest.approx(expected)
    assert contrastive_loss(torch.full((1, 2, 2), -1.0), torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        contrastive_loss(response, mask[0])
    with pytest.raises(TypeError, match="bool"):
        contrastive_loss(response, mask.float())


def test_stage_plan():
    assert stage_plan(BiGridConfig(abnormal_epochs=2, normal_epochs=1)) == ["abnormal", "abnormal", "normal"]
    alternating = BiGridConfig(abnormal_epochs=1, normal_epochs=2, schedule="alternating", cycles=2)
    assert stage_plan(alternating) == ["abnormal", "normal", "normal"] * 2


def test_two_stage_run_learns_to_flag_pasted_blocks():
    features = make_features(batch=16, seed=1)
    model = build_bigrid(abnormal_epochs=6, normal_epochs=3)
    train = TrainConfig(batch_size=8, lr=1e-2, seed=0)
    history = train_bigrid(model, features, train, progress=False)
    assert history["stage"] == ["abnormal"] * 6 + ["normal"] * 3
    assert all(np.isfinite(history["loss"]))
    assert history["loss"][5] < history["loss"][0]
    # the trained abnormal branch responds more on pasted cells than elsewhere
    pasted, mask = FeatureBlockPaster(FBP_PRESETS["reference"], seed=123)(make_features(batch=4, seed=2))
    with torch.no_grad():
        response = model.abnormal_response(pasted)[:, 0]
    assert response[mask].mean() > response[~mask].mean() + 0.2
    # and the whole model still scores: maps of the right shape, finite
    out = model(features[:2])
    assert out.anomaly_map.shape == (2, S, S) and torch.isfinite(out.anomaly_map).all()


# ---- configuration and errors ----------------------------------------------------------------

def test_presets_and_overrides():
    paper = preset_config("bigrid")
    spec = BACKBONES[paper.model.backbone]
    assert sum(spec.channels) == 272 and paper.model.input_size // 8 == 32
    assert paper.model.fusion == "paper" and paper.model.blocks == 7
    assert paper.bigrid.abnormal_branch and paper.bigrid.combine == "learned"
    lite = preset_config("bigrid-lite")
    assert lite.model.backbone.startswith("efficientnet_lite") and lite.bigrid.abnormal_branch
    cfg = apply_overrides(paper, ["bigrid.combine=fixed", "bigrid.mix_lambda=0.25", "bigrid.fbp=paper"])
    assert (cfg.bigrid.combine, cfg.bigrid.mix_lambda, cfg.bigrid.fbp) == ("fixed", 0.25, "paper")
    with pytest.raises(ValueError, match="bigrid.combine"):
        BiGridConfig(combine="sum")
    with pytest.raises(ValueError, match="bigrid.schedule"):
        BiGridConfig(schedule="random")
    with pytest.raises(ValueError, match="cannot both be 0"):
        BiGridConfig(abnormal_epochs=0, normal_epochs=0)


def test_bigrid_section_round_trips_through_yaml(tmp_path):
    cfg = apply_overrides(preset_config("bigrid-lite"), ["bigrid.schedule=alternating", "bigrid.cycles=3"])
    dump_config(cfg, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("bigrid:\n  lambda: 0.5\n")
    with pytest.raises(KeyError, match="bigrid.lambda"):
        load_config(tmp_path / "bad.yaml")


def test_bad_use_raises():
    with pytest.raises(TypeError, match="bigrid"):
        BiGridGRAD(small_config(), {"abnormal_branch": True}, C, S)
    plain = build_bigrid(abnormal_branch=False)
    with pytest.raises(RuntimeError, match="abnormal_branch=False"):
        plain.abnormal_response(make_features())
    with pytest.raises(ValueError, match="no abnormal branch"):
        train_bigrid(plain, make_features(), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="max_seconds"):
        train_bigrid(build_bigrid(), make_features(), TrainConfig(), progress=False, max_seconds=0)
    model = build_bigrid()
    with pytest.raises(ValueError, match="stage"):
        bigrid_stage_parameters(model, "both")
    with pytest.raises(ValueError, match="paster"):
        bigrid_stage_loss(model, make_features(), "abnormal")
    with pytest.raises(ValueError, match="features"):
        train_bigrid(model, torch.zeros(0, C, S, S), TrainConfig(), progress=False)
