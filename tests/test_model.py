"""Tests of gradad.config, gradad.models.fusion and gradad.models.grad (GRAD, docs/method.md §2)."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import grad_ext
import grad_ext.reference
from gradad.config import (
    PRESETS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    preset_config,
)
from gradad.models.grad import GRAD

C, S, B = 16, 8, 3  # small features for fast tests


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"num_blocks": 2, **overrides})


def make_features(batch=B, channels=C, size=S, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen, dtype=dtype) * 2


def build(cfg, channels=C, size=S, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GRAD(cfg, channels, size).to(dtype)


# ---- independent computations ----------------------------------------------------------------

def interpolate_by_hand(table, v):
    """Multilinear interpolation of table (C, R_1..R_d) at one coordinate v (d,), straight from
    the spec: u_k = ((v_k + 1) R - 1) / 2, component k addresses axis d-1-k, zero padding."""
    d = table.dim() - 1
    u = [((v[d - 1 - a] + 1) * table.shape[1 + a] - 1) / 2 for a in range(d)]  # per table axis
    low = [math.floor(float(x)) for x in u]
    out = torch.zeros(table.shape[0], dtype=table.dtype)
    for corner in itertools.product((0, 1), repeat=d):
        idx = [low[a] + corner[a] for a in range(d)]
        if all(0 <= i < table.shape[1 + a] for a, i in enumerate(idx)):
            weight = math.prod(1 - abs(float(u[a]) - idx[a]) for a in range(d))
            out += weight * table[(slice(None), *idx)]
    return out


def refine_by_hand(rec, feat, mse_weight=0.3, cos_weight=0.7, mse_threshold=10.0):
    """Sim, loss and map the way the reference code writes them: indicator
    1 - round(clamp(mse / k, 0, 1)) (k = 10 gives its 0.05·mse with the same threshold for
    mse != k), cosine as dot over norms, and x̃ - x = (1 - Sim)(x̂ - x)."""
    diff = rec - feat
    mse = diff.pow(2).mean(1)
    indicator = 1 - torch.round(torch.clamp(mse / (2 * mse_threshold), 0, 1))
    cos = (rec * feat).sum(1) / (rec.norm(dim=1) * feat.norm(dim=1))
    sim = mse_weight * indicator + cos_weight * cos
    residual = (1 - sim)[:, None] * diff
    return sim, residual.pow(2).mean(), residual.norm(dim=1)


# ---- config -----------------------------------------------------------------------------------

def test_config_defaults_follow_reference_recipe():
    cfg = Config()
    assert (cfg.model.backbone, cfg.model.fusion, cfg.model.jitter_mode, cfg.model.kernels) == \
        ("efficientnet_b4", "crad", "batch", "ext")
    assert (cfg.model.local_grid_dim, cfg.model.local_grid_res, cfg.model.global_grid_res) == (2, 8, 4)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr_grid, cfg.train.lr) == (50, 64, 0.1, 1e-3)
    assert ModelConfig(fusion="crad").blocks == 11 and ModelConfig(fusion="paper").blocks == 7
    assert ModelConfig(fusion="paper", num_blocks=3).blocks == 3
    assert cfg.image_size == 224 and Config(data=DataConfig(image_size=256)).image_size == 256


def test_config_yaml_round_trip(tmp_path):
    cfg = apply_overrides(preset_config("lite-demo"), ["data.classes=bottle,screw", "train.lr=2e-4",
                                                        "model.num_blocks=none", "data.root=datasets/mvtec"])
    path = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["classes"] == ["bottle", "screw"] and raw["train"]["lr"] == 2e-4


def test_config_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  fusion: paper\ntrain:\n  lr: 1e-4\n  amp_bf16: true\n")
    cfg = load_config(path)
    assert cfg.model.fusion == "paper" and cfg.model.blocks == 7
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.amp_bf16 is True
    assert cfg.train.epochs == TrainConfig().epochs and cfg.data == DataConfig()


def test_config_overrides_convert_types():
    cfg = apply_overrides(Config(), ["train.lr=0.01", "train.epochs=3", "train.amp_bf16=true",
                                     "model.use_global=False", "data.classes=[a, b]", "data.image_size=none",
                                     "output_dir=out/run1", "eval.protocol=paper"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3 and cfg.train.amp_bf16 is True
    assert cfg.model.use_global is False and cfg.data.classes == ["a", "b"] and cfg.data.image_size is None
    assert cfg.output_dir == "out/run1" and cfg.eval.protocol == "paper"
    assert Config().train.lr == 1e-3  # the input config is left alone


@pytest.mark.parametrize("override, error, words", [
    ("train.learning_rate=1", KeyError, "train.learning_rate"),
    ("optim.lr=1", KeyError, "optim"),
    ("lr=1", KeyError, "section.key"),
    ("train.lr", ValueError, "section.key=value"),
    ("train.epochs=2.5", TypeError, "train.epochs"),
    ("train.amp_bf16=maybe", TypeError, "train.amp_bf16"),
    ("model.fusion=transformer", ValueError, "model.fusion"),
    ("model.local_grid_dim=5", ValueError, "model.local_grid_dim"),
    ("model.jitter_prob=1.5", ValueError, "model.jitter_prob"),
    ("train.device=gpu", ValueError, "train.device"),
    ("data.cache=disk", ValueError, "data.cache_dir"),
])
def test_config_override_errors_name_the_key(override, error, words):
    with pytest.raises(error, match=words.replace(".", r"\.")):
        apply_overrides(Config(), [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusoin: crad\n")
    with pytest.raises(KeyError, match="bad.yaml.*model.fusoin"):
        load_config(bad)
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(TypeError, match="model"):
        load_config(bad)
    with pytest.raises(ValueError, match="both be false"):
        ModelConfig(use_local=False, use_global=False)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("grad-xl")


def test_presets_build_valid_configs():
    for name in PRESETS:
        assert isinstance(preset_config(name), Config)
    assert preset_config("grad") == Config()
    assert preset_config("grad-s").model.fusion == "crad-s"
    paper = preset_config("grad-paper")
    assert (paper.model.fusion, paper.model.jitter_mode, paper.train.epochs) == ("paper", "pixel", 100)


# ---- model structure --------------------------------------------------------------------------

@pytest.mark.parametrize("local_dim, global_dim", [(1, 1), (2, 2), (3, 3), (4, 4), (1, 4), (4, 2)])
def test_shapes_and_sampling_for_grid_dims(local_dim, global_dim):
    cfg = small_config(local_grid_dim=local_dim, global_grid_dim=global_dim, local_grid_res=5, global_grid_res=3)
    model = build(cfg, dtype=torch.float64).eval()
    x = make_features(dtype=torch.float64)
    assert model.local_grid.shape == (C, *[5] * local_dim)
    assert model.global_grid.shape == (C * S * S, *[3] * global_dim)
    out = model(x)
    assert out.rec.shape == (B, C, S, S) and out.loss.dim() == 0
    assert out.anomaly_map.shape == (B, S, S) and out.sim.shape == (B, S, S)
    assert model.anomaly_map(x, 64).shape == (B, 64, 64)

    with torch.no_grad():
        f_l, f_g = model.local_features(x), model.global_features(x)
        v_l = model.local_coordinates(x)  # (B, H, W, d_l)
        v_g = model.global_coordinates(x)  # (B, d_g)
    assert v_l.shape == (B, S, S, local_dim) and v_g.shape == (B, global_dim)
    for b, h, w in [(0, 0, 0), (1, 3, 5), (2, 7, 2)]:
        expected = interpolate_by_hand(model.local_grid.detach(), v_l[b, h, w])
        torch.testing.assert_close(f_l[b, :, h, w], expected, rtol=1e-10, atol=1e-12)
    for b in range(B):
        expected = interpolate_by_hand(model.global_grid.detach(), v_g[b]).reshape(C, S, S)
        torch.testing.assert_close(f_g[b], expected, rtol=1e-10, atol=1e-12)


def test_fusion_input_is_global_then_local_and_ablations_duplicate():
    x = make_features()
    model = build(small_config()).eval()
    with torch.no_grad():
        expected = model.output(model.fusion(torch.cat([model.global_features(x), model.local_features(x)], 1)))
        torch.testing.assert_close(model.reconstruct(x), expected)
        swapped = model.output(model.fusion(torch.cat([model.local_features(x), model.global_features(x)], 1)))
        assert not torch.allclose(model.reconstruct(x), swapped)
    for use_local in (True, False):
        ablated = build(small_config(use_local=use_local, use_global=not use_local)).eval()
        assert len(ablated.grids()) == 1
        assert hasattr(ablated, "local_grid") == use_local and hasattr(ablated, "global_grid") != use_local
        with torch.no_grad():
            branch = ablated.local_features(x) if use_local else ablated.global_features(x)
            torch.testing.assert_close(ablated.reconstruct(x),
                                       ablated.output(ablated.fusion(torch.cat([branch, branch], 1))))


def test_fusion_variants_structure():
    crad = build(ModelConfig(), channels=8, size=4)
    crad_s = build(ModelConfig(fusion="crad-s"), channels=8, size=4)
    paper = build(ModelConfig(fusion="paper"), channels=8, size=4)
    assert len(crad.fusion) == 11 and len(crad_s.fusion) == 11 and len(paper.fusion) == 7
    block = crad.fusion[0]
    assert block.expand[0].weight.shape == (32, 16, 1, 1)            # 2C -> 4C
    assert block.depthwise[0].weight.shape == (32, 1, 3, 3)          # depthwise 3x3
    assert block.depthwise[2].squeeze.weight.shape == (8, 32)        # SE exp -> exp/4, no bias
    assert block.depthwise[2].squeeze.bias is None and block.depthwise[2].excite.bias is None
    assert block.project[0].weight.shape == (16, 32, 1, 1)
    assert crad_s.fusion[0].expand[0].weight.shape == (8, 16, 1, 1)  # 2C -> C
    assert paper.fusion[0].body[0].weight.shape == (16, 16, 3, 3)
    assert crad.output.weight.shape == (8, 16, 1, 1) and crad.output.bias is None


def _randomise_batch_norms(module, gen):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen)
            m.running_mean = torch.randn(n, generator=gen)
            m.running_var = torch.rand(n, generator=gen) + 0.5


def _bn(x, bn):
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _hswish(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


def test_fusion_blocks_compute_the_spec_formulas():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 5, 5, generator=gen)
    crad = build(ModelConfig(num_blocks=1), channels=8, size=5).eval()
    block = crad.fusion[0]
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    _randomise_batch_norms(block, gen)
    expand, dw, bn_dw, se, project, bn_out = (block.expand[0], block.depthwise[0], block.depthwise[1],
                                              block.depthwise[2], block.project[0], block.project[1])
    h = _hswish(_bn(F.conv2d(x, expand.weight), block.expand[1]))
    h = _bn(F.conv2d(h, dw.weight, padding=1, groups=32), bn_dw)
    gate = torch.relu(h.mean((2, 3)) @ se.squeeze.weight.T) @ se.excite.weight.T
    h = _hswish(h * (torch.clamp(gate + 3, 0, 6) / 6)[:, :, None, None])
    expected = x + _bn(F.conv2d(h, project.weight), bn_out)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)

    paper = build(ModelConfig(fusion="paper", num_blocks=1), channels=8, size=5).eval()
    basic = paper.fusion[0]
    for p in basic.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.1
    _randomise_batch_norms(basic, gen)
    conv1, bn1, _, conv2, bn2 = basic.body
    h = torch.relu(_bn(F.conv2d(x, conv1.weight, padding=1), bn1))
    expected = torch.relu(x + _bn(F.conv2d(h, conv2.weight, padding=1), bn2))
    with torch.no_grad():
        torch.testing.assert_close(basic(x), expected, rtol=1e-5, atol=1e-5)


def test_init_statistics():
    model = build(small_config(), channels=64, size=8)
    weights = torch.cat([m.weight.detach().flatten() for m in model.modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert weights.numel() > 100_000
    assert abs(weights.mean().item()) < 4 * 0.01 / math.sqrt(weights.numel())
    assert weights.std().item() == pytest.approx(0.01, rel=0.02)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Xavier-normal with torch's fans for (C, R, R): fan_in = R*R, fan_out = C*R
    for grid, rows, res in [(model.local_grid, 64, 8), (model.global_grid, 64 * 8 * 8, 4)]:
        expected = math.sqrt(2.0 / (res * res + rows * res))
        assert grid.detach().mean().abs().item() < 4 * expected / math.sqrt(grid.numel())
        assert grid.detach().std().item() == pytest.approx(expected, rel=0.03)


def test_param_groups_cover_trainable_parameters_once():
    for cfg in (small_config(), small_config(use_global=False), small_config(use_local=False)):
        model = build(cfg)
        model.fusion[0].expand[0].weight.requires_grad_(False)
        groups = model.param_groups(lr_grid=0.1, lr=1e-3)
        assert [(g["name"], g["lr"]) for g in groups] == [("grids", 0.1), ("networks", 1e-3)]
        ids = [id(p) for g in groups for p in g["params"]]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert len(ids) == len(set(ids)) and set(ids) == trainable
        assert {id(p) for p in groups[0]["params"]} == {id(p) for n, p in model.named_parameters() if "grid" in n}
        torch.optim.AdamW(groups, weight_decay=0.01)  # accepted by the optimizer


def test_parameter_count_of_paper_configuration():
    c, s = 216, 28
    model = GRAD(ModelConfig(), c, s)
    parts = model.parameter_breakdown()
    assert parts["global_grid"] == 169_344 * 16 == 2_709_504
    assert parts["local_grid"] == c * 8 * 8
    assert parts["coordinates"] == 2 * (c * c + c + c * 2 + 2)
    w, e = 2 * c, 4 * c
    bottleneck = w * e + 2 * e + 9 * e + 2 * e + 2 * e * (e // 4) + e * w + 2 * w
    assert parts["fusion"] == 11 * bottleneck + w * c
    assert parts["total"] == model.count_parameters() == sum(p.numel() for p in model.parameters())
    assert 15.0e6 < parts["total"] < 15.5e6  # ~15.3 M with the reference fusion net


def test_flop_count_matches_hand_count():
    c, s, d = 16, 8, 2
    model = build(small_config(fusion="paper", num_blocks=3), channels=c, size=s)
    hw = s * s
    macs = (c * c + c * d) * hw + (c * c + c * d) + 3 * 2 * (2 * c) ** 2 * 9 * hw + 2 * c * c * hw
    assert model.count_flops(batch_size=2) == 2 * 2 * macs
    assert model.training  # mode restored


# ---- forward, loss, maps ----------------------------------------------------------------------

def test_forward_loss_and_map_follow_the_refinement_formula():
    model = build(small_config(), dtype=torch.float64).eval()
    x = make_features(dtype=torch.float64)
    out = model(x)
    sim, loss, amap = refine_by_hand(out.rec.detach(), x)
    torch.testing.assert_close(out.sim, sim)
    torch.testing.assert_close(out.loss.detach(), loss)
    torch.testing.assert_close(out.anomaly_map, amap)
    # the indicator takes both values on these features (the test exercises both branches)
    mse = (out.rec.detach() - x).pow(2).mean(1)
    x_far = x.clone()
    x_far[0] *= 4
    mse_far = (model(x_far).rec.detach() - x_far).pow(2).mean(1)
    assert (mse < 10).any() and (mse_far >= 10).any()


def test_forward_without_refinement():
    model = build(small_config(refine=False), dtype=torch.float64).eval()
    x = make_features(dtype=torch.float64)
    out = model(x)
    assert out.sim is None
    diff = out.rec.detach() - x
    torch.testing.assert_close(out.loss.detach(), (diff ** 2).sum() / diff.numel())
    torch.testing.assert_close(out.anomaly_map, diff.pow(2).sum(1).sqrt())


def test_anomaly_map_upsampling_hits_feature_cells():
    model = build(small_config()).eval()
    x = make_features()
    small = model(x).anomaly_map.detach()
    big = model.anomaly_map(x, 64)  # align_corners=True: pixel 9k lies exactly on feature cell k
    assert big.shape == (B, 64, 64) and not big.requires_grad
    torch.testing.assert_close(big[:, ::9, ::9], small)
    torch.testing.assert_close(big[:, 4, 0], (5 * small[:, 0, 0] + 4 * small[:, 1, 0]) / 9)


def test_bad_inputs_are_rejected():
    model = build(small_config())
    with pytest.raises(ValueError, match=r"features must have shape \(B, 16, 8, 8\)"):
        model(torch.zeros(2, 15, 8, 8))
    with pytest.raises(ValueError, match="features must have shape"):
        model(torch.zeros(2, 16, 9, 9))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 16, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="image_size"):
        model.anomaly_map(torch.zeros(2, 16, 8, 8), 0)
    with pytest.raises(ValueError, match="feature_size"):
        GRAD(ModelConfig(), 16, 0)
    with pytest.raises(TypeError, match="ModelConfig"):
        GRAD({"fusion": "crad"}, 16, 8)


# ---- ext kernels vs the reference formulation ------------------------------------------------

@pytest.mark.parametrize("fusion, dims, refine", [
    ("crad", (2, 2), True), ("paper", (2, 2), False), ("crad-s", (1, 3), True), ("crad", (4, 1), True),
])
def test_ext_and_reference_kernels_agree(fusion, dims, refine):
    cfg = small_config(fusion=fusion, local_grid_dim=dims[0], global_grid_dim=dims[1], refine=refine,
                       jitter_std=0.0, local_grid_res=4 if dims[0] == 4 else 8)
    ext = build(cfg, dtype=torch.float64)
    ref = GRAD(dataclasses.replace(cfg, kernels="reference"), C, S).to(torch.float64)
    ref.load_state_dict(ext.state_dict())
    x = make_features(dtype=torch.float64)
    outputs = []
    for model in (ext, ref):
        model.train()  # training mode: BN batch statistics, no jitter (std 0)
        model.zero_grad()
        out = model(x)
        out.loss.backward()
        outputs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_e, grads_e), (out_r, grads_r) = outputs
    torch.testing.assert_close(out_e.loss, out_r.loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out_e.rec, out_r.rec, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out_e.anomaly_map, out_r.anomaly_map, rtol=1e-10, atol=1e-14)
    assert grads_e.keys() == grads_r.keys() == dict(ext.named_parameters()).keys()
    for name in grads_e:
        assert grads_e[name].abs().max() > 0, name  # every parameter receives a gradient
        torch.testing.assert_close(grads_e[name], grads_r[name], rtol=1e-8, atol=1e-14, msg=name)
    # eval mode with the default jitter switched on: no jitter, the same maps
    ext.cfg.jitter_std = ref.cfg.jitter_std = 0.05
    ext.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ext.anomaly_map(x, 32), ref.anomaly_map(x, 32), rtol=1e-10, atol=1e-14)


# ---- jitter -----------------------------------------------------------------------------------

def changed_pixels(model, x, seed):
    model.eval()
    with torch.no_grad():
        clean = model.local_features(x)
        model.train()
        torch.manual_seed(seed)
        jittered = model.local_features(x)
    return (jittered - clean).abs().amax(dim=1) > 0  # (B, H, W)


@pytest.mark.parametrize("kernels", ["ext", "reference"])
def test_jitter_batch_mode_moves_all_or_no_coordinates(kernels):
    model = build(small_config(kernels=kernels, jitter_mode="batch"), dtype=torch.float64)
    x = make_features(dtype=torch.float64)
    outcomes = set()
    for seed in range(16):
        changed = changed_pixels(model, x, seed)
        assert changed.all() or not changed.any()
        outcomes.add(bool(changed.all()))
    assert outcomes == {True, False}
    model.eval()
    with torch.no_grad():  # eval mode: deterministic whatever the RNG does
        torch.manual_seed(1)
        first = model.local_features(x)
        torch.manual_seed(2)
        torch.testing.assert_close(model.local_features(x), first, rtol=0, atol=0)


@pytest.mark.parametrize("kernels", ["ext", "reference"])
def test_jitter_pixel_mode_moves_about_half_the_pixels(kernels):
    model = build(small_config(kernels=kernels, jitter_mode="pixel"), dtype=torch.float64)
    x = make_features(batch=4, dtype=torch.float64)
    fractions = [changed_pixels(model, x, seed).double().mean().item() for seed in range(3)]
    assert all(0.35 < f < 0.65 for f in fractions), fractions  # 256 pixels, p = 0.5: ~0.03 std


def test_ext_jitter_uses_configured_noise():
    """The ext path adds exactly the kernel's Philox noise for the seed it draws from torch's RNG."""
    for mode, prob in [("pixel", 0.5), ("batch", 1.0)]:
        model = build(small_config(jitter_mode=mode, jitter_prob=prob, jitter_std=0.2), dtype=torch.float64).train()
        x = make_features(dtype=torch.float64)
        torch.manual_seed(5)
        seed = grad_ext.draw_jitter_seed("cpu")
        torch.manual_seed(5)
        with torch.no_grad():
            jittered = model.local_features(x)
            coords = model.local_coordinates(x)
        noise = grad_ext.jitter_noise(seed, B * S * S, 2, 0.2, prob, mode)
        expected = torch.stack([
            torch.stack([interpolate_by_hand(model.local_grid.detach(),
                                             coords[b, h, w] + noise.noise[(b * S + h) * S + w].double())
                         for w in range(S)], -1) for b in range(B) for h in range(S)])
        torch.testing.assert_close(jittered, expected.reshape(B, S, C, S).permute(0, 2, 1, 3),
                                   rtol=1e-6, atol=1e-7)
        assert noise.noise.abs().max() > 0.1  # the noise is large enough to matter
