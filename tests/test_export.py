"""gradad export: the detector from image to answer in one ONNX / OpenVINO / torch.export file,
against the PyTorch model run the way gradad predict runs it (gradad.inference.predict:
LoadedModel, the dataset's resize and normalisation, gradad.evaluation.postprocess under the
strict protocol) on the same image files, at two batch sizes and at image sizes unlike the
model's; and gradad predict of an exported file where torch cannot be imported.

Tiny models (random backbone weights, 32-pixel input, one epoch) keep this file short.
"""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import grad_ext.onnx
from gradad import deploy
from gradad.checkpoint import CHECKPOINT_KIND, read_checkpoint
from gradad.cli import main
from gradad.evaluation import gaussian_smooth
from gradad.export import DetectorGraph, export_detector, gaussian_kernel, resize_matrix, upsample_smooth_matrix
from gradad.inference import load_model, predict
from tests.synthetic import make_mvtec
from tests.test_cli import TINY_TRAIN
from tests.torchless import torchless_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4
# (H, W) of the test images: three of one size (a batch), the model's own size, a tall one
SIZES = [(40, 52), (40, 52), (40, 52), (32, 32), (77, 45)]
VARIANTS = {
    "grad": [],
    "bigrid": ["--model", "bigrid", "--set", "bigrid.abnormal_epochs=1", "--set", "bigrid.normal_epochs=1"],
    "grad-3d": ["--set", "model.local_grid_dim=3"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data") / "mvtec", classes=("a",), n_train=6, n_test_good=1,
                      n_test_bad=1, size=40)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def trained(request, data, tmp_path_factory):
    """(variant, checkpoint file, reference maps and scores of gradad.inference.predict)."""
    run = tmp_path_factory.mktemp(request.param)
    assert main(["train", "--dataset", "mvtec", "--root", str(data), "--out", str(run), *TINY_TRAIN,
                 *VARIANTS[request.param]]) == 0
    return request.param, str(run / "checkpoint.pt"), run


def reference(checkpoint, paths):
    loaded = load_model(checkpoint, device="cpu")
    maps, scores = [], []
    for chunk in predict(loaded, paths, progress=False).chunks:
        maps += list(chunk.maps)
        scores += list(chunk.scores)
    return maps, np.asarray(scores)


def assert_close(got_maps, got_scores, ref_maps, ref_scores, what):
    for i, (g, r) in enumerate(zip(got_maps, ref_maps)):
        assert g.shape == r.shape, (what, i)
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err <= RTOL, f"{what}: image {i} map differs by {err:.2e} (relative to its max)"
    np.testing.assert_allclose(got_scores, ref_scores, rtol=RTOL, err_msg=what)


def rgb_batch(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths]).astype(np.float32)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_file_matches_the_torch_model(trained, images, fmt, tmp_path):
    variant, checkpoint, _ = trained
    result = export_detector(checkpoint, fmt, tmp_path / "exported")
    meta = deploy.read_metadata(result.metadata_path)
    assert meta["any_input_size"] and meta["protocol"] == "strict"
    assert meta["threshold"] == pytest.approx(read_checkpoint(checkpoint)["validation"]["threshold"])
    # trained on all classes of the dataset (no --classes): the checkpoint records which they were
    assert meta["class_names"] == read_checkpoint(checkpoint)["class_names"] == ["a"]
    ref_maps, ref_scores = reference(checkpoint, images)
    # the ONNX file has the native antialiased Resize, which OpenVINO ignores: its own export resizes by matmul
    for backend in ["onnxruntime"] if fmt == "onnx" else ["openvino"]:
        scorer = deploy.Scorer(result.model_path, backend=backend)
        preds = scorer.predict(images, batch_size=len(images))
        assert_close([p.anomaly_map for p in preds], [p.score for p in preds], ref_maps, ref_scores,
                     f"{variant} {fmt} {backend}")
        assert [p.anomalous for p in preds] == [s > meta["threshold"] for s in ref_scores]
        # two batch sizes straight into the graph: 1 and 3 images of one size
        same = images[:3]
        for batch in (1, 3):
            maps, scores = scorer.run(rgb_batch(same[:batch]))
            assert_close(list(maps), scores, ref_maps[:batch], ref_scores[:batch],
                         f"{variant} {fmt} {backend} batch {batch}")


