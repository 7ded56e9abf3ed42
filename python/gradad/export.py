"""``gradad export``: a trained detector as one file with its pre- and post-processing inside.

:class:`DetectorGraph` holds everything from image to answer:

    image (N, 3, H, W) RGB 0..255 (float32, or uint8), any H, W (one size per batch)
      -> antialiased bilinear resize to the model's S x S (as training resized)
      -> /255, the backbone's mean/std normalisation -> backbone -> GRAD or Bi-Grid GRAD
      -> map (N, h, w) at the features' resolution -> bilinear (align_corners=True) to S x S
      -> bilinear (align_corners=False) to H x W
      -> Gaussian sigma=4 (scipy's reflect border, repeated for small images)
      -> anomaly maps (N, H, W), image scores = max (N,)

(the three steps after the map as two matrix products, see DetectorGraph.map_matrix)

which is :func:`gradad.inference.predict`'s strict protocol. :func:`export_detector` writes it as
ONNX (``model.onnx``, the grad_ext ops through :mod:`grad_ext.onnx`), OpenVINO IR
(``model.xml`` + ``model.bin``, converted from that ONNX) or a torch.export program
(``model.pt2``), with ``model.json`` beside it (:mod:`gradad.deploy.metadata`: threshold from
the checkpoint's validation, input size, class names, versions). Batch, height and width are
dynamic in all three. The files go to a temporary folder beside the output folder that is
renamed into place at the end, so a failed export leaves no partial output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FeatureExtractor
from .checkpoint import find_checkpoints, library_versions, trained_class_names
from .deploy.metadata import make_metadata, write_metadata
from .evaluation import STRICT_SIGMA, STRICT_TRUNCATE
from .inference import LoadedModel, decision_threshold, load_model
from .models.grad import GRAD, MAP_ALIGN_CORNERS
from .quantize import PrecisionConfig, reduce_precision

FORMATS = ("onnx", "openvino", "torch")
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"), "torch": ("model.pt2",)}
INPUT_DTYPES = ("float32", "uint8")
INPUT_NAME, MAP_NAME, SCORE_NAME = "image", "anomaly_map", "score"
# The dynamic dimensions' bounds (torch.export specialises sizes 0 and 1, hence the minimum 2).
MAX_BATCH, MIN_SIDE, MAX_SIDE = 4096, 2, 16384


def gaussian_kernel(sigma: float = STRICT_SIGMA, truncate: float = STRICT_TRUNCATE) -> torch.Tensor:
    """The strict protocol's 1-D Gaussian (as gradad.evaluation.gaussian_smooth): (2r + 1,) float32,
    r = int(truncate·sigma + 0.5), summing to 1."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    return (kernel / kernel.sum()).float()


def reflect_index(size, radius: int, device: torch.device) -> torch.Tensor:
    """gradad.evaluation.reflect_indices for a size that may be symbolic (traced): the period is
    a tensor, since the ONNX translation of ``tensor % scalar`` needs a concrete scalar.
    (size + 2·radius,) int64."""
    positions = torch.arange(-radius, size + radius, device=device)
    period = torch.full_like(positions, 2) * size
    positions = torch.remainder(positions, period)
    return torch.where(positions < size, positions, period - 1 - positions)


