"""torch.export of modules calling grad_ext.grid_sample and grad_ext.refine: the ops trace through
their fake kernels (grad_ext/_ops.py) with a dynamic batch, stay single nodes in the graph, and the
exported program (also after a .pt2 save/load) computes what the eager module computes."""
import pytest
import torch
from torch import nn

import grad_ext


class Detector(nn.Module):
    """GRAD's inference data flow: a shared local grid sampled at per-pixel coordinates
    (B, H, W, 2), a shared global grid of whole C·H·W maps sampled at one point per image
    (B, 1, 1, 2), a 3-D per-image table, and the refinement of the fused reconstruction."""

    def __init__(self, channels=4, size=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.local_coords = nn.Conv2d(channels, 2, 1)
        self.global_coords = nn.Linear(channels, 2)
        self.local_grid = nn.Parameter(torch.randn(1, channels, 8, 8, generator=g))
        self.global_grid = nn.Parameter(torch.randn(1, channels * size * size, 4, 4, generator=g))
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, features, volumes, points):
        b, c, h, w = features.shape
        local = grad_ext.grid_sample(self.local_grid, torch.tanh(self.local_coords(features)).permute(0, 2, 3, 1))
        coords = torch.tanh(self.global_coords(features.mean(dim=(2, 3))))
        glob = grad_ext.grid_sample(self.global_grid, coords[:, None, None, :], "bilinear", "border")
        glob = glob.reshape(b, c, h, w)
        out = grad_ext.refine(self.fuse(torch.cat([glob, local], dim=1)), features, return_refined=True)
        sampled = grad_ext.grid_sample(volumes, points, "nearest", "reflection", True)
        return out.anomaly_map, out.sim, out.loss, out.refined, sampled


def detector_inputs(batch):
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 4, 6, 6, generator=g), torch.randn(batch, 2, 3, 4, 5, generator=g),
            torch.rand(batch, 2, 3, 2, 3, generator=g) * 2.4 - 1.2)


@pytest.fixture(scope="module")
def program():
    batch = torch.export.Dim("batch", min=1, max=64)
    model = Detector().eval()
    return model, torch.export.export(model, detector_inputs(2), dynamic_shapes=({0: batch},) * 3, strict=False)


def grad_ext_nodes(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("grad_ext.")]


def test_ops_are_single_nodes_of_the_graph(program):
    _, ep = program
    targets = grad_ext_nodes(ep)
    assert targets.count(torch.ops.grad_ext.sample_grid.default) == 3
    assert targets.count(torch.ops.grad_ext.refine.default) == 1


@pytest.mark.parametrize("batch", [2, 5])
def test_exported_program_matches_eager(program, batch):
    model, ep = program
    inputs = detector_inputs(batch)
    with torch.no_grad():
        expected = model(*inputs)
        got = ep.module()(*inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_pt2_round_trip(program, tmp_path):
    model, ep = program
    path = tmp_path / "detector.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    inputs = detector_inputs(3)
    with torch.no_grad():
        for g, e in zip(loaded.module()(*inputs), model(*inputs)):
            torch.testing.assert_close(g, e)


def test_fixed_jitter_seed_is_kept_in_the_graph():
    class Jittered(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(1, 3, 5, 5))

        def forward(self, grid):
            return grad_ext.grid_sample(self.table, grid, jitter_std=0.2, jitter_prob=1.0, jitter_seed=(7, 3))

    model = Jittered()
    grid = torch.rand(4, 3, 3, 2) * 2 - 1
    ep = torch.export.export(model, (grid,), strict=False)
    with torch.no_grad():
        plain = grad_ext.grid_sample(model.table, grid)
        torch.testing.assert_close(ep.module()(grid), model(grid))
        assert not torch.allclose(ep.module()(grid), plain)  # the jitter is really in it


def test_fake_kernels_reject_bad_shapes_at_export():
    class Bad(nn.Module):
        def forward(self, table, grid):
            return grad_ext.grid_sample(table, grid)

    with pytest.raises(Exception, match="grid's last dimension must be 2"):
        torch.export.export(Bad(), (torch.randn(1, 3, 4, 4), torch.rand(2, 3, 3, 3)), strict=False)

    class BadRefine(nn.Module):
        def forward(self, rec, feat):
            return grad_ext.refine(rec, feat).anomaly_map

    with pytest.raises(Exception, match="same shape"):
        torch.export.export(BadRefine(), (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)), strict=False)
