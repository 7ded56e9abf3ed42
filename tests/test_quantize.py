"""gradad export --precision fp16|int8 (gradad.quantize): in ONNX (onnxruntime) and OpenVINO, the
files against the float32 PyTorch model (gradad.inference.predict), only the lowered scopes
computing with lowered weights (read from the written graphs), the recorded accuracy and
threshold recomputed here from the files' own scores (numpy, scikit-learn), the refusal of a
model that loses AUROC, and the torch-free predict of the reduced files.

A tiny model (random backbone weights, 32-pixel input, one epoch) keeps this file fast; its
int8 accuracy means nothing, so the AUROC check is off except where it is the subject.
"""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import grad_ext.onnx
from gradad import deploy
from gradad.checkpoint import read_checkpoint
from gradad.cli import main
from gradad.export import DetectorGraph, dynamic_shapes, example_input, export_detector
from gradad.inference import load_model
from gradad.precision_check import AccuracyError
from gradad.quantize import LOWERED_SCOPES, PrecisionConfig, lowered_nodes
from tests.synthetic import make_mvtec
from tests.test_cli import TINY_TRAIN
from tests.test_export import reference
from tests.torchless import torchless_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_GOOD, N_BAD = 12, 4, 4
# scores of the reduced file against the float32 PyTorch model, relative to the largest score:
# fp16 weights move them by rounding only; int8 of a random-weight 32-pixel backbone by a lot,
# the bound catches a broken graph (e.g. a quantized head or a lost scale), not a loss of quality
SCORE_RTOL = {"fp16": 5e-3, "int8": 0.5}
# the recorded score change and the scores recomputed here come from the same files and runtime
RECORD_RTOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data") / "mvtec", classes=("a",), n_train=N_TRAIN,
                      n_test_good=N_GOOD, n_test_bad=N_BAD, size=40)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--dataset", "mvtec", "--root", str(data), "--out", str(run), *TINY_TRAIN]) == 0
    return str(run / "checkpoint.pt")


def labelled_test_images(data):
    good = sorted(str(p) for p in (data / "a" / "test" / "good").iterdir())
    bad = sorted(str(p) for p in (data / "a" / "test" / "broken").iterdir())
    return good + bad, np.array([0] * len(good) + [1] * len(bad))


def scores_of(scorer, paths):
    return np.array([p.score for p in scorer.predict(paths, batch_size=3)])


def readers_of_lowered_weights(model_path):
    """(count of lowered weights, names of the nodes that compute with one, as ONNX node names):
    a lowered weight is an int8 or float16 constant, followed through its decompression (the
    casts, dequantization and scale products between it and the node that uses it)."""
    if model_path.endswith(".onnx"):
        graph = onnx.load(model_path).graph
        low = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8)}
        lowered = {out for n in graph.node if n.op_type in ("Cast", "DequantizeLinear") and n.input[0] in low
                   for out in n.output}
        return len(lowered), {n.name for n in graph.node if lowered & set(n.input)}
    decompression = ("Convert", "Subtract", "Multiply", "FakeQuantize", "Reshape")
    low_types = (ov.Type.f16, ov.Type.i8, ov.Type.u8)
    ops = ov.Core().read_model(model_path).get_ordered_ops()
    weights = [op for op in ops if op.get_type_name() == "Constant" and op.get_element_type() in low_types
               and op.get_output_size() and op.get_output_partial_shape(0).rank.get_length() >= 2]
    readers, frontier = set(), [t.get_node() for w in weights for t in w.output(0).get_target_inputs()]
    while frontier:
        node = frontier.pop()
        # OpenVINO names an operation after its ONNX node, '/...' for the parts it splits off;
        # decompression of a weight is named after the weight, not after a node of the graph
        if node.get_type_name() in decompression:
            frontier += [t.get_node() for t in node.output(0).get_target_inputs()]
        else:
            readers.add(node.get_friendly_name().split("/")[0])
    return len(weights), readers


