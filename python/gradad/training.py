"""Training GRAD on frozen-backbone features (spec §2, the reference code's recipe).

One call of :func:`train` runs a whole training: list the training images, hold out a seeded
fraction of them as normal validation images, extract (and cache) backbone features, train
with AdamW + gradient clipping + StepLR, and write ``checkpoint.pt`` after every epoch. The
last epoch's model is the result (nothing is selected on test data). When training finishes,
the anomaly scores of the validation images are stored in the checkpoint together with a
decision threshold (a high quantile of them) for ``gradad predict``.

- Features: with ``data.cache`` 'memory' or 'disk' the backbone runs once per image
  (:class:`gradad.data.FeatureCache`) and training reads cached features; with 'none' the
  backbone runs on every batch of every epoch.
- Checkpoints hold the GRAD weights (never the backbone's), the full config, library versions
  and the backbone's ``weights_id``; they are written atomically.
- Resume restores model, optimizer, scheduler, epoch and RNG state; the shuffling order
  depends only on (seed, epoch), so a resumed run equals an uninterrupted one.
- Multi-GPU: launched with ``torchrun`` (WORLD_SIZE > 1), each process trains on its
  DistributedSampler shard under DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import io
import os
import platform
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from . import __version__
from .backbones import FeatureExtractor, build_backbone
from .bigrid import BiGridGRAD, bigrid_stage_loss, set_bigrid_stage, stage_plan
from .config import Config, TrainConfig, config_to_dict
from .data import AnomalyDataset, FeatureCache, ImageRecord, list_dataset
from .datasets.image_io import image_size_of
from .evaluation import postprocess
from .fbp import FeatureBlockPaster, fbp_settings
from .io_utils import atomic_write_bytes
from .model import GRAD

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KIND = "gradad-grad-checkpoint"
CHECKPOINT_FORMAT = 1
# Fraction of the (per-class) training normals held out to choose the decision threshold.
VALIDATION_FRACTION = 0.1
# Decision threshold: this quantile of the validation images' scores.
THRESHOLD_QUANTILE = 0.99
# Config fields that may differ between an interrupted run and its resumption: they change
# neither the model nor the order of the training samples.
RESUMABLE_CHANGES = ("train.epochs", "bigrid.abnormal_epochs", "bigrid.normal_epochs", "bigrid.cycles",
                     "train.device", "train.num_workers", "output_dir")


@dataclass(frozen=True)
class TrainingSplit:
    """How the training listing is split before training.

    max_train_images: keep at most this many training images (a seeded subset of each class,
    in proportion to its size), None for all. val_fraction: seeded fraction of every class's
    remaining normals held out as validation images for the threshold (0 for none).
    threshold_quantile: quantile of the validation scores used as the decision threshold.
    """

    max_train_images: Optional[int] = None
    val_fraction: float = VALIDATION_FRACTION
    threshold_quantile: float = THRESHOLD_QUANTILE

    def __post_init__(self) -> None:
        if self.max_train_images is not None and (
                isinstance(self.max_train_images, bool) or not isinstance(self.max_train_images, int)
                or self.max_train_images < 1):
            raise ValueError(f"max_train_images must be None or a positive int, got {self.max_train_images!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not 0.0 <= self.threshold_quantile <= 1.0:
            raise ValueError(f"threshold_quantile must be in [0, 1], got {self.threshold_quantile!r}")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced: checkpoint paths (one per class when data.unified is
    False, else one), the mean training loss of every epoch run in this call (per checkpoint),
    and the epochs the checkpoints hold."""

    checkpoints: List[str]
    epoch_losses: List[List[float]]
    epochs: int


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


# ---------------------------------------------------------------------------------------------
# Devices, processes, seeds


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → CUDA (device ``local_rank``) when available, else the CPU; 'cpu', 'cuda'
    (→ cuda:``local_rank``) or 'cuda:N'. Asking for CUDA without it is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, env:// rendezvous):
    NCCL on CUDA, Gloo on the CPU. Returns the context and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank), device


def finish_distributed() -> None:
    """Leave the process group :func:`init_distributed` joined (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, object]:
    """The global RNG states, in types torch.load(weights_only=True) reads back."""
    numpy_state = np.random.get_state()
    state: Dict[str, object] = {
        "python": list(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    """Restore the states :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Images and features


