"""The metadata JSON of an exported GRAD detector (``model.json`` beside ``model.onnx`` or
``model.xml``): this module is the single owner of its schema (:data:`SCHEMA_VERSION`,
:func:`validate_metadata`, :func:`make_metadata`, :func:`write_metadata`, :func:`read_metadata`).
Standard library only, so it runs where torch is not installed.
"""
from __future__ import annotations

import json
import math
import os

from ..io_utils import atomic_write_bytes

__all__ = ["FORMAT", "INPUT_DTYPES", "PRECISIONS", "SCHEMA_VERSION", "MetadataError", "make_metadata",
           "metadata_path", "read_metadata", "validate_metadata", "write_metadata"]

FORMAT = "gradad-exported-model"
# version 2 added precision and quantization; a version 1 file is a float32 model and reads as one
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
INPUT_DTYPES = ("float32", "uint8")
# the arithmetic of the model's backbone (the rest of the graph is float32 in all three)
PRECISIONS = ("fp32", "fp16", "int8")
_REQUIRED = {"format", "schema_version", "input", "outputs", "threshold", "class_names", "versions"}
# optional: the image-score protocol, where the threshold came from, whether the graph takes
# images of any size (and resizes and post-processes inside), free-form extra facts, the
# backbone's precision and, for a reduced one, its calibration set and measured accuracy cost
_OPTIONAL = {"anomaly_map_size", "protocol", "threshold_source", "any_input_size", "extra", "precision",
             "quantization"}
_OPTIONAL_V1 = _OPTIONAL - {"precision", "quantization"}


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
    protocol (str), threshold_source (str), any_input_size (bool: the graph takes (N, 3, H', W')
    at any H', W', resizes to input height x width inside and returns maps (N, H', W') already
    post-processed; without it the input must be height x width), extra (dict), precision (one
    of :data:`PRECISIONS`: the backbone's arithmetic; absent means fp32), quantization (dict, only
    beside a reduced precision: the calibration set and the measured accuracy cost, as
    gradad.quantize writes them). Version 1 files (without precision and quantization) read as
    they are. Raises MetadataError naming the field.
    """
    if not isinstance(meta, dict):
        raise MetadataError(f"metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise MetadataError(f"metadata field 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise MetadataError(f"metadata field 'schema_version' is {version!r}; this reader knows versions "
                            f"{list(READABLE_VERSIONS)}")
    missing = sorted(_REQUIRED - set(meta))
    if missing:
        raise MetadataError(f"metadata lacks the field(s) {missing}")
    unknown = sorted(set(meta) - _REQUIRED - (_OPTIONAL if version == SCHEMA_VERSION else _OPTIONAL_V1))
    if unknown:
        raise MetadataError(f"metadata has unknown field(s) {unknown} for schema version {version}")
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
    if meta.get("any_input_size") is not None and not isinstance(meta["any_input_size"], bool):
        raise MetadataError(f"metadata field 'any_input_size' must be true or false, got {meta['any_input_size']!r}")
    for key in ("extra", "quantization"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise MetadataError(f"metadata field {key!r} must be an object, got {meta[key]!r}")
    if meta.get("precision") is not None and meta["precision"] not in PRECISIONS:
        raise MetadataError(f"metadata field 'precision' must be one of {list(PRECISIONS)}, got {meta['precision']!r}")
    if meta.get("quantization") is not None and meta.get("precision", "fp32") == "fp32":
        raise MetadataError("metadata field 'quantization' belongs to a reduced precision, but 'precision' is fp32")
    return meta


def make_metadata(*, input_name: str, height: int, width: int, dtype: str, map_output: str, score_output: str,
                  threshold: float, class_names, versions: dict, anomaly_map_size=None, protocol=None,
                  threshold_source=None, any_input_size=None, extra=None, precision=None, quantization=None) -> dict:
    """A validated metadata dict (see :func:`validate_metadata` for the fields)."""
    meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            "input": {"name": input_name, "height": height, "width": width, "dtype": dtype},
            "outputs": {"anomaly_map": map_output, "score": score_output},
            "threshold": float(threshold) if isinstance(threshold, (int, float)) else threshold,
            "class_names": list(class_names), "versions": dict(versions)}
    optional = {"anomaly_map_size": None if anomaly_map_size is None else list(anomaly_map_size),
                "protocol": protocol, "threshold_source": threshold_source,
                "any_input_size": any_input_size, "extra": extra, "precision": precision,
                "quantization": quantization}
    meta.update({k: v for k, v in optional.items() if v is not None})
    return validate_metadata(meta)


def write_metadata(path: str | os.PathLike, meta: dict) -> str:
    """Validates ``meta`` and writes it as JSON to ``path`` atomically (temporary file + rename)."""
    text = json.dumps(validate_metadata(meta), indent=2, sort_keys=True) + "\n"
    return str(atomic_write_bytes(path, text.encode("utf-8")))


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
