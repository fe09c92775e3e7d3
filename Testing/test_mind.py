"""MIND-SSC descriptors, the ground-truth-free alignment score and its evaluation mask (unifuse.registration.mind)."""

from __future__ import annotations

import pytest
import torch

from unifuse.registration.mind import alignment_score, descriptor_reach, evaluation_mask, mind_ssc
from unifuse.spatial import identity_grid, warp

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (32, 36, 40)  # (z, y, x)


def blobs(shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """(1, 1, *shape) in [0, 1]: an ellipsoidal object filled with Gaussian blobs, background 0."""
    gen = torch.Generator().manual_seed(seed)
    p = identity_grid(shape)[0].permute(1, 2, 3, 0)  # (x, y, z)
    size = torch.tensor(shape[::-1], dtype=torch.float32)
    centre = (size - 1) / 2
    r = ((p - centre) / (0.38 * size)).norm(dim=-1)
    value = 0.4 * torch.sigmoid((1.0 - r) * 10)
    for _ in range(30):
        c = centre + (torch.rand(3, generator=gen) - 0.5) * 0.5 * size
        s = 1.5 + 2.0 * torch.rand(1, generator=gen)
        value = value + 0.5 * torch.rand(1, generator=gen) * torch.exp(-((p - c) ** 2).sum(-1) / (2 * s**2))
    return value.clamp(0, 1)[None, None]


def shifted(image: torch.Tensor, voxels_x: float) -> torch.Tensor:
    u = torch.tensor([voxels_x, 0.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, *image.shape[2:])
    return warp(image, u, padding_mode="border")


def test_shape_range_and_normalisation():
    image = torch.cat([blobs(seed=0), blobs(seed=1)])
    mind = mind_ssc(image)
    assert mind.shape == (2, 12) + SHAPE and mind.dtype == torch.float32
    assert float(mind.min()) > 0 and float(mind.max()) <= 1
    torch.testing.assert_close(mind.amax(1), torch.ones(2, *SHAPE))  # largest channel is exp(0) = 1
    torch.testing.assert_close(mind[1:], mind_ssc(image[1:]))  # batch items are independent
    assert torch.isfinite(mind_ssc(torch.zeros(1, 1, 8, 8, 8))).all()  # constant image: defined, all ones


def test_invariant_to_affine_intensity_maps_and_inversion():
    """Exact up to float32 rounding (offsets far above the contrast lose digits before MIND sees them)."""
    image = blobs()
    reference = mind_ssc(image)
    for a, b in ((3.0, 7.0), (-2.0, 1.0), (0.01, 0.0), (1000.0, -20.0)):
        torch.testing.assert_close(mind_ssc(a * image + b), reference, atol=1e-4, rtol=0)


def test_nearly_invariant_to_a_monotonic_remap_compared_with_a_shift():
    """A smooth monotonic remap (slope 1..2) changes the descriptors 3x less than a one-voxel shift.

    MIND-SSC is exactly invariant only to affine maps; a non-linear one changes patch-distance ratios."""
    image = blobs()
    mask = evaluation_mask(image, image)
    reference = mind_ssc(image)

    def change(other: torch.Tensor) -> float:
        return float((mind_ssc(other) - reference).abs().mean(1, keepdim=True)[mask].mean())

    remap, shift = change(image + 0.5 * image**2), change(shifted(image, 1.0))
    assert remap < 0.5 * shift  # measured 0.0148 against 0.0440


def test_alignment_score_is_lowest_when_aligned_across_contrasts():
    fixed = blobs()
    moving = 1.0 - fixed  # inverted contrast
    mask = evaluation_mask(fixed, moving)
    scores = [alignment_score(fixed, shifted(moving, s), mask) for s in (0.0, 0.5, 1.0, 2.0)]
    assert scores[0] < 1e-4
    # measured 1e-7, 0.023, 0.045, 0.088: grows with the misalignment
    assert scores[1] > 0.01 and scores[2] > 0.03 and scores[3] > 1.5 * scores[2]
    assert alignment_score(fixed, shifted(moving, 1.0), mask) == scores[2]  # deterministic


def test_alignment_score_rejects_bad_inputs():
    fixed = blobs()
    with pytest.raises(ValueError, match="empty"):
        alignment_score(fixed, fixed, torch.zeros_like(fixed, dtype=torch.bool))
    with pytest.raises(ValueError):
        alignment_score(fixed, fixed[..., :-1])
    with pytest.raises(ValueError):
        mind_ssc(fixed[0])


def test_evaluation_mask_excludes_padding_borders_and_background():
    fixed = blobs()
    moving = fixed.clone()
    valid = torch.ones_like(moving)
    valid[:, :, :, :, :10] = 0  # the moving data stop at x = 10: a zero-padded band
    moving[valid == 0] = 0
    mask = evaluation_mask(fixed, moving, valid)
    reach = descriptor_reach()
    assert mask.shape == fixed.shape and mask.dtype == torch.bool
    assert not mask[..., : 10 + reach].any()  # band and the descriptors that see it
    assert not mask[:, :, :reach].any() and not mask[:, :, -reach:].any()  # volume border
    assert not mask[:, :, :, :reach].any() and not mask[..., -reach:].any()
    assert not mask[:, :, reach, reach, -reach - 1]  # an empty background corner
    centre = tuple(s // 2 for s in SHAPE)
    assert mask[(0, 0) + centre]  # the object
    assert mask[..., 10 + reach :].any()
    without_band = evaluation_mask(fixed, fixed)
    assert without_band.sum() > mask.sum() and without_band[..., 12:20].any()