def test_uint8_input_matches_the_torch_model(trained, images, tmp_path):
    # --input-dtype uint8: the graph takes the pixels as they are decoded (RGB 0..255 bytes)
    variant, checkpoint, _ = trained
    if variant != "grad":
        pytest.skip("one variant is enough for the input dtype")
    result = export_detector(checkpoint, "onnx", tmp_path / "u8", input_dtype="uint8")
    assert deploy.read_metadata(result.metadata_path)["input"]["dtype"] == "uint8"
    scorer = deploy.Scorer(result.model_path, backend="onnxruntime")
    ref_maps, ref_scores = reference(checkpoint, images)
    preds = scorer.predict(images, batch_size=len(images))
    assert_close([p.anomaly_map for p in preds], [p.score for p in preds], ref_maps, ref_scores, "uint8 onnx")
    maps, scores = scorer.run(rgb_batch(images[:3]).astype(np.uint8))
    assert_close(list(maps), scores, ref_maps[:3], ref_scores[:3], "uint8 onnx batch 3")
    with pytest.raises(ValueError, match="uint8"):  # float pixels into a uint8 graph: named, not cast
        scorer.run(rgb_batch(images[:1]))


def test_torch_export_matches(trained, images, tmp_path):
    variant, checkpoint, _ = trained
    if variant != "grad":
        pytest.skip("one variant is enough for the .pt2 path")
    result = export_detector(checkpoint, "torch", tmp_path / "pt2")
    program = torch.export.load(result.model_path)
    ref_maps, ref_scores = reference(checkpoint, images)
    with torch.no_grad():
        for batch in (1, 3):
            maps, scores = program.module()(torch.from_numpy(rgb_batch(images[:batch])))
            assert_close(list(maps.numpy()), scores.numpy(), ref_maps[:batch], ref_scores[:batch], f"pt2 {batch}")
        maps, scores = program.module()(torch.from_numpy(rgb_batch(images[4:5])))
        assert_close(list(maps.numpy()), scores.numpy(), ref_maps[4:5], ref_scores[4:5], "pt2 other size")


