"""Small building blocks shared by the UniFuse modules.

Volumes are (B, C, D, H, W) = (batch, channel, z, y, x). Token sequences are (B, N, M) with the N tokens of
a (n_z, n_y, n_x) token grid in raster order (x fastest), i.e. ``volume.flatten(2).transpose(1, 2)``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "Grid",
    "conv3d_gelu",
    "volume_to_tokens",
    "tokens_to_volume",
    "PatchEmbed3d",
    "MLP",
    "PromptGuidance",
]

#: Spatial size (D, H, W) of a volume or token grid, in voxels of that grid.
Grid = Tuple[int, int, int]


def conv3d_gelu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv3d (same padding for odd kernels, or stride = kernel for patching) followed by GELU."""
    padding = kernel_size // 2 if stride == 1 else 0
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding), nn.GELU())


def volume_to_tokens(volume: torch.Tensor) -> torch.Tensor:
    """(B, M, n_z, n_y, n_x) feature map -> (B, N, M) tokens in raster order (x fastest)."""
    return volume.flatten(2).transpose(1, 2)


def tokens_to_volume(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, N, M) tokens -> (B, M, n_z, n_y, n_x) feature map; ``grid`` = (n_z, n_y, n_x), N = n_z n_y n_x."""
    b, n, m = tokens.shape
    gz, gy, gx = (int(g) for g in grid)
    if n != gz * gy * gx:
        raise ValueError(f"{n} tokens do not fill a token grid of {gz}×{gy}×{gx}")
    return tokens.transpose(1, 2).reshape(b, m, gz, gy, gx)


class PatchEmbed3d(nn.Module):
    """Cut a feature volume into non-overlapping Q³ patches and map each to an M-vector (plus LayerNorm).

    (B, C, D, H, W) -> tokens (B, N, M), N = (D/Q)(H/Q)(W/Q), and the token grid (D/Q, H/Q, W/Q).
    Implemented as a Conv3d with kernel = stride = Q (a linear map of each patch).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, volume: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        """Return (tokens (B, N, M), token grid (n_z, n_y, n_x))."""
        maps = self.proj(volume)
        grid: Grid = (int(maps.shape[2]), int(maps.shape[3]), int(maps.shape[4]))
        return self.norm(volume_to_tokens(maps)), grid


class MLP(nn.Sequential):
    """Linear -> GELU -> Linear on the last dimension."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, out_features))


class PromptGuidance(nn.Module):
    """Guidance vector from the degradation prompt: ``g = MLP(flatten(P̂ ⊙ p))`` (paper eq. 9's ``MLP(P̂ ⊙ p)``).

    Args:
        num_classes: Ñ.
        prompt_len: L.
        embed_dim: M.
        out_features: size of the guidance vector g.

    Forward: ``prompt`` (B, Ñ, L, M) = P̂ and ``p`` (B, Ñ) class weights -> g (B, out_features). Weighting
    by p keeps the prompts of the likely degradation(s) and suppresses the others, so the MLP reads the
    prompts "selected" by the diagnosis. FA and UFR&F each own one (different parameters, as in the paper).
    """

    def __init__(self, num_classes: int, prompt_len: int, embed_dim: int, out_features: int) -> None:
        super().__init__()
        self.mlp = MLP(num_classes * prompt_len * embed_dim, out_features, out_features)

    def forward(self, prompt: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        weighted = prompt * p.to(prompt.dtype)[:, :, None, None]
        return self.mlp(weighted.flatten(1))
