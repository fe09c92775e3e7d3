"""Bad and unusual inputs through both front ends: the Python API (``unifuse.fuse`` with file paths or images)
and the CLI (``unifuse.cli.main``). Every rejection must be the specific exception type (API) or exit code 1
with exactly one ``unifuse: error:`` line and no traceback (CLI), name the problem and the fix, and leave the
input files byte-identical; integer volumes (int16 CT with negative HU, uint8, uint16) must work end to end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

import unifuse.error_maps  # noqa: F401 - imported before any test drops privileges (see _unprivileged)
import unifuse.geometry  # noqa: F401
import unifuse.intensity  # noqa: F401
from unifuse import io as uio
from unifuse import resources
from unifuse.cli import EXIT_ERROR, EXIT_OK, main
from unifuse.errors import GeometryError, InputImageError
from unifuse.pipeline import OUTPUT_FILES, REPORT_FILE, fuse

SIZE = (20, 18, 16)  # (x, y, z) voxels
SPACING = (1.5, 1.5, 2.0)
ORIGIN = (-14.0, -12.0, -15.0)


def phantom(dtype=np.float32, low=5.0, high=100.0, shift_x=0.0) -> np.ndarray:
    """(z, y, x) array: a Gaussian blob from ``low`` (background) to ``high`` (centre)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in SIZE[::-1]], indexing="ij")
    c = np.array(SIZE[::-1]) / 2.0
    blob = np.exp(-(((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - shift_x) ** 2) / 18.0))
    return (low + (high - low) * blob).astype(dtype)


