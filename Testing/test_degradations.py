"""Degradations (unifuse.data.degradations): each changes the image in its physically expected way."""

from __future__ import annotations

import numpy as np
import pytest

from unifuse.config import DEGRADATION_CLASSES
from unifuse.data.degradations import (
    DEGRADATIONS,
    MotionSegment,
    apply_degradation,
    ct_metal,
    degradation_id,
    kspace_motion,
    mri_motion,
    no_degradation,
    pet_lowdose,
    projector,
    random_metal_mask,
    simulate_metal_artifacts,
)
from unifuse.errors import InputImageError

N = 32


def _ellipsoid(shape=(N, N, N), semi=(0.38, 0.42, 0.34)):
    d, h, w = shape
    zz, yy, xx = np.meshgrid(*(np.linspace(-0.5, 0.5, n) for n in shape), indexing="ij")
    return (xx / semi[0]) ** 2 + (yy / semi[1]) ** 2 + (zz / semi[2]) ** 2


def _mr_phantom():
    """Noise-free MR-like head: bright rim, structured interior, zero background."""
    r = _ellipsoid()
    zz, yy, xx = np.meshgrid(*(np.arange(N),) * 3, indexing="ij")
    inside = r <= 1.0
    img = np.where(inside, 600 + 300 * np.sin(xx / 2.5) * np.cos(yy / 3.0), 0.0)
    img = np.where((r > 0.8) & inside, 900.0, img)
    return img.astype(np.float32), inside


def _ct_phantom():
    """CT head phantom in HU: air, 1000 HU skull ring, 40 HU brain."""
    r = _ellipsoid()
    img = np.full((N, N, N), -1000.0, np.float32)
    img[r <= 1.0] = 1000.0
    img[r <= 0.75] = 40.0
    return img, r <= 0.6


def _pet_phantom():
    r = _ellipsoid()
    img = np.where(r <= 1.0, 2.0, 0.0) + np.where(r <= 0.5, 6.0, 0.0)
    return img.astype(np.float32)


INPUTS = {"none": _mr_phantom()[0], "motion": _mr_phantom()[0], "metal": _ct_phantom()[0], "lowdose": _pet_phantom()}


def test_names_match_the_classifier_classes():
    assert DEGRADATIONS == tuple(DEGRADATION_CLASSES)
    assert [degradation_id(n) for n in DEGRADATIONS] == list(range(len(DEGRADATIONS)))
    with pytest.raises(ValueError, match="unknown degradation"):
        degradation_id("blur")


def test_none_is_an_exact_copy():
    v = INPUTS["none"]
    out = apply_degradation("none", v, np.random.default_rng(0), spacing_mm=2.0)
    assert out is not v and out.dtype == np.float32 and np.array_equal(out, v)
    assert np.array_equal(no_degradation(v), v)


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_reproducible_seed_dependent_and_input_untouched(name):
    v = INPUTS[name]
    before = v.copy()
    a = apply_degradation(name, v, np.random.default_rng(5), spacing_mm=4.0)
    b = apply_degradation(name, v, np.random.default_rng(5), spacing_mm=4.0)
    assert np.array_equal(v, before)
    assert a.shape == v.shape and a.dtype == np.float32 and np.array_equal(a, b)
    if name != "none":
        c = apply_degradation(name, v, np.random.default_rng(6), spacing_mm=4.0)
        assert not np.array_equal(a, c)
        assert np.abs(a - v).mean() > 1e-3 * np.abs(v).mean()


