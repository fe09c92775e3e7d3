"""The UniFuse sample pair for Slicer's Sample Data module.

The files ship inside the module (``UniFuseSlicer/Resources/SampleData/``), so nothing is downloaded: each
file is registered with a ``file://`` URI and its SHA-256 checksum, which Sample Data verifies when it
copies the file into its cache.

Expected files (written by ``unifuse demo``, which synthesises them offline from the MNI152 template):

=================================  ================================  ==========================================
file                               node name                         content
=================================  ================================  ==========================================
``reference.nii.gz``               ``UniFuseSample-reference``       clean reference volume (T1-like MR)
``moving.nii.gz``                  ``UniFuseSample-moving``          degraded, misaligned second modality
=================================  ================================  ==========================================

Sources whose files are missing are not registered (and :func:`sample_sources` says which are missing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "SAMPLE_CATEGORY",
    "SampleSource",
    "SAMPLE_SOURCES",
    "sample_data_directory",
    "sha256_checksum",
    "sample_sources",
    "register_sample_data",
]

SAMPLE_CATEGORY = "UniFuse"


@dataclass(frozen=True)
class SampleSource:
    """One entry of the Sample Data module: several files loaded together as volumes."""

    sample_name: str
    file_names: Tuple[str, ...]
    node_names: Tuple[str, ...]
    thumbnail: str = "UniFuseSlicer.png"  # in Resources/Icons


SAMPLE_SOURCES: Tuple[SampleSource, ...] = (
    SampleSource(
        sample_name="UniFuseSample",
        file_names=("reference.nii.gz", "moving.nii.gz"),
        node_names=("UniFuseSample-reference", "UniFuseSample-moving"),
    ),
)


def sample_data_directory(module_dir: Union[str, Path]) -> Path:
    """``<module_dir>/Resources/SampleData`` (``module_dir`` = folder of ``UniFuseSlicer.py``)."""
    return Path(module_dir) / "Resources" / "SampleData"


def sha256_checksum(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """``"SHA256:<hex digest>"`` of a file, the checksum format of Slicer's Sample Data module."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return f"SHA256:{digest.hexdigest()}"


def sample_sources(
    module_dir: Union[str, Path],
    sources: Sequence[SampleSource] = SAMPLE_SOURCES,
) -> Tuple[List[Dict[str, Any]], List[Path]]:
    """Keyword arguments for ``SampleDataLogic.registerCustomSampleDataSource`` of every complete source.

    Returns:
        (list of kwargs dicts, list of missing files). A source with any missing file is left out.
    """
    directory = sample_data_directory(module_dir)
    icons = Path(module_dir) / "Resources" / "Icons"
    registrations: List[Dict[str, Any]] = []
    missing: List[Path] = []
    for source in sources:
        paths = [directory / name for name in source.file_names]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            missing.extend(absent)
            continue
        thumbnail: Optional[Path] = icons / source.thumbnail
        registrations.append({
            "category": SAMPLE_CATEGORY,
            "sampleName": source.sample_name,
            "uris": [p.resolve().as_uri() for p in paths],
            "fileNames": list(source.file_names),
            "nodeNames": list(source.node_names),
            "checksums": [sha256_checksum(p) for p in paths],
            "thumbnailFileName": str(thumbnail) if thumbnail.is_file() else None,
        })
    return registrations, missing


def register_sample_data(sample_data_logic: Any, module_dir: Union[str, Path]) -> List[Path]:
    """Register the sample sources with Slicer's ``SampleData.SampleDataLogic`` (class or instance).

    Returns:
        The missing files (empty when everything was registered); the caller logs them.
    """
    registrations, missing = sample_sources(module_dir)
    for kwargs in registrations:
        sample_data_logic.registerCustomSampleDataSource(**kwargs)
    return missing
