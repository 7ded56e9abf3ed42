"""The GRAD model (docs/method.md §2) on backbone features.

The frozen backbone stays outside the model so that its features can be cached: GRAD maps
features x (B, C, H, W) to a reconstruction x̂ from two learnable grids,

- local: one coordinate per pixel, v_l = tanh(conv1x1(tanh(conv1x1(x)))) in [-1, 1]^{d_l},
  f_l = G_l sampled at v_l, G_l of shape (C, R_l, ..., R_l);
- global: one coordinate per image, v_g = tanh(Linear(tanh(Linear(GAP(x))))) in [-1, 1]^{d_g},
  f_g = G_g sampled at v_g reshaped to (C, H, W), G_g of shape (C·H·W, R_g, ..., R_g);

then x̂ = conv1x1_{2C→C}(F(concat[f_g, f_l])) with the fusion network F of :mod:`gradad.models.fusion`,
and the refinement, loss and anomaly map of ``grad_ext.refine``.

``cfg.kernels`` picks the implementation of the two ops once, at construction: the grad_ext
kernels ('ext') or grad_ext.reference ('reference': pure torch, the reference code's
formulation), which take the same arguments, draw the same jitter for the same torch seed and
return the same types.

Ablations (use_local=False or use_global=False): the remaining branch is fed to the fusion
network twice, concat[f, f], so the fusion network and its size stay those of the full model
and only the representation changes; the missing grid and its coordinate network are not built.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import grad_ext

from ..config import ModelConfig
from .fusion import build_fusion

INIT_STD = 0.01     # std of every conv/linear weight at initialisation (reference code)
# anomaly_map's bilinear upsampling to the image side keeps the corner pixels aligned (reference
# code); gradad.export composes the same resize into its post-processing matrices
MAP_ALIGN_CORNERS = True


class GRADOutput(NamedTuple):
    """rec: x̂ (B, C, H, W). loss: scalar training loss. anomaly_map: (B, H, W) at feature
    resolution. sim: refinement similarity (B, H, W), None when refinement is off."""

    rec: Tensor
    loss: Tensor
    anomaly_map: Tensor
    sim: Optional[Tensor]


def _sampling_grid(coords: Tensor) -> Tensor:
    """Coordinates (B, *points, d) as a grid_sample grid for a d-D table, (B, *out, d) with
    len(out) == d: the point axes padded with trailing 1s, or flattened when they are more than d
    (d = 1: (B, H, W, 1) -> (B, H·W, 1); d = 2 keeps (B, H, W, 2) as the reference code)."""
    b, d = coords.shape[0], coords.shape[-1]
    points = tuple(coords.shape[1:-1])
    if len(points) > d:
        points = (math.prod(points),)
    return coords.reshape(b, *points, *([1] * (d - len(points))), d)


class LocalCoordinates(nn.Module):
    """Per-pixel coordinates: (B, C, H, W) -> tanh(conv1x1_{C→d}(tanh(conv1x1_{C→C}(x)))) as
    (B, H, W, d), the layout grid_sample reads."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.hidden = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.out(torch.tanh(self.hidden(x)))).permute(0, 2, 3, 1)


