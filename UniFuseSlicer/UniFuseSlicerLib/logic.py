"""MRML logic of the UniFuse module: run the core on two volume nodes and put the outputs in the scene.

Two ways to run, same scene result:

* in-process: :meth:`FusionLogic.process` converts the nodes to SimpleITK images, calls ``unifuse.fuse``
  and adds the outputs (used from the Python console, by the module's self-test and by the tests);
* background process (the GUI's default, keeps Slicer responsive): :meth:`FusionLogic.start_background`
  writes the inputs to a temporary folder, runs ``python -m unifuse.cli fuse ... --machine-progress`` via
  :class:`~background.CliProcess` and, when it succeeds, loads the files with
  :meth:`FusionLogic.load_cli_outputs`.

Guarantees: the input nodes are never modified (not their voxels, geometry, parent transform or display);
every output is a NEW node unless the caller passes existing output nodes; a run that fails or is cancelled
leaves the scene as it was (outputs are added only after the core finished, and nodes created before a
failure while adding are removed again).

Outputs (all on the reference grid) and their node types:

==================== ============================== ===================================================
role                 node                           content
==================== ============================== ===================================================
``fused``            vtkMRMLScalarVolumeNode        fused volume (reference intensity units)
``aligned``          vtkMRMLScalarVolumeNode        moving volume resampled once through the transform
``displacement``     vtkMRMLGridTransformNode       ``x -> x + U(x)`` as from-parent transform, RAS mm
``error_map``        vtkMRMLScalarVolumeNode        local dissimilarity after alignment, [0, 1]
``error_map_before`` vtkMRMLScalarVolumeNode        the same before the network (header pre-alignment)
``jacobian``         vtkMRMLScalarVolumeNode        det of the Jacobian of ``x -> x + U(x)``; <= 0 folds
==================== ============================== ===================================================
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

import slicer
from unifuse.config import MOVING_MODALITY_LABELS
from unifuse.errors import CancelledError, GeometryError, InputImageError, UniFuseError
from unifuse.options import FuseOptions
from unifuse.pipeline import IMAGE_OUTPUT_FILES, OUTPUT_FILES, REPORT_FILE, FusionResult  # file names written by FusionResult.save / the CLI

from . import display, hierarchy
from .background import CliProcess
from .options import DICOM_MODALITY_TAG, modality_from_dicom
from .workdir import keep_temporary_files_requested, make_work_dir, remove_work_dir
from .transforms import displacement_to_grid_transform, displacement_to_grid_transform_node
from .volumes import image_data_from_image, image_to_volume_node, volume_node_geometry, volume_node_to_image

__all__ = [
    "VOLUME_ROLES",
    "ROLES",
    "OUTPUT_FILES",
    "REPORT_FILE",
    "OutputNodes",
    "FusionNodes",
    "FusionLogic",
    "BackgroundFusion",
    "build_cli_command",
    "read_cli_outputs",
    "prepare_cli_outputs",
    "PreparedOutputs",
    "cli_environment",
    "python_executable",
    "core_package_parent",
    "format_summary",
    "DICOM_INSTANCE_UIDS_ATTRIBUTE",
    "ModalityResolution",
    "dicom_modality",
    "resolve_moving_modality",
]

#: Output roles stored in scalar volume nodes.
VOLUME_ROLES: Tuple[str, ...] = ("fused", "aligned", "error_map", "error_map_before", "jacobian")
#: Outputs only some networks write (``restored``: networks with the restoration output); absent otherwise.
OPTIONAL_ROLES: Tuple[str, ...] = ("restored",)
#: All output roles (``displacement`` is a grid transform node).
ROLES: Tuple[str, ...] = ("fused", "aligned", "displacement", "error_map", "error_map_before", "jacobian")
#: Output node name suffixes (after the moving volume's name).
_NAME_SUFFIX = {
    "fused": "fused",
    "restored": "restored",
    "aligned": "aligned",
    "displacement": "UniFuse transform",
    "error_map": "alignment error after",
    "error_map_before": "alignment error before",
    "jacobian": "Jacobian determinant",
}
_LEGEND_TITLE = {
    "error_map": "Alignment error (after)",
    "error_map_before": "Alignment error (before)",
    "jacobian": "Jacobian determinant",
}
#: Largest difference (mm, or direction cosine) between an output file's grid and the reference grid that is
#: attributed to file precision (NIfTI stores geometry in float32) and snapped to the exact reference grid.
GRID_TOLERANCE = 1e-3

ProgressFn = Callable[[float, str], None]


@dataclass
class OutputNodes:
    """Existing nodes to overwrite with a run's outputs; a role left None gets a new node."""

    fused: Optional[Any] = None
    aligned: Optional[Any] = None
    displacement: Optional[Any] = None
    error_map: Optional[Any] = None
    error_map_before: Optional[Any] = None
    jacobian: Optional[Any] = None
    restored: Optional[Any] = None

    def get(self, role: str) -> Optional[Any]:
        return getattr(self, role)

    @classmethod
    def from_nodes(cls, nodes: Optional["FusionNodes"], exclude: Tuple[Any, ...] = ()) -> "OutputNodes":
        """The output nodes of an earlier run, to update them in place ("update the previous result").

        Roles whose node was deleted from its scene, or that is in ``exclude`` (e.g. the new run's inputs:
        an earlier fused volume picked as the next moving volume), are left None (a new node is created).
        """
        if nodes is None:
            return cls()
        kept = {}
        for role in ROLES + OPTIONAL_ROLES:
            node = nodes.node(role)
            scene = node.GetScene() if node is not None else None
            if node is None or scene is None or not scene.IsNodePresent(node) or any(node is n for n in exclude):
                continue
            kept[role] = node
        return cls(**kept)

    def merged(self, fallback: "OutputNodes") -> "OutputNodes":
        """These selections, with ``fallback``'s node for every role left None here."""
        return OutputNodes(**{role: self.get(role) if self.get(role) is not None else fallback.get(role)
                              for role in ROLES + OPTIONAL_ROLES})

    def count(self) -> int:
        """Number of roles with a node."""
        return sum(self.get(role) is not None for role in ROLES)


