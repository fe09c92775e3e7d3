"""The UniFuse inference pipeline: two SimpleITK images in, fused/aligned volumes, field and maps out.

:func:`fuse` reads as the list of its stages (:mod:`unifuse.stages`), each timed and recorded in the
:class:`~unifuse.report.RunReport`:

1. ``read``: read/validate the inputs and masks (read-only), normalisation statistics.
2. ``load_model``: the network (shipped weights unless told otherwise).
3. ``header``: header pre-alignment ``T_init`` (reference -> moving physical points).
4. ``affine``: Mattes-MI rigid then affine registration (:mod:`unifuse.registration.affine`).
5. ``working_grid``: an isotropic grid with spacing in mm over the overlap of both fields of view; the
   guard decides between header and affine there.
6. ``network``: UniFuse's shared analysis (encoder, DAPL, OUFR) and its deformable field on top of the kept
   global transform; guarded.
7. ``refine``: instance refinement of the field (MIND-SSC, diffeomorphic; :mod:`unifuse.registration.refine`);
   guarded.
8. ``warp``: compose ``x -> T_global(x + u(x))`` and resample the ORIGINAL moving data once onto the
   reference grid; the composed map as one displacement field ``U`` (``aligned(x) = moving(x + U(x))``).
9. ``fusion``: UFR&F at the reference's own resolution (:mod:`unifuse.native_fusion`): the reference and the
   aligned moving volume in blended patches, conditioned on the working grid's prompt, class weights and
   token maps of the FINAL field (whatever stages were kept); reference units by default.
10. ``maps``: Jacobian determinant of ``x -> x + U(x)``, alignment-error maps before (header) / after.

Guard (:mod:`unifuse.guard`): each alignment stage is kept only if the ground-truth-free MIND-SSC score
improves on the result before it; when nothing improved on the header geometry the report carries a warning.
Memory (:mod:`unifuse.resources`): the working-grid spacing is coarsened when its estimated network memory
exceeds the budget; an out-of-memory error is retried at coarser spacings and, from CUDA, on the CPU.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import SimpleITK as sitk

from . import __version__, error_maps, geometry, resources
from .config import DEGRADATION_CLASSES, ModelConfig, get_config
from .degradation_evidence import combine, degradation_evidence
from .errors import CancelledError, DeviceError, InputImageError, InsufficientMemoryError, UniFuseError
from .io import header_modality, read_image, validate_volume
from .options import FuseOptions
from .outputs import result_files, write_outputs
from .registration.affine import AffineSettings, register_affine
from .report import NOT_IMPROVED_WARNING, RunReport, StageRecord
from .weights import Checkpoint, load_checkpoint, shipped_weights_path

ImageLike = Union[sitk.Image, str, Path]
ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: Image files written by :meth:`FusionResult.save` (and the CLI), by result attribute.
IMAGE_OUTPUT_FILES: Dict[str, str] = {
    "fused": "fused.nii.gz",
    "restored": "restored.nii.gz",
    "aligned": "aligned.nii.gz",
    "displacement": "displacement.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "error_map": "error_map.nii.gz",
    "error_map_before": "error_map_before.nii.gz",
}
#: Every file written by :meth:`FusionResult.save` besides the report: the images and the kept global
#: transform (ITK transform file, reference -> moving LPS points; ``docs/geometry.md``).
OUTPUT_FILES: Dict[str, str] = {**IMAGE_OUTPUT_FILES, "global_transform": "affine.tfm"}
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
        report: JSON-serialisable run report (:meth:`unifuse.report.RunReport.to_dict`: stages with times
            and guard scores, device, model, working grid, normalisation, degradation, warnings).
        global_transform: the kept global (header, affine, or the affine stage's rigid step) transform,
            reference -> moving LPS points (ITK's resampling convention); written as ``affine.tfm``.
        restored: float32 aligned moving volume after the network's degradation-specific restoration, in
            the moving's units (``map_back``; else [0, 1]); None for networks without the restoration output
            (``ModelConfig.restoration_head``; then no ``restored.nii.gz`` is written).
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
    global_transform: Optional[sitk.Transform] = None
    restored: Optional[sitk.Image] = None

    def save(self, out_dir: Union[str, Path], overwrite: bool = False) -> Dict[str, Path]:
        """Write every output (see :data:`OUTPUT_FILES`) and ``report.json`` into ``out_dir``.

        All-or-nothing and verified (:mod:`unifuse.outputs`): the folder is checked and locked, existing
        outputs are refused unless ``overwrite`` (which never replaces a folder or an input), every file is
        staged, read back and only then renamed into place; on any failure or interrupt ``out_dir`` is left
        as it was. Returns ``{attribute or "report": path}``.

        Raises:
            UniFuseError: ``OutputExistsError``, ``OutputLocationError``, ``OutputLockedError``,
                ``OutputWriteError`` — one line naming the problem and the fix.
        """
        written = write_outputs(out_dir, result_files(self), overwrite=overwrite)
        paths = {attr: written[fname] for attr, fname in OUTPUT_FILES.items() if fname in written}
        paths["report"] = written[REPORT_FILE]
        return paths


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


class _Run:
    """Progress, cancel and the report of one run (stage timing, notes, warnings)."""

    def __init__(self, progress: Optional[ProgressFn], cancel: Optional[CancelFn]) -> None:
        self.progress, self.cancel = progress, cancel
        self.report = RunReport()
        self.fraction = 0.0
        self.t0 = time.perf_counter()

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise CancelledError("cancelled by the user; nothing was written and the inputs are unchanged")

    def step(self, fraction: float, message: str) -> None:
        self.check_cancel()
        self.fraction = max(self.fraction, float(fraction))
        if self.progress is not None:
            self.progress(self.fraction, message)

    def note(self, message: str) -> None:
        self.report.notes.append(message)
        self.step(self.fraction, message)

    @contextmanager
    def stage(self, name: str, fraction: float, message: str) -> Iterator[StageRecord]:
        """Time a stage into the report (a stage run twice, e.g. after an out-of-memory retry, is summed)."""
        self.step(fraction, message)
        record = self.report.stage(name)
        if record is None:
            record = StageRecord(name)
            self.report.stages.append(record)
        t = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds += time.perf_counter() - t


def _as_image(x: ImageLike, role: str) -> sitk.Image:
    return x if isinstance(x, sitk.Image) else read_image(x)


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
    need = resources.estimate_reference_stage_bytes(ref_img.GetNumberOfPixels(), mov_img.GetNumberOfPixels())
    free = resources.available_memory_bytes("cpu")
    if need > free:
        raise InsufficientMemoryError(
            f"the reference volume {tuple(ref_img.GetSize())} needs about {resources.format_bytes(need)} of memory for the "
            f"full-resolution outputs (warp, displacement field, error maps) but only {resources.format_bytes(free)} is "
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


def network_attempts(spacing_mm: float, device: "torch.device", retries: int = 3) -> List[Tuple[float, "torch.device"]]:  # noqa: F821
    """The (working-grid spacing in mm, device) pairs the deformable stages try, in order, after
    out-of-memory errors: the spacing grows by 1.25 (about half the voxels) per retry; from CUDA, the CPU
    follows at the first spacing."""
    import torch

    plan = [(spacing_mm * 1.25**i, device) for i in range(retries + 1)]
    if device.type == "cuda":
        cpu = torch.device("cpu")
        plan += [(spacing_mm * 1.25**i, cpu) for i in range(retries + 1)]
    return plan


T = TypeVar("T")


def run_with_fallback(
    attempts: Sequence[Tuple[float, "torch.device"]],  # noqa: F821
    run: Callable[[float, "torch.device"], T],  # noqa: F821
    on_retry: Callable[[str], None],
) -> T:
    """Call ``run(spacing_mm, device)`` for each attempt until one does not run out of memory.

    Out-of-memory errors (:func:`unifuse.resources.is_out_of_memory`: ``torch.OutOfMemoryError`` on CUDA,
    ``MemoryError``, PyTorch's CPU allocator failures) move on to the next attempt after
    ``on_retry(message)``; any other exception propagates unchanged.

    Raises:
        InsufficientMemoryError: every attempt ran out of memory.
    """
    import torch

    failures: List[str] = []
    for i, (spacing, device) in enumerate(attempts):
        try:
            return run(spacing, device)
        except BaseException as exc:  # noqa: BLE001 - filtered just below
            if not resources.is_out_of_memory(exc):
                raise
            failures.append(f"{spacing:.3g} mm on {device.type}")
        # outside the except block: the traceback (and the tensors its frames hold) is released
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if i + 1 < len(attempts):
            nxt_spacing, nxt_device = attempts[i + 1]
            where = "on the CPU (slower)" if nxt_device.type != device.type else f"on {nxt_device.type}"
            on_retry(f"out of memory on a {spacing:.3g} mm working grid on {device.type}; retrying at "
                     f"{nxt_spacing:.3g} mm {where}")
    free = resources.format_bytes(resources.available_memory_bytes("cpu"))
    raise InsufficientMemoryError(
        f"not enough memory to run the network (tried {', '.join(failures)}; {free} of RAM free): close other "
        "programs, pass a coarser --spacing, or use a machine with more memory"
    )


@dataclass
class DeformableOutcome:
    """What the working-grid stages return (tensors on the CPU).

    Attributes:
        work: the working grid and reference volumes.
        global_stage: the kept global stage (header or affine).
        u: (1, 3, D, H, W) final deformable field (working-grid voxels), or None when no deformable stage
            was kept.
        probs: (Ñ,) the network's (DAPL) classifier probabilities.
        decision: the calibrated degradation decision (:func:`unifuse.degradation_evidence.combine`: the
            physical evidence of the moving volume with the network's probabilities when it is trained).
        p_used: (Ñ,) the class weights the prompts and ALSN mixed with (the calibrated probabilities for
            ``degradation="auto"``, else one-hot).
        token_maps: (1, 2M, T_z, T_y, T_x) unified token maps of the aligned pair (:meth:`UniFuse.token_maps`
            with the final field), on the working grid's token lattice; prompt: (1, Ñ, L, M) P̂; p: (1, Ñ)
            the same class weights as ``p_used`` — what the native-resolution fusion needs.
        folding_working: fraction of working-grid voxels with det J <= 0 of the final field.
        device: where the network ran.
    """

    work: Any
    global_stage: Any
    u: Optional[Any]
    probs: np.ndarray
    decision: Any
    p_used: np.ndarray
    token_maps: Any
    prompt: Any
    p: Any
    folding_working: float
    device: Any


def _deformable_stages(
    run: _Run, loaded: LoadedModel, ref_img: sitk.Image, mov_img: sitk.Image, masks: Tuple[Any, Any],
    globals_: List[Any], opts: FuseOptions, degradation_id: Optional[int], norms: Tuple[Any, Any],
    spacing_mm: float, device: "torch.device", evidence: Any,  # noqa: F821
) -> DeformableOutcome:
    """Working grid, guard of the global stages, network field, refinement, fusion — all on one grid."""
    import torch

    from . import stages
    from .guard import REFINE_MIN_GAIN, AlignmentGuard
    from .spatial import jacobian_determinant

    cfg = loaded.config
    with run.stage("working_grid", 0.30, "resampling onto the working grid") as rec:
        choice = stages.plan_working_grid(
            ref_img, mov_img, [g.transform for g in globals_], spacing_mm, cfg.size_multiple,
            lambda voxels: resources.estimate_network_bytes(cfg, round(voxels ** (1 / 3))),
            resources.network_budget_bytes(device),
        )
        work = stages.prepare_working_volumes(ref_img, choice, norms[0], norms[1], device, masks[0])
        for message in work.choice.notes:
            run.note(message)
        rec.details = work.choice.to_dict()
        guard = AlignmentGuard(work.fixed, work.region, enabled=opts.guard)
        candidates = [stages.global_candidate(g.name, mov_img, g.transform, work, masks[1]) for g in globals_]
    current, kept_global = candidates[0], globals_[0]
    for cand, g in zip(candidates[1:], globals_[1:]):  # the affine stage, judged on the working grid
        keep, before, after = guard.compare(current, cand)
        record = run.report.stage(g.name)
        if not keep and g.fallback is not None:  # the stage's rigid step, before giving the whole stage up
            fallback = stages.global_candidate(g.name, mov_img, g.fallback, work, masks[1])
            keep_fallback, before_fallback, after_fallback = guard.compare(current, fallback)
            if keep_fallback:
                run.note(f"the {g.name} stage's affine step made the alignment score worse ({before:.4f} -> "
                         f"{after:.4f}); its rigid step improved it ({before_fallback:.4f} -> {after_fallback:.4f}) "
                         "and is kept")
                cand, g = fallback, stages.GlobalStage(g.name, g.fallback, g.details, step="rigid")
                keep, before, after = True, before_fallback, after_fallback
        if g.step:  # the affine stage: which of its steps the guard kept
            record.details = {**(record.details or {}), "guard_kept_step": g.step if keep else "none"}
        record.kept, record.previous_score, record.score = keep, before, after
        if keep:
            current, kept_global = cand, g
    base = current

    with run.stage("network", 0.40, f"running UniFuse on {device.type}") as rec:
        loaded.model.to(device)
        with torch.inference_mode(), _cancel_hooks(loaded.model, run.check_cancel):
            analysis = loaded.model.analyse(work.fixed, base.moving)
            network_probs = analysis.dapl.probs[0].float().cpu().numpy()
            decision = combine(evidence, dict(zip(DEGRADATION_CLASSES, map(float, network_probs)))
                               if loaded.trained else None)
            if degradation_id is None:  # the calibrated probabilities are the mixture the network uses
                deg = torch.tensor([[decision[name] for name in DEGRADATION_CLASSES]], device=device)
            else:
                deg = torch.tensor([degradation_id], device=device)
            p = loaded.model.resolve_degradation(deg, analysis.dapl.probs)
            u_net = loaded.model.predict_field(analysis, p) if opts.network else None
        u = None
        if u_net is not None:
            proposed = stages.deformable_candidate("network", base, u_net)
            keep, before, after = guard.compare(current, proposed)
            rec.kept, rec.previous_score, rec.score = keep, before, after
            if keep:
                current, u = proposed, u_net
        else:
            rec.details["field"] = "skipped (network=False)"

    if opts.refine != "none":
        from .registration.refine import refine_field, refine_settings

        with run.stage("refine", 0.55, f"refining the field ({opts.refine})") as rec:
            generator = torch.Generator(device="cpu").manual_seed(opts.seed)
            result = refine_field(
                work.fixed, base.moving, initial=u, spacing_mm=(work.choice.spacing_mm,) * 3, mask=work.region,
                moving_valid=base.valid, settings=refine_settings(opts.refine), cancel=run.check_cancel,
                generator=generator,
            )
            proposed = stages.deformable_candidate("refine", base, result.field)
            keep, before, after = guard.compare(current, proposed, min_gain=REFINE_MIN_GAIN)
            rec.kept, rec.previous_score, rec.score = keep, before, after
            rec.details = {"settings": opts.refine, "iterations": result.iterations, "min_gain": REFINE_MIN_GAIN,
                           "optimised_score_before": result.score_before, "optimised_score_after": result.score_after,
                           "levels": [dataclasses.asdict(level) for level in result.levels]}
            if keep:
                current, u = proposed, result.field

    with torch.inference_mode():
        u_final = u if u is not None else torch.zeros((1, 3, *work.fixed.shape[2:]), device=device)
        token_maps = loaded.model.token_maps(analysis, u_final)
        folding = float((jacobian_determinant(u_final.float()) <= 0).float().mean().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return DeformableOutcome(
        work=work, global_stage=kept_global, u=None if u is None else u.detach().float().cpu(),
        probs=network_probs, decision=decision, p_used=p[0].float().cpu().numpy(),
        token_maps=token_maps, prompt=analysis.dapl.prompt, p=p, folding_working=folding, device=device,
    )


def _native_fusion(run: _Run, loaded: LoadedModel, ref_img: sitk.Image, aligned: sitk.Image,
                   outcome: DeformableOutcome, opts: FuseOptions) -> Tuple[np.ndarray, Optional[np.ndarray], sitk.Image, str]:
    """UFR&F on the reference grid (or the ``fusion_spacing_mm`` cap) in blended patches
    (:mod:`unifuse.native_fusion`); returns the fused and restored volumes in [0, 1] (restored None without
    the restoration output), the grid they are on and the precision."""
    from .native_fusion import fast_precision, fuse_native, fusion_grid, index_to_index_affine

    work = outcome.work
    grid = fusion_grid(ref_img, opts.fusion_spacing_mm or 0.0)
    on_reference = grid is ref_img
    ref_g = ref_img if on_reference else geometry.resample(ref_img, grid, default=work.ref_norm.low)
    mov_g = aligned if on_reference else geometry.resample(aligned, grid, default=work.mov_norm.low)
    q = loaded.config.patch_size
    to_working = index_to_index_affine(grid, work.grid)
    to_token = np.concatenate([to_working[:, :3], to_working[:, 3:] - (q - 1) / 2.0], axis=1) / q
    precision = fast_precision(outcome.device)
    fused, restored = fuse_native(
        loaded.model, work.ref_norm.apply(sitk.GetArrayViewFromImage(ref_g)),
        work.mov_norm.apply(sitk.GetArrayViewFromImage(mov_g)), outcome.token_maps, to_token, outcome.prompt,
        outcome.p, device=outcome.device, precision=precision, cancel=run.check_cancel,
    )
    return fused, restored, grid, "float32" if precision is None else str(precision).replace("torch.", "")


# --------------------------------------------------------------------------------------------------------
# main entry point


def _moving_modality(requested: str, moving: sitk.Image) -> Dict[str, str]:
    """The moving modality the degradation detection is told: the user's, else a DICOM header's, else
    ``"auto"`` (measured). Returns {"requested", "stated", "source"}; the pipeline adds "used"."""
    if requested != "auto":
        return {"requested": requested, "stated": requested, "source": "user"}
    from_header = header_modality(moving)
    if from_header is not None:
        return {"requested": requested, "stated": from_header, "source": "DICOM header"}
    return {"requested": requested, "stated": "auto", "source": "measured (HU scale: CT or not)"}


def fuse(
    reference: ImageLike,
    moving: ImageLike,
    options: Optional[FuseOptions] = None,
    *,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    model: Optional[LoadedModel] = None,
    **option_values: Any,
) -> FusionResult:
    """Align, restore and fuse ``moving`` onto ``reference`` with UniFuse.

    Stages (each timed and recorded in ``report["stages"]``): read -> load_model -> header -> affine ->
    working_grid -> network -> refine -> warp -> fusion -> maps. The alignment stages are guarded: each
    result is kept only if the ground-truth-free alignment score improves (``report["alignment"]``); when
    the final alignment is not better than the header geometry, ``report["warnings"]`` says so.

    Args:
        reference: good-quality reference volume (the fixed space): a ``SimpleITK.Image`` or a path
            (any file SimpleITK reads, or a DICOM folder). Never modified.
        moving: second modality, possibly misaligned and degraded. Never modified.
        options: :class:`~unifuse.options.FuseOptions` (default: the best settings).
        progress: called as ``progress(fraction, message)`` with fraction in [0, 1] (non-decreasing).
        cancel: polled between stages, during the registrations and before every top-level block of the
            network; returning True aborts with :class:`~unifuse.errors.CancelledError`.
        model: a network already in memory (:class:`LoadedModel`); when given, ``options.weights`` and
            ``options.config`` are ignored.
        **option_values: individual :class:`FuseOptions` fields (``degradation="motion"``, ``device="cpu"``,
            ``refine="full"``, ...), applied on top of ``options``.

    Returns:
        :class:`FusionResult` on the reference grid.
    """
    from . import stages  # deferred: imports torch, and the Slicer module imports this module without torch

    opts = (options or FuseOptions()).replace(**option_values) if option_values else (options or FuseOptions())
    run = _Run(progress, cancel)
    report = run.report

    with run.stage("read", 0.0, "reading inputs"):
        ref_img = validate_volume(_as_image(reference, "reference"), "reference")
        mov_read = _as_image(moving, "moving")
        modality = _moving_modality(opts.moving_modality, mov_read)  # before the float copy drops the header
        mov_img = validate_volume(mov_read, "moving")
        masks = (stages.read_mask(opts.reference_mask, "reference"), stages.read_mask(opts.moving_mask, "moving"))
        degradation_id = parse_degradation(opts.degradation)
        dev = resolve_device(opts.device)
        memory = _check_reference_memory(ref_img, mov_img)
        ref_norm, ref_step = stages.normalization(ref_img, "reference")
        # a stated MR/PET is never windowed as CT; a CT is recognised by its HU scale either way
        mov_norm, mov_step = stages.normalization(mov_img, "moving", modality["stated"] if modality["stated"] in
                                                  ("mr", "pet") else "auto")
    with run.stage("degradation_evidence", 0.04, "measuring degradation cues"):
        try:  # on the moving volume as read: its own grid and units
            evidence = degradation_evidence(mov_img, modality["stated"])
        except InputImageError:
            if modality["source"] != "DICOM header":
                raise
            run.note("the DICOM header says the moving volume is a CT, but its voxels are not in Hounsfield units "
                     "(no air near -1000 HU); its modality is detected instead")
            modality = {**modality, "stated": "auto", "source": "measured (DICOM header contradicted)"}
            evidence = degradation_evidence(mov_img)
        modality["used"] = evidence.modality

    with run.stage("load_model", 0.05, "loading the network"):
        loaded = model if model is not None else load_model(opts.weights, opts.config, dev, opts.seed)
        loaded.model.to(dev).eval()

    with run.stage("header", 0.10, "header pre-alignment") as rec:
        t_init, overlap = stages.header_transform(ref_img, mov_img, opts.init)
        rec.details = {"mode": opts.init, "overlap_fraction": overlap}
    globals_ = [stages.GlobalStage("header", t_init)]

    affine_result = None
    if opts.affine != "none":
        with run.stage("affine", 0.15, f"{opts.affine} registration (Mattes MI)") as rec:
            affine_result = register_affine(
                ref_img, mov_img, t_init, reference_mask=masks[0], moving_mask=masks[1],
                settings=AffineSettings(affine=opts.affine == "affine"), cancel=run.check_cancel,
            )
            rec.details = affine_result.to_dict()
            rigid_fallback = affine_result.rigid if affine_result.stage_kept == "affine" else None
            globals_.append(stages.GlobalStage("affine", affine_result.transform, fallback=rigid_fallback,
                                               step=affine_result.stage_kept))

    outcome = run_with_fallback(
        network_attempts(opts.working_spacing_mm, dev),
        lambda spacing, device: _deformable_stages(run, loaded, ref_img, mov_img, masks, globals_, opts,
                                                   degradation_id, (ref_norm, mov_norm), spacing, device, evidence),
        run.note,
    )
    work, kept_global = outcome.work, outcome.global_stage
    decision = outcome.decision
    predicted = decision.predicted
    used = predicted if degradation_id is None else DEGRADATION_CLASSES[degradation_id]

    with run.stage("warp", 0.75, "warping the moving volume (one resampling)"):
        composed = stages.field_to_transform(kept_global.transform, outcome.u, work.grid)
        aligned = geometry.warp_image(mov_img, composed, ref_img, default=float(mov_norm.low))
        displacement = _displacement_field(composed, ref_img)

    with run.stage("fusion", 0.80, "restoring and fusing at the reference resolution") as rec:
        fused_u, restored_u, fusion_on, precision = _native_fusion(run, loaded, ref_img, aligned, outcome, opts)

        def on_reference(volume: np.ndarray, norm: Any) -> sitk.Image:
            image = sitk.GetImageFromArray((norm.invert(volume) if opts.map_back else volume).astype(np.float32))
            image.CopyInformation(fusion_on)
            if fusion_on is ref_img:
                return image
            return geometry.resample(image, ref_img, default=float(norm.low) if opts.map_back else 0.0)

        fused = on_reference(fused_u, ref_norm)
        if restored_u is None:
            restored = None
            restoration_note = "not produced: this network has no restoration output (ModelConfig.restoration_head)"
        elif used == "none":
            # nothing to restore: on the clean real validation volume the restoration output lowered SSIM to
            # the truth from 0.79 to 0.57 (docs/benchmark.md), so a volume with no degradation is left as it is
            # (the restoration channel comes out of the fusion U-Net's patches at no extra cost; it is dropped)
            restored = aligned if opts.map_back else sitk.GetImageFromArray(
                mov_norm.apply(sitk.GetArrayViewFromImage(aligned)).astype(np.float32))
            if not opts.map_back:
                restored.CopyInformation(aligned)
            restoration_note = "the aligned volume unchanged: degradation 'none' (nothing to restore)"
        else:
            restored = on_reference(restored_u, mov_norm)
            restoration_note = "moving units" if opts.map_back else "[0, 1]"
            run.note(f"the restored output (restored.nii.gz) is the network's '{used}' restoration of the aligned "
                     "volume and is not verified: without a clean scan no check can tell whether it removed artifact or "
                     "structure (on the real validation cases it raised PSNR every time but sometimes lowered SSIM; "
                     "docs/benchmark.md); the aligned output (aligned.nii.gz) is the unrestored volume")
        rec.details = {"grid_size": list(fusion_on.GetSize()), "grid_spacing_mm": list(fusion_on.GetSpacing()),
                       "precision": precision}

    with run.stage("maps", 0.90, "computing the Jacobian and error maps"):
        jacobian = error_maps.jacobian_determinant_image(displacement)
        error_before, error_after, map_info = _error_maps(run, ref_img, mov_img, t_init, composed, aligned, mov_norm)

    final_stage = report.final_alignment_stage
    if final_stage == "header" and (opts.affine != "none" or opts.network or opts.refine != "none"):
        report.warnings.append(NOT_IMPROVED_WARNING)
    if not loaded.trained:
        report.warnings.append(UNTRAINED_WARNING)
    report.total_seconds = time.perf_counter() - run.t0
    report.sections.update({
        "unifuse_version": __version__,
        "options": opts.to_dict(),
        "model": {
            "id": loaded.model_id, "config": loaded.config.name, "trained": loaded.trained, "source": loaded.source,
            "training": {k: v for k, v in loaded.metadata.items() if k != "config"},
        },
        "device": device_description(outcome.device),
        "device_requested": opts.device,
        "working_grid": work.choice.to_dict(),
        "reference_grid": {"size": list(ref_img.GetSize()), "spacing_mm": list(ref_img.GetSpacing())},
        "memory": {
            "network_budget_bytes": resources.network_budget_bytes(outcome.device),
            "network_estimated_bytes": resources.estimate_network_bytes(
                loaded.config, round(work.grid.GetNumberOfPixels() ** (1 / 3))),
            "reference_stage_estimated_bytes": memory["estimated_bytes"],
            "available_bytes_at_start": memory["available_bytes"],
        },
        "pre_alignment": opts.init,
        "overlap_fraction": report.stage("header").details["overlap_fraction"],
        "global_transform": {"stage": kept_global.name, "step": kept_global.step or kept_global.name,
                             "direction": "reference -> moving LPS mm points (ITK resampling convention)"},
        "normalization": {
            "reference": {**ref_norm.to_dict(), "sampled_every": ref_step},
            "moving": {**mov_norm.to_dict(), "sampled_every": mov_step},
        },
        "degradation": {
            "requested": opts.degradation,
            "moving_modality": modality,
            "predicted": predicted,
            "used": used,
            "probabilities": {name: float(decision[name]) for name in DEGRADATION_CLASSES},
            "network_probabilities": {name: float(v) for name, v in zip(DEGRADATION_CLASSES, outcome.probs)},
            "mixture": {name: float(v) for name, v in zip(DEGRADATION_CLASSES, outcome.p_used)},
            "note": "probabilities: calibrated from the moving volume's physical evidence"
                    + (" and the network's classifier" if decision.used_network else
                       " alone (untrained network)" if not loaded.trained else
                       " alone (the shipped calibration does not combine these weights' classifier: it measured less "
                       "accurate than the evidence alone)")
                    + "; mixture: the class weights the network's prompts and LoRA experts used",
            "decision": decision.to_dict(),
        },
        "displacement": {
            "convention": "pull-back, LPS mm, aligned(x) = moving(x + U(x)); U composes header, affine, network "
                          "and refinement",
            "max_mm": _max_vector_norm(displacement),
            "deformable_max_voxels": 0.0 if outcome.u is None else float(outcome.u[0].norm(dim=0).max()),
        },
        "folding_percent": {
            "reference_grid": error_maps.folding_fraction(jacobian) * 100.0,
            "working_grid": outcome.folding_working * 100.0,
        },
        "error_maps": map_info,
        "error_map_mean": {
            "before": float(sitk.GetArrayViewFromImage(error_before).mean()),
            "after": float(sitk.GetArrayViewFromImage(error_after).mean()),
        },
        "fused_intensity": "reference units" if opts.map_back else "[0, 1]",
        "restored": restoration_note,
    })
    run.step(1.0, "done")
    return FusionResult(
        fused=fused, aligned=aligned, displacement=displacement, jacobian=jacobian, error_map=error_after,
        error_map_before=error_before, degradation=used, probabilities=report.sections["degradation"]["probabilities"],
        report=report.to_dict(), global_transform=kept_global.transform, restored=restored,
    )


def _error_maps(
    run: _Run, ref_img: sitk.Image, mov_img: sitk.Image, t_init: sitk.Transform, composed: sitk.Transform,
    aligned: sitk.Image, mov_norm: Any,
) -> Tuple[sitk.Image, sitk.Image, Dict[str, Any]]:
    """Error maps before (header geometry) and after (final transform) on the reference grid; for huge
    references on a coarser grid over the same field of view (said in a note)."""
    map_grid = resources.coarser_grid(ref_img, resources.error_map_voxel_limit(resources.available_memory_bytes("cpu")))
    low = float(mov_norm.low)
    if map_grid is None:
        pre_aligned = geometry.warp_image(mov_img, t_init, ref_img, default=low)
        before, after = error_maps.alignment_error_maps(ref_img, pre_aligned, aligned)
    else:
        run.note(
            f"error maps computed on a {'x'.join(map(str, map_grid.GetSize()))} grid over the same field of view (the "
            f"reference has {ref_img.GetNumberOfPixels()} voxels) and resampled to the reference grid, to bound "
            "memory; the fused, aligned and displacement outputs are at full resolution"
        )
        small = error_maps.alignment_error_maps(
            geometry.resample(ref_img, map_grid), geometry.warp_image(mov_img, t_init, map_grid, default=low),
            geometry.warp_image(mov_img, composed, map_grid, default=low))
        before, after = (geometry.resample(m, ref_img) for m in small)
    grid = map_grid if map_grid is not None else ref_img
    info = {"grid_size": list(grid.GetSize()), "spacing_mm": list(grid.GetSpacing()), "reduced": map_grid is not None}
    return before, after, info
