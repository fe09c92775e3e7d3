"""Feature Alignment (FA): RegBLKs and the displacement head, paper §3.4 and Fig. 3.

The unified tokens F̄'_D, F̄_R (B, N, M) are put back on their token grid as M × (S/Q)³ maps and pass J
RegBLKs. RegBLK i takes (F_D^i, F_R^i, prompt guidance) and returns (F_D^{i+1}, F_R^{i+1}):

1. a 3×3×3 conv + GELU ("Conv"), shared by both streams (Siamese: D and R features stay comparable);
2. the cross-feature interaction "⊗": a reference-centred local correlation (cost volume). For every
   reference position p and offset o in a (2r+1)³ window it is the matrix product of the normalised
   feature vectors ``<f_R(p), f_D(p + o)>`` (on a shared 1×1×1 projection to ≤ 16 channels); a 1×1×1 conv
   mixes it back into the R stream (residual);
3. the prompt guidance g = MLP(P̂ ⊙ p) (FA's own MLP) modulates both maps channel-wise (FiLM:
   ``f <- f ⊙ (1 + γ(g)) + β(g)``, γ and β zero at initialisation);
4. the last min(J, U) blocks end with a 2× trilinear upsampling ("↑"), U = ⌈log2(Q / fa_stride)⌉, halving
   the width each time (never below 8 channels): coarse-to-fine from S/Q to S/fa_stride.

Encoder skips (``skip_channels`` > 0, ``ModelConfig.fa_skips``): tokens are Q³ patches, so the token maps
alone cannot place an edge more finely than one patch (8 voxels), while the misalignments we train on are
a few voxels. After each upsampling, the shared encoder's full-resolution features F'_D, F_R (C channels),
average-pooled to that level, enter both streams through one shared 3×3×3 conv + GELU ("lateral", added
to the upsampled maps, as in a feature pyramid); and the head then also reads a radius-1 local correlation
of the two streams at the field grid. This is our departure from Fig. 3 (``docs/architecture.md``).

Only the first block correlates with radius ``corr_radius`` (capture range ±r·Q voxels of the working grid);
the following blocks refine with radius 1. Schedules (:func:`regblk_schedule` is the source of truth), with
the default fa_stride = 2 and J = 4:

* Q = 4: blocks 1–3 at S/4 (width M), block 4 at S/4 then ↑ S/2 (width M/2); the head works at S/2.
* Q = 8: blocks 1–3 at S/8 (widths M, M, M/2; block 3 ends ↑ S/4), block 4 at S/4 then ↑ S/2 (width M/4);
  the head works at S/2.

Head: concat(F_D^{J+1}, F_R^{J+1}[, corr_1(F_R^{J+1}, F_D^{J+1}) with skips]) -> 3×3×3 conv (GELU)
-> 1×1×1 conv (zero-initialised) -> v. The paper ends the head in a ReLU; a ReLU cannot produce negative displacements, so there is none here: the raw
output is bounded instead, ``v = tanh(v_raw) · b`` with b = ``max_displacement`` × grid edge (per axis).
With ``integration_steps`` > 0, v is read as a stationary velocity and integrated by scaling and squaring,
so the map is (close to) diffeomorphic and does not fold; the integrated field keeps the per-component
bound. The field is finally resampled to the working grid with :func:`unifuse.spatial.resize_field`, as the
cell-centred grid it is (each head voxel covers fa_stride³ working voxels; ``ModelConfig.fa_cell_centred``;
networks made before that option used the corner-aligned convention, a ~3 % scale error at 32³):
u (B, 3, D, H, W), voxels of the working grid, channels (x, y, z), pull-back
``aligned(p) = moving(p + u(p))``. An untrained model predicts exactly u = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spatial import compose, resize_field
from .layers import Grid, PromptGuidance, conv3d_gelu, tokens_to_volume

__all__ = [
    "local_correlation",
    "BlockSpec",
    "regblk_schedule",
    "num_upsamplings",
    "RegBLK",
    "integrate_velocity",
    "FeatureAlignment",
]

MIN_CHANNELS = 8
#: width of the (shared) projection the local correlation is computed on
CORR_CHANNELS = 16


def local_correlation(f_ref: torch.Tensor, f_mov: torch.Tensor, radius: int) -> torch.Tensor:
    """Reference-centred local correlation (cost volume) of two feature maps.

    Args:
        f_ref, f_mov: (B, C, D, H, W) feature maps on the same grid.
        radius: r; offsets o = (oz, oy, ox) ∈ [-r, r]³.

    Returns:
        (B, (2r+1)³, D, H, W): channel k = (oz + r)(2r+1)² + (oy + r)(2r+1) + (ox + r) holds the cosine
        similarity ``<f_ref(p), f_mov(p + o)>`` of the channel-normalised features (0 outside the volume).
    """
    d, h, w = f_ref.shape[2:]
    ref = F.normalize(f_ref, dim=1)
    mov = F.pad(F.normalize(f_mov, dim=1), (radius,) * 6)
    k = 2 * radius + 1
    maps = [
        (ref * mov[:, :, oz : oz + d, oy : oy + h, ox : ox + w]).sum(dim=1)
        for oz in range(k)
        for oy in range(k)
        for ox in range(k)
    ]
    return torch.stack(maps, dim=1)


@dataclass(frozen=True)
class BlockSpec:
    """One RegBLK of the FA schedule: widths, correlation radius and whether it ends with a 2× upsampling."""

    in_channels: int
    out_channels: int
    radius: int
    upsample: bool
    level: int  # upsamplings done before this block (0 = token grid S/Q)


def _width(embed_dim: int, level: int) -> int:
    return max(embed_dim >> level, MIN_CHANNELS)


def num_upsamplings(patch_size: int, fa_stride: int) -> int:
    """U = ⌈log2(Q / fa_stride)⌉ doublings from the token grid S/Q to the field grid S/fa_stride."""
    ratio = patch_size / fa_stride
    return max(math.ceil(math.log2(ratio) - 1e-9), 0) if ratio > 1 else 0


def regblk_schedule(
    num_blocks: int, patch_size: int, fa_stride: int, embed_dim: int, corr_radius: int
) -> List[BlockSpec]:
    """The RegBLK schedule: the last min(J, U) blocks upsample 2×; widths halve per upsampling (≥ 8).

    The first block correlates with radius ``corr_radius`` (the capture range on the token grid: ±r·Q
    voxels of the working grid); the following blocks refine with radius 1.
    """
    ups = min(num_upsamplings(patch_size, fa_stride), num_blocks)
    specs: List[BlockSpec] = []
    level = 0
    in_ch = embed_dim
    for i in range(num_blocks):
        upsample = i >= num_blocks - ups
        out_ch = _width(embed_dim, level + 1 if upsample else level)
        specs.append(BlockSpec(in_ch, out_ch, corr_radius if i == 0 else 1, upsample, level))
        in_ch = out_ch
        level += int(upsample)
    return specs


class RegBLK(nn.Module):
    """One registration block (see the module docstring).

    Args:
        spec: widths, correlation radius and upsampling of this block.
        guidance_dim: size of the FA prompt-guidance vector.
    """

    def __init__(self, spec: BlockSpec, guidance_dim: int) -> None:
        super().__init__()
        self.spec = spec
        c = spec.out_channels
        k = (2 * spec.radius + 1) ** 3
        self.feat = conv3d_gelu(spec.in_channels, c)
        self.corr_proj = nn.Conv3d(c, min(c, CORR_CHANNELS), 1)
        self.corr_mix = conv3d_gelu(c + k, c, kernel_size=1)
        self.modulation = nn.Linear(guidance_dim, 2 * c)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(
        self,
        f_d: torch.Tensor,
        f_r: torch.Tensor,
        guidance: torch.Tensor,
        out_size: Optional[Sequence[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(F_D^i, F_R^i) (B, in, g) + guidance (B, G) -> (F_D^{i+1}, F_R^{i+1}) (B, out, g or out_size)."""
        d = self.feat(f_d)
        r = self.feat(f_r)
        corr = local_correlation(self.corr_proj(r), self.corr_proj(d), self.spec.radius)
        r = r + self.corr_mix(torch.cat([r, corr], dim=1))
        gamma, beta = self.modulation(guidance).unsqueeze(-1).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        d = d * (1 + gamma) + beta
        r = r * (1 + gamma) + beta
        if self.spec.upsample:
            if out_size is None:
                raise ValueError("an upsampling RegBLK needs out_size")
            size = tuple(int(s) for s in out_size)
            # feature grids are cell-centred (each coarse voxel covers a block of fine voxels): align_corners=False
            d = F.interpolate(d, size=size, mode="trilinear", align_corners=False)
            r = F.interpolate(r, size=size, mode="trilinear", align_corners=False)
        return d, r