def split_training_records(records: Sequence[ImageRecord], options: TrainingSplit,
                           seed: int) -> tuple[List[ImageRecord], List[ImageRecord]]:
    """(training records, validation records) from a training listing.

    Per class, in listing order: first a seeded subset when ``options.max_train_images`` caps
    the total (each class keeps its share of the cap, see _class_quotas), then a seeded
    ``val_fraction`` of the kept normals goes to validation. Every class keeps >= 1 training image.
    """
    by_class: Dict[str, List[ImageRecord]] = {}
    for record in records:
        if record.label != 0:
            raise ValueError(f"training images must be normal (label 0), got an anomalous one: {record.path}")
        by_class.setdefault(record.class_name, []).append(record)
    quotas = _class_quotas({name: len(rs) for name, rs in by_class.items()}, options.max_train_images)
    train, validation = [], []
    for class_index, (name, class_records) in enumerate(by_class.items()):
        rng = np.random.default_rng([seed, class_index])
        if quotas[name] < len(class_records):
            kept = np.sort(rng.permutation(len(class_records))[:quotas[name]])
            class_records = [class_records[i] for i in kept]
        held = round(options.val_fraction * len(class_records))
        if held >= len(class_records):
            raise ValueError(f"class {name!r}: val_fraction={options.val_fraction} leaves no training "
                             f"image of its {len(class_records)}")
        is_held = np.zeros(len(class_records), dtype=bool)
        is_held[rng.permutation(len(class_records))[:held]] = True
        train += [r for r, h in zip(class_records, is_held) if not h]
        validation += [r for r, h in zip(class_records, is_held) if h]
    return train, validation


