"""SimpleITK images <-> MRML scalar volume nodes, with exact geometry.

Conventions:

* A ``SimpleITK.Image`` lives in **LPS** millimetres: the voxel with index (i, j, k) sits at
  ``p_lps = o + D @ diag(s) @ (i, j, k)`` (origin ``o``, direction cosines ``D`` with columns = image axes,
  spacing ``s``).
* A ``vtkMRMLScalarVolumeNode`` lives in **RAS** millimetres: ``p_ras = IJKToRAS @ (i, j, k, 1)``.
  Hence ``IJKToRAS = diag(-1, -1, 1, 1) @ [[D @ diag(s), o], [0, 1]]``: origin and direction are flipped by
  ``LPS_TO_RAS = diag(-1, -1, 1)``, spacing is unchanged.
* Voxel arrays are numpy (z, y, x) = (K, J, I) in both worlds (``sitk.GetArrayFromImage`` and VTK's
  x-fastest point order agree), so values are copied without any transposition.

Origin, spacing and direction are written to the node separately (``SetOrigin``/``SetSpacing``/
``SetIJKToRASDirections``), never through a composed 4x4 matrix that would have to be decomposed again,
so a round trip image -> node -> image is exact to the last bit for oblique, anisotropic grids (MRML itself
flushes direction cosines below ~1e-10 and origin components below ~1e-20 mm to zero).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
import vtk
from vtkmodules.util import numpy_support

from unifuse.errors import GeometryError, InputImageError
from unifuse.geometry import LPS_TO_RAS

__all__ = [
    "LPS_TO_RAS",
    "image_ras_geometry",
    "image_to_volume_node",
    "update_volume_node_from_image",
    "volume_node_to_image",
    "volume_node_geometry",
    "volume_node_ijk_to_ras",
    "image_data_from_image",
    "vtk_matrix_from_array",
    "array_from_vtk_matrix",
]


def vtk_matrix_from_array(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    """A ``vtkMatrix4x4`` holding a (4, 4) or (3, 3) numpy matrix (a 3x3 goes into the upper-left block)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"expected a 3x3 or 4x4 matrix; got shape {m.shape}")
    out = vtk.vtkMatrix4x4()
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            out.SetElement(r, c, float(m[r, c]))
    return out


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """The (4, 4) float64 numpy copy of a ``vtkMatrix4x4``."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def image_ras_geometry(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS geometry of a 3-D SimpleITK image.

    Returns:
        ``(origin_ras (3,), spacing (3,), direction_ras (3, 3))`` in mm; the columns of ``direction_ras`` are
        the RAS unit vectors of the i, j, k image axes.
    """
    if image.GetDimension() != 3:
        raise InputImageError(
            f"a {image.GetDimension()}-D image cannot become a Slicer volume here; UniFuse works on 3-D volumes "
            f"(stack 2-D slices into a 3-D image first)"
        )
    origin = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = LPS_TO_RAS @ np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return origin, spacing, direction


def _check_scalar(image: sitk.Image) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel; only scalar volumes "
            f"become vtkMRMLScalarVolumeNodes (displacement fields go through transforms.py)"
        )
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputImageError("complex-valued images cannot be shown as Slicer scalar volumes; take the magnitude first")


def image_data_from_image(image: sitk.Image) -> vtk.vtkImageData:
    """A new ``vtkImageData`` holding a copy of a 3-D scalar image's voxels (no geometry, no MRML).

    Touches no scene, so it may run on a worker thread: a background run prepares its outputs' voxel copies
    there and the GUI thread only hands them to the nodes (:func:`update_volume_node_from_image`).
    """
    _check_scalar(image)
    return _image_data_from_array(sitk.GetArrayViewFromImage(image))


def _image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """A new ``vtkImageData`` with dimensions (x, y, z) owning a copy of a (z, y, x) scalar array."""
    nz, ny, nx = array.shape
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(nx, ny, nz)
    flat = np.ascontiguousarray(array).reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def update_volume_node_from_image(
    node: "vtkMRMLScalarVolumeNode",  # noqa: F821
    image: sitk.Image,
    image_data: Optional[vtk.vtkImageData] = None,
) -> None:
    """Replace the voxels and geometry of ``node`` with ``image`` (values copied, pixel type kept).

    ``image_data``: the voxels already copied by :func:`image_data_from_image` (e.g. on a worker thread);
    they must be ``image``'s. The node's display node, storage node, parent transform and attributes are left
    as they are.
    """
    origin, spacing, direction = image_ras_geometry(image)
    _check_scalar(image)
    if image_data is None:
        image_data = _image_data_from_array(sitk.GetArrayViewFromImage(image))  # copied into VTK once
    elif tuple(image_data.GetDimensions()) != tuple(image.GetSize()):
        raise ValueError("the prepared voxels do not belong to this image")
    was_modifying = node.StartModify()
    try:
        node.SetOrigin(*origin.tolist())
        node.SetSpacing(*spacing.tolist())
        node.SetIJKToRASDirections(*(float(v) for v in direction.reshape(-1)))
        node.SetAndObserveImageData(image_data)
    finally:
        node.EndModify(was_modifying)


