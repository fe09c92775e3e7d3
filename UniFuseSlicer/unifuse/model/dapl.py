"""Shared encoder and Degradation-Aware Prompt Learning (DAPL), paper §3.2.

Data flow (B batch, C encoder channels, Q patch edge, M token width, N = (S/Q)³ tokens, Ñ classes,
L prompts per class)::

    I'_D, I_R (B, 1, S, S, S) --SharedEncoder--> F'_D, F_R (B, C, S, S, S)
    conv1x1x1(concat(F'_D, F_R)) --PatchEmbed(Q, M)--> tokens (B, N, M) --Mamba 1--> F_for
    F_for, F_bac = reversed, F_bid = [f^1..f^{⌊N/2⌋-1}, f^N, ..., f^{⌊N/2⌋}] --Mamba 2 (shared)--> h1, h2, h3
    (each put back into raster token order, so h_j[:, i] belongs to patch i)
    classifier: token-wise MLP on each h_j, mean over tokens, concat -> Linear -> head -> logits, p = softmax
                (with ``degradation_stats``: + DegradationStatistics(I'_D) logits, see degradation_stats.py)
    selection:  G = sigmoid(MLP_2(AttnPool_L(MLP_1(concat(h1, h2, h3)))))  (B, Ñ, L, M)
    prompt:     P̂ = P ⊙ G, learned prompt set P (Ñ, L, M)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .degradation_stats import DegradationStatistics
from .layers import MLP, Grid, PatchEmbed3d
from .mamba import MambaBlock

__all__ = ["SharedEncoder", "DAPL", "DAPLOutput", "bidirectional_order"]


class SharedEncoder(nn.Module):
    """Two 3×3×3 conv layers (1 -> C -> C, GELU) applied with the same weights to every input volume.

    (B, 1, D, H, W) intensities in [0, 1] -> (B, C, D, H, W) features on the same voxel grid.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(volume))))


