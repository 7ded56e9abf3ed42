"""Fusion networks of GRAD (docs/method.md §2): F in ``x̂ = conv1x1_{2C→C}(F(concat[f_g, f_l]))``.

All of them keep the channel count (2C) and the spatial size:
- 'crad' (reference code): MobileNetV3 bottlenecks with expansion width 2·(2C) = 4C;
- 'crad-s': the same bottlenecks with expansion width C;
- 'paper': ResNet basic blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

# Expansion width of a bottleneck as a multiple of the feature channels C (the fusion width is 2C).
EXPANSION_OF_C = {"crad": 4, "crad-s": 1}
FUSIONS = (*EXPANSION_OF_C, "paper")
# Blocks when model.num_blocks is None: 11 MobileNetV3 bottlenecks in the reference code, 7
# ResNet basic blocks in the paper.
DEFAULT_NUM_BLOCKS = {"crad": 11, "crad-s": 11, "paper": 7}
# Squeeze-excitation squeezes the expansion width by this factor.
SE_REDUCTION = 4


class SqueezeExcite(nn.Module):
    """Channel gating of MobileNetV3: x · h-sigmoid(W₂ ReLU(W₁ GAP(x))), no biases.
    (B, E, H, W) -> (B, E, H, W)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.squeeze = nn.Linear(channels, reduced, bias=False)
        self.excite = nn.Linear(reduced, channels, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        weights = self.gate(self.excite(self.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * weights[:, :, None, None]


class MobileBottleneck(nn.Module):
    """MobileNetV3 bottleneck with a residual add, (B, channels, H, W) -> same shape:
    1×1 conv to ``expansion``, BN, h-swish; depthwise 3×3, BN, squeeze-excitation, h-swish;
    1×1 conv back to ``channels``, BN. Convolutions have no bias (BN follows each)."""

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        reduced = expansion // SE_REDUCTION
        if reduced < 1:
            raise ValueError(f"bottleneck expansion width {expansion} is too small for squeeze-excitation "
                             f"(needs >= {SE_REDUCTION})")
        self.expand = nn.Sequential(
            nn.Conv2d(channels, expansion, 1, bias=False), nn.BatchNorm2d(expansion), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(expansion, expansion, 3, padding=1, groups=expansion, bias=False), nn.BatchNorm2d(expansion),
            SqueezeExcite(expansion, reduced), nn.Hardswish())
        self.project = nn.Sequential(nn.Conv2d(expansion, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class BasicBlock(nn.Module):
    """ResNet basic block at constant width, (B, channels, H, W) -> same shape:
    ReLU(x + BN(conv3×3(ReLU(BN(conv3×3(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.body(x))


def build_fusion(kind: str, feature_channels: int, num_blocks: int) -> nn.Sequential:
    """The fusion network F of variant ``kind`` ('crad', 'crad-s' or 'paper') for features of
    ``feature_channels`` = C channels: ``num_blocks`` blocks at 2C channels,
    (B, 2C, H, W) -> (B, 2C, H, W). Zero blocks give the identity."""
    width = 2 * feature_channels
    if kind in EXPANSION_OF_C:
        blocks = [MobileBottleneck(width, EXPANSION_OF_C[kind] * feature_channels) for _ in range(num_blocks)]
    elif kind == "paper":
        blocks = [BasicBlock(width) for _ in range(num_blocks)]
    else:
        raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {kind!r}")
    return nn.Sequential(*blocks)