def test_dispatcher_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown degradation"):
        apply_degradation("blur", INPUTS["none"], np.random.default_rng(0))
    with pytest.raises(InputImageError):
        apply_degradation("motion", np.zeros((8, 8)), np.random.default_rng(0))
    bad = INPUTS["lowdose"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputImageError, match="NaN"):
        apply_degradation("lowdose", bad, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- motion


def test_kspace_translation_segment_equals_a_shifted_image_in_those_lines():
    v = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    lines = np.nonzero(np.fft.fftfreq(16) > 0)[0]
    out = kspace_motion(v, [MotionSegment(lines, (0, 0, 0), (2.0, 0.0, 0.0))], phase_encode_axis=1)
    k = np.fft.fftn(v)
    k[:, lines] = np.fft.fftn(np.roll(v, 2, axis=2))[:, lines]  # +2 voxels in x, lines along y
    assert np.abs(out - np.abs(np.fft.ifftn(k))).max() < 1e-4


def test_motion_without_movement_is_identity():
    v, _ = _mr_phantom()
    out = mri_motion(v, np.random.default_rng(0), max_rotation_deg=0, max_translation_mm=0)
    assert np.abs(out - v).max() < 1e-3


def test_motion_creates_ghosting_outside_the_head_and_keeps_energy():
    v, inside = _mr_phantom()
    from scipy import ndimage

    outside = ~ndimage.binary_dilation(inside, iterations=2)
    ghost = []
    for seed in range(3):
        out = mri_motion(v, np.random.default_rng(seed), spacing_mm=4.0)
        ghost.append(float((out[outside] ** 2).sum() / (out**2).sum()))
        # Parseval: moving whole k-space lines between poses roughly conserves the total energy
        assert abs(float((out**2).sum()) / float((v**2).sum()) - 1.0) < 0.2
    assert float((v[outside] ** 2).sum()) == 0.0
    assert min(ghost) > 1e-3  # energy redistributed into the background: ghosts


@pytest.mark.parametrize("axis", [1, 2])
def test_motion_ghosts_lie_along_the_phase_encode_axis(axis):
    v, inside = _mr_phantom()
    from scipy import ndimage

    head = ndimage.binary_dilation(inside, iterations=2)
    in_x = head.any(axis=(0, 1))[None, None, :]  # columns (x) the head spans
    in_y = head.any(axis=(0, 2))[None, :, None]  # rows (y) the head spans
    beside_along_y = ~head & in_x & ~in_y  # background reached from the head by moving along y only
    beside_along_x = ~head & in_y & ~in_x  # ... along x only
    energy = {1: [], 2: []}
    for seed in range(3):
        out = mri_motion(v, np.random.default_rng(seed), spacing_mm=4.0, phase_encode_axis=axis, max_rotation_deg=0)
        energy[1].append(float((out[beside_along_y] ** 2).mean()))
        energy[2].append(float((out[beside_along_x] ** 2).mean()))
    other = 2 if axis == 1 else 1
    assert np.mean(energy[axis]) > 3.0 * np.mean(energy[other])


# ---------------------------------------------------------------------------------------------- CT metal


def test_projector_matches_the_analytic_disc_and_fbp_inverts_it():
    p = projector(48, 48)
    ss = 6
    c = (np.arange(48 * ss) + 0.5) / ss - 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    radius = 15.0
    disc = ((xx - 23.5) ** 2 + (yy - 23.5) ** 2 <= radius**2).reshape(48, ss, 48, ss).mean(axis=(1, 3))
    sino = p.project(disc[None].astype(np.float32))[0]
    half = (p.n_det - 1) // 2
    s = np.arange(-half, half + 1)
    analytic = 2 * np.sqrt(np.clip(radius**2 - s**2, 0, None))
    interior = np.abs(s) < radius - 2
    assert np.abs(sino[:, interior] - analytic[interior]).mean() < 0.3
    rec = p.fbp(sino[None])[0]
    iy, ix = np.mgrid[:48, :48]
    rr = np.hypot(ix - 23.5, iy - 23.5)
    assert abs(rec[rr < radius - 3].mean() - 1.0) < 0.03
    assert abs(rec[(rr > radius + 3) & (rr < 22)].mean()) < 0.03


def test_metal_makes_bright_metal_and_streaks_only_in_metal_slices():
    ct, brain = _ct_phantom()
    mask = np.zeros(ct.shape, bool)
    z0 = N // 2
    mask[z0, 12:14, 10:12] = True
    mask[z0, 18:20, 20:22] = True
    rng = np.random.default_rng(0)
    out = simulate_metal_artifacts(ct, mask, rng, spacing_mm=4.0, metal_mu_per_mm=1.0, photons=1e9)
    assert np.all(out[mask] == 3071.0)
    err = out - ct
    near = brain[z0] & ~np.pad(mask[z0], 2)[2:-2, 2:-2]
    metal_slice_std = float(err[z0][near].std())
    z_far = z0 - 6
    assert brain[z_far].sum() > 20
    far_slice_std = float(err[z_far][brain[z_far]].std())
    assert metal_slice_std > 20.0  # streaks (beam hardening) in the metal slice
    assert far_slice_std < 2.0  # almost no photon noise at 1e9 photons, no metal: untouched
    # streaks are line-shaped: along the line joining the two objects the error is coherent (dark band)
    band = err[z0, 14:18, 12:20]
    assert band.mean() < -20.0


def test_ct_noise_grows_when_photons_drop():
    ct, brain = _ct_phantom()
    no_metal = np.zeros(ct.shape, bool)
    stds = []
    for photons in (1e5, 1e4):
        out = simulate_metal_artifacts(ct, no_metal, np.random.default_rng(1), spacing_mm=4.0, photons=photons)
        stds.append(float((out - ct)[brain].std()))
    ratio = stds[1] / stds[0]
    assert 2.0 < ratio < 4.5  # quantum noise ~ 1/sqrt(photons): sqrt(10) = 3.16


def test_ct_metal_places_metal_inside_the_body_and_rejects_normalised_input():
    ct, _ = _ct_phantom()
    out = ct_metal(ct, np.random.default_rng(2), spacing_mm=4.0)
    metal = out >= 3071.0
    assert metal.any() and np.all(ct[metal] > -300)
    with pytest.raises(InputImageError, match="Hounsfield"):
        ct_metal((ct + 1000) / 3000, np.random.default_rng(0))


@pytest.mark.parametrize("seed", range(8))
def test_later_metal_objects_lie_within_two_slices_of_the_first(seed):
    inside = np.zeros((40, 20, 20), dtype=bool)
    inside[2:38, 5:15, 5:15] = True
    # semi-axes below 0.75 voxel are raised to 0.75: every object is exactly its centre voxel
    mask = random_metal_mask(inside.shape, np.random.default_rng(seed), inside=inside, num_objects=3,
                             radius_mm=(0.1, 0.2))
    z = np.nonzero(mask)[0]
    assert 1 <= len(z) <= 3 and np.all(inside[mask])
    assert z.max() - z.min() <= 4  # the first object's slice +-2 slices: one slab, whatever the first slice


# ---------------------------------------------------------------------------------------------- PET


def test_lowdose_noise_grows_as_dose_drops_and_mean_is_preserved():
    pet = _pet_phantom()
    variances = []
    for dose in (1.0 / 4, 1.0 / 20):
        out = pet_lowdose(pet, np.random.default_rng(3), dose_fraction=dose)
        assert abs(out.mean() / pet.mean() - 1.0) < 0.01
        assert np.all(out >= 0)
        variances.append(float((out - pet)[pet > 0].var()))
    assert 3.0 < variances[1] / variances[0] < 7.0  # Poisson: variance ~ 1 / dose (ratio 5)


def test_lowdose_random_dose_is_within_range_and_bad_dose_rejected():
    pet = _pet_phantom()
    out = pet_lowdose(pet, np.random.default_rng(4))
    rel_var = float(((out - pet)[pet > 0] ** 2 / pet[pet > 0]).mean())  # = 1 / (f k) for Poisson
    k = 300.0 / float(pet[pet > 0].mean())
    dose = 1.0 / (rel_var * k)
    assert 1 / 25 < dose < 1 / 3
    with pytest.raises(ValueError, match="dose_fraction"):
        pet_lowdose(pet, np.random.default_rng(0), dose_fraction=1.5)
