"""Feature Block Paste (FBP, docs/method.md §3): synthetic anomalies in feature space for the abnormal grid.

A blob is the set of cells visited by a random walk on a (2b+1) × (2b+1) canvas started at its
centre, with half-size b = int(U(half_size_range)). The canvas is placed at a centre drawn in
[b, H − b − 1] × [b, W − b − 1]; the blob carries the value I ~ U(intensity_range) on its cells,
is blurred with a 3×3 Gaussian kernel (zero padding outside the map) and added to the features.
Its mask is the visited cells (before blurring).

Presets (:data:`FBP_PRESETS`): 'reference' (the reference code: 100-step 4-neighbour walk, one
blob per batch broadcast to all images and channels) and 'paper' (walk length N ~ U{b, …, 2b},
8-neighbour steps). All randomness comes from a caller-owned CPU ``torch.Generator``, so a
seed reproduces the blobs exactly (:class:`FeatureBlockPaster` owns one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

# 3×3 Gaussian blur: the outer product of the binomial [1, 2, 1] / 4 (OpenCV's 3×3 kernel for σ = 0).
_BINOMIAL = (0.25, 0.5, 0.25)
# Walk steps (row, column) for the two neighbourhoods.
_STEPS: Dict[int, Tuple[Tuple[int, int], ...]] = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)),
}


@dataclass(frozen=True)
class FBPSettings:
    """How blobs are drawn.

    walk_length: steps of the random walk; None draws N uniformly from {b, …, 2b} (paper).
    neighbourhood: 4 or 8 (steps to edge or edge-and-corner neighbours; a step that would leave
    the canvas stays in place). half_size_range: (low, high), b = int(U(low, high)); b is capped
    at (min(H, W) − 1) // 2 so the canvas fits the map. intensity_range: (low, high), I ~ U(low,
    high). blur: 3×3 Gaussian blur of the blob. per_image: one blob draw per image instead of
    one per batch broadcast to every image. num_blobs: blobs per draw (summed; masks united).
    """

    walk_length: Optional[int] = 100
    neighbourhood: int = 4
    half_size_range: Tuple[float, float] = (0.5, 10.0)
    intensity_range: Tuple[float, float] = (8.0, 16.0)
    blur: bool = True
    per_image: bool = False
    num_blobs: int = 1

    def __post_init__(self) -> None:
        if self.walk_length is not None and (not isinstance(self.walk_length, int) or self.walk_length < 0):
            raise ValueError(f"walk_length must be None or an int >= 0, got {self.walk_length!r}")
        if self.neighbourhood not in _STEPS:
            raise ValueError(f"neighbourhood must be 4 or 8, got {self.neighbourhood!r}")
        low, high = self.half_size_range
        if not 0 <= low <= high:
            raise ValueError(f"half_size_range must be (low, high) with 0 <= low <= high, got {self.half_size_range!r}")
        low, high = self.intensity_range
        if not low <= high:
            raise ValueError(f"intensity_range must be (low, high) with low <= high, got {self.intensity_range!r}")
        if not isinstance(self.num_blobs, int) or self.num_blobs < 1:
            raise ValueError(f"num_blobs must be an int >= 1, got {self.num_blobs!r}")


FBP_PRESETS: Dict[str, FBPSettings] = {
    "reference": FBPSettings(),
    "paper": FBPSettings(walk_length=None, neighbourhood=8),
}


def fbp_settings(preset: str, **changes) -> FBPSettings:
    """The settings of ``preset`` (a key of :data:`FBP_PRESETS`) with ``changes`` applied."""
    if preset not in FBP_PRESETS:
        raise ValueError(f"unknown FBP preset {preset!r}; presets: {list(FBP_PRESETS)}")
    return dataclasses.replace(FBP_PRESETS[preset], **changes)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def random_walk_blob(settings: FBPSettings, height: int, width: int, generator: torch.Generator) -> Tensor:
    """One blob mask, (height, width) bool: the cells of a random walk on a (2b+1)² canvas
    placed inside the map (see the module docstring)."""
    b = int(_uniform(generator, *settings.half_size_range))
    b = min(b, (min(height, width) - 1) // 2)
    side = 2 * b + 1
    if settings.walk_length is None:
        length = int(torch.randint(b, 2 * b + 1, (), generator=generator))
    else:
        length = settings.walk_length
    steps = _STEPS[settings.neighbourhood]
    choices = torch.randint(0, len(steps), (length,), generator=generator).tolist()
    row = col = b
    canvas = torch.zeros(side, side, dtype=torch.bool)
    canvas[row, col] = True
    for choice in choices:
        d_row, d_col = steps[choice]
        # a step off the canvas stays put in that axis, so the path stays connected
        row = min(max(row + d_row, 0), side - 1)
        col = min(max(col + d_col, 0), side - 1)
        canvas[row, col] = True
    top = int(torch.randint(b, height - b, (), generator=generator)) - b
    left = int(torch.randint(b, width - b, (), generator=generator)) - b
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:top + side, left:left + side] = canvas
    return mask


def _blur(blob: Tensor) -> Tensor:
    """3×3 Gaussian blur with zero padding, (N, H, W) -> (N, H, W)."""
    row = torch.tensor(_BINOMIAL, dtype=blob.dtype, device=blob.device)
    kernel = (row[:, None] * row[None, :])[None, None]
    return torch.nn.functional.conv2d(blob[:, None], kernel, padding=1)[:, 0]


def feature_block_paste(features: Tensor, settings: FBPSettings,
                        generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Pastes random-walk blobs onto ``features`` (B, C, H, W).

    Returns (pasted (B, C, H, W), same dtype/device, = features + blurred blobs on every
    channel; mask (B, H, W) bool, the blob cells). ``generator`` is a CPU torch.Generator; all
    draws come from it, so the same seed gives the same blobs."""
    if not isinstance(features, Tensor) or features.dim() != 4 or not features.is_floating_point():
        raise ValueError("features must be a floating-point tensor of shape (B, C, H, W), got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(settings, FBPSettings):
        raise TypeError(f"settings must be an FBPSettings, got {type(settings).__name__}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("generator must be a CPU torch.Generator")
    batch, _, height, width = features.shape
    draws = batch if settings.per_image else 1
    masks = torch.zeros(draws, height, width, dtype=torch.bool)
    blobs = torch.zeros(draws, height, width, dtype=torch.float32)
    for draw in range(draws):
        for _ in range(settings.num_blobs):
            cells = random_walk_blob(settings, height, width, generator)
            intensity = _uniform(generator, *settings.intensity_range)
            single = cells.to(torch.float32) * intensity
            blobs[draw] += _blur(single[None])[0] if settings.blur else single
            masks[draw] |= cells
    blobs = blobs.to(device=features.device, dtype=features.dtype).expand(batch, height, width)
    masks = masks.to(features.device).expand(batch, height, width).clone()
    return features + blobs[:, None], masks


class FeatureBlockPaster:
    """FBP with its own seeded generator: ``paster(features) -> (pasted, mask)`` as
    :func:`feature_block_paste`. ``paster.seed(s)`` restarts the sequence."""

    def __init__(self, settings: FBPSettings, seed: int = 0):
        if not isinstance(settings, FBPSettings):
            raise TypeError(f"settings must be an FBPSettings, got {type(settings).__name__}")
        self.settings = settings
        self.generator = torch.Generator(device="cpu")
        self.seed(seed)

    def seed(self, seed: int) -> None:
        """Restart the random sequence from ``seed`` (an int)."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.generator.manual_seed(seed)

    def __call__(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        return feature_block_paste(features, self.settings, self.generator)
