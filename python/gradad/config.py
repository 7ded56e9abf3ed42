"""Run configuration: every default of a GRAD run in one place, loadable from and dumpable to YAML.

A :class:`Config` groups five sections (``model``, ``train``, ``data``, ``eval``, ``bigrid``) and
the output folder. Defaults follow the reference code (spec §2); the paper's variants are behind switches
(``model.fusion='paper'``, ``model.jitter_mode='pixel'``) and in the ``'grad-paper'`` preset.

- :func:`load_config` / :func:`dump_config`: YAML files (missing keys take their defaults,
  unknown keys are errors); the dump is atomic.
- :func:`apply_overrides`: ``["train.lr=0.01", "model.fusion=paper"]`` style CLI flags, with
  the value converted to the field's type.
- :data:`PRESETS` / :func:`preset_config`: named starting points.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import yaml

from .io_utils import atomic_write_text

# 'grad': GRAD (spec §2); 'bigrid': Bi-Grid GRAD (spec §3), configured by the bigrid section.
ARCHITECTURES = ("grad", "bigrid")
FUSIONS = ("crad", "crad-s", "paper")
# Blocks of the fusion network when ModelConfig.num_blocks is None: 11 MobileNetV3
# bottlenecks in the reference code, 7 ResNet basic blocks in the paper.
DEFAULT_NUM_BLOCKS: Dict[str, int] = {"crad": 11, "crad-s": 11, "paper": 7}
JITTER_MODES = ("batch", "pixel")
KERNELS = ("ext", "reference")
MAX_GRID_DIM = 4
CACHE_MODES = ("memory", "disk", "none")
ON_ERROR = ("raise", "skip")
PROTOCOLS = ("strict", "paper")
BIGRID_COMBINES = ("learned", "fixed")
BIGRID_SCHEDULES = ("sequential", "alternating")
FBP_PRESET_NAMES = ("reference", "paper")  # the keys of gradad.fbp.FBP_PRESETS
DEFAULT_OUTPUT_DIR = "runs/grad"


def _check_choice(section: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def _check_range(section: str, name: str, value: Any, low: float, high: float = float("inf")) -> None:
    if not low <= value <= high:
        bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise ValueError(f"{section}.{name} must be {bound}, got {value!r}")


@dataclass
class ModelConfig:
    """The GRAD model (spec §2) and the backbone whose features it reads.

    architecture: 'grad' or 'bigrid' (Bi-Grid GRAD, spec §3: adds the abnormal grids of the
    ``bigrid`` section and trains in the stages of its schedule instead of train.epochs). fusion: 'crad' (reference code: MobileNetV3 bottlenecks, expansion 4C), 'crad-s' (expansion
    C) or 'paper' (ResNet basic blocks). num_blocks: fusion depth, None for the variant's default
    (:data:`DEFAULT_NUM_BLOCKS`). local/global_grid_dim: coordinate dimension 1..4;
    local/global_grid_res: lattice points per axis. jitter_mode: 'batch' (reference code: one
    coin flip per forward) or 'pixel' (paper: per pixel). kernels: 'ext' (grad_ext kernels) or
    'reference' (the reference code's pure-torch formulation).
    """

    architecture: str = "grad"
    backbone: str = "efficientnet_b4"
    backbone_weights: str = "imagenet"
    input_size: int = 224
    fusion: str = "crad"
    num_blocks: Optional[int] = None
    local_grid_dim: int = 2
    local_grid_res: int = 8
    global_grid_dim: int = 2
    global_grid_res: int = 4
    use_local: bool = True
    use_global: bool = True
    refine: bool = True
    mse_weight: float = 0.3
    cos_weight: float = 0.7
    mse_threshold: float = 10.0
    jitter_std: float = 0.05
    jitter_prob: float = 0.5
    jitter_mode: str = "batch"
    kernels: str = "ext"

    def __post_init__(self) -> None:
        _check_choice("model", "architecture", self.architecture, ARCHITECTURES)
        _check_range("model", "input_size", self.input_size, 1)
        _check_choice("model", "fusion", self.fusion, FUSIONS)
        if self.num_blocks is not None:
            _check_range("model", "num_blocks", self.num_blocks, 0)
        for axis in ("local", "global"):
            _check_range("model", f"{axis}_grid_dim", getattr(self, f"{axis}_grid_dim"), 1, MAX_GRID_DIM)
            _check_range("model", f"{axis}_grid_res", getattr(self, f"{axis}_grid_res"), 1)
        if not (self.use_local or self.use_global):
            raise ValueError("model.use_local and model.use_global cannot both be false: the model needs a grid")
        _check_range("model", "mse_threshold", self.mse_threshold, 0)
        _check_range("model", "jitter_std", self.jitter_std, 0)
        _check_range("model", "jitter_prob", self.jitter_prob, 0, 1)
        _check_choice("model", "jitter_mode", self.jitter_mode, JITTER_MODES)
        _check_choice("model", "kernels", self.kernels, KERNELS)

    @property
    def blocks(self) -> int:
        """Number of fusion blocks: ``num_blocks``, or the fusion variant's default."""
        return DEFAULT_NUM_BLOCKS[self.fusion] if self.num_blocks is None else self.num_blocks


@dataclass
class TrainConfig:
    """Optimisation (the reference code's recipe, spec §2): AdamW with ``lr_grid`` for the two
    grids and ``lr`` for everything else, gradient-norm clipping, StepLR. device: 'auto' (CUDA
    when available), 'cpu', 'cuda' or 'cuda:N'. amp_bf16: bfloat16 autocast (CUDA)."""

    epochs: int = 50
    batch_size: int = 64
    lr_grid: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 0.1
    lr_step: int = 40
    lr_gamma: float = 0.1
    seed: int = 0
    num_workers: int = 2
    amp_bf16: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_range("train", "epochs", self.epochs, 1)
        _check_range("train", "batch_size", self.batch_size, 1)
        for name in ("lr_grid", "lr", "weight_decay", "grad_clip", "lr_gamma"):
            _check_range("train", name, getattr(self, name), 0)
        _check_range("train", "lr_step", self.lr_step, 1)
        _check_range("train", "num_workers", self.num_workers, 0)
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@dataclass
class DataConfig:
    """Which images to read. root: dataset folder (None for datasets that ship with a package,
    e.g. ELPV). classes: None for all. unified: one model for all classes (spec §2) instead of
    one per class. image_size: None for the model's input size. cache: where backbone features
    are kept ('memory', 'disk' under cache_dir, or 'none'). on_error: what an unreadable image
    does ('raise' or 'skip' with a warning)."""

    dataset: str = "mvtec"
    root: Optional[str] = None
    classes: Optional[List[str]] = None
    unified: bool = True
    image_size: Optional[int] = None
    cache: str = "memory"
    cache_dir: Optional[str] = None
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check_range("data", "image_size", self.image_size, 1)
        _check_choice("data", "cache", self.cache, CACHE_MODES)
        if self.cache == "disk" and self.cache_dir is None:
            raise ValueError("data.cache='disk' needs data.cache_dir (the folder for the feature files)")
        _check_choice("data", "on_error", self.on_error, ON_ERROR)
        if self.classes is not None and len(self.classes) == 0:
            raise ValueError("data.classes must be None (all classes) or a non-empty list of class names")


@dataclass
class EvalConfig:
    """Evaluation (spec §5). protocol: 'strict' (maps at each image's original resolution) or
    'paper' (the reference code's 224-pixel protocol). heatmaps: how many heatmaps to save."""

    protocol: str = "strict"
    heatmaps: int = 16

    def __post_init__(self) -> None:
        _check_choice("eval", "protocol", self.protocol, PROTOCOLS)
        _check_range("eval", "heatmaps", self.heatmaps, 0)


@dataclass
class BiGridConfig:
    """Bi-Grid GRAD (spec §3), read by :mod:`gradad.bigrid` (the plain GRAD model ignores it).

    abnormal_branch: build the abnormal grids (false: the model is GRAD). combine: 'learned'
    (reference code: x̂ = x̂_n + w·x̂_a, w learnable, initialised to abnormal_weight_init) or
    'fixed' (paper: x̂ = λ·x̂_n + (1 − λ)·x̂_a with λ = mix_lambda; the spec gives no value for
    λ). standardize_eps: eps of the per-channel standardisation of the abnormal sampled
    features. contrastive_threshold: th of the truncated-L1 loss. fbp: FBP preset ('reference'
    or 'paper'); fbp_per_image: one blob per image instead of per batch; fbp_blobs: blobs per
    draw. schedule: 'sequential' (abnormal_epochs of stage 1, then normal_epochs of stage 2) or
    'alternating' (that pair repeated ``cycles`` times)."""

    abnormal_branch: bool = True
    combine: str = "learned"
    abnormal_weight_init: float = -0.2
    mix_lambda: float = 0.5
    standardize_eps: float = 1e-5
    contrastive_threshold: float = 0.5
    fbp: str = "reference"
    fbp_per_image: bool = False
    fbp_blobs: int = 1
    schedule: str = "sequential"
    abnormal_epochs: int = 25
    normal_epochs: int = 25
    cycles: int = 1

    def __post_init__(self) -> None:
        _check_choice("bigrid", "combine", self.combine, BIGRID_COMBINES)
        _check_range("bigrid", "mix_lambda", self.mix_lambda, 0, 1)
        _check_range("bigrid", "standardize_eps", self.standardize_eps, 0)
        _check_range("bigrid", "contrastive_threshold", self.contrastive_threshold, 0)
        _check_choice("bigrid", "fbp", self.fbp, FBP_PRESET_NAMES)
        _check_range("bigrid", "fbp_blobs", self.fbp_blobs, 1)
        _check_choice("bigrid", "schedule", self.schedule, BIGRID_SCHEDULES)
        _check_range("bigrid", "abnormal_epochs", self.abnormal_epochs, 0)
        _check_range("bigrid", "normal_epochs", self.normal_epochs, 0)
        _check_range("bigrid", "cycles", self.cycles, 1)
        if self.abnormal_epochs + self.normal_epochs == 0:
            raise ValueError("bigrid.abnormal_epochs and bigrid.normal_epochs cannot both be 0")


@dataclass
class Config:
    """A whole run: the sections and the folder its outputs go to."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bigrid: BiGridConfig = field(default_factory=BiGridConfig)
    output_dir: str = DEFAULT_OUTPUT_DIR

    @property
    def image_size(self) -> int:
        """Side of the square images fed to the backbone: data.image_size or model.input_size."""
        return self.model.input_size if self.data.image_size is None else self.data.image_size


SECTIONS: Dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig,
                             "bigrid": BiGridConfig}


# ---- type conversion ----------------------------------------------------------------------

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML, or a string from the command line) as the type ``annotation``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        annotation = next(a for a in args if a is not type(None))
    expected = getattr(annotation, "__name__", str(annotation))
    bad = TypeError(f"{key} must be {expected}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML reads '1e-3' (no dot) as a string
            except ValueError:
                raise bad from None
        raise bad
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad
    if typing.get_origin(annotation) in (list, List):
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",")]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise TypeError(f"{key} must be a list of strings (YAML list or comma-separated), got {value!r}")
    raise TypeError(f"{key}: unsupported field type {annotation!r}")


def _section_from_dict(name: str, cls: type, values: Any, base: Any = None) -> Any:
    if not isinstance(values, Mapping):
        raise TypeError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise KeyError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                       f"valid keys of {name!r}: {', '.join(types)}")
    converted = {k: _convert(v, types[k], f"{name}.{k}") for k, v in values.items()}
    return dataclasses.replace(base, **converted) if base is not None else cls(**converted)


def config_from_dict(values: Mapping[str, Any], base: Optional[Config] = None) -> Config:
    """A :class:`Config` from a nested mapping (as read from YAML); keys that are missing keep
    the value of ``base`` (the defaults when None). Unknown keys raise KeyError."""
    if not isinstance(values, Mapping):
        raise TypeError(f"a config must be a mapping of sections, got {type(values).__name__}")
    base = Config() if base is None else base
    unknown = sorted(set(values) - set(SECTIONS) - {"output_dir"})
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; valid keys: {[*SECTIONS, 'output_dir']}")
    sections = {name: _section_from_dict(name, cls, values[name], getattr(base, name))
                for name, cls in SECTIONS.items() if name in values}
    if "output_dir" in values:
        sections["output_dir"] = _convert(values["output_dir"], str, "output_dir")
    return dataclasses.replace(base, **sections)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """The nested plain-data form of ``cfg`` (what :func:`dump_config` writes)."""
    return dataclasses.asdict(cfg)


# ---- files --------------------------------------------------------------------------------

def load_config(path: str | os.PathLike, base: Optional[Config] = None) -> Config:
    """Reads a YAML config file; missing keys keep the values of ``base`` (defaults when None)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    values = {} if values is None else values
    try:
        return config_from_dict(values, base)
    except (KeyError, TypeError, ValueError) as exc:
        raise type(exc)(f"in config file {path}: {exc.args[0] if exc.args else exc}") from None


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes ``cfg`` as YAML to ``path`` atomically (a temp file in the same folder, then
    os.replace), creating the folder if needed."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)


# ---- command-line overrides ---------------------------------------------------------------

def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``overrides`` applied in order, each ``'section.key=value'`` (or
    ``'output_dir=value'``); values are converted to the field's type ('none' for an optional
    field's None, 'true'/'false' for booleans, 'a,b' or '[a, b]' for lists)."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'section.key=value' strings, not one string")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must have the form 'section.key=value'")
        dotted, value = item.split("=", 1)
        dotted = dotted.strip()
        if dotted == "output_dir":
            cfg = config_from_dict({"output_dir": value}, cfg)
            continue
        if dotted.count(".") != 1:
            raise KeyError(f"override {item!r}: key must be 'section.key' with a section among "
                           f"{list(SECTIONS)} (or 'output_dir'), got {dotted!r}")
        section, key = dotted.split(".")
        if section not in SECTIONS:
            raise KeyError(f"override {item!r}: unknown section {section!r}; sections: {list(SECTIONS)}")
        cfg = config_from_dict({section: {key: value}}, cfg)
    return cfg


# ---- presets ------------------------------------------------------------------------------

def _grad() -> Config:
    # GRAD with EfficientNet-B4 as the reference code trains it (the defaults).
    return Config()


def _grad_s() -> Config:
    return Config(model=ModelConfig(fusion="crad-s"), output_dir="runs/grad-s")


def _grad_paper() -> Config:
    # The paper's text: ResNet fusion, per-pixel jitter, 100 epochs.
    return Config(model=ModelConfig(fusion="paper", jitter_mode="pixel"), train=TrainConfig(epochs=100),
                  output_dir="runs/grad-paper")


def _lite_demo() -> Config:
    # A CPU-sized run: offline Lite1 weights at their native 240 px (30×30 features), a small
    # fusion net, few epochs. On ELPV, Lite0 at 224 or 320, Lite2 at 256, 4 blocks, 'crad'
    # fusion, 25 epochs or all 1,131 training cells all scored within ±0.5 AUROC of it.
    return Config(
        model=ModelConfig(backbone="efficientnet_lite1", input_size=240, fusion="crad-s", num_blocks=2),
        train=TrainConfig(epochs=10, batch_size=16, lr_step=8, num_workers=0),
        output_dir="runs/lite-demo",
    )


def _bigrid() -> Config:
    # Bi-Grid GRAD as the paper builds it: EfficientNet-B6 (72 + 200 = 272 channels), input 256
    # -> 32×32 features, ResNet ('paper') fusion; reference-code combination and FBP.
    return Config(model=ModelConfig(architecture="bigrid", backbone="efficientnet_b6", input_size=256,
                                    fusion="paper"),
                  bigrid=BiGridConfig(), output_dir="runs/bigrid")


def _bigrid_lite() -> Config:
    # The CPU-sized Lite demo with the abnormal branch: few epochs per stage.
    base = _lite_demo()
    return dataclasses.replace(base, model=dataclasses.replace(base.model, architecture="bigrid"),
                               bigrid=BiGridConfig(abnormal_epochs=5, normal_epochs=5),
                               output_dir="runs/bigrid-lite")


PRESETS: Dict[str, Callable[[], Config]] = {
    "grad": _grad,
    "grad-s": _grad_s,
    "grad-paper": _grad_paper,
    "lite-demo": _lite_demo,
    "bigrid": _bigrid,
    "bigrid-lite": _bigrid_lite,
}


def preset_config(name: str) -> Config:
    """A fresh :class:`Config` of the preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {list(PRESETS)}")
    return PRESETS[name]()
