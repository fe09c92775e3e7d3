"""Offscreen PNG snapshots of UniFuse outputs, drawn by Slicer's own displayable managers.

Uses ``trame-slicer``'s :class:`~trame_slicer.views.SliceView` (a Slicer slice view: slice logic, layer
blending, ``vtkMRMLTransformsDisplayableManager2D`` for the deformation grid and
``vtkMRMLColorLegendDisplayableManager`` for colour legends) in a VTK render window that is never shown.
Without an X display, VTK renders through EGL (``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``, set here
when ``DISPLAY`` is empty and nothing else was chosen).

Three snapshots describe a run (:func:`snapshot_fusion`):

* ``overlay.png``   reference (background) + fused volume (foreground, given opacity);
* ``grid.png``      reference + the displacement as a deformed grid (lines bend where the field is non-zero);
* ``error_map.png`` reference + the after-alignment error map in its colour table, with its legend.

A view adds a slice node and a slice composite node to the scene while it exists; :meth:`OffscreenSliceView.close`
(or leaving the ``with`` block) removes them again, so a snapshot leaves the scene as it found it (apart
from the display state it was asked to show, which :func:`snapshot_fusion` restores).

Known limitation of Slicer's colour-legend displayable manager: it creates legend actors only for legend
nodes *added after* the view exists, and finds its view's slice composite node only when the scene ends a
batch process (as in the Slicer GUI, whose views exist from startup). Views created here therefore
re-announce existing legend nodes to the new view (a ``NodeAddedEvent`` per legend node) and run one empty
batch-process cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

if not os.environ.get("DISPLAY") and "VTK_DEFAULT_OPENGL_WINDOW" not in os.environ:
    os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"

import vtk  # noqa: E402
from vtkmodules.util import numpy_support  # noqa: E402

import slicer  # noqa: E402

from . import display  # noqa: E402

__all__ = ["application_logic", "OffscreenSliceView", "snapshot_fusion", "write_png"]

_APP_LOGICS: Dict[int, "slicer.vtkSlicerApplicationLogic"] = {}


def application_logic(scene: "slicer.vtkMRMLScene") -> "slicer.vtkSlicerApplicationLogic":
    """A Slicer application logic bound to ``scene`` (created once per scene) and registered with the
    slice-view displayable-manager factory.

    The factory is a process-wide singleton, so only one scene at a time can be rendered this way.
    """
    key = id(scene)
    app_logic = _APP_LOGICS.get(key)
    if app_logic is None or app_logic.GetMRMLScene() is not scene:
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        app_logic.GetColorLogic().SetMRMLScene(scene)
        if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
            app_logic.GetColorLogic().AddDefaultColorNodes()
        app_logic.SetSliceLogics(vtk.vtkCollection())
        app_logic.SetViewLogics(vtk.vtkCollection())
        if scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0 and not _has_orientation_presets(scene):
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        _APP_LOGICS[key] = app_logic
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    return app_logic


def _has_orientation_presets(scene: "slicer.vtkMRMLScene") -> bool:
    default_slice = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    return default_slice is not None and default_slice.GetNumberOfSliceOrientationPresets() > 0


def write_png(rgb: np.ndarray, path: Union[str, Path]) -> Path:
    """Write an (H, W, 3) uint8 image (row 0 = top) as PNG with VTK's writer; returns the path."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3|4) uint8 image; got {rgb.shape} {rgb.dtype}")
    height, width, channels = rgb.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    flat = np.ascontiguousarray(rgb[::-1]).reshape(-1, channels)  # VTK rows start at the bottom
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return path


