"""Tests of the real-anatomy data (``unifuse data real``): readers of every source format, the split by
subject, the exactness of a built case's truth, the whole offline pipeline on fake packages, and the CLI's
error paths. No network: every source file is made here, in tmp_path, at 16³–48³ voxels."""

from __future__ import annotations

import hashlib
import io
import plistlib
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from unifuse import cli
from unifuse.data import real, real_cases, real_sources
from unifuse.data.real_cases import KINDS, CaseSettings, build_case
from unifuse.data.real_sources import Artefact, RealSubject
from unifuse.errors import DatasetError

torch.set_num_threads(1)

#: Tiny grids: 4–6 mm voxels over a head-sized phantom, a 24² CT matrix for the metal projector.
SMALL = CaseSettings(max_reference_voxels=24_000, reference_spacing_mm=(5.0, 6.0), pad_mm=10.0,
                     mr_inplane_mm=(5.0, 6.0), mr_slice_mm=(7.0, 9.0), dwi_inplane_mm=(5.0, 6.0),
                     dwi_slice_mm=(6.0, 7.0), pet_mm=(6.0, 7.0), ct_matrix=24, ct_slice_mm=(6.0, 7.0),
                     max_moving_voxels=30_000)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _grid_points(shape: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> Tuple[np.ndarray, ...]:
    """Physical offsets (mm) from the centre along the array axes x, y, z (each (z, y, x))."""
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing[::-1])],
                             indexing="ij")
    return xx, yy, zz


def _head(modality: str, shape=(32, 36, 32), spacing=(5.0, 5.0, 5.5)) -> sitk.Image:
    """A smooth head phantom: ellipsoid 140 x 170 x 150 mm, a 6 mm skull, a brain with two 'ventricles'."""
    x, y, z = _grid_points(shape, spacing)
    r = np.sqrt((x / 70) ** 2 + (y / 85) ** 2 + (z / 75) ** 2)
    ventricles = np.exp(-(((np.abs(x) - 15) / 10) ** 2 + (y / 25) ** 2 + (z / 15) ** 2))
    if modality == "ct":
        a = np.where(r < 1, 1000.0, -1000.0)
        a = np.where(r < 0.92, 35.0 - 30.0 * ventricles, a)
    else:
        a = np.where(r < 1, 600.0, 0.0)
        a = np.where(r < 0.92, 400.0 + 300.0 * ventricles + 100 * np.sin(x / 20), a)
    a = ndimage.gaussian_filter(a, 1.0)
    img = sitk.GetImageFromArray(a.astype(np.int16 if modality == "ct" else np.float32))
    img.SetSpacing(spacing)
    img.SetDirection(DIRECTION)
    img.SetOrigin((-(shape[2] - 1) * spacing[0] / 2, (shape[1] - 1) * spacing[1] / 2, -(shape[0] - 1) * spacing[2] / 2))
    return img


def _chest(shape=(24, 32, 44), spacing=(8.0, 8.0, 10.0)) -> sitk.Image:
    """A chest CT phantom (HU): body ellipse 320 x 220 mm, two lungs, a posterior spine."""
    x, y, z = _grid_points(shape, spacing)
    body = (x / 160) ** 2 + (y / 110) ** 2 < 1
    lungs = ((np.abs(x) - 70) / 50) ** 2 + (y / 70) ** 2 + (z / 100) ** 2 < 1
    spine = (x / 20) ** 2 + ((y - 80) / 20) ** 2 < 1  # +y = posterior in LPS
    a = np.where(body, 40.0, -1000.0)
    a = np.where(lungs, -850.0, a)
    a = np.where(spine, 900.0, a)
    img = sitk.GetImageFromArray(ndimage.gaussian_filter(a, 0.7).astype(np.int16))
    img.SetSpacing(spacing)
    return img


def _rngs(seed: int = 0, k: int = 0) -> Dict[str, np.random.Generator]:
    return {p: real._rng(seed, "phantom", k, p) for p in real._PURPOSES}


