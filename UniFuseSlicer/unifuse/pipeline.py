"""The UniFuse inference pipeline: two SimpleITK images in, fused/aligned volumes, field and maps out.

Stages (each timed in the report):

1. ``read``: read/validate the inputs (read-only; float32 copies are made).
2. ``prepare``: choose the S³ working grid covering the reference FOV, compute the header pre-alignment
   ``T_init`` (fixed -> moving physical points), resample both volumes onto the working grid and normalise
   intensities to [0, 1].
3. ``network``: run UniFuse on the working grid -> fused volume, pull-back field ``u`` (working-grid
   voxels, channels x, y, z), degradation probabilities.
4. ``warp``: convert ``u`` to LPS mm, compose ``x -> T_init(x + u(x))`` and resample the ORIGINAL moving data
   once onto the reference grid; express the composed transform as one displacement field ``U`` on the
   reference grid (``aligned(x) = moving(x + U(x))``).
5. ``maps``: fused volume back on the reference grid (and, by default, in the reference's intensity units),
   Jacobian determinant of ``x -> x + U(x)``, alignment-error maps before/after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from . import __version__
from .config import DEGRADATION_CLASSES, ModelConfig, get_config
from .errors import CancelledError, DeviceError, UniFuseError
from .weights import Checkpoint, load_checkpoint, shipped_weights_path

ImageLike = Union[sitk.Image, str, Path]
ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: Files written by :meth:`FusionResult.save` (and the CLI), by result attribute.
OUTPUT_FILES: Dict[str, str] = {
    "fused": "fused.nii.gz",
    "aligned": "aligned.nii.gz",
    "displacement": "displacement.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "error_map": "error_map.nii.gz",
    "error_map_before": "error_map_before.nii.gz",
}
REPORT_FILE = "report.json"

UNTRAINED_WARNING = (
    "UNTRAINED WEIGHTS: no trained UniFuse weights were found, so the network is randomly initialised. "
    "Its field is (near) identity and its fused volume is not meaningful; pass --weights/weights= a trained "
    "checkpoint."
)


@dataclass
class FusionResult:
    """Outputs of :func:`fuse`, all on the reference grid (same size, spacing, origin, direction).

    Attributes:
        fused: float32 fused volume (reference intensity units when ``map_back``; else [0, 1]).
        aligned: float32 moving volume resampled once through the composed transform (moving's units).
        displacement: 3-component float64 ITK displacement field, LPS mm, pull-back:
            ``aligned(x) = moving(x + U(x))`` for physical points x of the reference grid.
        jacobian: float32 determinant of the Jacobian of ``x -> x + U(x)``; <= 0 marks folding.
        error_map: float32 local dissimilarity in [0, 1] between reference and aligned (after alignment).
        error_map_before: the same between reference and the header-pre-aligned moving (before the network).
        degradation: degradation class used for restoration (``DEGRADATION_CLASSES``).
        probabilities: classifier probabilities per class.
        report: JSON-serialisable run report (device, timings, model, working grid, normalisation, ...).
    """

    fused: sitk.Image
    aligned: sitk.Image
    displacement: sitk.Image
    jacobian: sitk.Image
    error_map: sitk.Image
    error_map_before: sitk.Image
    degradation: str
    probabilities: Dict[str, float]
    report: Dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: Union[str, Path], overwrite: bool = False) -> Dict[str, Path]:
        """Write every output (see :data:`OUTPUT_FILES`) and ``report.json`` into ``out_dir``.

        All-or-nothing: existing outputs are refused up front unless ``overwrite``; every file is first
        written into a hidden staging folder inside ``out_dir`` and renamed into place only when all are
        complete, so a failure or Ctrl-C leaves no partial set of outputs.
        """
        from .io import write_image, write_json
        from .errors import OutputExistsError

        out = Path(out_dir)
        targets = {name: out / fname for name, fname in OUTPUT_FILES.items()}
        targets["report"] = out / REPORT_FILE
        if not overwrite:
            existing = [str(p) for p in targets.values() if p.exists()]
            if existing:
                raise OutputExistsError(
                    f"output file(s) already exist: {', '.join(existing)}; choose another output folder or "
                    f"pass --overwrite (overwrite=True)"
                )
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unifuse-partial-", dir=out))
        moved: list = []
        try:
            for name in OUTPUT_FILES:
                write_image(getattr(self, name), staging / targets[name].name, overwrite=True)
            write_json(self.report, staging / REPORT_FILE, overwrite=True)
            for target in targets.values():
                os.replace(staging / target.name, target)
                moved.append(target)
        except BaseException:
            # a failure or Ctrl-C while renaming: take back what this call already put in place
            if not overwrite:
                for target in moved:
                    target.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return targets


# --------------------------------------------------------------------------------------------------------
# helpers


def resolve_device(device: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` -> CUDA when available, else CPU; ``cuda``/``cuda:N`` must exist; ``cpu`` always works."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = str(device).lower()
    if dev == "gpu":
        dev = "cuda"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "device 'cuda' was requested but PyTorch sees no CUDA GPU (CPU-only PyTorch build or no "
                "driver); use --device cpu or --device auto"
            )
        return torch.device(dev)
    if dev == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'")


def device_description(device: "torch.device") -> str:  # noqa: F821
    """Human-readable device name for reports, e.g. 'cuda:0 (NVIDIA H100, 79.1 GiB)' or 'cpu (2 threads)'."""
    import torch

    if device.type == "cuda":
        idx = device.index or 0
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{idx} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def parse_degradation(degradation: Optional[str]) -> Optional[int]:
    """``auto``/None -> None (use the classifier); a class name -> its index."""
    if degradation in (None, "", "auto"):
        return None
    name = str(degradation).lower()
    if name not in DEGRADATION_CLASSES:
        raise UniFuseError(
            f"unknown degradation {degradation!r}; use 'auto' or one of {', '.join(DEGRADATION_CLASSES)}"
        )
    return DEGRADATION_CLASSES.index(name)


@dataclass
class LoadedModel:
    """A network ready for inference plus where it came from."""

    model: Any
    config: ModelConfig
    model_id: str
    trained: bool
    source: str
    metadata: Dict[str, Any]


def load_model(
    weights: Union[None, str, Path, Checkpoint] = None,
    config: Union[None, str, ModelConfig] = None,
    device: Union[str, "torch.device"] = "cpu",  # noqa: F821
    seed: int = 0,
) -> LoadedModel:
    """Build the network and load weights.

    ``weights=None`` uses the shipped weights when this copy has them; otherwise the network is built from
    ``config`` (default: the ``default`` config) with seeded random initialisation and flagged untrained.
    """
    import torch

    from .model import build_model

    ckpt: Optional[Checkpoint]
    if isinstance(weights, Checkpoint):
        ckpt = weights
    elif weights is not None:
        ckpt = load_checkpoint(weights)
    else:
        shipped = shipped_weights_path() if config is None else None
        ckpt = load_checkpoint(shipped) if shipped is not None else None

    if ckpt is not None:
        model = build_model(ckpt.config)
        try:
            model.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as exc:
            raise UniFuseError(
                f"weights {ckpt.path} do not fit the network built from their own config ({exc}); the file was "
                f"made by an incompatible unifuse version"
            ) from exc
        loaded = LoadedModel(model, ckpt.config, ckpt.model_id, bool(ckpt.metadata.get("trained", True)),
                             str(ckpt.path), ckpt.metadata)
    else:
        cfg = get_config(config) if isinstance(config, str) else (config or get_config("default"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg)
        loaded = LoadedModel(model, cfg, f"unifuse-{cfg.name}-untrained-seed{seed}", False, "random init", {})
    loaded.model.to(device).eval()
    return loaded


@contextmanager
def _stage(timings: Dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 4)


def _as_image(x: ImageLike, role: str) -> sitk.Image:
    from .io import read_image

    return x if isinstance(x, sitk.Image) else read_image(x)


# --------------------------------------------------------------------------------------------------------
# main entry point


def fuse(
    reference: ImageLike,
    moving: ImageLike,
    degradation: Optional[str] = "auto",
    device: str = "auto",
    weights: Union[None, str, Path, Checkpoint] = None,
    progress: Optional[ProgressFn] = None,
    *,
    working_size: Optional[int] = None,
    config: Union[None, str, ModelConfig] = None,
    init: str = "geometry",
    map_back: bool = True,
    cancel: Optional[CancelFn] = None,
    seed: int = 0,
    model: Optional[LoadedModel] = None,
) -> FusionResult:
    """Align, restore and fuse ``moving`` onto ``reference`` with UniFuse.

    Args:
        reference: good-quality reference volume (the fixed space): a ``SimpleITK.Image`` or a path
            (any file SimpleITK reads, or a DICOM folder). Never modified.
        moving: second modality, possibly misaligned and degraded. Never modified.
        degradation: ``"auto"`` (classifier decides) or one of ``none``, ``motion``, ``metal``, ``lowdose``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        weights: checkpoint path or :class:`~unifuse.weights.Checkpoint`; None = shipped weights (or an
            untrained network, flagged in the report, when none ship).
        progress: called as ``progress(fraction, message)`` with fraction in [0, 1].
        working_size: edge of the S³ working grid (default: the size the weights were trained at).
        config: network config for an untrained network (ignored when weights are given).
        init: pre-alignment, ``"geometry"`` (header geometry only) or ``"moments"`` (+ centre of mass).
        map_back: return the fused volume in the reference's intensity units (else [0, 1]).
        cancel: polled between stages; returning True aborts with :class:`~unifuse.errors.CancelledError`.
        seed: seed of the random initialisation of an untrained network.
        model: a network already in memory (:class:`LoadedModel`, e.g. from :func:`load_model` or a training
            loop); when given, ``weights`` and ``config`` are ignored.

    Returns:
        :class:`FusionResult` on the reference grid.
    """
    import torch

    from . import error_maps, geometry, intensity
    from .io import validate_volume
    from .spatial import jacobian_determinant

    timings: Dict[str, float] = {}
    t_start = time.perf_counter()

    def step(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise CancelledError("cancelled by the user; nothing was written and the inputs are unchanged")
        if progress is not None:
            progress(float(fraction), message)

    step(0.0, "reading inputs")
    with _stage(timings, "read"):
        ref_img = validate_volume(_as_image(reference, "reference"), "reference")
        mov_img = validate_volume(_as_image(moving, "moving"), "moving")
        degradation_id = parse_degradation(degradation)
        dev = resolve_device(device)

    step(0.05, "loading the network")
    with _stage(timings, "load_model"):
        loaded = model if model is not None else load_model(weights, config, dev, seed)
        loaded.model.to(dev).eval()
        cfg = loaded.config
        size = int(working_size or cfg.working_size)
        if size <= 0 or size % cfg.size_multiple:
            raise UniFuseError(
                f"working size {size} is not a positive multiple of {cfg.size_multiple} (required by the "
                f"'{cfg.name}' network); choose e.g. {max(cfg.size_multiple, size // cfg.size_multiple * cfg.size_multiple)}"
            )

    step(0.15, "resampling onto the working grid")
    with _stage(timings, "prepare"):
        grid = geometry.working_grid(ref_img, size)
        t_init = geometry.initial_transform(ref_img, mov_img, mode=init)
        geometry.check_overlap(ref_img, mov_img, t_init)
        ref_arr, ref_norm = intensity.normalize_image(ref_img)
        mov_arr, mov_norm = intensity.normalize_image(mov_img)
        ref_w = geometry.resample(ref_img, grid, default=ref_norm.low)
        mov_w = geometry.resample(mov_img, grid, transform=t_init, default=mov_norm.low)
        ref_t = torch.from_numpy(ref_norm.apply(sitk.GetArrayFromImage(ref_w)))[None, None].to(dev)
        mov_t = torch.from_numpy(mov_norm.apply(sitk.GetArrayFromImage(mov_w)))[None, None].to(dev)
        deg_t = None if degradation_id is None else torch.tensor([degradation_id], device=dev)

    step(0.30, f"running UniFuse on {dev.type}")
    with _stage(timings, "network"):
        with torch.inference_mode():
            out = loaded.model(ref_t, mov_t, degradation=deg_t)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        probs = out.probs[0].float().cpu().numpy()
        u_vox = out.displacement[0].float().cpu().numpy()
        fused_w = out.fused[0, 0].float().cpu().numpy()
        folding_working = float((jacobian_determinant(out.displacement.float()) <= 0).float().mean().cpu())

    used = DEGRADATION_CLASSES[int(np.argmax(probs))] if degradation_id is None else DEGRADATION_CLASSES[degradation_id]
    probabilities = {name: float(p) for name, p in zip(DEGRADATION_CLASSES, probs)}

    step(0.70, "warping the moving volume (one resampling)")
    with _stage(timings, "warp"):
        field_w = geometry.field_voxels_to_image(u_vox, grid)
        composed = geometry.compose_transform(t_init, field_w)
        aligned = geometry.warp_image(mov_img, composed, ref_img, default=float(mov_norm.low))
        displacement = geometry.transform_to_displacement(composed, ref_img)

    step(0.85, "computing fused volume and error maps")
    with _stage(timings, "maps"):
        fused_grid = sitk.GetImageFromArray(
            ref_norm.invert(fused_w).astype(np.float32) if map_back else fused_w.astype(np.float32)
        )
        fused_grid.CopyInformation(grid)
        fused = geometry.resample(fused_grid, ref_img, default=float(ref_norm.low) if map_back else 0.0)
        jacobian = error_maps.jacobian_determinant_image(displacement)
        pre_aligned = geometry.warp_image(mov_img, t_init, ref_img, default=float(mov_norm.low))
        error_before, error_after = error_maps.alignment_error_maps(ref_img, pre_aligned, aligned)

    total = time.perf_counter() - t_start
    report: Dict[str, Any] = {
        "unifuse_version": __version__,
        "model": {
            "id": loaded.model_id,
            "config": cfg.name,
            "trained": loaded.trained,
            "source": loaded.source,
            "training": {k: v for k, v in loaded.metadata.items() if k != "config"},
        },
        "device": device_description(dev),
        "device_requested": device,
        "working_grid": {
            "size": [size] * 3,
            "spacing_mm": list(grid.GetSpacing()),
            "origin_lps_mm": list(grid.GetOrigin()),
            "direction": list(grid.GetDirection()),
        },
        "reference_grid": {
            "size": list(ref_img.GetSize()),
            "spacing_mm": list(ref_img.GetSpacing()),
        },
        "pre_alignment": init,
        "normalization": {"reference": ref_norm.to_dict(), "moving": mov_norm.to_dict()},
        "degradation": {
            "requested": degradation or "auto",
            "used": used,
            "predicted": DEGRADATION_CLASSES[int(np.argmax(probs))],
            "probabilities": probabilities,
        },
        "displacement": {
            "convention": "pull-back, LPS mm, aligned(x) = moving(x + U(x))",
            "max_mm": float(np.sqrt((sitk.GetArrayViewFromImage(displacement) ** 2).sum(-1)).max()),
            "network_max_voxels": float(np.sqrt((u_vox**2).sum(0)).max()),
        },
        "folding_percent": {
            "reference_grid": error_maps.folding_fraction(jacobian) * 100.0,
            "working_grid": folding_working * 100.0,
        },
        "error_map_mean": {
            "before": float(sitk.GetArrayViewFromImage(error_before).mean()),
            "after": float(sitk.GetArrayViewFromImage(error_after).mean()),
        },
        "fused_intensity": "reference units" if map_back else "[0, 1]",
        "timings_s": {**timings, "total": round(total, 4)},
    }
    if not loaded.trained:
        report["warning"] = UNTRAINED_WARNING
    step(1.0, "done")
    return FusionResult(
        fused=fused,
        aligned=aligned,
        displacement=displacement,
        jacobian=jacobian,
        error_map=error_after,
        error_map_before=error_before,
        degradation=used,
        probabilities=probabilities,
        report=report,
    )
