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

Memory (:mod:`unifuse.resources`): the working size is the requested/trained one if its estimated network
memory fits the budget (free RAM, or free GPU memory), else the largest multiple of ``cfg.size_multiple``
that fits; an out-of-memory error in the network is retried at smaller sizes and, from CUDA, on the CPU.
Every such change is a progress message and a line in ``report["notes"]``. The working grid always covers
the whole reference field of view, and the warp is always at full reference resolution.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

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
        displacement: 3-component float32 ITK displacement field (``sitkVectorFloat32``), LPS mm, pull-back:
            ``aligned(x) = moving(x + U(x))`` for physical points x of the reference grid.
        jacobian: float32 determinant of the Jacobian of ``x -> x + U(x)``; <= 0 marks folding.
        error_map: float32 local dissimilarity in [0, 1] between reference and aligned (after alignment);
            for references over 256³ voxels computed on a coarser grid and resampled (``report["error_maps"]``).
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
        complete. If anything fails or is interrupted (Ctrl-C) before the last rename, ``out_dir`` is left as
        it was: files already renamed are taken back, outputs they replaced (``overwrite``) are restored from
        the staging folder, and folders this call created are removed again.
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
        created = []  # folders this call creates, deepest first
        folder = out.absolute()
        while not folder.exists() and folder != folder.parent:
            created.append(folder)
            folder = folder.parent
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unifuse-partial-", dir=out))
        backup = staging / "replaced"
        moved: list = []
        replaced: list = []
        try:
            for name in OUTPUT_FILES:
                write_image(getattr(self, name), staging / targets[name].name, overwrite=True)
            write_json(self.report, staging / REPORT_FILE, overwrite=True)
            backup.mkdir()
            for target in targets.values():
                if target.exists():  # keep the old output until every new one is in place
                    os.replace(target, backup / target.name)
                    replaced.append(target)
                os.replace(staging / target.name, target)
                moved.append(target)
        except BaseException:
            for target in moved:
                target.unlink(missing_ok=True)
            for target in replaced:
                os.replace(backup / target.name, target)
            shutil.rmtree(staging, ignore_errors=True)
            for folder in created:
                try:
                    folder.rmdir()  # only if still empty
                except OSError:
                    break
            raise
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


#: Intensity normalisation statistics are computed on at most this many voxels (a regular sub-lattice of
#: larger volumes: percentiles of 16M samples differ from the full volume's by far less than the noise).
NORMALIZATION_MAX_VOXELS = 1 << 24


def _normalization(image: sitk.Image, role: str = "input") -> Tuple["IntensityNormalization", int]:  # noqa: F821
    """The intensity normalisation of ``image`` and the sub-sampling step used to compute it (1 = all voxels).

    Only the parameters are kept; the normalised full-resolution array is never held (it would cost 4 bytes
    per voxel for nothing: the network sees the working grid only).

    Raises:
        InputImageError: the volume has no contrast to normalise (message names ``role``).
    """
    from .errors import InputImageError
    from .intensity import normalize_image

    step = max(1, math.ceil((image.GetNumberOfPixels() / NORMALIZATION_MAX_VOXELS) ** (1.0 / 3.0)))
    sample = image if step == 1 else image[::step, ::step, ::step]
    try:
        return normalize_image(sample)[1], step
    except InputImageError as exc:
        raise InputImageError(f"the {role} image cannot be normalised: {exc}") from exc


def _displacement_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """``U(x) = T(x) - x`` on the reference grid as a float32 3-vector field (LPS mm; 12 bytes per voxel,
    half of float64 — 1.9 GB instead of 3.8 GB for a 512x512x600 CT; float32 resolves 1e-5 mm at 100 mm)."""
    return sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat32, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
        reference.GetDirection(),
    )