class OffscreenSliceView:
    """One Slicer slice view of ``scene`` rendered offscreen.

    Args:
        scene: the MRML scene to draw.
        orientation: ``"Axial"``, ``"Coronal"`` or ``"Sagittal"`` (radiological: patient right on screen left).
        size: (width, height) in pixels.
        name: layout name of the view (its slice node's singleton tag); must not clash with existing views.
            Default: ``UniFuseSnapshot`` followed by a number that makes it unique in the scene.
        app_logic: application logic of the scene (default: :func:`application_logic`).
    """

    def __init__(
        self,
        scene: "slicer.vtkMRMLScene",
        orientation: str = "Axial",
        size: Tuple[int, int] = (512, 512),
        name: Optional[str] = None,
        app_logic: Optional["slicer.vtkSlicerApplicationLogic"] = None,
    ) -> None:
        from trame_slicer.views import NoScheduleRendering, SliceView

        if orientation not in ("Axial", "Coronal", "Sagittal"):
            raise ValueError(f"orientation must be Axial, Coronal or Sagittal; got {orientation!r}")
        self.scene = scene
        self.app_logic = app_logic or application_logic(scene)
        existing = {scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName()
                    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))}
        if name is None:
            name = next(f"UniFuseSnapshot{i}" for i in range(1, len(existing) + 2) if f"UniFuseSnapshot{i}" not in existing)
        if name in existing:
            raise ValueError(f"the scene already has a slice view named {name!r}; choose another name")
        self.view = SliceView(scene, self.app_logic, name, scheduled_render_strategy=NoScheduleRendering())
        self.slice_node = self.view.get_view_node()
        self.slice_logic = self.app_logic.GetSliceLogic(self.slice_node)
        self.composite_node = self.slice_logic.GetSliceCompositeNode()
        self.slice_node.SetOrientation(orientation)
        self.size = (int(size[0]), int(size[1]))
        self.view.render_window().SetSize(*self.size)
        self.view.update_size(*self.size)
        self._announce_existing_legends()

    def _announce_existing_legends(self) -> None:
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode")):
            legend = self.scene.GetNthNodeByClass(i, "vtkMRMLColorLegendDisplayNode")
            self.scene.InvokeEvent(slicer.vtkMRMLScene.NodeAddedEvent, legend)
        # An (empty) batch-process cycle makes the displayable managers run UpdateFromMRMLScene, which is where
        # the legend manager looks up this view's slice composite node (to show legends of visible volumes).
        self.scene.StartState(slicer.vtkMRMLScene.BatchProcessState)
        self.scene.EndState(slicer.vtkMRMLScene.BatchProcessState)

    # -- content ----------------------------------------------------------------------------------------

    def show(
        self,
        background: Optional["slicer.vtkMRMLVolumeNode"],
        foreground: Optional["slicer.vtkMRMLVolumeNode"] = None,
        opacity: float = 0.5,
        center_ras: Optional[Sequence[float]] = None,
    ) -> None:
        """Set the layers of this view, fit the field of view to the background and centre the slice.

        Args:
            background, foreground: volumes (None clears a layer); opacity: foreground opacity in [0, 1].
            center_ras: RAS point (mm) the slice passes through and is centred on; default the centre of the
                background volume.
        """
        if not 0.0 <= float(opacity) <= 1.0:
            raise ValueError(f"foreground opacity must be in [0, 1]; got {opacity}")
        self.composite_node.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        self.composite_node.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        self.composite_node.SetForegroundOpacity(float(opacity))
        display.refresh_legends(self.scene)
        self.view.fit_view_to_content()
        if center_ras is None and background is not None:
            bounds = [0.0] * 6
            background.GetRASBounds(bounds)
            center_ras = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        if center_ras is not None:
            self.slice_node.JumpSliceByCentering(*[float(c) for c in center_ras])

    def set_foreground_opacity(self, opacity: float) -> None:
        if not 0.0 <= float(opacity) <= 1.0:
            raise ValueError(f"foreground opacity must be in [0, 1]; got {opacity}")
        self.composite_node.SetForegroundOpacity(float(opacity))

    def capture(self) -> np.ndarray:
        """Render now and return the view as an (H, W, 3) uint8 array, row 0 at the top."""
        render_window = self.view.render_window()
        self.view.render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(render_window)
        grabber.SetInputBufferTypeToRGB()
        grabber.ReadFrontBufferOff()
        grabber.Update()
        image = grabber.GetOutput()
        width, height, _ = image.GetDimensions()
        rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(rgb[::-1, :, :3])

    def save_png(self, path: Union[str, Path]) -> Path:
        """Render and write the view to ``path`` (PNG)."""
        return write_png(self.capture(), path)

    def pixel_to_ras(self) -> np.ndarray:
        """(H, W, 3) RAS coordinates (mm) of the pixel centres of :meth:`capture`'s array (row 0 = top)."""
        width, height = self.size
        xy_to_ras = np.array([[self.slice_node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        cols, rows = np.meshgrid(np.arange(width), np.arange(height))
        xy = np.stack([cols, height - 1 - rows, np.zeros_like(cols), np.ones_like(cols)], axis=-1).astype(float)
        return (xy @ xy_to_ras.T)[..., :3]

    # -- lifetime ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the render window and remove this view's slice and composite nodes from the scene."""
        if self.view is None:
            return
        self.view.finalize()
        self.app_logic.GetSliceLogics().RemoveItem(self.slice_logic)
        self.slice_logic.SetMRMLScene(None)
        for node in (self.composite_node, self.slice_node):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.view = None

    def __enter__(self) -> "OffscreenSliceView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def snapshot_fusion(
    nodes: "logic.FusionNodes",  # noqa: F821
    out_dir: Union[str, Path],
    size: Tuple[int, int] = (512, 512),
    opacity: float = 0.5,
    orientation: str = "Axial",
) -> Dict[str, Path]:
    """Write ``overlay.png``, ``grid.png`` and ``error_map.png`` of one run into ``out_dir``.

    The transform display and legend visibility are restored afterwards.

    Returns:
        {"overlay": path, "grid": path, "error_map": path}.
    """
    out_dir = Path(out_dir)
    transform_display = nodes.displacement.GetDisplayNode()
    grid_was_visible = bool(transform_display.GetVisibility2D() and transform_display.GetVisibility()) \
        if transform_display is not None else False
    legend_states = {role: _legend_visible(nodes.node(role)) for role in ("error_map", "error_map_before", "jacobian")}
    paths: Dict[str, Path] = {}
    with OffscreenSliceView(nodes.reference.GetScene(), orientation=orientation, size=size) as view:
        display.show_deformation_grid(nodes.displacement, nodes.reference, visible=False)
        view.show(nodes.reference, nodes.fused, opacity)
        paths["overlay"] = view.save_png(out_dir / "overlay.png")

        display.show_deformation_grid(nodes.displacement, nodes.reference, visible=True)
        view.show(nodes.reference, None, 0.0)
        paths["grid"] = view.save_png(out_dir / "grid.png")
        display.show_deformation_grid(nodes.displacement, nodes.reference, visible=grid_was_visible)

        display.set_legend_visible(nodes.error_map, True)
        view.show(nodes.reference, nodes.error_map, 1.0)
        paths["error_map"] = view.save_png(out_dir / "error_map.png")
    for role, visible in legend_states.items():
        display.set_legend_visible(nodes.node(role), visible)
    return paths


def _legend_visible(volume_node: "slicer.vtkMRMLVolumeNode") -> bool:
    return any(legend.GetVisibility() for legend in display.legend_display_nodes(volume_node))
