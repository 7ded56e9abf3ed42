"""Protocols of docs/method.md §5 against scipy.ndimage and brute-force numpy written here."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn import metrics as skm

from gradad import evaluation
from gradad.evaluation import EvalRecord


def _bilinear_numpy(image, out_h, out_w):
    """Bilinear resize with align_corners=False (half-pixel centres, edge clamped)."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low
    r0, r1, fr = axis(image.shape[0], out_h)
    c0, c1, fc = axis(image.shape[1], out_w)
    top = image[r0][:, c0] * (1 - fc) + image[r0][:, c1] * fc
    bottom = image[r1][:, c0] * (1 - fc) + image[r1][:, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def _max_window_mean(image, k):
    return max(image[r:r + k, c:c + k].mean()
               for r in range(image.shape[0] - k + 1) for c in range(image.shape[1] - k + 1))


def test_paper_postprocess_matches_uniform_filter_and_brute_force_score():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 40, 36))
    maps_out, scores = evaluation.postprocess(torch.from_numpy(maps), "paper")
    assert maps_out.shape == (3, 40, 36) and scores.shape == (3,)
    for amap, out, score in zip(maps, maps_out, scores):
        # count_include_pad=True: zeros outside, always divided by 21².
        expected = ndimage.uniform_filter(amap, size=21, mode="constant", cval=0.0)
        np.testing.assert_allclose(out, expected, atol=1e-12)
        assert score == pytest.approx(_max_window_mean(expected, 32), abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (16, 17), (64, 16), (40, 33)])
def test_gaussian_smooth_matches_scipy_on_images_of_any_size(shape):
    # sizes below the kernel radius (16) reflect more than once, as scipy's mode='reflect' does
    image = np.random.default_rng(len(shape) * 100 + shape[0] * 7 + shape[1]).random(shape)
    expected = ndimage.gaussian_filter(image, sigma=4, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(evaluation.gaussian_smooth(torch.from_numpy(image)).numpy(), expected, atol=1e-12)


def test_strict_postprocess_matches_scipy_gaussian_and_numpy_bilinear():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 24, 24))
    sizes = [(40, 52), (40, 52), (33, 29)]
    maps_out, scores = evaluation.postprocess(torch.from_numpy(maps), "strict", sizes)
    assert isinstance(maps_out, list) and [m.shape for m in maps_out] == sizes
    for amap, out, score, (h, w) in zip(maps, maps_out, scores, sizes):
        expected = ndimage.gaussian_filter(_bilinear_numpy(amap, h, w), sigma=4, mode="reflect",
                                           truncate=4.0)
        np.testing.assert_allclose(out, expected, atol=1e-12)
        assert score == pytest.approx(expected.max(), abs=1e-12)


def test_strict_postprocess_same_sizes_stack_float32():
    maps = torch.rand(2, 16, 16)
    maps_out, scores = evaluation.postprocess(maps, "strict", [(30, 30), (30, 30)])
    assert isinstance(maps_out, np.ndarray) and maps_out.shape == (2, 30, 30)
    assert maps_out.dtype == np.float32 and scores.dtype == np.float64
    expected = ndimage.gaussian_filter(_bilinear_numpy(maps[1].double().numpy(), 30, 30), sigma=4)
    np.testing.assert_allclose(maps_out[1], expected, atol=1e-5)


def test_prepare_masks():
    mask = np.zeros((50, 70), dtype=np.uint8)
    mask[10:20, 30:45] = 255
    mask[40, 3] = 2
    mask[30:40, 50:65] = 1  # low non-zero labels must count as anomalous too
    paper = evaluation.prepare_masks([mask, mask], "paper", size=28)
    rows = np.floor(np.arange(28) * 50 / 28).astype(int)  # torch 'nearest': floor(dst · in/out)
    cols = np.floor(np.arange(28) * 70 / 28).astype(int)
    assert paper.dtype == bool and paper.shape == (2, 28, 28)
    np.testing.assert_array_equal(paper[0], mask[rows][:, cols] > 0)
    strict = evaluation.prepare_masks([mask, mask[:30]], "strict")
    assert isinstance(strict, list)
    np.testing.assert_array_equal(strict[0], mask != 0)
    np.testing.assert_array_equal(strict[1], mask[:30] != 0)