# --------------------------------------------------------------------------------------------------------
# readers


def _inv3(path: Path, array: np.ndarray, spacing, orientation: int = 1, truncate: bool = False) -> Path:
    meta = {"matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": list(array.shape)},
            "spacing": list(spacing), "orientation": orientation, "modality": "CT"}
    raw = array.astype("<i2").tobytes()[: -2 if truncate else None]
    with tarfile.open(path, "w") as tf:
        for name, data in (("tmpabc/main.plist", plistlib.dumps(meta)), ("tmpabc/matrix.dat", raw)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_read_inv3_raw_int16_and_geometry(tmp_path):
    array = np.arange(6 * 10 * 8, dtype=np.int16).reshape(6, 10, 8) - 200
    img = real_sources.read_inv3(_inv3(tmp_path / "a.inv3", array, (0.9, 0.8, 1.5)))
    assert np.array_equal(sitk.GetArrayFromImage(img), array)
    assert img.GetSize() == (8, 10, 6)
    assert np.allclose(img.GetSpacing(), (0.9, 0.8, 1.5))
    assert np.allclose(img.GetDirection(), DIRECTION)  # rows posterior -> anterior, slices inferior -> superior
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
    assert np.allclose(centre, 0.0, atol=1e-9)
    with pytest.raises(DatasetError, match="damaged"):
        real_sources.read_inv3(_inv3(tmp_path / "b.inv3", array, (1, 1, 1), truncate=True))
    with pytest.raises(DatasetError, match="not axial"):
        real_sources.read_inv3(_inv3(tmp_path / "c.inv3", array, (1, 1, 1), orientation=2))


def test_convert_inv3_head_ct_is_upright_and_flip_is_refused(tmp_path):
    head = sitk.GetArrayFromImage(_head("ct"))[8:]  # the field of view cuts through the lower head
    subject = RealSubject("h", "x", ("head.inv3",), "inv3", "ct", "head CT", "head", "validation", "")
    out = real_sources.convert_subject(subject, {"head.inv3": _inv3(tmp_path / "a.inv3", head, (5.0, 5.0, 5.5))})
    assert out.image.GetPixelID() == sitk.sitkInt16 and out.labels is None
    assert out.checks["top_section_ratio"] < 0.8
    upside_down = _inv3(tmp_path / "b.inv3", np.ascontiguousarray(head[::-1]), (5.0, 5.0, 5.5))
    with pytest.raises(DatasetError, match="upside down"):
        real_sources.convert_subject(subject, {"head.inv3": upside_down})


def test_convert_nrrd_keeps_geometry_and_labels(tmp_path):
    img = _head("mr")
    labels = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 650).astype(np.int32)), sitk.sitkInt32)
    labels.CopyInformation(img)
    sitk.WriteImage(img, str(tmp_path / "img.nrrd"))
    sitk.WriteImage(labels, str(tmp_path / "lab.nrrd"))
    subject = RealSubject("m", "x", ("img.nrrd",), "itk", "mr", "T1", "head", "train", "", labels="lab.nrrd",
                          labels_kind="lesion")
    out = real_sources.convert_subject(subject, {"img.nrrd": tmp_path / "img.nrrd", "lab.nrrd": tmp_path / "lab.nrrd"})
    assert out.image.GetPixelID() == sitk.sitkFloat32
    for a, b in ((out.image, img), (out.labels, img)):
        assert a.GetSize() == b.GetSize()
        assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())
        assert np.allclose(a.GetSpacing(), b.GetSpacing())
    assert out.labels.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(out.labels), sitk.GetArrayFromImage(labels))


