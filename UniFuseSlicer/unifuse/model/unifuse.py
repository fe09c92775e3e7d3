"""The UniFuse 3D network: shared encoder -> DAPL -> OUFR -> FA -> UFR&F (paper §3, ``docs/network.md``).

Contract (``docs/architecture.md``): ``UniFuse(cfg)(reference, moving, degradation=None) -> UniFuseOutput``
with reference/moving (B, 1, S, S, S) float volumes in [0, 1] on the same working grid (array order
(z, y, x)), S a multiple of ``cfg.size_multiple``. The displacement is a pull-back field in voxels of the
working grid with channels (x, y, z): ``aligned(p) = moving(p + u(p))`` (:func:`unifuse.spatial.warp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import InputImageError
from ..spatial import warp
from .alignment import FeatureAlignment
from .dapl import DAPL, DAPLOutput, SharedEncoder
from .fusion import UFRF
from .layers import Grid, tokens_to_volume
from .oufr import OUFR

__all__ = ["UniFuse", "UniFuseOutput", "Analysis", "build_model", "field_to_token_grid", "validate_config"]

States = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class UniFuseOutput:
    """Outputs of :class:`UniFuse` (B batch, S³ working grid, Ñ classes, L prompts, M token width, N tokens).

    Attributes:
        fused: (B, 1, S, S, S) fused volume in [0, 1].
        restored: (B, 1, S, S, S) restored aligned moving volume in [0, 1], or None (no restoration output).
        displacement: (B, 3, S, S, S) u_{D->R}, pull-back, voxels of the working grid, channels (x, y, z).
        aligned: (B, 1, S, S, S) ``spatial.warp(moving, displacement)``.
        logits: (B, Ñ) degradation classifier logits (always the classifier's, even when overridden).
        probs: (B, Ñ) softmax of ``logits``.
        prompt: (B, Ñ, L, M) P̂ = P ⊙ G.
        tokens_ref: (B, N, M) OUFR output F̄_R.
        tokens_mov: (B, N, M) OUFR output F̄'_D.
        dapl_states: (h1, h2, h3), each (B, N, M): DAPL states, for :meth:`UniFuse.encode_unified`.
    """

    fused: torch.Tensor
    restored: Optional[torch.Tensor]
    displacement: torch.Tensor
    aligned: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    prompt: torch.Tensor
    tokens_ref: torch.Tensor
    tokens_mov: torch.Tensor
    dapl_states: States


@dataclass
class Analysis:
    """What :meth:`UniFuse.analyse` computes once per pair (B batch, C encoder channels, N tokens, M width).

    Attributes:
        grid: working grid (S_z, S_y, S_x).
        token_grid: (S_z/Q, S_y/Q, S_x/Q).
        moving: (B, 1, S_z, S_y, S_x) the moving input.
        feat_mov, feat_ref: (B, C, S_z, S_y, S_x) shared-encoder features F'_D, F_R.
        dapl: DAPL output (logits, probs, prompt P̂, states).
        tokens_mov, tokens_ref: (B, N, M) OUFR outputs F̄'_D, F̄_R.
    """

    grid: Grid
    token_grid: Grid
    moving: torch.Tensor
    feat_mov: torch.Tensor
    feat_ref: torch.Tensor
    dapl: DAPLOutput
    tokens_mov: torch.Tensor
    tokens_ref: torch.Tensor


def field_to_token_grid(u: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A working-grid field (B, 3, S_z, S_y, S_x) in voxels -> the same motion on the token grid, in tokens.

    Token t covers voxels ``t Q .. t Q + Q - 1`` and sits at their centre, so the token grid is cell-centred
    on the voxel grid: the field is averaged over each Q³ patch (its value at the token) and divided by Q
    (a shift of Q voxels is exactly one token). (Resampling with the align_corners=True convention, as
    before, turned an 8-voxel shift on a 32³ grid into 0.77 token.)
    """
    return F.avg_pool3d(u, kernel_size=patch_size, stride=patch_size) / float(patch_size)


def validate_config(cfg: ModelConfig) -> None:
    """Raise ValueError if ``cfg`` cannot build a network (names the field and the fix)."""
    positive = ("working_size", "enc_channels", "patch_size", "embed_dim", "d_state", "expand", "d_conv",
                "num_degradations", "prompt_len", "lora_rank", "fa_stride")
    for name in positive:
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_regblks < 0 or cfg.corr_radius < 0 or cfg.integration_steps < 0:
        raise ValueError("ModelConfig.num_regblks, corr_radius and integration_steps must be >= 0")
    if cfg.patch_size % cfg.fa_stride:
        raise ValueError(
            f"ModelConfig.fa_stride ({cfg.fa_stride}) must divide patch_size ({cfg.patch_size}); e.g. use fa_stride=2"
        )
    if not cfg.unet_channels or min(cfg.unet_channels) < 1:
        raise ValueError(f"ModelConfig.unet_channels must be non-empty positive widths, got {cfg.unet_channels}")
    if not 0 < cfg.max_displacement <= 1:
        raise ValueError(f"ModelConfig.max_displacement must be in (0, 1] (fraction of the grid edge), "
                         f"got {cfg.max_displacement}")


class UniFuse(nn.Module):
    """UniFuse 3D. Submodules: ``encoder``, ``dapl``, ``oufr``, ``fa``, ``ufrf`` (see ``docs/network.md``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        c, m = cfg.enc_channels, cfg.embed_dim
        self.encoder = SharedEncoder(c)
        self.dapl = DAPL(c, cfg.patch_size, m, cfg.d_state, cfg.expand, cfg.d_conv, cfg.num_degradations,
                         cfg.prompt_len, degradation_stats=cfg.degradation_stats)
        self.oufr = OUFR(c, cfg.patch_size, m, cfg.d_state, cfg.expand, cfg.d_conv)
        self.fa = FeatureAlignment(m, cfg.patch_size, cfg.num_regblks, cfg.fa_stride, cfg.corr_radius,
                                   cfg.num_degradations, cfg.prompt_len, cfg.max_displacement,
                                   cfg.integration_steps, skip_channels=c if cfg.fa_skips else 0,
                                   cell_centred=cfg.fa_cell_centred)
        self.ufrf = UFRF(2 * c, 2 * m, cfg.unet_channels, cfg.num_degradations, cfg.prompt_len, m, cfg.lora_rank,
                         restoration=cfg.restoration_head)

    # ------------------------------------------------------------------------------------ validation
    def check_volumes(
        self, reference: torch.Tensor, moving: torch.Tensor, names: Tuple[str, str] = ("reference", "moving")
    ) -> Grid:
        """Check a pair of (B, 1, S, S, S) volumes; return the grid (S_z, S_y, S_x) or raise InputImageError."""
        mult = self.cfg.size_multiple
        ref_name, mov_name = names
        for name, vol in ((ref_name, reference), (mov_name, moving)):
            if not isinstance(vol, torch.Tensor):
                raise InputImageError(f"{name} must be a torch.Tensor of shape (B, 1, S, S, S), got {type(vol).__name__}")
            if vol.dim() != 5 or vol.shape[1] != 1:
                raise InputImageError(
                    f"{name} has shape {tuple(vol.shape)}; UniFuse expects (B, 1, S, S, S) single-channel volumes "
                    f"(add batch/channel axes with volume[None, None])"
                )
            if not vol.is_floating_point():
                raise InputImageError(f"{name} has dtype {vol.dtype}; convert it to float32 intensities in [0, 1]")
        if reference.shape != moving.shape:
            raise InputImageError(
                f"{ref_name} {tuple(reference.shape)} and {mov_name} {tuple(moving.shape)} differ; resample both onto "
                f"the same working grid first (unifuse.geometry.working_grid)"
            )
        if reference.device != moving.device:
            raise InputImageError(f"{ref_name} is on {reference.device} but {mov_name} on {moving.device}; move both "
                                  f"to the model's device")
        grid = tuple(int(s) for s in reference.shape[2:])
        bad = [s for s in grid if s % mult or s < mult]
        if bad:
            suggestion = max(mult, -(-max(grid) // mult) * mult)  # the next multiple up
            raise InputImageError(
                f"working grid {grid[0]}×{grid[1]}×{grid[2]} is not usable: every edge must be a positive multiple "
                f"of {mult} (patch size {self.cfg.patch_size} and {len(self.cfg.unet_channels)} U-Net levels); "
                f"resample the volumes to e.g. {suggestion}³"
            )
        return grid  # type: ignore[return-value]

    def resolve_degradation(
        self, degradation: Union[None, int, torch.Tensor], probs: torch.Tensor
    ) -> torch.Tensor:
        """The (B, Ñ) class weights p used by the prompts and ALSN.

        ``None``: the classifier's ``probs``; an int or a (B,) integer tensor of class ids: one-hot; a (B, Ñ)
        float tensor: used as given (must be non-negative rows summing to 1).
        """
        b, n_cls = probs.shape
        if degradation is None:
            return probs
        if isinstance(degradation, int):
            degradation = torch.full((b,), degradation, dtype=torch.long)
        if not isinstance(degradation, torch.Tensor):
            raise InputImageError(f"degradation must be None, a class id or a tensor, got {type(degradation).__name__}")
        degradation = degradation.to(probs.device)
        if not degradation.is_floating_point():
            if degradation.shape != (b,):
                raise InputImageError(f"degradation class ids must have shape ({b},), got {tuple(degradation.shape)}")
            if degradation.device.type != "meta" and (
                bool((degradation < 0).any()) or bool((degradation >= n_cls).any())
            ):
                raise InputImageError(
                    f"degradation class ids must be in 0..{n_cls - 1} (see unifuse.config.DEGRADATION_CLASSES), "
                    f"got {degradation.tolist()}"
                )
            return torch.nn.functional.one_hot(degradation, n_cls).to(probs.dtype)
        if degradation.shape != (b, n_cls):
            raise InputImageError(
                f"degradation probabilities must have shape ({b}, {n_cls}), got {tuple(degradation.shape)}"
            )
        if degradation.device.type != "meta":
            if bool((degradation < 0).any()) or not torch.allclose(
                degradation.sum(dim=1), torch.ones_like(degradation[:, 0]), atol=1e-3
            ):
                raise InputImageError("degradation probabilities must be non-negative and sum to 1 per volume")
        return degradation.to(probs.dtype)

    # ------------------------------------------------------------------------------------ forward
    def encode_unified(
        self, a: torch.Tensor, b: torch.Tensor, hs: Optional[Sequence[torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shared encoder + OUFR on another pair (for L_moda's clean pair {I_D, I'_R}, paper eq. 4).

        Args:
            a: (B, 1, S, S, S) volume taking the moving ("D") slot of OUFR.
            b: (B, 1, S, S, S) volume taking the reference ("R") slot.
            hs: DAPL states (h1, h2, h3), each (B, N, M) (e.g. ``UniFuseOutput.dapl_states`` of the degraded
                pair of the same anatomy). ``None`` computes them with DAPL on (a, b) itself.

        Returns:
            (tokens of a, tokens of b), each (B, N, M).
        """
        self.check_volumes(b, a, names=("b", "a"))
        feat_a = self.encoder(a)
        feat_b = self.encoder(b)
        if hs is None:
            hs = self.dapl(feat_a, feat_b, moving=a).states
        tokens_a, tokens_b, _ = self.oufr(feat_a, feat_b, hs)
        return tokens_a, tokens_b

    def analyse(self, reference: torch.Tensor, moving: torch.Tensor) -> "Analysis":
        """Shared encoder, DAPL and OUFR: everything the field prediction and the fusion share.

        Args:
            reference: (B, 1, S_z, S_y, S_x) good-quality reference volume I_R, intensities in [0, 1].
            moving: (B, 1, S_z, S_y, S_x) degraded, misaligned volume I'_D on the same grid.

        Returns:
            :class:`Analysis` (features on the working grid, DAPL output, OUFR tokens).
        """
        grid = self.check_volumes(reference, moving)
        both = self.encoder(torch.cat([moving, reference], dim=0))
        feat_mov, feat_ref = both.chunk(2, dim=0)
        dapl: DAPLOutput = self.dapl(feat_mov, feat_ref, moving=moving)
        tokens_mov, tokens_ref, token_grid = self.oufr(feat_mov, feat_ref, dapl.states)
        return Analysis(grid, token_grid, moving, feat_mov, feat_ref, dapl, tokens_mov, tokens_ref)

    def predict_field(self, a: "Analysis", p: torch.Tensor) -> torch.Tensor:
        """FA: the pull-back field u_{D->R} (B, 3, S_z, S_y, S_x), working-grid voxels, channels (x, y, z)."""
        return self.fa(a.tokens_mov, a.tokens_ref, a.token_grid, a.grid, a.dapl.prompt, p,
                       skip_mov=a.feat_mov, skip_ref=a.feat_ref)

    def restore_and_fuse(self, a: "Analysis", u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """UFR&F: the fused volume (B, 1, S_z, S_y, S_x) in [0, 1] from the moving features warped by ``u``
        (B, 2, ...) with the restored moving volume as channel 1 when ``cfg.restoration_head``.

        ``u`` is any pull-back field on the working grid (voxels, channels (x, y, z)): the network's own
        (:meth:`predict_field`) or the pipeline's final one after its later alignment stages.
        """
        features = torch.cat([warp(a.feat_mov, u), a.feat_ref], dim=1)
        return self.ufrf(features, self.token_maps(a, u), a.dapl.prompt, p)

    @property
    def fusion_multiple(self) -> int:
        """Edges of a :meth:`fuse_patch` patch must be multiples of this (the U-Net's 2^(K-1))."""
        return 2 ** (len(self.cfg.unet_channels) - 1)

    def fusion_guidance(self, prompt: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """g = MLP(P̂ ⊙ p), (B, M): the restoration guidance of every ALSN, computed once per volume."""
        return self.ufrf.guidance(prompt, p)

    def fuse_patch(self, reference: torch.Tensor, aligned: torch.Tensor, tokens: torch.Tensor,
                   guidance: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """UFR&F on one patch of any grid (:mod:`unifuse.native_fusion`).

        Args:
            reference, aligned: (1, 1, D, H, W) reference and moving volume already aligned onto the same
                patch, [0, 1]; edges multiples of :attr:`fusion_multiple`.
            tokens: (1, 2M, D/f, H/f, W/f) :meth:`token_maps` sampled at the patch's bottleneck voxels.
            guidance: :meth:`fusion_guidance`; p: (1, Ñ) class weights.

        Returns:
            (1, 1, D, H, W) fused patch in [0, 1]; (1, 2, D, H, W) with the restored moving volume.
        """
        feats = self.encoder(torch.cat([aligned, reference], dim=0))
        return self.ufrf.decode(torch.cat([feats[:1], feats[1:]], dim=1), tokens, guidance, p)

    def token_maps(self, a: "Analysis", u: torch.Tensor) -> torch.Tensor:
        """The unified token maps of the aligned pair, (B, 2M, S_z/Q, S_y/Q, S_x/Q): F̄'_D maps warped by
        ``u`` (working-grid voxels; :func:`field_to_token_grid`) next to the F̄_R maps. Token t sits at the
        centre of its Q³ patch of working-grid voxels (working index t·Q + (Q-1)/2)."""
        u_tokens = field_to_token_grid(u, self.cfg.patch_size)
        return torch.cat(
            [warp(tokens_to_volume(a.tokens_mov, a.token_grid), u_tokens), tokens_to_volume(a.tokens_ref, a.token_grid)],
            dim=1,
        )

    def forward(
        self,
        reference: torch.Tensor,
        moving: torch.Tensor,
        degradation: Union[None, int, torch.Tensor] = None,
    ) -> UniFuseOutput:
        """Align, restore and fuse ``moving`` onto ``reference``: :meth:`analyse`, :meth:`predict_field`,
        :meth:`restore_and_fuse`.

        Args:
            reference: (B, 1, S, S, S) good-quality reference volume I_R, intensities in [0, 1].
            moving: (B, 1, S, S, S) degraded, misaligned volume I'_D on the same grid (pre-aligned by header).
            degradation: ``None`` (use the classifier's p), class ids (int or (B,) long) or (B, Ñ)
                probabilities that replace p in the prompt weighting and the ALSN LoRA mixing.

        Returns:
            :class:`UniFuseOutput`.
        """
        a = self.analyse(reference, moving)
        p = self.resolve_degradation(degradation, a.dapl.probs)
        u = self.predict_field(a, p)
        aligned = warp(moving, u)
        out = self.restore_and_fuse(a, u, p)
        return UniFuseOutput(
            fused=out[:, :1],
            restored=out[:, 1:] if out.shape[1] > 1 else None,
            displacement=u,
            aligned=aligned,
            logits=a.dapl.logits,
            probs=a.dapl.probs,
            prompt=a.dapl.prompt,
            tokens_ref=a.tokens_ref,
            tokens_mov=a.tokens_mov,
            dapl_states=a.dapl.states,
        )


def build_model(cfg: ModelConfig) -> UniFuse:
    """Build an (untrained) :class:`UniFuse` for ``cfg``; raises ValueError for an unusable config."""
    return UniFuse(cfg)
