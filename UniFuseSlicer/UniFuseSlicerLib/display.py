"""How UniFuse outputs look in Slicer: slice layers, colour tables, legends and the deformation grid.

Everything here works on a bare ``vtkMRMLScene`` (no Qt): it only sets MRML display properties, which the
Slicer GUI (or trame-slicer's views, see :mod:`rendering`) then draws.

* Slice views: background = reference, foreground = one UniFuse output (fused by default) with an opacity;
  set on every ``vtkMRMLSliceCompositeNode`` of the scene (one per slice view).
* Colour tables (created once per scene, identified by the ``UniFuse.ColorTable`` attribute):
  - alignment error (values in [0, 1]): a dark-purple -> orange -> yellow ramp whose alpha rises from 0, so
    low error stays see-through and the reference shows underneath;
  - Jacobian determinant, window [0, 2]: blue = compression (det < 1), transparent = volume preserved
    (det = 1), green = expansion (det > 1), opaque red = folding (det <= 0: the first table entry, into which
    Slicer's window mapping also puts values up to about 0.004).
* Colour legends (``vtkMRMLColorLegendDisplayNode``) next to the colour-mapped volumes; only the legend of
  the volume shown in the foreground is visible.
* Deformation grid: the transform node's display node in grid mode over the reference volume's region,
  drawn in the slice views (2D) where it bends wherever the field is non-zero.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

import slicer

__all__ = [
    "COLOR_TABLE_ATTRIBUTE",
    "ERROR_MAP_TABLE",
    "JACOBIAN_TABLE",
    "ERROR_MAP_RANGE",
    "JACOBIAN_RANGE",
    "ensure_color_table",
    "configure_intensity_display",
    "configure_colormap_display",
    "slice_composite_nodes",
    "show_slice_layers",
    "set_foreground_opacity",
    "set_legend_visible",
    "refresh_legends",
    "legend_display_nodes",
    "show_deformation_grid",
    "default_grid_spacing_mm",
    "slice_nodes",
    "fit_slice_views",
]

COLOR_TABLE_ATTRIBUTE = "UniFuse.ColorTable"
ERROR_MAP_TABLE = "error"
JACOBIAN_TABLE = "jacobian"
#: Display window (min, max) of the error maps: the core's maps are in [0, 1].
ERROR_MAP_RANGE: Tuple[float, float] = (0.0, 1.0)
#: Display window (min, max) of the Jacobian-determinant map; 1 (no volume change) sits in the middle.
JACOBIAN_RANGE: Tuple[float, float] = (0.0, 2.0)
_TABLE_SIZE = 256
_TABLE_NAMES = {ERROR_MAP_TABLE: "UniFuse alignment error", JACOBIAN_TABLE: "UniFuse Jacobian determinant"}


def _interpolate(anchors: Sequence[Tuple[float, Tuple[float, float, float, float]]], t: np.ndarray) -> np.ndarray:
    """RGBA at positions ``t`` (N,) in [0, 1], piecewise linear between (position, rgba) anchors -> (N, 4)."""
    positions = np.array([p for p, _ in anchors])
    colours = np.array([c for _, c in anchors])
    return np.stack([np.interp(t, positions, colours[:, ch]) for ch in range(4)], axis=1)


def _error_map_rgba() -> np.ndarray:
    """(256, 4) RGBA of the alignment-error table (index 0 = error 0, index 255 = error 1)."""
    t = np.linspace(0.0, 1.0, _TABLE_SIZE)
    rgba = _interpolate(
        [
            (0.00, (0.10, 0.02, 0.25, 0.0)),
            (0.25, (0.40, 0.05, 0.55, 0.85)),
            (0.50, (0.80, 0.20, 0.35, 1.0)),
            (0.75, (0.98, 0.55, 0.10, 1.0)),
            (1.00, (1.00, 0.95, 0.35, 1.0)),
        ],
        t,
    )
    return rgba


def _jacobian_rgba() -> np.ndarray:
    """(256, 4) RGBA of the Jacobian table over :data:`JACOBIAN_RANGE`; entry 0 is folding red."""
    t = np.linspace(0.0, 1.0, _TABLE_SIZE)  # t = det / 2
    rgba = _interpolate(
        [
            (0.0, (0.05, 0.15, 0.75, 1.0)),  # strong compression
            (0.5, (1.00, 1.00, 1.00, 0.0)),  # det = 1: volume preserved, see-through
            (1.0, (0.05, 0.60, 0.20, 1.0)),  # strong expansion
        ],
        t,
    )
    rgba[0] = (1.0, 0.0, 0.0, 1.0)  # det <= 0: folding
    return rgba


def ensure_color_table(scene: "slicer.vtkMRMLScene", kind: str) -> "slicer.vtkMRMLColorTableNode":
    """The scene's UniFuse colour table of ``kind`` (``"error"`` or ``"jacobian"``), created on first use."""
    if kind not in _TABLE_NAMES:
        raise ValueError(f"unknown colour table {kind!r}; use {ERROR_MAP_TABLE!r} or {JACOBIAN_TABLE!r}")
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(COLOR_TABLE_ATTRIBUTE) == kind:
            return node
    rgba = _error_map_rgba() if kind == ERROR_MAP_TABLE else _jacobian_rgba()
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(scene.GenerateUniqueName(_TABLE_NAMES[kind]))
    table.SetTypeToUser()
    table.SetNumberOfColors(len(rgba))
    for index, (r, g, b, a) in enumerate(rgba):
        table.SetColor(index, f"{index}", float(r), float(g), float(b), float(a))
    table.SetAttribute(COLOR_TABLE_ATTRIBUTE, kind)
    table.SetAttribute("Category", "UniFuse")
    scene.AddNode(table)
    return table