def test_predict_without_torch(trained, images, tmp_path):
    """`python -m gradad predict IMAGES --checkpoint model.onnx` with a `torch` that raises on
    import: the same results.json / results.csv keys as the torch-side predict, heatmaps, and
    the scores of the PyTorch model."""
    variant, checkpoint, _ = trained
    if variant != "grad":
        pytest.skip("one variant is enough for the command line")
    exported = export_detector(checkpoint, "onnx", tmp_path / "exported")
    env, marker = torchless_env(tmp_path, [os.path.join(ROOT, "python")])
    out = tmp_path / "light"
    done = subprocess.run([sys.executable, "-m", "gradad", "predict", *images, "--checkpoint", exported.model_path,
                           "--out", str(out)], env=env, capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "something imported torch"
    # the torch-side predict of the checkpoint, for the keys and the scores
    torch_out = tmp_path / "torch-side"
    assert main(["predict", *images, "--checkpoint", checkpoint, "--out", str(torch_out), "--no-progress"]) == 0
    light, heavy = (json.loads((d / "results.json").read_text()) for d in (out, torch_out))
    assert set(light) == set(heavy) and set(light["images"][0]) == set(heavy["images"][0])
    assert [r["path"] for r in light["images"]] == [r["path"] for r in heavy["images"]]
    np.testing.assert_allclose([r["score"] for r in light["images"]], [r["score"] for r in heavy["images"]],
                               rtol=RTOL)
    assert light["threshold"] == pytest.approx(heavy["threshold"])
    assert [r["anomalous"] for r in light["images"]] == [r["score"] > light["threshold"] for r in light["images"]]
    for row in light["images"]:
        with Image.open(row["heatmap"]) as img:
            assert img.size[0] > 0
    with open(out / "results.csv", newline="") as handle:
        light_csv = list(csv.DictReader(handle))
    with open(torch_out / "results.csv", newline="") as handle:
        assert set(light_csv[0]) == set(next(csv.DictReader(handle)))
    # report.html: the same gallery (names, decisions) as the torch-side page
    pages = [(d / "report.html").read_text() for d in (out, torch_out)]
    captions = [re.findall(r'class="name">([^<]*)</span>.*?class="decision[^"]*">([^<]*)<', p) for p in pages]
    assert captions[0] == captions[1] and len(captions[0]) == len(images)


# ---- bad input -------------------------------------------------------------------------------

def test_failed_export_leaves_nothing(trained, tmp_path):
    """A 3-D table as GridSample below opset 20 fails inside the exporter, after the staging
    folder was made: the error is grad_ext.onnx's, and neither --out nor the staging folder stays."""
    variant, checkpoint, _ = trained
    if variant != "grad-3d":
        pytest.skip("needs a 3-D table")
    out = tmp_path / "never"
    with pytest.raises(grad_ext.onnx.ExportError, match="opset"):
        export_detector(checkpoint, "onnx", out, opset=18, sampler="gridsample")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_raises_and_leaves_nothing(trained, tmp_path):
    variant, checkpoint, _ = trained
    if variant != "grad":
        pytest.skip("once is enough")
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError):
        export_detector(tmp_path / "missing.pt", "onnx", out)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        export_detector(corrupt, "onnx", out)
    unknown = tmp_path / "unknown.pt"
    torch.save({"kind": CHECKPOINT_KIND, "format": 999}, unknown)
    with pytest.raises(ValueError, match="format 999"):
        export_detector(unknown, "onnx", out)
    with pytest.raises(grad_ext.onnx.ExportError, match="opset"):
        export_detector(checkpoint, "onnx", out, opset=15)
    with pytest.raises(ValueError, match="format"):
        export_detector(checkpoint, "tflite", out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out"):
        export_detector(checkpoint, "onnx", full)
    assert os.listdir(full) == ["keep.txt"]
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 1


@pytest.mark.parametrize("size", [(2, 3), (7, 300), (24, 24), (61, 45), (517, 333)])
def test_upsampling_and_smoothing_as_two_products_match_the_protocol(size):
    # The exported graph's post-processing (two matrix products) against the strict protocol's
    # own steps: F.interpolate to the image size, then gradad.evaluation.gaussian_smooth
    # (smaller and larger than the map, and smaller than the kernel's reach).
    gen = torch.Generator().manual_seed(sum(size))
    amap = torch.rand(24, 24, generator=gen, dtype=torch.float64).float() * 5
    want = gaussian_smooth(torch.nn.functional.interpolate(amap[None, None], size=size, mode="bilinear",
                                                           align_corners=False)[0, 0])
    kernel = gaussian_kernel()
    rows = upsample_smooth_matrix(size[0], 24, kernel, amap)
    cols = upsample_smooth_matrix(size[1], 24, kernel, amap)
    got = rows @ amap @ cols.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("sizes", [(1, 5), (5, 1), (4, 9), (30, 240), (17, 7)])
def test_align_corners_resize_matrix_matches_interpolate(sizes):
    # GRAD.anomaly_map's upsampling (align_corners=True) as the matrix the exported graph folds
    # into its post-processing, growing and shrinking, and with single pixels on either side
    in_size, out_size = sizes
    gen = torch.Generator().manual_seed(in_size * 31 + out_size)
    signal = torch.rand(3, in_size, generator=gen)
    want = torch.nn.functional.interpolate(signal[None, :, :, None], size=(out_size, 1), mode="bilinear",
                                           align_corners=True)[0, :, :, 0]
    got = (resize_matrix(out_size, in_size, antialias=False, like=signal, align_corners=True) @ signal.T).T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="antialias"):
        resize_matrix(out_size, in_size, antialias=True, like=signal, align_corners=True)


@pytest.mark.parametrize("image", [(240, 240), (97, 333)])
def test_map_matrices_match_anomaly_map_then_the_protocol(image):
    # DetectorGraph's one matrix per axis against the steps it replaces: GRAD.anomaly_map's
    # upsampling to S, F.interpolate to the image, gradad.evaluation.gaussian_smooth
    graph = DetectorGraph.__new__(DetectorGraph)
    nn.Module.__init__(graph)
    graph.image_size = 240
    graph.register_buffer("kernel", gaussian_kernel())
    gen = torch.Generator().manual_seed(image[1])
    small = torch.rand(2, 30, 30, generator=gen) * 4
    upsampled = torch.nn.functional.interpolate(small[:, None], size=(240, 240), mode="bilinear",
                                                align_corners=True)
    want = torch.stack([gaussian_smooth(m) for m in torch.nn.functional.interpolate(
        upsampled, size=image, mode="bilinear", align_corners=False)[:, 0]])
    got = graph.map_matrix(image[0], 30, small) @ small @ graph.map_matrix(image[1], 30, small).T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