def resize_matrix(out_size, in_size, antialias: bool, like: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """(out_size, in_size) float32 weights of a 1-D bilinear resize whose product with a signal
    gives ``F.interpolate``'s values: align_corners=False with ``antialias=True`` included (the
    triangle filter stretched by the scale when shrinking, rows normalised as torch does), or
    align_corners=True without antialiasing. Sizes may be symbolic (traced). ``like``: a tensor
    giving the device."""
    if align_corners and antialias:
        raise ValueError("resize_matrix: antialias is implemented for align_corners=False only")
    dest = torch.arange(out_size, dtype=torch.float32, device=like.device)
    src = torch.arange(in_size, dtype=torch.float32, device=like.device)
    one = torch.ones((), dtype=torch.float32, device=like.device)
    if align_corners:
        # source position dest·(in - 1)/(out - 1); a single output pixel reads the first input
        scale = (one * in_size - 1.0) / torch.clamp(one * out_size - 1.0, min=1.0)
        return torch.clamp(1.0 - torch.abs(src[None, :] - dest[:, None] * scale), min=0.0)
    scale = (one * in_size) / (one * out_size)
    support = torch.clamp(scale, min=1.0) if antialias else torch.ones_like(scale)
    centre = (dest[:, None] + 0.5) * scale
    weights = torch.clamp(1.0 - torch.abs(src[None, :] + 0.5 - centre) / support, min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def matmul_resize(x: torch.Tensor, size, antialias: bool) -> torch.Tensor:
    """(..., H, W) -> (..., size[0], size[1]) as two matrix products (:func:`resize_matrix`):
    the same values as F.interpolate(mode='bilinear', align_corners=False, antialias=...), in
    operators every runtime runs (OpenVINO's ONNX Resize ignores antialias)."""
    rows = resize_matrix(size[0], x.shape[-2], antialias, x)
    cols = resize_matrix(size[1], x.shape[-1], antialias, x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def upsample_smooth_matrix(out_size, in_size, kernel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) float32: one axis of the strict post-processing as one matrix, the
    bilinear upsampling to out_size (:func:`resize_matrix`, F.interpolate's values) followed by
    the Gaussian ``kernel`` (2r + 1,) with scipy's reflect border. Sizes may be symbolic (traced).

    Both steps are linear along each axis, so a map's whole post-processing is two matrix
    products with these (DetectorGraph.forward). That replaces a Resize and two one-channel
    convolutions, which runtimes run slowly (onnxruntime, 32 maps of 240²: 35 ms as
    convolutions, 9 ms as products), and it costs in_size multiply-adds per output pixel and
    axis whatever the image size."""
    radius = (kernel.numel() - 1) // 2
    resize = resize_matrix(out_size, in_size, antialias=False, like=like)
    padded = resize.index_select(0, reflect_index(out_size, radius, like.device))
    return F.conv2d(padded[None, None], kernel.view(1, 1, -1, 1))[0, 0]


RESIZES = ("native", "matmul")


class DetectorGraph(nn.Module):
    """Image to answer in one module (see the module docstring).

    Args:
        backbone: the frozen feature extractor (its mean/std normalise the input).
        model: the trained GRAD (or Bi-Grid GRAD), eval mode.
        image_size: S, the side the model was trained at.
        resize: how the input is resized to S x S: 'native' (F.interpolate: ONNX Resize,
            antialias=1) or 'matmul' (:func:`matmul_resize`, for runtimes whose Resize lacks
            antialias). The map's upsampling is a matrix product either way.

    forward(image (N, 3, H, W) float32 or uint8, values 0..255) ->
    (anomaly maps (N, H, W) float32, image scores (N,) float32).
    """

    def __init__(self, backbone: FeatureExtractor, model: GRAD, image_size: int, resize: str = "native"):
        super().__init__()
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {list(RESIZES)}, got {resize!r}")
        self.resize = resize
        self.backbone = backbone.eval()
        self.model = model.eval()
        self.image_size = int(image_size)
        mean = torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std))
        self.register_buffer("pixel_shift", -mean / std)
        self.register_buffer("kernel", gaussian_kernel())

    def forward(self, image: torch.Tensor):
        height, width = image.shape[2], image.shape[3]
        size = (self.image_size, self.image_size)
        x = image.to(torch.float32)
        if self.resize == "matmul":
            x = matmul_resize(x, size, antialias=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x * self.pixel_scale + self.pixel_shift  # two passes over the image, not three
        maps = self.model(self.backbone(x)).anomaly_map  # (N, h, w), the features' resolution
        # GRAD.anomaly_map's upsampling to S x S, the resize to the image and the smoothing are
        # all linear along each axis: one (image side, h) matrix per axis, applied to the small map
        rows = self.map_matrix(height, maps.shape[-2], maps)
        cols = self.map_matrix(width, maps.shape[-1], maps)
        smoothed = torch.matmul(torch.matmul(rows, maps), cols.transpose(0, 1))
        return smoothed, smoothed.amax(dim=(1, 2))

    def map_matrix(self, out_size, map_size: int, like: torch.Tensor) -> torch.Tensor:
        """(out_size, map_size): one axis of GRAD.anomaly_map's upsampling to the model's side S
        followed by :func:`upsample_smooth_matrix` from S to out_size (the image's side)."""
        upsample = resize_matrix(self.image_size, map_size, antialias=False, like=like,
                                 align_corners=MAP_ALIGN_CORNERS)
        return torch.matmul(upsample_smooth_matrix(out_size, self.image_size, self.kernel, like), upsample)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the output folder, the model file (.onnx, .xml or .pt2), the
    metadata JSON and the metadata dict."""

    out_dir: str
    model_path: str
    metadata_path: str
    metadata: dict


def _checkpoint_file(path: str | os.PathLike) -> str:
    found = find_checkpoints(path)
    if None not in found:
        raise ValueError(f"checkpoint {path} is a per-class run ({', '.join(map(str, found))}): export the "
                         f"checkpoint of one class, e.g. {found[next(iter(found))]}")
    return found[None]


def example_input(loaded: LoadedModel, batch: int = 2, dtype: str = "float32") -> torch.Tensor:
    """A seeded example image batch (batch, 3, S + 8, S + 12) for tracing: a size unlike S so
    that no dimension is specialised to the model's own."""
    side = loaded.config.image_size
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (batch, 3, side + 8, side + 12), generator=g)
    return image.to(torch.uint8 if dtype == "uint8" else torch.float32)


def dynamic_shapes(dynamic_size: bool = True) -> tuple:
    """torch.export's dynamic_shapes for the graph's one input: batch, and height/width."""
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
                     3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)})
    return (dims,)


def _sampler_for_format(loaded: LoadedModel, fmt: str, sampler: str) -> str:
    # OpenVINO runs no 3-D GridSample (grad_ext.onnx's table): take the gather form there.
    dims = {loaded.config.model.local_grid_dim, loaded.config.model.global_grid_dim}
    if fmt == "openvino" and sampler == "auto" and 3 in dims:
        return "gather"
    return sampler


def _write_onnx(graph: DetectorGraph, example: torch.Tensor, path: str, opset: int, sampler: str) -> None:
    grad_ext_onnx = _grad_ext_onnx()
    grad_ext_onnx.export(graph, (example,), path, opset=opset, sampler=sampler, dynamic_shapes=dynamic_shapes(),
                         input_names=[INPUT_NAME], output_names=[MAP_NAME, SCORE_NAME])


def _grad_ext_onnx():
    import grad_ext.onnx  # optional: needs onnx and onnxscript (grad-ext[export])

    return grad_ext.onnx


def _write_openvino(graph: DetectorGraph, example: torch.Tensor, folder: str, opset: int, sampler: str) -> None:
    import openvino as ov

    onnx_path = os.path.join(folder, ".intermediate.onnx")
    _write_onnx(graph, example, onnx_path, opset, sampler)
    ov.save_model(ov.convert_model(onnx_path), os.path.join(folder, "model.xml"), compress_to_fp16=False)
    os.unlink(onnx_path)


def _write_torch(graph: DetectorGraph, example: torch.Tensor, path: str) -> None:
    program = torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes(), strict=False)
    torch.export.save(program, path)


