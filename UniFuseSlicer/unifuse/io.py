"""Reading, validating and atomically writing volumes (and JSON reports).

* :func:`read_image` — any single regular file SimpleITK reads (NIfTI, NRRD, MetaImage, ...) or a DICOM
  folder; a pipe (FIFO, ``<(…)``), device or socket is refused before it is opened (reading it could block
  forever). A folder must hold exactly one DICOM series (in it *and its sub-folders*): several series are
  refused with their list, and a series whose slice positions are not equally spaced (a missing or
  unreadable slice, two slices at one position) is refused with the positions — ITK would only warn and
  stretch the spacing. Input files are only opened for reading. A file is first opened (permission problems
  are reported as such), then only its header is parsed: a header announcing more voxel data than the free
  memory (a corrupt size field) is refused before anything is allocated, and a NIfTI file holding fewer
  bytes than announced, or NaN/infinite voxels, is refused (ITK's niftilib silently pads a cut file with
  zeros and replaces non-finite floats by 0 in ``nifti_read_buffer``, so the raw data are scanned here).
* :func:`validate_volume` — checks that a volume can be fused (3D, scalar, >= 8 voxels per axis, finite,
  not constant) and returns a float32 copy; every rejection names the volume's role and the fix.
* :func:`write_image` / :func:`write_json` — atomic: the data go to a temporary file in the destination
  folder (same extension, so SimpleITK picks the same writer) which is then renamed over the destination
  with ``os.replace``; a crash never leaves a half-written output under the final name.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import resources
from .config import modality_from_dicom
from .errors import InputImageError, UniFuseError
from .outputs import check_targets

__all__ = [
    "MIN_SIZE",
    "IMAGE_EXTENSIONS",
    "read_image",
    "find_dicom_series",
    "header_modality",
    "validate_volume",
    "write_image",
    "write_json",
    "atomic_write",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Smallest accepted number of voxels along each axis: fewer is a slice or thin slab without 3D structure to
#: align (the network sees every volume resampled onto its cubic working grid, so it has no minimum of its
#: own; the error maps and the Jacobian use 3x3x3 neighbourhoods and smoothing).
MIN_SIZE = 8
#: Single-file formats :func:`write_image` writes (detached-header formats such as .mhd/.nhdr/.hdr would
#: need two files renamed together, which cannot be atomic).
IMAGE_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
_SUPPORTED_INPUT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


# --------------------------------------------------------------------------------------------------------
# reading


def _first_line(exc: BaseException) -> str:
    """The useful part of a (SimpleITK) exception as one line: from ``ITK ERROR:``/``sitk::ERROR:`` on, without
    the object address, line breaks (matrices span several lines) folded into spaces."""
    text = str(exc)
    marks = [text.rfind(m) for m in ("ITK ERROR:", "sitk::ERROR:")]
    start = max(marks)
    if start >= 0:
        text = text[start:].split(":", 1)[1]
        text = re.sub(r"^\s*\w+\s*\(0x[0-9a-fA-F]+\)\s*:", "", text)
    line = " ".join(text.split())
    return line or type(exc).__name__


def _file_kind(mode: int) -> str:
    """'' for a regular file or folder, else what the path is (a pipe, a device, ...)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO or process substitution <(…))"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def find_dicom_series(folder: PathLike) -> List[Tuple[str, List[str]]]:
    """All DICOM series in ``folder`` and its sub-folders as (series instance UID, sorted file names),
    ordered by decreasing number of files (ties: sorted folder, then UID)."""
    found: List[Tuple[int, str, str, List[str]]] = []
    for directory, subdirs, files in os.walk(str(folder)):
        subdirs.sort()
        if not files:
            continue
        for uid in sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory)):
            names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid))
            if names:
                found.append((-len(names), directory, uid, names))
    found.sort(key=lambda item: (item[0], item[1], item[2]))
    return [(uid, names) for _, _, uid, names in found]


