"""Scoring with an exported GRAD detector where torch is not installed (a line PC): numpy, Pillow
and onnxruntime, or OpenVINO for an OpenVINO IR (.xml) file. This file imports nothing else from
gradad and may be copied alone.

Files: ``model.onnx`` (or ``model.xml`` + ``model.bin``) and ``model.json`` beside it, the
metadata whose schema this module owns (:data:`SCHEMA_VERSION`, :func:`validate_metadata`,
:func:`write_metadata`).

Input contract of the exported graph (one input, named in the metadata):
    (N, 3, H, W) NCHW RGB, the raw pixel values 0..255 as float32 (or uint8 when the metadata says
    ``"dtype": "uint8"``), at exactly the metadata's input height and width. The graph itself
    scales to 0..1 and normalises with the backbone's mean and std. This module resizes each
    image to (H, W) with the antialiased bilinear filter gradad trains with (the same values as
    ``F.interpolate(..., mode='bilinear', antialias=True)``; float32 input keeps the resize
    exact, uint8 input rounds it). N is free when the graph's batch dimension is dynamic.
Outputs (named in the metadata):
    anomaly map (N, h, w) float32 and image score (N,) float32; an image is anomalous when its
    score > threshold.

Images: a path, a PIL image or a uint8/uint16 numpy array (H, W), (H, W, 1), (H, W, 3) or
(H, W, 4), of any size. Grayscale is repeated to RGB, alpha is dropped, 16-bit values are scaled
to 8 bit (v / 257, rounded), palette and other 8-bit modes are converted by Pillow.

    scorer = Scorer("model.onnx")
    for p in scorer.predict(["a.png", "b.png"]):
        print(p.score, p.anomalous, p.anomaly_map.shape)

Command line: ``python -m gradad.runtime_onnx model.onnx IMAGE... [--backend openvino]``
prints one JSON object per image.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["FORMAT", "SCHEMA_VERSION", "MetadataError", "Prediction", "Scorer", "load_image", "make_metadata",
           "metadata_path", "read_metadata", "resize_rgb", "validate_metadata", "write_metadata"]

FORMAT = "gradad-exported-model"
SCHEMA_VERSION = 1
INPUT_DTYPES = ("float32", "uint8")
BACKENDS = ("auto", "onnxruntime", "openvino")

# Pillow modes that convert to 8-bit RGB without losing range.
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_REQUIRED = {"format", "schema_version", "input", "outputs", "threshold", "class_names", "versions"}
# optional: the image-score protocol, where the threshold came from, free-form extra facts
_OPTIONAL = {"anomaly_map_size", "protocol", "threshold_source", "extra"}


class MetadataError(ValueError):
    """The metadata JSON is missing a field, has a wrong one, or does not match the model file."""


# ---- metadata --------------------------------------------------------------------------------

def metadata_path(model_path: str | os.PathLike) -> str:
    """The metadata JSON of a model file: same folder and stem, ``.json`` (model.onnx -> model.json)."""
    root, _ = os.path.splitext(os.fspath(model_path))
    return root + ".json"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_metadata(meta) -> dict:
    """Checks ``meta`` against schema version :data:`SCHEMA_VERSION`; returns it.

    Fields: format (:data:`FORMAT`), schema_version (int), input {name, height, width, dtype in
    'float32'/'uint8'}, outputs {anomaly_map, score} (graph output names), threshold (finite
    number), class_names (list of str: the categories the model was trained on), versions
    (str -> str: gradad, grad_ext, torch, opset, ...); optional anomaly_map_size [h, w],
    protocol (str), threshold_source (str), extra (dict). Raises MetadataError naming the field.
    """
    if not isinstance(meta, dict):
        raise MetadataError(f"metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise MetadataError(f"metadata field 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MetadataError(f"metadata field 'schema_version' is {version!r}; this reader knows version "
                            f"{SCHEMA_VERSION}")
    missing = sorted(_REQUIRED - set(meta))
    if missing:
        raise MetadataError(f"metadata lacks the field(s) {missing}")
    unknown = sorted(set(meta) - _REQUIRED - _OPTIONAL)
    if unknown:
        raise MetadataError(f"metadata has unknown field(s) {unknown} for schema version {SCHEMA_VERSION}")
    inp = meta["input"]
    if not isinstance(inp, dict) or set(inp) != {"name", "height", "width", "dtype"}:
        raise MetadataError(f"metadata field 'input' must be {{name, height, width, dtype}}, got {inp!r}")
    if not isinstance(inp["name"], str) or not inp["name"]:
        raise MetadataError(f"metadata field 'input.name' must be a non-empty string, got {inp['name']!r}")
    for key in ("height", "width"):
        if not _positive_int(inp[key]):
            raise MetadataError(f"metadata field 'input.{key}' must be a positive int, got {inp[key]!r}")
    if inp["dtype"] not in INPUT_DTYPES:
        raise MetadataError(f"metadata field 'input.dtype' must be one of {list(INPUT_DTYPES)}, got {inp['dtype']!r}")
    outs = meta["outputs"]
    if not isinstance(outs, dict) or set(outs) != {"anomaly_map", "score"} or \
            not all(isinstance(v, str) and v for v in outs.values()):
        raise MetadataError(f"metadata field 'outputs' must map anomaly_map and score to output names, got {outs!r}")
    threshold = meta["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise MetadataError(f"metadata field 'threshold' must be a finite number, got {threshold!r}")
    names = meta["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MetadataError(f"metadata field 'class_names' must be a list of strings, got {names!r}")
    versions = meta["versions"]
    if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in versions.items()):
        raise MetadataError(f"metadata field 'versions' must map names to version strings, got {versions!r}")
    size = meta.get("anomaly_map_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(map(_positive_int, size))):
        raise MetadataError(f"metadata field 'anomaly_map_size' must be [h, w] of positive ints, got {size!r}")
    for key in ("protocol", "threshold_source"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise MetadataError(f"metadata field {key!r} must be a string, got {meta[key]!r}")
    if meta.get("extra") is not None and not isinstance(meta["extra"], dict):
        raise MetadataError(f"metadata field 'extra' must be an object, got {meta['extra']!r}")
    return meta


def make_metadata(*, input_name: str, height: int, width: int, dtype: str, map_output: str, score_output: str,
                  threshold: float, class_names, versions: dict, anomaly_map_size=None, protocol=None,
                  threshold_source=None, extra=None) -> dict:
    """A validated metadata dict (see :func:`validate_metadata` for the fields)."""
    meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            "input": {"name": input_name, "height": height, "width": width, "dtype": dtype},
            "outputs": {"anomaly_map": map_output, "score": score_output},
            "threshold": float(threshold) if isinstance(threshold, (int, float)) else threshold,
            "class_names": list(class_names), "versions": dict(versions)}
    optional = {"anomaly_map_size": None if anomaly_map_size is None else list(anomaly_map_size),
                "protocol": protocol, "threshold_source": threshold_source, "extra": extra}
    meta.update({k: v for k, v in optional.items() if v is not None})
    return validate_metadata(meta)


def write_metadata(path: str | os.PathLike, meta: dict) -> str:
    """Validates ``meta`` and writes it as JSON to ``path`` atomically (temporary file + rename)."""
    text = json.dumps(validate_metadata(meta), indent=2, sort_keys=True) + "\n"
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The validated metadata in the JSON file ``path``; FileNotFoundError or MetadataError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model metadata {path} not found: an exported model needs the JSON written "
                                f"beside it by the export")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"model metadata {path} is not valid JSON: {exc}") from exc
    try:
        return validate_metadata(meta)
    except MetadataError as exc:
        raise MetadataError(f"{path}: {exc}") from None


# ---- images ----------------------------------------------------------------------------------

def _rgb_from_pil(img: Image.Image, what: str) -> np.ndarray:
    img.load()
    if img.mode in _EIGHT_BIT_MODES:
        return np.asarray(img.convert("RGB"))
    if img.mode.startswith("I;16"):
        return _rgb_from_array(np.asarray(img), what)
    raise ValueError(f"{what}: unsupported image mode {img.mode!r}, expected an 8- or 16-bit image")


def _rgb_from_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint16 or (array.dtype.kind == "u" and array.dtype.itemsize == 2):
        array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"{what}: a numpy image must be uint8 or uint16, got {array.dtype} (float arrays "
                        f"are ambiguous between 0..1 and 0..255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ValueError(f"{what}: a numpy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                     f"got shape {array.shape}")


def load_image(image, what: str = "image") -> np.ndarray:
    """An image (path, PIL image or uint8/uint16 array) as (H, W, 3) uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: image file {path} not found")
        try:
            with Image.open(path) as img:
                return _rgb_from_pil(img, f"{what} {path}")
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"{what}: cannot read image file {path}: {exc}") from exc
    if isinstance(image, Image.Image):
        return _rgb_from_pil(image, what)
    if isinstance(image, np.ndarray):
        return _rgb_from_array(image, what)
    raise TypeError(f"{what} must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, height, width) float32 in 0..255, resized with the antialiased
    bilinear filter (Pillow's, per channel in float, as torch's antialias=True computes it)."""
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    planes = [np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32), mode="F")
                         .resize((width, height), Image.Resampling.BILINEAR)) for c in range(3)]
    return np.stack(planes).astype(np.float32, copy=False)


def _resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    if amap.shape == (height, width):
        return amap
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((width, height),
                                                                              Image.Resampling.BILINEAR))


# ---- backends --------------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}


class _OrtBackend:
    def __init__(self, path: str, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: (list(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()}
        self.outputs = {o.name: list(o.shape) for o in self.session.get_outputs()}

    def run(self, input_name: str, batch: np.ndarray, outputs: list) -> list:
        return self.session.run(outputs, {input_name: batch})


class _OpenVinoBackend:
    def __init__(self, path: str, threads: int | None):
        import openvino as ov

        core = ov.Core()
        # f32: OpenVINO's CPU plugin would otherwise run in bf16 on CPUs that have it
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

        def dims(port):
            return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        types = {"f32": "float32", "u8": "uint8"}
        self.inputs = {p.get_any_name(): (dims(p), types.get(p.get_element_type().get_type_name(),
                                                             p.get_element_type().get_type_name()))
                       for p in self.compiled.inputs}
        self.outputs = {name: dims(p) for p in self.compiled.outputs for name in p.get_names()}
        self._ports = {name: p for p in self.compiled.outputs for name in p.get_names()}

    def run(self, input_name: str, batch: np.ndarray, outputs: list) -> list:
        result = self.request.infer({input_name: batch})
        return [np.array(result[self._ports[name]]) for name in outputs]


def _static_dim(dim):
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


@dataclass
class Prediction:
    """One scored image: score, anomalous (score > threshold), anomaly_map (h, w) float32 at the
    model's map resolution or, with ``original_size``, the image's (H, W); image_size (H, W)."""

    score: float
    anomalous: bool
    anomaly_map: np.ndarray
    image_size: tuple


class Scorer:
    """An exported detector and its metadata, ready to score images.

    Args:
        model_path: ``.onnx`` (onnxruntime by default) or OpenVINO ``.xml`` (OpenVINO).
        backend: 'auto', 'onnxruntime' or 'openvino' (which also reads .onnx files).
        metadata: path of the metadata JSON (default: :func:`metadata_path` of the model).
        threads: intra-op threads of the runtime (its default when None).
        threshold: a decision threshold to use instead of the metadata's.

    Raises FileNotFoundError for a missing model or metadata file and MetadataError when the
    metadata does not match the model's inputs and outputs.
    """

    def __init__(self, model_path: str | os.PathLike, backend: str = "auto", metadata: str | None = None,
                 threads: int | None = None, threshold: float | None = None):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_path: model file {path} not found")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if threads is not None and not _positive_int(threads):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        is_ir = path.lower().endswith(".xml")
        if backend == "onnxruntime" and is_ir:
            raise ValueError(f"backend='onnxruntime' cannot read the OpenVINO IR file {path}; use backend='openvino'")
        self.backend_name = "openvino" if is_ir or backend == "openvino" else "onnxruntime"
        self.metadata = read_metadata(metadata if metadata is not None else metadata_path(path))
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
                raise ValueError(f"threshold must be a finite number, got {threshold!r}")
            self.threshold = float(threshold)
        else:
            self.threshold = float(self.metadata["threshold"])
        self.path = path
        self._backend = (_OpenVinoBackend if self.backend_name == "openvino" else _OrtBackend)(path, threads)
        self._check_model()

    # the model's interface against the metadata
    def _check_model(self) -> None:
        meta, where = self.metadata, f"metadata of {self.path}"
        inp = meta["input"]
        if list(self._backend.inputs) != [inp["name"]]:
            raise MetadataError(f"{where}: input {inp['name']!r}, but the model's inputs are "
                                f"{list(self._backend.inputs)}")
        shape, dtype = self._backend.inputs[inp["name"]]
        if dtype != inp["dtype"]:
            raise MetadataError(f"{where}: input dtype {inp['dtype']!r}, but the model's input is {dtype!r}")
        expected = [None, 3, inp["height"], inp["width"]]
        if len(shape) != 4 or any(_static_dim(d) not in (None, e) for d, e in zip(shape[1:], expected[1:])):
            raise MetadataError(f"{where}: input (N, 3, {inp['height']}, {inp['width']}), but the model's input "
                                f"has shape {shape}")
        self._batch = _static_dim(shape[0])  # None: any batch size
        for key, rank in (("anomaly_map", 3), ("score", 1)):
            name = meta["outputs"][key]
            if name not in self._backend.outputs:
                raise MetadataError(f"{where}: outputs.{key} is {name!r}, but the model's outputs are "
                                    f"{sorted(self._backend.outputs)}")
            if len(self._backend.outputs[name]) != rank:
                raise MetadataError(f"{where}: output {name!r} ({key}) must have rank {rank}, the model's has shape "
                                    f"{self._backend.outputs[name]}")
        size = meta.get("anomaly_map_size")
        map_shape = self._backend.outputs[meta["outputs"]["anomaly_map"]]
        if size is not None and any(_static_dim(d) not in (None, s) for d, s in zip(map_shape[1:], size)):
            raise MetadataError(f"{where}: anomaly_map_size {size}, but the model's map has shape {map_shape}")

    @property
    def input_size(self) -> tuple:
        """(H, W) the model reads."""
        return self.metadata["input"]["height"], self.metadata["input"]["width"]

    def prepare(self, image) -> np.ndarray:
        """One image -> (3, H, W) at the model's input size, in the model's input dtype."""
        return self._prepare_rgb(load_image(image))

    def _prepare_rgb(self, rgb: np.ndarray) -> np.ndarray:
        planes = resize_rgb(rgb, *self.input_size)
        if self.metadata["input"]["dtype"] == "uint8":
            return np.clip(np.rint(planes), 0, 255).astype(np.uint8)
        return planes

    def run(self, batch: np.ndarray) -> tuple:
        """Prepared images (N, 3, H, W) -> (anomaly maps (N, h, w) float32, scores (N,) float32)."""
        inp = self.metadata["input"]
        want = (3, inp["height"], inp["width"])
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1:] != want or \
                batch.dtype != np.dtype(inp["dtype"]):
            raise ValueError(f"batch must be a {inp['dtype']} array (N, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{getattr(batch, 'dtype', type(batch).__name__)} {getattr(batch, 'shape', '')}")
        n = batch.shape[0]
        step = self._batch or max(n, 1)
        names = [self.metadata["outputs"]["anomaly_map"], self.metadata["outputs"]["score"]]
        maps, scores = [], []
        for start in range(0, n, step):
            chunk = batch[start:start + step]
            if self._batch and len(chunk) < self._batch:  # a fixed-batch graph: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((self._batch - len(chunk), *want), chunk.dtype)])
            amap, score = self._backend.run(inp["name"], np.ascontiguousarray(chunk), names)
            keep = min(step, n - start)
            maps.append(np.asarray(amap, dtype=np.float32)[:keep])
            scores.append(np.asarray(score, dtype=np.float32).reshape(-1)[:keep])
        if not maps:
            return np.zeros((0, 0, 0), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(maps), np.concatenate(scores)

    def predict(self, images, batch_size: int = 8, original_size: bool = False) -> list:
        """Scores images (see the module docstring for what an image may be).

        Args:
            images: a sequence of images.
            batch_size: images per run (a fixed-batch graph uses its own).
            original_size: resize each map to its image's (H, W) (bilinear) instead of the
                model's map resolution.

        Returns:
            one :class:`Prediction` per image, in order.
        """
        if not _positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
            raise TypeError("images must be a sequence of images; wrap a single image in a list")
        results = []
        images = list(images)
        for start in range(0, len(images), batch_size):
            rgbs = [load_image(img, f"images[{start + i}]") for i, img in enumerate(images[start:start + batch_size])]
            maps, scores = self.run(np.stack([self._prepare_rgb(rgb) for rgb in rgbs]))
            for rgb, amap, score in zip(rgbs, maps, scores):
                size = rgb.shape[:2]
                amap = _resize_map(amap, *size) if original_size else amap
                results.append(Prediction(float(score), bool(score > self.threshold), amap, tuple(size)))
        return results


def main(argv=None) -> int:
    """``python -m gradad.runtime_onnx MODEL IMAGE...``: one JSON line per image."""
    parser = argparse.ArgumentParser(prog="python -m gradad.runtime_onnx", description=main.__doc__)
    parser.add_argument("model", help="exported model (.onnx or OpenVINO .xml) with its .json beside it")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--threshold", type=float, help="decision threshold instead of the metadata's")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    scorer = Scorer(args.model, backend=args.backend, threshold=args.threshold)
    for path, pred in zip(args.images, scorer.predict(args.images, batch_size=args.batch_size)):
        print(json.dumps({"path": path, "score": pred.score, "anomalous": pred.anomalous,
                          "threshold": scorer.threshold}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
