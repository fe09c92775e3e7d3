"""The options of one ``fuse`` run, carried unchanged from the GUI and the CLI down to the core.

:class:`FuseOptions` is the single place where the run options are declared, validated, turned into CLI
arguments (the Slicer module runs the CLI in a background process) and read back from them. Its defaults
are the best settings the real-anatomy benchmark found (``docs/benchmark.md``): nobody needs a flag to get
the result the benchmark reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import SimpleITK as sitk

from .config import CONFIGS, DEGRADATION_CLASSES, MOVING_MODALITIES
from .errors import UniFuseError

__all__ = [
    "AFFINE_MODES",
    "DEFAULT_SPACING_MM",
    "FuseOptions",
    "INIT_MODES",
    "MAX_SPACING_MM",
    "MIN_SPACING_MM",
    "REFINE_MODES",
    "add_cli_arguments",
]

#: Default spacing of the working grid the network and the refinement run on (mm, isotropic).
DEFAULT_SPACING_MM = 3.0
#: Bounds of ``spacing_mm``: finer than 0.5 mm costs gigabytes for nothing; coarser than 12 mm cannot
#: represent the structures (~5 mm) a deformable stage must follow.
MIN_SPACING_MM, MAX_SPACING_MM = 0.5, 12.0
INIT_MODES = ("geometry", "moments")
AFFINE_MODES = ("affine", "rigid", "none")
REFINE_MODES = ("fast", "full", "none")

#: Options the CLI does not expose (the CLI always uses their defaults).
_API_ONLY = ("map_back", "seed")

MaskLike = Union[None, str, Path, sitk.Image]


@dataclass(frozen=True)
class FuseOptions:
    """Everything that steers one run of :func:`unifuse.fuse` (all optional; defaults are the best settings).

    Attributes:
        degradation: ``"auto"`` (classifier decides) or one of ``none``, ``motion``, ``metal``, ``lowdose``.
        moving_modality: ``"auto"`` or the moving volume's modality ``ct``, ``mr`` or ``pet``. ``auto`` takes it
            from a DICOM input's Modality attribute, else tells only CT (HU scale) from MR-or-PET. A known
            modality rules out the degradations it cannot have (motion is MR, low dose is PET, metal is CT)
            and selects the calibration fitted for it: 94 % against 87 % correct on the real-anatomy
            validation samples (docs/network.md).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        weights: checkpoint file; None = the shipped weights.
        config: network config of an untrained network (only without weights; tests and development).
        spacing_mm: isotropic spacing of the working grid (mm); None = :data:`DEFAULT_SPACING_MM`. Never
            finer than the reference's own finest spacing, and coarsened when the memory budget needs it
            (both said in the report).
        init: header pre-alignment: ``geometry`` (the headers' physical space) or ``moments`` (+ centre of mass).
        affine: global intensity-based stage: ``affine`` (rigid then affine), ``rigid``, or ``none``.
        network: run the UniFuse network's deformable field (its degradation classifier and fusion always run).
        refine: instance refinement of the field (MIND-SSC): ``fast`` (default), ``full`` or ``none``. The guard
            keeps it only when it lowers the alignment score by at least ``unifuse.guard.REFINE_MIN_GAIN``
            (11 %): below that, on the real-anatomy cases, it moved the field away from the truth while
            improving its own similarity; above it, it removed 5–43 % of the error left by the affine stage on
            the training cases (docs/benchmark.md).
        guard: keep a stage only if the ground-truth-free alignment score improves (else the previous
            stage's result is used and the report says so). Off only for experiments.
        reference_mask, moving_mask: optional masks (file path or image; non-zero = inside) restricting
            every alignment stage's similarity to that region.
        fusion_spacing_mm: the fusion runs on the reference grid (None, the default) or, when the reference
            is finer than this (mm), on the same box at this spacing (then resampled onto the reference grid),
            to bound time on very fine volumes. Never coarser than the reference.
        map_back: fused volume in the reference's intensity units (else [0, 1]).
        seed: seed of an untrained network's initialisation and of the stochastic optimisers.
    """

    degradation: str = "auto"
    moving_modality: str = "auto"
    device: str = "auto"
    weights: Optional[str] = None
    config: Optional[str] = None
    spacing_mm: Optional[float] = None
    init: str = "geometry"
    affine: str = "affine"
    network: bool = True
    refine: str = "fast"
    guard: bool = True
    reference_mask: MaskLike = None
    moving_mask: MaskLike = None
    fusion_spacing_mm: Optional[float] = None
    map_back: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("degradation", self.degradation, ("auto", *DEGRADATION_CLASSES))
        _choice("moving modality", self.moving_modality, MOVING_MODALITIES)
        _choice("device", str(self.device).lower().split(":")[0].replace("gpu", "cuda"), ("auto", "cpu", "cuda"))
        _choice("init", self.init, INIT_MODES)
        _choice("affine", self.affine, AFFINE_MODES)
        _choice("refine", self.refine, REFINE_MODES)
        if self.config is not None:
            _choice("config", self.config, tuple(sorted(CONFIGS)))
        _spacing("working-grid spacing", self.spacing_mm, f"--spacing {DEFAULT_SPACING_MM} (or leave it out for the default)")
        _spacing("fusion spacing", self.fusion_spacing_mm, "--fusion-spacing 1 (or leave it out to fuse on the reference grid)")
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))

    @property
    def working_spacing_mm(self) -> float:
        """The requested working-grid spacing (mm), the default filled in."""
        return float(self.spacing_mm if self.spacing_mm is not None else DEFAULT_SPACING_MM)

    def replace(self, **changes: Any) -> "FuseOptions":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (an in-memory mask image is recorded as ``"<image>"``)."""
        out = dataclasses.asdict(self)
        for key in ("reference_mask", "moving_mask"):
            if isinstance(out[key], sitk.Image):
                out[key] = "<image>"
            elif out[key] is not None:
                out[key] = str(out[key])
        return out

    def to_cli_args(self) -> List[str]:
        """Arguments of ``unifuse fuse`` that reproduce these options (defaults are left out).

        Raises:
            UniFuseError: a mask is an in-memory image (write it to a file first).
        """
        args: List[str] = []
        default = FuseOptions()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, sitk.Image) and value == getattr(default, f.name):
                continue
            if f.name in _API_ONLY:
                raise UniFuseError(f"{f.name}={value!r} is an option of the Python API only; the CLI always uses "
                                   f"{f.name}={getattr(default, f.name)!r}")
            flag = "--" + f.name.replace("_", "-").replace("-mm", "")
            if isinstance(value, sitk.Image):
                raise UniFuseError(f"{f.name} is an in-memory image; write it to a file to pass it to the CLI")
            if isinstance(value, bool):
                args.append(("--" if value else "--no-") + f.name.replace("_", "-"))
            else:
                args += [flag, str(value)]
        return args

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "FuseOptions":
        """The options of a namespace parsed by a parser that :func:`add_cli_arguments` set up."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        for key in ("weights", "reference_mask", "moving_mask"):
            if key in values:
                values[key] = str(values[key])
        return cls(**values)


def _spacing(name: str, value: Any, example: str) -> None:
    """None, or a finite number of mm within [MIN_SPACING_MM, MAX_SPACING_MM] (else UniFuseError naming ``example``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                              or not MIN_SPACING_MM <= value <= MAX_SPACING_MM):
        raise UniFuseError(f"{name} {value!r} mm is outside {MIN_SPACING_MM}–{MAX_SPACING_MM} mm; choose e.g. {example}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UniFuseError(f"unknown {name} {value!r}; use one of {', '.join(map(str, allowed))}")


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Add the :class:`FuseOptions` flags to a ``fuse``-like sub-command (defaults: None = the option's own)."""
    p.add_argument("--degradation", choices=["auto", *DEGRADATION_CLASSES],
                   help="degradation of the moving volume (default: auto-detect)")
    p.add_argument("--moving-modality", choices=MOVING_MODALITIES,
                   help="modality of the moving volume: ct, mr or pet; tells the degradation detection which "
                        "degradations are possible (default: auto = from a DICOM header, else CT by its HU scale)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")
    p.add_argument("--weights", type=Path, help="UniFuse checkpoint (default: the shipped weights)")
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="network config for an untrained network (only without trained weights)")
    p.add_argument("--spacing", dest="spacing_mm", type=float, metavar="MM",
                   help=f"spacing of the isotropic working grid of the network and the refinement, in mm "
                        f"({MIN_SPACING_MM}–{MAX_SPACING_MM}; default {DEFAULT_SPACING_MM})")
    p.add_argument("--init", choices=INIT_MODES,
                   help="header pre-alignment: header geometry, or + centre of mass (default: geometry)")
    p.add_argument("--affine", choices=AFFINE_MODES,
                   help="global intensity-based stage (Mattes MI): rigid then affine, rigid only, or none "
                        "(default: affine)")
    p.add_argument("--no-network", dest="network", action="store_false", default=None,
                   help="skip the network's deformable field (its classifier and fusion still run)")
    p.add_argument("--refine", choices=REFINE_MODES, help="instance refinement of the field by MIND-SSC (default: fast; the guard keeps it only "
                        "for an alignment-score gain of at least 11 %%, see docs/benchmark.md)")
    p.add_argument("--no-guard", dest="guard", action="store_false", default=None,
                   help="keep every stage even when the alignment score says it made things worse (experiments)")
    p.add_argument("--fusion-spacing", dest="fusion_spacing_mm", type=float, metavar="MM",
                   help="fuse at no finer than MM millimetres, then resample onto the reference grid (default: "
                        f"fuse on the reference grid; {MIN_SPACING_MM}–{MAX_SPACING_MM})")
    p.add_argument("--reference-mask", type=Path, help="mask of the reference (non-zero = use); restricts alignment")
    p.add_argument("--moving-mask", type=Path, help="mask of the moving volume (non-zero = use); restricts alignment")
