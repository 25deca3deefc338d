"""The scene side of a reading: markups line nodes <-> lesion records, blinded volumes, layouts.

Paper, "Reader study protocol": readers "marked the major and minor axes of all visible
enhancing lesions" with an annotation tool "specifically developed for this study to minimize
the annotation burden". In Slicer each axis is one ``vtkMRMLMarkupsLineNode``; a lesion is a
(long, short) pair tagged with the lesion's database id. Coordinates are world RAS in mm (the
node's control points after any parent transform), exactly what :class:`ReaderSession` stores.

Only ``slicer`` MRML classes and ``vtk`` are used (no Qt, no ``slicer.app``), so everything here
runs under the ``slicer-core`` wheel in tests; the module widget adds the GUI around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import slicer
import vtk

from .session import LesionRecord
from .study import Axis

#: Attributes set on lesion line nodes.
ATTR_ROLE = "LesionReader.Role"  # "long" | "short"
ATTR_LESION_ID = "LesionReader.LesionId"  # database id; absent while the lesion is being drawn
ATTR_VOLUME = "LesionReader.Volume"  # on blinded volume nodes: the phase volume name (T1c, T2-FLAIR...)

LONG, SHORT = "long", "short"
#: Display colours: long axis yellow, short axis cyan (distinct from Slicer's default red).
AXIS_COLORS = {LONG: (1.0, 0.85, 0.1), SHORT: (0.1, 0.85, 1.0)}
#: Slice views used by the reading layouts, in order (existing Slicer views, all set to axial).
VIEW_NAMES = ("Red", "Yellow", "Green")
#: Layout ids registered by the module: one per number of views shown.
LAYOUT_ID_BASE = 7400


class SceneError(ValueError):
    """A scene object does not have the expected shape; the message names it and the fix."""


def line_endpoints(node: slicer.vtkMRMLMarkupsLineNode) -> Axis:
    """The two end points of a line node in world RAS mm.

    Raises:
        SceneError: the line does not have both points placed.
    """
    defined = node.GetNumberOfDefinedControlPoints() if hasattr(node, "GetNumberOfDefinedControlPoints") else node.GetNumberOfControlPoints()
    if node.GetNumberOfControlPoints() < 2 or defined < 2:
        raise SceneError(f"line '{node.GetName()}' has {defined} of 2 points placed; click both ends of the axis")
    points = []
    for i in range(2):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        points.append((float(p[0]), float(p[1]), float(p[2])))
    return points[0], points[1]


def set_line_endpoints(node: slicer.vtkMRMLMarkupsLineNode, axis: Axis) -> None:
    """Place (or move) both points of a line node at ``axis`` (world RAS mm)."""
    (p1, p2) = axis
    was_modifying = node.StartModify()
    try:
        while node.GetNumberOfControlPoints() < 2:
            node.AddControlPointWorld(vtk.vtkVector3d(0.0, 0.0, 0.0))
        node.SetNthControlPointPositionWorld(0, float(p1[0]), float(p1[1]), float(p1[2]))
        node.SetNthControlPointPositionWorld(1, float(p2[0]), float(p2[1]), float(p2[2]))
    finally:
        node.EndModify(was_modifying)


def new_axis_node(scene: slicer.vtkMRMLScene, role: str, name: str, axis: Optional[Axis] = None) -> slicer.vtkMRMLMarkupsLineNode:
    """Add a line node for a lesion axis (``role`` ``"long"`` or ``"short"``), optionally placed at ``axis``."""
    if role not in (LONG, SHORT):
        raise SceneError(f"axis role must be 'long' or 'short', got {role!r}")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name)
    node.SetAttribute(ATTR_ROLE, role)
    node.CreateDefaultDisplayNodes()  # needs the markups logic (present in Slicer, absent under slicer-core)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*AXIS_COLORS[role])
        display.SetColor(*AXIS_COLORS[role])
        display.SetPointLabelsVisibility(False)  # the lesion list names lesions; labels only clutter the views
    if axis is not None:
        set_line_endpoints(node, axis)
    return node


def tag_lesion(long_node: slicer.vtkMRMLMarkupsLineNode, short_node: slicer.vtkMRMLMarkupsLineNode, lesion_id: int, number: int) -> None:
    """Mark a (long, short) node pair as lesion ``lesion_id`` and name it ``L<number> long/short``."""
    for node, role in ((long_node, LONG), (short_node, SHORT)):
        node.SetAttribute(ATTR_LESION_ID, str(int(lesion_id)))
        node.SetAttribute(ATTR_ROLE, role)
        node.SetName(f"L{number} {role}")


def axes_from_nodes(long_node: slicer.vtkMRMLMarkupsLineNode, short_node: slicer.vtkMRMLMarkupsLineNode) -> tuple[Axis, Axis]:
    """``(long_axis, short_axis)`` in world RAS mm, ready for ``ReaderSession.add_lesion``."""
    return line_endpoints(long_node), line_endpoints(short_node)


def lesion_node_pairs(scene: slicer.vtkMRMLScene) -> dict[int, tuple[slicer.vtkMRMLMarkupsLineNode, slicer.vtkMRMLMarkupsLineNode]]:
    """Tagged lesion nodes in the scene: ``{lesion id: (long node, short node)}`` (complete pairs only)."""
    found: dict[int, dict[str, slicer.vtkMRMLMarkupsLineNode]] = {}
    for node in _line_nodes(scene):
        lesion_id, role = node.GetAttribute(ATTR_LESION_ID), node.GetAttribute(ATTR_ROLE)
        if lesion_id and role in (LONG, SHORT):
            found.setdefault(int(lesion_id), {})[role] = node
    return {k: (v[LONG], v[SHORT]) for k, v in found.items() if LONG in v and SHORT in v}


def lesion_nodes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLMarkupsLineNode]:
    """Every line node the reading created (tagged lesions and axes being drawn)."""
    return [node for node in _line_nodes(scene) if node.GetAttribute(ATTR_ROLE) in (LONG, SHORT)]


def clear_lesion_nodes(scene: slicer.vtkMRMLScene) -> int:
    """Remove every lesion line node (when leaving a case); returns how many were removed."""
    nodes = lesion_nodes(scene)
    for node in nodes:
        scene.RemoveNode(node)
    return len(nodes)


def show_lesions(scene: slicer.vtkMRMLScene, records: Iterable[LesionRecord]) -> dict[int, tuple[slicer.vtkMRMLMarkupsLineNode, slicer.vtkMRMLMarkupsLineNode]]:
    """Replace the scene's lesion nodes with one tagged (long, short) pair per record."""
    clear_lesion_nodes(scene)
    pairs = {}
    for record in records:
        long_node = new_axis_node(scene, LONG, f"L{record.number} long", record.long_axis)
        short_node = new_axis_node(scene, SHORT, f"L{record.number} short", record.short_axis)
        tag_lesion(long_node, short_node, record.id, record.number)
        pairs[record.id] = (long_node, short_node)
    return pairs


