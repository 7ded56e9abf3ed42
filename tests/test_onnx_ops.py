"""ONNX export of grad_ext.grid_sample and grad_ext.refine (grad_ext.onnx): small modules exported
with torch.onnx.export(dynamo=True) and a dynamic batch, run with onnxruntime and OpenVINO on the
CPU at two batch sizes, against the eager PyTorch ops."""
import itertools
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from torch import nn

import grad_ext
import grad_ext.onnx as gonnx

RTOL, ATOL = 1e-4, 1e-5
COMBOS = list(itertools.product(("bilinear", "nearest"), ("zeros", "border", "reflection"), (False, True)))
BATCHES = (2, 5)  # the export's example batch, then another through the dynamic dimension


def batch_dim():
    return torch.export.Dim("batch", min=1, max=64)


def run_ort(model_proto, inputs):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: v.numpy() for n, v in zip(names, inputs)})


_OV_CORE = ov.Core()


def run_openvino(path, inputs):
    # f32 explicitly: OpenVINO's CPU plugin defaults to bf16 on CPUs that have it
    compiled = _OV_CORE.compile_model(_OV_CORE.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled([v.numpy() for v in inputs])
    return [result[out] for out in compiled.outputs]


def assert_outputs_close(got, expected, what):
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        e = e.detach().numpy()
        assert g.shape == e.shape, f"{what} output {i}: shape {g.shape} != {e.shape}"
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL, err_msg=f"{what} output {i}")


def op_types(model_proto):
    return [n.op_type for n in model_proto.graph.node]


# ---- grid_sample ---------------------------------------------------------------------------

class SampleMany(nn.Module):
    """Every mode/padding/align_corners combination on three forms of a d-D table: one table per
    image (B, C, S..) with grid (B, O.., d); a shared table (1, C, S..) with the local form
    (B, O.., d); and the shared table with the global form (B, 1.., d)."""

    def __init__(self, d: int, channels: int = 3, size: int = 5):
        super().__init__()
        self.d = d
        self.table = nn.Parameter(torch.randn(1, channels, *[size] * d, generator=torch.Generator().manual_seed(d)))

    def forward(self, tables, local_grid, global_grid):
        outs = []
        for mode, padding, align in COMBOS:
            outs.append(grad_ext.grid_sample(tables, local_grid, mode, padding, align))
            outs.append(grad_ext.grid_sample(self.table, local_grid, mode, padding, align))
            outs.append(grad_ext.grid_sample(self.table, global_grid, mode, padding, align))
        return tuple(outs)


class Sample(nn.Module):
    def __init__(self, d=2, **kwargs):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 3, *[4] * d))
        self.kwargs = kwargs

    def forward(self, grid):
        return grad_ext.grid_sample(self.table, grid, **self.kwargs)


def sample_inputs(d: int, batch: int, channels: int = 3, size: int = 4, out: int = 3):
    g = torch.Generator().manual_seed(100 * d + batch)
    tables = torch.randn(batch, channels, *[size] * d, generator=g)
    # coordinates past [-1, 1] so that every padding mode is exercised
    local_grid = torch.rand(batch, *[out] * d, d, generator=g) * 2.5 - 1.25
    global_grid = torch.rand(batch, *[1] * d, d, generator=g) * 2.5 - 1.25
    return tables, local_grid, global_grid


@pytest.fixture(scope="module")
def exported_samplers(tmp_path_factory):
    """(d, sampler) -> (module, path of its .onnx, model proto), exported once per module."""
    folder = tmp_path_factory.mktemp("onnx_samplers")
    cache = {}

    def get(d, sampler):
        if (d, sampler) not in cache:
            model = SampleMany(d).eval()
            dim = batch_dim()
            path = str(folder / f"sample_d{d}_{sampler}.onnx")
            gonnx.export(model, sample_inputs(d, BATCHES[0]), path, opset=20, sampler=sampler,
                         dynamic_shapes=({0: dim}, {0: dim}, {0: dim}))
            cache[d, sampler] = model, path, onnx.load(path)
        return cache[d, sampler]
    return get


