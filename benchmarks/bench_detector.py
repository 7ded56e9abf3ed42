"""Benchmark of the whole GRAD detector with the grad_ext kernels against the reference code's
pure-torch formulation (``ModelConfig.kernels = 'ext' | 'reference'``).

Per configuration (:data:`DEFAULT_SPECS`: the paper's EfficientNet-B4 GRAD, with random
backbone weights because only its timing matters here, and the Lite demo with its real
offline EfficientNet-Lite1 weights) and per variant (kernels; on CUDA also bfloat16
autocast and torch.compile):

- inference from cached features: ``model.anomaly_map(features, image_size)`` (eval mode);
- inference from images: backbone, then the same;
- a training step on cached features: forward, backward and an AdamW step;

at the requested batch sizes (inference 1 and 32, training 64), with the median time,
images per second and peak memory. The ext and reference variants of a measurement are timed
interleaved. On a CPU, batches above a spec's ``cpu_max_batch`` are reduced to it (the paper's
B4 model takes about a second per image on a small CPU), and the reduction is recorded in the
row (``requested_batch`` vs ``batch``) and in the notes. Parameter counts and FLOPs come from
GRAD.count_parameters / count_flops.

    python benchmarks/bench_detector.py [--device auto|cpu|cuda] [--specs grad lite-demo]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import torch
from tqdm import tqdm

from benchmarks.timing import TimingSettings, default_timing, measure_interleaved
from gradad.backbones import FeatureExtractor, build_backbone
from gradad.config import TrainConfig, preset_config
from gradad.models.grad import GRAD

INFER_FEATURES = "infer (features)"
INFER_IMAGES = "infer (images)"
TRAIN_STEP = "train step (features)"
PHASES = (INFER_FEATURES, INFER_IMAGES, TRAIN_STEP)
INPUT_COPIES = 2
SEED = 0


@dataclass(frozen=True)
class DetectorSpec:
    """One detector configuration: a gradad preset, the backbone weights to build it with,
    the requested batch sizes, the largest batch run on a CPU (None: as requested) and
    ModelConfig fields to replace (``model_overrides``, e.g. smaller shapes for tests)."""

    title: str
    preset: str
    backbone_weights: str
    infer_batches: Tuple[int, ...] = (1, 32)
    train_batch: int = 64
    cpu_max_batch: Optional[int] = None
    model_overrides: Tuple[Tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        batches = (*self.infer_batches, self.train_batch, *((self.cpu_max_batch,) if self.cpu_max_batch else ()))
        if not self.infer_batches or any(b < 1 for b in batches) or self.cpu_max_batch == 0:
            raise ValueError(f"spec {self.title!r}: batch sizes must be positive, got {self.infer_batches}, "
                             f"{self.train_batch} and cpu_max_batch {self.cpu_max_batch}")

    def batch_on(self, device: torch.device, requested: int) -> int:
        """The batch actually run for ``requested`` on ``device``."""
        if device.type == "cpu" and self.cpu_max_batch is not None:
            return min(requested, self.cpu_max_batch)
        return requested


DEFAULT_SPECS = (
    DetectorSpec("GRAD, EfficientNet-B4 (RANDOM backbone weights: timing only)", "grad", "random", cpu_max_batch=4),
    DetectorSpec("Lite demo, EfficientNet-Lite1 (ImageNet weights)", "lite-demo", "imagenet"),
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


def _detector_row(spec: DetectorSpec, variant: Variant, phase: str, requested: int, batch: int,
                   timing, memory) -> Dict[str, object]:
    return {
        "spec": spec.title, "preset": spec.preset, "kernels": variant.kernels,
        "precision": variant.precision, "compiled": variant.compiled, "variant": variant.label,
        "phase": phase, "requested_batch": requested, "batch": batch,
        "ms": timing.median_s * 1e3, "min_ms": timing.min_s * 1e3, "reps": timing.reps,
        "images_per_s": batch / timing.median_s,
        "peak_mb": memory.peak_bytes / 2**20, "peak_increase_mb": memory.increase_bytes / 2**20,
        "memory_method": memory.method,
    }


class _Runner:
    """Builds each variant's detector once and measures (phase, batch) for a group of variants
    interleaved."""

    def __init__(self, spec: DetectorSpec, device: torch.device, settings: TimingSettings):
        self.spec, self.device, self.settings = spec, device, settings
        self.detectors: Dict[Variant, Tuple] = {}

    def detector(self, variant: Variant):
        if variant not in self.detectors:
            backbone, model, cfg = build_detector(self.spec, variant.kernels, self.device)
            if variant.compiled:
                backbone.compile()
                model.compile()
            self.detectors[variant] = (backbone, model, cfg)
        return self.detectors[variant]

    def _step(self, variant: Variant, phase: str, batch: int) -> Callable[[int], object]:
        backbone, model, cfg = self.detector(variant)
        size, c, s = cfg.model.input_size, backbone.out_channels, model.feature_size
        if phase == TRAIN_STEP:
            model.train()
            return _train_step(model, cfg.train, _inputs((batch, c, s, s), self.device), self.device, variant)
        model.eval()
        shape = (batch, 3, size, size) if phase == INFER_IMAGES else (batch, c, s, s)
        return _infer_step(backbone, model, _inputs(shape, self.device), size, phase == INFER_IMAGES,
                           self.device, variant)

    def measure(self, variants: Sequence[Variant], phase: str, requested: int) -> List[Dict[str, object]]:
        batch = self.spec.batch_on(self.device, requested)
        steps = {variant: self._step(variant, phase, batch) for variant in variants}
        timings, memory = measure_interleaved(steps, self.device, self.settings, peak_memory=True)
        for variant in variants:
            self.detector(variant)[1].eval()
        return [_detector_row(self.spec, v, phase, requested, batch, timings[v], memory[v]) for v in variants]


def run_spec(spec: DetectorSpec, device: torch.device, settings: Optional[TimingSettings] = None,
             variants: Optional[List[Variant]] = None, progress: bool = True) -> Dict[str, object]:
    """All measurements of one spec: {'spec', 'preset', 'size', 'rows', 'notes'}. The variants
    that differ only in their kernels are measured together, interleaved."""
    settings = settings or default_timing(device, model=True)
    variants = variants or default_variants(device)[0]
    groups: Dict[Tuple[str, bool], List[Variant]] = {}
    for variant in variants:
        groups.setdefault((variant.precision, variant.compiled), []).append(variant)
    runner = _Runner(spec, device, settings)
    jobs = [(phase, b) for b in spec.infer_batches for phase in (INFER_FEATURES, INFER_IMAGES)]
    jobs.append((TRAIN_STEP, spec.train_batch))
    rows: List[Dict[str, object]] = []
    for group in tqdm(list(groups.values()), desc=spec.preset, disable=not progress, leave=False):
        for phase, requested in jobs:
            rows.extend(runner.measure(group, phase, requested))
    notes = [f"{spec.preset}: {kind} batch {requested} run as {spec.batch_on(device, requested)} on CPU "
             f"(cpu_max_batch={spec.cpu_max_batch}); a CUDA run uses {requested}."
             for kind, requested in [*(("inference", b) for b in spec.infer_batches), ("training", spec.train_batch)]
             if spec.batch_on(device, requested) != requested]
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
                    "ext_min_ms": ext["min_ms"], "reference_min_ms": ref["min_ms"],
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