def _synthetic_records(rng):
    """Class 'a' with masks (normal images without mask files), class 'b' without masks."""
    records = []
    for i in range(6):
        label = i % 2
        mask = None
        amap = rng.random((32, 32)) * 0.5
        if label:
            mask = np.zeros((48, 40), dtype=np.uint8)
            mask[10 + i:22 + i, 8:20] = 255
            amap[8:16, 6:14] += rng.random()
        records.append(EvalRecord("a", label, torch.from_numpy(amap), mask, (48, 40)))
    for i in range(5):
        label = int(i >= 2)
        amap = rng.random((32, 32)) + 0.3 * label * rng.random()
        records.append(EvalRecord("b", label, amap, None, (36, 36)))
    return records


def test_evaluate_strict_per_class_and_mean():
    records = _synthetic_records(np.random.default_rng(2))
    results = evaluation.evaluate(records, "strict")
    assert list(results) == ["a", "b", "mean"]
    for name in ("a", "b"):
        recs = [r for r in records if r.class_name == name]
        smoothed = [ndimage.gaussian_filter(_bilinear_numpy(np.asarray(r.anomaly_map, dtype=np.float64),
                                                            *r.image_size), sigma=4) for r in recs]
        labels = [r.label for r in recs]
        scores = [s.max() for s in smoothed]
        assert results[name]["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
        assert results[name]["image_ap"] == pytest.approx(
            skm.average_precision_score(labels, scores), abs=1e-9)
    recs_a = [r for r in records if r.class_name == "a"]
    pixel_labels = np.concatenate([(np.zeros(r.image_size) if r.mask is None else r.mask != 0).ravel()
                                   for r in recs_a])
    pixel_scores = np.concatenate([ndimage.gaussian_filter(
        _bilinear_numpy(r.anomaly_map.numpy(), *r.image_size), sigma=4).ravel() for r in recs_a])
    assert results["a"]["pixel_auroc"] == pytest.approx(
        skm.roc_auc_score(pixel_labels, pixel_scores), abs=1e-9)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert results["b"][key] is None
        assert results["mean"][key] == results["a"][key]
    for key in ("image_auroc", "image_ap", "image_f1max"):
        assert results["mean"][key] == pytest.approx((results["a"][key] + results["b"][key]) / 2)


def test_evaluate_paper_and_all_none_mean():
    records = _synthetic_records(np.random.default_rng(3))
    results = evaluation.evaluate(records, "paper")
    recs_a = [r for r in records if r.class_name == "a"]
    smoothed = [ndimage.uniform_filter(r.anomaly_map.numpy(), size=21, mode="constant") for r in recs_a]
    rows = np.floor(np.arange(32) * 48 / 32).astype(int)
    cols = np.floor(np.arange(32) * 40 / 32).astype(int)
    masks = [np.zeros((32, 32), bool) if r.mask is None else r.mask[rows][:, cols] > 0 for r in recs_a]
    assert results["a"]["image_auroc"] == pytest.approx(skm.roc_auc_score(
        [r.label for r in recs_a], [_max_window_mean(s, 32) for s in smoothed]), abs=1e-9)
    assert results["a"]["pixel_ap"] == pytest.approx(skm.average_precision_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([s.ravel() for s in smoothed])),
        abs=1e-9)
    only_b = evaluation.evaluate([r for r in records if r.class_name == "b"], "paper")
    assert only_b["mean"]["aupro"] is None and only_b["mean"]["pixel_auroc"] is None
    assert only_b["mean"]["image_auroc"] == only_b["b"]["image_auroc"]


