"""Markups line nodes <-> lesion records in RAS mm, blinded volume nodes and linked views (slicer-core)."""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is needed for the scene tests")
vtk = pytest.importorskip("vtk")

from LesionReaderLib import ReaderSession  # noqa: E402
from LesionReaderLib import mrml_bridge as bridge  # noqa: E402

LONG = ((-12.5, 30.0, 4.0), (-2.5, 30.0, 4.0))
SHORT = ((-7.5, 27.0, 4.0), (-7.5, 33.0, 4.0))


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    scene.AddNode(slicer.vtkMRMLSelectionNode())  # measurements look up length units here
    return scene


def test_lines_to_record_and_back_in_ras_mm(scene, make_study, clock):
    session = ReaderSession.open(make_study(n_cases=2), "R1", "T1c", clock=clock)
    # The reader draws the long axis, then the short one (what the widget's "add lesion" does).
    long_node = bridge.new_axis_node(scene, bridge.LONG, "drawing long")
    short_node = bridge.new_axis_node(scene, bridge.SHORT, "drawing short")
    with pytest.raises(bridge.SceneError, match="0 of 2 points placed"):
        bridge.line_endpoints(long_node)
    long_node.AddControlPointWorld(vtk.vtkVector3d(*LONG[0]))
    long_node.AddControlPointWorld(vtk.vtkVector3d(*LONG[1]))
    bridge.set_line_endpoints(short_node, SHORT)
    assert long_node.GetLineLengthWorld() == pytest.approx(10.0)

    lesion_id = session.add_lesion(*bridge.axes_from_nodes(long_node, short_node))
    bridge.tag_lesion(long_node, short_node, lesion_id, 1)
    [record] = session.lesions()
    assert record.long_axis == LONG and record.short_axis == SHORT
    assert long_node.GetName() == "L1 long" and short_node.GetAttribute(bridge.ATTR_LESION_ID) == str(lesion_id)

    # Reopening the case rebuilds the same lines from the records.
    assert bridge.clear_lesion_nodes(scene) == 2
    pairs = bridge.show_lesions(scene, session.lesions())
    rebuilt_long, rebuilt_short = pairs[lesion_id]
    assert bridge.line_endpoints(rebuilt_long) == LONG and bridge.line_endpoints(rebuilt_short) == SHORT
    assert rebuilt_long.GetLineLengthWorld() == pytest.approx(record.long_mm)
    assert rebuilt_short.GetLineLengthWorld() == pytest.approx(record.short_mm)
    assert bridge.lesion_node_pairs(scene) == pairs
    session.close()


def test_world_coordinates_follow_parent_transform(scene):
    """Records are world RAS: a line under a translation is stored where the reader sees it."""
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)
    transform.SetMatrixTransformToParent(matrix)
    node = bridge.new_axis_node(scene, bridge.LONG, "moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    bridge.set_line_endpoints(node, LONG)  # world positions
    world = bridge.line_endpoints(node)
    assert world[0] == pytest.approx(LONG[0]) and world[1] == pytest.approx(LONG[1])
    local = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, local)
    assert local == pytest.approx([LONG[0][0] - 100.0, LONG[0][1], LONG[0][2]])


def test_moved_points_are_written_back_or_rejected(scene, make_study, clock):
    session = ReaderSession.open(make_study(n_cases=2), "R1", "T1c", clock=clock)
    lesion_id = session.add_lesion(LONG, SHORT)
    long_node, short_node = bridge.show_lesions(scene, session.lesions())[lesion_id]
    long_node.SetNthControlPointPositionWorld(1, 7.5, 30.0, 4.0)  # drag the end: 20 mm
    assert bridge.sync_lesions_to_session(scene, session) == {"updated": [lesion_id], "rejected": []}
    assert session.lesions()[0].long_mm == pytest.approx(20.0)
    short_node.SetNthControlPointPositionWorld(1, 30.0, 30.0, 4.0)  # now nearly parallel to the long axis
    assert bridge.sync_lesions_to_session(scene, session) == {"updated": [], "rejected": [lesion_id]}
    assert bridge.line_endpoints(short_node) == SHORT  # put back where it was stored
    session.close()


def test_blinded_volume_nodes(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "PAT1001_DOE t1c")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName("/data/PAT1001_DOE/t1c.nii.gz")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    volume.SetDescription("PAT1001_DOE")
    bridge.blind_volume_node(scene, volume, "Case 07", "T1c-pro")
    assert volume.GetName() == "Case 07 T1c-pro"
    assert volume.GetStorageNode() is None and scene.GetNodesByClass("vtkMRMLVolumeArchetypeStorageNode").GetNumberOfItems() == 0
    assert volume.GetAttribute("DICOM.instanceUIDs") is None and not volume.GetDescription()
    assert bridge.reading_volume_nodes(scene) == [volume]
    assert bridge.clear_reading_volumes(scene) == 1


def test_phase_layout_and_linked_views(scene):
    xml = bridge.phase_layout_xml(3)
    assert xml.count("<view ") == 3 and xml.count("Axial") == 3
    assert all(f'singletontag="{name}"' in xml for name in bridge.VIEW_NAMES)
    with pytest.raises(bridge.SceneError, match="1 to 3 volumes"):
        bridge.phase_layout_xml(4)
    for name in bridge.VIEW_NAMES:
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    volumes = [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"v{i}") for i in range(2)]
    assert bridge.assign_views(scene, [v.GetID() for v in volumes]) == ["Red", "Yellow"]
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    by_view = {composites.GetItemAsObject(i).GetLayoutName(): composites.GetItemAsObject(i) for i in range(3)}
    assert by_view["Red"].GetBackgroundVolumeID() == volumes[0].GetID()
    assert by_view["Yellow"].GetBackgroundVolumeID() == volumes[1].GetID()
    assert by_view["Red"].GetLinkedControl() and by_view["Yellow"].GetLinkedControl()


def test_load_blinded_volume_from_a_study(scene, make_study, clock):
    session = ReaderSession.open(make_study(n_cases=2), "R1", "T1c", clock=clock)
    nodes = [bridge.load_blinded_volume(scene, path, session.case_label, name) for name, path in session.volumes().items()]
    assert [n.GetName() for n in nodes] == ["Case 01 T1c", "Case 01 T2-FLAIR"]
    assert nodes[0].GetImageData().GetDimensions() == (6, 5, 4)
    for node in nodes:
        assert node.GetStorageNode() is None
    for i in range(scene.GetNumberOfNodes()):  # no file name left anywhere in the scene
        other = scene.GetNthNode(i)
        assert "nii" not in (other.GetName() or "") and "PAT" not in (other.GetName() or "")
    with pytest.raises(bridge.SceneError, match="could not read"):
        bridge.load_blinded_volume(scene, "/nonexistent/x.nii.gz", "Case 01", "T1c")
    session.close()
