"""gradad.deploy: the torch-free scorer of an exported model, on a tiny hand-made ONNX model
with the exported detector's contract, against the same module run in torch on images prepared
the way gradad trains (torch's antialiased bilinear resize)."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from gradad import deploy as rt
from tests.torchless import torchless_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 32, 48
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TinyDetector(nn.Module):
    """The exported detector's contract: image (N, 3, H, W) raw RGB 0..255 -> anomaly map
    (N, H/4, W/4) and image score (N,), normalisation inside."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, image):
        x = (image.to(torch.float32) / 255.0 - self.mean) / self.std
        amap = F.avg_pool2d(self.conv(x), 4).pow(2).mean(dim=1)
        return amap, amap.amax(dim=(1, 2))


def export_tiny(folder, dtype="float32", dynamic=True, threshold=None, name="model"):
    """Writes folder/name.onnx and name.json; returns (module, model path)."""
    model = TinyDetector().eval()
    example = torch.zeros(2, 3, HEIGHT, WIDTH, dtype=torch.uint8 if dtype == "uint8" else torch.float32)
    path = os.path.join(folder, f"{name}.onnx")
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    torch.onnx.export(model, (example,), path, dynamo=True, verbose=False, input_names=["image"],
                      output_names=["anomaly_map", "score"], dynamic_shapes=shapes, external_data=False)
    meta = rt.make_metadata(input_name="image", height=HEIGHT, width=WIDTH, dtype=dtype, map_output="anomaly_map",
                            score_output="score", threshold=0.0 if threshold is None else threshold,
                            class_names=["bottle"], versions={"torch": torch.__version__, "opset": "20"},
                            anomaly_map_size=[HEIGHT // 4, WIDTH // 4], protocol="paper")
    rt.write_metadata(rt.metadata_path(path), meta)
    return model, path


def expected_rgb(path):
    """The test's own decoding: 8-bit modes through Pillow's RGB conversion, 16-bit as v/257."""
    with Image.open(path) as img:
        if img.mode.startswith("I;16"):
            gray = np.round(np.asarray(img).astype(np.float64) / 257).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


def torch_prepared(rgb):
    """gradad's preparation in torch: float values, antialiased bilinear resize; (3, H, W) numpy."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None]
    if x.shape[-2:] != (HEIGHT, WIDTH):
        x = F.interpolate(x, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False, antialias=True)
    return x[0].numpy()


def torch_reference(model, rgbs):
    """The module in torch on images prepared the way gradad prepares them."""
    with torch.no_grad():
        amap, score = model(torch.from_numpy(np.stack([torch_prepared(rgb) for rgb in rgbs])))
    return amap.numpy(), score.numpy()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Files of every supported kind and size: RGB, grayscale, RGBA, 16-bit, palette, an image
    already at the model's size and one smaller than it."""
    folder = tmp_path_factory.mktemp("images")
    g = np.random.default_rng(0)
    made = {
        "rgb.png": Image.fromarray(g.integers(0, 256, (61, 83, 3), dtype=np.uint8)),
        "gray.png": Image.fromarray(g.integers(0, 256, (100, 70), dtype=np.uint8)),
        "rgba.png": Image.fromarray(g.integers(0, 256, (40, 64, 4), dtype=np.uint8)),
        "gray16.png": Image.fromarray(g.integers(0, 65536, (50, 90), dtype=np.uint16)),
        "palette.png": Image.fromarray(g.integers(0, 256, (45, 45, 3), dtype=np.uint8)).convert("P"),
        "exact.jpg": Image.fromarray(g.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)),
        "small.png": Image.fromarray(g.integers(0, 256, (20, 24, 3), dtype=np.uint8)),
    }
    paths = []
    for name, img in made.items():
        path = str(folder / name)
        img.save(path)
        paths.append(path)
    with Image.open(paths[3]) as img:
        assert img.mode.startswith("I;16")  # the 16-bit case is really 16-bit
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("model"))
    model, path = export_tiny(folder)
    return model, path