def _display_node(volume_node: "slicer.vtkMRMLScalarVolumeNode") -> "slicer.vtkMRMLScalarVolumeDisplayNode":
    """The volume's display node; a new one has automatic window/level *off* (``CreateDefaultDisplayNodes``
    would first compute a histogram of the whole volume, seconds at 256^3, for a window set right after)."""
    if volume_node.GetDisplayNode() is None:
        scene = volume_node.GetScene()
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.AutoWindowLevelOff()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        volume_node.SetAndObserveDisplayNodeID(display.GetID())
    return volume_node.GetDisplayNode()


def configure_intensity_display(volume_node: "slicer.vtkMRMLScalarVolumeNode") -> "slicer.vtkMRMLScalarVolumeDisplayNode":
    """Grey colour table with automatic window/level (fused and aligned volumes)."""
    display = _display_node(volume_node)
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOn()
    return display


def configure_colormap_display(
    volume_node: "slicer.vtkMRMLScalarVolumeNode",
    kind: str,
    title: str,
) -> Tuple["slicer.vtkMRMLScalarVolumeDisplayNode", "slicer.vtkMRMLColorLegendDisplayNode"]:
    """Give an error-map / Jacobian volume its UniFuse colour table, fixed window and a colour legend.

    Args:
        volume_node: the map (values: error in [0, 1], or det J).
        kind: ``"error"`` or ``"jacobian"`` (see :func:`ensure_color_table`).
        title: legend title, e.g. ``"Alignment error (after)"``.

    Returns:
        (display node, legend display node); the legend starts hidden (see :func:`set_legend_visible`).
    """
    scene = volume_node.GetScene()
    table = ensure_color_table(scene, kind)
    display = _display_node(volume_node)
    display.SetAndObserveColorNodeID(table.GetID())
    display.AutoWindowLevelOff()
    low, high = ERROR_MAP_RANGE if kind == ERROR_MAP_TABLE else JACOBIAN_RANGE
    display.SetWindowLevelMinMax(low, high)
    display.SetInterpolate(False)  # show the map's voxels as they are
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        # Slicer's Colors module registers this class at startup; a bare slicer-core scene does not.
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volume_node)
    if legend is None:
        raise RuntimeError(f"Slicer could not create a colour legend for '{volume_node.GetName()}'")
    legend.SetTitleText(title)
    legend.SetLabelFormat("%.2f")
    legend.SetVisibility(False)
    return display, legend


