"""The epoch loop every training shares: the loss of a batch as a module, the optimiser, one
pass over the batches, and training in memory on cached features (no files)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from ..backbones import FeatureExtractor
from ..config import TrainConfig
from ..datasets import AnomalyDataset
from ..models.bigrid import BiGridGRAD, bigrid_stage_loss, set_bigrid_stage, stage_plan
from ..models.fbp import FeatureBlockPaster, fbp_settings
from ..models.grad import GRAD
from ..runtime import DistributedContext


class TrainingObjective(torch.nn.Module):
    """The loss of one batch as a module (so DistributedDataParallel can wrap it):
    ``objective(features (B, C, h, w), stage) -> loss``. Stage None is the model's own loss
    (GRAD's); 'abnormal' / 'normal' are the Bi-Grid stages (:func:`gradad.models.bigrid.bigrid_stage_loss`,
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


class BatchSource:
    """Feature batches for a list of sample indices: slices of cached features, or the backbone
    run on the images (data.cache='none')."""

    def __init__(self, features: Optional[torch.Tensor], dataset: Optional[AnomalyDataset],
                 backbone: Optional[FeatureExtractor], device: torch.device, num_workers: int):
        self.features, self.dataset, self.backbone = features, dataset, backbone
        self.device, self.num_workers = device, num_workers

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


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int) -> List[List[int]]:
    """This process's batches of ``epoch``: the order depends on (seed, epoch) only."""
    sampler.set_epoch(epoch)
    order = list(iter(sampler))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_desc(epoch: int, total: int, stage: Optional[str]) -> str:
    """The progress-bar title of an epoch."""
    return f"epoch {epoch + 1}/{total}" + (f" ({stage})" if stage else "")


def run_epoch(objective: torch.nn.Module, source: BatchSource, batches: List[List[int]],
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
    (see :func:`gradad.models.factory.epoch_stages`), with the same objective, optimiser and
    epoch loop as :func:`gradad.engine.train` but no files. Batches are shuffled by a generator
    seeded with train_cfg.seed. max_seconds: stop after the first epoch that ends past this
    wall-clock budget (None: all). Leaves every parameter trainable and the model in eval mode.
    Returns {'stage': [...], 'loss': [mean loss per epoch], 'seconds': [end time of each epoch
    since the start]}."""
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
    source = BatchSource(features, None, None, device, 0)
    history: Dict[str, List] = {"stage": [], "loss": [], "seconds": []}
    start = time.perf_counter()
    try:
        for epoch in tqdm(range(len(stages)), desc="training", unit="epoch", disable=not progress):
            stage = stages[epoch]
            objective.start_epoch(epoch, stage)
            order = torch.randperm(features.shape[0], generator=shuffle)
            batches = [chunk.tolist() for chunk in order.split(train_cfg.batch_size)]
            loss = run_epoch(objective, source, batches, optimizer, train_cfg, device, DistributedContext(),
                             stage, epoch_desc(epoch, len(stages), stage), progress)
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


def train_bigrid(model: BiGridGRAD, features: torch.Tensor, train_cfg: TrainConfig,
                 device: Optional[torch.device] = None, progress: bool = True,
                 max_seconds: Optional[float] = None) -> Dict[str, List]:
    """Two-stage training of ``model`` on cached normal features (N, C, H, W), following
    :func:`gradad.models.bigrid.stage_plan` of ``model.bigrid``: :func:`train_on_features` (the
    epoch loop of ``gradad train``) with that plan. A model without the abnormal branch accepts
    a plan of 'normal' epochs only (abnormal_epochs = 0): that is plain GRAD training.
    max_seconds: stop after the first epoch that ends past this wall-clock budget (None: the
    whole plan). During a stage the grids it freezes have requires_grad False, so they get no
    gradient and AdamW leaves them as they are. Leaves every parameter trainable and the model
    in eval mode. Returns train_on_features's history."""
    if not isinstance(model, BiGridGRAD):
        raise TypeError(f"model must be a BiGridGRAD, got {type(model).__name__}")
    plan = stage_plan(model.bigrid)
    if not model.has_abnormal_branch and "abnormal" in plan:
        raise ValueError("the plan has abnormal-stage epochs but the model has no abnormal branch "
                         "(bigrid.abnormal_branch=False); set bigrid.abnormal_epochs=0 to train it as GRAD")
    return train_on_features(model, features, train_cfg, plan, device, progress, max_seconds)