def assert_predictions_match(preds, amaps, scores, threshold):
    assert len(preds) == len(scores)
    for pred, amap, score in zip(preds, amaps, scores):
        np.testing.assert_allclose(pred.anomaly_map, amap, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(pred.score, score, rtol=1e-4, atol=1e-6)
        assert pred.anomalous == bool(pred.score > threshold)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_scores_files_of_every_kind_like_torch(exported, images, backend):
    model, path = exported
    amaps, scores = torch_reference(model, [expected_rgb(p) for p in images])
    threshold = float(np.median(scores))
    scorer = rt.Scorer(path, backend=backend, threshold=threshold)
    preds = scorer.predict(images, batch_size=3)  # batches of 3, 3 and 1 through the dynamic batch
    assert_predictions_match(preds, amaps, scores, threshold)
    assert {p.anomalous for p in preds} == {True, False}
    assert [p.image_size for p in preds] == [expected_rgb(p).shape[:2] for p in images]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_streams_score_parts_of_a_batch_at_once_like_torch(exported, images, tmp_path, backend):
    model, path = exported
    if backend == "openvino":
        path_ir = str(tmp_path / "model.xml")
        ov.save_model(ov.convert_model(path), path_ir, compress_to_fp16=False)
        rt.write_metadata(rt.metadata_path(path_ir), rt.read_metadata(rt.metadata_path(path)))
        path = path_ir
    amaps, scores = torch_reference(model, [expected_rgb(p) for p in images])
    scorer = rt.Scorer(path, backend=backend, threads=2, streams=2)
    assert scorer.streams == 2
    # 7 images in batches of 3, 3 and 1: two parts, two parts and one (a part per stream at most)
    assert_predictions_match(scorer.predict(images, batch_size=3), amaps, scores, 0.0)
    prepared = np.stack([scorer.prepare(p) for p in images])
    maps_2, scores_2 = scorer.run(prepared)
    maps_1, scores_1 = rt.Scorer(path, backend=backend, threads=2).run(prepared)
    np.testing.assert_allclose(maps_2, maps_1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores_2, scores_1, rtol=1e-6, atol=1e-7)


def test_streams_on_a_fixed_batch_graph_and_bad_streams(tmp_path, images):
    model, path = export_tiny(str(tmp_path), dynamic=False)
    amaps, scores = torch_reference(model, [expected_rgb(p) for p in images])
    # 7 images: padded runs of the graph's batch of 2, two at a time
    assert_predictions_match(rt.Scorer(path, threads=2, streams=2).predict(images, batch_size=7), amaps, scores,
                             0.0)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="streams must be a positive int"):
            rt.Scorer(path, streams=bad)
    with pytest.raises(ValueError, match=r"streams \(3\) must not exceed threads \(2\)"):
        rt.Scorer(path, threads=2, streams=3)


def test_numpy_and_pil_images(exported):
    model, path = exported
    g = np.random.default_rng(1)
    rgb = g.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    gray16 = g.integers(0, 65536, (33, 77), dtype=np.uint16)
    rgba = g.integers(0, 256, (36, 36, 4), dtype=np.uint8)
    inputs = [rgb, gray16, rgba, gray16[:, :, None].astype(np.uint8), Image.fromarray(rgb)]
    gray8 = np.round(gray16 / 257).astype(np.uint8)
    rgbs = [rgb, np.repeat(gray8[:, :, None], 3, 2), rgba[:, :, :3],
            np.repeat(gray16[:, :, None].astype(np.uint8), 3, 2), rgb]
    amaps, scores = torch_reference(model, rgbs)
    assert_predictions_match(rt.Scorer(path).predict(inputs), amaps, scores, 0.0)


def test_uint8_input_model(tmp_path, images):
    model, path = export_tiny(str(tmp_path), dtype="uint8")
    assert onnx.load(path).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    scorer = rt.Scorer(path)
    prepared = np.stack([scorer.prepare(p) for p in images])
    assert prepared.dtype == np.uint8
    # rounding the resized values to 8 bit may land one level apart where torch's and Pillow's
    # float results straddle a half
    reference = np.stack([torch_prepared(expected_rgb(p)) for p in images]).round().clip(0, 255)
    difference = np.abs(prepared.astype(np.int32) - reference.astype(np.int32))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99
    with torch.no_grad():
        amaps, scores = (t.numpy() for t in model(torch.from_numpy(prepared)))
    assert_predictions_match(scorer.predict(images), amaps, scores, 0.0)