@dataclass
class FusionNodes:
    """The scene nodes of one UniFuse run.

    Attributes:
        reference, moving: the input volume nodes (unchanged).
        fused, aligned, error_map, error_map_before, jacobian: ``vtkMRMLScalarVolumeNode`` on the reference grid.
        displacement: ``vtkMRMLGridTransformNode``; its from-parent transform is ``x -> x + U(x)`` (RAS mm).
        folder_item: subject-hierarchy folder holding the outputs.
        degradation: degradation class the core used; probabilities: classifier output per class.
        report: the core's run report (device, timings, model, ...).
        restored: ``vtkMRMLScalarVolumeNode`` of the restored aligned moving volume, or None (networks without
            the restoration output write none; a new node per run).
    """

    reference: Any
    moving: Any
    fused: Any
    aligned: Any
    displacement: Any
    error_map: Any
    error_map_before: Any
    jacobian: Any
    folder_item: int
    degradation: str
    probabilities: Dict[str, float] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)
    restored: Any = None

    def node(self, role: str) -> Any:
        """Output node of ``role`` (one of :data:`ROLES` or :data:`OPTIONAL_ROLES`; None when not produced)."""
        if role not in ROLES + OPTIONAL_ROLES:
            raise KeyError(f"unknown output role {role!r}; use one of {ROLES + OPTIONAL_ROLES}")
        return getattr(self, role)

    def output_nodes(self) -> Dict[str, Any]:
        """Every output node this run produced, by role."""
        return {role: self.node(role) for role in ROLES + OPTIONAL_ROLES if self.node(role) is not None}

    def summary(self) -> str:
        return format_summary(self.degradation, self.probabilities, self.report)


def format_summary(degradation: str, probabilities: Mapping[str, float], report: Mapping[str, Any]) -> str:
    """Plain-text status of a run: diagnosis with probabilities, timings, device, model, warnings, notes."""
    from unifuse.config import DEGRADATION_LABELS

    lines = [f"Degradation used: {DEGRADATION_LABELS.get(degradation, degradation)}"]
    requested = report.get("degradation", {}).get("requested") if isinstance(report.get("degradation"), Mapping) else None
    if requested and requested != "auto":
        lines[0] += f" (set by the user; detected: {report['degradation'].get('predicted', '?')})"
    for name, p in sorted(probabilities.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {DEGRADATION_LABELS.get(name, name):<28s} {100.0 * float(p):5.1f} %")
    modality_line = _moving_modality_line(report)
    if modality_line:
        lines.append(modality_line)
    timings = report.get("timings_s", {})
    if timings:
        stages = ", ".join(f"{k} {float(v):.2f} s" for k, v in timings.items() if k != "total")
        total = timings.get("total")
        lines.append(f"Time: {float(total):.2f} s ({stages})" if total is not None else f"Time: {stages}")
    if report.get("device"):
        lines.append(f"Device: {report['device']}")
    model = report.get("model", {})
    if isinstance(model, Mapping) and model:
        lines.append(f"Model: {model.get('id', '?')} ({'trained' if model.get('trained') else 'UNTRAINED'})")
    folding = report.get("folding_percent", {})
    if isinstance(folding, Mapping) and "reference_grid" in folding:
        lines.append(f"Folding voxels: {float(folding['reference_grid']):.3f} %")
    errors = report.get("error_map_mean", {})
    if isinstance(errors, Mapping) and {"before", "after"} <= set(errors):
        lines.append(f"Mean alignment error: {float(errors['before']):.4f} before -> {float(errors['after']):.4f} after")
    if report.get("warning"):
        lines.append(f"WARNING: {report['warning']}")
    # what the core told the user along the way (e.g. the restored volume is unverified, a coarser grid)
    lines += [f"Note: {note}" for note in report.get("notes") or [] if isinstance(note, str)]
    return "\n".join(lines)


#: Names of the moving modality the core used (``report["degradation"]["moving_modality"]["used"]``).
_MODALITY_NAMES = {**MOVING_MODALITY_LABELS, "mr_or_pet": "MRI or PET"}
#: How the summary words the core's ``source`` of the moving modality.
_MODALITY_SOURCES = {
    "user": "set by the user",
    "DICOM header": "from the DICOM header",
    "measured (HU scale: CT or not)": "measured by the HU scale",
    "measured (DICOM header contradicted)": "measured: the DICOM header said CT, but the voxels are not in HU",
}


def _moving_modality_line(report: Mapping[str, Any]) -> Optional[str]:
    """``Moving modality: MRI (set by the user)`` etc. from ``report["degradation"]["moving_modality"]``; None
    for reports of core versions without it. A modality this module resolved from Slicer's DICOM database
    (``report["slicer"]["moving_modality"]``, see :func:`resolve_moving_modality`) reaches the core as if the
    user had stated it; the line says where it really came from."""
    degradation = report.get("degradation")
    modality = degradation.get("moving_modality") if isinstance(degradation, Mapping) else None
    if not isinstance(modality, Mapping) or not modality.get("used"):
        return None
    used, source = str(modality["used"]), str(modality.get("source", "?"))
    text = _MODALITY_SOURCES.get(source, source)
    slicer_info = report.get("slicer")
    resolved = slicer_info.get("moving_modality") if isinstance(slicer_info, Mapping) else None
    if isinstance(resolved, Mapping):
        dicom_value = resolved.get("dicom_modality") or "?"
        if resolved.get("source") == MODALITY_FROM_DICOM_DATABASE and source == "user":
            text = f"from the DICOM database: Modality {dicom_value}"
        elif resolved.get("source") == MODALITY_DICOM_DATABASE_CONTRADICTED:
            text = (f"{text}; the DICOM database says Modality {dicom_value}, but the voxels are not in Hounsfield "
                    f"units")
    return f"Moving modality: {_MODALITY_NAMES.get(used, used)} ({text})"


# ------------------------------------------------------------------------------------------------------------
# moving modality from Slicer's DICOM database

#: Node attribute that Slicer's DICOM scalar-volume loader sets: the SOP instance UIDs of the loaded files,
#: separated by blanks.
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: :attr:`ModalityResolution.source` values.
MODALITY_FROM_USER = "user"
MODALITY_FROM_DICOM_DATABASE = "DICOM database"
MODALITY_DICOM_DATABASE_CONTRADICTED = "DICOM database contradicted (not in HU)"
MODALITY_LEFT_TO_CORE = "detected by the core"
#: At most this many instance UIDs of a node are looked up before giving up (a series has one modality; a
#: database that lost the first files has usually lost them all).
_MAX_UID_LOOKUPS = 8


def dicom_modality(node: Any, database: Any = None) -> Optional[str]:
    """The DICOM Modality value (e.g. ``"MR"``) of a volume node loaded from Slicer's DICOM database.

    Looks up the node's :data:`DICOM_INSTANCE_UIDS_ATTRIBUTE` in ``database`` (default
    ``slicer.dicomDatabase``): ``fileForInstance(uid)``, then ``fileValue(file, "0008,0060")``.

    Returns:
        The stripped value, or None: no node, a node without the attribute (not loaded from DICOM), no (open)
        database, files the database no longer knows, an empty value, or an error of the database (the
        modality is only a hint; looking it up must never stop a run).
    """
    if node is None or not hasattr(node, "GetAttribute"):
        return None
    uids = (node.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        return None
    if database is None:
        database = getattr(slicer, "dicomDatabase", None)
    if database is None:
        return None
    try:
        is_open = getattr(database, "isOpen", True)
        if callable(is_open):
            is_open = is_open()
        if not is_open:
            return None
        for uid in uids[:_MAX_UID_LOOKUPS]:
            path = database.fileForInstance(uid)
            if path:
                value = str(database.fileValue(path, DICOM_MODALITY_TAG) or "").strip()
                return value or None
    except Exception:  # noqa: BLE001 - a broken or closed database: no hint, the core detects the modality
        return None
    return None


@dataclass(frozen=True)
class ModalityResolution:
    """What the module tells the core about the moving volume's modality, and why.

    Attributes:
        requested: the user's choice (``auto``, ``ct``, ``mr``, ``pet``).
        stated: what is passed as ``FuseOptions.moving_modality``.
        source: :data:`MODALITY_FROM_USER`, :data:`MODALITY_FROM_DICOM_DATABASE`,
            :data:`MODALITY_DICOM_DATABASE_CONTRADICTED` (the database says CT, the voxels are not in HU, so
            ``auto`` is passed) or :data:`MODALITY_LEFT_TO_CORE` (``auto`` without a usable DICOM modality).
        dicom_modality: the DICOM Modality value found in the database, if any.
    """

    requested: str
    stated: str
    source: str
    dicom_modality: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"requested": self.requested, "stated": self.stated, "source": self.source,
                "dicom_modality": self.dicom_modality}

    def describe(self) -> Optional[str]:
        """A log line when the DICOM database decided something, else None."""
        if self.source == MODALITY_FROM_DICOM_DATABASE:
            return (f"Moving modality: {self.stated} (DICOM Modality {self.dicom_modality} from the DICOM database; "
                    f"passed to UniFuse as --moving-modality {self.stated})")
        if self.source == MODALITY_DICOM_DATABASE_CONTRADICTED:
            return (f"Moving modality: the DICOM database says {self.dicom_modality}, but the moving volume is not "
                    f"in Hounsfield units; its modality is detected instead")
        return None


def _voxels_in_hu(node: Any) -> bool:
    """The core's HU test (``unifuse.degradation_evidence.in_hounsfield_units``) on the node's voxels; False
    without voxel data."""
    from vtkmodules.util import numpy_support

    from unifuse.degradation_evidence import in_hounsfield_units

    image_data = node.GetImageData() if node is not None else None
    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        return False
    nx, ny, nz = image_data.GetDimensions()
    return in_hounsfield_units(numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx))  # a view: no copy