def integrate_velocity(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: displacement of the time-1 flow of a stationary velocity (B, 3, D, H, W), voxels.

    ``u = v / 2^steps`` then ``steps`` times ``u <- u ∘ u`` (:func:`unifuse.spatial.compose`). Each
    component stays bounded by max|v| of that component (|a + b∘(p + a)| ≤ |a| + |b|). Equals
    ``monai.networks.blocks.DVF2DDF(steps, padding_mode="border")`` on channel-reversed fields; kept so inference
    needs no MONAI (a test extra only; the test compares the two).
    """
    u = velocity / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


class FeatureAlignment(nn.Module):
    """FA: J RegBLKs on the unified token maps and the displacement head.

    Args:
        embed_dim: M.
        patch_size: Q.
        num_blocks: J.
        fa_stride: the head predicts the field at S / fa_stride (1 = full resolution).
        corr_radius: local-correlation radius on the token grid.
        num_classes, prompt_len: Ñ and L of the prompt P̂.
        max_displacement: bound of each field component as a fraction of the working-grid edge.
        integration_steps: scaling-and-squaring steps (0: the head output is the displacement).
        skip_channels: C of the encoder features fed in after each upsampling (0 = no encoder skips: the
            field is read from the token maps alone, the paper's Fig. 3).
        cell_centred: upsample the head's field as a cell-centred grid (False: the corner-aligned
            convention of networks trained before the fix).
    """

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        num_blocks: int,
        fa_stride: int,
        corr_radius: int,
        num_classes: int,
        prompt_len: int,
        max_displacement: float,
        integration_steps: int,
        skip_channels: int = 0,
        cell_centred: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.cell_centred = cell_centred
        self.skip_channels = skip_channels
        self.fa_stride = fa_stride
        self.max_displacement = max_displacement
        self.integration_steps = integration_steps
        self.guidance = PromptGuidance(num_classes, prompt_len, embed_dim, embed_dim)
        self.schedule = regblk_schedule(num_blocks, patch_size, fa_stride, embed_dim, corr_radius)
        self.blocks = nn.ModuleList(RegBLK(spec, embed_dim) for spec in self.schedule)
        width = self.schedule[-1].out_channels if self.schedule else embed_dim
        # one lateral per upsampling (shared by the D and R streams), mapping the pooled encoder features
        self.laterals = nn.ModuleList(
            conv3d_gelu(skip_channels, spec.out_channels) for spec in self.schedule if spec.upsample and skip_channels
        )
        head_in = 2 * width
        if skip_channels:
            self.head_corr_proj: Optional[nn.Conv3d] = nn.Conv3d(width, min(width, CORR_CHANNELS), 1)
            head_in += 27  # radius-1 correlation
        else:
            self.head_corr_proj = None
        self.head = nn.Sequential(nn.Conv3d(head_in, width, 3, padding=1), nn.GELU())
        self.head_out = nn.Conv3d(width, 3, 1)
        nn.init.zeros_(self.head_out.weight)
        nn.init.zeros_(self.head_out.bias)

    def _sizes(self, token_grid: Grid, volume_grid: Grid) -> List[Grid]:
        """Grid after each upsampling: doubling from the token grid, the last one exactly S / fa_stride."""
        ups = num_upsamplings(self.patch_size, self.fa_stride)
        final = tuple(s // self.fa_stride for s in volume_grid)
        return [
            final if k == ups else tuple(g * 2**k for g in token_grid)  # type: ignore[misc]
            for k in range(1, ups + 1)
        ]

    def forward(
        self,
        tokens_d: torch.Tensor,
        tokens_r: torch.Tensor,
        token_grid: Grid,
        volume_grid: Grid,
        prompt: torch.Tensor,
        p: torch.Tensor,
        skip_mov: Optional[torch.Tensor] = None,
        skip_ref: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict the pull-back field.

        Args:
            tokens_d, tokens_r: (B, N, M) unified tokens F̄'_D, F̄_R.
            token_grid: (S_z/Q, S_y/Q, S_x/Q).
            volume_grid: working grid (S_z, S_y, S_x).
            prompt: (B, Ñ, L, M) P̂.
            p: (B, Ñ) degradation weights.
            skip_mov, skip_ref: (B, C, S_z, S_y, S_x) shared-encoder features F'_D, F_R on the working grid;
                required when the module was built with ``skip_channels`` > 0, ignored otherwise.

        Returns:
            u (B, 3, S_z, S_y, S_x): voxels of the working grid, channels (x, y, z), each component bounded
            by ``max_displacement`` × grid edge of that axis.
        """
        if self.skip_channels and (skip_mov is None or skip_ref is None):
            raise ValueError("this FeatureAlignment was built with encoder skips: pass skip_mov and skip_ref")
        guidance = self.guidance(prompt, p)
        d = tokens_to_volume(tokens_d, token_grid)
        r = tokens_to_volume(tokens_r, token_grid)
        sizes = self._sizes(token_grid, volume_grid)
        level = 0
        for block in self.blocks:
            out_size = sizes[level] if block.spec.upsample else None
            d, r = block(d, r, guidance, out_size)
            if block.spec.upsample and self.skip_channels:
                lateral = self.laterals[level]
                # mean of the encoder features over each cell of the coarser grid (cell-centred, like d and r)
                d = d + lateral(F.adaptive_avg_pool3d(skip_mov, d.shape[2:]))
                r = r + lateral(F.adaptive_avg_pool3d(skip_ref, r.shape[2:]))
            level += int(block.spec.upsample)
        head_in = [d, r]
        if self.head_corr_proj is not None:
            head_in.append(local_correlation(self.head_corr_proj(r), self.head_corr_proj(d), 1))
        raw = self.head_out(self.head(torch.cat(head_in, dim=1)))
        field_grid = raw.shape[2:]
        # per-component bound in voxels of the head grid, chosen so that after resize_field (which scales
        # by S / g cell-centred, (S - 1) / (g - 1) otherwise) it is exactly max_displacement * S working voxels
        c = 0 if self.cell_centred else 1
        bound = [
            self.max_displacement * s * (g - c) / max(s - c, 1)
            for s, g in zip(reversed(volume_grid), reversed(field_grid))  # (x, y, z)
        ]
        bound_t = torch.tensor(bound, device=raw.device, dtype=raw.dtype).view(1, 3, 1, 1, 1)
        velocity = torch.tanh(raw) * bound_t
        u = integrate_velocity(velocity, self.integration_steps) if self.integration_steps > 0 else velocity
        if tuple(field_grid) != tuple(volume_grid):
            u = resize_field(u, volume_grid, cell_centred=self.cell_centred)
        return u