def bidirectional_order(n: int) -> torch.Tensor:
    """Token order of the paper's F_bid for N = ``n`` tokens, 0-based: ``[0, ..., k-2, n-1, n-2, ..., k-1]``.

    With k = ⌊N/2⌋ this is ``[f^1, ..., f^{k-1}, f^N, ..., f^k]`` in the paper's 1-based notation: the first
    k-1 tokens forwards, then the remaining N-k+1 tokens backwards. Returns a (N,) long tensor, a
    permutation of ``range(n)``.
    """
    if n < 1:
        raise ValueError(f"bidirectional_order needs at least one token, got {n}")
    head = max(n // 2 - 1, 0)
    return torch.cat([torch.arange(0, head), torch.arange(n - 1, head - 1, -1)])


@dataclass
class DAPLOutput:
    """Outputs of :class:`DAPL`.

    Attributes:
        logits: (B, Ñ) degradation classifier logits.
        probs: (B, Ñ) softmax of ``logits`` (the paper's p).
        prompt: (B, Ñ, L, M) P̂ = P ⊙ G.
        selection: (B, Ñ, L, M) the prompt selection matrix G ∈ (0, 1).
        states: (h1, h2, h3), each (B, N, M), in raster token order of ``grid``.
        grid: token grid (n_z, n_y, n_x), N = n_z n_y n_x.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    prompt: torch.Tensor
    selection: torch.Tensor
    states: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    grid: Grid


class AttentionPool(nn.Module):
    """Pool a token sequence (B, N, M) to (B, L, M) rows with L learned queries (softmax over the N tokens)."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_rows, dim) * dim**-0.5)
        self.key = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(torch.einsum("lm,bnm->bln", self.queries, self.key(tokens)) * self.scale, dim=-1)
        return torch.einsum("bln,bnm->blm", weights, tokens)


class DAPL(nn.Module):
    """Degradation-aware prompt learning (see the module docstring for the data flow).

    Args:
        enc_channels: C.
        patch_size: Q.
        embed_dim: M.
        d_state, expand, d_conv: Mamba block sizes.
        num_classes: Ñ.
        prompt_len: L.
        degradation_stats: add :class:`~unifuse.model.degradation_stats.DegradationStatistics` logits of the
            moving volume to the classifier's (module ``stats``; ``forward`` then needs ``moving``).
    """

    def __init__(
        self,
        enc_channels: int,
        patch_size: int,
        embed_dim: int,
        d_state: int,
        expand: int,
        d_conv: int,
        num_classes: int,
        prompt_len: int,
        degradation_stats: bool = False,
    ) -> None:
        super().__init__()
        m = embed_dim
        self.num_classes = num_classes
        self.prompt_len = prompt_len
        self.embed_dim = m
        self.fuse = nn.Sequential(nn.Conv3d(2 * enc_channels, enc_channels, 1), nn.GELU())
        self.patch = PatchEmbed3d(enc_channels, m, patch_size)
        self.mamba1 = MambaBlock(m, d_state, expand, d_conv)
        self.mamba2 = MambaBlock(m, d_state, expand, d_conv)
        self.state_norm = nn.LayerNorm(m)
        # classifier: MLP -> linear layer -> classification head (+ softmax)
        self.cls_mlp = MLP(m, m, m)
        self.cls_linear = nn.Sequential(nn.Linear(3 * m, m), nn.GELU())
        self.cls_head = nn.Linear(m, num_classes)
        self.stats = DegradationStatistics(num_classes, m) if degradation_stats else None
        # prompt selection: two MLPs around an attention pooling to L rows
        self.sel_mlp1 = MLP(3 * m, m, m)
        self.sel_pool = AttentionPool(prompt_len, m)
        self.sel_mlp2 = MLP(m, m, num_classes * m)
        self.prompts = nn.Parameter(torch.randn(num_classes, prompt_len, m))

    @staticmethod
    def orders(n: int) -> Tuple[torch.Tensor, ...]:
        """The three token orders (forward, backward, bidirectional) for N = ``n`` tokens, each (N,) long."""
        forward = torch.arange(n)
        return forward, forward.flip(0), bidirectional_order(n)

    def forward(
        self, feat_mov: torch.Tensor, feat_ref: torch.Tensor, moving: Optional[torch.Tensor] = None
    ) -> DAPLOutput:
        """Run DAPL on the encoder features F'_D (moving, degraded) and F_R (reference), both (B, C, D, H, W).

        ``moving`` is the (B, 1, D, H, W) volume I'_D itself, needed (and only used) with ``degradation_stats``.
        """
        x = self.fuse(torch.cat([feat_mov, feat_ref], dim=1))
        tokens, grid = self.patch(x)
        f_for = self.mamba1(tokens)
        b, n, m = f_for.shape
        orders = self.orders(n)
        ordered = torch.cat([f_for[:, order.to(f_for.device)] for order in orders], dim=0)  # (3B, N, M), one pass
        out = self.state_norm(self.mamba2(ordered))
        states = []
        for j, order in enumerate(orders):
            inverse = torch.argsort(order).to(f_for.device)  # out[:, inverse[i]] is the state of raster token i
            states.append(out[j * b : (j + 1) * b, inverse])
        h1, h2, h3 = states

        pooled = [self.cls_mlp(h).mean(dim=1) for h in states]
        logits = self.cls_head(self.cls_linear(torch.cat(pooled, dim=-1)))
        if self.stats is not None:
            if moving is None:
                raise ValueError("this DAPL has degradation_stats: pass the moving volume (B, 1, D, H, W) as `moving`")
            logits = logits + self.stats(moving)
        probs = torch.softmax(logits, dim=-1)

        rows = self.sel_pool(self.sel_mlp1(torch.cat(states, dim=-1)))  # (B, L, M)
        selection = torch.sigmoid(self.sel_mlp2(rows))  # (B, L, Ñ M)
        selection = selection.view(b, self.prompt_len, self.num_classes, m).permute(0, 2, 1, 3)
        prompt = self.prompts.unsqueeze(0) * selection
        return DAPLOutput(logits, probs, prompt, selection, (h1, h2, h3), grid)