def resolve_moving_modality(requested: str, moving_node: Any, database: Any = None) -> ModalityResolution:
    """The moving modality to pass to the core for the user's choice ``requested``.

    The module runs the core on copies of the volumes (in memory or temporary NRRD files) that carry no DICOM
    tags, so the core's own ``auto`` cannot read a DICOM Modality. Here ``auto`` is resolved to the Modality
    of a volume loaded from Slicer's DICOM database (:func:`dicom_modality`; ``CT``/``MR``/``PT``), which the
    core then treats as stated. As in the core, a volume the database calls CT but whose voxels are not in
    Hounsfield units is not stated to be a CT (the core would refuse it): ``auto`` is passed, and the core
    measures it. Any other choice is passed as it is.
    """
    if requested != "auto":
        return ModalityResolution(requested, requested, MODALITY_FROM_USER)
    value = dicom_modality(moving_node, database)
    modality = modality_from_dicom(value)
    if modality is None:
        return ModalityResolution("auto", "auto", MODALITY_LEFT_TO_CORE, value)
    if modality == "ct" and not _voxels_in_hu(moving_node):
        return ModalityResolution("auto", "auto", MODALITY_DICOM_DATABASE_CONTRADICTED, value)
    return ModalityResolution("auto", modality, MODALITY_FROM_DICOM_DATABASE, value)


def _require_volume(node: Any, role: str) -> None:
    if node is None:
        raise InputImageError(f"no {role} volume selected; select a scalar volume as {role}")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputImageError(f"the {role} '{node.GetName()}' is a {node.GetClassName()}; select a scalar volume")


def _require_inputs(reference_node: Any, moving_node: Any) -> None:
    _require_volume(reference_node, "reference")
    _require_volume(moving_node, "moving")
    if reference_node is moving_node:
        raise InputImageError("reference and moving are the same volume; select two different volumes")


def _validate_outputs(outputs: "OutputNodes", reference_node: Any, moving_node: Any) -> None:
    """Selected output nodes must have the right type and must not be an input."""
    for role in ROLES + OPTIONAL_ROLES:
        node = outputs.get(role)
        if node is None:
            continue
        wanted = "vtkMRMLGridTransformNode" if role == "displacement" else "vtkMRMLScalarVolumeNode"
        if not node.IsA(wanted):
            raise InputImageError(f"output '{node.GetName()}' for {role} is a {node.GetClassName()}; select a "
                                  f"{wanted[7:-4]} node or 'create new'")
        if node in (reference_node, moving_node):
            raise InputImageError(f"the {role} output cannot overwrite an input volume; choose 'create new'")