def export_detector(checkpoint: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
                    opset: Optional[int] = None, sampler: str = "auto", input_dtype: str = "float32",
                    threshold: Optional[float] = None, quantile: Optional[float] = None,
                    target_fpr: Optional[float] = None, precision: PrecisionConfig = PrecisionConfig()) -> ExportResult:
    """Exports a trained detector (see the module docstring).

    Args:
        checkpoint: a checkpoint file, or a run folder holding one checkpoint.
        fmt: 'onnx', 'openvino' or 'torch'.
        out_dir: the folder to create (it must not exist, or be empty).
        opset: ONNX opset (onnx/openvino; default grad_ext.onnx.DEFAULT_OPSET); too low for the
            grids raises grad_ext.onnx.ExportError.
        sampler: grad_ext.onnx's sampler (grad_ext._common.SAMPLERS).
        input_dtype: 'float32' or 'uint8' pixels.
        threshold, quantile, target_fpr: the decision threshold instead of the checkpoint's
            stored one (at most one; see gradad.inference.decision_threshold).
        precision: the backbone's precision (:class:`gradad.quantize.PrecisionConfig`): fp16 and
            int8 (onnx and openvino only) are measured against the float32 graph on held-back
            images before they are written, and their threshold is chosen again from their own
            scores of the validation normals.

    Returns:
        :class:`ExportResult`. Raises ValueError / FileNotFoundError / FileExistsError naming
        the argument, gradad.precision_check.AccuracyError when a reduced precision loses more AUROC
        than allowed; nothing is left at ``out_dir`` when the export fails.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if not isinstance(precision, PrecisionConfig):
        raise TypeError(f"precision must be a gradad.quantize.PrecisionConfig, got {type(precision).__name__}")
    if precision.reduced and fmt == "torch":
        raise ValueError(f"precision {precision.precision!r} is for the onnx and openvino formats; the torch "
                         f"format exports fp32 only")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {list(INPUT_DTYPES)}, got {input_dtype!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"out: {out_dir} exists and is not an empty folder; choose a new folder")
    if fmt != "torch":
        opset = _grad_ext_onnx().DEFAULT_OPSET if opset is None else opset
        _grad_ext_onnx().sampler_for(2, opset, sampler)  # checks opset and sampler before the long work
    loaded = load_model(_checkpoint_file(checkpoint), device="cpu")
    validation = loaded.checkpoint.get("validation")
    if threshold is None and validation is not None and validation["protocol"] != "strict":
        raise ValueError(f"checkpoint {loaded.path}: its threshold was chosen under eval.protocol="
                         f"{validation['protocol']!r}, the exported graph computes the 'strict' protocol; "
                         f"pass a threshold explicitly")
    threshold_value, source = decision_threshold(loaded.checkpoint, threshold, quantile, target_fpr)
    resize = "matmul" if fmt == "openvino" else "native"
    graph = DetectorGraph(loaded.backbone, loaded.model, loaded.config.image_size, resize).eval()
    example = example_input(loaded, dtype=input_dtype)
    sampler = _sampler_for_format(loaded, fmt, sampler)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    # a reduced precision starts from the float32 ONNX graph, kept here until it is measured
    fp32_dir = os.path.join(staging, ".fp32")
    try:
        with torch.no_grad():
            if precision.reduced:
                os.mkdir(fp32_dir)
                _write_onnx(graph, example, os.path.join(fp32_dir, "model.onnx"), opset, sampler)
            elif fmt == "onnx":
                _write_onnx(graph, example, os.path.join(staging, "model.onnx"), opset, sampler)
            elif fmt == "openvino":
                _write_openvino(graph, example, staging, opset, sampler)
            else:
                _write_torch(graph, example, os.path.join(staging, "model.pt2"))
        versions = dict(library_versions())
        if fmt != "torch":
            versions.update(opset=str(opset), sampler=sampler, resize=resize)
        side = loaded.config.image_size
        cfg = loaded.config
        fields = dict(input_name=INPUT_NAME, height=side, width=side, dtype=input_dtype, map_output=MAP_NAME,
                      score_output=SCORE_NAME, class_names=trained_class_names(loaded.checkpoint, cfg),
                      versions=versions, protocol="strict", any_input_size=True,
                      extra={"format": fmt, "architecture": cfg.model.architecture,
                             "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
                             "checkpoint": os.path.basename(loaded.path)})
        meta = make_metadata(threshold=threshold_value, threshold_source=source, precision="fp32", **fields)
        if precision.reduced:
            write_metadata(os.path.join(fp32_dir, "model.json"), meta)
            reduced = reduce_precision(loaded, fmt, precision, os.path.join(fp32_dir, "model.onnx"),
                                       os.path.join(fp32_dir, "model.json"), staging, INPUT_NAME, threshold,
                                       quantile, target_fpr)
            shutil.rmtree(fp32_dir)
            meta = make_metadata(threshold=reduced.threshold, threshold_source=reduced.threshold_source,
                                 precision=precision.precision, quantization=reduced.quantization, **fields)
        model_file = MODEL_FILES[fmt][0]
        write_metadata(os.path.join(staging, "model.json"), meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir, os.path.join(out_dir, model_file), os.path.join(out_dir, "model.json"), meta)