def sync_lesions_to_session(scene: slicer.vtkMRMLScene, session) -> dict[str, list[int]]:
    """Write moved axes back: every tagged pair whose end points differ from the stored lesion is updated.

    Returns:
        ``{"updated": [...ids], "rejected": [...ids]}``; a rejected pair failed the axis checks
        and was put back where it was stored.
    """
    stored = {record.id: record for record in session.lesions()}
    result: dict[str, list[int]] = {"updated": [], "rejected": []}
    for lesion_id, (long_node, short_node) in lesion_node_pairs(scene).items():
        record = stored.get(lesion_id)
        if record is None:
            continue
        long_axis, short_axis = axes_from_nodes(long_node, short_node)
        if _same(long_axis, record.long_axis) and _same(short_axis, record.short_axis):
            continue
        try:
            session.update_lesion(lesion_id, long_axis, short_axis)
            result["updated"].append(lesion_id)
        except ValueError:
            set_line_endpoints(long_node, record.long_axis)
            set_line_endpoints(short_node, record.short_axis)
            result["rejected"].append(lesion_id)
    return result


def _same(a: Axis, b: Axis, tol: float = 1e-6) -> bool:
    return all(abs(a[i][j] - b[i][j]) <= tol for i in range(2) for j in range(3))


def _line_nodes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLMarkupsLineNode]:
    collection = scene.GetNodesByClass("vtkMRMLMarkupsLineNode")
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return nodes


# -- blinded volumes ----------------------------------------------------------------------

def neutral_volume_name(case_label: str, volume: str) -> str:
    """The node name a reader sees for a phase volume: ``Case 07 T1c-pro`` (no file name)."""
    return f"{case_label} {volume}"


def blind_volume_node(scene: slicer.vtkMRMLScene, node, case_label: str, volume: str) -> None:
    """Strip what could identify the case from a loaded volume node.

    Renames it neutrally, removes its storage node (which holds the file name and would show it
    in the Data module and the Save dialog) and drops DICOM-derived attributes.
    """
    node.SetName(neutral_volume_name(case_label, volume))
    node.SetAttribute(ATTR_VOLUME, volume)
    storage = node.GetStorageNode()
    if storage is not None:
        node.SetAndObserveStorageNodeID(None)
        scene.RemoveNode(storage)
    names = vtk.vtkStringArray()
    node.GetAttributeNames(names)
    for i in range(names.GetNumberOfValues()):
        name = names.GetValue(i)
        if name.startswith("DICOM") or name in ("Description", "SeriesInstanceUID", "PatientName", "PatientID"):
            node.RemoveAttribute(name)
    node.SetDescription("")