class GlobalCoordinates(nn.Module):
    """Per-image coordinates: (B, C, H, W) -> tanh(Linear_{C→d}(tanh(Linear_{C→C}(GAP(x))))), (B, d)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.hidden = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.out(torch.tanh(self.hidden(x.mean(dim=(2, 3))))))


class GRAD(nn.Module):
    """GRAD on backbone features of ``in_channels`` = C channels and size ``feature_size`` ×
    ``feature_size`` (the global grid stores whole C×H×W maps, so H = W is fixed at build time).

    forward(features (B, C, H, W)) -> :class:`GRADOutput`. Jitter is applied in training mode
    only. ``cfg.kernels`` picks the grad_ext kernels ('ext') or the reference code's pure-torch
    formulation ('reference') as ``self.ops``; both give the same results for the same weights
    and torch seed.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, feature_size: int):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        for name, value in (("in_channels", in_channels), ("feature_size", feature_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.feature_size = feature_size
        c = in_channels
        if cfg.use_local:
            self.local_coordinates = LocalCoordinates(c, cfg.local_grid_dim)
            self.local_grid = nn.Parameter(torch.empty(c, *[cfg.local_grid_res] * cfg.local_grid_dim))
        if cfg.use_global:
            self.global_coordinates = GlobalCoordinates(c, cfg.global_grid_dim)
            self.global_grid = nn.Parameter(
                torch.empty(c * feature_size * feature_size, *[cfg.global_grid_res] * cfg.global_grid_dim))
        self.fusion = build_fusion(cfg.fusion, c, cfg.blocks)
        self.output = nn.Conv2d(2 * c, c, 1, bias=False)
        self.reset_parameters()

    @property
    def ops(self):
        """The op implementation ``cfg.kernels`` names (grad_ext or grad_ext.reference): the one
        place the model chooses; a property rather than an attribute so the model stays
        copyable and picklable."""
        return grad_ext.implementation(self.cfg.kernels)

    # ---- parameters ----------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Reference-code initialisation: conv/linear weights N(0, 0.01²) and zero biases,
        BatchNorm weight 1 and bias 0, grids Xavier-normal."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for grid in self.grids():
            nn.init.xavier_normal_(grid)

    def grids(self) -> List[nn.Parameter]:
        """The grid parameters that exist (local first, then global)."""
        return [p for name in ("local_grid", "global_grid") if (p := getattr(self, name, None)) is not None]

    def param_groups(self, lr_grid: float, lr: float) -> List[Dict]:
        """Optimizer parameter groups: the trainable grids at ``lr_grid``, every other trainable
        parameter at ``lr``. Each group carries a 'name' ('grids' / 'networks')."""
        grid_ids = {id(p) for p in self.grids()}
        grids = [p for p in self.grids() if p.requires_grad]
        networks = [p for p in self.parameters() if p.requires_grad and id(p) not in grid_ids]
        return [{"name": "grids", "params": grids, "lr": lr_grid},
                {"name": "networks", "params": networks, "lr": lr}]

    def parameter_breakdown(self) -> Dict[str, int]:
        """Parameter counts per part: 'local_grid', 'global_grid', 'coordinates' (both
        coordinate networks), 'fusion' (F and the output conv), and 'total'."""
        def count(params) -> int:
            return sum(p.numel() for p in params)

        parts = {
            "local_grid": count([self.local_grid] if self.cfg.use_local else []),
            "global_grid": count([self.global_grid] if self.cfg.use_global else []),
            "coordinates": sum(count(getattr(self, n).parameters())
                               for n in ("local_coordinates", "global_coordinates") if hasattr(self, n)),
            "fusion": count(self.fusion.parameters()) + count(self.output.parameters()),
        }
        parts["total"] = sum(parts.values())
        return parts

    def count_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with requires_grad when ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def count_flops(self, batch_size: int = 1) -> int:
        """FLOPs of one reconstruction at ``batch_size`` as torch.utils.flop_counter counts them
        (2 per multiply-add of convolutions and matrix products; grid sampling, refinement and
        element-wise ops, which it does not count, are left out). The backbone is not part of
        this model."""
        param = next(self.parameters())
        features = torch.zeros(batch_size, self.in_channels, self.feature_size, self.feature_size,
                               device=param.device, dtype=param.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.reconstruct(features)
        finally:
            self.train(was_training)
        return int(counter.get_total_flops())

    # ---- sampling ------------------------------------------------------------------------

    def local_features(self, features: Tensor) -> Tensor:
        """f_l: the local grid sampled at each pixel's coordinate, (B, C, H, W) -> (B, C, H, W);
        coordinates jittered in training mode."""
        self._check_features(features)
        cfg, grid = self.cfg, self.local_grid
        coords = self.local_coordinates(features).to(grid.dtype)  # (B, H, W, d)
        b, h, w, _ = coords.shape
        jitter = self.training and cfg.jitter_std > 0 and cfg.jitter_prob > 0
        sampled = self.ops.grid_sample(grid[None], _sampling_grid(coords), "bilinear", "zeros", False,
                                       jitter_std=cfg.jitter_std if jitter else 0.0,
                                       jitter_prob=cfg.jitter_prob if jitter else 0.0, jitter_mode=cfg.jitter_mode)
        return sampled.reshape(b, grid.shape[0], h, w)

    def global_features(self, features: Tensor) -> Tensor:
        """f_g: the global grid sampled at each image's coordinate, (B, C, H, W) -> (B, C, H, W).
        One shared table, one point per image: (B, C·H·W, 1, ...) is already the output's layout."""
        self._check_features(features)
        grid = self.global_grid
        coords = self.global_coordinates(features).to(grid.dtype)  # (B, d)
        sampled = self.ops.grid_sample(grid[None], _sampling_grid(coords[:, None]), "bilinear", "zeros", False)
        return sampled.reshape(coords.shape[0], self.in_channels, *features.shape[2:])

    # ---- forward -------------------------------------------------------------------------

    def _check_features(self, features: Tensor) -> None:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a tensor, got {type(features).__name__}")
        expected = (self.in_channels, self.feature_size, self.feature_size)
        if features.dim() != 4 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"features must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"features must be floating point, got {features.dtype}")

    def reconstruct(self, features: Tensor) -> Tensor:
        """x̂ = conv1x1(F(concat[f_g, f_l])), (B, C, H, W) -> (B, C, H, W)."""
        branches = []
        if self.cfg.use_global:
            branches.append(self.global_features(features))
        if self.cfg.use_local:
            branches.append(self.local_features(features))
        if len(branches) == 1:
            branches = branches * 2  # ablation: one branch fills both halves of the fusion input
        fused = torch.cat([b.to(features.dtype) for b in branches], dim=1)
        return self.output(self.fusion(fused))

    def forward(self, features: Tensor) -> GRADOutput:
        """features (B, C, H, W) -> GRADOutput(rec, loss, anomaly_map (B, H, W), sim (B, H, W)).

        With refinement (cfg.refine) the loss is mean (x̃ − x)² of the refined x̃ and the map
        ‖x − x̃‖₂ over channels (grad_ext.refine); without it, mean (x̂ − x)² and ‖x − x̂‖₂."""
        rec = self.reconstruct(features)
        rec_for_loss = rec.to(features.dtype)
        cfg = self.cfg
        if not cfg.refine:
            loss = F.mse_loss(rec_for_loss, features)
            anomaly_map = torch.linalg.vector_norm(features - rec_for_loss, dim=1)
            return GRADOutput(rec, loss, anomaly_map, None)
        refined = self.ops.refine(rec_for_loss, features, mse_weight=cfg.mse_weight, cos_weight=cfg.cos_weight,
                                  mse_threshold=cfg.mse_threshold)
        return GRADOutput(rec, refined.loss, refined.anomaly_map, refined.sim)

    @torch.no_grad()
    def anomaly_map(self, features: Tensor, image_size: int) -> Tensor:
        """Anomaly maps at image resolution: the forward's map upsampled to ``image_size`` ×
        ``image_size`` (bilinear, align_corners=True, as the reference code), (B, S, S).
        Runs without gradients; call it in eval mode for test-time maps."""
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        maps = self(features).anomaly_map
        return F.interpolate(maps[:, None], size=(image_size, image_size), mode="bilinear",
                             align_corners=MAP_ALIGN_CORNERS)[:, 0]
