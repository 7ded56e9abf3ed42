"""gradad.deploy: an exported GRAD detector on a machine without torch (numpy, Pillow and
onnxruntime or OpenVINO only). :mod:`.metadata` owns the JSON beside the model file,
:mod:`.images` decodes and resizes images, :mod:`.scorer` runs the model; ``python -m
gradad.deploy MODEL IMAGE...`` scores from the command line. Nothing here imports torch or the
compiled extension, and nothing here imports gradad outside this package."""
from .images import load_image, resize_map, resize_rgb
from .metadata import (
    FORMAT,
    INPUT_DTYPES,
    PRECISIONS,
    SCHEMA_VERSION,
    MetadataError,
    make_metadata,
    metadata_path,
    read_metadata,
    validate_metadata,
    write_metadata,
)
from .scorer import BACKENDS, Prediction, Scorer

__all__ = ["BACKENDS", "FORMAT", "INPUT_DTYPES", "PRECISIONS", "SCHEMA_VERSION", "MetadataError", "Prediction",
           "Scorer", "load_image", "make_metadata", "metadata_path", "read_metadata", "resize_map", "resize_rgb",
           "validate_metadata", "write_metadata"]