def test_chest_ct_checks_find_lungs_and_posterior_spine():
    checks = real_sources.check_plausible(_chest(), "ct", "chest")
    assert checks["lung_fraction"] > 0.05 and checks["bone_posterior_offset_mm"] > 0
    flipped = _chest()
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # anterior-posterior flipped header
    with pytest.raises(DatasetError, match="anterior"):
        real_sources.check_plausible(flipped, "ct", "chest")


def _write_dicom_series(img: sitk.Image, folder: Path) -> None:
    folder.mkdir()
    img = sitk.Cast(img, sitk.sitkInt16)
    direction = img.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", series + ".1"), ("0020|000e", series + ".2"),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in direction[0:7:3] + direction[1:8:3])),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{img.GetSpacing()[2]:.4f}")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(s)


def test_read_dicom_series_written_by_simpleitk(tmp_path):
    img = _head("mr", shape=(16, 36, 32))
    tilt = np.radians(10.0)  # an oblique, right-handed series (slices along the DICOM normal)
    img.SetDirection((1, 0, 0, 0, np.cos(tilt), -np.sin(tilt), 0, np.sin(tilt), np.cos(tilt)))
    _write_dicom_series(img, tmp_path / "series")
    out = real_sources.read_dicom_series(tmp_path / "series")
    assert out.GetSize() == img.GetSize()
    assert np.allclose(out.GetSpacing(), img.GetSpacing(), atol=1e-3)
    assert np.allclose(out.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert np.allclose(out.GetDirection(), img.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(sitk.Cast(img, sitk.sitkInt16)))
    (tmp_path / "series" / "slice_007.dcm").unlink()  # a missing slice is refused
    with pytest.raises(DatasetError, match="missing slice"):
        real_sources.read_dicom_series(tmp_path / "series")


def test_read_siemens_mosaic_demosaics_tiles(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    n, rows, cols, grid = 5, 6, 8, 3  # 5 tiles of 6 x 8 in a 3 x 3 mosaic (18 x 24 pixels)
    tiles = [np.full((rows, cols), 100 * (k + 1), np.uint16) + np.arange(cols, dtype=np.uint16) for k in range(n)]
    mosaic = np.zeros((rows * grid, cols * grid), np.uint16)
    for k, tile in enumerate(tiles):
        mosaic[(k // grid) * rows:(k // grid + 1) * rows, (k % grid) * cols:(k % grid + 1) * cols] = tile
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer = "MR", "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
    ds.Rows, ds.Columns = mosaic.shape
    ds.PixelSpacing = [2.0, 1.5]  # row spacing, column spacing
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, 30.0]
    ds.SliceThickness, ds.SpacingBetweenSlices = 3.0, 3.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
    ds.add_new((0x0019, 0x100A), "US", n)  # NumberOfImagesInMosaic
    ds.PixelData = mosaic.tobytes()
    path = tmp_path / "mosaic.dcm"
    ds.save_as(str(path), enforce_file_format=True)

    img = real_sources.read_siemens_mosaic(path)
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == (n, rows, cols)
    for k in range(n):
        assert np.array_equal(arr[k], tiles[k])
    assert np.allclose(img.GetSpacing(), (1.5, 2.0, 3.0))
    assert np.allclose(img.GetDirection(), np.eye(3).ravel())
    # the mosaic's position is its top-left corner: the first tile starts (18 - 6) / 2 rows x 2 mm and
    # (24 - 8) / 2 columns x 1.5 mm further
    assert np.allclose(img.GetOrigin(), (-10.0 + 8 * 1.5, -20.0 + 6 * 2.0, 30.0))


def test_fetch_commands_use_the_ordinary_clients(tmp_path):
    commands = {a.client: real_sources.fetch_command(a, tmp_path)[0] for a in real_sources.ARTEFACTS.values()}
    assert commands["pip-sdist"][1:4] == ["-m", "pip", "download"] and "--no-binary" in commands["pip-sdist"]
    assert "--no-cache-dir" in commands["pip-wheel"] and "--only-binary" in commands["pip-wheel"]
    assert commands["apt"][:2] == ["apt-get", "download"] and "=" in commands["apt"][2]
    assert commands["npm"][:2] == ["npm", "pack"]


# --------------------------------------------------------------------------------------------------------
# split


def test_every_subject_in_exactly_one_split_and_validation_is_complete():
    ids = [s.id for s in real_sources.SUBJECTS]
    assert len(ids) == len(set(ids))
    assert {s.split for s in real_sources.SUBJECTS} <= set(real_sources.SPLITS)
    validation = [s for s in real_sources.SUBJECTS if s.split == "validation"]
    assert any(s.modality == "ct" and s.body_part == "head" for s in validation)
    assert any(s.modality == "mr" and s.body_part == "head" and not s.is_pair for s in validation)
    assert any(s.modality == "ct" and s.body_part == "chest" for s in validation)
    assert any(s.is_pair for s in validation)
    assert all(s.artefact in real_sources.ARTEFACTS for s in real_sources.SUBJECTS)
    plan = real.plan_cases(real_sources.SUBJECTS, 3)
    names = [p[4] for p in plan]
    assert len(names) == len(set(names))
    splits_of = {}
    for subject, _, _, category, _ in plan:
        splits_of.setdefault(subject.id, set()).add(subject.split)
        assert category in ("full", "partial")
    assert all(len(v) == 1 for v in splits_of.values())
    assert {p[3] for p in plan if p[0].is_pair} == {"full"}


# --------------------------------------------------------------------------------------------------------
# truth


def _inner(img: sitk.Image, grid: sitk.Image, margin_voxels: int) -> np.ndarray:
    inside = sitk.Resample(sitk.Cast(img * 0 + 1, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return ndimage.binary_erosion(sitk.GetArrayFromImage(inside) > 0, iterations=margin_voxels)


def _warp(moving: sitk.Image, case) -> np.ndarray:
    field = sitk.Cast(case.images["truth_displacement"], sitk.sitkVectorFloat64)
    return sitk.GetArrayFromImage(sitk.Resample(moving, case.images["reference"], sitk.DisplacementFieldTransform(field),
                                                sitk.sitkLinear, -1e6, sitk.sitkFloat32))


def _ramp_case(nonrigid_mm: Tuple[float, float]):
    head = _head("ct")
    x, y, z = real_cases._points(head)  # LPS mm of every voxel, each (z, y, x)
    second = sitk.GetImageFromArray((1000 + x + 2 * y + 3 * z).astype(np.float32))  # |gradient| = sqrt(14) / mm
    second.CopyInformation(head)
    case = build_case(head, "ct", "head", KINDS["pair"][0], "full", "validation", _rngs(),
                      second=second, settings=replace(SMALL, nonrigid_mm=nonrigid_mm))
    warped = _warp(case.images["moving_clean"], case)
    truth = sitk.GetArrayFromImage(case.images["truth_moving_aligned_clean"])
    inner = _inner(second, case.images["reference"], 4) & (warped > -1e5)
    assert inner.sum() > 500
    return case, np.abs(warped - truth)[inner] / np.sqrt(14.0), inner  # errors in mm along the gradient


def test_truth_is_exact_for_a_linear_second_image():
    """A second image linear in physical space is interpolated without error: with an affine misalignment,
    warping the moving (before degradation) through the truth gives back the truth on the reference grid up
    to float32 rounding; with the smooth non-rigid part, up to the linear interpolation of the (non-linear)
    map between the moving grid's 5–9 mm voxels."""
    case, error_mm, _ = _ramp_case((0.0, 0.0))
    assert error_mm.max() < 0.01
    case, error_mm, inner = _ramp_case((6.0, 6.0))
    assert case.info["inverse"]["residual_max_mm"] < 1e-3
    assert case.info["misalignment"]["nonrigid"]["achieved_max_mm"] > 2.0
    assert np.median(error_mm) < 0.05 and error_mm.max() < 0.5
    # a truth off by 1 mm along x is off by ~1 mm; the header alone (no truth) is off by millimetres
    field = sitk.Cast(case.images["truth_displacement"], sitk.sitkVectorFloat64)
    shifted = sitk.Compose([sitk.VectorIndexSelectionCast(field, i) + float(i == 0) for i in range(3)])
    shifted.CopyInformation(field)
    off = sitk.GetArrayFromImage(sitk.Resample(case.images["moving_clean"], case.images["reference"],
                                               sitk.DisplacementFieldTransform(shifted), sitk.sitkLinear, -1e6,
                                               sitk.sitkFloat32))
    truth = sitk.GetArrayFromImage(case.images["truth_moving_aligned_clean"])
    assert np.median(np.abs(off - truth)[inner & (off > -1e5)]) > 0.8  # 1 mm x the x-slope of 1 per mm
    plain = sitk.GetArrayFromImage(sitk.Resample(case.images["moving_clean"], case.images["reference"]))
    assert np.median(np.abs(plain - truth)[inner]) > 5.0


@pytest.mark.parametrize("modality,kind_index,category", [("ct", 0, "full"), ("ct", 1, "partial"),
                                                          ("mr", 0, "full"), ("mr", 1, "partial"), ("mr", 2, "full")])
def test_built_case_truth_and_degradation(modality, kind_index, category):
    kind = KINDS[modality][kind_index]
    head = _head(modality)
    case = build_case(head, modality, "head", kind, category, "validation", _rngs(k=kind_index), settings=SMALL)
    ref = case.images["reference"]
    for stem in ("truth_displacement", "truth_moving_aligned_clean", "reference_labels"):
        img = case.images[stem]
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetOrigin(), ref.GetOrigin())
        assert np.allclose(img.GetDirection(), ref.GetDirection()) and np.allclose(img.GetSpacing(), ref.GetSpacing())
    assert case.images["truth_displacement"].GetPixelID() == sitk.sitkVectorFloat32
    assert case.images["reference_labels"].GetPixelID() == sitk.sitkUInt8
    assert case.images["moving"].GetSize() == case.images["moving_clean"].GetSize()
    mis = case.info["misalignment"]
    assert max(abs(a) for a in mis["rotation_deg"]) <= 15 and max(abs(t) for t in mis["translation_mm"]) <= 20
    assert all(0.95 <= s <= 1.05 for s in mis["scaling"]) and 2 <= mis["nonrigid"]["max_length_mm"] <= 6
    assert mis["nonrigid"]["min_jacobian"] > 0
    check = case.info["truth_check"]
    # coarse 5-9 mm test grids: interpolation dominates; the truth still beats a 1 mm-off truth and the header
    assert check["correlation"] > max(0.4, check["correlation_truth_shifted_1mm"], check["correlation_header_only"] + 0.1)
    assert case.info["inverse"]["residual_max_mm"] < 1e-3
    moving, clean = (sitk.GetArrayFromImage(case.images[s]).astype(np.float32) for s in ("moving", "moving_clean"))
    assert not np.array_equal(moving, clean)  # the degradation was applied on the moving grid
    grid = case.info["moving"]["grid"]
    if category == "partial":
        assert 0.4 <= grid["slab"]["fraction"] <= 0.6 and check["overlap_fraction"] < 0.8
    if kind.moving_modality == "ct":
        assert case.images["moving"].GetPixelID() == sitk.sitkInt16 and grid["size"][:2] == [24, 24]


def test_cases_are_deterministic_per_seed():
    head = _head("mr")
    a = build_case(head, "mr", "head", KINDS["mr"][0], "full", "train", _rngs(3), settings=SMALL)
    b = build_case(head, "mr", "head", KINDS["mr"][0], "full", "train", _rngs(3), settings=SMALL)
    c = build_case(head, "mr", "head", KINDS["mr"][0], "full", "train", _rngs(4), settings=SMALL)
    for stem in ("moving", "truth_displacement"):
        assert np.array_equal(sitk.GetArrayFromImage(a.images[stem]), sitk.GetArrayFromImage(b.images[stem]))
    assert not np.array_equal(sitk.GetArrayFromImage(a.images["moving"]), sitk.GetArrayFromImage(c.images["moving"]))


def test_validation_degradation_settings_are_not_used_in_training():
    train, val = real_cases.DEGRADATION_SETTINGS["train"], real_cases.DEGRADATION_SETTINGS["validation"]
    for name in ("motion", "metal", "lowdose"):
        for key, (lo, hi) in val[name].items():
            tlo, thi = train[name][key]
            if key in ("num_segments", "num_objects", "metal_mu_per_mm", "dose_fraction", "max_rotation_deg",
                       "max_translation_mm"):
                assert lo > thi or hi < tlo, (name, key)


# --------------------------------------------------------------------------------------------------------
# the whole pipeline on fake packages (offline)


def _fake_sources(tmp_path: Path) -> Tuple[Dict[str, Artefact], Tuple[RealSubject, ...], Path]:
    """A fake wheel with 6 subjects (validation: head CT, head MR, chest CT, MR pair; train: head MR, chest CT)."""
    files = tmp_path / "sources"
    files.mkdir()
    cache = tmp_path / "cache"
    volumes = {"headct.nrrd": _head("ct"), "headmr.nrrd": _head("mr"), "chest.nrrd": _chest(),
               "b0.nii.gz": _head("mr", shape=(28, 36, 32)), "dwi.nii.gz": _head("mr", shape=(28, 36, 32)) * 0.5 + 20,
               "trainmr.nrrd": _head("mr", spacing=(4.5, 5.0, 6.0)), "trainchest.nrrd": _chest(spacing=(8.5, 7.5, 10.0))}
    for name, img in volumes.items():
        sitk.WriteImage(img, str(files / name))
    wheel = cache / "downloads" / "fake-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in volumes:
            zf.write(files / name, f"fake/data/{name}")
    artefact = Artefact("fake", "pip-wheel", "fake", "1.0", wheel.name,
                        hashlib.sha256(wheel.read_bytes()).hexdigest(), "MIT", "https://example.invalid")

    def subject(sid, names, modality, part, split, **kw):
        members = tuple(f"fake/data/{n}" for n in names)
        return RealSubject(sid, "fake", members[:1], "itk", modality, "phantom", part, split,
                           real_sources.members_digest([files / n for n in names]),
                           second=members[1] if len(members) > 1 else None, **kw)

    subjects = (subject("v-headct", ["headct.nrrd"], "ct", "head", "validation"),
                subject("v-headmr", ["headmr.nrrd"], "mr", "head", "validation"),
                subject("v-chest", ["chest.nrrd"], "ct", "chest", "validation"),
                subject("v-pair", ["b0.nii.gz", "dwi.nii.gz"], "mr", "head", "validation", second_contrast="dwi"),
                subject("t-mr", ["trainmr.nrrd"], "mr", "head", "train"),
                subject("t-chest", ["trainchest.nrrd"], "ct", "chest", "train"))
    return {"fake": artefact}, subjects, cache


def test_offline_pipeline_builds_split_cases_and_is_idempotent(tmp_path):
    artefacts, subjects, cache = _fake_sources(tmp_path)
    lines = []
    manifest = real.prepare_real_data(cache, seed=1, cases_per_subject=2, offline=True, log=lines.append,
                                      settings=SMALL, subjects=subjects, artefacts=artefacts)
    assert set(manifest["split"]["validation"]).isdisjoint(manifest["split"]["train"])
    assert len(manifest["cases"]) == 12
    assert manifest["artefacts"]["fake"]["sha256"] == artefacts["fake"].sha256
    val = real.load_real_cases(cache, "validation")
    train = real.load_real_cases(cache, "train")
    assert {c.subject for c in val}.isdisjoint({c.subject for c in train})
    assert {c.category for c in val} == {"full", "partial"}
    assert all(c.split == "validation" for c in val) and len(val) == 8
    pair = [c for c in val if c.subject == "v-pair"]
    assert {c.category for c in pair} == {"full"} and {c.case.degradation for c in pair} == {"none", "motion"}
    for c in val:
        assert c.case.truth_displacement is not None and c.case.truth_aligned is not None
        assert c.case.moving_labels is not None and c.case.task == f"real/{c.kind}"
    volumes = real.real_training_volumes(cache)
    assert {m["id"] for _, _, m in volumes} == {"t-mr", "t-chest"}
    assert all(isinstance(img, sitk.Image) for img, _, _ in volumes)

    # re-running is idempotent and reuses everything
    stamp = (cache / "cases" / "validation" / val[0].name / "moving.nii.gz").stat().st_mtime_ns
    again = []
    real.prepare_real_data(cache, seed=1, cases_per_subject=2, offline=True, log=again.append, settings=SMALL,
                           subjects=subjects, artefacts=artefacts)
    assert sum("cached" in line for line in again) >= 1 + 6 + 12
    assert (cache / "cases" / "validation" / val[0].name / "moving.nii.gz").stat().st_mtime_ns == stamp
    # fewer cases per subject: the extra case folders are removed (inside the cache only)
    real.prepare_real_data(cache, seed=1, cases_per_subject=1, offline=True, log=again.append, settings=SMALL,
                           subjects=subjects, artefacts=artefacts)
    assert len(list((cache / "cases" / "validation").iterdir())) == 4


def test_offline_with_a_corrupt_download_names_the_missing_subjects(tmp_path):
    artefacts, subjects, cache = _fake_sources(tmp_path)
    wheel = cache / "downloads" / artefacts["fake"].filename
    wheel.write_bytes(b"corrupt")
    with pytest.raises(DatasetError, match="too few real subjects.*v-headct"):
        real.prepare_real_data(cache, offline=True, log=lambda line: None, settings=SMALL, subjects=subjects,
                               artefacts=artefacts)
    assert not wheel.exists()  # the bad file was dropped (re-fetched on the next online run)


# --------------------------------------------------------------------------------------------------------
# CLI error paths


def test_cli_offline_with_nothing_cached(tmp_path, capsys):
    cache = tmp_path / "new"
    assert cli.main(["data", "real", "--cache", str(cache), "--offline"]) == 1
    err = capsys.readouterr().err
    assert "--offline" in err and "holds no downloaded package" in err and err.count("\n") == 1
    assert not cache.exists()  # nothing was created


def test_cli_refuses_an_unknown_cache_state(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["data", "real", "--cache", str(foreign), "--offline"]) == 1
    assert "not a UniFuse real-data cache" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    afile = tmp_path / "file"
    afile.write_text("x")
    assert cli.main(["data", "real", "--cache", str(afile)]) == 1
    assert "is a file" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / real.MANIFEST).write_text("{not json")
    assert cli.main(["data", "real", "--cache", str(broken), "--offline"]) == 1
    assert "--force" in capsys.readouterr().err

    assert cli.main(["data", "real", "--cache", str(tmp_path / "c"), "--cases-per-subject", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err


def test_default_cache_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFUSE_DATA_DIR", str(tmp_path / "env-cache"))
    assert real.default_cache() == tmp_path / "env-cache"
    monkeypatch.delenv("UNIFUSE_DATA_DIR")
    assert real.default_cache() == Path("real_data")


def test_api_errors_name_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="unifuse data real"):
        real.load_real_cases(tmp_path)
    with pytest.raises(DatasetError, match="unifuse data real"):
        real.real_training_volumes(tmp_path)
    with pytest.raises(DatasetError, match="unknown split"):
        real.load_real_cases(tmp_path, "test")