def legend_display_nodes(volume_node: Optional["slicer.vtkMRMLVolumeNode"]) -> List["slicer.vtkMRMLColorLegendDisplayNode"]:
    """The colour-legend display nodes of a volume (empty for None or volumes without a legend)."""
    if volume_node is None:
        return []
    displays = [volume_node.GetNthDisplayNode(i) for i in range(volume_node.GetNumberOfDisplayNodes())]
    return [d for d in displays if d is not None and d.IsA("vtkMRMLColorLegendDisplayNode")]


def set_legend_visible(volume_node: Optional["slicer.vtkMRMLScalarVolumeNode"], visible: bool) -> None:
    """Show or hide the colour legend(s) of a volume (no-op for volumes without a legend).

    The legend node is marked modified even when its visibility does not change: Slicer's legend manager
    re-checks which volumes the slice views show only then (programmatic layer changes do not trigger it).
    """
    for legend in legend_display_nodes(volume_node):
        legend.SetVisibility(bool(visible))
        legend.Modified()


def refresh_legends(scene: "slicer.vtkMRMLScene") -> None:
    """Let the views re-evaluate every colour legend after slice layers changed (Slicer's legend manager
    shows a legend only while its volume is in a slice view, but checks that only when the legend changes)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLColorLegendDisplayNode").Modified()


def slice_composite_nodes(scene: "slicer.vtkMRMLScene") -> List["slicer.vtkMRMLSliceCompositeNode"]:
    """All slice composite nodes of the scene (one per slice view: Red, Yellow, Green, ...)."""
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def show_slice_layers(
    scene: "slicer.vtkMRMLScene",
    background: Optional["slicer.vtkMRMLVolumeNode"],
    foreground: Optional["slicer.vtkMRMLVolumeNode"],
    opacity: float,
    legend_candidates: Sequence[Optional["slicer.vtkMRMLVolumeNode"]] = (),
) -> List["slicer.vtkMRMLSliceCompositeNode"]:
    """Background/foreground volumes and foreground opacity in every slice view.

    Args:
        scene: the MRML scene.
        background: shown underneath (the reference); None clears the layer.
        foreground: shown on top (fused / aligned / an error map); None clears the layer.
        opacity: foreground opacity in [0, 1].
        legend_candidates: volumes whose legends should be hidden unless they are the foreground.

    Returns:
        The slice composite nodes that were set.
    """
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"foreground opacity must be in [0, 1]; got {opacity}")
    composites = slice_composite_nodes(scene)
    for composite in composites:
        was_modifying = composite.StartModify()
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.EndModify(was_modifying)
    for node in legend_candidates:
        set_legend_visible(node, node is not None and node is foreground)
    set_legend_visible(foreground, True)
    refresh_legends(scene)
    return composites


def set_foreground_opacity(scene: "slicer.vtkMRMLScene", opacity: float) -> None:
    """Foreground opacity in [0, 1] of every slice view."""
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"foreground opacity must be in [0, 1]; got {opacity}")
    for composite in slice_composite_nodes(scene):
        composite.SetForegroundOpacity(float(opacity))


def default_grid_spacing_mm(region_node: "slicer.vtkMRMLVolumeNode", lines: int = 12) -> float:
    """Grid line spacing (mm) giving about ``lines`` lines across the largest extent of the region."""
    bounds = [0.0] * 6
    region_node.GetRASBounds(bounds)
    extent = max(bounds[1] - bounds[0], bounds[3] - bounds[2], bounds[5] - bounds[4])
    if extent <= 0:
        raise ValueError(f"region '{region_node.GetName()}' has an empty extent")
    return float(extent / max(int(lines), 1))


def show_deformation_grid(
    transform_node: "slicer.vtkMRMLTransformNode",
    region_node: "slicer.vtkMRMLVolumeNode",
    visible: bool = True,
    spacing_mm: Optional[float] = None,
) -> "slicer.vtkMRMLTransformDisplayNode":
    """Show (or hide) the transform as a deformed grid over the reference region in the slice views.

    Args:
        transform_node: the UniFuse grid transform node.
        region_node: volume whose extent the grid covers (the reference).
        visible: grid visibility in 2D (slice views); the 3D view is left off (a 3D grid hides anatomy).
        spacing_mm: grid line spacing; default ~12 lines across the region (:func:`default_grid_spacing_mm`).

    Returns:
        The transform display node (visualisation mode grid, region = ``region_node``).
    """
    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    display = transform_node.GetDisplayNode()
    was_modifying = display.StartModify()
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetAndObserveRegionNode(region_node)
    display.SetGridSpacingMm(float(spacing_mm) if spacing_mm else default_grid_spacing_mm(region_node))
    display.SetGridShowNonWarped(False)
    display.SetVisibility2D(bool(visible))
    display.SetVisibility3D(False)
    display.SetVisibility(bool(visible))
    display.EndModify(was_modifying)
    return display



def slice_nodes(scene: "slicer.vtkMRMLScene") -> List["slicer.vtkMRMLSliceNode"]:
    """All slice nodes of the scene (one per 2-D view)."""
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))
    ]


def _volume_ras_corners(volume_node: "slicer.vtkMRMLVolumeNode") -> np.ndarray:
    """(8, 3) RAS positions of the outer corners of the volume's voxel grid (world: with parent transforms)."""
    import vtk

    dims = volume_node.GetImageData().GetDimensions()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    parent = volume_node.GetParentTransformNode()
    if parent is not None and parent.IsTransformToWorldLinear():
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)]) @ matrix
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, dims[0] - 0.5) for j in (-0.5, dims[1] - 0.5)
                        for k in (-0.5, dims[2] - 0.5)])
    return (matrix @ corners.T).T[:, :3]


