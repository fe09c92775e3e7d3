"""UFR&F at the reference resolution (unifuse.native_fusion): tiling, geometry of the token sampling, seams."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unifuse.config import tiny
from unifuse.model import UniFuse
from unifuse.native_fusion import fuse_native, fusion_grid, gaussian_importance, index_to_index_affine, tiling


@pytest.mark.parametrize("size,max_edge,overlap", [(160, 128, 32), (300, 128, 32), (17, 128, 32), (64, 16, 8), (129, 64, 16)])
def test_tiling_covers_with_overlap_and_fewest_tiles(size, max_edge, overlap):
    edge, starts = tiling(size, max_edge, overlap, 4)
    assert edge % 4 == 0 and edge <= max(max_edge, -(-size // 4) * 4)
    assert starts[0] == 0 and starts[-1] + edge >= size
    for a, b in zip(starts, starts[1:]):
        assert a + edge - b >= overlap  # neighbours share at least `overlap` voxels
    fewer = len(starts) - 1
    if fewer >= 1:  # one tile fewer of the largest edge cannot cover the axis with that overlap
        assert fewer * max_edge - (fewer - 1) * overlap < size


def test_tiling_keeps_edges_small():
    assert tiling(160, 128, 32, 4) == (96, [0, 64])  # two tiles of 96, not 128-voxel tiles
    assert tiling(17, 128, 32, 4) == (20, [0])  # one tile, rounded up to the U-Net multiple


def test_gaussian_importance_peaks_in_the_centre():
    w = gaussian_importance((8, 9, 10))
    assert w.shape == (8, 9, 10) and float(w.max()) == pytest.approx(1.0, abs=0.02)
    assert float(w[0, 0, 0]) == pytest.approx(1e-3)
    assert float(w[4, 4, 5]) > float(w[1, 4, 5])


def test_index_to_index_affine_matches_simpleitk_on_oblique_grids():
    a = sitk.Image([20, 30, 40], sitk.sitkUInt8)
    a.SetSpacing([0.7, 1.1, 2.5])
    a.SetOrigin([-10.0, 5.0, 3.0])
    a.SetDirection(sitk.VersorTransform((0.3, -0.2, 1.0), 0.4).GetMatrix())
    b = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    b.SetSpacing([3.0, 3.0, 3.0])
    b.SetOrigin([4.0, -2.0, 7.0])
    b.SetDirection(sitk.VersorTransform((1.0, 0.5, 0.0), -0.3).GetMatrix())
    m = index_to_index_affine(a, b)
    for idx in [(0, 0, 0), (3.5, 7.25, 11.0), (19, 29, 39)]:
        expected = b.TransformPhysicalPointToContinuousIndex(a.TransformContinuousIndexToPhysicalPoint(idx))
        assert m[:, :3] @ np.asarray(idx) + m[:, 3] == pytest.approx(expected, abs=1e-6)


def test_fusion_grid_caps_the_spacing_over_the_same_box():
    ref = sitk.Image([100, 80, 60], sitk.sitkFloat32)
    ref.SetSpacing([0.5, 0.5, 2.0])
    ref.SetOrigin([1.0, 2.0, 3.0])
    assert fusion_grid(ref, 0.0) is ref and fusion_grid(ref, 0.4) is ref
    g = fusion_grid(ref, 1.0)
    assert list(g.GetSize()) == [50, 40, 60] and g.GetSpacing() == pytest.approx((1.0, 1.0, 2.0))
    # same outer box: the voxel corners coincide
    lo = lambda img: np.asarray(img.GetOrigin()) - np.asarray(img.GetSpacing()) / 2  # noqa: E731
    assert lo(g) == pytest.approx(lo(ref))


def _tiny_pair(size=32, seed=0):
    torch.manual_seed(seed)
    model = UniFuse(tiny()).eval()
    z, y, x = np.mgrid[:size, :size, :size] / size
    ref = (0.5 + 0.4 * np.sin(6 * x) * np.cos(5 * y) * (z > 0.2)).astype(np.float32)
    mov = (0.5 + 0.4 * np.cos(4 * x + 3 * z)).astype(np.float32)
    r, m = torch.from_numpy(ref)[None, None], torch.from_numpy(mov)[None, None]
    with torch.inference_mode():
        a = model.analyse(r, m)
        u = torch.zeros((1, 3, size, size, size))
        whole = model.restore_and_fuse(a, u, a.dapl.probs)[0].numpy()  # (2, ...): fused, restored
        maps = model.token_maps(a, u)
    q = model.cfg.patch_size
    to_token = np.concatenate([np.eye(3), np.full((3, 1), -(q - 1) / 2.0)], axis=1) / q  # working grid = fusion grid
    return model, ref, mov, whole, maps, to_token, a


def test_one_patch_is_exactly_the_working_grid_fusion():
    model, ref, mov, whole, maps, to_token, a = _tiny_pair()
    out, restored = fuse_native(model, ref, mov, maps, to_token, a.dapl.prompt, a.dapl.probs, patch=64)
    assert np.abs(out - whole[0]).max() < 1e-5 and np.abs(restored - whole[1]).max() < 1e-5


def test_patches_blend_without_seams():
    model, ref, mov, whole, maps, to_token, a = _tiny_pair()
    whole = whole[0]
    out, _ = fuse_native(model, ref, mov, maps, to_token, a.dapl.prompt, a.dapl.probs, patch=16, overlap=8)
    assert np.abs(out - whole).mean() < 2e-3 and np.abs(out - whole).max() < 0.02
    # no step at the tile borders: the difference to the one-patch result is as smooth there as anywhere
    step = np.abs(np.diff(out - whole, axis=2))
    edge, starts = tiling(32, 16, 8, 2)
    borders = sorted({s + edge - 1 for s in starts[:-1]} | {s - 1 for s in starts[1:]})
    assert step[:, :, borders].max() < 5 * np.percentile(step, 99) + 1e-4


def test_background_patches_are_filled_not_computed(monkeypatch):
    model, ref, mov, whole, maps, to_token, a = _tiny_pair()
    ref, mov = ref.copy(), mov.copy()
    ref[:, :, 16:] = 0.0
    mov[:, :, 16:] = 0.0
    calls = []
    fuse_patch = model.fuse_patch
    monkeypatch.setattr(model, "fuse_patch", lambda *args: calls.append(args[0].shape) or fuse_patch(*args))
    out, _ = fuse_native(model, ref, mov, maps, to_token, a.dapl.prompt, a.dapl.probs, patch=16, overlap=0)
    assert len(calls) == 5  # the 4 tiles with content + one evaluation shared by the 4 empty tiles
    assert np.isfinite(out).all() and out[:, :, 24:].std() < 1e-3
