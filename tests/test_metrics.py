"""Metrics against scikit-learn and against brute-force computations written here."""

import numpy as np
import pytest
from sklearn import metrics as skm

from benchmarks import bench_metrics
from gradad import metrics


def _random_case(seed, n=400, ties=False, dtype=np.float64):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + 0.7 * labels
    if ties:
        scores = np.round(scores, 1)  # many exact ties, also between the two classes
    return labels, scores.astype(dtype)


def _sklearn_f1_max(labels, scores):
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return f1.max()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed, ties):
    labels, scores = _random_case(seed, ties=ties)
    assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12)
    assert metrics.f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)


def test_heavy_ties_unbalanced_and_int_scores():
    rng = np.random.default_rng(5)
    labels = (rng.random(300) < 0.1).astype(np.int64)
    scores = rng.integers(0, 4, 300) + labels  # only five distinct values
    assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12)
    assert metrics.f1_max(labels, scores) == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn(ties):
    labels, scores = _random_case(3, n=200, ties=ties)
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert thresholds[0] == np.inf
    np.testing.assert_array_equal(thresholds[1:], ref_thr[1:])


def test_auroc_below_half_is_not_flipped():
    labels, scores = _random_case(4)
    value = metrics.auroc(labels, -scores)
    assert value < 0.5
    assert value == pytest.approx(skm.roc_auc_score(labels, -scores), abs=1e-12)


def test_perfect_and_hand_computed_image_metrics():
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    # All scores tied: one threshold, ROC is the diagonal, precision = 0.5 at recall 1.
    tied = np.ones(4)
    assert metrics.auroc(labels, tied) == 0.5
    assert metrics.average_precision(labels, tied) == 0.5
    assert metrics.f1_max(labels, tied) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- AUPRO, brute force

def _regions_8_connected(mask):
    """Connected components by flood fill, as lists of (row, col)."""
    seen, regions = set(), []
    height, width = mask.shape
    for r0 in range(height):
        for c0 in range(width):
            if not mask[r0, c0] or (r0, c0) in seen:
                continue
            stack, region = [(r0, c0)], []
            seen.add((r0, c0))
            while stack:
                r, c = stack.pop()
                region.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and (rr, cc) not in seen:
                            seen.add((rr, cc))
                            stack.append((rr, cc))
            regions.append(region)
    return regions


