"""Scoring with an exported GRAD detector where torch is not installed (a line PC): numpy, Pillow
and onnxruntime, or OpenVINO for an OpenVINO IR (.xml) file. Imports nothing from gradad outside
gradad.deploy.

Files: ``model.onnx`` (or ``model.xml`` + ``model.bin``) and ``model.json`` beside it
(:mod:`gradad.deploy.metadata`).

Input contract of the exported graph (one input, named in the metadata):
    (N, 3, H, W) NCHW RGB, the raw pixel values 0..255 as float32 (or uint8 when the metadata says
    ``"dtype": "uint8"``). With ``"any_input_size": true`` (what ``gradad export`` writes) H and W
    are free (equal within a batch): the graph resizes to the model's input size inside with the
    antialiased bilinear filter, and returns the strict protocol's maps at H x W (upsampled,
    Gaussian-smoothed) and their maxima as scores; the scorer feeds each image at its own size.
    Without it the input is exactly the metadata's height x width and this module resizes each
    image (Pillow's antialiased bilinear filter in float, the values of
    ``F.interpolate(..., mode='bilinear', antialias=True)``). The graph scales to 0..1 and
    normalises with the backbone's mean and std. N is free when the batch dimension is dynamic.
Outputs (named in the metadata):
    anomaly map (N, h, w) float32 and image score (N,) float32; an image is anomalous when its
    score > threshold.

    scorer = Scorer("model.onnx")
    for p in scorer.predict(["a.png", "b.png"]):
        print(p.score, p.anomalous, p.anomaly_map.shape)
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import load_image, resize_map, resize_rgb
from .metadata import MetadataError, metadata_path, read_metadata

__all__ = ["BACKENDS", "Prediction", "Scorer"]

BACKENDS = ("auto", "onnxruntime", "openvino")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}


class _OrtBackend:
    def __init__(self, path: str, threads: int | None, streams: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if streams > 1:  # each concurrent run gets its share of the cores
            options.intra_op_num_threads = max(1, (threads or os.cpu_count() or 1) // streams)
        elif threads:
            options.intra_op_num_threads = threads
        # idle threads must not spin: the scorer shares the cores with image decoding and writing,
        # and spinning pools starve each other (three scorers in turn at batch 1 on 2 cores: 25
        # images/s each with spinning, 83 without)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.streams = streams
        self.inputs = {i.name: (list(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()}
        self.outputs = {o.name: list(o.shape) for o in self.session.get_outputs()}

    def run(self, input_name: str, chunks: list, outputs: list) -> list:
        """Each chunk's outputs; up to ``streams`` chunks at once (one session runs concurrently
        from several threads, each run on its own share of the cores)."""
        def one(chunk):
            return self.session.run(outputs, {input_name: chunk})
        if self.streams == 1 or len(chunks) == 1:
            return [one(chunk) for chunk in chunks]
        with ThreadPoolExecutor(max_workers=min(self.streams, len(chunks))) as pool:
            return list(pool.map(one, chunks))


class _OpenVinoBackend:
    def __init__(self, path: str, threads: int | None, streams: int):
        import openvino as ov

        core = ov.Core()
        # f32: OpenVINO's CPU plugin would otherwise run in bf16 on CPUs that have it
        config = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": streams}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        # OpenVINO's streams: requests run at once, each on its share of the cores
        self.queue = ov.AsyncInferQueue(self.compiled, streams) if streams > 1 else None

        def dims(port):
            return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        types = {"f32": "float32", "u8": "uint8"}
        self.inputs = {p.get_any_name(): (dims(p), types.get(p.get_element_type().get_type_name(),
                                                             p.get_element_type().get_type_name()))
                       for p in self.compiled.inputs}
        self.outputs = {name: dims(p) for p in self.compiled.outputs for name in p.get_names()}
        self._ports = {name: p for p in self.compiled.outputs for name in p.get_names()}

    def run(self, input_name: str, chunks: list, outputs: list) -> list:
        """Each chunk's outputs; up to ``streams`` chunks at once (OpenVINO's async requests)."""
        def copy(result):  # a request's output tensors are reused by its next run
            return [np.array(result[self._ports[name]]) for name in outputs]
        if self.queue is None or len(chunks) == 1:
            return [copy(self.request.infer({input_name: chunk})) for chunk in chunks]
        results: list = [None] * len(chunks)

        def done(request, index):
            results[index] = copy(request.results)
        self.queue.set_callback(done)
        for index, chunk in enumerate(chunks):
            self.queue.start_async({input_name: chunk}, index)
        self.queue.wait_all()
        if any(r is None for r in results):
            raise RuntimeError(f"OpenVINO returned no outputs for {sum(r is None for r in results)} of "
                               f"{len(chunks)} parts of the batch")
        return results


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
        threads: the runtime's threads in all (its default when None).
        streams: parts of a batch scored at the same time, each on its share of the threads
            (OpenVINO's CPU streams; in onnxruntime, concurrent runs of one session). 1 runs the
            whole batch at once with every thread on each operator; 2 or more is faster for a
            model of many short operators on few cores, such as an int8 export (2-core AMD EPYC,
            Lite demo, batch 32: benchmarks/results/cpu-amd-epyc/export.md). A batch smaller
            than ``streams`` uses fewer.
        threshold: a decision threshold to use instead of the metadata's.

    Raises FileNotFoundError for a missing model or metadata file and MetadataError when the
    metadata does not match the model's inputs and outputs.
    """

    def __init__(self, model_path: str | os.PathLike, backend: str = "auto", metadata: str | None = None,
                 threads: int | None = None, threshold: float | None = None, streams: int = 1):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_path: model file {path} not found")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if threads is not None and not _positive_int(threads):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if not _positive_int(streams):
            raise ValueError(f"streams must be a positive int, got {streams!r}")
        if threads is not None and streams > threads:
            raise ValueError(f"streams ({streams}) must not exceed threads ({threads}): each stream needs a thread")
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
        self.streams = streams
        self._backend = (_OpenVinoBackend if self.backend_name == "openvino" else _OrtBackend)(path, threads, streams)
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

    @property
    def any_input_size(self) -> bool:
        """True when the graph takes images of any size and resizes and post-processes inside."""
        return bool(self.metadata.get("any_input_size"))

    def _prepare_rgb(self, rgb: np.ndarray) -> np.ndarray:
        if self.any_input_size:
            planes = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        else:
            planes = resize_rgb(rgb, *self.input_size)
        if self.metadata["input"]["dtype"] == "uint8":
            return np.clip(np.rint(planes), 0, 255).astype(np.uint8)
        return planes

    def run(self, batch: np.ndarray) -> tuple:
        """Prepared images (N, 3, H, W) -> (anomaly maps (N, h, w) float32, scores (N,) float32).

        H x W: the metadata's input size, or any size when the graph resizes inside (then the
        maps are (N, H, W))."""
        inp = self.metadata["input"]
        want = (3, inp["height"], inp["width"])
        if self.any_input_size and isinstance(batch, np.ndarray) and batch.ndim == 4:
            want = (3, *batch.shape[2:])
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1:] != want or \
                batch.dtype != np.dtype(inp["dtype"]):
            raise ValueError(f"batch must be a {inp['dtype']} array (N, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{getattr(batch, 'dtype', type(batch).__name__)} {getattr(batch, 'shape', '')}")
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, 0, 0), np.float32), np.zeros((0,), np.float32)
        if self._batch:  # a fixed-batch graph: runs of its batch, the last one padded
            starts = range(0, n, self._batch)
            chunks = [batch[i:i + self._batch] for i in starts]
            chunks[-1] = np.concatenate([chunks[-1], np.zeros((self._batch - len(chunks[-1]), *want), batch.dtype)])
        else:  # one run per stream
            chunks = np.array_split(batch, min(self.streams, n))
        names = [self.metadata["outputs"]["anomaly_map"], self.metadata["outputs"]["score"]]
        results = self._backend.run(inp["name"], [np.ascontiguousarray(c) for c in chunks], names)
        maps = np.concatenate([np.asarray(amap, dtype=np.float32) for amap, _ in results])[:n]
        scores = np.concatenate([np.asarray(score, dtype=np.float32).reshape(-1) for _, score in results])[:n]
        return maps, scores

    def predict(self, images, batch_size: int = 8, original_size: bool = False) -> list:
        """Scores images (see the module docstring for what an image may be).

        Args:
            images: a sequence of images.
            batch_size: images per run (a fixed-batch graph uses its own).
            original_size: resize each map to its image's (H, W) (bilinear) instead of the
                model's map resolution (a graph with any_input_size gives maps at the image's
                size already).

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
            for group in self._same_size_groups(rgbs):
                maps, scores = self.run(np.stack([self._prepare_rgb(rgb) for rgb in group]))
                for rgb, amap, score in zip(group, maps, scores):
                    size = rgb.shape[:2]
                    amap = resize_map(amap, *size) if original_size else amap
                    results.append(Prediction(float(score), bool(score > self.threshold), amap, tuple(size)))
        return results

    def _same_size_groups(self, rgbs: list) -> list:
        """Runs of consecutive images of one size (a graph of any input size takes one size per
        batch); all in one group when the scorer resizes."""
        if not self.any_input_size:
            return [rgbs]
        groups = []
        for rgb in rgbs:
            if groups and groups[-1][0].shape == rgb.shape:
                groups[-1].append(rgb)
            else:
                groups.append([rgb])
        return groups