def read_image(path: PathLike) -> sitk.Image:
    """Read a volume from a file or a DICOM series folder.

    Args:
        path: a regular file SimpleITK can read, or a folder holding one complete DICOM series (in it or its
            sub-folders; see the module docstring).

    Returns:
        The image as stored (pixel type and LPS geometry of the file).

    Raises:
        InputImageError: the path does not exist or is not a regular file/folder, the file cannot be read or
            holds NaN/Inf voxels (NIfTI), or the folder has no, several or an incomplete DICOM series.
    """
    p = Path(os.fspath(path)).expanduser()
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise InputImageError(
            f"input not found: '{p}' does not exist; check the path (quote it if it contains spaces) and that "
            "the file or folder was copied completely"
        ) from None
    except PermissionError as exc:
        raise InputImageError(
            f"cannot read '{p}': permission denied on a folder of its path; ask for read access to the folder "
            "(or copy the file to a folder of yours) and try again"
        ) from exc
    except OSError as exc:
        raise InputImageError(f"cannot read '{p}': {exc.strerror or exc}; check the path") from exc
    kind = _file_kind(mode)
    if kind:
        raise InputImageError(
            f"cannot read '{p}': it is {kind}, not a regular file; UniFuse reads volumes from files and DICOM "
            f"folders only — save the data to a file first ({_SUPPORTED_INPUT})"
        )
    if stat.S_ISDIR(mode):
        return _read_dicom_folder(p)
    _check_readable(p)
    header = _read_header(p)
    _check_announced_size(p, header)
    bad, total = scan_nifti(p)
    if bad:
        raise InputImageError(
            f"cannot use '{p}': {bad} of {total} voxels ({100.0 * bad / total:.3g}%) are NaN or infinite (ITK's "
            "NIfTI reader would silently turn them into 0); replace them with a finite value (e.g. the "
            "background value, numpy.nan_to_num) and save the volume again"
        )
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise _unreadable(p, exc) from exc


# --------------------------------------------------------------------------------------------------------
# DICOM folders

_ONE_SERIES = "point --reference/--moving at a folder holding only that series"


def _read_dicom_folder(p: Path) -> sitk.Image:
    """The one DICOM series in ``p`` (and its sub-folders), after checking its slice positions."""
    series = find_dicom_series(p)
    if not series:
        raise InputImageError(
            f"'{p}' is a folder but no DICOM series was found in it or its sub-folders; point to the folder "
            f"holding the DICOM slices, or to an image file: {_SUPPORTED_INPUT}"
        )
    if len(series) > 1:
        listed = "; ".join(_describe_series(p, uid, names) for uid, names in series)
        raise InputImageError(
            f"'{p}' holds {len(series)} DICOM series: {listed}. UniFuse reads one series per input: {_ONE_SERIES} "
            "(e.g. the sub-folder, or copy its files to a folder of their own)"
        )
    uid, names = series[0]
    _check_dicom_slices(p, uid, names)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(
            f"cannot read the DICOM series {uid} ({len(names)} files) in '{p}': {_first_line(exc)}; "
            "re-export the series from the scanner/PACS or convert it to NIfTI"
        ) from exc
    modality = _tag(_dicom_header(names[0]), DICOM_MODALITY_TAG)
    if modality:  # the series reader keeps no tags; this one steers the degradation detection
        image.SetMetaData(DICOM_MODALITY_TAG, modality)
    return image


#: DICOM Modality attribute (0008,0060) as SimpleITK names it.
DICOM_MODALITY_TAG = "0008|0060"


def header_modality(image: sitk.Image) -> Optional[str]:
    """``"ct"``, ``"mr"`` or ``"pet"`` from the DICOM Modality attribute that :func:`read_image` keeps for DICOM
    inputs (a single DICOM file keeps it too); None for other formats or other modalities."""
    if not image.HasMetaDataKey(DICOM_MODALITY_TAG):
        return None
    return modality_from_dicom(image.GetMetaData(DICOM_MODALITY_TAG))