def load_blinded_volume(scene: slicer.vtkMRMLScene, path, case_label: str, volume: str):
    """Load a NIfTI/NRRD/MHA volume or a DICOM series folder into the scene without leaving its file name anywhere.

    Uses the MRML archetype storage node directly (no ``slicer.util``), so it works in Slicer
    and under slicer-core alike; the storage node is removed once the voxels are read.

    Raises:
        SceneError: the file cannot be read (named, for the study coordinator; readers see only the label).
    """
    from pathlib import Path

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", neutral_volume_name(case_label, volume))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    if Path(path).is_dir():  # a DICOM series folder: the archetype is its first slice, the list all slices
        from .study import dicom_series_files

        files = dicom_series_files(path)
        storage.SetFileName(files[0])
        storage.ResetFileNameList()
        for name in files:
            storage.AddFileName(name)
        storage.SetSingleFile(False)
    else:
        storage.SetFileName(str(path))
        storage.SetSingleFile(True)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise SceneError(f"{case_label} {volume}: could not read the volume file listed in study.json; ask the study coordinator to check it")
    blind_volume_node(scene, node, case_label, volume)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOn()
    return node


def blank_views(scene: slicer.vtkMRMLScene) -> None:
    """Empty the reading views (while paused, nothing can be read off the screen)."""
    collection = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(collection.GetNumberOfItems()):
        composite = collection.GetItemAsObject(i)
        if composite.GetLayoutName() in VIEW_NAMES:
            composite.SetBackgroundVolumeID(None)
            composite.SetForegroundVolumeID(None)


def reading_volume_nodes(scene: slicer.vtkMRMLScene) -> list[object]:
    """Volume nodes loaded for the reading (tagged by :func:`blind_volume_node`)."""
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if n.GetAttribute(ATTR_VOLUME)]


def clear_reading_volumes(scene: slicer.vtkMRMLScene) -> int:
    """Remove the volumes of the previous case (so no two cases share the scene)."""
    nodes = reading_volume_nodes(scene)
    for node in nodes:
        scene.RemoveNode(node)
    return len(nodes)


# -- layout -------------------------------------------------------------------------------

def layout_id(view_count: int) -> int:
    """The layout id registered for ``view_count`` side-by-side views."""
    return LAYOUT_ID_BASE + int(view_count)


def phase_layout_xml(view_count: int) -> str:
    """Layout description: ``view_count`` axial slice views side by side, labelled 1..n.

    Labels are neutral numbers; the volume name appears in each view's corner annotation.
    """
    if not 1 <= view_count <= len(VIEW_NAMES):
        raise SceneError(f"a phase shows 1 to {len(VIEW_NAMES)} volumes, got {view_count}; shorten the phase's 'shows' in study.json")
    colors = ("#F34A33", "#EDD54C", "#6EB04B")
    items = "".join(
        f' <item><view class="vtkMRMLSliceNode" singletontag="{VIEW_NAMES[i]}">'
        f'<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{i + 1}</property>'
        f'<property name="viewcolor" action="default">{colors[i]}</property>'
        f'<property name="viewgroup" action="default">0</property>'
        f"</view></item>"
        for i in range(view_count)
    )
    return f'<layout type="horizontal" split="true">{items}</layout>'


def assign_views(scene: slicer.vtkMRMLScene, volume_node_ids: Sequence[str], link: bool = True) -> list[str]:
    """Show one volume per slice view (in order) and link the views (same slice, zoom and pan).

    Args:
        scene: the scene holding the views' slice composite nodes.
        volume_node_ids: volume node ids, in the phase's ``shows`` order.
        link: link the views so scrolling one scrolls all (paper: the phase's sequences are read together).

    Returns:
        The view names used.
    """
    composites = {}
    collection = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(i)
        composites[node.GetLayoutName()] = node
    used = []
    for view, node_id in zip(VIEW_NAMES, volume_node_ids):
        composite = composites.get(view)
        if composite is None:
            raise SceneError(f"slice view {view} is missing from the scene; switch to the LesionReader layout first")
        composite.SetBackgroundVolumeID(node_id)
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(bool(link))
        composite.SetHotLinkedControl(False)
        used.append(view)
    return used
