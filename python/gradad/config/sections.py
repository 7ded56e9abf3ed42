"""The sections of a run's configuration and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import grad_ext
from grad_ext._common import COS_WEIGHT, JITTER_MODES, MAX_TABLE_DIM, MSE_THRESHOLD, MSE_WEIGHT

from ..datasets import DATASET_NAMES, ON_ERROR_CHOICES
from ..evaluation import PROTOCOLS
from ..features import CACHE_MODES
from ..models.fbp import FBP_PRESETS
from ..models.fusion import DEFAULT_NUM_BLOCKS, FUSIONS
from ..runtime import check_device_name

# 'grad': GRAD (docs/method.md §2); 'bigrid': Bi-Grid GRAD (§3), configured by the bigrid
# section. Built by gradad.models.factory, which reads this config.
ARCHITECTURES = ("grad", "bigrid")
# How Bi-Grid combines its branches and schedules its stages (gradad.models.bigrid).
BIGRID_COMBINES = ("learned", "fixed")
BIGRID_SCHEDULES = ("sequential", "alternating")
DEFAULT_OUTPUT_DIR = "runs/grad"
# The data fields only the 'folder' dataset reads.
FOLDER_KEYS = ("normal_dir", "abnormal_dirs", "mask_dir", "normal_test_dir")
# Fraction of the (per-class) training normals held out to choose the decision threshold.
VALIDATION_FRACTION = 0.1
# Decision threshold: this quantile of the validation images' scores.
THRESHOLD_QUANTILE = 0.99


def _check_choice(section: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def _check_range(section: str, name: str, value: Any, low: float, high: float = float("inf")) -> None:
    if not low <= value <= high:
        bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise ValueError(f"{section}.{name} must be {bound}, got {value!r}")


@dataclass
class ModelConfig:
    """The GRAD model (docs/method.md §2) and the backbone whose features it reads.

    architecture: 'grad' or 'bigrid' (Bi-Grid GRAD, docs/method.md §3: adds the abnormal grids
    of the ``bigrid`` section and trains in the stages of its schedule instead of train.epochs).
    fusion: 'crad' (reference code: MobileNetV3 bottlenecks, expansion 4C), 'crad-s' (expansion
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
    mse_weight: float = MSE_WEIGHT
    cos_weight: float = COS_WEIGHT
    mse_threshold: float = MSE_THRESHOLD
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
            _check_range("model", f"{axis}_grid_dim", getattr(self, f"{axis}_grid_dim"), 1, MAX_TABLE_DIM)
            _check_range("model", f"{axis}_grid_res", getattr(self, f"{axis}_grid_res"), 1)
        if not (self.use_local or self.use_global):
            raise ValueError("model.use_local and model.use_global cannot both be false: the model needs a grid")
        _check_range("model", "mse_threshold", self.mse_threshold, 0)
        _check_range("model", "jitter_std", self.jitter_std, 0)
        _check_range("model", "jitter_prob", self.jitter_prob, 0, 1)
        _check_choice("model", "jitter_mode", self.jitter_mode, tuple(JITTER_MODES))
        _check_choice("model", "kernels", self.kernels, grad_ext.IMPLEMENTATIONS)

    @property
    def blocks(self) -> int:
        """Number of fusion blocks: ``num_blocks``, or the fusion variant's default."""
        return DEFAULT_NUM_BLOCKS[self.fusion] if self.num_blocks is None else self.num_blocks


@dataclass
class TrainConfig:
    """Optimisation (the reference code's recipe, docs/method.md §2): AdamW with ``lr_grid`` for the two
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
        check_device_name(self.device, "train.device")


@dataclass
class SplitConfig:
    """How the training listing is split before training (gradad.datasets.split).

    max_train_images: keep at most this many training images (a seeded subset of each class,
    in proportion to its size), None for all. val_fraction: seeded fraction of every class's
    remaining normals held out as validation images for the threshold (0 for none).
    threshold_quantile: quantile of the validation scores used as the decision threshold.
    target_fpr: instead of the quantile, the decision threshold that lets at most this fraction
    of the validation normals through as anomalous (gradad.operating_points.threshold_for_fpr);
    None: the quantile decides.
    """

    max_train_images: Optional[int] = None
    val_fraction: float = VALIDATION_FRACTION
    threshold_quantile: float = THRESHOLD_QUANTILE
    target_fpr: Optional[float] = None

    def __post_init__(self) -> None:
        if self.max_train_images is not None:
            _check_range("split", "max_train_images", self.max_train_images, 1)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"split.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        _check_range("split", "threshold_quantile", self.threshold_quantile, 0, 1)
        if self.target_fpr is not None and not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"split.target_fpr must be in [0, 1) or None, got {self.target_fpr!r}")


@dataclass
class DataConfig:
    """Which images to read. root: dataset folder (None for datasets that ship with a package,
    e.g. ELPV). classes: None for all. unified: one model for all classes (docs/method.md §2)
    instead of one per class. image_size: None for the model's input size. cache: where
    backbone features are kept ('memory', 'disk' under cache_dir, or 'none'). on_error: what an
    unreadable image does ('raise' or 'skip' with a warning). require_masks: an anomalous test
    image without a mask is an error (else its class gets pixel metrics from the images that
    have masks, or none).

    The 'folder' dataset (anomalib's Folder layout) reads normal_dir (normal images; default:
    root itself), abnormal_dirs (one folder per defect type), mask_dir (optional; masks by stem,
    in mask_dir/<defect>/ or mask_dir/), normal_test_dir (optional normal test images, else a
    seeded test_normal_fraction of normal_dir is held out); relative folders are under root."""

    dataset: str = "mvtec"
    root: Optional[str] = None
    classes: Optional[List[str]] = None
    unified: bool = True
    image_size: Optional[int] = None
    cache: str = "memory"
    cache_dir: Optional[str] = None
    on_error: str = "raise"
    require_masks: bool = False
    normal_dir: Optional[str] = None
    abnormal_dirs: Optional[List[str]] = None
    mask_dir: Optional[str] = None
    normal_test_dir: Optional[str] = None
    test_normal_fraction: float = 0.25

    def __post_init__(self) -> None:
        _check_choice("data", "dataset", self.dataset.lower(), DATASET_NAMES)
        if self.image_size is not None:
            _check_range("data", "image_size", self.image_size, 1)
        _check_choice("data", "cache", self.cache, CACHE_MODES)
        if self.cache == "disk" and self.cache_dir is None:
            raise ValueError("data.cache='disk' needs data.cache_dir (the folder for the feature files)")
        _check_choice("data", "on_error", self.on_error, ON_ERROR_CHOICES)
        if self.classes is not None and len(self.classes) == 0:
            raise ValueError("data.classes must be None (all classes) or a non-empty list of class names")
        if not 0.0 <= self.test_normal_fraction < 1.0:
            raise ValueError(f"data.test_normal_fraction must be in [0, 1), got {self.test_normal_fraction!r}")
        folder_keys = [k for k in FOLDER_KEYS if getattr(self, k) is not None]
        if self.dataset.lower() != "folder" and folder_keys:
            raise ValueError(f"data.{folder_keys[0]} is read by dataset 'folder' only, not {self.dataset!r}")
        if self.dataset.lower() == "folder" and self.classes is not None:
            raise ValueError("dataset 'folder' has one class: leave data.classes unset")


@dataclass
class EvalConfig:
    """Evaluation (docs/method.md §5). protocol: 'strict' (maps at each image's original resolution) or
    'paper' (the reference code's 224-pixel protocol). heatmaps: how many heatmaps to save."""

    protocol: str = "strict"
    heatmaps: int = 16

    def __post_init__(self) -> None:
        _check_choice("eval", "protocol", self.protocol, PROTOCOLS)
        _check_range("eval", "heatmaps", self.heatmaps, 0)


@dataclass
class BiGridConfig:
    """Bi-Grid GRAD (docs/method.md §3), read by :mod:`gradad.models.bigrid` (the plain GRAD model ignores it).

    abnormal_branch: build the abnormal grids (false: the model is GRAD). combine: 'learned'
    (reference code: x̂ = x̂_n + w·x̂_a, w learnable, initialised to abnormal_weight_init) or
    'fixed' (paper: x̂ = λ·x̂_n + (1 − λ)·x̂_a with λ = mix_lambda; the papers give no value for
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
        _check_choice("bigrid", "fbp", self.fbp, tuple(FBP_PRESETS))
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
    split: SplitConfig = field(default_factory=SplitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bigrid: BiGridConfig = field(default_factory=BiGridConfig)
    output_dir: str = DEFAULT_OUTPUT_DIR

    @property
    def image_size(self) -> int:
        """Side of the square images fed to the backbone: data.image_size or model.input_size."""
        return self.model.input_size if self.data.image_size is None else self.data.image_size


SECTIONS: Dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "split": SplitConfig, "data": DataConfig,
                             "eval": EvalConfig, "bigrid": BiGridConfig}
