"""Versioned UniFuse checkpoints.

A checkpoint is one file written by :func:`torch.save` holding only plain data (so it loads with
``torch.load(weights_only=True)`` and cannot run code)::

    {
      "format": "unifuse-checkpoint",
      "format_version": 1,
      "config": {...},            # ModelConfig.to_dict()
      "state_dict": {...},        # tensors
      "metadata": {...},          # training metadata: steps, data, metrics, date, unifuse version, ...
    }

Next to it, ``<file>.sha256`` holds the SHA-256 of the file in ``sha256sum`` format. Loading verifies the
checksum before unpickling anything; a missing, truncated or modified file fails with
:class:`~unifuse.errors.WeightsError` naming the path and what to do.

The shipped weights live in ``UniFuseSlicer/Resources/Models/`` (see :func:`shipped_weights_path`).

torch is imported inside the functions that save and load: the Slicer module imports this module (through
the pipeline) and must open without torch.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

from . import __version__
from .config import ModelConfig
from .errors import WeightsError
from .io import atomic_write

FORMAT = "unifuse-checkpoint"
FORMAT_VERSION = 1
SHIPPED_WEIGHTS_NAME = "unifuse_default.pt"

PathLike = Union[str, os.PathLike]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network config, its tensors and training metadata."""

    config: ModelConfig
    state_dict: Dict[str, Any]
    metadata: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None
    sha256: Optional[str] = None

    @property
    def model_id(self) -> str:
        """Short identifier for reports: config name + first 12 hex digits of the file's SHA-256."""
        return f"unifuse-{self.config.name}-{self.sha256[:12]}" if self.sha256 else f"unifuse-{self.config.name}"


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: PathLike) -> Path:
    """Path of the ``.sha256`` side file of a checkpoint."""
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def save_checkpoint(
    path: PathLike,
    config: ModelConfig,
    state_dict: Dict[str, Any],
    metadata: Optional[Dict[str, Any]] = None,
) -> str:
    """Write a checkpoint and its ``.sha256`` side file atomically; return the SHA-256.

    Tensors are moved to CPU and detached so the file loads on any device.
    """
    import torch

    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "metadata": {"unifuse_version": __version__, **(metadata or {})},
    }
    atomic_write(path, True, path.suffix, lambda tmp: torch.save(payload, tmp))
    digest = sha256_of(path)
    checksum_path(path).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return digest


def _expected_sha256(path: Path) -> str:
    side = checksum_path(path)
    if not side.is_file():
        raise WeightsError(
            f"checksum file {side} is missing; a UniFuse checkpoint must come with its .sha256 file "
            f"(re-download/re-copy both files, or re-save the checkpoint with unifuse.weights.save_checkpoint)"
        )
    text = side.read_text(encoding="utf-8").strip().split()
    if not text or len(text[0]) != 64:
        raise WeightsError(f"checksum file {side} is malformed; expected '<64 hex digits>  {path.name}'")
    return text[0].lower()


def _unreadable_checkpoint(path: Path, exc: Exception) -> WeightsError:
    """One line for a checkpoint ``torch.load(weights_only=True)`` refuses — without torch's advice to load
    it with ``weights_only=False``, which would let the file run code."""
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand|Weights only load failed", text)
    if unsafe:
        what = f" ({unsafe.group(1)})" if unsafe.groups() else ""
        return WeightsError(
            f"weights file {path} cannot be read as a UniFuse checkpoint: it holds Python objects{what} besides "
            "tensors and plain data, and unifuse refuses to unpickle those because they could run code; use a "
            "checkpoint written by unifuse.weights.save_checkpoint"
        )
    first = " ".join(text.split())[:200]
    return WeightsError(
        f"weights file {path} cannot be read as a UniFuse checkpoint ({exc.__class__.__name__}: {first}); copy it "
        "again, or use a checkpoint written by unifuse.weights.save_checkpoint"
    )


def load_checkpoint(path: PathLike, verify: bool = True) -> Checkpoint:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        WeightsError: the file is missing, its checksum does not match, it is not a UniFuse checkpoint, or
            its format version is newer than this code understands.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"weights path {path} is a folder; pass the checkpoint file (.pt) inside it")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass the path of a UniFuse checkpoint (.pt)")
    digest = sha256_of(path)
    if verify:
        expected = _expected_sha256(path)
        if digest != expected:
            raise WeightsError(
                f"weights file {path} is corrupt or was modified: SHA-256 {digest[:16]}… does not match "
                f"{expected[:16]}… in {checksum_path(path).name}; copy the checkpoint again"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise _unreadable_checkpoint(path, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a UniFuse checkpoint (missing format tag {FORMAT!r})")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(
            f"{path} has checkpoint format version {version}; this unifuse reads up to {FORMAT_VERSION} — upgrade unifuse"
        )
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path} has an invalid model config: {exc}") from exc
    return Checkpoint(
        config=config,
        state_dict=payload["state_dict"],
        metadata=dict(payload.get("metadata") or {}),
        path=path,
        sha256=digest,
    )


def models_dir() -> Path:
    """``UniFuseSlicer/Resources/Models`` next to the core package (source tree and Slicer install alike)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def shipped_weights_path() -> Optional[Path]:
    """Path of the shipped default weights, or None when no trained weights are shipped with this copy."""
    p = models_dir() / SHIPPED_WEIGHTS_NAME
    return p if p.is_file() else None