CASES = [(1, "gridsample"), (2, "gridsample"), (3, "gridsample"), (1, "gather"), (2, "gather"), (3, "gather"),
         (4, "auto"), (1, "matmul"), (2, "matmul"), (3, "matmul"), (4, "matmul")]


@pytest.mark.parametrize("d,sampler", CASES)
def test_grid_sample_onnxruntime_matches_eager(exported_samplers, d, sampler):
    model, _, proto = exported_samplers(d, sampler)
    for batch in BATCHES:
        inputs = sample_inputs(d, batch)
        with torch.no_grad():
            expected = model(*inputs)
        assert_outputs_close(run_ort(proto, inputs), expected, f"onnxruntime d={d} {sampler} batch {batch}")


@pytest.mark.parametrize("d,sampler", [c for c in CASES if c != (3, "gridsample")])
def test_grid_sample_openvino_matches_eager(exported_samplers, d, sampler):
    # OpenVINO runs GridSample on 4-D inputs only, so a 3-D table needs sampler='gather' there.
    model, path, _ = exported_samplers(d, sampler)
    for batch in BATCHES:
        inputs = sample_inputs(d, batch)
        with torch.no_grad():
            expected = model(*inputs)
        assert_outputs_close(run_openvino(path, inputs), expected, f"OpenVINO d={d} {sampler} batch {batch}")


@pytest.mark.parametrize("d,sampler", CASES)
def test_graph_uses_the_chosen_sampler_and_never_copies_the_shared_table(exported_samplers, d, sampler):
    _, _, proto = exported_samplers(d, sampler)
    types = op_types(proto)
    calls = 3 * len(COMBOS)
    if gonnx.sampler_for(d, 20, sampler) == "gridsample":
        assert types.count("GridSample") == calls
    elif sampler == "matmul":
        assert "GridSample" not in types and types.count("MatMul") == calls
    else:
        assert "GridSample" not in types and "Gather" in types
    # The shared table (5^d cells, more than the 3^d or 1 points per image) reaches the sampler
    # unexpanded: no Expand or Tile node reads it or a view of it, and no constant is larger.
    # (The exporter folds a reshaped view of the table into a constant of its own per call, which
    # it merges only for small tables: hence any number of them.)
    numel = 3 * 5 ** d
    sizes = [int(np.prod(init.dims)) for init in proto.graph.initializer]
    assert max(sizes) == numel
    table = {init.name for init, size in zip(proto.graph.initializer, sizes) if size == numel}
    derived = set(table)
    for node in proto.graph.node:  # nodes are topologically sorted
        if derived & set(node.input):
            assert node.op_type not in ("Expand", "Tile"), f"{node.op_type} copies the shared table"
            if node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"):
                derived.update(node.output)


@pytest.mark.parametrize("sampler,points,form", [
    ("gridsample", (6, 6), "expand"), ("gridsample", (1, 1), "fold"), ("gridsample", (3, 5), "fold"),
    ("auto", (6, 6), "expand"), ("auto", (1, 1), "matmul"), ("auto", (3, 5), "matmul")])
def test_shared_table_takes_the_cheaper_form(tmp_path, sampler, points, form):
    # a 4 x 4 table shared by the batch: 16 cells per copy against prod(points) output values per
    # image; 'auto' takes the matmul form where GridSample would fold (GRAD's global grid)
    model = Sample(2, mode="bilinear", padding_mode="border").eval()
    path = str(tmp_path / "shared.onnx")
    gonnx.export(model, (torch.rand(2, *points, 2) * 2 - 1,), path, sampler=sampler,
                 dynamic_shapes=({0: batch_dim()},))
    types = op_types(onnx.load(path))
    assert ("Expand" in types) == (form == "expand")
    assert ("GridSample" in types) == (form != "matmul") and ("MatMul" in types) == (form == "matmul")
    if form != "matmul":
        assert ("Transpose" in types) == (form == "fold")
    proto = onnx.load(path)
    for batch in BATCHES:
        grid = torch.rand(batch, *points, 2, generator=torch.Generator().manual_seed(batch)) * 2.4 - 1.2
        with torch.no_grad():
            expected = (model(grid),)
        assert_outputs_close(run_ort(proto, (grid,)), expected, f"{form} onnxruntime batch {batch}")
        assert_outputs_close(run_openvino(path, (grid,)), expected, f"{form} OpenVINO batch {batch}")


