"""Backbone features of datasets: computed once per image and cached (in memory or on disk),
and the anomaly maps a model makes from them in batches.

Owns the cache modes (:data:`CACHE_MODES`) that ``data.cache`` chooses from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .backbones import FeatureExtractor
from .datasets import AnomalyDataset, ImageRecord
from .datasets.image_io import IMAGENET_MEAN, IMAGENET_STD
from .io_utils import atomic_write_bytes

# 'memory': a dict of this process; 'disk': one file per image in data.cache_dir, shared by
# runs and processes; 'none': the backbone runs on every pass.
CACHE_MODES = ("memory", "disk", "none")
# Bump when the key recipe or the stored format changes, so old cache files are not reused.
CACHE_FORMAT_VERSION = 1


class FeatureCache:
    """Cache of per-image feature maps (C, h, w) of a frozen backbone.

    The key hashes the image file (real path, size, mtime in ns), `backbone_key`, the input
    size and the normalisation mean/std, so editing an image or changing the backbone misses.
    backbone_key must name the backbone, its weights and its layers, e.g.
    "tf_efficientnet_b4/imagenet/stages2+3".

    directory=None keeps features in a dict in memory. With a directory, each entry is one
    `<key>.pt` file there (written to a temp file then os.replace'd, so no half-written file
    is ever read) and nothing is held in memory; the cache then outlives the object.
    """

    def __init__(self, backbone_key: str, directory: str | os.PathLike | None = None) -> None:
        if not isinstance(backbone_key, str) or not backbone_key:
            raise ValueError(f"backbone_key must be a non-empty string, got {backbone_key!r}")
        self.backbone_key = backbone_key
        self.directory = os.fspath(directory) if directory is not None else None
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}

    def key(
        self,
        record: ImageRecord,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> str:
        """Hex key of one image's features; raises FileNotFoundError if the image is missing."""
        path = os.path.realpath(record.path)
        stat = os.stat(path)
        parts = [
            CACHE_FORMAT_VERSION, path, stat.st_size, stat.st_mtime_ns, self.backbone_key,
            int(image_size), [float(m) for m in mean], [float(s) for s in std],
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(
        self,
        record: ImageRecord,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> torch.Tensor | None:
        """Cached (C, h, w) features of `record`, or None on a miss."""
        return self._get_by_key(self.key(record, image_size, mean, std))

    def put(
        self,
        record: ImageRecord,
        image_size: int,
        features: torch.Tensor,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        """Store the (C, h, w) features of `record` (a detached CPU copy is kept)."""
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            raise ValueError(f"features must be a (C, h, w) tensor, got {getattr(features, 'shape', type(features))}")
        self._put_by_key(self.key(record, image_size, mean, std), features)

    def features_for(
        self,
        dataset,
        extractor_fn: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        progress: bool = True,
        num_workers: int = 0,
    ) -> torch.Tensor:
        """Features of every image of an AnomalyDataset, as an (N, C, h, w) tensor in dataset order.

        Only the images missing from the cache go through extractor_fn (images (B, 3, S, S)
        on `device` -> features (B, C, h, w)), in batches of batch_size, under no_grad.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        keys = [self.key(r, dataset.image_size, dataset.mean, dataset.std) for r in dataset.records]
        features: list[torch.Tensor | None] = [self._get_by_key(k) for k in keys]
        missing = [i for i, f in enumerate(features) if f is None]
        if missing:
            loader = DataLoader(Subset(dataset, missing), batch_size=batch_size, shuffle=False, num_workers=num_workers)
            with torch.no_grad():
                for batch in tqdm(loader, desc="extracting features", disable=not progress):
                    images = batch["image"].to(device)
                    output = extractor_fn(images)
                    if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[0] != len(images):
                        raise ValueError(
                            f"extractor_fn must return a (B, C, h, w) tensor with B = {len(images)}, "
                            f"got {getattr(output, 'shape', type(output))}"
                        )
                    output = output.detach().cpu()
                    for row, index in enumerate(batch["index"].tolist()):
                        features[index] = self._put_by_key(keys[index], output[row])
        shapes = {tuple(f.shape) for f in features}
        if len(shapes) != 1:
            raise ValueError(f"cached features have different shapes {sorted(shapes)}; backbone_key may be reused")
        return torch.stack(features)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.pt")

    def _get_by_key(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return self._memory.get(key)
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache file is recomputed, not trusted
            warnings.warn(f"ignoring unreadable feature cache file {path} (it will be recomputed): {exc}")
            return None

    def _put_by_key(self, key: str, features: torch.Tensor) -> torch.Tensor:
        # clone: a row of a batch shares the batch's storage, which torch.save would write whole.
        features = features.detach().to("cpu").clone()
        if self.directory is None:
            self._memory[key] = features
            return features
        buffer = io.BytesIO()
        torch.save(features, buffer)
        atomic_write_bytes(self._path(key), buffer.getvalue())
        return features


def cache_key(backbone: FeatureExtractor) -> str:
    """The cache key of a backbone's features: its name fixes architecture and stages, its
    weights_id the weights."""
    return f"{backbone.name}|{backbone.weights_id}"


def feature_cache(mode: str, backbone: FeatureExtractor,
                  directory: Optional[str | os.PathLike] = None) -> Optional[FeatureCache]:
    """The FeatureCache of ``mode`` (one of :data:`CACHE_MODES`; 'disk' keeps its files in
    ``directory``), or None for 'none' (features are computed on every pass)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {list(CACHE_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "disk" and directory is None:
        raise ValueError("cache mode 'disk' needs a directory for the feature files")
    return FeatureCache(cache_key(backbone), directory if mode == "disk" else None)


def extract_features(backbone: FeatureExtractor, dataset: AnomalyDataset, device: torch.device,
                     batch_size: int, cache: Optional[FeatureCache], progress: bool,
                     num_workers: int = 0) -> torch.Tensor:
    """Backbone features of every image of ``dataset``, (N, C, S/8, S/8) float32 on the CPU,
    in dataset order; through ``cache`` when given (else a cache of this call only)."""
    def run_backbone(images: torch.Tensor) -> torch.Tensor:
        return backbone(images.to(device))

    cache = cache if cache is not None else FeatureCache(cache_key(backbone))
    return cache.features_for(dataset, run_backbone, batch_size=batch_size, device=device,
                              progress=progress, num_workers=num_workers)


@torch.no_grad()
def score_features(model: torch.nn.Module, features: torch.Tensor, image_size: int, device: torch.device,
                   batch_size: int, progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Anomaly maps of a GRAD model (``model.anomaly_map``) on features in batches, eval mode:
    (N, C, h, w) → (N, S, S) float32 on the CPU, S = ``image_size``."""
    model.eval()
    maps = []
    for start in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = features[start:start + batch_size].to(device)
        maps.append(model.anomaly_map(chunk, image_size).float().cpu())
    return torch.cat(maps) if maps else torch.zeros(0, image_size, image_size)
