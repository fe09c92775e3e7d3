"""Reading, validation and atomic writing (unifuse.io)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from unifuse import io as uio
from unifuse.errors import InputImageError, OutputExistsError, OutputLocationError, UniFuseError

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1.1"


def volume(shape=(10, 12, 14), dtype=np.int16, seed=0, oblique=True) -> sitk.Image:
    """A random int16 'CT' with negative HU on an anisotropic, optionally oblique grid (array (z, y, x))."""
    arr = np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((-10.0, 20.0, 33.0))
    if oblique:
        t = sitk.Euler3DTransform()
        t.SetRotation(0.2, 0.1, 0.3)
        img.SetDirection(t.GetMatrix())
    return img


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_image(a: sitk.Image, b: sitk.Image, atol=1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def write_dicom_series(vol: sitk.Image, folder: Path, series_uid: str, modality: str = "CT") -> None:
    """Write ``vol`` as one DICOM file per slice with the minimal geometry tags and Modality ``modality``."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = vol.GetDirection()
    for k in range(vol.GetDepth()):
        s = vol[:, :, k]
        tags = {
            "0008|0060": modality,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": STUDY_UID,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0018|0050": str(vol.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(s)


# --------------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii", "vol.nrrd", "vol.mha"])
def test_file_round_trip_keeps_data_and_geometry_and_input_bytes(tmp_path, name):
    img = volume()
    path = tmp_path / name
    uio.write_image(img, path)
    before = sha256(path)
    mtime = path.stat().st_mtime_ns
    back = uio.read_image(path)
    assert_same_image(back, img)
    assert back.GetPixelID() == sitk.sitkInt16
    assert sha256(path) == before and path.stat().st_mtime_ns == mtime  # reading never touches the input
    assert uio.read_image(str(path)).GetSize() == img.GetSize()  # str paths too


def test_paths_with_spaces_and_non_ascii_characters(tmp_path):
    img = volume(oblique=False)
    path = tmp_path / "Patient Müller – ñ 日本" / "séries 1" / "T1 ü.nii.gz"
    written = uio.write_image(img, path)
    assert written == path and path.is_file()
    assert_same_image(uio.read_image(path), img)
    json_path = path.parent / "rapport é.json"
    uio.write_json({"name": "Müller", "size": 3}, json_path)
    assert json.loads(json_path.read_text(encoding="utf-8")) == {"name": "Müller", "size": 3}
    dicom = tmp_path / "DICOM dossier é"
    write_dicom_series(volume(shape=(8, 9, 10), oblique=False), dicom, "1.2.826.0.1.3680043.2.1125.1.200")
    assert uio.read_image(dicom).GetSize() == (10, 9, 8)


def test_missing_path_is_reported_with_the_fix(tmp_path):
    missing = tmp_path / "nope" / "t1.nii.gz"
    with pytest.raises(InputImageError) as info:
        uio.read_image(missing)
    msg = str(info.value)
    assert str(missing) in msg and "does not exist" in msg and "check the path" in msg


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_unreadable_files_are_reported(tmp_path, kind, ext):
    path = tmp_path / f"broken{ext}"
    if kind == "garbage":
        path.write_bytes(b"this is not an image" * 50)
    elif kind == "truncated":
        uio.write_image(volume(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    before = path.read_bytes()
    with pytest.raises(InputImageError) as info:
        uio.read_image(path)
    msg = str(info.value)
    assert str(path) in msg and "cannot read" in msg and "re-export" in msg
    if kind == "truncated":  # ITK alone reads a cut NIfTI silently (zero-padded); this must not pass
        assert "truncated" in msg or "not read completely" in msg or "expected" in msg, msg
    assert path.read_bytes() == before


def test_folder_without_dicom_series(tmp_path):
    folder = tmp_path / "not dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    uio.write_image(volume(), folder / "vol.nrrd")
    for target in (folder, tmp_path / "empty"):
        target.mkdir(exist_ok=True)
        with pytest.raises(InputImageError) as info:
            uio.read_image(target)
        msg = str(info.value)
        assert str(target) in msg and "no DICOM series" in msg and "image file" in msg


def test_dicom_folder_with_two_series_is_refused_and_each_series_reads_alone(tmp_path):
    big = volume(shape=(12, 11, 10), seed=1)
    small = volume(shape=(8, 11, 10), seed=2)
    folder = tmp_path / "study"
    write_dicom_series(small, folder, "1.2.826.0.1.3680043.2.1125.1.100")
    write_dicom_series(big, folder / "sub", "1.2.826.0.1.3680043.2.1125.1.101")  # nested folder
    before = {p: sha256(p) for p in folder.rglob("*.dcm")}
    with pytest.raises(InputImageError, match="holds 2 DICOM series") as info:  # issue 15: never pick one silently
        uio.read_image(folder)
    assert "1.2.826.0.1.3680043.2.1125.1.101 (12 slices, in 'sub')" in str(info.value)
    img = uio.read_image(folder / "sub")
    assert img.GetPixelID() == sitk.sitkInt16
    assert_same_image(img, big, atol=1e-4)
    series = uio.find_dicom_series(folder)
    assert [uid for uid, _ in series] == ["1.2.826.0.1.3680043.2.1125.1.101", "1.2.826.0.1.3680043.2.1125.1.100"]
    assert [len(names) for _, names in series] == [12, 8]
    assert {p: sha256(p) for p in folder.rglob("*.dcm")} == before
    only_small = tmp_path / "small"
    write_dicom_series(small, only_small, "1.2.826.0.1.3680043.2.1125.1.102")
    assert_same_image(uio.read_image(only_small), small)


# --------------------------------------------------------------------------------------------------------
# validation


def _check_rejected(image: sitk.Image, *words: str) -> None:
    for role in ("reference", "moving"):
        with pytest.raises(InputImageError) as info:
            uio.validate_volume(image, role)
        msg = str(info.value)
        assert f"the {role} image" in msg
        for word in words:
            assert word in msg, (word, msg)


def test_validate_rejects_each_bad_volume_with_a_specific_message():
    _check_rejected(sitk.Image([32, 32], sitk.sitkFloat32), "2D", "3D volume")
    _check_rejected(sitk.Image([16, 16, 16, 4], sitk.sitkFloat32), "4D", "extract one 3D frame")
    _check_rejected(sitk.Image([16, 16, 16], sitk.sitkVectorFloat32, 3), "3 components", "single-channel")
    _check_rejected(sitk.Image([16, 16, 16], sitk.sitkComplexFloat32), "complex", "magnitude")
    _check_rejected(sitk.Image([0, 0, 0], sitk.sitkFloat32), "empty", "0 voxels")
    _check_rejected(sitk.Image([64, 64, 5], sitk.sitkFloat32), "too small", "5 voxel(s) along z", "at least 8")
    const = sitk.Image([16, 16, 16], sitk.sitkInt16) + 7
    _check_rejected(const, "constant", "4096 voxels equal 7", "right file")
    arr = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    arr[0, 0, :2] = np.nan
    arr[3, 4, 5] = np.inf
    _check_rejected(sitk.GetImageFromArray(arr), "3 of 4096 voxels", "NaN or infinite", "replace them")


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.float32, np.float64])
def test_validate_accepts_common_pixel_types_and_returns_a_float32_copy(dtype):
    rng = np.random.default_rng(0)
    if dtype == np.int16:
        arr = rng.integers(-1024, 3000, size=(9, 10, 11)).astype(dtype)  # negative HU
    elif np.issubdtype(dtype, np.integer):
        arr = rng.integers(0, np.iinfo(dtype).max, size=(9, 10, 11)).astype(dtype)
    else:
        arr = rng.normal(size=(9, 10, 11)).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.7, 3.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    pixel_before = img.GetPixelID()
    out = uio.validate_volume(img, "moving")
    assert out.GetPixelID() == sitk.sitkFloat32
    assert out.GetSize() == img.GetSize() and out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin() and out.GetDirection() == img.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr.astype(np.float32))
    # the input is untouched, also after the copy is modified
    out[0, 0, 0] = 12345.0
    assert img.GetPixelID() == pixel_before
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


# --------------------------------------------------------------------------------------------------------
# writing


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "out.nii.gz"
    uio.write_image(volume(seed=1), path)
    before = sha256(path)
    with pytest.raises(OutputExistsError) as info:
        uio.write_image(volume(seed=2), path)
    assert f"'{tmp_path}': {path.name};" in str(info.value) and "overwrite" in str(info.value)
    assert sha256(path) == before
    uio.write_image(volume(seed=2), path, overwrite=True)
    assert_same_image(uio.read_image(path), volume(seed=2))
    with pytest.raises(OutputLocationError, match="is a folder"):
        uio.write_image(volume(), tmp_path)


def test_write_creates_parents_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a" / "b" / "c" / "field.nrrd"
    field = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 9, 10, 3)), isVector=True)
    uio.write_image(field, path)
    back = uio.read_image(path)
    assert back.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field))
    assert sorted(os.listdir(path.parent)) == ["field.nrrd"]