def _max_vector_norm(field_img: sitk.Image, slab: int = 16) -> float:
    """Largest vector length of a vector image, computed in z-slabs (no full-size temporaries)."""
    arr = sitk.GetArrayViewFromImage(field_img)
    best = 0.0
    for z0 in range(0, arr.shape[0], slab):
        block = np.asarray(arr[z0 : z0 + slab], dtype=np.float64)
        best = max(best, float(np.sqrt(np.einsum("...c,...c->...", block, block)).max()))
    return best


def _check_reference_memory(ref_img: sitk.Image, mov_img: sitk.Image) -> Dict[str, int]:
    """Refuse volumes whose reference-grid stages cannot fit into free RAM (before minutes are spent)."""
    from .errors import InsufficientMemoryError
    from .resources import available_memory_bytes, estimate_reference_stage_bytes, format_bytes

    need = estimate_reference_stage_bytes(ref_img.GetNumberOfPixels(), mov_img.GetNumberOfPixels())
    free = available_memory_bytes("cpu")
    if need > free:
        raise InsufficientMemoryError(
            f"the reference volume {tuple(ref_img.GetSize())} needs about {format_bytes(need)} of memory for the "
            f"full-resolution outputs (warp, displacement field, error maps) but only {format_bytes(free)} is "
            "free; close other programs, or crop/downsample the reference (e.g. Slicer's Crop Volume module) — "
            "the outputs are always on the reference grid"
        )
    return {"estimated_bytes": int(need), "available_bytes": int(free)}


@contextmanager
def _cancel_hooks(model: Any, check: Callable[[], None]) -> Iterator[None]:
    """Poll ``check`` before each top-level block of the network runs (Cancel during a long forward pass)."""
    children = list(model.children()) if hasattr(model, "children") else []
    handles = [child.register_forward_pre_hook(lambda *_: check()) for child in children]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class NetworkOutput:
    """What the pipeline keeps of one network pass (numpy, on the CPU; arrays (z, y, x)).

    Attributes:
        grid: the S³ working grid (see :func:`unifuse.geometry.working_grid`).
        device: the device the pass ran on.
        probs: (Ñ,) degradation probabilities.
        u_vox: (3, S, S, S) pull-back field, working-grid voxels, channels (x, y, z).
        fused: (S, S, S) fused volume in [0, 1].
        folding_working: fraction of working-grid voxels with det J <= 0.
    """

    grid: sitk.Image
    device: Any
    probs: np.ndarray
    u_vox: np.ndarray
    fused: np.ndarray
    folding_working: float

    @property
    def size(self) -> int:
        return int(self.grid.GetSize()[0])


