"""FeatureCache: backbone features computed once per image, kept in memory or on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .image_io import IMAGENET_MEAN, IMAGENET_STD
from .records import ImageRecord

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
        handle, temp_path = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        os.close(handle)
        try:
            torch.save(features, temp_path)
            os.replace(temp_path, self._path(key))
        except BaseException:
            os.unlink(temp_path)
            raise
        return features
