"""Feature Block Paste: connectivity, size, intensity/blur, broadcasting, reproducibility, errors."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from gradad.config import BiGridConfig
from gradad.models.fbp import FBP_PRESETS, FBPSettings, FeatureBlockPaster, fbp_settings, feature_block_paste

# Structuring elements of scipy.ndimage.label for the two neighbourhoods.
CONNECTIVITY = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def _features(b=3, c=2, h=28, w=28, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_config_accepts_exactly_the_fbp_presets():
    assert set(FBP_PRESETS) == {"reference", "paper"}
    for name in FBP_PRESETS:
        assert BiGridConfig(fbp=name).fbp == name
    with pytest.raises(ValueError, match="bigrid.fbp"):
        BiGridConfig(fbp="blob")


# (preset, changes, connectivity docs/method.md §3 asks for): the reference walk steps to edge neighbours,
# the paper walk to all 8; short walks on large canvases leave thin paths where it shows.
@pytest.mark.parametrize("preset, changes, neighbourhood", [
    ("reference", {}, 4),
    ("reference", {"walk_length": 12, "half_size_range": (6.0, 9.5)}, 4),
    ("paper", {}, 8),
])
def test_masks_are_one_connected_component(preset, changes, neighbourhood):
    settings = fbp_settings(preset, per_image=True, **changes)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        _, mask = feature_block_paste(_features(b=4), settings, generator)
        for image_mask in mask.numpy():
            _, count = ndimage.label(image_mask, structure=CONNECTIVITY[neighbourhood])
            assert count == 1


def test_four_neighbour_walks_are_not_only_eight_connected():
    # 8-neighbour walks make diagonal-only contacts, which 4-connectivity splits: so the
    # connectivity test above can tell the two neighbourhoods apart.
    settings = fbp_settings("paper", per_image=True, half_size_range=(4.0, 9.0))
    generator = torch.Generator().manual_seed(2)
    split = 0
    for _ in range(20):
        _, mask = feature_block_paste(_features(b=4), settings, generator)
        for image_mask in mask.numpy():
            split += ndimage.label(image_mask, structure=CONNECTIVITY[4])[1] > 1
    assert split > 0


@pytest.mark.parametrize("half_size", [0, 2, 5])
def test_blob_extent_matches_half_size(half_size):
    # b = int(U(b, b + 0.5)) = b exactly: the blob lies in a (2b+1)² box and, for a long
    # 4-neighbour walk, nearly fills it.
    settings = FBPSettings(half_size_range=(half_size, half_size + 0.5), per_image=True, walk_length=400)
    _, mask = feature_block_paste(_features(b=6), settings, torch.Generator().manual_seed(3))
    side = 2 * half_size + 1
    for image_mask in mask.numpy():
        rows, cols = np.nonzero(image_mask)
        assert rows.max() - rows.min() + 1 <= side and cols.max() - cols.min() + 1 <= side
        assert image_mask.sum() <= side * side
        if half_size == 0:
            assert image_mask.sum() == 1


def test_paper_walk_length_bounds_cell_count():
    # N ~ U{b..2b} steps visit at most N + 1 <= 2b + 1 cells; with b in {3} that is <= 7.
    settings = fbp_settings("paper", half_size_range=(3.0, 3.9), per_image=True)
    generator = torch.Generator().manual_seed(4)
    counts = []
    for _ in range(20):
        _, mask = feature_block_paste(_features(b=4), settings, generator)
        counts += mask.sum(dim=(1, 2)).tolist()
    assert 1 <= min(counts) and max(counts) <= 7
    assert max(counts) >= 4  # the walk moves (not a constant single cell)


def test_reference_half_size_range_covers_small_and_large_blobs():
    settings = fbp_settings("reference", per_image=True)
    generator = torch.Generator().manual_seed(5)
    extents = []
    for _ in range(10):
        _, mask = feature_block_paste(_features(b=8), settings, generator)
        for image_mask in mask.numpy():
            rows, cols = np.nonzero(image_mask)
            extents.append(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)
    assert max(extents) <= 19  # b <= 9
    assert min(extents) <= 5 and max(extents) >= 12


def test_added_values_are_blurred_intensity_on_mask():
    # independent check: pasted − x equals I · conv(mask, [1,2,1]ᵀ[1,2,1]/16) with one I in [8, 16]
    settings = fbp_settings("reference", per_image=True)
    x = _features(b=5)
    pasted, mask = feature_block_paste(x, settings, torch.Generator().manual_seed(6))
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    for i in range(x.shape[0]):
        added = (pasted[i] - x[i]).numpy()
        np.testing.assert_allclose(added[0], added[1], atol=1e-5)  # same on every channel
        spread = ndimage.convolve(mask[i].numpy().astype(float), kernel, mode="constant")
        support = spread > 0
        assert np.all(np.abs(added[0][~support]) < 1e-5)
        ratio = added[0][support] / spread[support]
        intensity = ratio.mean()
        assert 8.0 <= intensity <= 16.0
        np.testing.assert_allclose(ratio, intensity, rtol=1e-4)


def test_without_blur_values_are_intensity_exactly_on_mask():
    settings = FBPSettings(blur=False, per_image=True)
    x = _features(b=3)
    pasted, mask = feature_block_paste(x, settings, torch.Generator().manual_seed(7))
    added = pasted - x
    for i in range(3):
        values = added[i, :, mask[i]]
        assert torch.all(values >= 8.0 - 1e-4) and torch.all(values <= 16.0 + 1e-4)
        assert torch.allclose(values, values[0, 0].expand_as(values), atol=1e-4)
        assert torch.all(added[i, :, ~mask[i]].abs() < 1e-5)


def test_reference_preset_broadcasts_one_blob_per_batch():
    x = _features(b=4)
    pasted, mask = feature_block_paste(x, FBP_PRESETS["reference"], torch.Generator().manual_seed(8))
    assert mask.shape == (4, 28, 28) and mask.dtype == torch.bool
    assert all(torch.equal(mask[0], mask[i]) for i in range(4))
    added = pasted - x
    assert torch.allclose(added, added[:1, :1].expand_as(added), atol=1e-5)


def test_per_image_draws_differ():
    _, mask = feature_block_paste(_features(b=4), fbp_settings("reference", per_image=True),
                                  torch.Generator().manual_seed(9))
    assert any(not torch.equal(mask[0], mask[i]) for i in range(1, 4))


def test_num_blobs_unites_masks():
    x = _features(b=1)
    one = FBPSettings(num_blobs=1)
    three = FBPSettings(num_blobs=3)
    # same generator state: the first blob of the three-blob draw is the one-blob draw
    _, mask_one = feature_block_paste(x, one, torch.Generator().manual_seed(10))
    _, mask_three = feature_block_paste(x, three, torch.Generator().manual_seed(10))
    assert torch.all(mask_three[mask_one])
    assert mask_three.sum() >= mask_one.sum()


def test_reproducible_under_seed_and_paster_reseed():
    x = _features()
    a = feature_block_paste(x, FBP_PRESETS["paper"], torch.Generator().manual_seed(11))
    b = feature_block_paste(x, FBP_PRESETS["paper"], torch.Generator().manual_seed(11))
    c = feature_block_paste(x, FBP_PRESETS["paper"], torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    paster = FeatureBlockPaster(FBP_PRESETS["reference"], seed=3)
    first = [paster(x)[1] for _ in range(3)]
    paster.seed(3)
    again = [paster(x)[1] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(first, again))


def test_small_maps_cap_the_half_size():
    x = torch.zeros(2, 1, 5, 7)
    _, mask = feature_block_paste(x, fbp_settings("reference", per_image=True), torch.Generator().manual_seed(13))
    assert mask.any(dim=(1, 2)).all()  # fits a 5×5 canvas at most


def test_keeps_dtype_and_does_not_modify_input():
    x = _features().double()
    before = x.clone()
    pasted, _ = feature_block_paste(x, FBP_PRESETS["reference"], torch.Generator().manual_seed(14))
    assert pasted.dtype == torch.float64 and torch.equal(x, before)


def test_bad_arguments_raise():
    g = torch.Generator()
    with pytest.raises(ValueError, match="features"):
        feature_block_paste(torch.zeros(2, 3, 4), FBP_PRESETS["reference"], g)
    with pytest.raises(ValueError, match="features"):
        feature_block_paste(torch.zeros(1, 1, 4, 4, dtype=torch.long), FBP_PRESETS["reference"], g)
    with pytest.raises(TypeError, match="settings"):
        feature_block_paste(torch.zeros(1, 1, 4, 4), "reference", g)
    with pytest.raises(TypeError, match="generator"):
        feature_block_paste(torch.zeros(1, 1, 4, 4), FBP_PRESETS["reference"], 0)
    with pytest.raises(ValueError, match="neighbourhood"):
        FBPSettings(neighbourhood=6)
    with pytest.raises(ValueError, match="half_size_range"):
        FBPSettings(half_size_range=(5.0, 1.0))
    with pytest.raises(ValueError, match="num_blobs"):
        FBPSettings(num_blobs=0)
    with pytest.raises(ValueError, match="preset"):
        fbp_settings("nope")
    with pytest.raises(TypeError, match="seed"):
        FeatureBlockPaster(FBP_PRESETS["reference"], seed=1.5)