def test_bicubic_exports_as_gridsample_only(tmp_path):
    # ONNX GridSample's cubic mode (renamed from 'bicubic' in opset 20) against F.grid_sample;
    # the gather and matmul forms have no bicubic and say so
    model = Sample(2, mode="bicubic", padding_mode="border", align_corners=True).eval()
    grid = torch.rand(3, 5, 4, 2, generator=torch.Generator().manual_seed(7)) * 2.4 - 1.2
    with torch.no_grad():
        expected = (model(grid),)
    for opset in (17, 20):
        proto = gonnx.export(model, (grid,), None, opset=opset, sampler="gridsample").model_proto
        assert_outputs_close(run_ort(proto, (grid,)), expected, f"bicubic opset {opset}")
    for sampler in ("gather", "matmul", "auto"):
        if sampler == "auto":
            grid = grid[:, :1, :1]  # one point per image: 'auto' would take the matmul form
        with pytest.raises(gonnx.ExportError, match="bicubic"):
            gonnx.export(model, (grid,), None, sampler=sampler)


def test_auto_sampler_follows_the_opset():
    assert [gonnx.sampler_for(d, 20) for d in (1, 2, 3, 4)] == ["gridsample"] * 3 + ["gather"]
    assert [gonnx.sampler_for(d, 16) for d in (1, 2, 3, 4)] == ["gridsample"] * 2 + ["gather"] * 2
    assert all(gonnx.sampler_for(d, 16, "gather") == "gather" for d in (1, 2, 3, 4))


@pytest.mark.parametrize("opset", [16, 17, 18, 19, 21])
def test_other_opsets_export_and_run(tmp_path, opset):
    # Below 18 the exporter builds at opset 18 and converts the model down; 3-D tables take the
    # gather decomposition below opset 20.
    model = SampleMany(2).eval()
    dim = batch_dim()
    proto = gonnx.export(model, sample_inputs(2, 2), None, opset=opset,
                         dynamic_shapes=({0: dim}, {0: dim}, {0: dim})).model_proto
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    inputs = sample_inputs(2, 3)
    with torch.no_grad():
        expected = model(*inputs)
    assert_outputs_close(run_ort(proto, inputs), expected, f"opset {opset}")


def test_three_d_table_below_opset_20_takes_the_gather_form():
    model = Sample(3, mode="bilinear", padding_mode="reflection").eval()
    proto = gonnx.export(model, (sample_inputs(3, 2)[1],), None, opset=18,
                         dynamic_shapes=({0: batch_dim()},)).model_proto
    assert "GridSample" not in op_types(proto)
    grid = sample_inputs(3, 4)[1]
    with torch.no_grad():
        expected = (model(grid),)
    assert_outputs_close(run_ort(proto, (grid,)), expected, "d=3 at opset 18")


# ---- refine --------------------------------------------------------------------------------

class Refine(nn.Module):
    def __init__(self, mse_weight, cos_weight, mse_threshold, return_refined):
        super().__init__()
        self.args = (mse_weight, cos_weight, mse_threshold, return_refined)

    def forward(self, rec, feat):
        return tuple(v for v in grad_ext.refine(rec, feat, *self.args) if v is not None)