def fit_slice_views(
    scene: "slicer.vtkMRMLScene",
    volume_node: "slicer.vtkMRMLVolumeNode",
    rotate: bool = True,
    slice_logics: Sequence["slicer.vtkMRMLSliceLogic"] = (),
) -> List["slicer.vtkMRMLSliceNode"]:
    """Rotate every slice view to the volume's closest axes and fit it to the whole volume.

    Rotation (``vtkMRMLSliceNode.RotateToVolumePlane``) keeps an oblique reference from being shown as a
    tilted, clipped slab. The fit uses Slicer's own ``vtkMRMLSliceLogic.FitSliceToVolume`` for views that
    have a slice logic in ``slice_logics`` (in Slicer: the layout manager's), and otherwise the same
    computation on the slice node: field of view = the volume's extent across the view (keeping the view's
    aspect ratio), centred on the volume, one slice thick.

    Returns:
        The slice nodes that were changed.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        return []
    logics = {}
    for logic in slice_logics or ():
        node = logic.GetSliceNode() if logic is not None else None
        if node is not None:
            logics[node.GetID()] = logic
    corners = _volume_ras_corners(volume_node)
    center = 0.5 * (corners.min(axis=0) + corners.max(axis=0))
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    columns = np.array([[ijk_to_ras.GetElement(r, c) for c in range(3)] for r in range(3)])  # voxel axes (RAS mm)
    nodes = slice_nodes(scene)
    for slice_node in nodes:
        was_modifying = slice_node.StartModify()
        if rotate:
            slice_node.RotateToVolumePlane(volume_node)
        width, height = [max(int(d), 1) for d in slice_node.GetDimensions()[:2]]
        logic = logics.get(slice_node.GetID())
        if logic is not None:
            logic.FitSliceToVolume(volume_node, width, height)
        else:
            slice_to_ras = slice_node.GetSliceToRAS()
            axes = np.array([[slice_to_ras.GetElement(r, c) for c in range(3)] for r in range(3)])
            extent = (corners - center) @ axes  # corners in slice axes (x, y, normal)
            fov_x, fov_y = (extent.max(axis=0) - extent.min(axis=0))[:2]
            if fov_x * height > fov_y * width:
                fov_y = fov_x * height / width
            else:
                fov_x = fov_y * width / height
            for row in range(3):
                slice_to_ras.SetElement(row, 3, float(center[row]))
            slice_node.SetXYZOrigin(0.0, 0.0, 0.0)
            # one voxel thick: the spacing of the volume axis closest to the view's normal
            lengths = np.linalg.norm(columns, axis=0)
            closest = int(np.argmax(np.abs(axes[:, 2] @ (columns / lengths))))
            thickness = lengths[closest]
            slice_node.SetFieldOfView(float(fov_x), float(fov_y), float(thickness))
            slice_node.UpdateMatrices()
        slice_node.EndModify(was_modifying)
    return nodes