def float32_graph_nodes(checkpoint, fmt, folder):
    """(the nodes the format lowers, the backbone's nodes) of the float32 ONNX graph the
    format's export starts from (OpenVINO's names follow the ONNX export with the resize as
    matrix products)."""
    loaded = load_model(checkpoint, device="cpu")
    resize = "matmul" if fmt == "openvino" else "native"
    graph = DetectorGraph(loaded.backbone, loaded.model, loaded.config.image_size, resize).eval()
    path = os.path.join(folder, f"{resize}.onnx")
    with torch.no_grad():
        grad_ext.onnx.export(graph, (example_input(loaded),), path, dynamic_shapes=dynamic_shapes(),
                             input_names=["image"], output_names=["anomaly_map", "score"])
    proto = onnx.load(path)
    return lowered_nodes(proto, LOWERED_SCOPES[fmt]), lowered_nodes(proto, ["backbone"])


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_against_fp32(checkpoint, data, fmt, precision, tmp_path):
    result = export_detector(checkpoint, fmt, tmp_path / "out", precision=PrecisionConfig(precision,
                                                                                           max_auroc_drop=None))
    meta = deploy.read_metadata(result.metadata_path)
    assert meta["precision"] == precision and meta["schema_version"] == deploy.SCHEMA_VERSION
    record = meta["quantization"]
    stored = read_checkpoint(checkpoint)
    validation = stored["validation"]["paths"]
    test_paths, labels = labelled_test_images(data)
    backend = "onnxruntime" if fmt == "onnx" else "openvino"
    scorer = deploy.Scorer(result.model_path, backend=backend)

    # parity: the reduced file against the float32 PyTorch model on the held-back images
    _, torch_scores = reference(checkpoint, validation + test_paths)
    reduced = scores_of(scorer, validation + test_paths)
    change = np.abs(reduced - torch_scores)
    assert change.max() <= SCORE_RTOL[precision] * np.abs(torch_scores).max(), f"{fmt} {precision}: {change.max()}"

    # the record: counts, AUROC and score change as computed here from the written file
    accuracy = record["accuracy"]
    assert (accuracy["validation_normals"], accuracy["test_images"], accuracy["test_anomalous"]) == \
        (len(validation), N_GOOD + N_BAD, N_BAD)
    n = len(validation)
    assert accuracy["auroc"] == pytest.approx(roc_auc_score(labels, reduced[n:]))
    assert accuracy["auroc_fp32"] == pytest.approx(roc_auc_score(labels, torch_scores[n:]))
    assert accuracy["max_score_change"] == pytest.approx(change.max(), rel=RECORD_RTOL,
                                                         abs=1e-4 * np.abs(torch_scores).max())
    assert record["runtime"] == backend and record["lowered"] == list(LOWERED_SCOPES[fmt])

    # the threshold: the run's rule (quantile 0.99) on the reduced model's scores of the validation normals
    assert stored["validation"]["quantile"] == 0.99
    assert meta["threshold"] == pytest.approx(np.quantile(reduced[:n], 0.99), rel=1e-6)
    assert precision in meta["threshold_source"]

    # only the lowered scopes compute with lowered weights (the grids, coordinates' linear layers
    # and refinement stay float32), and the head's convolutions are among them
    lowered, backbone = float32_graph_nodes(checkpoint, fmt, tmp_path)
    count, readers = readers_of_lowered_weights(result.model_path)
    assert count > 0 and readers <= lowered, sorted(readers - lowered)
    assert readers & backbone and readers & (lowered - backbone)
    fp32 = export_detector(checkpoint, fmt, tmp_path / "fp32")
    if precision == "int8":
        calibration = record["calibration"]
        # the run's training normals: all of them but the validation normals, none held back
        assert calibration["count"] == N_TRAIN - n and "training normals" in calibration["source"]
        assert len(calibration["sha256"]) == 64
    else:
        assert "calibration" not in record
        size = sum(os.path.getsize(os.path.join(result.out_dir, f)) for f in os.listdir(result.out_dir))
        fp32_size = sum(os.path.getsize(os.path.join(fp32.out_dir, f)) for f in os.listdir(fp32.out_dir))
        assert size < fp32_size  # the backbone's weights are stored in half the bytes


def test_calibration_folder_leaves_out_held_back_images(checkpoint, data, tmp_path):
    # the training folder holds the validation normals too: they measure the cost, so they are left out
    folder = data / "a" / "train" / "good"
    result = export_detector(checkpoint, "onnx", tmp_path / "out", precision=PrecisionConfig(
        "int8", calibration_dir=str(folder), max_auroc_drop=None))
    calibration = result.metadata["quantization"]["calibration"]
    n_validation = len(read_checkpoint(checkpoint)["validation"]["paths"])
    assert calibration["count"] == N_TRAIN - n_validation
    assert f"{n_validation} held-back images left out" in calibration["source"]


