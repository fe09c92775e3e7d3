"""Model configurations of the UniFuse 3D network.

Every width and depth is a field here so the same code builds the ``tiny`` network used by the tests,
the ``default`` network whose weights ship with the extension, and the paper-size ``paper`` network
used by the benchmark. Configs are plain dataclasses serialised into checkpoints (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .errors import ConfigError

#: Degradation classes of the DAPL classifier (index = class id). Ñ = 4.
DEGRADATION_CLASSES: Tuple[str, ...] = ("none", "motion", "metal", "lowdose")
#: Human-readable names of :data:`DEGRADATION_CLASSES` for reports and GUIs.
DEGRADATION_LABELS: Dict[str, str] = {
    "none": "no degradation",
    "motion": "MRI motion artifacts",
    "metal": "CT metal artifacts + noise",
    "lowdose": "low-dose PET noise",
}
#: Modalities a user can state for the moving volume; ``auto``: from a DICOM header, else CT (HU scale) or
#: MR-or-PET (:mod:`unifuse.degradation_evidence`).
MOVING_MODALITIES: Tuple[str, ...] = ("auto", "ct", "mr", "pet")
#: DICOM Modality values (defined terms, attribute 0008,0060) -> :data:`MOVING_MODALITIES`.
DICOM_MODALITIES: Dict[str, str] = {"CT": "ct", "MR": "mr", "PT": "pet"}


def modality_from_dicom(value: Optional[str]) -> Optional[str]:
    """``"ct"``, ``"mr"`` or ``"pet"`` for a DICOM Modality value (``CT``, ``MR``, ``PT``; case and surrounding
    blanks ignored); None for anything else (other modalities, empty, None)."""
    if not isinstance(value, str):
        return None
    return DICOM_MODALITIES.get(value.strip().upper())


#: Human-readable names of :data:`MOVING_MODALITIES` for GUIs.
MOVING_MODALITY_LABELS: Dict[str, str] = {
    "auto": "auto (DICOM header, or CT by its HU scale)",
    "ct": "CT",
    "mr": "MRI",
    "pet": "PET",
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`unifuse.model.UniFuse` (names follow the paper's symbols).

    Attributes:
        name: config name recorded in checkpoints and reports.
        working_size: edge S of the isotropic S³ working grid the weights are trained at (voxels).
        enc_channels: C, channels of the shared encoder's output F_R, F'_D.
        patch_size: Q, edge of the cubic patches turned into tokens; N = (S/Q)³ tokens per volume.
        embed_dim: M, token length.
        d_state: state size of every selective scan (S6).
        expand: inner-width factor of the Mamba blocks.
        d_conv: kernel of the causal depthwise convolution in the Mamba blocks.
        num_degradations: Ñ, degradation classes (see :data:`DEGRADATION_CLASSES`).
        prompt_len: L, prompts per degradation class in the prompt set P ∈ R^{Ñ×L×M}.
        num_regblks: J, RegBLKs in the feature-alignment (FA) module.
        unet_channels: channel widths of the UFR&F U-Net levels (full resolution first).
        lora_rank: rank of each LoRA branch in ALSN.
        max_displacement: bound of the predicted field, as a fraction of the working grid edge (tanh-scaled).
        fa_stride: the FA head predicts the field at S / fa_stride (then resampled to S); 1 = full resolution.
            Must divide ``patch_size``.
        corr_radius: radius r of the local correlation ((2r+1)³ offsets) of the RegBLKs on the token grid.
        integration_steps: scaling-and-squaring steps integrating the FA output as a stationary velocity
            (0: the FA output is the displacement itself).
        fa_skips: feed the shared encoder's full-resolution features into FA after each upsampling and
            correlate at the head (``unifuse.model.alignment``). False reproduces networks (and reads
            checkpoints) made before the option existed: the field is then read from the token maps alone.
        fa_cell_centred: upsample the FA head's S/fa_stride field to S as the cell-centred grid it is
            (:func:`unifuse.spatial.resize_field`). False reproduces networks trained before the fix (corner-
            aligned, which scaled the field by (S - 1)/(g - 1) instead of S/g: ~3 % too large at 32³).
        restoration_head: UFR&F also outputs the restored moving volume (the aligned moving after
            degradation-specific restoration; a second 1×1×1 output conv on the same decoder). False
            reproduces networks made before the option (fused output only).
        degradation_stats: add class logits computed from second-order statistics of the moving volume to the
            DAPL classifier (:mod:`unifuse.model.degradation_stats`). False reproduces networks (and reads
            checkpoints) made before the option existed.
    """

    name: str = "default"
    working_size: int = 64
    enc_channels: int = 8
    patch_size: int = 8
    embed_dim: int = 64
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    num_degradations: int = len(DEGRADATION_CLASSES)
    prompt_len: int = 8
    num_regblks: int = 4
    unet_channels: Tuple[int, ...] = (8, 16, 32)
    lora_rank: int = 4
    max_displacement: float = 0.25
    fa_stride: int = 2
    corr_radius: int = 2
    integration_steps: int = 4
    fa_skips: bool = False
    fa_cell_centred: bool = False
    restoration_head: bool = False
    degradation_stats: bool = False

    @property
    def size_multiple(self) -> int:
        """Working-grid edges must be a multiple of this (patching and U-Net pooling)."""
        levels = 2 ** (len(self.unet_channels) - 1)
        return math.lcm(self.patch_size, levels)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unet_channels"] = list(self.unet_channels)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`. Checkpoints written before the unused ``extra`` field was removed store
        ``"extra": {}``; that empty key is dropped, a non-empty one refused (nothing here would read it)."""
        d = dict(d)
        if d.get("extra", None) == {}:
            del d["extra"]
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; this checkpoint needs a newer unifuse")
        if "unet_channels" in d:
            d["unet_channels"] = tuple(d["unet_channels"])
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def tiny() -> ModelConfig:
    """A ~67k-parameter network for unit tests (16³–32³ grids, runs in milliseconds on CPU)."""
    return ModelConfig(
        name="tiny",
        working_size=16,
        enc_channels=4,
        patch_size=4,
        embed_dim=16,
        d_state=4,
        expand=2,
        d_conv=2,
        prompt_len=2,
        num_regblks=2,
        unet_channels=(8, 16),
        lora_rank=2,
        fa_skips=True,
        fa_cell_centred=True,
        restoration_head=True,
        degradation_stats=True,
    )


def default() -> ModelConfig:
    """The default architecture at a 64³ working grid (the shipped weights use it at 32³: :func:`cpu`)."""
    return ModelConfig(fa_skips=True, fa_cell_centred=True, restoration_head=True, degradation_stats=True)


def paper() -> ModelConfig:
    """Paper-scale widths at the paper's 160³ working grid (benchmark only; no shipped weights)."""
    return ModelConfig(
        name="paper",
        working_size=160,
        enc_channels=32,
        patch_size=8,
        embed_dim=128,
        d_state=16,
        prompt_len=16,
        num_regblks=4,
        unet_channels=(32, 64, 128, 256),
        lora_rank=8,
        fa_skips=True,
        fa_cell_centred=True,
        restoration_head=True,
        degradation_stats=True,
    )