def _dicom_header(name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _describe_series(p: Path, uid: str, names: List[str]) -> str:
    """``UID 'description' (N slices, in 'sub/folder')`` for the several-series message."""
    try:
        description = _tag(_dicom_header(names[0]), "0008|103e")
    except RuntimeError:
        description = ""
    where = os.path.relpath(os.path.dirname(names[0]), p)
    label = f" '{description}'" if description else ""
    return f"{uid}{label} ({len(names)} slices{'' if where == '.' else f', in {where!r}'})"


def _numbers(text: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return np.zeros(0)


def _check_dicom_slices(p: Path, uid: str, names: List[str]) -> None:
    """Refuse a series whose slices differ in size/orientation or are not equally spaced along the normal.

    Positions come from each file's Image Position (Patient) (0020|0032) projected on the normal of its
    Image Orientation (Patient) (0020|0037). A single (multi-frame) file, or files without these tags, are
    left to ITK.
    """
    if len(names) < 2:
        return
    headers = [_dicom_header(n) for n in names]
    positions = [_numbers(_tag(h, "0020|0032")) for h in headers]
    orientations = [_numbers(_tag(h, "0020|0037")) for h in headers]
    if any(v.size != 3 for v in positions) or any(v.size != 6 for v in orientations):
        return
    fix = "re-export the complete series from the scanner/PACS, or convert it to NIfTI"
    if len({tuple(h.GetSize()[:2]) for h in headers}) > 1 or np.ptp(np.stack(orientations), axis=0).max() > 1e-3:
        raise InputImageError(
            f"the DICOM series {uid} in '{p}' mixes slices of different sizes or orientations (several "
            f"acquisitions under one series UID); {fix}"
        )
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    z = np.sort(np.array([float(np.dot(v, normal)) for v in positions]))
    steps = np.diff(z)
    spacing = float(np.median(steps))
    tolerance = 0.01 * spacing + 1e-3
    odd = np.flatnonzero(np.abs(steps - spacing) > tolerance)
    if spacing <= tolerance or odd.size:
        unread = _unread_files(names)
        gaps = ", ".join(f"{steps[i]:.3g} mm from {z[i]:.2f} to {z[i + 1]:.2f} mm" for i in (odd[:4] if odd.size else [0]))
        more = f" and {odd.size - 4} more" if odd.size > 4 else ""
        raise InputImageError(
            f"the DICOM series {uid} in '{p}' has a missing or duplicated slice: its {len(z)} slice positions "
            f"({z[0]:.2f} … {z[-1]:.2f} mm along the slice normal) step by {spacing:.3g} mm except {gaps}{more}"
            f"{unread}; ITK would silently stretch the spacing — {fix}"
        )


def _unread_files(names: List[str]) -> str:
    """', unreadable here: a.dcm, b.dcm' for files next to the series that are not part of it."""
    used = {os.path.abspath(n) for n in names}
    folders = {os.path.dirname(os.path.abspath(n)) for n in names}
    other = sorted(os.path.join(f, e.name) for f in folders for e in os.scandir(f)
                   if e.is_file() and os.path.join(f, e.name) not in used)
    names_ = ", ".join(os.path.basename(o) for o in other[:5]) + (" …" if len(other) > 5 else "")
    return f" (files beside it that are not readable as its slices: {names_})" if other else ""


_DATA_FILE_FIELD = re.compile(r"^\s*(?:ElementDataFile\s*=|data ?file\s*:)\s*(.+?)\s*$", re.I | re.M)


def _missing_data_file(p: Path) -> str:
    """The data file named by a detached (.mhd/.nhdr) or inline (.mha/.nrrd) header, if it does not exist."""
    try:
        with open(p, "rb") as stream:
            head = stream.read(1 << 16).decode("latin-1")
    except OSError:
        return ""
    match = _DATA_FILE_FIELD.search(head)
    if not match or match.group(1).upper() == "LOCAL" or match.group(1).upper().startswith("LIST"):
        return ""
    name = match.group(1).split()[0]
    if "%" in name:  # a numbered file pattern (NRRD): not checked here
        return ""
    return "" if (p.parent / name).exists() else name


def _unreadable(p: Path, exc: BaseException) -> InputImageError:
    """The error for a file SimpleITK cannot read, with the most specific explanation available."""
    missing = _missing_data_file(p)
    if missing:
        return InputImageError(
            f"cannot read '{p}': its header refers to a data file '{missing}' that is not next to it; copy the "
            "header together with its data file (.raw/.zraw/.img), or use a single-file format: "
            f"{_SUPPORTED_INPUT}"
        )
    detail = _first_line(exc)
    geometry = re.search(r"Bad direction, determinant is 0.*?change direction from .*? to (.*)$|Refusing to change spacing from .*? to (.*)$", detail)
    if geometry:
        what = (f"direction cosines ({geometry.group(1).strip()}) form a singular matrix" if geometry.group(1)
                else f"voxel spacing {geometry.group(2).strip()} is not positive")
        return InputImageError(
            f"cannot read '{p}': its header has an invalid geometry: the {what}; the header is corrupt — "
            "re-export the volume, or fix the spacing/orientation in its header"
        )
    return InputImageError(
        f"cannot read '{p}': {detail}. The file is corrupt, truncated or not an image format "
        f"SimpleITK supports; re-export it as {_SUPPORTED_INPUT}"
    )


def _check_readable(p: Path) -> None:
    """Open the file for reading (never writing) to report permission problems as such."""
    try:
        with open(p, "rb") as stream:
            stream.read(1)
    except PermissionError as exc:
        raise InputImageError(
            f"cannot read '{p}': permission denied; ask for read access to the file (or copy it to a folder of "
            "yours) and try again"
        ) from exc
    except OSError as exc:
        raise InputImageError(
            f"cannot read '{p}': {exc.strerror or exc}; check that the disk or network share is available and "
            "copy the file again"
        ) from exc


def _read_header(p: Path) -> sitk.ImageFileReader:
    """Parse only the header (size, pixel type, geometry) without allocating the voxel data."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(p, exc) from exc
    return reader


def _bytes_per_pixel(pixel_id: int, components: int) -> int:
    """Bytes of one voxel: e.g. 'vector of 16-bit signed integer' with 3 components -> 6."""
    name = sitk.GetPixelIDValueAsString(pixel_id)
    bits = re.search(r"(\d+)-bit", name)
    per_component = int(bits.group(1)) // 8 if bits else 8
    if name.startswith("complex"):
        per_component *= 2
    return per_component * max(int(components), 1)


def _check_announced_size(p: Path, header: sitk.ImageFileReader) -> None:
    """Refuse a header whose voxel data could not fit into memory (a corrupt size field, or a volume far too
    large for this computer) before the reader tries to allocate it."""
    size = tuple(int(v) for v in header.GetSize())
    voxels = int(np.prod(size, dtype=np.float64)) if size else 0
    announced = voxels * _bytes_per_pixel(header.GetPixelID(), header.GetNumberOfComponents())
    free = resources.available_memory_bytes("cpu")
    if announced > free:
        raise InputImageError(
            f"cannot read '{p}': its header announces a volume of size {size} "
            f"({resources.format_bytes(announced)}), more than the {resources.format_bytes(free)} of free memory. "
            "Either the header is corrupt (re-export the file) or "
            "the volume is too large for this computer (crop or downsample it first, e.g. in Slicer's Crop "
            "Volume module)"
        )


def scan_nifti(p: Path) -> Tuple[int, int]:
    """Check a NIfTI file's voxel data and return (non-finite voxels, voxels); (0, 0) for other formats.

    ITK's niftilib silently pads a truncated .nii/.nii.gz (e.g. an interrupted copy) with zeros and replaces
    NaN/Inf floats by 0 (``nifti_read_buffer``), so the raw data are streamed here once, in chunks: header
    via nibabel (which reads only the header), the data length and, for float types, the non-finite values
    (a cut gzip stream also fails its end-of-stream check). Only reads the file.

    Raises:
        InputImageError: the file holds fewer voxel bytes than its header announces, or its gzip data are cut.
    """
    name = p.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return 0, 0
    import nibabel  # lazy: +0.2 s on the pipeline's import (the Slicer module's start-up), needed for NIfTI only

    try:
        from nibabel.imageglobals import LoggingOutputSuppressor

        with LoggingOutputSuppressor():  # nibabel logs header oddities (fixed codes) to stderr: not ours to say
            header = nibabel.load(str(p)).header
        offset, dtype = int(header.get_data_offset()), header.get_data_dtype()
        voxels = int(np.prod(header.get_data_shape()))
    except Exception:  # noqa: BLE001 - a header nibabel cannot parse was parsed by SimpleITK: trust it
        return 0, 0
    expected = offset + voxels * dtype.itemsize
    floats = dtype.kind == "f"  # (complex volumes are refused by validate_volume anyway)
    fix = f"copy the file again or re-export it (it is incomplete), or use another format: {_SUPPORTED_INPUT}"
    total, bad, carry = 0, 0, b""
    if not floats and not name.endswith(".gz"):  # nothing to scan: the length is the file size
        total = p.stat().st_size
    try:
        with (gzip.open(p, "rb") if name.endswith(".gz") else open(p, "rb")) as stream:
            while floats or name.endswith(".gz"):
                chunk = stream.read(1 << 22)
                if not chunk:
                    break
                start, total = total, total + len(chunk)
                if floats and total > offset and start < expected:
                    data = carry + chunk[max(offset - start, 0): max(expected - start, 0)]
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype=dtype))))
                    carry = data[usable:]
    except (EOFError, OSError, zlib.error) as exc:
        raise InputImageError(f"cannot read '{p}': the compressed data are truncated or corrupt ({exc}); {fix}") from exc
    if total < expected:
        raise InputImageError(
            f"cannot read '{p}': the file is truncated ({total} of the {expected} bytes its header announces); {fix}"
        )
    return bad, voxels


# --------------------------------------------------------------------------------------------------------
# validation

_COMPLEX_TYPES = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def validate_volume(image: sitk.Image, role: str) -> sitk.Image:
    """Check that ``image`` can be used as the ``role`` volume and return a float32 scalar copy.

    Accepted: 3D scalar volumes of any real pixel type (int16 with negative HU, uint8, uint16, float, ...),
    at least :data:`MIN_SIZE` voxels along every axis, all values finite, not constant. The input is never
    modified (the returned image is a separate float32 image with the same geometry).

    Args:
        image: the volume.
        role: ``"reference"`` or ``"moving"`` — named in every error message.

    Raises:
        InputImageError: with a message naming ``role``, the problem and the fix.
    """
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    if dim == 2:
        raise InputImageError(
            f"the {role} image is 2D (size {size}); UniFuse needs a 3D volume: load the whole series or "
            "volume, not a single slice or screenshot"
        )
    if dim == 4:
        raise InputImageError(
            f"the {role} image is 4D (size {size}, e.g. a time series or multi-echo/diffusion volume); "
            "extract one 3D frame first (e.g. sitk.Extract, or a Slicer sequence browser) and use that"
        )
    if dim != 3:
        raise InputImageError(f"the {role} image has {dim} dimensions (size {size}); UniFuse needs a 3D volume")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        hint = " or complex values stored as (real, imaginary) pairs" if components == 2 else ""
        raise InputImageError(
            f"the {role} image has {components} components per voxel (a colour, vector or tensor image{hint}); "
            "convert it to a single-channel (grayscale) volume first"
        )
    if image.GetPixelID() in _COMPLEX_TYPES:
        raise InputImageError(
            f"the {role} image has complex-valued voxels; take the magnitude (sitk.ComplexToModulus) first"
        )
    if image.GetNumberOfPixels() == 0:
        raise InputImageError(
            f"the {role} image is empty (size {size}, 0 voxels); the file holds a header without image data — "
            "re-export the volume"
        )
    if min(size) < MIN_SIZE:
        axis = "xyz"[int(np.argmin(size))]
        raise InputImageError(
            f"the {role} image is too small: size {size} has only {min(size)} voxel(s) along {axis}; UniFuse "
            f"needs at least {MIN_SIZE} voxels along every axis, because it aligns in 3D: the volume is resampled "
            "onto the network's cubic working grid, and a single slice or a slab a few voxels thick carries "
            "no 3D structure to align (the error maps and Jacobian also use 3x3x3 neighbourhoods and smoothing) "
            "— use the full volume"
        )
    _check_geometry(image, role)
    out = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(out)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputImageError(
            f"the {role} image has {bad} of {values.size} voxels ({100.0 * bad / values.size:.3g}%) that are NaN "
            "or infinite; replace them with a finite value (e.g. the background value, numpy.nan_to_num) and "
            "save the volume again"
        )
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise InputImageError(
            f"the {role} image is constant (all {values.size} voxels equal {low:g}), so it contains no anatomy; "
            "check that the right file/series was chosen"
        )
    return out


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _check_geometry(image: sitk.Image, role: str) -> None:
    """Spacing finite and > 0, origin finite, direction cosines finite and invertible (a corrupt header can
    produce any of these; the resampling and the displacement-field maths need all of them)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    problem = ""
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        problem = f"voxel spacing {_fmt(spacing)} mm (must be finite and positive)"
    elif not np.all(np.isfinite(origin)):
        problem = f"origin {_fmt(origin)} (must be finite)"
    elif not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        problem = f"direction cosines {_fmt(direction.ravel())} (must form an invertible matrix)"
    if problem:
        raise InputImageError(
            f"the {role} image has an invalid geometry: {problem}; its header is corrupt — re-export the "
            "volume, or fix the spacing/origin/orientation in its header"
        )


# --------------------------------------------------------------------------------------------------------
# atomic writing


def _image_extension(p: Path) -> str:
    name = p.name.lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise UniFuseError(
        f"cannot write '{p}': unsupported extension; use one of {', '.join(IMAGE_EXTENSIONS)}"
    )


def default_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (0o666 minus the umask).

    ``tempfile.mkstemp`` creates private (0o600) files; outputs renamed from such a file would otherwise stay
    unreadable for the user's colleagues and other tools.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: PathLike, overwrite: bool, suffix: str, write: Callable[[Path], None]) -> Path:
    """Write via a temporary sibling file (same ``suffix``) renamed over ``path`` when complete.

    ``write(tmp)`` fills the temporary file; it gets the permissions a plain ``open`` would give
    (:func:`default_file_mode`) and replaces ``path`` only when ``write`` returned. On any failure the
    temporary file is removed; an OSError or RuntimeError becomes a :class:`UniFuseError` naming the path.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False; OutputLocationError: ``path`` is a
        folder (the rule of :func:`unifuse.outputs.check_targets`).
    """
    p = Path(os.fspath(path)).expanduser()
    check_targets(os.fspath(p.parent), p.parent, [p.name], overwrite, {})
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UniFuseError(f"cannot create the output folder '{p.parent}': {exc.strerror}; choose a writable "
                           "location") from exc
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=str(p.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, p)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (RuntimeError, OSError)):
            raise UniFuseError(
                f"could not write '{p}': {_first_line(exc)}; check that the folder is writable and the disk "
                "has free space"
            ) from exc
        raise
    return p


def write_image(image: sitk.Image, path: PathLike, overwrite: bool = False) -> Path:
    """Atomically write ``image`` to ``path`` (.nii.gz, .nii, .nrrd or .mha), creating parent folders.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (nothing is written).
        UniFuseError: unsupported extension or the write failed (no partial file is left behind).

    Returns:
        The written path.
    """
    p = Path(os.fspath(path)).expanduser()
    check_targets(os.fspath(p.parent), p.parent, [p.name], overwrite, {})  # before the extension check
    ext = _image_extension(p)
    compress = ext != ".nii"
    return atomic_write(p, overwrite, ext, lambda tmp: sitk.WriteImage(image, str(tmp), compress))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_json(obj: Any, path: PathLike, overwrite: bool = False) -> Path:
    """Atomically write ``obj`` as UTF-8 JSON (indent 2; numpy scalars/arrays, paths and dataclasses are
    converted). The object is serialised before anything touches the disk.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        TypeError: ``obj`` holds something JSON cannot represent.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    data = text.encode("utf-8")
    suffix = Path(os.fspath(path)).suffix

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, overwrite, suffix, write)
