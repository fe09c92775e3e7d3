"""Dense displacement fields on a voxel grid, in PyTorch.

Conventions (the whole package follows them):

* Volumes are tensors of shape (B, C, D, H, W) = (batch, channel, z, y, x), i.e. array axes (K, J, I).
* A displacement field ``u`` has shape (B, 3, D, H, W); its channels are ordered (x, y, z) = (I, J, K)
  (the order of ITK vectors and of the last axis of :func:`torch.nn.functional.grid_sample`'s grid) and its
  unit is **voxels of the grid it lives on**.
* ``u`` is a pull-back field: ``warp(moving, u)(p) = moving(p + u(p))`` for every voxel index p.
* Sampling uses ``align_corners=True``: voxel index 0 and size-1 sit exactly on the normalised coordinates
  -1 and +1, so voxel centres are the sample points (as in ITK / SimpleITK resampling).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "voxel_to_normalized",
    "warp",
    "compose",
    "resize_field",
    "jacobian_determinant",
]


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a (D, H, W) grid as a (1, 3, D, H, W) tensor with channels (x, y, z)."""
    d, h, w = (int(s) for s in shape)
    zz, yy, xx = torch.meshgrid(
        torch.arange(d, device=device, dtype=dtype),
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((xx, yy, zz), dim=0).unsqueeze(0)


def _scale_xyz(shape: Sequence[int], device, dtype) -> torch.Tensor:
    """Per-channel factor (x, y, z) turning voxel offsets into align_corners=True normalised offsets."""
    d, h, w = (int(s) for s in shape)
    sizes = torch.tensor([w, h, d], device=device, dtype=dtype)
    return (2.0 / (sizes - 1).clamp(min=1)).view(1, 3, 1, 1, 1)


def voxel_to_normalized(u: torch.Tensor) -> torch.Tensor:
    """Convert a voxel displacement field (B, 3, D, H, W) to grid_sample's normalised units."""
    return u * _scale_xyz(u.shape[2:], u.device, u.dtype)


def warp(
    image: torch.Tensor,
    u: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Pull ``image`` back through ``u``: ``out(p) = image(p + u(p))``.

    Args:
        image: (B, C, D, H, W) volume or feature map.
        u: (B, 3, D, H, W) displacement in voxels of this grid, channels (x, y, z). B may be 1 to broadcast.
        mode: ``"bilinear"`` (trilinear for 5-D input) or ``"nearest"``.
        padding_mode: value outside the volume, ``"zeros"`` or ``"border"``.

    Returns:
        (B, C, D, H, W) warped volume, same dtype as ``image``.

    Equals ``monai.networks.blocks.Warp`` given ``u`` with its channels reversed (MONAI orders them (z, y, x));
    kept so the extension needs no MONAI at run time (a test extra only; the test compares the two).
    """
    if image.dim() != 5 or u.dim() != 5 or u.shape[1] != 3:
        raise ValueError(f"warp expects image (B,C,D,H,W) and u (B,3,D,H,W); got {tuple(image.shape)}, {tuple(u.shape)}")
    if image.shape[2:] != u.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} and field grid {tuple(u.shape[2:])} differ")
    base = identity_grid(u.shape[2:], device=u.device, dtype=u.dtype)
    coords = voxel_to_normalized(base + u) - 1.0  # (B, 3, D, H, W) in [-1, 1] (x, y, z)
    grid = coords.permute(0, 2, 3, 4, 1)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(u_first: torch.Tensor, u_second: torch.Tensor) -> torch.Tensor:
    """Compose two pull-back fields on the same grid.

    Returns ``c`` with ``warp(warp(img, u_first), u_second) == warp(img, c)`` (up to interpolation):
    ``c(p) = u_second(p) + u_first(p + u_second(p))``.
    """
    return u_second + warp(u_first, u_second, mode="bilinear", padding_mode="border")


def resize_field(u: torch.Tensor, shape: Sequence[int], cell_centred: bool = False) -> torch.Tensor:
    """Resample a voxel displacement field to another grid covering the same extent.

    Both the sampling positions and the vector magnitudes are rescaled, so the physical displacement is
    unchanged: a field in voxels of a 32-grid becomes a field in voxels of a 64-grid. ``cell_centred=False``
    treats the grids as sharing their corner voxels' centres (align_corners=True, scale (S1 - 1) / (S0 - 1));
    ``True`` as sharing their outer cell boundaries, each coarse voxel covering a block of fine voxels
    (align_corners=False, scale S1 / S0) — the right model for a grid made by strided pooling.
    """
    d0, h0, w0 = u.shape[2:]
    d1, h1, w1 = (int(s) for s in shape)
    out = F.interpolate(u, size=(d1, h1, w1), mode="trilinear", align_corners=not cell_centred)
    if cell_centred:
        scale = [w1 / w0, h1 / h0, d1 / d0]
    else:
        scale = [(w1 - 1) / max(w0 - 1, 1), (h1 - 1) / max(h0 - 1, 1), (d1 - 1) / max(d0 - 1, 1)]
    return out * torch.tensor(scale, device=u.device, dtype=u.dtype).view(1, 3, 1, 1, 1)


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the map p -> p + u(p), (B, 1, D, H, W).

    Central differences inside, one-sided at the border (``torch.gradient``). Values <= 0 mark folding.
    Unitless (voxel field over voxel spacing), so it equals the physical Jacobian for isotropic grids.
    """
    # grads[c][a] = d u_c / d axis_a with axes ordered (z, y, x)
    grads = [torch.gradient(u[:, c], dim=(1, 2, 3)) for c in range(3)]
    # J[i][k] = delta_ik + d u_i / d x_k with i, k in (x, y, z); x is array axis 2 (last), z is axis 0
    def d(i: int, k: int) -> torch.Tensor:
        return grads[i][2 - k]

    j00, j01, j02 = 1 + d(0, 0), d(0, 1), d(0, 2)
    j10, j11, j12 = d(1, 0), 1 + d(1, 1), d(1, 2)
    j20, j21, j22 = d(2, 0), d(2, 1), 1 + d(2, 2)
    det = j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20)
    return det.unsqueeze(1)
