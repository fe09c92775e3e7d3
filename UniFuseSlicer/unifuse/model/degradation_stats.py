"""Second-order image statistics for the DAPL degradation classifier (``ModelConfig.degradation_stats``).

Why: the DAPL classifier of the paper reads token states built from *linear* patch embeddings of encoder
features, averaged over all tokens. Noise, k-space ghosting and metal streaks change the *energy* of the
high frequencies, a second-order statistic that such averages barely carry: the first shipped weights
called every undegraded case degraded (held-out accuracy 0.875). A linear classifier on the 21 numbers
below, computed on the moving volume alone, separates the four classes of the synthetic data with 0.963
accuracy on 600 held-out cases at 32³ (``docs/network.md``), so the network gets them as an extra input.

:func:`volume_statistics` maps a (B, 1, D, H, W) volume with intensities in [0, 1] (working grid, voxel
units; the statistics are per voxel and per cycle/voxel, so they do not depend on the physical spacing) to
(B, 21) natural logarithms ``log(max(mean, 0) + 1e-8)`` of:

* with ``μ`` the 3×3×3 local mean (edge-replicated) and ``r = x − μ`` the high-pass residual, and the
  regions *foreground* ``μ > 0.05``, *background* (the rest) and *all* voxels: the region means of r², x
  and x² (9 numbers; an empty region gives log(1e-8));
* the mean squared finite difference along z, y and x (3);
* the mean power ``|FFT(x)|² / n_voxels`` in the radial frequency bands [0, 0.1), [0.1, 0.2), [0.2, 0.3),
  [0.3, 0.4) and [0.4, ∞) cycles/voxel (5);
* the same power in the bands 0.15 ≤ |f| < 0.3 and 0.3 ≤ |f| along y and along x, restricted to
  |f_z| < 0.1: the in-plane phase-encode directions along which MR motion ghosts (4).

:class:`DegradationStatistics` standardises them with a per-statistic mean and standard deviation (buffers,
set once from training volumes by :meth:`DegradationStatistics.calibrate`) and maps them to class logits
with a two-layer MLP whose last layer starts at zero, so adding the branch to a trained network leaves its
predictions unchanged until the branch is trained. The statistics are computed in float32 outside autocast
(FFT has no bf16 kernels) and carry no gradient to the volume.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NUM_STATISTICS", "FOREGROUND_THRESHOLD", "volume_statistics", "DegradationStatistics"]

#: Number of statistics returned by :func:`volume_statistics`.
NUM_STATISTICS: int = 21
#: Local-mean intensity above which a voxel counts as foreground (intensities normalised to [0, 1]).
FOREGROUND_THRESHOLD: float = 0.05
_EPS: float = 1e-8
_RADIAL_BANDS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, float("inf")))
_PHASE_ENCODE_BANDS = ((0.15, 0.3), (0.3, float("inf")))
_SLICE_FREQUENCY_LIMIT: float = 0.1


def _region_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of (B, 1, D, H, W) ``values`` over the voxels where ``weight`` is 1 -> (B,); 0 for an empty region."""
    count = weight.sum(dim=(1, 2, 3, 4)).clamp(min=1.0)
    return (values * weight).sum(dim=(1, 2, 3, 4)) / count