def _class_quotas(counts: Dict[str, int], cap: Optional[int]) -> Dict[str, int]:
    """Images kept per class under a total ``cap``: shares of the cap in proportion to the class
    sizes, rounded by largest remainder so that they add up to the cap exactly."""
    total = sum(counts.values())
    if cap is None or total <= cap:
        return dict(counts)
    if cap < len(counts):
        raise ValueError(f"max_train_images={cap} is less than the {len(counts)} classes: every "
                         f"class needs at least one training image")
    exact = {name: cap * count / total for name, count in counts.items()}
    quotas = {name: max(1, int(share)) for name, share in exact.items()}
    by_remainder = sorted(counts, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    for name in by_remainder[:max(0, cap - sum(quotas.values()))]:
        quotas[name] += 1
    while sum(quotas.values()) > cap:  # the minimum of one image pushed small classes over
        quotas[max(quotas, key=quotas.get)] -= 1
    return quotas


def feature_cache(cfg: Config, backbone: FeatureExtractor) -> Optional[FeatureCache]:
    """The FeatureCache ``cfg.data.cache`` asks for ('memory', 'disk' in data.cache_dir), or
    None for 'none' (features are computed on every pass)."""
    if cfg.data.cache == "none":
        return None
    return FeatureCache(_cache_key(backbone), cfg.data.cache_dir if cfg.data.cache == "disk" else None)


def _cache_key(backbone: FeatureExtractor) -> str:
    # the extractor's name fixes architecture and stages; weights_id fixes the weights
    return f"{backbone.name}|{backbone.weights_id}"


def extract_features(backbone: FeatureExtractor, dataset: AnomalyDataset, device: torch.device,
                     batch_size: int, cache: Optional[FeatureCache], progress: bool,
                     num_workers: int = 0) -> torch.Tensor:
    """Backbone features of every image of ``dataset``, (N, C, S/8, S/8) float32 on the CPU,
    in dataset order; through ``cache`` when given."""
    def run_backbone(images: torch.Tensor) -> torch.Tensor:
        return backbone(images.to(device))

    cache = cache if cache is not None else FeatureCache(_cache_key(backbone))
    return cache.features_for(dataset, run_backbone, batch_size=batch_size, device=device,
                              progress=progress, num_workers=num_workers)


def model_feature_size(cfg: Config, backbone: FeatureExtractor) -> int:
    """Side of the feature map GRAD is built for: the image size over the backbone stride."""
    size = cfg.image_size
    if size % 16:
        raise ValueError(f"image size {size} (data.image_size or model.input_size) must be a multiple "
                         f"of 16 for the backbone's stride-8 and stride-16 stages")
    return size // backbone.stride


# ---------------------------------------------------------------------------------------------
# Models and their training objective


def build_model(cfg: Config, in_channels: int, feature_size: int) -> GRAD:
    """The model ``cfg.model.architecture`` names, on the CPU: GRAD, or BiGridGRAD configured by
    ``cfg.bigrid``, for features of ``in_channels`` channels and size ``feature_size``²."""
    if cfg.model.architecture == "bigrid":
        return BiGridGRAD(cfg.model, cfg.bigrid, in_channels, feature_size)
    return GRAD(cfg.model, in_channels, feature_size)


def epoch_stages(cfg: Config) -> List[Optional[str]]:
    """What every epoch trains, in order: None (GRAD's loss) train.epochs times for GRAD; for
    Bi-Grid GRAD the stage names of :func:`gradad.bigrid.stage_plan`."""
    if cfg.model.architecture == "bigrid":
        plan = list(stage_plan(cfg.bigrid))
        if not cfg.bigrid.abnormal_branch and "abnormal" in plan:
            raise ValueError("bigrid.abnormal_branch=False leaves no abnormal grid for the "
                             f"bigrid.abnormal_epochs={cfg.bigrid.abnormal_epochs} stage-1 epochs; set it to 0")
        return plan
    return [None] * cfg.train.epochs


def planned_epochs(cfg: Config) -> int:
    """The number of epochs a complete training of ``cfg`` runs."""
    return len(epoch_stages(cfg))


class TrainingObjective(torch.nn.Module):
    """The loss of one batch as a module (so DistributedDataParallel can wrap it):
    ``objective(features (B, C, h, w), stage) -> loss``. Stage None is the model's own loss
    (GRAD's); 'abnormal' / 'normal' are the Bi-Grid stages (:func:`gradad.bigrid.bigrid_stage_loss`,
    FBP drawn by ``paster``, re-seeded per epoch by :meth:`start_epoch`)."""

    def __init__(self, model: GRAD, seed: int = 0):
        super().__init__()
        self.model = model
        self.seed = seed
        self.paster = None
        if isinstance(model, BiGridGRAD) and model.has_abnormal_branch:
            bigrid = model.bigrid
            self.paster = FeatureBlockPaster(fbp_settings(bigrid.fbp, per_image=bigrid.fbp_per_image,
                                                          num_blobs=bigrid.fbp_blobs))

    def start_epoch(self, epoch: int, stage: Optional[str]) -> None:
        """Freeze what ``stage`` does not train (Bi-Grid) and re-seed FBP from (seed, epoch), so
        a resumed run draws the same blobs as an uninterrupted one."""
        if stage is None:
            return
        if not isinstance(self.model, BiGridGRAD):
            raise ValueError(f"stage {stage!r} needs a BiGridGRAD model, got {type(self.model).__name__}")
        if self.model.has_abnormal_branch:
            set_bigrid_stage(self.model, stage)
        if self.paster is not None:
            self.paster.seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))

    def finish(self) -> None:
        """Make every parameter trainable again (after the last stage)."""
        for p in self.model.parameters():
            p.requires_grad_(True)

    def forward(self, features: torch.Tensor, stage: Optional[str] = None) -> torch.Tensor:
        if stage is None:
            return self.model(features).loss
        return bigrid_stage_loss(self.model, features, stage, self.paster)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a checkpoint was written with."""
    import grad_ext

    return {"gradad": __version__, "grad_ext": str(grad_ext.__version__), "torch": str(torch.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


def save_checkpoint(path: str, payload: Dict[str, object]) -> str:
    """Serialise ``payload`` in memory, then write it atomically (temp file + os.replace), so
    an interruption leaves the previous checkpoint or none, never a partial file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_checkpoint(path: str | os.PathLike) -> Dict[str, object]:
    """Load a gradad checkpoint file onto the CPU; clear errors for a missing file, a file that
    is not a gradad checkpoint, or one of an unknown format version."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors come in many types
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a gradad GRAD checkpoint (no kind={CHECKPOINT_KIND!r})")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {payload.get('format')!r}; this gradad "
                         f"{__version__} reads format {CHECKPOINT_FORMAT}")
    payload["path"] = path
    return payload


def flatten_config(values: Dict[str, object], prefix: str = "") -> Dict[str, object]:
    """{'model': {'fusion': 'crad'}} → {'model.fusion': 'crad'}."""
    flat: Dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(stored: Dict[str, object], current: Dict[str, object],
                       prefixes: Sequence[str] = ("",), ignore: Sequence[str] = ()) -> List[str]:
    """'key: stored → current' for every flattened config key under one of ``prefixes`` whose
    values differ (keys in ``ignore`` skipped)."""
    stored_flat, current_flat = flatten_config(stored), flatten_config(current)
    keys = sorted(set(stored_flat) | set(current_flat))
    return [f"{key}: checkpoint {stored_flat.get(key)!r}, now {current_flat.get(key)!r}" for key in keys
            if key.startswith(tuple(prefixes)) and key not in ignore
            and stored_flat.get(key) != current_flat.get(key)]


# ---------------------------------------------------------------------------------------------
# Training


class _BatchSource:
    """Feature batches for a list of sample indices: slices of cached features, or the backbone
    run on the images (data.cache='none')."""

    def __init__(self, features: Optional[torch.Tensor], dataset: AnomalyDataset,
                 backbone: FeatureExtractor, device: torch.device, num_workers: int):
        self.features, self.dataset, self.backbone = features, dataset, backbone
        self.device, self.num_workers = device, num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batches: List[List[int]]):
        """Yield (B, C, h, w) feature tensors on the device, one per index list."""
        if self.features is not None:
            for indices in batches:
                yield self.features[indices].to(self.device, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield self.backbone(batch["image"].to(self.device, non_blocking=True))


def _epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int) -> List[List[int]]:
    sampler.set_epoch(epoch)  # the order depends on (seed, epoch) only, not on the global RNG
    order = list(iter(sampler))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _run_epoch(objective: torch.nn.Module, source: _BatchSource, batches: List[List[int]],
               optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, device: torch.device,
               context: DistributedContext, stage: Optional[str], desc: str, progress: bool) -> float:
    """One pass over ``batches`` of ``objective`` (a TrainingObjective, maybe DDP-wrapped) in
    ``stage``; returns the mean loss over all processes' samples."""
    objective.train()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if train_cfg.amp_bf16 else nullcontext())
    parameters = [p for p in objective.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=sum(len(b) for b in batches) * context.world_size, unit="img", leave=False,
               desc=desc, disable=not (progress and context.is_main))
    started = time.perf_counter()
    for features in source.batches(batches):
        with autocast:
            loss = objective(features, stage)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} in {desc}; "
                                     f"lower train.lr / train.lr_grid or check the input features")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, train_cfg.grad_clip)
        optimizer.step()
        loss_sum += loss.detach().double() * len(features)
        samples += len(features)
        bar.update(len(features) * context.world_size)
        bar.set_postfix(loss=f"{loss.item():.4g}",
                        img_s=f"{bar.n / max(time.perf_counter() - started, 1e-9):.1f}")
    bar.close()
    if context.enabled:
        dist.all_reduce(loss_sum)
        dist.all_reduce(samples)
    return float(loss_sum / samples.clamp_min(1))