def test_failed_write_leaves_destination_untouched(tmp_path, monkeypatch):
    path = tmp_path / "out.mha"
    uio.write_image(volume(seed=1), path)
    before = sha256(path)
    seen = []

    def broken_writer(image, filename, *args):
        seen.append(filename)
        Path(filename).write_bytes(b"partial")  # a crash half-way through writing
        raise RuntimeError("disk full")

    monkeypatch.setattr(uio.sitk, "WriteImage", broken_writer)
    with pytest.raises(UniFuseError, match="could not write") as info:
        uio.write_image(volume(seed=2), path, overwrite=True)
    assert "disk full" in str(info.value)
    assert sha256(path) == before  # old content intact
    assert sorted(os.listdir(tmp_path)) == ["out.mha"]  # temporary file removed
    tmp = Path(seen[0])
    assert tmp.parent == tmp_path and tmp.name.endswith(".mha") and tmp.name != "out.mha"


def test_unsupported_output_extensions(tmp_path):
    for name in ("out.png", "out.mhd", "out", ".nii.gz"):
        with pytest.raises(UniFuseError, match="unsupported extension"):
            uio.write_image(volume(), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_write_json_atomic_and_numpy_aware(tmp_path):
    path = tmp_path / "reports" / "report.json"
    report = {"mean": np.float32(0.25), "size": np.int64(3), "grid": np.arange(3), "path": tmp_path, "ü": "é"}
    uio.write_json(report, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "mean": 0.25, "size": 3, "grid": [0, 1, 2], "path": str(tmp_path), "ü": "é",
    }
    with pytest.raises(OutputExistsError):
        uio.write_json({}, path)
    uio.write_json({"v": 2}, path, overwrite=True)
    assert json.loads(path.read_text(encoding="utf-8")) == {"v": 2}
    with pytest.raises(TypeError):
        uio.write_json({"bad": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    assert sorted(os.listdir(path.parent)) == ["report.json"]


def test_written_files_get_normal_permissions_not_private_temp_ones(tmp_path):
    """Atomic writes go through mkstemp (mode 0o600); the final file must have the umask's default mode."""
    import stat

    from unifuse.io import default_file_mode, write_image, write_json

    img = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    for path in (write_image(img, tmp_path / "a.nii.gz"), write_json({"a": 1}, tmp_path / "r.json")):
        assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()


@pytest.mark.parametrize("tag,expected", [("CT", "ct"), ("MR", "mr"), ("PT", "pet"), ("US", None)])
def test_dicom_series_keeps_its_modality(tmp_path, tag, expected):
    write_dicom_series(volume(shape=(6, 7, 8), seed=3), tmp_path / "s", "1.2.826.0.1.3680043.2.1125.1.102", tag)
    img = uio.read_image(tmp_path / "s")
    assert img.GetMetaData(uio.DICOM_MODALITY_TAG) == tag
    assert uio.header_modality(img) == expected


def test_other_formats_have_no_header_modality(tmp_path):
    uio.write_image(volume(), tmp_path / "v.nrrd")
    assert uio.header_modality(uio.read_image(tmp_path / "v.nrrd")) is None