def image(arr: np.ndarray, origin=ORIGIN, spacing=SPACING) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write(img: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"missing:{path.exists()}"


@contextmanager
def _unprivileged() -> Iterator[None]:
    """Run the block with the effective uid of 'nobody' when the tests run as root (root reads every file)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


# --------------------------------------------------------------------------------------------------------
# the bad inputs: (name, maker(folder) -> path, exception type, words in the message)


def _garbage_header(d: Path) -> Path:
    path = write(image(phantom()), d / "corrupt header.nii")
    data = bytearray(path.read_bytes())
    data[0:4] = (12345678).to_bytes(4, "little")  # sizeof_hdr must be 348
    data[344:348] = b"zzz\0"  # magic must be n+1
    path.write_bytes(bytes(data))
    return path


def _empty_file(d: Path) -> Path:
    path = d / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _two_d(d: Path) -> Path:
    return write(sitk.GetImageFromArray(phantom()[8]), d / "slice.nii.gz")


def _four_d(d: Path) -> Path:
    frames = [image(phantom(high=h)) for h in (100.0, 90.0, 80.0)]
    return write(sitk.JoinSeries(frames), d / "series 4d.nii.gz")  # size (20, 18, 16, 3)


def _rgb(d: Path) -> Path:
    rgb = np.repeat(phantom(np.uint8)[..., None], 3, axis=-1)
    return write(_vector_image(rgb), d / "colour.nrrd")


def _vector_image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def _constant(d: Path) -> Path:
    return write(image(np.full(SIZE[::-1], 42, np.int16)), d / "constant.mha")


def _nan(d: Path) -> Path:
    arr = phantom()
    arr[3, 4, 5] = np.nan
    arr[7, 8, 9] = np.inf
    arr[0, 0, :3] = -np.inf
    return write(image(arr), d / "nan.nrrd")


def _too_thin(d: Path) -> Path:
    return write(image(phantom()[:4]), d / "thin slab.nii.gz")


def _complex(d: Path) -> Path:
    re_im = phantom().astype(np.complex64) * (1 + 1j)
    img = sitk.RealAndImaginaryToComplex(image(re_im.real.astype(np.float32)), image(re_im.imag.astype(np.float32)))
    return write(img, d / "complex.nrrd")


def _binary_mask(d: Path) -> Path:
    return write(image((phantom() > 50).astype(np.uint8)), d / "mask.nii.gz")


def _far_away(d: Path) -> Path:
    return write(image(phantom(), origin=(500.0, 500.0, 500.0)), d / "far away.nii.gz")


def _header_without_data(d: Path) -> Path:
    path = write(image(phantom()), d / "detached.mhd")
    (d / "detached.raw").unlink()  # copied without its data file
    return path


def _missing(d: Path) -> Path:
    return d / "no such folder" / "t1.nii.gz"


BAD_FILES: List[Tuple[str, Callable[[Path], Path], type, Tuple[str, ...]]] = [
    ("missing", _missing, InputImageError, ("does not exist", "check the path")),
    ("corrupt header", _garbage_header, InputImageError, ("cannot read", "corrupt", "re-export")),
    ("empty file", _empty_file, InputImageError, ("cannot read", "re-export")),
    ("header without data", _header_without_data, InputImageError,
     ("refers to a data file 'detached.raw'", "copy the header together with its data file")),
    ("2D", _two_d, InputImageError, ("is 2D", "3D volume")),
    ("4D", _four_d, InputImageError, ("is 4D", "extract one 3D frame")),
    ("RGB", _rgb, InputImageError, ("3 components", "single-channel")),
    ("constant", _constant, InputImageError, ("constant", "equal 42", "right file")),
    ("NaN/Inf", _nan, InputImageError, ("5 of 5760 voxels", "NaN or infinite", "replace them")),
    ("too small", _too_thin, InputImageError, ("too small", "4 voxel(s) along z", "at least 8", "3D")),
    ("complex", _complex, InputImageError, ("complex", "magnitude")),
    ("binary mask", _binary_mask, InputImageError, ("cannot be normalised", "value 1", "no contrast")),
    ("no overlap", _far_away, GeometryError, ("covers 0.00%", "--init moments", "same scanner coordinates")),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("good")
    return {
        "reference": write(image(phantom()), d / "reference.nii.gz"),
        "moving": write(image(phantom(np.int16, high=300.0, shift_x=1.5)), d / "moving.mha"),
    }


def _inputs(good: Dict[str, Path], bad: Path, role: str) -> Tuple[Path, Path]:
    return (bad, good["moving"]) if role == "reference" else (good["reference"], bad)


@pytest.mark.parametrize("role", ["reference", "moving"])
@pytest.mark.parametrize("name, make, error, words", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_input_file_through_the_api(tmp_path, good, role, name, make, error, words):
    bad = make(tmp_path)
    ref, mov = _inputs(good, bad, role)
    before = {p: digest(p) for p in (ref, mov)}
    with pytest.raises(error) as info:
        fuse(ref, mov, device="cpu", config="tiny")
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)
    file_level = ("missing", "corrupt header", "empty file", "header without data")
    if error is InputImageError and name not in file_level:
        assert f"the {role} image" in msg  # the message says which input is wrong
    if name in file_level:
        assert str(bad) in msg
    assert {p: digest(p) for p in (ref, mov)} == before


@pytest.mark.parametrize("role", ["reference", "moving"])
@pytest.mark.parametrize("name, make, error, words", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_input_file_through_the_cli(tmp_path, good, capsys, role, name, make, error, words):
    bad = make(tmp_path)
    ref, mov = _inputs(good, bad, role)
    before = {p: digest(p) for p in (ref, mov)}
    out = tmp_path / "out"
    code = main(["fuse", "--reference", str(ref), "--moving", str(mov), "--out", str(out), "--config", "tiny",
                 "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == EXIT_ERROR
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("unifuse: error: ") and "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert {p: digest(p) for p in (ref, mov)} == before


def test_in_memory_images_empty_and_non_finite_are_rejected_and_not_modified():
    ref = image(phantom())
    nan = phantom()
    nan[1, 2, 3] = np.nan
    for bad, words in [
        (sitk.Image([0, 0, 0], sitk.sitkFloat32), ("empty", "0 voxels")),
        (image(nan), ("1 of 5760 voxels", "NaN or infinite")),
        (sitk.Image([16, 16, 16], sitk.sitkComplexFloat64), ("complex", "magnitude")),
    ]:
        arr = sitk.GetArrayFromImage(bad).copy()
        with pytest.raises(InputImageError) as info:
            fuse(ref, bad, device="cpu", config="tiny")
        assert all(w in str(info.value) for w in words) and "the moving image" in str(info.value)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(bad), arr)


def test_invalid_geometry_from_a_corrupt_header_is_named():
    bad = image(phantom())
    bad.SetSpacing((1.0, float("nan"), 1.0))
    with pytest.raises(InputImageError, match=r"invalid geometry: voxel spacing \(1, nan, 1\) mm") as info:
        fuse(image(phantom()), bad, device="cpu", config="tiny")
    assert "header is corrupt" in str(info.value)
    bad = image(phantom())
    bad.SetOrigin((0.0, float("inf"), 0.0))
    with pytest.raises(InputImageError, match="invalid geometry: origin"):
        uio.validate_volume(bad, "reference")


# --------------------------------------------------------------------------------------------------------
# unreadable (permissions) and over-large headers


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A folder that 'nobody' may enter (pytest's tmp_path lives under a root-only 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="unifuse perm ", dir="/tmp"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("locked_part", ["file", "folder"])
def test_unreadable_input_says_permission_denied_in_api_and_cli(world_traversable_dir, capsys, locked_part):
    folder = world_traversable_dir / "data"
    ok = write(image(phantom()), world_traversable_dir / "reference.nii.gz")
    locked = write(image(phantom(high=80.0)), folder / "locked.nii.gz")
    before = digest(locked)
    target = locked if locked_part == "file" else folder
    mode = target.stat().st_mode
    os.chmod(target, 0)
    try:
        with _unprivileged():
            with pytest.raises(InputImageError) as info:
                fuse(ok, locked, device="cpu", config="tiny")
            code = main(["fuse", "--reference", str(locked), "--moving", str(ok), "--out",
                         str(world_traversable_dir / "out"), "--config", "tiny", "--quiet"])
    finally:
        os.chmod(target, mode)
    msg = str(info.value)
    assert str(locked) in msg and "permission denied" in msg and "read access" in msg
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == EXIT_ERROR and len(lines) == 1 and "permission denied" in lines[0]
    assert digest(locked) == before
    assert not (world_traversable_dir / "out").exists()


def test_header_announcing_more_data_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = write(image(phantom()), tmp_path / "vol.nii")
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device="cpu": 4096)
    read = []
    monkeypatch.setattr(uio.sitk, "ReadImage", lambda *a, **k: read.append(a))
    with pytest.raises(InputImageError) as info:
        uio.read_image(path)
    msg = str(info.value)
    assert "(20, 18, 16)" in msg and "more than the" in msg and "header is corrupt" in msg and "crop" in msg
    assert read == []  # the voxel data were never read


# --------------------------------------------------------------------------------------------------------
# integer volumes work end to end


def _ct_hu() -> np.ndarray:
    """int16 CT in HU: air -1000, soft tissue 40, a bone shell 1200 (negative values on purpose)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in SIZE[::-1]], indexing="ij")
    c = np.array(SIZE[::-1]) / 2.0
    r = np.sqrt(((z - c[0]) / 7.0) ** 2 + ((y - c[1]) / 8.0) ** 2 + ((x - c[2]) / 9.0) ** 2)
    return np.where(r < 0.8, 40, np.where(r < 1.0, 1200, -1000)).astype(np.int16)