def cpu() -> ModelConfig:
    """The network of the shipped weights: the ``default`` architecture on a 32³ working grid.

    The shipped weights are trained on a 2-core CPU in about an hour (``docs/training.md``). Measured there
    (shared machine, 1 thread), one training step of the ``default`` network takes ~3 s at 64³ with batch 1 but
    ~0.6 s at 32³ with batch 2, so only the 32³ grid gives the thousands of steps the network needs in that
    budget. The widths are spelled out (equal to :func:`default` when the weights were trained) so that
    ``unifuse train --config cpu`` keeps reproducing the shipped network even if ``default`` changes.
    """
    return ModelConfig(
        name="cpu",
        working_size=32,
        enc_channels=8,
        patch_size=8,
        embed_dim=64,
        d_state=16,
        expand=2,
        d_conv=4,
        prompt_len=8,
        num_regblks=4,
        unet_channels=(8, 16, 32),
        lora_rank=4,
        max_displacement=0.25,
        fa_stride=2,
        corr_radius=2,
        integration_steps=4,
        fa_skips=True,
        fa_cell_centred=True,
        restoration_head=True,
        degradation_stats=True,
    )


CONFIGS = {"tiny": tiny, "default": default, "paper": paper, "cpu": cpu}


def get_config(name: str) -> ModelConfig:
    """Look a config up by name (``tiny``, ``default``, ``paper``)."""
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
