"""Omni Unified Feature Representation (OUFR): three Spatial Mamba blocks fed with the DAPL states, paper §3.3.

Both feature volumes F'_D and F_R (B, C, D, H, W) are cut into patches by one shared patch embedding
(Q³ patches -> M-vectors) and concatenated into one sequence ``[f_D^1..f_D^N, f_R^1..f_R^N]`` (B, 2N, M).
Spatial Mamba block j (j = 1, 2, 3) runs a selective scan over this sequence whose state receives the DAPL
state h_j at every token (paper eq. 3)::

    s_t   = (W_u h_j[i(t)]) ⊗ (W_v h_j[i(t)])            (Di, N) injected state, rank 1
    x_t   = Ā_t (x_{t-1} + s_t) + B̄_t f_t                SSM state
    y_t   = C_t x_t + D f_t

with i(t) = t mod N, the patch (raster index) of token t: the D and the R token of the same patch receive the
same h_j[i]. Dropping the carried state x_{t-1} leaves ``y_t = C_t (Ā_t s_t + B̄_t f_t)``, the paper's
``C(Ā h_j + B̄ f)``; keeping it keeps the block a Mamba (long-range memory), while the injection re-supplies
DAPL's bidirectional context at every position ("mitigates information loss caused by forgetting").
The output sequence is split back into F̄'_D (first N tokens) and F̄_R (last N tokens), each (B, N, M).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

from .layers import Grid, PatchEmbed3d
from .mamba import MambaBlock

__all__ = ["SpatialMambaBlock", "OUFR"]


class SpatialMambaBlock(nn.Module):
    """A :class:`MambaBlock` whose SSM state receives a per-token context vector (paper eq. 3).

    Args:
        dim: token width M.
        d_state, expand, d_conv: Mamba sizes (Di = expand · M, N = d_state).
        context_dim: width of the context vectors (the DAPL states, M).
    """

    def __init__(self, dim: int, d_state: int, expand: int, d_conv: int, context_dim: int) -> None:
        super().__init__()
        self.mamba = MambaBlock(dim, d_state, expand, d_conv)
        self.inject_channels = nn.Linear(context_dim, self.mamba.d_inner)
        self.inject_states = nn.Linear(context_dim, d_state)

    def injected_state(self, context: torch.Tensor) -> torch.Tensor:
        """(B, L, context_dim) -> (B, L, Di, N) rank-1 state ``(W_u c) ⊗ (W_v c)`` per token."""
        return self.inject_channels(context).unsqueeze(-1) * self.inject_states(context).unsqueeze(-2)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, M) and per-token context (B, L, context_dim) -> (B, L, M)."""
        return self.mamba(tokens, state_inject=self.injected_state(context))


class OUFR(nn.Module):
    """Patchify F'_D and F_R, run three Spatial Mamba blocks on their concatenation, split the result.

    Args:
        enc_channels: C of the encoder features.
        patch_size: Q.
        embed_dim: M.
        d_state, expand, d_conv: Mamba sizes.
    """

    num_blocks = 3  # one per DAPL state h1, h2, h3

    def __init__(self, enc_channels: int, patch_size: int, embed_dim: int, d_state: int, expand: int, d_conv: int):
        super().__init__()
        self.patch = PatchEmbed3d(enc_channels, embed_dim, patch_size)
        self.blocks = nn.ModuleList(
            SpatialMambaBlock(embed_dim, d_state, expand, d_conv, embed_dim) for _ in range(self.num_blocks)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(
        self, feat_d: torch.Tensor, feat_r: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Grid]:
        """Unify the features of a pair.

        Args:
            feat_d: (B, C, D, H, W) encoder features of the "D" image (F'_D: the moving volume).
            feat_r: (B, C, D, H, W) encoder features of the "R" image (F_R: the reference volume).
            states: (h1, h2, h3), each (B, N, M) in raster token order, N = (D/Q)(H/Q)(W/Q).

        Returns:
            (F̄_D (B, N, M), F̄_R (B, N, M), token grid (D/Q, H/Q, W/Q)).
        """
        if len(states) != self.num_blocks:
            raise ValueError(f"OUFR needs {self.num_blocks} DAPL states (h1, h2, h3), got {len(states)}")
        tok_d, grid = self.patch(feat_d)
        tok_r, _ = self.patch(feat_r)
        n = tok_d.shape[1]
        for j, h in enumerate(states):
            if h.shape[0] != tok_d.shape[0] or h.shape[1] != n:
                raise ValueError(
                    f"DAPL state h{j + 1} has shape {tuple(h.shape)} but the pair has {tok_d.shape[0]} volume(s) of "
                    f"{n} tokens; compute the states on volumes of the same size and batch"
                )
        seq = torch.cat([tok_d, tok_r], dim=1)  # (B, 2N, M)
        for block, h in zip(self.blocks, states):
            seq = block(seq, torch.cat([h, h], dim=1).to(seq.dtype))
        seq = self.norm(seq)
        return seq[:, :n], seq[:, n:], grid
