"""MRML bridge under the slicer-core wheel: exact round trips on an oblique, anisotropic volume.

The reference for "right" is independent of the bridge: the geometry is written down by hand
(rotation, spacing, origin in RAS) and Slicer's own NRRD reader (vtkMRMLVolumeArchetypeStorageNode
from slicer-core) reads a file that SimpleITK wrote.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from ContrastAmplifierLib import mrml_bridge  # noqa: E402

SIZE_IJK = (7, 9, 5)  # i, j, k: all different so a transposed axis cannot pass
SPACING = np.array([0.7, 1.3, 3.1])  # anisotropic
ORIGIN_RAS = np.array([12.5, -30.25, 47.0])


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


ROTATION_RAS = _rotation(0.3, -0.5, 1.1)  # oblique on all three axes


def expected_ijk_to_ras() -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = ROTATION_RAS @ np.diag(SPACING)
    matrix[:3, 3] = ORIGIN_RAS
    return matrix


def expected_ras(ijk) -> np.ndarray:
    return ORIGIN_RAS + ROTATION_RAS @ (SPACING * np.asarray(ijk, dtype=float))


def _voxels(dtype) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = SIZE_IJK[::-1]
    if np.issubdtype(dtype, np.floating):
        values = rng.normal(0, 1000, shape)
        values.flat[0] = np.pi * 1e-30  # a value float rounding would lose
        return values.astype(dtype)
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    values.flat[-1] = info.min
    return values


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def make_node(scene, dtype=np.int16, name="oblique"):
    """Build the node by hand (not through the bridge) from the written-down geometry."""
    array = _voxels(dtype)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(SIZE_IJK)
    from vtk.util import numpy_support

    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, expected_ijk_to_ras()[r, c])
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(image_data)
    return node, array


def node_array(node) -> np.ndarray:
    from vtk.util import numpy_support

    dims = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])


def ras_from_sitk(image, ijk) -> np.ndarray:
    lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))
    return lps * np.array([-1.0, -1.0, 1.0])


CORNERS = [(0, 0, 0), (6, 0, 0), (0, 8, 0), (0, 0, 4), (6, 8, 4), (3, 5, 2)]
DTYPES = [np.int16, np.uint8, np.float32, np.float64, np.int32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_node_to_sitk_geometry_values_and_dtype(scene, dtype):
    node, array = make_node(scene, dtype)
    image = mrml_bridge.volume_node_to_sitk(node)
    assert image.GetSize() == SIZE_IJK
    got = sitk.GetArrayFromImage(image)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, array)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, rtol=0, atol=1e-12)
    for ijk in CORNERS:
        np.testing.assert_allclose(ras_from_sitk(image, ijk), expected_ras(ijk), rtol=0, atol=1e-9)
        assert image[ijk] == array[ijk[2], ijk[1], ijk[0]]
    # LPS origin: x and y negated, z kept
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN_RAS * [-1, -1, 1], atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_node_sitk_node(scene, dtype):
    node, array = make_node(scene, dtype)
    back = mrml_bridge.add_volume_node_from_sitk(mrml_bridge.volume_node_to_sitk(node), "back", scene=scene)
    assert back.GetName() == "back" and back.GetScene() is scene
    got = node_array(back)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, array)
    np.testing.assert_allclose(mrml_bridge.ijk_to_ras_matrix(back), expected_ijk_to_ras(), rtol=0, atol=1e-12)
    assert back.GetDisplayNode() is not None


def test_round_trip_sitk_node_sitk(scene):
    rng = np.random.default_rng(3)
    array = rng.integers(-2000, 3000, size=SIZE_IJK[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING.tolist())
    lps_rotation = np.diag([-1.0, -1.0, 1.0]) @ ROTATION_RAS
    image.SetDirection(lps_rotation.ravel().tolist())
    image.SetOrigin((ORIGIN_RAS * [-1, -1, 1]).tolist())
    node = mrml_bridge.add_volume_node_from_sitk(image, "from-itk", scene=scene)
    np.testing.assert_allclose(mrml_bridge.ijk_to_ras_matrix(node), expected_ijk_to_ras(), atol=1e-12)
    again = mrml_bridge.volume_node_to_sitk(node)
    assert sitk.GetArrayFromImage(again).dtype == np.int16
    assert np.array_equal(sitk.GetArrayFromImage(again), array)
    np.testing.assert_allclose(again.GetOrigin(), image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(again.GetSpacing(), image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(again.GetDirection(), image.GetDirection(), atol=1e-12)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_through_file_written_by_simpleitk(scene, tmp_path, suffix):
    node, array = make_node(scene, np.int16)
    path = mrml_bridge.export_volume_node(node, tmp_path / f"t1c{suffix}")
    # NIfTI keeps the orientation as float32 quaternions; NRRD/MHA keep doubles.
    atol = 1e-4 if suffix == ".nii.gz" else 1e-9
    loaded = mrml_bridge.import_volume_file(path, "T1c result", scene=scene)
    assert loaded.GetName() == "T1c result"
    got = node_array(loaded)
    assert got.dtype == np.int16 and np.array_equal(got, array)
    for ijk in CORNERS:
        np.testing.assert_allclose(mrml_bridge.voxel_to_ras(loaded, ijk), expected_ras(ijk), rtol=0, atol=atol)
    # The voxel at a given RAS point holds the same value in both nodes.
    ijk = (5, 2, 3)
    ras_to_ijk = np.linalg.inv(mrml_bridge.ijk_to_ras_matrix(loaded))
    found = np.rint(ras_to_ijk @ np.append(expected_ras(ijk), 1.0))[:3].astype(int)
    assert tuple(found) == ijk and got[ijk[2], ijk[1], ijk[0]] == array[ijk[2], ijk[1], ijk[0]]


def test_slicer_own_reader_agrees(scene, tmp_path):
    """Slicer's NRRD reader (not the bridge) places SimpleITK's file where the bridge says."""
    node, array = make_node(scene, np.float32)
    path = mrml_bridge.export_volume_node(node, tmp_path / "flair.nrrd")
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "slicer-read")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(reference)
    assert np.array_equal(node_array(reference), array)
    for ijk in CORNERS:
        np.testing.assert_allclose(mrml_bridge.voxel_to_ras(reference, ijk), expected_ras(ijk), atol=1e-6)


def test_export_many_and_parent_transform(scene, tmp_path):
    node, array = make_node(scene, np.int16)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    paths = mrml_bridge.export_volume_nodes({"t1": node, "t1c": node}, tmp_path / "case", suffix=".nrrd")
    assert sorted(p.name for p in paths.values()) == ["t1.nrrd", "t1c.nrrd"]
    image = sitk.ReadImage(str(paths["t1"]))
    np.testing.assert_allclose(ras_from_sitk(image, (0, 0, 0)), ORIGIN_RAS + [10.0, 0, 0], atol=1e-9)
    local = mrml_bridge.volume_node_to_sitk(node, world=False)
    np.testing.assert_allclose(ras_from_sitk(local, (0, 0, 0)), ORIGIN_RAS, atol=1e-9)


def test_clear_errors(scene, tmp_path):
    with pytest.raises(mrml_bridge.VolumeNodeError, match="select a volume"):
        mrml_bridge.volume_node_to_sitk(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(mrml_bridge.VolumeNodeError, match="'empty' has no voxel data"):
        mrml_bridge.volume_node_to_sitk(empty)
    with pytest.raises(mrml_bridge.VolumeNodeError, match="No volume selected for 'adc'"):
        mrml_bridge.export_volume_nodes({"adc": None}, tmp_path)
    with pytest.raises(FileNotFoundError, match="was not written"):
        mrml_bridge.import_volume_file(tmp_path / "missing.nii.gz", "x", scene=scene)


def test_import_into_existing_node_and_labelmap(scene, tmp_path):
    node, array = make_node(scene, np.uint8)
    path = mrml_bridge.export_volume_node(node, tmp_path / "mask.nrrd")
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "old name")
    same = mrml_bridge.import_volume_file(path, "new name", scene=scene, node=target)
    assert same is target and target.GetName() == "new name"
    label = mrml_bridge.import_volume_file(path, "mask", scene=scene, label_map=True)
    assert label.IsA("vtkMRMLLabelMapVolumeNode") and np.array_equal(node_array(label), array)