def test_auroc_drop_is_refused_and_nothing_written(checkpoint, tmp_path):
    # calibrated on flat grey images, every activation range is degenerate: the scores collapse
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(flat / f"{i}.png")
    out = tmp_path / "never"
    with pytest.raises(AccuracyError, match="max-auroc-drop 0.0"):
        export_detector(checkpoint, "onnx", out, precision=PrecisionConfig("int8", calibration_dir=str(flat),
                                                                           max_auroc_drop=0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat"]
    # the command line says so in one line and fails
    assert main(["export", "--checkpoint", checkpoint, "--out", str(out), "--precision", "int8",
                 "--calibration", str(flat), "--max-auroc-drop", "0"]) == 1
    assert not out.exists()


def test_precision_bad_input(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="precision"):
        PrecisionConfig("int4")
    with pytest.raises(ValueError, match="calibration"):
        PrecisionConfig("fp16", calibration_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_auroc_drop"):
        PrecisionConfig("int8", max_auroc_drop=2)
    with pytest.raises(ValueError, match="calibration_images"):
        PrecisionConfig("int8", calibration_images=0)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="torch format"):
        export_detector(checkpoint, "torch", out, precision=PrecisionConfig("int8"))
    with pytest.raises(NotADirectoryError, match="calibration"):
        export_detector(checkpoint, "onnx", out, precision=PrecisionConfig("int8", calibration_dir=str(tmp_path / "x")))
    # OpenVINO int8 without NNCF: an error naming the extra, not a float32 file
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ImportError, match=r"grad-ext\[export\]"):
        export_detector(checkpoint, "openvino", out, precision=PrecisionConfig("int8", max_auroc_drop=None))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a float32 export says so in its metadata
    fp32 = export_detector(checkpoint, "onnx", tmp_path / "fp32")
    assert fp32.metadata["precision"] == "fp32" and "quantization" not in fp32.metadata


def test_torchless_predict_reads_reduced_files(checkpoint, data, tmp_path):
    """`gradad predict` where torch cannot be imported scores the int8 files as the Scorer does."""
    paths, _ = labelled_test_images(data)
    env, marker = torchless_env(tmp_path, [os.path.join(ROOT, "python")])
    for fmt in ("onnx", "openvino"):
        result = export_detector(checkpoint, fmt, tmp_path / fmt, precision=PrecisionConfig("int8",
                                                                                            max_auroc_drop=None))
        out = tmp_path / f"predict-{fmt}"
        done = subprocess.run([sys.executable, "-m", "gradad", "predict", *paths, "--checkpoint", result.model_path,
                               "--out", str(out)], env=env, capture_output=True, text=True, cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert not marker.exists(), "something imported torch"
        rows = json.loads((out / "results.json").read_text())["images"]
        expected = scores_of(deploy.Scorer(result.model_path), paths)
        np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5)
        assert json.loads((out / "results.json").read_text())["threshold"] == pytest.approx(
            result.metadata["threshold"])


def test_serve_scores_a_reduced_file_and_names_its_precision(checkpoint, data, tmp_path):
    from tests.serving import request, service_thread

    paths, _ = labelled_test_images(data)
    result = export_detector(checkpoint, "onnx", tmp_path / "int8", precision=PrecisionConfig("int8",
                                                                                               max_auroc_drop=None))
    expected = scores_of(deploy.Scorer(result.model_path), paths[:2])
    with service_thread(checkpoint=result.model_path, data=str(tmp_path / "log")) as (url, _):
        status = request(url, "GET", "/v1/status").json()
        assert status["model"]["precision"] == "int8"
        assert status["threshold"] == pytest.approx(result.metadata["threshold"])
        for path, want in zip(paths[:2], expected):
            with open(path, "rb") as handle:
                got = request(url, "POST", "/v1/inspect", handle.read(), {"Content-Type": "image/png"}).json()
            assert got["score"] == pytest.approx(want, rel=1e-5)



def test_lowered_nodes_follow_the_recorded_scopes():
    # nodes by the exporter's name-scope record: a head module the model lacks has none, and a
    # graph without the backbone's record is refused rather than lowered blindly
    def node(name, scopes):
        made = onnx.helper.make_node("Relu", ["x"], [name], name=name)
        if scopes is not None:
            made.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
        return made

    nodes = [node("stem", ["", "backbone", "backbone.stem", "conv"]), node("fuse", ["", "model", "model.fusion", "a"]),
             node("grid", ["", "model", "sample_grid"]), node("bare", None),
             node("out", ["", "model", "model.output", "conv2d"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [])
    proto = onnx.helper.make_model(graph)
    assert lowered_nodes(proto, ["backbone", "model.fusion", "model.local_coordinates"]) == {"stem", "fuse"}
    assert lowered_nodes(proto, LOWERED_SCOPES["onnx"]) == {"stem", "fuse", "out"}
    with pytest.raises(ValueError, match="backbone"):
        lowered_nodes(onnx.helper.make_model(onnx.helper.make_graph(nodes[1:], "g", graph.input, [])), ["backbone"])
