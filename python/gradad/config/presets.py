"""Named starting configs (``--preset``)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from .sections import BiGridConfig, Config, ModelConfig, TrainConfig


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