def unifuse_transform_parent(node: Any) -> Optional[Any]:
    """The UniFuse displacement output ``node`` was placed under (to show it aligned), else None."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is not None and parent.GetAttribute(hierarchy.ROLE_ATTRIBUTE) == "displacement":
        return parent
    return None


def input_image(node: Any, role: str) -> sitk.Image:
    """The input volume as the core must see it: with its (linear) parent transforms, except a UniFuse
    displacement output the volume was placed under by an earlier run — that one shows an earlier result,
    it is not a pre-alignment, so a rerun starts from the volume itself again."""
    _require_volume(node, role)
    shown_by = unifuse_transform_parent(node)
    if shown_by is None:
        return volume_node_to_image(node)
    if shown_by.GetParentTransformNode() is not None:
        raise GeometryError(
            f"the {role} volume '{node.GetName()}' is under the UniFuse transform '{shown_by.GetName()}', which is "
            f"itself under another transform; remove the {role} volume from the UniFuse transform first"
        )
    return volume_node_to_image(node, world=False)


def input_geometry(node: Any, role: str) -> Tuple[Tuple[int, ...], Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """``(size, origin, spacing, direction)`` (LPS) of :func:`input_image` without copying the voxels."""
    _require_volume(node, role)
    shown_by = unifuse_transform_parent(node)
    return volume_node_geometry(node, world=shown_by is None)


@dataclass
class PreparedOutputs:
    """A CLI run's outputs made ready for the scene off the GUI thread (:func:`prepare_cli_outputs`): images
    on the exact reference grid, the report, the RAS grid transform and the voxel copies for the nodes."""

    images: Dict[str, sitk.Image]
    report: Dict[str, Any]
    grid_transform: Any
    image_data: Dict[str, Any]


class FusionLogic:
    """UniFuse on MRML nodes of one scene (no Qt needed).

    Args:
        scene: the ``vtkMRMLScene`` holding the input volumes; outputs are added to it.
        dicom_database: where a DICOM-loaded moving volume's Modality is looked up for ``moving_modality="auto"``
            (:func:`resolve_moving_modality`); default ``slicer.dicomDatabase`` (when there is one).
    """

    def __init__(self, scene: "slicer.vtkMRMLScene", slice_logics: Optional[Callable[[], List[Any]]] = None,
                 dicom_database: Any = None) -> None:
        if scene is None:
            raise ValueError("FusionLogic needs a MRML scene")
        self.scene = scene
        self.dicom_database = dicom_database
        #: Optional provider of the application's ``vtkMRMLSliceLogic`` objects (in Slicer: the layout
        #: manager's); used by ``show_result(fit=True)`` to fit the views with Slicer's own slice logic.
        self.slice_logics = slice_logics

    # -- running -----------------------------------------------------------------------------------------

    def process(
        self,
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        degradation: str = "auto",
        device: str = "auto",
        weights: Union[None, str, Path] = None,
        progress: Optional[ProgressFn] = None,
        *,
        outputs: Optional[OutputNodes] = None,
        show: bool = True,
        moving_modality: str = "auto",
        **options: Any,
    ) -> FusionNodes:
        """Fuse ``moving_node`` onto ``reference_node`` in this process and add the outputs to the scene.

        Args:
            reference_node: good-quality reference volume (fixed space; outputs live on its grid).
            moving_node: second modality, possibly misaligned and degraded.
            degradation: ``"auto"`` or one of ``none``, ``motion``, ``metal``, ``lowdose``.
            device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
            weights: checkpoint file; None = the shipped weights.
            progress: ``progress(fraction, message)``, fraction in [0, 1].
            outputs: existing nodes to overwrite (per role); default: new nodes for every output.
            show: set the slice views to reference (background) + fused (foreground, opacity 0.5).
            moving_modality: ``"auto"``, ``"ct"``, ``"mr"`` or ``"pet"``; ``auto`` takes the Modality of a
                volume loaded from Slicer's DICOM database (:func:`resolve_moving_modality`).
            **options: further :class:`unifuse.options.FuseOptions` fields (``spacing_mm``, ``refine``,
                ``affine``, ``config``, ...), and ``cancel`` / ``model`` for ``unifuse.fuse``.

        Returns:
            :class:`FusionNodes` of the new (or overwritten) output nodes.

        Raises:
            unifuse.errors.UniFuseError: bad inputs/options (message names the fix); CancelledError when
                ``cancel()`` returned True. The scene is unchanged in both cases.
        """
        import unifuse

        _require_inputs(reference_node, moving_node)
        _validate_outputs(outputs or OutputNodes(), reference_node, moving_node)
        reference_image = input_image(reference_node, "reference")
        moving_image = input_image(moving_node, "moving")
        cancel, model = options.pop("cancel", None), options.pop("model", None)
        modality = resolve_moving_modality(moving_modality, moving_node, self.dicom_database)
        fuse_options = FuseOptions(degradation=degradation, device=device, weights=weights,
                                   moving_modality=modality.stated, **options)
        result = unifuse.fuse(reference_image, moving_image, fuse_options, progress=progress, cancel=cancel,
                              model=model)
        recorded = {**fuse_options.to_dict(), "mode": "in-process"}
        nodes = self.add_result(result, reference_node, moving_node, recorded, outputs, moving_modality=modality)
        if show:
            self.show_result(nodes)
        return nodes

    def start_background(
        self,
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        degradation: str = "auto",
        device: str = "auto",
        weights: Union[None, str, Path] = None,
        on_progress: Optional[ProgressFn] = None,
        on_log: Optional[Callable[[str], None]] = None,
        outputs: Optional[OutputNodes] = None,
        python: Optional[str] = None,
        keep_temporary_files: bool = False,
        moving_modality: str = "auto",
        **options: Any,
    ) -> "BackgroundFusion":
        """Start a background run (see :class:`BackgroundFusion`); poll it until it returns the nodes.

        ``options`` are further :class:`unifuse.options.FuseOptions` fields (``spacing_mm``, ``refine``,
        ``affine``, ``config``, ...); they are validated here, before anything is exported.
        ``moving_modality="auto"`` is resolved to the Modality of a volume loaded from Slicer's DICOM database
        (:func:`resolve_moving_modality`): the temporary NRRD files the CLI reads carry no DICOM tags.
        ``keep_temporary_files`` (developer switch; also the environment variable
        ``UNIFUSE_KEEP_TEMPORARY_FILES=1``) keeps the run's temporary folder instead of deleting it.
        """
        _require_inputs(reference_node, moving_node)
        _validate_outputs(outputs or OutputNodes(), reference_node, moving_node)
        modality = resolve_moving_modality(moving_modality, moving_node, self.dicom_database)
        run = BackgroundFusion(
            self, reference_node, moving_node,
            options=FuseOptions(degradation=degradation, device=device, weights=str(weights) if weights else None,
                                moving_modality=modality.stated, **options),
            on_progress=on_progress, on_log=on_log, outputs=outputs, python=python,
            keep_temporary_files=keep_temporary_files or keep_temporary_files_requested(),
            moving_modality=modality,
        )
        run.start()
        return run

    # -- scene -------------------------------------------------------------------------------------------

    def add_result(
        self,
        result: Any,
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        options: Optional[Mapping[str, Any]] = None,
        outputs: Optional[OutputNodes] = None,
        prepared: Optional[PreparedOutputs] = None,
        moving_modality: Optional[ModalityResolution] = None,
    ) -> FusionNodes:
        """Add a ``unifuse.FusionResult`` (or any object with the same fields) to the scene.

        All-or-nothing: every image, the field and the selected output nodes are validated before the scene is
        touched; nodes created here are removed again if adding still fails. ``prepared``: the grid transform
        and voxel copies of these images, already built on a worker thread (:func:`prepare_cli_outputs`).
        ``moving_modality``: how this module chose the moving modality it passed; kept in the nodes' copy of
        the report as ``report["slicer"]["moving_modality"]`` (the summary names the DICOM database from it).
        """
        outputs = outputs or OutputNodes()
        _validate_outputs(outputs, reference_node, moving_node)
        for role in VOLUME_ROLES:
            image = getattr(result, role)
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                raise InputImageError(f"the '{role}' output is not a 3-D scalar image")
        if prepared is not None:
            grid_transform = prepared.grid_transform
        else:
            grid_transform = displacement_to_grid_transform(result.displacement)  # validates the field

        report = dict(getattr(result, "report", {}) or {})
        if moving_modality is not None:
            slicer_info = dict(report.get("slicer") or {})
            slicer_info["moving_modality"] = moving_modality.to_dict()
            report["slicer"] = slicer_info
        attributes = hierarchy.provenance_attributes(
            reference_node, moving_node, dict(options or {}), report, result.degradation, result.probabilities
        )
        base = moving_node.GetName() or "moving"
        ids_before = set(_node_ids(self.scene))
        folder_item: Optional[int] = None
        # Every output overwrites a node of one earlier run ("update the previous result"): keep that run's
        # folder, so a rerun adds nothing to the scene or the subject hierarchy.
        reused_folder = hierarchy.reusable_output_folder([outputs.get(role) for role in ROLES])
        if getattr(result, "restored", None) is None and outputs.get("restored") is not None:
            # this run has no restored output: the earlier run's restored node must not pass as this run's
            self.scene.RemoveNode(outputs.get("restored"))
        self.scene.StartState(slicer.vtkMRMLScene.BatchProcessState)
        try:
            nodes: Dict[str, Any] = {}
            for role in VOLUME_ROLES:
                existing = outputs.get(role)
                nodes[role] = image_to_volume_node(getattr(result, role), self.scene,
                                                   f"{base} {_NAME_SUFFIX[role]}", node=existing,
                                                   create_display_node=role in ("fused", "aligned"),
                                                   image_data=prepared.image_data.get(role) if prepared else None)
            transform_node = displacement_to_grid_transform_node(
                None, self.scene, f"{base} {_NAME_SUFFIX['displacement']}", node=outputs.get("displacement"),
                transform=grid_transform,
            )
            nodes["displacement"] = transform_node

            display.configure_intensity_display(nodes["fused"])
            display.configure_intensity_display(nodes["aligned"])
            if getattr(result, "restored", None) is not None:
                nodes["restored"] = image_to_volume_node(
                    result.restored, self.scene, f"{base} {_NAME_SUFFIX['restored']}", node=outputs.get("restored"),
                    create_display_node=True,
                    image_data=prepared.image_data.get("restored") if prepared else None)
                display.configure_intensity_display(nodes["restored"])
            for role in ("error_map", "error_map_before"):
                display.configure_colormap_display(nodes[role], display.ERROR_MAP_TABLE, _LEGEND_TITLE[role])
            display.configure_colormap_display(nodes["jacobian"], display.JACOBIAN_TABLE, _LEGEND_TITLE["jacobian"])
            display.show_deformation_grid(transform_node, reference_node, visible=False)

            for role, node in nodes.items():
                hierarchy.tag_node(node, role, attributes)
            if reused_folder is not None:
                hierarchy.update_output_folder(reused_folder, reference_node, moving_node, attributes, report)
                folder_item = reused_folder
            else:
                folder_item = hierarchy.create_output_folder(reference_node, moving_node, attributes, report)
            hierarchy.place_in_folder([nodes[r] for r in (*ROLES, *OPTIONAL_ROLES) if r in nodes], folder_item)
        except Exception:
            # Roll back: the folder item (when this call created it), then every node this call added
            # (outputs, display, legend, colour table and storage nodes).
            if folder_item is not None and folder_item != reused_folder:
                sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
                sh.RemoveItem(folder_item, False, False)
            for node_id in reversed([i for i in _node_ids(self.scene) if i not in ids_before]):
                node = self.scene.GetNodeByID(node_id)
                if node is not None:
                    self.scene.RemoveNode(node)
            raise
        finally:
            self.scene.EndState(slicer.vtkMRMLScene.BatchProcessState)
        return FusionNodes(
            reference=reference_node, moving=moving_node, folder_item=int(folder_item),
            degradation=str(result.degradation), probabilities=dict(result.probabilities), report=report, **nodes,
        )

    def show_result(
        self,
        nodes: FusionNodes,
        overlay: str = "fused",
        opacity: float = 0.5,
        show_grid: Optional[bool] = None,
        fit: bool = False,
    ) -> None:
        """Slice views: reference underneath, the ``overlay`` output on top with ``opacity``; legends of
        colour-mapped overlays visible; the deformation grid shown/hidden when ``show_grid`` is given.

        ``fit``: also rotate every slice view to the reference's closest axes (an oblique reference is shown
        in its own planes) and fit it to the reference (:func:`display.fit_slice_views`).
        """
        if overlay not in VOLUME_ROLES:
            raise ValueError(f"overlay must be one of {VOLUME_ROLES}; got {overlay!r}")
        display.show_slice_layers(
            self.scene, nodes.reference, nodes.node(overlay), opacity,
            legend_candidates=[nodes.node(r) for r in VOLUME_ROLES],
        )
        if show_grid is not None:
            display.show_deformation_grid(nodes.displacement, nodes.reference, visible=show_grid)
        if fit:
            logics = list(self.slice_logics() or []) if self.slice_logics is not None else []
            display.fit_slice_views(self.scene, nodes.reference, rotate=True, slice_logics=logics)

    def place_under_transform(self, nodes: FusionNodes) -> None:
        """Put the moving volume under the run's displacement transform, so Slicer shows it aligned (like
        SlicerElastix's output transform). Only on explicit request: the moving volume's voxels stay as they
        are, only its parent transform changes (undo: Transforms or Data module, or
        ``moving.SetAndObserveTransformNodeID(None)``).

        Raises:
            GeometryError: the moving volume is already under another transform (it would be replaced).
        """
        moving, transform = nodes.moving, nodes.displacement
        current = moving.GetParentTransformNode()
        if current is not None and current is not transform and unifuse_transform_parent(moving) is None:
            raise GeometryError(
                f"the moving volume '{moving.GetName()}' is already under the transform '{current.GetName()}'; it "
                f"was not placed under '{transform.GetName()}' (harden or remove its transform first)"
            )
        moving.SetAndObserveTransformNodeID(transform.GetID())

    def nodes_from_output(self, output_node: Any) -> Optional[FusionNodes]:
        """Rebuild the :class:`FusionNodes` of a run from any one of its output nodes (e.g. after a scene
        was saved and loaded): the run's nodes are the ones in the same subject-hierarchy folder carrying a
        ``UniFuse.Role`` attribute; the inputs come from the ``UniFuse.ReferenceID``/``MovingID`` attributes.

        Returns None when the node is not a UniFuse output or the run is incomplete (a node was deleted).
        """
        if output_node is None or output_node.GetAttribute(hierarchy.ROLE_ATTRIBUTE) not in ROLES + OPTIONAL_ROLES:
            return None
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        item = sh.GetItemByDataNode(output_node)
        folder = sh.GetItemParent(item) if item != sh.GetInvalidItemID() else sh.GetInvalidItemID()
        if folder in (sh.GetInvalidItemID(), sh.GetSceneItemID()):
            return None
        children = _item_children(sh, folder)
        nodes: Dict[str, Any] = {}
        for child in children:
            node = sh.GetItemDataNode(child)
            role = node.GetAttribute(hierarchy.ROLE_ATTRIBUTE) if node is not None else None
            if role in ROLES + OPTIONAL_ROLES and role not in nodes:
                nodes[role] = node
        reference = self.scene.GetNodeByID(output_node.GetAttribute("UniFuse.ReferenceID") or "")
        moving = self.scene.GetNodeByID(output_node.GetAttribute("UniFuse.MovingID") or "")
        if not set(ROLES) <= set(nodes) or reference is None or moving is None:
            return None
        report_text = sh.GetItemAttribute(folder, "UniFuse.Report")
        report = json.loads(report_text) if report_text else {}
        probabilities = json.loads(output_node.GetAttribute("UniFuse.Probabilities") or "{}")
        return FusionNodes(
            reference=reference, moving=moving, folder_item=int(folder),
            degradation=output_node.GetAttribute("UniFuse.Degradation") or "unknown",
            probabilities={k: float(v) for k, v in probabilities.items()}, report=report, **nodes,
        )

    # -- files (background process) ----------------------------------------------------------------------

    def export_inputs(
        self,
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        directory: Union[str, Path],
    ) -> Tuple[Path, Path]:
        """Write both inputs as NRRD (double-precision geometry, exact) into ``directory``.

        Returns:
            (reference path, moving path).
        """
        images = (input_image(reference_node, "reference"), input_image(moving_node, "moving"))
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / "reference.nrrd", directory / "moving.nrrd")
        for image, path in zip(images, paths):
            sitk.WriteImage(image, str(path), useCompression=False)
        return paths

    def load_cli_outputs(
        self,
        out_dir: Union[str, Path],
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        options: Optional[Mapping[str, Any]] = None,
        outputs: Optional[OutputNodes] = None,
        show: bool = True,
    ) -> FusionNodes:
        """Load the files a CLI run wrote into ``out_dir`` (:data:`OUTPUT_FILES` + ``report.json``) as nodes.

        Output grids equal to the reference grid within :data:`GRID_TOLERANCE` (NIfTI keeps geometry in
        float32) are snapped to the reference node's exact geometry.

        Raises:
            InputImageError: a file is missing or unreadable; GeometryError: an output is not on the
                reference grid. The scene is unchanged in both cases.
        """
        images, report = read_cli_outputs(out_dir)
        return self.add_cli_outputs(images, report, reference_node, moving_node, options, outputs, show)

    def add_cli_outputs(
        self,
        images: Mapping[str, sitk.Image],
        report: Mapping[str, Any],
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        options: Optional[Mapping[str, Any]] = None,
        outputs: Optional[OutputNodes] = None,
        show: bool = True,
    ) -> FusionNodes:
        """Add images read by :func:`read_cli_outputs` to the scene; see :meth:`load_cli_outputs`."""
        prepared = prepare_images(dict(images), dict(report), input_geometry(reference_node, "reference"))
        return self.add_prepared_outputs(prepared, reference_node, moving_node, options, outputs, show)

    def add_prepared_outputs(
        self,
        prepared: PreparedOutputs,
        reference_node: "slicer.vtkMRMLScalarVolumeNode",
        moving_node: "slicer.vtkMRMLScalarVolumeNode",
        options: Optional[Mapping[str, Any]] = None,
        outputs: Optional[OutputNodes] = None,
        show: bool = True,
        moving_modality: Optional[ModalityResolution] = None,
    ) -> FusionNodes:
        """Add outputs prepared by :func:`prepare_cli_outputs` (on a worker thread) to the scene; only the MRML
        part happens here, in the thread that owns the scene. ``moving_modality``: see :meth:`add_result`."""
        report = prepared.report
        degradation_info = report.get("degradation", {})
        result = FusionResult(
            degradation=str(degradation_info.get("used", "unknown")),
            probabilities={k: float(v) for k, v in degradation_info.get("probabilities", {}).items()},
            report=report,
            **prepared.images,
        )
        recorded = {**{k: v for k, v in (options or {}).items() if v is not None}, "mode": "background process"}
        nodes = self.add_result(result, reference_node, moving_node, recorded, outputs, prepared=prepared,
                                moving_modality=moving_modality)
        if show:
            self.show_result(nodes)
        return nodes


def prepare_cli_outputs(out_dir: Union[str, Path], reference_geometry: Tuple[Any, ...]) -> PreparedOutputs:
    """Everything about a CLI run's outputs that needs no scene, for a worker thread: read and decompress
    the files (:func:`read_cli_outputs`), put them on the exact reference grid (``reference_geometry`` from
    :func:`input_geometry`, taken in the GUI thread), build the RAS grid transform and the voxel copies."""
    images, report = read_cli_outputs(out_dir)
    return prepare_images(images, report, reference_geometry)


def prepare_images(images: Dict[str, sitk.Image], report: Dict[str, Any], reference_geometry: Tuple[Any, ...]) -> PreparedOutputs:
    """:func:`prepare_cli_outputs` for images already in memory (modified in place: snapped to the grid)."""
    snapped = {role: _snap_to_grid(images[role], reference_geometry, role) for role in IMAGE_OUTPUT_FILES
               if role in images}
    for role in VOLUME_ROLES:
        image = snapped[role]
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputImageError(f"the '{role}' output is not a 3-D scalar image")
    return PreparedOutputs(
        images=snapped,
        report=dict(report),
        grid_transform=displacement_to_grid_transform(snapped["displacement"]),
        image_data={role: image_data_from_image(snapped[role]) for role in (*VOLUME_ROLES, *OPTIONAL_ROLES)
                    if role in snapped},
    )


def read_cli_outputs(out_dir: Union[str, Path]) -> Tuple[Dict[str, sitk.Image], Dict[str, Any]]:
    """Read the files a CLI run wrote into ``out_dir`` (:data:`OUTPUT_FILES` + ``report.json``).

    Touches no MRML node, so it may run on a worker thread: SimpleITK releases the GIL while it reads and
    decompresses, and the GUI stays responsive (``BackgroundFusion`` does this).

    Raises:
        InputImageError: a file is missing or unreadable.
    """
    out_dir = Path(out_dir)
    required = [name for role, name in OUTPUT_FILES.items() if role not in OPTIONAL_ROLES] + [REPORT_FILE]
    missing = [name for name in required if not (out_dir / name).is_file()]
    if missing:
        raise InputImageError(f"the UniFuse run did not write {', '.join(missing)} into {out_dir}; see the log")
    images = {}
    for role, name in IMAGE_OUTPUT_FILES.items():
        if role in OPTIONAL_ROLES and not (out_dir / name).is_file():
            continue
        try:
            images[role] = sitk.ReadImage(str(out_dir / name))
        except RuntimeError as error:
            raise InputImageError(f"cannot read the {role} output {out_dir / name}: {error}") from error
    try:
        report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputImageError(f"cannot read {out_dir / REPORT_FILE}: {error}") from error
    return images, report


def _node_ids(scene: "slicer.vtkMRMLScene") -> List[str]:
    """IDs of all nodes of the scene, in scene order."""
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _item_children(sh: "slicer.vtkMRMLSubjectHierarchyNode", folder: int) -> List[int]:
    """Direct children of a subject-hierarchy item as a Python list of item IDs."""
    import vtk

    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder, ids, False)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _snap_to_grid(image: sitk.Image, grid: Union[sitk.Image, Tuple[Any, ...]], role: str) -> sitk.Image:
    """``image`` given the reference grid's exact origin/spacing/direction (in place: the images were just read
    for this, and copying 256^3 costs seconds); GeometryError if they differ beyond :data:`GRID_TOLERANCE`.

    ``grid``: an image, or ``(size, origin, spacing, direction)`` as from :func:`input_geometry`.
    """
    if isinstance(grid, sitk.Image):
        grid = (grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
    size, origin, spacing, direction = grid
    if tuple(image.GetSize()) != tuple(size):
        raise GeometryError(f"the {role} output has size {image.GetSize()} but the reference has {tuple(size)}; "
                            f"the output folder belongs to another reference volume")
    checks = {
        "origin": (image.GetOrigin(), origin),
        "spacing": (image.GetSpacing(), spacing),
        "direction": (image.GetDirection(), direction),
    }
    for what, (a, b) in checks.items():
        if not np.allclose(a, b, atol=GRID_TOLERANCE, rtol=0.0):
            raise GeometryError(f"the {role} output's {what} {tuple(np.round(a, 4))} differs from the reference's "
                                f"{tuple(np.round(b, 4))}; the output folder belongs to another reference volume")
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(direction))
    return image


# ------------------------------------------------------------------------------------------------------------
# background process


def core_package_parent() -> Path:
    """Folder that contains the ``unifuse`` package (the module folder inside Slicer); goes on PYTHONPATH."""
    import unifuse

    return Path(unifuse.__file__).resolve().parent.parent


def python_executable() -> str:
    """The interpreter for the background process: Slicer's ``PythonSlicer`` launcher when present (it sets
    up Slicer's Python environment), else the current interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def cli_environment(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment of the background process: ``base`` (default: ours) with the ``unifuse`` package's parent
    folder first on ``PYTHONPATH`` and unbuffered output (progress lines arrive as they are printed)."""
    env = dict(os.environ if base is None else base)
    parent = str(core_package_parent())
    existing = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = parent + (os.pathsep + existing if existing else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def build_cli_command(
    reference_path: Union[str, Path],
    moving_path: Union[str, Path],
    out_dir: Union[str, Path],
    options: Optional[FuseOptions] = None,
    overwrite: bool = False,
    python: Optional[str] = None,
) -> List[str]:
    """argv of ``python -m unifuse.cli fuse ... --machine-progress`` for one run.

    Args:
        reference_path, moving_path: input files; out_dir: output folder (the CLI writes :data:`OUTPUT_FILES`).
        options: :class:`unifuse.options.FuseOptions` (default: the CLI's defaults), turned into flags by
            :meth:`~unifuse.options.FuseOptions.to_cli_args`.
        overwrite: pass ``--overwrite``.
        python: interpreter; default :func:`python_executable`.
    """
    command = [
        python or python_executable(), "-m", "unifuse.cli", "fuse",
        "--reference", str(reference_path), "--moving", str(moving_path), "--out", str(out_dir),
        *(options or FuseOptions()).to_cli_args(),
    ]
    if overwrite:
        command.append("--overwrite")
    command.append("--machine-progress")
    return command


class BackgroundFusion:
    """One background run: export inputs -> CLI child process -> read outputs -> add nodes; poll from a GUI timer.

    ``poll()`` returns None while running, the :class:`FusionNodes` on success, and raises
    :class:`~unifuse.errors.UniFuseError` (or CancelledError) on failure. It never blocks: the child process
    tree runs on its own, the output files are read (and decompressed) on a worker thread, and only adding
    the nodes happens in the polling thread. The temporary folder (under Slicer's temporary folder, see
    :mod:`.workdir`) is removed when the run ends either way, unless ``keep_temporary_files``.
    Progress: 0-2 % export, 2-95 % the CLI's own fractions, 95-98 % reading the outputs, 98-100 % adding them.
    """

    def __init__(
        self,
        logic: FusionLogic,
        reference_node: Any,
        moving_node: Any,
        options: FuseOptions,
        on_progress: Optional[ProgressFn] = None,
        on_log: Optional[Callable[[str], None]] = None,
        outputs: Optional[OutputNodes] = None,
        python: Optional[str] = None,
        keep_temporary_files: bool = False,
        show: bool = True,
        moving_modality: Optional[ModalityResolution] = None,
    ) -> None:
        self.logic = logic
        self.reference_node = reference_node
        self.moving_node = moving_node
        self.options = options
        self.on_progress = on_progress
        self.on_log = on_log
        self.outputs = outputs
        self.python = python
        self.keep_temporary_files = keep_temporary_files
        self.show = show
        #: How the moving modality in ``options`` was chosen (:func:`resolve_moving_modality`); None: not known.
        self.moving_modality = moving_modality
        self.work_dir: Optional[Path] = None
        self.process: Optional[CliProcess] = None
        self.result: Optional[FusionNodes] = None
        self.finished = False
        self.cancel_requested = False
        self._fraction = 0.0
        self._reader: Optional[threading.Thread] = None
        self._prepared: Optional[PreparedOutputs] = None
        self._read_error: Optional[BaseException] = None

    def _progress(self, fraction: float, message: str) -> None:
        self._fraction = max(self._fraction, min(float(fraction), 1.0))  # never goes backwards
        if self.on_progress is not None:
            self.on_progress(self._fraction, message)

    def _log(self, text: str) -> None:
        if self.on_log is not None:
            self.on_log(text)

    def start(self) -> None:
        self.work_dir = make_work_dir()
        try:
            self._progress(0.0, "writing the input volumes")
            reference_path, moving_path = self.logic.export_inputs(self.reference_node, self.moving_node,
                                                                   self.work_dir / "inputs")
            command = build_cli_command(reference_path, moving_path, self.work_dir / "outputs", self.options,
                                        python=self.python)
            note = self.moving_modality.describe() if self.moving_modality is not None else None
            if note:
                self._log(note)
            self._log("Running: " + " ".join(command))
            if self.keep_temporary_files:
                self._log(f"Temporary files are kept in {self.work_dir}")
            self.process = CliProcess(
                command, env=cli_environment(), cwd=str(self.work_dir),
                on_progress=lambda f, m: self._progress(0.02 + 0.93 * f, m), on_log=self.on_log,
            )
            self.process.start()
        except Exception:
            self._cleanup()
            raise

    @property
    def running(self) -> bool:
        """True until :meth:`poll` has reported the end of the run."""
        return self.process is not None and not self.finished

    def poll(self) -> Optional[FusionNodes]:
        if self.finished:
            return self.result
        if self.process is None:
            raise RuntimeError("poll() before start()")
        if self._reader is None:
            code = self.process.poll()
            if code is None:
                return None
            try:
                if self.process.cancelled or self.cancel_requested:
                    raise CancelledError("cancelled by the user; the scene is unchanged")
                if code != 0:
                    raise UniFuseError(f"UniFuse failed: {self.process.error_message()}")
            except Exception:
                self._end()
                raise
            self._progress(0.95, "reading the outputs")
            try:
                geometry = input_geometry(self.reference_node, "reference")  # MRML: read here, in the GUI thread
            except Exception:
                self._end()
                raise
            self._reader = threading.Thread(target=self._read_outputs, args=(geometry,), daemon=True,
                                            name="UniFuse output reader")
            self._reader.start()
            return None
        if self._reader.is_alive():
            return None
        try:
            if self.cancel_requested:
                raise CancelledError("cancelled by the user; the scene is unchanged")
            if self._read_error is not None:
                raise self._read_error
            self._progress(0.98, "adding the outputs to the scene")
            self.result = self.logic.add_prepared_outputs(
                self._prepared, self.reference_node, self.moving_node,
                {**self.options.to_dict(), "mode": "background"}, self.outputs, show=self.show,
                moving_modality=self.moving_modality,
            )
            self._progress(1.0, "done")
            return self.result
        finally:
            self._end()

    def _read_outputs(self, geometry: Tuple[Any, ...]) -> None:
        """Worker thread: read, decompress, snap, build the grid transform and the voxel copies (no MRML)."""
        try:
            self._prepared = prepare_cli_outputs(self.work_dir / "outputs", geometry)
        except BaseException as error:  # noqa: BLE001 - handed to the polling thread
            self._read_error = error

    def cancel(self) -> None:
        """Stop the child process tree without waiting; the next :meth:`poll` calls raise CancelledError once
        it has ended (or, while the outputs are being read, once reading stopped) and nothing is added."""
        if self.finished:
            return
        self.cancel_requested = True
        if self.process is not None:
            self.process.cancel()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> FusionNodes:
        """Poll until the run ends (for scripts and tests); raises like :meth:`poll`."""
        import time

        start = time.monotonic()
        while True:
            nodes = self.poll()
            if nodes is not None:
                return nodes
            if timeout is not None and time.monotonic() - start > timeout:
                self.cancel()
                try:
                    while self.poll() is None:
                        time.sleep(interval)
                except CancelledError:
                    pass
                raise UniFuseError(f"the UniFuse process did not finish within {timeout} s and was stopped")
            time.sleep(interval)

    def _end(self) -> None:
        self.finished = True
        self._prepared = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self.work_dir is None:
            return
        if self.keep_temporary_files:
            self._log(f"Temporary files kept in {self.work_dir} (developer setting)")
            return
        remove_work_dir(self.work_dir)
