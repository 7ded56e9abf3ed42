"""Reduced-precision export (``gradad export --precision fp16|int8``): the detector's
convolutions in half precision or 8-bit integers, the grid lookups, refinement and
post-processing in float32, and the accuracy cost measured before anything is written.

What goes lower (:data:`LOWERED_SCOPES`). The nodes the exporter records (ONNX node metadata
``pkg.torch.onnx.name_scopes``) under the backbone and under the GRAD head's convolutional
modules: the fusion network, the local coordinate network and, in ONNX, the output convolution.
The input resize and normalisation, the grids and their lookups, the global coordinates (two
small linear layers), the refinement, the upsampling and the Gaussian smoothing stay float32:
they are a small share of the time, and the map is a difference of features that must not be
rounded. Measured on the Lite demo (2-core AMD EPYC, int8, image AUROC of the test split against
fp32, benchmarks/results/cpu-amd-epyc/export.md): onnxruntime with the backbone only -0.0015,
with the head's convolutions too -0.0009 (-0.0017 since the exported normalisation is one
multiply-add: the calibrated ranges move with the last bits); OpenVINO with the backbone only
+0.0003, with the fusion and local coordinates too +0.0002, but with its output convolution as
well -0.12, so OpenVINO keeps that one in float32. The cause is OpenVINO's CPU plugin, not NNCF's ranges: the IR's
int8 weights and scales of that convolution are right, but the compiled model, which fuses the last
block's projection, residual add and quantization into one u8 convolution ahead of it, returns an
x̂ of about 0 (root mean square 3e-7 against 4.5 in float32; OpenVINO 2026.4), so the map became |x|.

- int8, ONNX: onnxruntime's static quantization in QDQ form (per-channel int8 weights, uint8
  activations, min/max calibration); OpenVINO: NNCF post-training quantization with every
  node outside the lowered scopes in its ignored scope. Both calibrate on normal images only:
  the run's training normals (re-listed from the checkpoint's config), or a folder.
- fp16: the lowered nodes' weights stored as float16 with a Cast to float32 in front of their
  node, in both formats (neither runtime computes fp16 convolutions on an x86 CPU without
  AVX512-FP16, so the gain is the file size, not the speed).

The accuracy check (:mod:`gradad.precision_check`) scores the checkpoint's validation normals and,
when the run has one, its test split with the float32 and the reduced file in the same runtime,
and refuses (``AccuracyError``) a drop of image AUROC larger than
:attr:`PrecisionConfig.max_auroc_drop`. The decision threshold is chosen again from the reduced
model's scores of the validation normals by the same rule.
"""

from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .datasets import split_training_records
from .deploy import PRECISIONS, Scorer
from .image_files import collect_images
from .inference import LoadedModel
from .io_utils import hash_file
from .listings import config_listing
from .precision_check import HeldBack, check_accuracy, held_back_images, measure_accuracy, reduced_threshold

# the DetectorGraph submodules whose nodes a reduced precision lowers, per format (see the
# module docstring): 'backbone', then GRAD's modules under DetectorGraph.model
LOWERED_SCOPES = {"onnx": ("backbone", "model.fusion", "model.local_coordinates", "model.output"),
                  "openvino": ("backbone", "model.fusion", "model.local_coordinates")}
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
REDUCED_FORMATS = ("onnx", "openvino")


@dataclass(frozen=True)
class PrecisionConfig:
    """How ``gradad export`` lowers the detector's precision (the defaults of the CLI flags).

    Args:
        precision: 'fp32' (the float32 graph as it is), 'fp16' or 'int8'.
        calibration_dir: int8 only: a folder of normal images to calibrate on; None takes the
            run's own training normals.
        calibration_images: at most this many calibration images (a seeded subset).
        max_auroc_drop: the largest loss of image AUROC on the test split accepted; None
            exports without that check (the score change is still measured and recorded).
        seed: the seed of the calibration subset.
        batch_size: images per run of the accuracy check.
    """

    precision: str = "fp32"
    calibration_dir: Optional[str] = None
    calibration_images: int = 64
    max_auroc_drop: Optional[float] = 0.005
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.calibration_dir is not None and self.precision != "int8":
            raise ValueError(f"calibration: a calibration folder is for precision 'int8', not {self.precision!r}")
        for name in ("calibration_images", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        drop = self.max_auroc_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 1):
            raise ValueError(f"max_auroc_drop must be a number in [0, 1] or None, got {drop!r}")

    @property
    def reduced(self) -> bool:
        """True for fp16 and int8."""
        return self.precision != "fp32"


# ---- which nodes go lower --------------------------------------------------------------------

