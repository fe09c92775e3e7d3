"""The stages of :func:`unifuse.fuse`, each a function with typed inputs and outputs.

Order (``docs/architecture.md``): header geometry -> rigid/affine (Mattes MI) -> working grid (mm, over the
overlap) -> network field -> refinement -> fusion -> one warp of the original moving data -> maps. Every
alignment stage proposes a :class:`~unifuse.guard.Candidate`; the :class:`~unifuse.guard.AlignmentGuard`
keeps it only if the ground-truth-free score improves.

Conventions: images are SimpleITK (LPS mm); a *global transform* maps reference points to moving points
(``moving(T(x))``); working-grid fields are torch (1, 3, D, H, W) pull-back fields in working-grid voxels,
channels (x, y, z); the composed map is ``x -> T_global(x + u(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry
from .errors import InputImageError
from .guard import Candidate
from .intensity import IntensityNormalization, foreground_mask, normalize_image
from .io import read_image
from .spatial import warp
from .working_grid import GridChoice, choose_working_grid, overlap_index_box

__all__ = [
    "NORMALIZATION_MAX_VOXELS",
    "GlobalStage",
    "WorkingVolumes",
    "read_mask",
    "normalization",
    "header_transform",
    "global_candidate",
    "plan_working_grid",
    "prepare_working_volumes",
    "deformable_candidate",
    "field_to_transform",
]

#: Intensity normalisation statistics are computed on at most this many voxels (a regular sub-lattice of
#: larger volumes: percentiles of 16M samples differ from the full volume's by far less than the noise).
NORMALIZATION_MAX_VOXELS = 1 << 24


def read_mask(mask: Any, role: str) -> Optional[sitk.Image]:
    """A user mask (path or image; non-zero = inside) as a uint8 image on its own grid, or None."""
    if mask is None:
        return None
    image = mask if isinstance(mask, sitk.Image) else read_image(mask)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"the {role} mask must be a 3D single-component label volume (non-zero = inside)")
    out = sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(out).any():
        raise InputImageError(f"the {role} mask is empty (no non-zero voxel); pass a mask that covers the anatomy")
    return out


def normalization(image: sitk.Image, role: str, modality: str = "auto") -> Tuple[IntensityNormalization, int]:
    """The intensity normalisation of ``image`` (``modality`` as in :func:`unifuse.intensity.normalize_image`)
    and the sub-sampling step used to compute it (1 = all voxels).

    Raises:
        InputImageError: the volume has no contrast to normalise (message names ``role``).
    """
    step = max(1, math.ceil((image.GetNumberOfPixels() / NORMALIZATION_MAX_VOXELS) ** (1.0 / 3.0)))
    sample = image if step == 1 else image[::step, ::step, ::step]
    try:
        return normalize_image(sample, modality)[1], step
    except InputImageError as exc:
        raise InputImageError(f"the {role} image cannot be normalised: {exc}") from exc


def header_transform(reference: sitk.Image, moving: sitk.Image, init: str) -> Tuple[sitk.Transform, float]:
    """Header pre-alignment (``geometry`` or ``moments``) and the overlap fraction it gives (raises if none)."""
    t_init = geometry.initial_transform(reference, moving, mode=init)
    return t_init, geometry.check_overlap(reference, moving, t_init)


@dataclass
class GlobalStage:
    """A global transform (reference LPS -> moving LPS points) proposed by the header or affine stage.

    ``fallback``: a simpler transform of the same stage (the affine stage's rigid step, same direction) that
    the guard tries when it rejects ``transform``, before giving the stage up; ``step``: which of the two
    this is (``"affine"``, ``"rigid"``; empty for the header).
    """

    name: str
    transform: sitk.Transform
    details: Dict[str, Any] = field(default_factory=dict)
    fallback: Optional[sitk.Transform] = None
    step: str = ""


@dataclass
class WorkingVolumes:
    """The reference side of the working grid.

    Attributes:
        choice: the grid and how it was chosen.
        fixed: (1, 1, D, H, W) reference resampled onto the grid, normalised to [0, 1].
        region: (1, 1, D, H, W) 1 inside the reference's foreground (∩ its user mask) and field of view.
        ref_norm, mov_norm: the intensity normalisations (computed on the full inputs).
        device: where the tensors live.
    """

    choice: GridChoice
    fixed: torch.Tensor
    region: torch.Tensor
    ref_norm: IntensityNormalization
    mov_norm: IntensityNormalization
    device: torch.device

    @property
    def grid(self) -> sitk.Image:
        return self.choice.grid


def _tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(sitk.GetArrayFromImage(image), dtype=np.float32))[None, None].to(device)


def _inside(image: sitk.Image, grid: sitk.Image, transform: Optional[sitk.Transform] = None) -> sitk.Image:
    """1 on the voxels of ``grid`` whose point (through ``transform``) falls inside ``image``'s voxel cells."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    t = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(ones, grid, t, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)


def plan_working_grid(
    reference: sitk.Image,
    moving: sitk.Image,
    transforms: Sequence[sitk.Transform],
    spacing_mm: float,
    multiple: int,
    bytes_for_voxels: Callable[[int], int],
    budget_bytes: int,
) -> GridChoice:
    """The working grid over the overlap of both fields of view under any of ``transforms`` (reference ->
    moving points), at ``spacing_mm`` bounded by the data and the memory budget
    (:func:`unifuse.working_grid.choose_working_grid`)."""
    box = overlap_index_box(reference, moving, transforms)
    return choose_working_grid(reference, box, float(spacing_mm), multiple, bytes_for_voxels, budget_bytes)


def prepare_working_volumes(
    reference: sitk.Image,
    choice: GridChoice,
    ref_norm: IntensityNormalization,
    mov_norm: IntensityNormalization,
    device: torch.device,
    reference_mask: Optional[sitk.Image] = None,
) -> WorkingVolumes:
    """Resample the reference onto the chosen working grid (normalised) and build the guard's region: the
    reference's foreground (dilated by two grid voxels) inside its field of view, ∩ its user mask."""
    grid = choice.grid
    ref_w = geometry.resample(reference, grid, default=ref_norm.low)
    fixed = torch.from_numpy(ref_norm.apply(sitk.GetArrayFromImage(ref_w)).astype(np.float32))[None, None].to(device)
    region = sitk.And(foreground_mask(ref_w, dilate_mm=2.0 * choice.spacing_mm), _inside(reference, grid))
    if reference_mask is not None:
        region = sitk.And(region, sitk.Resample(reference_mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return WorkingVolumes(choice, fixed, _tensor(region, device), ref_norm, mov_norm, device)


def global_candidate(
    name: str, moving: sitk.Image, transform: sitk.Transform, work: WorkingVolumes,
    moving_mask: Optional[sitk.Image] = None,
) -> Candidate:
    """The moving volume on the working grid through a global transform (normalised), and where it has data
    (∩ the moving's user mask)."""
    grid = work.grid
    mov_w = geometry.resample(moving, grid, transform=transform, default=work.mov_norm.low)
    moving_t = torch.from_numpy(work.mov_norm.apply(sitk.GetArrayFromImage(mov_w)).astype(np.float32))[None, None]
    valid = _inside(moving, grid, transform)
    if moving_mask is not None:
        valid = sitk.And(valid, sitk.Resample(moving_mask, grid, transform, sitk.sitkNearestNeighbor, 0))
    return Candidate(name, moving_t.to(work.device), _tensor(valid, work.device))


def deformable_candidate(name: str, base: Candidate, u: torch.Tensor) -> Candidate:
    """``base`` (a global candidate) warped by the working-grid field ``u`` (1, 3, D, H, W), voxels."""
    moving = warp(base.moving, u)
    valid = (warp(base.valid, u, mode="nearest", padding_mode="zeros") > 0.5).float()
    return Candidate(name, moving, valid)


def field_to_transform(global_transform: sitk.Transform, u: Optional[torch.Tensor], grid: sitk.Image) -> sitk.Transform:
    """The composed reference -> moving point map ``x -> T_global(x + u(x))`` (``u`` = 0 outside the grid)."""
    if u is None:
        return global_transform
    u_vox = u[0].detach().float().cpu().numpy()
    return geometry.compose_transform(global_transform, geometry.field_voxels_to_image(u_vox, grid))