def _epoch_desc(epoch: int, total: int, stage: Optional[str]) -> str:
    return f"epoch {epoch + 1}/{total}" + (f" ({stage})" if stage else "")


def make_optimizer(model: GRAD, train_cfg: TrainConfig):
    """AdamW (grids at lr_grid, the rest at lr, weight decay) and its StepLR, stepped per epoch."""
    optimizer = torch.optim.AdamW(model.param_groups(train_cfg.lr_grid, train_cfg.lr),
                                  weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train_cfg.lr_step, gamma=train_cfg.lr_gamma)
    return optimizer, scheduler


def train_on_features(model: GRAD, features: torch.Tensor, train_cfg: TrainConfig,
                      stages: Sequence[Optional[str]], device: Optional[torch.device] = None,
                      progress: bool = True, max_seconds: Optional[float] = None) -> Dict[str, List]:
    """Train ``model`` in memory on features (N, C, h, w), one epoch per entry of ``stages``
    (see :func:`epoch_stages`), with the same objective, optimiser and epoch loop as
    :func:`train` but no files. Batches are shuffled by a generator seeded with train_cfg.seed.
    max_seconds: stop after the first epoch that ends past this wall-clock budget (None: all).
    Leaves every parameter trainable and the model in eval mode. Returns {'stage': [...],
    'loss': [mean loss per epoch], 'seconds': [end time of each epoch since the start]}."""
    if not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be None or > 0, got {max_seconds!r}")
    if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, C, H, W) tensor, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    device = device if device is not None else next(model.parameters()).device
    model.to(device)
    objective = TrainingObjective(model, train_cfg.seed)
    objective.finish()
    optimizer, scheduler = make_optimizer(model, train_cfg)
    shuffle = torch.Generator().manual_seed(train_cfg.seed)
    source = _BatchSource(features, None, None, device, 0)
    history: Dict[str, List] = {"stage": [], "loss": [], "seconds": []}
    start = time.perf_counter()
    try:
        for epoch in tqdm(range(len(stages)), desc="training", unit="epoch", disable=not progress):
            stage = stages[epoch]
            objective.start_epoch(epoch, stage)
            order = torch.randperm(features.shape[0], generator=shuffle)
            batches = [chunk.tolist() for chunk in order.split(train_cfg.batch_size)]
            loss = _run_epoch(objective, source, batches, optimizer, train_cfg, device, DistributedContext(),
                              stage, _epoch_desc(epoch, len(stages), stage), progress)
            scheduler.step()
            history["stage"].append(stage)
            history["loss"].append(loss)
            history["seconds"].append(time.perf_counter() - start)
            if max_seconds is not None and history["seconds"][-1] > max_seconds:
                break
    finally:
        objective.finish()
        model.eval()
    return history