def test_errors():
    maps = torch.rand(2, 40, 40)
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluation.postprocess(maps, "fast")
    with pytest.raises(ValueError, match="image_sizes"):
        evaluation.postprocess(maps, "strict")
    with pytest.raises(ValueError, match="smaller than the 32"):
        evaluation.postprocess(torch.rand(1, 20, 40), "paper")
    with pytest.raises(ValueError, match="maps must be a float"):
        evaluation.postprocess(torch.rand(40, 40), "paper")
    records = _synthetic_records(np.random.default_rng(4))
    wrong_size = [r if i != 1 else EvalRecord("a", 1, r.anomaly_map, r.mask, (50, 40))
                  for i, r in enumerate(records)]
    with pytest.raises(ValueError, match="mask shape"):
        evaluation.evaluate(wrong_size, "strict")
    with pytest.raises(ValueError, match="class 'b'.*one class"):
        evaluation.evaluate([r for r in records if r.class_name == "b" and r.label == 1], "strict")
    with pytest.raises(ValueError, match="reserved"):
        evaluation.evaluate([EvalRecord("mean", 0, maps[0], None, (40, 40))], "strict")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        evaluation.evaluate([EvalRecord("x", 2, maps[0], None, (40, 40))], "strict")


def test_evaluate_class_scores_and_metrics():
    # the image scores it returns are those the metrics were computed from (checked with scikit-learn)
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        mask = np.zeros((40, 40), dtype=bool)
        if i % 2:
            mask[5:15, 8:20] = True
        records.append(EvalRecord("c", i % 2, torch.from_numpy(rng.random((32, 32), dtype=np.float32)), mask, (40, 40)))
    for protocol in ("strict", "paper"):
        if protocol == "paper":
            records = [dataclasses.replace(r, anomaly_map=torch.nn.functional.interpolate(
                r.anomaly_map[None, None], size=(64, 64))[0, 0]) for r in records]
        result = evaluation.evaluate_class("c", records, protocol)
        assert result.metrics == evaluation.evaluate(records, protocol)["c"]
        expected = skm.roc_auc_score([r.label for r in records], result.scores)
        assert result.metrics["image_auroc"] == pytest.approx(expected)
        assert len(result.maps) == len(records)


def test_pixel_metrics_of_a_class_with_some_masks_use_the_masked_images():
    # 'a' loses the mask of one anomalous image: its image metrics keep every image, its pixel
    # metrics are those of the class without that image (computed independently here)
    records = _synthetic_records(np.random.default_rng(4))
    unmasked = next(i for i, r in enumerate(records) if r.class_name == "a" and r.label == 1)
    partial = [r if i != unmasked else dataclasses.replace(r, mask=None) for i, r in enumerate(records)]
    a_all = [r for r in partial if r.class_name == "a"]
    a_masked = [r for i, r in enumerate(records) if r.class_name == "a" and i != unmasked]
    result = evaluation.evaluate_class("a", a_all, "strict")
    without = evaluation.evaluate_class("a", a_masked, "strict")
    full = evaluation.evaluate_class("a", [r for r in records if r.class_name == "a"], "strict")
    assert result.pixel_scope == "subset" and (result.masked, result.anomalous) == (full.anomalous - 1, full.anomalous)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert result.metrics[key] == pytest.approx(without.metrics[key])
    for key in ("image_auroc", "image_ap", "image_f1max"):
        assert result.metrics[key] == pytest.approx(full.metrics[key])
    assert full.pixel_scope == "all"


def test_a_class_without_masks_gets_image_metrics_only():
    records = [dataclasses.replace(r, mask=None) for r in _synthetic_records(np.random.default_rng(5))
               if r.class_name == "b"]
    result = evaluation.evaluate_class("b", records, "strict")
    assert result.pixel_scope == "none" and result.masked == 0
    assert all(result.metrics[k] is None for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"))
    labels = [r.label for r in records]
    assert result.metrics["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, result.scores))
