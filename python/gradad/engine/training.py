"""One call of :func:`train` runs a whole training (docs/method.md §2, the reference code's
recipe): list the training images, hold out a seeded fraction of them as normal validation
images (the config's split section), extract (and cache) backbone features, train with AdamW
+ gradient clipping + StepLR, and write ``checkpoint.pt`` after every epoch. The last epoch's
model is the result (nothing is selected on test data). When training finishes, the anomaly
scores of the validation images are stored in the checkpoint together with a decision
threshold (a high quantile of them) for ``gradad predict``.

- Features: with ``data.cache`` 'memory' or 'disk' the backbone runs once per image
  (:class:`gradad.features.FeatureCache`) and training reads cached features; with 'none' the
  backbone runs on every batch of every epoch.
- Resume restores model, optimizer, scheduler, epoch and RNG state; the shuffling order
  depends only on (seed, epoch), so a resumed run equals an uninterrupted one.
- Multi-GPU: launched with ``torchrun`` (WORLD_SIZE > 1), each process trains on its
  DistributedSampler shard under DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from ..backbones import FeatureExtractor, build_backbone
from ..checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    checkpoint_payload,
    convergence_note,
    read_checkpoint,
    save_checkpoint,
    validation_statistics,
)
from ..config import Config
from ..datasets import AnomalyDataset, ImageRecord, split_training_records
from ..datasets.image_io import image_size_of
from ..evaluation import postprocess
from ..features import FeatureCache, extract_features, feature_cache, score_features
from ..listings import config_listing
from ..models.factory import build_model, epoch_stages, model_feature_size, planned_epochs
from ..models.grad import GRAD
from ..operating_points import threshold_for_fpr
from ..runtime import DistributedContext, init_distributed, seed_everything, set_rng_state
from .epochs import BatchSource, TrainingObjective, epoch_batches, epoch_desc, make_optimizer, run_epoch


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced: checkpoint paths (one per class when data.unified is
    False, else one), the mean training loss of every epoch run in this call (per checkpoint),
    and the epochs the checkpoints hold."""

    checkpoints: List[str]
    epoch_losses: List[List[float]]
    epochs: int


def validation_summary(model: GRAD, features: torch.Tensor, records: Sequence[ImageRecord],
                       orig_sizes: Sequence[tuple], cfg: Config, device: torch.device) -> Optional[Dict[str, object]]:
    """Scores of the normal validation images under cfg.eval.protocol and the threshold by the
    split section's rule (cfg.split.target_fpr when set, else the cfg.split.threshold_quantile
    quantile), or None without validation images."""
    if len(records) == 0:
        return None
    quantile, target = cfg.split.threshold_quantile, cfg.split.target_fpr
    maps = score_features(model, features, cfg.image_size, device, cfg.train.batch_size)
    _, scores = postprocess(maps, cfg.eval.protocol, list(orig_sizes))
    threshold = np.quantile(scores, quantile) if target is None else threshold_for_fpr(scores, target)
    return {"scores": [float(s) for s in scores], "paths": [r.path for r in records],
            "protocol": cfg.eval.protocol, "quantile": None if target is not None else float(quantile),
            "target_fpr": None if target is None else float(target), "threshold": float(threshold)}


def _validation_features(backbone: FeatureExtractor, records: List[ImageRecord], cache: Optional[FeatureCache],
                         cfg: Config, device: torch.device, progress: bool) -> Optional[tuple]:
    """(features, records, original sizes) of the validation normals, or None without any."""
    if not records:
        return None
    dataset = AnomalyDataset(records, cfg.image_size, backbone.mean, backbone.std,
                             on_error=cfg.data.on_error, progress=progress)
    features = extract_features(backbone, dataset, device, cfg.train.batch_size, cache, progress,
                                cfg.train.num_workers)
    return features, dataset.records, [image_size_of(record.path) for record in dataset.records]


def _cached_features(cfg: Config, backbone: FeatureExtractor, dataset: AnomalyDataset,
                     cache: Optional[FeatureCache], context: DistributedContext, device: torch.device,
                     show: bool) -> Optional[torch.Tensor]:
    """The training features through the cache (None without one); rank 0 fills a disk cache
    first and the other processes then read it."""
    if cache is None:
        return None
    shared = cache.directory is not None and context.enabled
    if shared and not context.is_main:
        dist.barrier()
    features = extract_features(backbone, dataset, device, cfg.train.batch_size, cache, show, cfg.train.num_workers)
    if shared and context.is_main:
        dist.barrier()
    return features