def lowered_nodes(model, scopes: Sequence[str]) -> set:
    """Names of the nodes of an exported ONNX model (onnx.ModelProto) that belong to one of the
    DetectorGraph submodules ``scopes`` ('backbone', 'model.fusion', ...; see LOWERED_SCOPES), by
    the exporter's name-scope metadata. A head module the model lacks (no local branch, say) has
    none; raises ValueError when the first scope, the backbone, has none (an exporter that no
    longer records scopes must not lower the wrong nodes)."""
    names, found = set(), set()
    for node in model.graph.node:
        recorded = {p.key: p.value for p in node.metadata_props}.get(_NAME_SCOPES)
        if not recorded:
            continue
        path = ast.literal_eval(recorded)[1:]  # the module names from the top down, then the node's
        for scope in scopes:
            if scope in path[:-1]:
                names.add(node.name)
                found.add(scope)
    if scopes and scopes[0] not in found:
        raise ValueError(f"the exported ONNX graph records no node under {scopes[0]!r} ({_NAME_SCOPES} "
                         f"metadata): cannot tell which nodes to lower")
    return names


# ---- the images ------------------------------------------------------------------------------

def calibration_images(loaded: LoadedModel, config: PrecisionConfig, held_back: HeldBack) -> tuple:
    """(paths, description) of the int8 calibration set: a seeded subset of at most
    config.calibration_images of the folder's images or of the run's training normals, without
    any held-back image (those measure the cost)."""
    if config.calibration_dir is not None:
        if not os.path.isdir(config.calibration_dir):
            raise NotADirectoryError(f"calibration: {config.calibration_dir} is not a folder of normal images")
        candidates = collect_images(config.calibration_dir)
        source = f"folder {os.path.basename(os.path.normpath(config.calibration_dir))}"
    else:
        cfg = loaded.config
        try:
            train, _ = split_training_records(config_listing(cfg, "train"), cfg.split.max_train_images,
                                              cfg.split.val_fraction, cfg.train.seed)
        except (FileNotFoundError, NotADirectoryError) as error:
            raise FileNotFoundError(f"calibration from the checkpoint re-reads the run's training normals "
                                    f"(data.dataset={cfg.data.dataset}, data.root={cfg.data.root}): {error}; "
                                    f"pass a folder of normal images with --calibration DIR") from error
        candidates, source = [r.path for r in train], f"training normals of the run ({cfg.data.dataset})"
    held = {os.path.realpath(p) for p in held_back.paths}
    kept = [p for p in candidates if os.path.realpath(p) not in held]
    if not kept:
        raise ValueError(f"calibration: {source} holds no image outside the held-back validation and test images")
    order = np.random.default_rng(config.seed).permutation(len(kept))[:config.calibration_images]
    excluded = len(candidates) - len(kept)
    return [kept[i] for i in sorted(order)], source + (f", {excluded} held-back images left out" if excluded else "")


def files_digest(paths: Sequence[str]) -> str:
    """sha256 over the sorted sha256 digests of the files' bytes: the same set of images gives
    the same digest wherever it lies."""
    digests = sorted(hash_file(path).hexdigest() for path in paths)
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


# ---- lowering --------------------------------------------------------------------------------