def _brute_force_aupro(masks, maps, fpr_limit):
    regions = [(i, reg) for i, mask in enumerate(masks) for reg in _regions_8_connected(mask)]
    normal_values = [maps[i][r, c] for i, mask in enumerate(masks)
                     for r in range(mask.shape[0]) for c in range(mask.shape[1]) if not mask[r, c]]
    all_values = sorted({float(v) for amap in maps for v in amap.ravel()}, reverse=True)
    points = [(0.0, 0.0)]
    for t in all_values:
        fpr = sum(v >= t for v in normal_values) / len(normal_values)
        overlaps = [sum(maps[i][r, c] >= t for r, c in reg) / len(reg) for i, reg in regions]
        points.append((fpr, sum(overlaps) / len(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _random_masks(rng, shapes, n_regions):
    masks = []
    for shape in shapes:
        mask = np.zeros(shape, dtype=bool)
        for _ in range(n_regions):
            r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
            h, w = rng.integers(1, 4, size=2)
            mask[r:r + h, c:c + w] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, [(8, 8)] * 3, n_regions=2)
    masks[2][:] = False  # a normal image too
    # Rounded maps: ties inside regions, across regions and with normal pixels.
    maps = [np.round(rng.random((8, 8)) + 0.5 * m, 1) for m in masks]
    expected = _brute_force_aupro(masks, maps, fpr_limit)
    assert metrics.aupro(np.stack(masks), np.stack(maps), fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_images_of_different_sizes_match_brute_force():
    rng = np.random.default_rng(7)
    masks = _random_masks(rng, [(8, 8), (6, 10), (9, 7)], n_regions=3)
    maps = [rng.random(m.shape).astype(np.float32) + 0.3 * m for m in masks]
    expected = _brute_force_aupro(masks, maps, 0.3)
    assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_aupro_hand_checkable_values():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5:, 5:] = True
    masks[1, 0, 0] = True
    assert metrics.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    # Constant map: one threshold, the curve is the diagonal: ∫_0^0.3 x dx / 0.3 = 0.15.
    constant = np.full(masks.shape, 0.5)
    assert metrics.aupro(masks, constant) == pytest.approx(0.15, abs=1e-12)
    assert metrics.aupro(masks, constant, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # (0,0) touches (1,1) diagonally: one region of 3 pixels, of which one is detected.
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    amap = np.zeros((1, 10, 10))
    amap[0, 0, 0] = 1.0
    # Points (0,0) → (0, 1/3) → (1, 1): ∫_0^0.3 (1/3 + 2x/3) dx / 0.3 = 0.13 / 0.3.
    assert metrics.aupro(mask, amap) == pytest.approx(0.13 / 0.3, abs=1e-12)


# ---------------------------------------------------------------- compute_metrics

def test_compute_metrics_pixel_metrics_match_sklearn():
    rng = np.random.default_rng(11)
    masks = _random_masks(rng, [(16, 16), (12, 20), (16, 16), (10, 10)], n_regions=2)
    masks[3][:] = False
    maps = [np.round(rng.random(m.shape) + 0.4 * m, 2) for m in masks]
    labels = np.array([1, 1, 1, 0])
    scores = np.array([m.max() for m in maps])
    result = metrics.compute_metrics(labels, scores, masks, maps)
    assert set(result) == set(metrics.METRIC_KEYS)
    pixel_labels = np.concatenate([m.ravel() for m in masks])
    pixel_scores = np.concatenate([m.ravel() for m in maps])
    assert result["pixel_auroc"] == pytest.approx(skm.roc_auc_score(pixel_labels, pixel_scores), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(
        skm.average_precision_score(pixel_labels, pixel_scores), abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(_sklearn_f1_max(pixel_labels, pixel_scores), abs=1e-12)
    assert result["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert result["aupro"] == pytest.approx(_brute_force_aupro(masks, maps, 0.3), abs=1e-12)


def test_compute_metrics_without_masks_gives_none():
    labels, scores = _random_case(0, n=50)
    result = metrics.compute_metrics(labels, scores)
    assert result["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert result[key] is None


def test_pixel_metrics_on_millions_of_pixels_match_sklearn():
    # the benchmark's inputs (its time and memory are measured in benchmarks/bench_metrics.py)
    labels, scores, masks, maps = bench_metrics.make_inputs(bench_metrics.MetricsCase())
    assert maps.size == 80 * 224 * 224  # 4M pixels
    result = metrics.compute_metrics(labels, scores, masks, maps)
    assert result["pixel_auroc"] == pytest.approx(
        skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("fn", [metrics.auroc, metrics.average_precision, metrics.f1_max,
                                metrics.roc_curve])
def test_image_metric_errors(fn):
    with pytest.raises(ValueError, match="labels.*one class"):
        fn(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="same shape"):
        fn(np.array([0, 1, 1]), np.arange(4.0))
    with pytest.raises(ValueError, match="scores.*NaN"):
        fn(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="labels must be binary"):
        fn(np.array([0, 1, 2]), np.arange(3.0))


def test_pixel_metric_errors():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="masks.*one class"):
        metrics.aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match=r"masks\[1\] and maps\[1\].*same shape"):
        metrics.aupro([masks[0], masks[1]], [maps[0], maps[1][:3]])
    with pytest.raises(ValueError, match="same number of images"):
        metrics.aupro(masks, maps[:1])
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"maps\[1\].*NaN"):
        metrics.aupro(masks, bad)
    with pytest.raises(ValueError, match=r"masks\[0\] must be binary"):
        metrics.aupro(masks * 3, maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="masks must be a"):
        metrics.aupro(masks[0], maps[0])
    with pytest.raises(ValueError, match="masks and maps must be given together"):
        metrics.compute_metrics(np.array([1, 0]), np.array([0.9, 0.1]), masks=masks)
    with pytest.raises(ValueError, match="one mask per label"):
        metrics.compute_metrics(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]), masks, maps)