@pytest.mark.parametrize(
    "kind, make, modality",
    [
        ("int16 CT", _ct_hu, "ct"),
        ("uint8", lambda: phantom(np.uint8, low=0.0, high=250.0), "mr_or_pet"),
        ("uint16", lambda: phantom(np.uint16, low=10.0, high=60000.0), "mr_or_pet"),
    ],
)
def test_integer_volumes_run_end_to_end_in_api_and_cli(tmp_path, good, capsys, kind, make, modality):
    arr = make()
    path = write(image(arr), tmp_path / f"{kind}.nii.gz")
    before = {p: digest(p) for p in (path, good["moving"])}
    result = fuse(path, good["moving"], device="cpu", config="tiny", map_back=True)
    norm = result.report["normalization"]["reference"]
    assert norm["modality"] == modality
    if modality == "ct":
        assert (norm["low"], norm["high"]) == (-1000.0, 2000.0)
    fused = sitk.GetArrayFromImage(result.fused)
    assert result.fused.GetSize() == SIZE and np.isfinite(fused).all()
    assert fused.min() >= norm["low"] - 1e-3 and fused.max() <= norm["high"] + 1e-3  # reference units
    out = tmp_path / "out ü"
    code = main(["fuse", "--reference", str(path), "--moving", str(good["moving"]), "--out", str(out),
                 "--config", "tiny", "--device", "cpu", "--quiet"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), REPORT_FILE])
    assert {p: digest(p) for p in (path, good["moving"])} == before
    # the input image objects are not modified either
    img = image(arr)
    fuse(img, good["moving"], device="cpu", config="tiny")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    assert img.GetPixelID() == sitk.GetImageFromArray(arr).GetPixelID()



# --------------------------------------------------------------------------------------------------------
# trust: determinism and awkward paths


def test_cpu_results_are_deterministic_for_the_same_input_and_seed(good):
    runs = [fuse(good["reference"], good["moving"], device="cpu", config="tiny", seed=7) for _ in range(2)]
    for name in ("fused", "aligned", "displacement", "jacobian", "error_map", "error_map_before"):
        a, b = (sitk.GetArrayFromImage(getattr(r, name)) for r in runs)
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert runs[0].probabilities == runs[1].probabilities
    other = fuse(good["reference"], good["moving"], device="cpu", config="tiny", seed=8)
    # the seed really changes the (untrained) network; the calibrated probabilities of an untrained network come
    # from the physical evidence alone, so they stay the same
    net = [r.report["degradation"]["network_probabilities"] for r in (runs[0], other)]
    assert net[0] != net[1] and other.probabilities == runs[0].probabilities


def test_cli_paths_with_spaces_and_non_ascii_characters(tmp_path, capsys):
    folder = tmp_path / "Patient Müller – ñ 日本" / "séries 1"
    ref = write(image(phantom()), folder / "T1 ü.nii.gz")
    mov = write(image(phantom(np.int16, high=300.0, shift_x=1.0)), folder / "FLAIR é.nrrd")
    before = {p: digest(p) for p in (ref, mov)}
    out = tmp_path / "sortie ç" / "résultat 融合"
    code = main(["fuse", "--reference", str(ref), "--moving", str(mov), "--out", str(out), "--config", "tiny",
                 "--device", "cpu", "--quiet"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), REPORT_FILE])
    assert str(out) in capsys.readouterr().out
    assert {p: digest(p) for p in (ref, mov)} == before
    missing = folder / "absent ü.nii.gz"
    assert main(["fuse", "--reference", str(missing), "--moving", str(mov), "--out", str(out / "x"),
                 "--config", "tiny", "--quiet"]) == EXIT_ERROR
    assert str(missing) in capsys.readouterr().err  # the message names the path exactly as given