def refine_inputs(batch: int, threshold: float, channels: int = 6, size: int = 5):
    """rec = feat + a per-pixel offset whose channel mean square is threshold/4 or 4·threshold, so
    the MSE indicator takes both values and no pixel sits near the threshold; pixel (0, 0) has a
    near-zero rec."""
    g = torch.Generator().manual_seed(batch)
    feat = torch.randn(batch, channels, size, size, generator=g)
    offset = torch.randn(batch, channels, size, size, generator=g)
    offset = offset / offset.pow(2).mean(dim=1, keepdim=True).sqrt()
    scale = torch.where(torch.rand(batch, 1, size, size, generator=g) < 0.5, 0.5, 2.0) * threshold ** 0.5
    rec = feat + offset * scale
    # one pixel where ||rec|| is below the cosine's eps (1e-8), so its clamp decides the value
    rec[:, :, 0, 0] = 1e-9 * torch.randn(batch, channels, generator=g)
    feat[:, :, 0, 0] = offset[:, :, 0, 0] * 0.5 * threshold ** 0.5
    return rec, feat


# GRAD's default weights, MSE-only and cosine-only similarity, with and without ``refined``
REFINE_VARIANTS = [(0.3, 0.7, 10.0, False), (1.0, 0.0, 0.5, True), (0.0, 1.0, 10.0, True), (0.3, 0.7, 2.0, True)]


@pytest.mark.parametrize("variant", REFINE_VARIANTS)
def test_refine_onnxruntime_and_openvino_match_eager(tmp_path, variant):
    model = Refine(*variant).eval()
    dim = batch_dim()
    path = str(tmp_path / "refine.onnx")
    proto = gonnx.export(model, refine_inputs(2, variant[2]), path, dynamic_shapes=({0: dim}, {0: dim})).model_proto
    assert len(proto.graph.output) == (4 if variant[3] else 3)
    for batch in BATCHES:
        inputs = refine_inputs(batch, variant[2])
        with torch.no_grad():
            expected = model(*inputs)
        below = (inputs[0] - inputs[1]).pow(2).mean(dim=1) < variant[2]
        assert below.any() and not below.all()  # both values of the MSE indicator
        assert_outputs_close(run_ort(proto, inputs), expected, f"refine {variant} onnxruntime batch {batch}")
        assert_outputs_close(run_openvino(path, inputs), expected, f"refine {variant} OpenVINO batch {batch}")


# ---- a GRAD-shaped module: both grids and the refinement in one graph --------------------------

class TinyGRAD(nn.Module):
    """GRAD's inference data flow on features (B, C, H, W): per-pixel coordinates into a shared
    local grid (B, H, W, 2), per-image coordinates (B, 1, 1, 2) into a shared global grid of whole
    C·H·W maps, a 1x1 fusion and the refinement's anomaly map."""

    def __init__(self, channels=4, size=6, local_res=4, global_res=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.size = size
        self.local_coords = nn.Conv2d(channels, 2, 1)
        self.global_coords = nn.Linear(channels, 2)
        self.local_grid = nn.Parameter(torch.randn(1, channels, local_res, local_res, generator=g))
        self.global_grid = nn.Parameter(torch.randn(1, channels * size * size, global_res, global_res, generator=g))
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, features):
        b, c, h, w = features.shape
        local = grad_ext.grid_sample(self.local_grid, torch.tanh(self.local_coords(features)).permute(0, 2, 3, 1))
        coords = torch.tanh(self.global_coords(features.mean(dim=(2, 3))))
        glob = grad_ext.grid_sample(self.global_grid, coords[:, None, None, :]).reshape(b, c, h, w)
        rec = self.fuse(torch.cat([glob, local], dim=1))
        out = grad_ext.refine(rec, features)
        return out.anomaly_map, out.sim