def _band_power(power: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, D, H, W) ``power`` over the frequencies in the (D, H, W) boolean ``mask`` -> (B,); 0 if empty."""
    weight = mask.to(power.dtype)
    return (power * weight).sum(dim=(1, 2, 3)) / weight.sum().clamp(min=1.0)


@torch.no_grad()
def volume_statistics(volume: torch.Tensor) -> torch.Tensor:
    """The 21 log-statistics of the module docstring for a (B, 1, D, H, W) volume in [0, 1] -> (B, 21) float32."""
    if volume.dim() != 5 or volume.shape[1] != 1:
        raise ValueError(f"volume_statistics expects (B, 1, D, H, W) volumes, got {tuple(volume.shape)}")
    device_type = volume.device.type
    no_autocast = (torch.autocast(device_type=device_type, enabled=False) if device_type in ("cpu", "cuda")
                   else contextlib.nullcontext())  # the meta device (FLOP counting) has no autocast
    with no_autocast:
        x = volume.float()
        local_mean = F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), kernel_size=3, stride=1)
        residual = x - local_mean
        foreground = (local_mean > FOREGROUND_THRESHOLD).float()
        regions = (foreground, 1.0 - foreground, torch.ones_like(x))
        stats = []
        for region in regions:
            stats += [_region_mean(residual**2, region), _region_mean(x, region), _region_mean(x**2, region)]
        for axis in (2, 3, 4):
            stats.append((torch.diff(x, dim=axis) ** 2).mean(dim=(1, 2, 3, 4)))

        d, h, w = x.shape[2:]
        power = torch.fft.fftn(x[:, 0], dim=(1, 2, 3)).abs() ** 2 / float(d * h * w)
        fz, fy, fx = torch.meshgrid(
            *(torch.fft.fftfreq(n, device=x.device) for n in (d, h, w)), indexing="ij"
        )
        radius = torch.sqrt(fz**2 + fy**2 + fx**2)
        for low, high in _RADIAL_BANDS:
            stats.append(_band_power(power, (radius >= low) & (radius < high)))
        in_slice = fz.abs() < _SLICE_FREQUENCY_LIMIT
        for axis_frequency in (fy, fx):
            for low, high in _PHASE_ENCODE_BANDS:
                band = (axis_frequency.abs() >= low) & (axis_frequency.abs() < high) & in_slice
                stats.append(_band_power(power, band))
        # means of x are negative only for inputs outside [0, 1]; clamp so the logarithm stays finite
        return torch.log(torch.stack(stats, dim=1).clamp(min=0.0) + _EPS)


class DegradationStatistics(nn.Module):
    """Class logits from :func:`volume_statistics` of the moving volume: standardise -> Linear -> GELU -> Linear.

    Args:
        num_classes: Ñ.
        hidden: width of the hidden layer.

    Forward: moving (B, 1, D, H, W) in [0, 1] -> (B, Ñ) logits, added to the DAPL classifier's logits.

    Buffers: ``mean`` and ``std`` (21,) standardise the statistics (0 and 1 until :meth:`calibrate`);
    ``calibrated`` records whether :meth:`calibrate` ran (saved in checkpoints).
    """

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(NUM_STATISTICS))
        self.register_buffer("std", torch.ones(NUM_STATISTICS))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.mlp = nn.Sequential(nn.Linear(NUM_STATISTICS, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, moving: torch.Tensor) -> torch.Tensor:
        stats = (volume_statistics(moving) - self.mean) / self.std
        return self.mlp(stats.to(self.mlp[0].weight.dtype))

    @torch.no_grad()
    def calibrate(self, volumes: Iterable[torch.Tensor], min_std: float = 1e-3) -> int:
        """Set ``mean``/``std`` to the statistics' mean and standard deviation over ``volumes``.

        Args:
            volumes: (B, 1, D, H, W) moving volumes in [0, 1] (e.g. the first training batches).
            min_std: floor of the standard deviation (a statistic that never varies is divided by this).

        Returns:
            The number of volumes used (at least 2 are needed).
        """
        rows = [volume_statistics(v.to(self.mean.device)) for v in volumes]
        stats = torch.cat(rows, dim=0) if rows else torch.empty(0, NUM_STATISTICS)
        if stats.shape[0] < 2:
            raise ValueError(f"calibrating the degradation statistics needs at least 2 volumes, got {stats.shape[0]}")
        self.mean.copy_(stats.mean(dim=0))
        self.std.copy_(stats.std(dim=0).clamp(min=min_std))
        self.calibrated.fill_(True)
        return int(stats.shape[0])