def image_to_volume_node(
    image: sitk.Image,
    scene: "vtkMRMLScene",  # noqa: F821
    name: str,
    node: Optional["vtkMRMLScalarVolumeNode"] = None,  # noqa: F821
    create_display_node: bool = True,
    image_data: Optional[vtk.vtkImageData] = None,
) -> "vtkMRMLScalarVolumeNode":  # noqa: F821
    """Put a 3-D scalar SimpleITK image into ``scene`` as a volume node.

    Args:
        image: 3-D scalar image, LPS mm (any real pixel type; the type is kept).
        scene: the MRML scene.
        name: name of a new node (made unique in the scene); ignored when ``node`` is given.
        node: an existing scalar volume node to overwrite; None creates a new one.
        create_display_node: give a new node Slicer's default display node (grey, auto window/level).
        image_data: the voxels already copied by :func:`image_data_from_image`.

    Returns:
        The (new or updated) ``vtkMRMLScalarVolumeNode`` whose IJKToRAS is
        ``diag(-1, -1, 1, 1) @ [[D @ diag(s), o], [0, 1]]`` of the image.
    """
    # Validate before anything touches the scene.
    image_ras_geometry(image)
    _check_scalar(image)
    created = node is None
    if created:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    try:
        update_volume_node_from_image(node, image, image_data)
        if created and create_display_node:
            node.CreateDefaultDisplayNodes()
    except Exception:
        if created:
            scene.RemoveNode(node)
        raise
    return node


def volume_node_ijk_to_ras(node: "vtkMRMLVolumeNode", world: bool = True) -> np.ndarray:  # noqa: F821
    """The (4, 4) IJK -> RAS matrix of a volume node.

    With ``world=True`` the node's parent transforms are included (what Slicer displays); they must then
    be linear, otherwise :class:`~unifuse.errors.GeometryError` asks the user to harden them.
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = array_from_vtk_matrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if world and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise GeometryError(
                f"volume '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; harden the "
                f"transform first (Data module: right-click the volume -> Harden transform) or remove it"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = array_from_vtk_matrix(to_world) @ matrix
    return matrix


def volume_node_to_image(node: "vtkMRMLScalarVolumeNode", world: bool = True) -> sitk.Image:  # noqa: F821
    """Copy a scalar volume node into a new 3-D SimpleITK image (LPS mm; the node is not modified).

    Args:
        node: a ``vtkMRMLScalarVolumeNode`` (or subclass) holding single-component image data.
        world: include linear parent transforms in the geometry (the volume as Slicer shows it).

    Returns:
        Image with the node's pixel type; origin ``LPS_TO_RAS @ t``, spacing = column norms and direction =
        ``LPS_TO_RAS @`` normalised columns of the (world) IJKToRAS matrix ``[[A, t], [0, 1]]``.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if node is None else node.GetClassName()
        raise InputImageError(f"expected a scalar volume node, got {kind}; select a scalar volume")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise InputImageError(f"volume '{node.GetName()}' has no voxel data; load or compute the volume first")
    scalars = image_data.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputImageError(
            f"volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel; UniFuse "
            f"needs a scalar volume (convert colour/vector volumes to scalar first)"
        )
    nx, ny, nz = image_data.GetDimensions()
    if min(nx, ny, nz) < 2:
        raise InputImageError(
            f"volume '{node.GetName()}' is {nx}x{ny}x{nz} voxels; UniFuse needs a 3-D volume with at least two "
            f"voxels along every axis"
        )
    array = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx).copy()
    origin_lps, spacing, direction_lps = _lps_geometry(node, world)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(origin_lps)
    image.SetSpacing(spacing)
    image.SetDirection(direction_lps)
    return image


def volume_node_geometry(node: "vtkMRMLScalarVolumeNode", world: bool = True) -> Tuple[Tuple[int, ...], Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:  # noqa: F821,E501
    """``(size, origin, spacing, direction)`` in LPS, exactly as :func:`volume_node_to_image` would set them,
    without copying the voxels (e.g. to check an output grid against the reference on another thread)."""
    image_data = node.GetImageData() if node is not None else None
    if image_data is None:
        raise InputImageError("the volume has no voxel data; load or compute the volume first")
    return (tuple(int(d) for d in image_data.GetDimensions()), *_lps_geometry(node, world))


def _lps_geometry(node, world: bool):
    matrix = volume_node_ijk_to_ras(node, world=world)
    if not world or node.GetParentTransformNode() is None:
        # Exact path: read the stored geometry instead of decomposing the composed matrix.
        spacing = np.asarray(node.GetSpacing(), dtype=np.float64)
        direction_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(direction_ras)
        direction = array_from_vtk_matrix(direction_ras)[:3, :3]
        origin = np.asarray(node.GetOrigin(), dtype=np.float64)
    else:
        columns = matrix[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise GeometryError(f"volume '{node.GetName()}' has a degenerate IJKToRAS matrix (zero spacing)")
        direction = columns / spacing
        origin = matrix[:3, 3]
    return (tuple((LPS_TO_RAS @ origin).tolist()), tuple(spacing.tolist()),
            tuple((LPS_TO_RAS @ direction).reshape(-1).tolist()))
