"""MRML volume nodes <-> SimpleITK images, and files exchanged with the Lib's child processes.

The only module of ContrastAmplifierLib that touches MRML. It needs ``slicer`` (MRML classes:
the ``slicer-core`` wheel is enough) and ``vtk``; never ``qt``, ``ctk`` or
``slicer.ScriptedLoadableModule``, so it runs in tests, in Slicer batch mode and in the GUI.

Conventions (why the sign flips exist):

* Slicer stores a volume's geometry in its IJK-to-RAS matrix; the ``vtkImageData`` inside the
  node has origin 0 and spacing 1 by convention. RAS = Right, Anterior, Superior.
* ITK/SimpleITK (and DICOM, NIfTI readers through ITK) use LPS = Left, Posterior, Superior.
  LPS and RAS differ by negating the first two world axes: ``RAS = diag(-1, -1, 1) @ LPS``.
* Voxel order is the same on both sides: the numpy array from either is indexed ``[k, j, i]``
  (slowest to fastest), with ``i`` the fastest-varying column index.

Round trips node -> image -> node and image -> node -> image keep voxel values bit for bit
(the pixel type is never converted) and geometry to floating-point precision.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

PathLike = Union[str, os.PathLike]

#: Negates the first two world axes: maps LPS to RAS and back (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Volume node classes that hold one scalar per voxel.
SCALAR_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode")


class VolumeNodeError(ValueError):
    """A volume node cannot be converted; the message names the node and the fix."""


def _node_label(node: object) -> str:
    name = node.GetName() if hasattr(node, "GetName") else None
    return f"volume '{name}'" if name else "volume"


def _matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_matrix(node: slicer.vtkMRMLScalarVolumeNode, world: bool = True) -> np.ndarray:
    """Return the 4x4 matrix that maps the node's voxel-array indices (i, j, k) to RAS millimetres.

    Folds in what Slicer usually keeps trivial (image-data origin, spacing and extent start) so
    the result is right even for volumes built by hand; with ``world`` it also applies the
    node's parent linear transform, i.e. where the user sees the volume.

    Args:
        node: a scalar (or label map) volume node with image data.
        world: include the parent transform chain (must be linear).

    Raises:
        VolumeNodeError: the node has a non-linear parent transform.
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _matrix_to_array(ijk_to_ras)
    image = node.GetImageData()
    if image is not None:
        extent = image.GetExtent()
        index_to_ijk = np.eye(4)
        index_to_ijk[:3, :3] = np.diag(image.GetSpacing())
        start = np.array([extent[0], extent[2], extent[4]], dtype=float)
        index_to_ijk[:3, 3] = np.asarray(image.GetOrigin()) + np.asarray(image.GetSpacing()) * start
        matrix = matrix @ index_to_ijk
    transform_node = node.GetParentTransformNode() if world else None
    if transform_node is not None:
        if not transform_node.IsTransformToWorldLinear():
            raise VolumeNodeError(
                f"{_node_label(node)} is under a non-linear transform ('{transform_node.GetName()}'); "
                "harden the transform (Data module: right-click > Harden transform) before running."
            )
        to_world = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToWorld(to_world)
        matrix = _matrix_to_array(to_world) @ matrix
    return matrix