def _train_one(cfg: Config, records: List[ImageRecord], out_dir: str, resume: bool, progress: bool,
               context: DistributedContext, device: torch.device) -> tuple[str, List[float]]:
    """Train one model on ``records``; returns (checkpoint path, losses of the epochs run)."""
    checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
    stored = read_checkpoint(checkpoint_path) if resume and os.path.isfile(checkpoint_path) else None
    if resume and stored is None and context.is_main:
        warnings.warn(f"resume asked for but {checkpoint_path} does not exist: training from scratch")

    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights).to(device)
    if stored is not None:
        check_resumable(stored, cfg, backbone)
    train_records, val_records = split_training_records(records, cfg.split.max_train_images,
                                                        cfg.split.val_fraction, cfg.train.seed)
    show = progress and context.is_main
    class_names = [r.class_name for r in train_records]
    train_set = AnomalyDataset(train_records, cfg.image_size, backbone.mean, backbone.std,
                               on_error=cfg.data.on_error, progress=show)
    cache = feature_cache(cfg.data.cache, backbone, cfg.data.cache_dir)
    features = _cached_features(cfg, backbone, train_set, cache, context, device, show)
    # the validation normals are scored after every epoch (rank 0; read
    # before the seeding below, like the training features): the checkpoint keeps how their
    # scores moved, which says whether training had settled (checkpoint.convergence_note)
    validation_set = _validation_features(backbone, val_records, cache, cfg, device, show) \
        if context.is_main else None

    stages = epoch_stages(cfg)
    total_epochs = len(stages)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, backbone.out_channels, model_feature_size(cfg, backbone)).to(device)
    objective = TrainingObjective(model, cfg.train.seed)
    optimizer, scheduler = make_optimizer(model, cfg.train)
    start_epoch, losses, history = 0, [], []
    if stored is not None:
        model.load_state_dict(stored["model"])
        optimizer.load_state_dict(stored["optimizer"])
        scheduler.load_state_dict(stored["scheduler"])
        start_epoch, losses = stored["epoch"], list(stored["epoch_losses"])
        history = list(stored.get("validation_history") or [])
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
    source = BatchSource(features, train_set, backbone, device, cfg.train.num_workers)
    new_losses: List[float] = []
    epochs = tqdm(range(start_epoch, total_epochs), desc="training", unit="epoch",
                  initial=start_epoch, total=total_epochs, disable=not show)
    trained, trained_stage = None, object()
    validation = None  # the validation summary of the latest epoch (rank 0)
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
        loss = run_epoch(trained, source, epoch_batches(sampler, epoch, per_process_batch), optimizer,
                         cfg.train, device, context, stage, epoch_desc(epoch, total_epochs, stage), progress)
        scheduler.step()
        new_losses.append(loss)
        epochs.set_postfix(loss=f"{loss:.4g}", lr=f"{scheduler.get_last_lr()[-1]:.2g}")
        if validation_set is not None:
            validation = validation_summary(model, *validation_set, cfg, device)
        if validation is not None:
            history.append(validation_statistics(epoch + 1, validation["scores"], validation["threshold"]))
        if context.is_main and epoch + 1 < total_epochs:
            save_checkpoint(checkpoint_path, checkpoint_payload(
                cfg, model, backbone, epoch + 1, optimizer, scheduler, losses + new_losses, None, complete=False,
                class_names=class_names, validation_history=history))
    epochs.close()
    objective.finish()
    # The finished model: validation scores and threshold, then the complete checkpoint (also
    # when a resumed run had nothing left to train but its last checkpoint was not complete).
    if context.is_main and not (stored is not None and stored.get("complete")
                                and start_epoch == total_epochs):
        if validation is None and validation_set is not None:  # a resumed run with no epoch left to train
            validation = validation_summary(model, *validation_set, cfg, device)
        save_checkpoint(checkpoint_path, checkpoint_payload(
            cfg, model, backbone, total_epochs, optimizer, scheduler, losses + new_losses, validation,
            complete=True, class_names=class_names, validation_history=history))
        note = convergence_note(history)
        if note is not None:
            warnings.warn(f"{checkpoint_path}: {note}")
    if context.enabled:
        dist.barrier()  # nobody reads the checkpoint before rank 0 has written it
    return checkpoint_path, new_losses


def list_training_records(cfg: Config) -> List[ImageRecord]:
    """The training listing of cfg.data (dataset, root, classes)."""
    return config_listing(cfg, "train")


def train(cfg: Config, out_dir: Optional[str | os.PathLike] = None, *, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train GRAD as ``cfg`` says and write ``<out_dir>/checkpoint.pt`` (out_dir defaults to
    cfg.output_dir); with data.unified=False one model per class in ``<out_dir>/<class>/``.

    resume: continue from the checkpoint(s) in out_dir (a run whose config differs in more
    than gradad.checkpoint.RESUMABLE_CHANGES is refused). Launched by torchrun with
    WORLD_SIZE > 1 the processes train together (DDP); only rank 0 writes. Returns a
    :class:`TrainResult`.
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
        path, class_losses = _train_one(class_cfg, class_records, run_dir, resume, progress, context, device)
        checkpoints.append(path)
        losses.append(class_losses)
    return TrainResult(checkpoints, losses, planned_epochs(cfg))
