"""Universal Feature Restoration and Fusion (UFR&F) with ALSN skip connections, paper §3.5.

Input: ``F̃ = concat(W(F'_D, u), F_R)`` (B, 2C, S, S, S): the moving volume's encoder features warped by
the predicted field (:func:`unifuse.spatial.warp`, feature level) next to the reference features. A 3D U-Net
with ``unet_channels`` = (c_0, ..., c_{K-1}) encodes it (level k at S / 2^k); the unified OUFR tokens of the
aligned pair (warped F̄'_D maps and F̄_R maps, 2M channels at S/Q) are resampled to the bottleneck grid and
added there through a 1×1×1 conv, so the cross-modal representation also reaches the fusion. Every skip
connection (levels 0..K-2) passes an ALSN (eq. 7):

    F̃_{i,rf} = F̃_i + B_i(F̃_i, P̂) + Σ_j p_j R_ij(F̃_i)

* BaseNet B_i (eqs. 9–10), prompt-conditioned channel attention on the C_i × C_i channel-similarity matrix::

      Q, K, V = Conv1x1x1(F̃_i)                          (C_i, n) each, n voxels
      M_i     = softmax_row( τ · Resh(1 + tanh(MLP_i(g))) ⊙ (Q̂ ⊗ K̂ᵀ) )      Q̂, K̂ L2-normalised over n
      V'_i    = M_i ⊗ V
      B_i     = Conv_a(V'_i) ⊙ GELU(Conv_b(V'_i))

  with g = MLP(P̂ ⊙ p) the restoration guidance (its own MLP, separate from FA's). The normalisation and
  softmax (as in Restormer's transposed attention) keep M_i independent of the volume size; the paper's
  equation leaves them implicit. The identity term is the usual residual around the attention block.
* LoRA branches R_ij (eq. 8), one per degradation class j: a rank-r 3×3×3 convolution
  ``R_ij = U_j ∘ A_j`` (A_j: C_i -> r, 3×3×3; U_j: r -> C_i, 1×1×1, zero-initialised as LoRA's B), mixed by
  the degradation weights p_j. All branches of a scale are evaluated as one conv C_i -> Ñr, a per-class
  scaling by p, and one 1×1×1 conv Ñr -> C_i (exactly Σ_j p_j U_j A_j).

Output: 1×1×1 conv -> sigmoid -> fused volume (B, 1, S, S, S) in [0, 1]; with ``restoration`` a second
1×1×1 conv -> sigmoid on the same decoder features gives the restored moving volume (channel 1): the aligned
moving modality after the degradation-specific restoration (trained towards the clean aligned moving volume).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import PromptGuidance, conv3d_gelu

__all__ = ["BaseNet", "LoRABranches", "ALSN", "UFRF"]


class BaseNet(nn.Module):
    """Prompt-conditioned channel attention of ALSN (eqs. 9–10).

    Args:
        channels: C_i.
        guidance_dim: size of the restoration-guidance vector g.

    Forward: features (B, C_i, D, H, W), g (B, guidance_dim) -> (B, C_i, D, H, W).
    """

    def __init__(self, channels: int, guidance_dim: int) -> None:
        super().__init__()
        c = channels
        self.channels = c
        self.qkv = nn.Conv3d(c, 3 * c, 1)
        self.temperature = nn.Parameter(torch.ones(1))
        self.prompt_matrix = nn.Linear(guidance_dim, c * c)  # Resh(MLP(P̂ ⊙ p)), C × C
        nn.init.zeros_(self.prompt_matrix.weight)
        nn.init.zeros_(self.prompt_matrix.bias)
        self.out_value = nn.Conv3d(c, c, 1)
        self.out_gate = nn.Conv3d(c, c, 1)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        b, c = features.shape[:2]
        q, k, v = self.qkv(features).flatten(2).chunk(3, dim=1)  # (B, C, n) each
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        modulation = 1 + torch.tanh(self.prompt_matrix(guidance)).view(b, c, c)
        attn = torch.softmax(self.temperature * modulation * (q @ k.transpose(1, 2)), dim=-1)  # M_i (B, C, C)
        v_prime = (attn @ v).view_as(features)
        return self.out_value(v_prime) * F.gelu(self.out_gate(v_prime))


class LoRABranches(nn.Module):
    """Ñ low-rank 3×3×3 conv branches mixed by p: ``Σ_j p_j U_j(A_j(x))`` (eq. 8).

    A = [A_1; ...; A_Ñ] is one Conv3d(C, Ñ r, 3) (Kaiming init); U = [U_1, ..., U_Ñ] one Conv3d(Ñ r, C, 1)
    initialised to zero, so every branch starts as the zero update, as in LoRA.
    """

    def __init__(self, channels: int, num_classes: int, rank: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rank = rank
        self.down = nn.Conv3d(channels, num_classes * rank, 3, padding=1, bias=False)
        self.up = nn.Conv3d(num_classes * rank, channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, features: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """features (B, C, D, H, W), p (B, Ñ) -> (B, C, D, H, W)."""
        low = self.down(features)
        weights = p.to(low.dtype).repeat_interleave(self.rank, dim=1)  # (B, Ñ r): branch j's r channels get p_j
        return self.up(low * weights[:, :, None, None, None])


class ALSN(nn.Module):
    """Adaptive LoRA Synergistic Network at one skip connection: ``x + B(x, g) + Σ_j p_j R_j(x)`` (eq. 7)."""

    def __init__(self, channels: int, guidance_dim: int, num_classes: int, rank: int) -> None:
        super().__init__()
        self.base = BaseNet(channels, guidance_dim)
        self.lora = LoRABranches(channels, num_classes, rank)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return features + self.base(features, guidance) + self.lora(features, p)


class UFRF(nn.Module):
    """The UFR&F U-Net (see the module docstring).

    Args:
        in_channels: channels of F̃ (2C).
        token_channels: channels of the unified token maps added at the bottleneck (2M).
        channels: U-Net widths (c_0, ..., c_{K-1}), level k at S / 2^k.
        num_classes, prompt_len, embed_dim: Ñ, L, M of the prompt.
        rank: LoRA rank r.
        restoration: add the restored-moving output (channel 1 of the result).
    """

    def __init__(
        self,
        in_channels: int,
        token_channels: int,
        channels: Sequence[int],
        num_classes: int,
        prompt_len: int,
        embed_dim: int,
        rank: int,
        restoration: bool = False,
    ) -> None:
        super().__init__()
        chans = list(channels)
        if not chans:
            raise ValueError("UFRF needs at least one U-Net level")
        self.channels = chans
        self.guidance = PromptGuidance(num_classes, prompt_len, embed_dim, embed_dim)
        self.stem = conv3d_gelu(in_channels, chans[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv3d(chans[k - 1], chans[k], 2, stride=2), nn.GELU(), conv3d_gelu(chans[k], chans[k]))
            for k in range(1, len(chans))
        )
        self.token_proj = nn.Conv3d(token_channels, chans[-1], 1)
        self.alsn = nn.ModuleList(ALSN(chans[k], embed_dim, num_classes, rank) for k in range(len(chans) - 1))
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose3d(chans[k + 1], chans[k], 2, stride=2), nn.GELU())
            for k in range(len(chans) - 1)
        )
        self.merge = nn.ModuleList(conv3d_gelu(2 * chans[k], chans[k]) for k in range(len(chans) - 1))
        self.out = nn.Conv3d(chans[0], 1, 1)
        self.restore_out = nn.Conv3d(chans[0], 1, 1) if restoration else None

    def forward(
        self, features: torch.Tensor, token_maps: torch.Tensor, prompt: torch.Tensor, p: torch.Tensor
    ) -> torch.Tensor:
        """Restore and fuse.

        Args:
            features: (B, 2C, S, S, S) F̃ = concat(W(F'_D, u), F_R).
            token_maps: (B, 2M, S/Q, S/Q, S/Q) concat(W(F̄'_D maps, u), F̄_R maps).
            prompt: (B, Ñ, L, M) P̂.
            p: (B, Ñ) degradation weights.

        Returns:
            (B, 1, S, S, S) fused volume in [0, 1]; (B, 2, S, S, S) with the restored moving volume as
            channel 1 when the network has the restoration output.
        """
        # the token grid and the bottleneck grid are both cell-centred patch grids: align_corners=False
        bottleneck = [s // 2 ** (len(self.channels) - 1) for s in features.shape[2:]]
        tokens = F.interpolate(token_maps, size=bottleneck, mode="trilinear", align_corners=False)
        return self.decode(features, tokens, self.guidance(prompt, p), p)

    def decode(
        self, features: torch.Tensor, tokens: torch.Tensor, guidance: torch.Tensor, p: torch.Tensor
    ) -> torch.Tensor:
        """The U-Net on any grid whose edges are multiples of 2^(K-1) (full volume or a patch of it).

        Args:
            features: (B, 2C, D, H, W) F̃.
            tokens: (B, 2M, D/2^(K-1), H/2^(K-1), W/2^(K-1)) the unified token maps already sampled at the
                bottleneck voxels' centres.
            guidance: (B, M) g = :attr:`guidance` (prompt, p).
            p: (B, Ñ) degradation weights.

        Returns:
            (B, 1, D, H, W) fused, or (B, 2, D, H, W) fused and restored, in [0, 1].
        """
        skips: List[torch.Tensor] = []
        x = self.stem(features)
        for down in self.down:
            skips.append(x)
            x = down(x)
        x = x + self.token_proj(tokens)
        for k in reversed(range(len(skips))):
            skip = self.alsn[k](skips[k], guidance, p)
            x = self.merge[k](torch.cat([self.up[k](x), skip], dim=1))
        if self.restore_out is None:
            return torch.sigmoid(self.out(x))
        return torch.sigmoid(torch.cat([self.out(x), self.restore_out(x)], dim=1))