def test_fixed_batch_graph_is_fed_padded_chunks(tmp_path, images):
    model, path = export_tiny(str(tmp_path), dynamic=False)
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    amaps, scores = torch_reference(model, [expected_rgb(p) for p in images])
    assert_predictions_match(rt.Scorer(path).predict(images, batch_size=5), amaps, scores, 0.0)


def test_openvino_ir_file(exported, images, tmp_path):
    model, path = exported
    xml = str(tmp_path / "model.xml")
    ov.save_model(ov.convert_model(path), xml, compress_to_fp16=False)
    rt.write_metadata(rt.metadata_path(xml), rt.read_metadata(rt.metadata_path(path)))
    amaps, scores = torch_reference(model, [expected_rgb(p) for p in images])
    scorer = rt.Scorer(xml)
    assert scorer.backend_name == "openvino"
    assert_predictions_match(scorer.predict(images), amaps, scores, 0.0)
    with pytest.raises(ValueError, match="OpenVINO IR"):
        rt.Scorer(xml, backend="onnxruntime")


def test_maps_at_the_original_size(exported, images):
    model, path = exported
    preds = rt.Scorer(path).predict(images[:2], original_size=True)
    for pred, image in zip(preds, images):
        rgb = expected_rgb(image)
        amap, _ = torch_reference(model, [rgb])
        upsampled = F.interpolate(torch.from_numpy(amap)[None], size=rgb.shape[:2], mode="bilinear",
                                  align_corners=False)[0, 0].numpy()
        assert pred.anomaly_map.shape == rgb.shape[:2]
        np.testing.assert_allclose(pred.anomaly_map, upsampled, rtol=1e-4, atol=1e-6)


def test_runs_where_torch_cannot_be_imported(exported, images, tmp_path):
    """A `torch` package that raises on import, first on the path: the scorer and its command
    line work, and nothing tries to import torch."""
    _, path = exported
    env, marker = torchless_env(tmp_path, [os.path.join(ROOT, "python")])
    check = ("import sys\n"
             "from gradad.deploy import Scorer\n"
             f"preds = Scorer({path!r}, backend=sys.argv[1]).predict({images!r})\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n"
             "print(repr([p.score for p in preds]))\n")
    expected = [p.score for p in rt.Scorer(path).predict(images)]
    for backend in ("onnxruntime", "openvino"):
        done = subprocess.run([sys.executable, "-c", check, backend], env=env, capture_output=True, text=True,
                              cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr
        np.testing.assert_allclose(eval(done.stdout), expected, rtol=1e-5)
    cli = subprocess.run([sys.executable, "-m", "gradad.deploy", path, *images], env=env, capture_output=True,
                         text=True, cwd=str(tmp_path))
    assert cli.returncode == 0, cli.stderr
    rows = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [r["path"] for r in rows] == images
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5)
    assert not marker.exists(), "something imported torch"
    # the stub really stands in for torch there
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True,
                           cwd=str(tmp_path))
    assert probe.returncode != 0 and "test stub" in probe.stderr


# ---- metadata and bad input --------------------------------------------------------------------

def good_metadata(**changes):
    meta = rt.make_metadata(input_name="image", height=HEIGHT, width=WIDTH, dtype="float32",
                            map_output="anomaly_map", score_output="score", threshold=1.5, class_names=["a"],
                            versions={"gradad": "0.1.0"})
    meta.update(changes)
    return meta


def test_metadata_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "model.json"
    rt.write_metadata(path, good_metadata())
    assert rt.read_metadata(path) == good_metadata()
    with pytest.raises(rt.MetadataError, match="threshold"):
        rt.write_metadata(path, good_metadata(threshold=float("nan")))
    assert rt.read_metadata(path) == good_metadata()  # the failed write left the old file
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]
    # a file of schema version 1 (before precision existed) still reads, as written
    version1 = good_metadata(schema_version=1)
    assert rt.validate_metadata(version1) == version1
    assert rt.metadata_path("x/model.onnx") == os.path.join("x", "model.json")
    assert rt.metadata_path("x/model.xml") == os.path.join("x", "model.json")