def network_attempts(
    cfg: ModelConfig, size: int, device: "torch.device", cpu_size: Optional[int] = None  # noqa: F821
) -> List[Tuple[int, "torch.device"]]:  # noqa: F821
    """The (working size, device) pairs the network stage tries, in order, after out-of-memory errors.

    * CPU: ``size``, then :func:`unifuse.resources.fallback_sizes` down to the smallest working size.
    * CUDA: ``size`` and smaller sizes down to half the edge (1/8 of the voxels; coarser grids lose more
      accuracy than the CPU costs in time), then the CPU at ``cpu_size`` (default ``size``) and smaller.
    """
    import torch

    from .resources import fallback_sizes, min_working_size

    if device.type != "cuda":
        return [(size, device)] + [(s, device) for s in fallback_sizes(cfg, size)]
    m = cfg.size_multiple
    floor = max(min_working_size(cfg), (size // 2) // m * m)
    cpu = torch.device("cpu")
    first = int(cpu_size or size)
    return (
        [(size, device)]
        + [(s, device) for s in fallback_sizes(cfg, size, floor=floor)]
        + [(first, cpu)]
        + [(s, cpu) for s in fallback_sizes(cfg, first)]
    )


T = TypeVar("T")


def run_with_fallback(
    attempts: Sequence[Tuple[int, "torch.device"]],  # noqa: F821
    run: Callable[[int, "torch.device"], T],  # noqa: F821
    on_retry: Callable[[str], None],
) -> T:
    """Call ``run(size, device)`` for each attempt until one does not run out of memory.

    Out-of-memory errors (:func:`unifuse.resources.is_out_of_memory`: ``torch.OutOfMemoryError`` on CUDA,
    ``MemoryError``, PyTorch's CPU allocator failures) move on to the next attempt after
    ``on_retry(message)``; any other exception propagates unchanged.

    Raises:
        InsufficientMemoryError: every attempt ran out of memory.
    """
    import torch

    from .errors import InsufficientMemoryError
    from .resources import available_memory_bytes, format_bytes, is_out_of_memory

    failures: List[str] = []
    for i, (size, device) in enumerate(attempts):
        try:
            return run(size, device)
        except BaseException as exc:  # noqa: BLE001 - filtered just below
            if not is_out_of_memory(exc):
                raise
            failures.append(f"{size}³ on {device.type}")
        # outside the except block: the traceback (and the tensors its frames hold) is released
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if i + 1 < len(attempts):
            nxt_size, nxt_device = attempts[i + 1]
            where = "on the CPU (slower)" if nxt_device.type != device.type else f"on {nxt_device.type}"
            on_retry(
                f"out of memory running the network at {size}³ on {device.type}; retrying at {nxt_size}³ {where}"
            )
    free = format_bytes(available_memory_bytes("cpu"))
    raise InsufficientMemoryError(
        f"not enough memory to run the network (tried {', '.join(failures)}; {free} of RAM free): close other "
        "programs or use a machine with more memory"
    )


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
        progress: called as ``progress(fraction, message)`` with fraction in [0, 1] (non-decreasing).
        working_size: edge of the S³ working grid (default: the size the weights were trained at). When its
            estimated memory exceeds the budget (free RAM, or free GPU memory), the largest smaller multiple
            of ``cfg.size_multiple`` that fits is used instead, and said so in the progress and report.
        config: network config for an untrained network (ignored when weights are given).
        init: pre-alignment, ``"geometry"`` (header geometry only) or ``"moments"`` (+ centre of mass).
        map_back: return the fused volume in the reference's intensity units (else [0, 1]).
        cancel: polled between stages and before every top-level block of the network; returning True
            aborts with :class:`~unifuse.errors.CancelledError`.
        seed: seed of the random initialisation of an untrained network.
        model: a network already in memory (:class:`LoadedModel`, e.g. from :func:`load_model` or a training
            loop); when given, ``weights`` and ``config`` are ignored.

    Returns:
        :class:`FusionResult` on the reference grid.

    Memory (see :mod:`unifuse.resources` and ``docs/troubleshooting.md``): an out-of-memory error in the
    network is retried at smaller working sizes and, from CUDA, on the CPU (``report["notes"]``); references
    larger than 256³ voxels get their error maps computed on a coarser grid over the same field of view.
    """
    import torch

    from . import error_maps, geometry, resources
    from .io import validate_volume
    from .spatial import jacobian_determinant

    timings: Dict[str, float] = {}
    notes: List[str] = []
    t_start = time.perf_counter()
    last_fraction = [0.0]

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise CancelledError("cancelled by the user; nothing was written and the inputs are unchanged")

    def step(fraction: float, message: str) -> None:
        check_cancel()
        last_fraction[0] = max(last_fraction[0], float(fraction))
        if progress is not None:
            progress(last_fraction[0], message)

    def note(message: str) -> None:
        notes.append(message)
        step(last_fraction[0], message)

    step(0.0, "reading inputs")
    with _stage(timings, "read"):
        ref_img = validate_volume(_as_image(reference, "reference"), "reference")
        mov_img = validate_volume(_as_image(moving, "moving"), "moving")
        degradation_id = parse_degradation(degradation)
        dev = resolve_device(device)
        memory = _check_reference_memory(ref_img, mov_img)

    step(0.05, "loading the network")
    with _stage(timings, "load_model"):
        loaded = model if model is not None else load_model(weights, config, dev, seed)
        loaded.model.to(dev).eval()
        cfg = loaded.config
        requested = int(working_size or cfg.working_size)
        if requested <= 0 or requested % cfg.size_multiple:
            raise UniFuseError(
                f"working size {requested} is not a positive multiple of {cfg.size_multiple} (required by the "
                f"'{cfg.name}' network); choose e.g. "
                f"{max(cfg.size_multiple, requested // cfg.size_multiple * cfg.size_multiple)}"
            )
        choice = resources.choose_working_size(cfg, requested, resources.network_budget_bytes(dev))
    if choice.message:
        note(choice.message)

    step(0.15, "resampling onto the working grid")
    with _stage(timings, "prepare"):
        t_init = geometry.initial_transform(ref_img, mov_img, mode=init)
        overlap = geometry.check_overlap(ref_img, mov_img, t_init)
        ref_norm, ref_step = _normalization(ref_img, "reference")
        mov_norm, mov_step = _normalization(mov_img, "moving")

    resample_s = [0.0]

    def run_network(size: int, run_device: "torch.device") -> NetworkOutput:  # noqa: F821
        t0 = time.perf_counter()
        grid = geometry.working_grid(ref_img, size)
        ref_w = geometry.resample(ref_img, grid, default=ref_norm.low)
        mov_w = geometry.resample(mov_img, grid, transform=t_init, default=mov_norm.low)
        ref_t = torch.from_numpy(ref_norm.apply(sitk.GetArrayFromImage(ref_w)))[None, None].to(run_device)
        mov_t = torch.from_numpy(mov_norm.apply(sitk.GetArrayFromImage(mov_w)))[None, None].to(run_device)
        deg_t = None if degradation_id is None else torch.tensor([degradation_id], device=run_device)
        resample_s[0] += time.perf_counter() - t0
        loaded.model.to(run_device)
        with torch.inference_mode(), _cancel_hooks(loaded.model, check_cancel):
            out = loaded.model(ref_t, mov_t, degradation=deg_t)
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        return NetworkOutput(
            grid=grid,
            device=run_device,
            probs=out.probs[0].float().cpu().numpy(),
            u_vox=out.displacement[0].float().cpu().numpy(),
            fused=out.fused[0, 0].float().cpu().numpy(),
            folding_working=float((jacobian_determinant(out.displacement.float()) <= 0).float().mean().cpu()),
        )

    step(0.30, f"running UniFuse on {dev.type}")
    with _stage(timings, "network"):
        cpu_size = None
        if dev.type == "cuda":
            cpu_size = resources.choose_working_size(cfg, requested, resources.network_budget_bytes("cpu")).size
        net = run_with_fallback(network_attempts(cfg, choice.size, dev, cpu_size), run_network, note)
    # the resampling onto the working grid (done per attempt) is reported under "prepare"
    timings["prepare"] = round(timings["prepare"] + resample_s[0], 4)
    timings["network"] = round(timings["network"] - resample_s[0], 4)
    grid, probs, u_vox = net.grid, net.probs, net.u_vox

    used = DEGRADATION_CLASSES[int(np.argmax(probs))] if degradation_id is None else DEGRADATION_CLASSES[degradation_id]
    probabilities = {name: float(p) for name, p in zip(DEGRADATION_CLASSES, probs)}

    step(0.70, "warping the moving volume (one resampling)")
    with _stage(timings, "warp"):
        field_w = geometry.field_voxels_to_image(u_vox, grid)
        composed = geometry.compose_transform(t_init, field_w)
        aligned = geometry.warp_image(mov_img, composed, ref_img, default=float(mov_norm.low))
        displacement = _displacement_field(composed, ref_img)

    step(0.85, "computing fused volume and error maps")
    with _stage(timings, "maps"):
        fused_grid = sitk.GetImageFromArray(
            ref_norm.invert(net.fused).astype(np.float32) if map_back else net.fused.astype(np.float32)
        )
        fused_grid.CopyInformation(grid)
        fused = geometry.resample(fused_grid, ref_img, default=float(ref_norm.low) if map_back else 0.0)
        jacobian = error_maps.jacobian_determinant_image(displacement)
        map_grid = resources.coarser_grid(
            ref_img, resources.error_map_voxel_limit(resources.available_memory_bytes("cpu"))
        )
        if map_grid is None:
            pre_aligned = geometry.warp_image(mov_img, t_init, ref_img, default=float(mov_norm.low))
            error_before, error_after = error_maps.alignment_error_maps(ref_img, pre_aligned, aligned)
            del pre_aligned
        else:
            note(
                f"error maps computed on a {'x'.join(map(str, map_grid.GetSize()))} grid over the same field of "
                f"view (the reference has {ref_img.GetNumberOfPixels()} voxels) and resampled to the reference "
                "grid, to bound memory; the fused, aligned and displacement outputs are at full resolution"
            )
            ref_small = geometry.resample(ref_img, map_grid)
            before_small = geometry.warp_image(mov_img, t_init, map_grid, default=float(mov_norm.low))
            after_small = geometry.warp_image(mov_img, composed, map_grid, default=float(mov_norm.low))
            small_before, small_after = error_maps.alignment_error_maps(ref_small, before_small, after_small)
            del ref_small, before_small, after_small
            error_before = geometry.resample(small_before, ref_img)
            error_after = geometry.resample(small_after, ref_img)
    map_info = {
        "grid_size": list(map_grid.GetSize() if map_grid is not None else ref_img.GetSize()),
        "spacing_mm": list(map_grid.GetSpacing() if map_grid is not None else ref_img.GetSpacing()),
        "reduced": map_grid is not None,
    }

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
        "device": device_description(net.device),
        "device_requested": device,
        "working_grid": {
            "size": [net.size] * 3,
            "requested_size": requested,
            "spacing_mm": list(grid.GetSpacing()),
            "origin_lps_mm": list(grid.GetOrigin()),
            "direction": list(grid.GetDirection()),
        },
        "reference_grid": {
            "size": list(ref_img.GetSize()),
            "spacing_mm": list(ref_img.GetSpacing()),
        },
        "memory": {
            "network_budget_bytes": choice.budget_bytes,
            "network_estimated_bytes": resources.estimate_network_bytes(cfg, net.size),
            "reference_stage_estimated_bytes": memory["estimated_bytes"],
            "available_bytes_at_start": memory["available_bytes"],
        },
        "pre_alignment": init,
        "overlap_fraction": overlap,
        "normalization": {
            "reference": {**ref_norm.to_dict(), "sampled_every": ref_step},
            "moving": {**mov_norm.to_dict(), "sampled_every": mov_step},
        },
        "degradation": {
            "requested": degradation or "auto",
            "used": used,
            "predicted": DEGRADATION_CLASSES[int(np.argmax(probs))],
            "probabilities": probabilities,
        },
        "displacement": {
            "convention": "pull-back, LPS mm, aligned(x) = moving(x + U(x))",
            "max_mm": _max_vector_norm(displacement),
            "network_max_voxels": float(np.sqrt((u_vox**2).sum(0)).max()),
        },
        "folding_percent": {
            "reference_grid": error_maps.folding_fraction(jacobian) * 100.0,
            "working_grid": net.folding_working * 100.0,
        },
        "error_maps": map_info,
        "error_map_mean": {
            "before": float(sitk.GetArrayViewFromImage(error_before).mean()),
            "after": float(sitk.GetArrayViewFromImage(error_after).mean()),
        },
        "fused_intensity": "reference units" if map_back else "[0, 1]",
        "notes": notes,
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
