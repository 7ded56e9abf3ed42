"""Benchmark of the whole GRAD detector with the grad_ext kernels against the reference code's
pure-torch formulation (``ModelConfig.kernels = 'ext' | 'reference'``).

Per configuration (:data:`DEFAULT_SPECS`: the paper's EfficientNet-B4 GRAD, with random
backbone weights because only its timing matters here, and the Lite demo with its real
offline EfficientNet-Lite0 weights) and per variant (kernels; on CUDA also bfloat16
autocast and torch.compile):

- inference from cached features: ``model.anomaly_map(features, image_size)`` (eval mode);
- inference from images: backbone, then the same;
- a training step on cached features: forward, backward and an AdamW step;

at the requested batch sizes (inference 1 and 32, training 64), with the median time,
images per second and peak memory. On a CPU a batch whose estimated call time exceeds
:data:`CPU_CALL_CAP_S` is reduced to the largest power of two that fits, and the reduction is
recorded in the row (``requested_batch`` vs ``batch``); the same batch is used for every
variant of a configuration. Parameter counts and FLOPs come from GRAD.count_parameters /
count_flops.

    python benchmarks/bench_detector.py [--device auto|cpu|cuda] [--specs grad lite-demo]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch
from tqdm import tqdm

from gradad.backbones import FeatureExtractor, build_backbone
from gradad.config import TrainConfig, preset_config
from gradad.model import GRAD

from benchmarks.timing import PeakMemory, TimingSettings, default_timing, measure

INFER_FEATURES = "infer (features)"
INFER_IMAGES = "infer (images)"
TRAIN_STEP = "train step (features)"
PHASES = (INFER_FEATURES, INFER_IMAGES, TRAIN_STEP)
# CPU only: longest estimated call (seconds) before a batch is reduced, per phase kind.
CPU_CALL_CAP_S = {"infer": 6.0, "train": 12.0}
# A training step costs about three forward passes (forward, then backward: twice the work).
TRAIN_COST_FACTOR = 3.0
INPUT_COPIES = 2
SEED = 0


@dataclass(frozen=True)
class DetectorSpec:
    """One detector configuration: a gradad preset, the backbone weights to build it with,
    the requested batch sizes and ModelConfig fields to replace (``model_overrides``, e.g.
    smaller shapes for tests)."""

    title: str
    preset: str
    backbone_weights: str
    infer_batches: Tuple[int, ...] = (1, 32)
    train_batch: int = 64
    model_overrides: Tuple[Tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.infer_batches or any(b < 1 for b in self.infer_batches) or self.train_batch < 1:
            raise ValueError(f"spec {self.title!r}: batch sizes must be positive, got {self.infer_batches} "
                             f"and {self.train_batch}")


DEFAULT_SPECS = (
    DetectorSpec("GRAD, EfficientNet-B4 (RANDOM backbone weights: timing only)", "grad", "random"),
    DetectorSpec("Lite demo, EfficientNet-Lite0 (ImageNet weights)", "lite-demo", "imagenet"),
)


@dataclass(frozen=True)
class Variant:
    """How the detector runs: which kernels, float32 or bfloat16 autocast, eager or compiled."""

    kernels: str
    precision: str = "float32"
    compiled: bool = False

    @property
    def label(self) -> str:
        return f"{self.kernels}, {self.precision}{', compiled' if self.compiled else ''}"


def default_variants(device: torch.device) -> Tuple[List[Variant], List[str]]:
    """The variants to run on ``device`` and notes on those skipped."""
    if device.type == "cuda":
        variants = [Variant(k, p, c) for p in ("float32", "bf16-autocast") for c in (False, True)
                    for k in ("ext", "reference")]
        return variants, []
    return [Variant("ext"), Variant("reference")], [
        "bfloat16 autocast and torch.compile variants are run on CUDA only; skipped on CPU "
        "(no bfloat16 grid_sample kernels on CPU, and compiling takes minutes on a small CPU)."]


# ---- building ------------------------------------------------------------------------------

def build_detector(spec: DetectorSpec, kernels: str, device: torch.device) -> Tuple[FeatureExtractor, GRAD, object]:
    """The backbone and a GRAD (seeded: the same weights for every variant) for ``spec``,
    with ``kernels``; returns (backbone, model, config)."""
    cfg = preset_config(spec.preset)
    overrides = dict(spec.model_overrides)
    model_cfg = dataclasses.replace(cfg.model, backbone_weights=spec.backbone_weights, kernels=kernels, **overrides)
    backbone = build_backbone(model_cfg.backbone, model_cfg.backbone_weights).to(device)
    if model_cfg.input_size % backbone.stride:
        raise ValueError(f"spec {spec.title!r}: input_size {model_cfg.input_size} is not a multiple of the "
                         f"backbone stride {backbone.stride}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GRAD(model_cfg, backbone.out_channels, model_cfg.input_size // backbone.stride).to(device)
    return backbone, model, dataclasses.replace(cfg, model=model_cfg)


def model_size(spec: DetectorSpec, device: torch.device) -> Dict[str, object]:
    """Parameters (model total, trainable, per part; backbone) and FLOPs of one reconstruction
    at batch 1 (GRAD.count_flops: convolutions and matrix products, sampling left out)."""
    backbone, model, cfg = build_detector(spec, "ext", device)
    return {
        "parameters": model.count_parameters(),
        "trainable_parameters": model.count_parameters(trainable_only=True),
        "parameter_breakdown": model.parameter_breakdown(),
        "backbone_parameters": sum(p.numel() for p in backbone.parameters()),
        "flops_per_image": model.count_flops(batch_size=1),
        "feature_shape": [backbone.out_channels, model.feature_size, model.feature_size],
        "input_size": cfg.model.input_size,
        "backbone": cfg.model.backbone,
        "backbone_weights": cfg.model.backbone_weights,
        "fusion": cfg.model.fusion,
        "fusion_blocks": cfg.model.blocks,
    }


# ---- steps ---------------------------------------------------------------------------------

def _autocast(device: torch.device, variant: Variant):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.precision == "bf16-autocast")


def _infer_step(backbone, model, inputs: List[torch.Tensor], image_size: int, from_images: bool,
                device: torch.device, variant: Variant) -> Callable[[int], object]:
    def step(i: int):
        x = inputs[i % len(inputs)]
        with torch.no_grad(), _autocast(device, variant):
            features = backbone(x) if from_images else x
            return model.anomaly_map(features, image_size)
    return step


def _train_step(model: GRAD, train_cfg: TrainConfig, inputs: List[torch.Tensor], device: torch.device,
                variant: Variant) -> Callable[[int], object]:
    optimizer = torch.optim.AdamW(model.param_groups(train_cfg.lr_grid, train_cfg.lr),
                                  weight_decay=train_cfg.weight_decay)

    def step(i: int):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, variant):
            loss = model(inputs[i % len(inputs)]).loss
        loss.backward()
        optimizer.step()
    return step


def _inputs(shape: Tuple[int, ...], device: torch.device) -> List[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(SEED)
    return [torch.randn(shape, generator=gen, device=device) for _ in range(INPUT_COPIES)]


def cpu_batch(requested: int, seconds_per_image: float, cap_s: float) -> int:
    """The largest power of two <= ``requested`` whose estimated call time
    (``seconds_per_image`` * batch) is within ``cap_s``; ``requested`` if it fits; at least 1."""
    if seconds_per_image * requested <= cap_s:
        return requested
    fitting = max(1, int(cap_s / seconds_per_image)) if seconds_per_image > 0 else requested
    return min(requested, 2 ** int(math.log2(fitting)))


class _Runner:
    """Measures every (phase, batch) of one spec for every variant, sharing batch reductions."""

    def __init__(self, spec: DetectorSpec, device: torch.device, settings: TimingSettings, variants: List[Variant]):
        self.spec, self.device, self.settings, self.variants = spec, device, settings, variants
        self.detectors: Dict[Variant, Tuple] = {}

    def detector(self, variant: Variant):
        if variant not in self.detectors:
            backbone, model, cfg = build_detector(self.spec, variant.kernels, self.device)
            if variant.compiled:
                backbone.compile()
                model.compile()
            self.detectors[variant] = (backbone, model, cfg)
        return self.detectors[variant]

    def measure(self, variant: Variant, phase: str, requested: int, batch: int) -> Dict[str, object]:
        backbone, model, cfg = self.detector(variant)
        size, c, s = cfg.model.input_size, backbone.out_channels, model.feature_size
        if phase == TRAIN_STEP:
            model.train()
            step = _train_step(model, cfg.train, _inputs((batch, c, s, s), self.device), self.device, variant)
        else:
            model.eval()
            shape = (batch, 3, size, size) if phase == INFER_IMAGES else (batch, c, s, s)
            step = _infer_step(backbone, model, _inputs(shape, self.device), size, phase == INFER_IMAGES,
                               self.device, variant)
        with PeakMemory(self.device) as memory:
            timing = measure(step, self.device, self.settings)
        model.eval()
        return {
            "spec": self.spec.title, "preset": self.spec.preset, "kernels": variant.kernels,
            "precision": variant.precision, "compiled": variant.compiled, "variant": variant.label,
            "phase": phase, "requested_batch": requested, "batch": batch,
            "ms": timing.median_s * 1e3, "min_ms": timing.min_s * 1e3, "reps": timing.reps,
            "images_per_s": batch / timing.median_s,
            "peak_mb": memory.peak_bytes / 2**20, "peak_increase_mb": memory.increase_bytes / 2**20,
            "memory_method": memory.method,
        }


def run_spec(spec: DetectorSpec, device: torch.device, settings: Optional[TimingSettings] = None,
             variants: Optional[List[Variant]] = None, progress: bool = True) -> Dict[str, object]:
    """All measurements of one spec: {'spec', 'size', 'rows', 'notes'}."""
    settings = settings or default_timing(device, model=True)
    variants = variants or default_variants(device)[0]
    runner = _Runner(spec, device, settings, variants)
    notes: List[str] = []
    rows: List[Dict[str, object]] = []
    bar = tqdm(desc=spec.preset, disable=not progress, leave=False,
               total=len(variants) * (2 * len(spec.infer_batches) + 1))
    # Batch 1 first for every variant: the CPU batch reductions are estimated from it.
    per_image: Dict[str, float] = {}
    for variant in variants:
        for phase in (INFER_FEATURES, INFER_IMAGES):
            row = runner.measure(variant, phase, 1, 1)
            rows.append(row)
            bar.update()
            if variant == variants[0]:
                per_image[phase] = row["ms"] / 1e3
    plan = {}
    for requested in sorted(set(spec.infer_batches) - {1}):
        plan[("infer", requested)] = requested
    plan[("train", spec.train_batch)] = spec.train_batch
    if device.type == "cpu":
        estimates = {"infer": max(per_image.values()), "train": TRAIN_COST_FACTOR * per_image[INFER_FEATURES]}
        for (kind, requested) in plan:
            batch = cpu_batch(requested, estimates[kind], CPU_CALL_CAP_S[kind])
            plan[(kind, requested)] = batch
            if batch != requested:
                notes.append(f"{spec.preset}: {kind} batch {requested} reduced to {batch} on CPU (estimated "
                             f"{estimates[kind] * requested:.0f} s per call at batch {requested}, cap "
                             f"{CPU_CALL_CAP_S[kind]:.0f} s); the CUDA run uses {requested}.")
    for variant in variants:
        for (kind, requested), batch in plan.items():
            phases = (INFER_FEATURES, INFER_IMAGES) if kind == "infer" else (TRAIN_STEP,)
            for phase in phases:
                rows.append(runner.measure(variant, phase, requested, batch))
                bar.update()
    bar.close()
    return {"spec": spec.title, "preset": spec.preset, "size": model_size(spec, device), "rows": rows,
            "notes": notes}


def speedups(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """ext vs reference for every (spec, precision, compiled, phase, batch) both ran:
    speed-up = reference time / ext time, memory ratio = reference peak / ext peak."""
    index = {(r["spec"], r["precision"], r["compiled"], r["phase"], r["batch"], r["kernels"]): r for r in rows}
    out = []
    for key, ext in index.items():
        if key[-1] != "ext" or (*key[:-1], "reference") not in index:
            continue
        ref = index[(*key[:-1], "reference")]
        out.append({"spec": ext["spec"], "precision": ext["precision"], "compiled": ext["compiled"],
                    "phase": ext["phase"], "batch": ext["batch"], "requested_batch": ext["requested_batch"],
                    "ext_ms": ext["ms"], "reference_ms": ref["ms"], "speedup": ref["ms"] / ext["ms"],
                    "ext_peak_increase_mb": ext["peak_increase_mb"],
                    "reference_peak_increase_mb": ref["peak_increase_mb"]})
    return out


def run(device: torch.device, settings: Optional[TimingSettings] = None,
        specs: Sequence[DetectorSpec] = DEFAULT_SPECS, progress: bool = True) -> Dict[str, object]:
    """Every spec on ``device``: {'specs': [run_spec results], 'speedups': [...], 'notes': [...]}."""
    variants, notes = default_variants(device)
    results = [run_spec(spec, device, settings, variants, progress) for spec in specs]
    rows = [row for result in results for row in result["rows"]]
    notes = notes + [note for result in results for note in result["notes"]]
    return {"specs": results, "speedups": speedups(rows), "notes": notes}


def format_table(result: Dict[str, object]) -> str:
    """A plain-text table of the speed-ups and notes, for the terminal."""
    lines = [f"{'spec':<12}{'variant':<18}{'phase':<24}{'batch':>6}{'ext ms':>11}{'ref ms':>11}{'speed-up':>10}"]
    for r in result["speedups"]:
        variant = r["precision"] + (", compiled" if r["compiled"] else "")
        preset = next(s["preset"] for s in result["specs"] if s["spec"] == r["spec"])
        lines.append(f"{preset:<12}{variant:<18}{r['phase']:<24}{r['batch']:>6}{r['ext_ms']:>11.1f}"
                     f"{r['reference_ms']:>11.1f}{r['speedup']:>9.2f}x")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from benchmarks.device_info import device_name, resolve_device

    parser = argparse.ArgumentParser(description="GRAD detector: grad_ext kernels vs the torch reference")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    parser.add_argument("--specs", nargs="*", default=None, help="presets to run (default: all)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    specs = list(DEFAULT_SPECS)
    if args.specs:
        known = [s.preset for s in specs]
        unknown = sorted(set(args.specs) - set(known))
        if unknown:
            parser.error(f"unknown --specs {unknown}; specs: {known}")
        specs = [s for s in specs if s.preset in args.specs]
    print(f"{device_name(device)} ({torch.get_num_threads()} threads)")
    print(format_table(run(device, specs=specs)))


if __name__ == "__main__":
    main()