@pytest.mark.parametrize("opset", [18, 20])
def test_grad_shaped_module_exports_and_runs(tmp_path, opset):
    model = TinyGRAD().eval()
    dim = batch_dim()
    path = str(tmp_path / "tiny.onnx")
    gonnx.export(model, (torch.randn(2, 4, 6, 6),), path, opset=opset, dynamic_shapes=({0: dim},))
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    # the local grid (16 cells, 36 points per image) as GridSample, the global one (16 cells, one
    # point per image) as the matmul form
    assert op_types(proto).count("GridSample") == 1 and "MatMul" in op_types(proto)
    for batch in BATCHES:
        features = torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(features)
        assert_outputs_close(run_ort(proto, (features,)), expected, f"TinyGRAD onnxruntime batch {batch}")
        assert_outputs_close(run_openvino(path, (features,)), expected, f"TinyGRAD OpenVINO batch {batch}")


# ---- errors ----------------------------------------------------------------------------------

def test_opset_below_16_is_rejected_by_name():
    with pytest.raises(gonnx.ExportError, match="opset 15"):
        gonnx.translation_table(opset=15)
    with pytest.raises(gonnx.ExportError, match="opset 11"):
        gonnx.export(Sample(), (torch.rand(2, 3, 3, 2),), opset=11)
    with pytest.raises(TypeError, match="opset"):
        gonnx.translation_table(opset="20")
    with pytest.raises(ValueError, match="sampler"):
        gonnx.translation_table(sampler="cubic")
    with pytest.raises(ValueError, match="dim"):
        gonnx.sampler_for(5)


def test_gridsample_that_the_opset_lacks_is_rejected_by_name():
    with pytest.raises(gonnx.ExportError, match=r"opset >= 20.*requested opset 18"):
        gonnx.sampler_for(3, 18, "gridsample")
    with pytest.raises(gonnx.ExportError, match=r"requested opset 18"):
        gonnx.export(Sample(3), (torch.rand(2, 3, 3, 3, 3),), opset=18, sampler="gridsample")
    with pytest.raises(gonnx.ExportError, match="gather"):
        gonnx.export(Sample(4), (torch.rand(2, 2, 2, 2, 2, 4),), opset=20, sampler="gridsample")


def test_jitter_is_rejected():
    model = Sample(jitter_std=0.1, jitter_prob=0.5).eval()  # explicit jitter arguments jitter in eval mode too
    with pytest.raises(gonnx.ExportError, match="jitter"):
        gonnx.export(model, (torch.rand(2, 3, 3, 2),))
    program = torch.export.export(model, (torch.rand(2, 3, 3, 2),), strict=False)
    assert gonnx.jitter_calls(program) == ["sample_grid"]
    assert gonnx.jitter_calls(torch.export.export(Sample(), (torch.rand(2, 3, 3, 2),), strict=False)) == []
    # a fixed seed puts no random draw in the graph, so the translation itself meets the jitter
    seeded = Sample(jitter_std=0.1, jitter_prob=0.5, jitter_seed=(1, 2)).eval()
    with pytest.raises(Exception, match="training-time noise"):
        torch.onnx.export(seeded, (torch.rand(2, 3, 3, 2),), dynamo=True, verbose=False,
                          custom_translation_table=gonnx.translation_table())


def test_table_registered_at_another_opset_is_rejected():
    with pytest.raises(Exception, match="registered with an export at opset 18"):
        torch.onnx.export(Sample().eval(), (torch.rand(2, 3, 3, 2),), dynamo=True, verbose=False, opset_version=18,
                          custom_translation_table=gonnx.translation_table(opset=20))


def test_failed_export_leaves_no_file(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(gonnx.ExportError):
        gonnx.export(Sample(3), (torch.rand(2, 3, 3, 3, 3),), path, opset=18, sampler="gridsample")
    assert list(tmp_path.iterdir()) == []
    gonnx.export(Sample(), (torch.rand(2, 3, 3, 2),), path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    onnx.checker.check_model(onnx.load(str(path)))


def test_import_grad_ext_does_not_import_onnx():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, grad_ext; bad = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir') "
            "if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