@torch.no_grad()
def score_features(model: GRAD, features: torch.Tensor, image_size: int, device: torch.device,
                   batch_size: int, progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Anomaly maps of cached features, (N, C, h, w) → (N, S, S) float32 on the CPU, eval mode."""
    model.eval()
    maps = []
    for start in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = features[start:start + batch_size].to(device)
        maps.append(model.anomaly_map(chunk, image_size).float().cpu())
    return torch.cat(maps) if maps else torch.zeros(0, image_size, image_size)


def validation_summary(model: GRAD, features: torch.Tensor, records: Sequence[ImageRecord],
                       orig_sizes: Sequence[tuple], cfg: Config, device: torch.device,
                       quantile: float) -> Optional[Dict[str, object]]:
    """Scores of the normal validation images under cfg.eval.protocol and the threshold at
    ``quantile`` of them, or None without validation images."""
    if len(records) == 0:
        return None
    maps = score_features(model, features, cfg.image_size, device, cfg.train.batch_size)
    _, scores = postprocess(maps, cfg.eval.protocol, list(orig_sizes))
    return {"scores": [float(s) for s in scores], "paths": [r.path for r in records],
            "protocol": cfg.eval.protocol, "quantile": float(quantile),
            "threshold": float(np.quantile(scores, quantile))}


def _checkpoint_payload(cfg: Config, model: GRAD, backbone: FeatureExtractor, epoch: int,
                        optimizer, scheduler, losses: List[float], options: TrainingSplit,
                        validation: Optional[Dict[str, object]], complete: bool) -> Dict[str, object]:
    return {
        "kind": CHECKPOINT_KIND,
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(cfg),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "in_channels": model.in_channels,
        "feature_size": model.feature_size,
        "image_size": cfg.image_size,
        "backbone": {"name": backbone.name, "weights_id": backbone.weights_id,
                     "out_channels": backbone.out_channels, "mean": list(backbone.mean),
                     "std": list(backbone.std)},
        "versions": library_versions(),
        "epoch": epoch,
        "complete": complete,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "epoch_losses": list(losses),
        "split": dataclasses.asdict(options),
        "validation": validation,
    }


def _check_resumable(stored: Dict[str, object], cfg: Config, options: TrainingSplit,
                     backbone: FeatureExtractor) -> None:
    path = stored["path"]
    differences = config_differences(stored["config"], config_to_dict(cfg), ignore=RESUMABLE_CHANGES)
    if differences:
        raise ValueError(f"cannot resume from {path}: its config differs from this run's in "
                         f"{'; '.join(differences)}")
    if stored["split"] != dataclasses.asdict(options):
        raise ValueError(f"cannot resume from {path}: it was trained with training split options "
                         f"{stored['split']}, this run uses {dataclasses.asdict(options)}")
    if stored["backbone"]["weights_id"] != backbone.weights_id:
        raise ValueError(f"cannot resume from {path}: its backbone weights are "
                         f"{stored['backbone']['weights_id']!r}, this run loaded {backbone.weights_id!r}")


def _train_one(cfg: Config, records: List[ImageRecord], out_dir: str, options: TrainingSplit,
               resume: bool, progress: bool, context: DistributedContext,
               device: torch.device) -> tuple[str, List[float]]:
    """Train one model on ``records``; returns (checkpoint path, losses of the epochs run)."""
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    stored = read_checkpoint(checkpoint_path) if resume and os.path.isfile(checkpoint_path) else None
    if resume and stored is None and context.is_main:
        warnings.warn(f"resume asked for but {checkpoint_path} does not exist: training from scratch")

    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights).to(device)
    if stored is not None:
        _check_resumable(stored, cfg, options, backbone)
    train_records, val_records = split_training_records(records, options, cfg.train.seed)
    show = progress and context.is_main
    train_set = AnomalyDataset(train_records, cfg.image_size, backbone.mean, backbone.std,
                               on_error=cfg.data.on_error, progress=show)
    cache = feature_cache(cfg, backbone)
    if cache is not None and cache.directory is not None and context.enabled and not context.is_main:
        dist.barrier()  # rank 0 fills the disk cache first; the others then read it
    features = None
    if cache is not None:
        features = extract_features(backbone, train_set, device, cfg.train.batch_size, cache, show,
                                    cfg.train.num_workers)
    if cache is not None and cache.directory is not None and context.enabled and context.is_main:
        dist.barrier()

    feature_size = model_feature_size(cfg, backbone)
    stages = epoch_stages(cfg)
    total_epochs = len(stages)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, backbone.out_channels, feature_size).to(device)
    objective = TrainingObjective(model, cfg.train.seed)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    start_epoch, losses = 0, []
    if stored is not None:
        model.load_state_dict(stored["model"])
        optimizer.load_state_dict(stored["optimizer"])
        scheduler.load_state_dict(stored["scheduler"])
        start_epoch, losses = stored["epoch"], list(stored["epoch_losses"])
        if start_epoch > total_epochs:
            raise ValueError(f"{checkpoint_path} already holds {start_epoch} epochs, more than the "
                             f"{total_epochs} this config trains")
        set_rng_state(stored["rng"])
    elif context.enabled:
        torch.manual_seed(cfg.train.seed + context.rank)  # different jitter draws per process

    if context.enabled and cfg.train.batch_size % context.world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is the total over processes and "
                         f"must be divisible by the {context.world_size} processes")
    per_process_batch = cfg.train.batch_size // context.world_size
    sampler = DistributedSampler(range(len(train_set)), num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=cfg.train.seed)
    source = _BatchSource(features, train_set, backbone, device, cfg.train.num_workers)
    new_losses: List[float] = []
    epochs = tqdm(range(start_epoch, total_epochs), desc="training", unit="epoch",
                  initial=start_epoch, total=total_epochs, disable=not show)
    trained, trained_stage = None, object()
    for epoch in epochs:
        stage = stages[epoch]
        objective.start_epoch(epoch, stage)
        if trained is None or stage != trained_stage:
            # DDP registers the parameters that require grad when it wraps, so it wraps again
            # whenever a Bi-Grid stage freezes other grids; the abnormal stage leaves the
            # normal fusion network unused, hence find_unused_parameters for Bi-Grid.
            trained = objective if not context.enabled else DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=stage is not None)
            trained_stage = stage
        loss = _run_epoch(trained, source, _epoch_batches(sampler, epoch, per_process_batch), optimizer,
                          cfg.train, device, context, stage, _epoch_desc(epoch, total_epochs, stage), progress)
        scheduler.step()
        new_losses.append(loss)
        epochs.set_postfix(loss=f"{loss:.4g}", lr=f"{scheduler.get_last_lr()[-1]:.2g}")
        if context.is_main and epoch + 1 < total_epochs:
            save_checkpoint(checkpoint_path, _checkpoint_payload(
                cfg, model, backbone, epoch + 1, optimizer, scheduler, losses + new_losses, options,
                None, complete=False))
    epochs.close()
    objective.finish()
    # The finished model: validation scores and threshold, then the complete checkpoint (also
    # when a resumed run had nothing left to train but its last checkpoint was not complete).
    if context.is_main and not (stored is not None and stored.get("complete")
                                and start_epoch == total_epochs):
        validation = _validate(model, backbone, val_records, cache, cfg, device, options, show)
        save_checkpoint(checkpoint_path, _checkpoint_payload(
            cfg, model, backbone, total_epochs, optimizer, scheduler, losses + new_losses, options,
            validation, complete=True))
    if context.enabled:
        dist.barrier()  # nobody reads the checkpoint before rank 0 has written it
    return checkpoint_path, new_losses


def _validate(model: GRAD, backbone: FeatureExtractor, records: List[ImageRecord],
              cache: Optional[FeatureCache], cfg: Config, device: torch.device,
              options: TrainingSplit, progress: bool) -> Optional[Dict[str, object]]:
    if not records:
        return None
    dataset = AnomalyDataset(records, cfg.image_size, backbone.mean, backbone.std,
                             on_error=cfg.data.on_error, progress=progress)
    features = extract_features(backbone, dataset, device, cfg.train.batch_size, cache, progress,
                                cfg.train.num_workers)
    sizes = [image_size_of(record.path) for record in dataset.records]
    return validation_summary(model, features, dataset.records, sizes, cfg, device,
                              options.threshold_quantile)


def list_training_records(cfg: Config) -> List[ImageRecord]:
    """The training listing of cfg.data (dataset, root, classes)."""
    return list_dataset(cfg.data.dataset, cfg.data.root, "train", cfg.data.classes)


def train(cfg: Config, out_dir: Optional[str | os.PathLike] = None, *, resume: bool = False,
          options: TrainingSplit = TrainingSplit(), progress: bool = True) -> TrainResult:
    """Train GRAD as ``cfg`` says and write ``<out_dir>/checkpoint.pt`` (out_dir defaults to
    cfg.output_dir); with data.unified=False one model per class in ``<out_dir>/<class>/``.

    resume: continue from the checkpoint(s) in out_dir (a run whose config differs in more
    than RESUMABLE_CHANGES is refused). Launched by torchrun with WORLD_SIZE > 1 the processes
    train together (DDP); only rank 0 writes. Returns a :class:`TrainResult`.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a gradad.config.Config, got {type(cfg).__name__}")
    out_dir = os.fspath(out_dir if out_dir is not None else cfg.output_dir)
    context, device = init_distributed(cfg.train.device)
    records = list_training_records(cfg)
    if cfg.data.unified:
        groups = {"": records}
    else:
        groups = {}
        for record in records:
            groups.setdefault(record.class_name, []).append(record)
    checkpoints, losses = [], []
    for class_name, class_records in groups.items():
        run_dir = os.path.join(out_dir, class_name) if class_name else out_dir
        if context.is_main:
            os.makedirs(run_dir, exist_ok=True)
        class_cfg = cfg if not class_name else dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, classes=[class_name]))
        path, class_losses = _train_one(class_cfg, class_records, run_dir, options, resume, progress,
                                        context, device)
        checkpoints.append(path)
        losses.append(class_losses)
    return TrainResult(checkpoints, losses, planned_epochs(cfg))


__all__ = [
    "CHECKPOINT_NAME", "TrainingObjective", "build_model", "epoch_stages", "make_optimizer", "planned_epochs",
    "train_on_features", "THRESHOLD_QUANTILE", "TrainResult", "TrainingSplit", "VALIDATION_FRACTION",
    "config_differences", "extract_features", "feature_cache", "finish_distributed", "init_distributed",
    "read_checkpoint", "resolve_device", "save_checkpoint", "score_features", "split_training_records",
    "train",
]