def _geometry_from_ijk_to_ras(matrix: np.ndarray):
    """Split an IJK-to-RAS matrix into ITK (LPS) origin, spacing and row-major direction."""
    lps = LPS_TO_RAS @ matrix
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(axes)):
        raise VolumeNodeError(f"IJK-to-RAS matrix is degenerate (voxel spacing {spacing.tolist()}); fix the volume geometry.")
    direction = axes / spacing
    return tuple(lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def volume_node_to_sitk(node: slicer.vtkMRMLScalarVolumeNode, world: bool = True) -> sitk.Image:
    """Copy a scalar volume node into a SimpleITK image with the same geometry and pixel type.

    Args:
        node: ``vtkMRMLScalarVolumeNode`` (or label map) holding a 3D image.
        world: place the image where the user sees it (apply the parent linear transform).

    Returns:
        A new image (LPS physical space, as ITK expects); voxel values are copied bit for bit.

    Raises:
        VolumeNodeError: no node, no image data, several components per voxel, or a non-linear
            parent transform.
    """
    if node is None:
        raise VolumeNodeError("No volume node given; select a volume in the module's input selector.")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise VolumeNodeError(f"{_node_label(node)} has no voxel data; load the image again (File > Add Data).")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise VolumeNodeError(
            f"{_node_label(node)} has {image_data.GetNumberOfScalarComponents()} components per voxel; "
            "a scalar (grey-level) volume is required (use Vector to Scalar Volume first)."
        )
    dims = image_data.GetDimensions()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    array = np.array(array.reshape(dims[2], dims[1], dims[0]), copy=True)
    image = sitk.GetImageFromArray(array, isVector=False)
    origin, spacing, direction = _geometry_from_ijk_to_ras(ijk_to_ras_matrix(node, world=world))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def sitk_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """Return the 4x4 IJK-to-RAS matrix of a 3D SimpleITK image (LPS geometry flipped to RAS)."""
    if image.GetDimension() != 3:
        raise VolumeNodeError(f"Image is {image.GetDimension()}D; a 3D volume is required.")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def update_volume_node_from_sitk(node: slicer.vtkMRMLScalarVolumeNode, image: sitk.Image) -> slicer.vtkMRMLScalarVolumeNode:
    """Replace the voxels and geometry of ``node`` with those of ``image`` (pixel type kept).

    The node's parent transform, if any, is left in place (the image geometry becomes the
    node's local IJK-to-RAS matrix).
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeNodeError(
            f"Image for {_node_label(node)} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar image is required."
        )
    matrix = sitk_ijk_to_ras(image)
    array = sitk.GetArrayFromImage(image)  # [k, j, i], a copy, native dtype
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(scalars)
    node.SetIJKToRASMatrix(_array_to_matrix(matrix))
    node.SetAndObserveImageData(image_data)
    return node


def _scene(scene: Optional[slicer.vtkMRMLScene]) -> slicer.vtkMRMLScene:
    if scene is not None:
        return scene
    app_scene = getattr(slicer, "mrmlScene", None)
    if app_scene is None:
        raise VolumeNodeError("No MRML scene: pass scene=... (outside the Slicer application there is no slicer.mrmlScene).")
    return app_scene


def add_volume_node_from_sitk(
    image: sitk.Image,
    name: str,
    scene: Optional[slicer.vtkMRMLScene] = None,
    node: Optional[slicer.vtkMRMLScalarVolumeNode] = None,
    node_class: str = "vtkMRMLScalarVolumeNode",
) -> slicer.vtkMRMLScalarVolumeNode:
    """Put ``image`` into the scene as a volume node called ``name`` (or into ``node`` if given).

    Args:
        image: a 3D scalar SimpleITK image (LPS geometry).
        name: node name shown in Slicer (made unique by the scene if needed when creating).
        scene: target scene; default ``slicer.mrmlScene``.
        node: existing node to overwrite (keeps its ID, display and parent transform).
        node_class: class for a new node (scalar or label map volume).

    Returns:
        The node, with default display nodes created.
    """
    if node_class not in SCALAR_VOLUME_CLASSES:
        raise VolumeNodeError(f"node_class must be one of {SCALAR_VOLUME_CLASSES}, got {node_class!r}.")
    if node is None:
        node = _scene(scene).AddNewNodeByClass(node_class, name)
    else:
        node.SetName(name)
    update_volume_node_from_sitk(node, image)
    if node.GetScene() is not None and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def export_volume_node(node: slicer.vtkMRMLScalarVolumeNode, path: PathLike, compress: bool = True) -> Path:
    """Write a volume node to ``path`` (format from the suffix: .nrrd, .nii.gz, .mha...) for a child process.

    NRRD and MHA keep geometry in double precision; NIfTI stores the orientation as float32
    (about 1e-7 relative), which is fine for processing but not for exact comparisons.
    """
    from .imageio import write_image_atomic

    return write_image_atomic(volume_node_to_sitk(node), path, compress=compress)


def export_volume_nodes(nodes: Mapping[str, slicer.vtkMRMLScalarVolumeNode], folder: PathLike, suffix: str = ".nii.gz") -> dict[str, Path]:
    """Write several nodes as ``folder/<key><suffix>`` (e.g. ``t1.nii.gz``, the Lib's case layout).

    Args:
        nodes: file stem (``"t1"``, ``"flair"``...) -> volume node.
        folder: created if missing.
        suffix: file suffix including the dot.

    Returns:
        stem -> written path.

    Raises:
        VolumeNodeError: a node is missing; the message names the key so the user knows which selector is empty.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, node in nodes.items():
        if node is None:
            raise VolumeNodeError(f"No volume selected for '{key}'; choose it in the module's input selectors.")
        try:
            written[key] = export_volume_node(node, folder / f"{key}{suffix}")
        except VolumeNodeError as exc:
            raise VolumeNodeError(f"{key}: {exc}") from exc
    return written


def import_volume_file(
    path: PathLike,
    name: str,
    scene: Optional[slicer.vtkMRMLScene] = None,
    node: Optional[slicer.vtkMRMLScalarVolumeNode] = None,
    label_map: bool = False,
) -> slicer.vtkMRMLScalarVolumeNode:
    """Load an image file written by a child process into the scene as a node called ``name``.

    The file's pixel type and geometry are kept (no intensity cast), so the result lands in
    the same RAS space as the inputs it was computed from.

    Raises:
        FileNotFoundError: the child process did not write ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Result file {path} was not written; see the process log above for the cause.")
    image = sitk.ReadImage(str(path))
    return add_volume_node_from_sitk(
        image, name, scene=scene, node=node,
        node_class="vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode",
    )


def voxel_to_ras(node: slicer.vtkMRMLScalarVolumeNode, ijk, world: bool = True) -> np.ndarray:
    """RAS position (mm) of voxel index ``ijk = (i, j, k)`` of ``node``."""
    return (ijk_to_ras_matrix(node, world=world) @ np.array([*map(float, ijk), 1.0]))[:3]


@dataclass
class ExchangeFolder:
    """A temporary folder for files exchanged with a child process; removed by :meth:`cleanup`.

    Attributes:
        path: the folder (inside the system temporary folder unless ``parent`` was given).
    """

    path: Path

    @classmethod
    def create(cls, prefix: str = "ContrastAmplifier-", parent: Optional[PathLike] = None) -> ExchangeFolder:
        """Make a fresh empty folder."""
        return cls(Path(tempfile.mkdtemp(prefix=prefix, dir=None if parent is None else str(parent))))

    def cleanup(self) -> None:
        """Remove the folder and everything in it (safe to call twice)."""
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