def _half_weights(model, nodes: set):
    """The ONNX model with the float32 initializers read only by ``nodes`` stored as float16,
    each cast back to float32 by a Cast node in front of its readers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    readers: Dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    casts, kept = [], []
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and readers.get(init.name) and readers[init.name] <= nodes:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], name=init.name + "_to_fp32",
                                          to=TensorProto.FLOAT))
        else:
            kept.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    body = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + body)
    onnx.checker.check_model(model)
    return model


def _half_weights_openvino(model, nodes: set):
    """:func:`_half_weights` for an OpenVINO model converted from the ONNX file: each float32
    Constant read only by lowered operations becomes a float16 Constant and a Convert."""
    import openvino as ov
    import openvino.opset13 as opset

    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f32:
            continue
        readers = [target.get_node() for out in op.outputs() for target in out.get_target_inputs()]
        if readers and all(_onnx_node_name(reader) in nodes for reader in readers):
            half = opset.constant(op.get_data().astype(np.float16))
            op.output(0).replace(opset.convert(half, ov.Type.f32).output(0))
    return model


def _onnx_node_name(op) -> str:
    # OpenVINO names each operation after its ONNX node, with '/...' for the parts it splits off
    return op.get_friendly_name().split("/")[0]


def _int8_onnx(fp32_path: str, out_path: str, nodes: set, calibration: List[np.ndarray], input_name: str) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    # uint8 activations with int8 weights: the pair onnxruntime's x86 kernels run fastest (with
    # VNNI; without it they may saturate, see its quantization docs)
    quantize_static(fp32_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=sorted(nodes))
    return "onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 activations, min/max calibration"


def _int8_openvino(fp32_path: str, out_path: str, nodes: set, calibration: List[np.ndarray]) -> str:
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ImportError as error:
        raise ImportError("precision int8 in OpenVINO quantizes with NNCF, which is not installed: "
                          "pip install 'grad-ext[export]' (or pip install nncf)") from error
    import openvino as ov

    model = ov.convert_model(fp32_path)
    ignored = [op.get_friendly_name() for op in model.get_ordered_ops() if _onnx_node_name(op) not in nodes]
    kept_convolutions = [op for op in model.get_ordered_ops() if op.get_type_name().endswith("Convolution")
                         and op.get_friendly_name() not in ignored]
    if not kept_convolutions:
        raise ValueError("no convolution is left to quantize in the OpenVINO model: its operation "
                         "names no longer follow the ONNX node names")
    # activation ranges: the calibration set's overall min/max, not NNCF's default mean of the
    # per-image extremes, which clips the unusual features an anomaly is made of (Lite demo:
    # AUROC 0.901 -> 0.877 with the default, no drop with min/max)
    ranges = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                              advanced_parameters=ranges)
    ov.save_model(quantized, out_path, compress_to_fp16=False)
    return ("NNCF post-training quantization (OpenVINO), per-channel int8 weights, int8 activations, "
            "min/max calibration")


def write_reduced(fmt: str, precision: str, fp32_onnx: str, folder: str, calibration: List[np.ndarray],
                  input_name: str) -> tuple:
    """Writes the reduced-precision model of the float32 ONNX file ``fp32_onnx`` into ``folder``
    (model.onnx, or model.xml + model.bin) and returns (model path, method in words).

    Args:
        fmt: 'onnx' or 'openvino'.
        precision: 'fp16' or 'int8'.
        calibration: int8 only: input batches (1, 3, H, W) of normal images in the graph's input dtype.
    """
    import onnx

    model = onnx.load(fp32_onnx)
    nodes = lowered_nodes(model, LOWERED_SCOPES[fmt])
    out = os.path.join(folder, "model.onnx" if fmt == "onnx" else "model.xml")
    if precision == "fp16":
        if fmt == "onnx":
            onnx.save(_half_weights(model, nodes), out)
        else:
            import openvino as ov

            # OpenVINO's ONNX reader folds a Cast of a weight back to float32: convert, then halve
            ov.save_model(_half_weights_openvino(ov.convert_model(fp32_onnx), nodes), out, compress_to_fp16=False)
        return out, "weights of the lowered nodes stored as float16, computed in float32"
    if fmt == "onnx":
        return out, _int8_onnx(fp32_onnx, out, nodes, calibration, input_name)
    return out, _int8_openvino(fp32_onnx, out, nodes, calibration)


def calibration_batches(paths: Sequence[str], prepare: Callable[[str], np.ndarray]) -> List[np.ndarray]:
    """The calibration images as the graph's input batches (1, 3, H, W), each at its own size."""
    return [prepare(path)[None] for path in paths]


@dataclass(frozen=True)
class ReducedModel:
    """What :func:`reduce_precision` wrote: the model file, its threshold and where it came
    from, and the metadata's ``quantization`` record (method, calibration set, accuracy)."""

    model_path: str
    threshold: float
    threshold_source: str
    quantization: dict


def reduce_precision(loaded: LoadedModel, fmt: str, config: PrecisionConfig, fp32_onnx: str, fp32_metadata: str,
                     folder: str, input_name: str, threshold: Optional[float] = None,
                     quantile: Optional[float] = None, target_fpr: Optional[float] = None) -> ReducedModel:
    """Lowers the float32 graph ``fp32_onnx`` (its metadata JSON ``fp32_metadata``) to
    config.precision in ``folder`` and measures what that costs, in the format's own runtime.

    Raises gradad.precision_check.AccuracyError (the file is written but the caller must not keep it) when the
    AUROC drop exceeds config.max_auroc_drop; threshold, quantile and target_fpr as
    gradad.precision_check.reduced_threshold."""
    if fmt not in REDUCED_FORMATS:
        raise ValueError(f"precision {config.precision!r} is for the formats {list(REDUCED_FORMATS)}, not {fmt!r}")
    backend = "onnxruntime" if fmt == "onnx" else "openvino"
    reference = Scorer(fp32_onnx, backend=backend, metadata=fp32_metadata)
    held_back = held_back_images(loaded)
    record: dict = {}
    calibration: List[np.ndarray] = []
    if config.precision == "int8":
        paths, source = calibration_images(loaded, config, held_back)
        calibration = calibration_batches(paths, reference.prepare)
        record["calibration"] = {"source": source, "count": len(paths), "sha256": files_digest(paths)}
    model_path, method = write_reduced(fmt, config.precision, fp32_onnx, folder, calibration, input_name)
    reduced = Scorer(model_path, backend=backend, metadata=fp32_metadata)
    report, validation_scores = measure_accuracy(reference, reduced, held_back, config.batch_size)
    report["max_auroc_drop"] = config.max_auroc_drop
    check_accuracy(report, config.precision, config.max_auroc_drop)
    value, source = reduced_threshold(loaded.checkpoint, validation_scores, config.precision, threshold, quantile,
                                      target_fpr)
    record.update(method=method, lowered=list(LOWERED_SCOPES[fmt]), runtime=backend, accuracy=report)
    return ReducedModel(model_path, value, source, record)