@pytest.mark.parametrize("changes,match", [
    ({"schema_version": 3}, "schema_version"),
    ({"precision": "int4"}, "precision"),
    ({"precision": "fp32", "quantization": {"calibration": {}}}, "quantization"),
    ({"schema_version": 1, "precision": "int8"}, "unknown"),
    ({"format": "other"}, "format"),
    ({"threshold": "1"}, "threshold"),
    ({"class_names": "a"}, "class_names"),
    ({"versions": {"gradad": 1}}, "versions"),
    ({"input": {"name": "image", "height": 0, "width": WIDTH, "dtype": "float32"}}, "input.height"),
    ({"input": {"name": "image", "height": HEIGHT, "width": WIDTH, "dtype": "float16"}}, "input.dtype"),
    ({"outputs": {"anomaly_map": "anomaly_map"}}, "outputs"),
    ({"unexpected": 1}, "unknown"),
])
def test_bad_metadata_is_named(changes, match):
    with pytest.raises(rt.MetadataError, match=match):
        rt.validate_metadata(good_metadata(**changes))


def test_missing_or_mismatched_metadata(exported, tmp_path):
    _, path = exported
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(open(path, "rb").read())
    with pytest.raises(FileNotFoundError, match="lone.json"):
        rt.Scorer(str(lone))
    (tmp_path / "lone.json").write_text("{not json")
    with pytest.raises(rt.MetadataError, match="not valid JSON"):
        rt.Scorer(str(lone))
    cases = [
        (good_metadata(input={"name": "pixels", "height": HEIGHT, "width": WIDTH, "dtype": "float32"}), "pixels"),
        (good_metadata(input={"name": "image", "height": 64, "width": WIDTH, "dtype": "float32"}), "64"),
        (good_metadata(input={"name": "image", "height": HEIGHT, "width": WIDTH, "dtype": "uint8"}), "dtype"),
        (good_metadata(outputs={"anomaly_map": "map", "score": "score"}), "outputs.anomaly_map"),
        (good_metadata(outputs={"anomaly_map": "score", "score": "anomaly_map"}), "rank"),
        (good_metadata(anomaly_map_size=[3, 3]), "anomaly_map_size"),
    ]
    for meta, match in cases:
        rt.write_metadata(tmp_path / "lone.json", meta)
        with pytest.raises(rt.MetadataError, match=match):
            rt.Scorer(str(lone))


def test_bad_images_and_arguments_are_named(exported, tmp_path):
    _, path = exported
    scorer = rt.Scorer(path)
    with pytest.raises(TypeError, match=r"images\[0\].*uint8 or uint16"):
        scorer.predict([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match=r"images\[1\].*shape"):
        scorer.predict([np.zeros((8, 8), np.uint8), np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        scorer.predict([str(tmp_path / "missing.png")])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        scorer.predict([str(tmp_path / "broken.png")])
    Image.fromarray(np.zeros((8, 8), np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="unsupported image mode"):
        scorer.predict([str(tmp_path / "wide.tif")])
    with pytest.raises(TypeError, match="sequence"):
        scorer.predict(str(tmp_path / "wide.tif"))
    with pytest.raises(ValueError, match="batch_size"):
        scorer.predict([], batch_size=0)
    with pytest.raises(ValueError, match="batch must be"):
        scorer.run(np.zeros((1, 3, HEIGHT + 1, WIDTH), np.float32))
    with pytest.raises(ValueError, match="backend"):
        rt.Scorer(path, backend="tensorrt")
    with pytest.raises(ValueError, match="threshold"):
        rt.Scorer(path, threshold=float("inf"))
    with pytest.raises(FileNotFoundError, match="model_path"):
        rt.Scorer(str(tmp_path / "none.onnx"))
    assert scorer.predict([]) == []
