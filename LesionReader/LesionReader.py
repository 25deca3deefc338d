"""LesionReader: the blinded multi-phase reading study of Bone, Ammari et al. 2022, in Slicer.

Paper, "Reader study protocol": three successive phases (T1c, T1c-pro, T1c-vfa; T2-FLAIR always
shown, the routine T1c shown beside the processed images), 10 days' wash-out, 4-point image
quality grades, long and short axes of every enhancing lesion, automatic reading times.

This file is thin: the study, the session state machine, storage and the scene bridge live in
``LesionReaderLib`` (importable without Slicer). Qt imports are guarded so the Logic class can
be imported headless (``slicer-core``) by tests and batch scripts.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import slicer

from ContrastAmplifierCommon.slicer_compat import IN_SLICER_APP as HAVE_GUI
from ContrastAmplifierCommon.slicer_compat import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

if HAVE_GUI:  # GUI parts: present in the Slicer application, absent under slicer-core
    import ctk  # noqa: F401
    import qt
    from slicer.util import VTKObservationMixin
else:
    qt = None  # type: ignore[assignment]

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

from LesionReaderLib import GRADE_LABELS, LesionAxisError, ReaderSession, StudyError
from LesionReaderLib import mrml_bridge as bridge
from LesionReaderLib.status import describe_opening, format_status, study_status
from LesionReaderLib.study import format_duration, load_study


class LesionReader(ScriptedLoadableModule):
    """Module description shown in Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Lesion Reader"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = ["ContrastAmplifier"]  # imports ContrastAmplifierLib
        self.parent.contributors = ["SlicerContrastAmplifier developers"]
        self.parent.helpText = (
            "Blinded multi-phase reader study (Bone, Ammari et al., Invest Radiol 2022): grade image quality 1-4 "
            "and mark each enhancing lesion's long and short axes; reading time is recorded automatically. "
            "Shortcuts: 1-4 grade, N next case, B previous case, L add lesion, P pause/resume. Research use only."
        )
        self.parent.acknowledgementText = (
            "Reproduces the reading protocol of Bone A, Ammari S, et al. From dose reduction to contrast maximization. "
            "Invest Radiol 2022;57(8):527-535. Research use only."
        )


class LesionReaderLogic(ScriptedLoadableModuleLogic):
    """Scene-side operations of a reading (no Qt): open a session, show a case, record a drawn lesion."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)

    def phase_choices(self, study_dir: str, reader: str) -> List[Dict[str, str]]:
        """Phases of ``reader`` with their state and a one-line description (for the phase picker)."""
        rows = study_status(study_dir, reader=reader)
        return [{"phase": r.phase, "state": r.state, "text": f"{r.phase}: {r.state}, {r.done} / {r.total}, {describe_opening(r)}"} for r in rows]

    def open_session(self, study_dir: str, reader: str, phase: str) -> ReaderSession:
        """Open the reading (raises :class:`StudyError` with a reader-facing message)."""
        return ReaderSession.open(study_dir, reader=reader, phase=phase)

    def show_case(self, session: ReaderSession) -> List[str]:
        """Replace the scene's reading volumes and lesion lines with the shown case's; returns volume node ids."""
        bridge.clear_lesion_nodes(self.scene)
        bridge.clear_reading_volumes(self.scene)
        ids = [bridge.load_blinded_volume(self.scene, path, session.case_label, name).GetID() for name, path in session.volumes().items()]
        bridge.show_lesions(self.scene, session.lesions())
        return ids

    def commit_lesion(self, session: ReaderSession, long_node, short_node) -> int:
        """Store a drawn (long, short) pair as a lesion and tag the nodes; raises :class:`LesionAxisError`."""
        lesion_id = session.add_lesion(*bridge.axes_from_nodes(long_node, short_node))
        bridge.tag_lesion(long_node, short_node, lesion_id, len(session.lesions()))
        return lesion_id

    def clear(self) -> None:
        """Remove every reading node (when the reading is closed)."""
        if self.scene is not None:
            bridge.clear_lesion_nodes(self.scene)
            bridge.clear_reading_volumes(self.scene)


class LesionReaderWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The reader's panel: study picker, login, grades, lesions, navigation, pause, status."""

    SHORTCUTS = {"1": "grade1", "2": "grade2", "3": "grade3", "4": "grade4", "N": "next", "B": "previous", "L": "lesion", "P": "pause"}

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[LesionReaderLogic] = None
        self.session: Optional[ReaderSession] = None
        self._drawing: List[object] = []  # [long] or [long, short] line nodes being placed
        self._shortcuts: List[object] = []
        self._volume_ids: List[str] = []

    # -- set-up ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/LesionReader.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionReaderLogic(slicer.mrmlScene)

        self.ui.studyPathLineEdit.currentPathChanged.connect(self.refreshPhases)
        self.ui.readerLineEdit.editingFinished.connect(self.refreshPhases)
        self.ui.openButton.clicked.connect(self.onOpen)
        self.ui.closeButton.clicked.connect(self.onClose)
        for grade in GRADE_LABELS:
            button = getattr(self.ui, f"grade{grade}Button")
            button.setText(f"{grade} {GRADE_LABELS[grade]}")
            button.clicked.connect(lambda checked=False, g=grade: self.onGrade(g))
        self.ui.addLesionButton.clicked.connect(self.onAddLesion)
        self.ui.removeLesionButton.clicked.connect(self.onRemoveLesion)
        self.ui.tooManyLesionsCheckBox.toggled.connect(self.onTooManyLesions)
        self.ui.previousButton.clicked.connect(self.onPrevious)
        self.ui.nextButton.clicked.connect(self.onNext)
        self.ui.pauseButton.clicked.connect(self.onPause)
        self.ui.submitButton.clicked.connect(self.onSubmit)
        self.ui.refreshStatusButton.clicked.connect(self.refreshStatus)

        self.clockTimer = qt.QTimer()
        self.clockTimer.setInterval(1000)
        self.clockTimer.timeout.connect(self.updateTime)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged)
        slicer.app.connect("aboutToQuit()", self.onClose)
        self.updateGUI()

    def cleanup(self):
        self.onClose()
        self.removeObservers()

    def enter(self):
        # Shortcuts live only while the module is shown, so they never hijack other modules' keys.
        for key, action in self.SHORTCUTS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", lambda a=action: self.onShortcut(a))
            self._shortcuts.append(shortcut)
        if self.session is not None and self.session.paused:
            self.onPause()  # coming back resumes the clock

    def exit(self):
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        if self.session is not None and not self.session.paused:
            self.onPause()  # leaving the case stops the clock (paper: reading times recorded automatically)

    # -- study and login -------------------------------------------------------------------
    def _studyDir(self) -> str:
        return self.ui.studyPathLineEdit.currentPath

    def refreshPhases(self, *args):
        self.ui.phaseComboBox.clear()
        study_dir, reader = self._studyDir(), self.ui.readerLineEdit.text.strip()
        if not study_dir or not reader:
            return
        try:
            study = load_study(study_dir)
            self.ui.studyNameLabel.text = study.name
            choices = self.logic.phase_choices(study_dir, reader)
        except StudyError as exc:
            self.ui.phaseStatusLabel.text = str(exc)
            return
        for choice in choices:
            self.ui.phaseComboBox.addItem(choice["text"], choice["phase"])
        first_open = next((i for i, c in enumerate(choices) if c["state"] in ("not opened", "in progress", "paused")), 0)
        self.ui.phaseComboBox.currentIndex = first_open
        self.ui.phaseStatusLabel.text = ""
        self.refreshStatus()

    def onOpen(self):
        self.onClose()
        phase = self.ui.phaseComboBox.itemData(self.ui.phaseComboBox.currentIndex)
        try:
            self.session = self.logic.open_session(self._studyDir(), self.ui.readerLineEdit.text.strip(), phase)
        except StudyError as exc:  # wash-out, unknown reader, submitted phase: the message says what to do
            slicer.util.warningDisplay(str(exc), windowTitle="Lesion Reader")
            return
        self.setPhaseLayout(len(self.session.volumes()))
        self.showCase()
        self.clockTimer.start()

    def onClose(self):
        self.cancelDrawing()
        if self.session is not None:
            try:
                self.session.close()
            finally:
                self.session = None
        if self.logic is not None:
            self.logic.clear()
        if hasattr(self, "clockTimer"):
            self.clockTimer.stop()
        if hasattr(self, "ui"):
            self.updateGUI()

    # -- views -----------------------------------------------------------------------------
    def setPhaseLayout(self, view_count: int):
        layout_manager = slicer.app.layoutManager()
        layout_node = layout_manager.layoutLogic().GetLayoutNode()
        layout_id = bridge.layout_id(view_count)
        if not layout_node.IsLayoutDescription(layout_id):
            layout_node.AddLayoutDescription(layout_id, bridge.phase_layout_xml(view_count))
        layout_manager.setLayout(layout_id)

    def showCase(self):
        self.cancelDrawing()
        self._volume_ids = self.logic.show_case(self.session)
        bridge.assign_views(slicer.mrmlScene, self._volume_ids, link=True)
        slicer.util.resetSliceViews()
        for long_node, short_node in bridge.lesion_node_pairs(slicer.mrmlScene).values():
            self.observeLesionNode(long_node)
            self.observeLesionNode(short_node)
        self.updateGUI()

    def observeLesionNode(self, node):
        self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onLesionMoved)

    # -- grading and navigation -------------------------------------------------------------
    def _run(self, action, *args):
        """Run a session action; show its error to the reader instead of raising."""
        if self.session is None:
            return None
        try:
            return action(*args)
        except StudyError as exc:
            slicer.util.warningDisplay(str(exc), windowTitle="Lesion Reader")
            return None
        finally:
            self.updateGUI()

    def onGrade(self, grade: int):
        if self.session is not None:
            self._run(self.session.grade, grade)

    def onNext(self):
        if self.session is None:
            return
        before = self.session.position
        moved = self._run(self.session.next_case)
        if moved:
            self.showCase()
        elif moved is False and self.session.position == before:
            nxt = self.session.first_unconfirmed()
            if nxt is None:
                slicer.util.infoDisplay("All cases are confirmed. Review them if you wish, then press Submit phase.", windowTitle="Lesion Reader")
            else:
                self._run(self.session.go_to, nxt)
                self.showCase()

    def onPrevious(self):
        if self.session is not None and self._run(self.session.previous_case):
            self.showCase()

    def onPause(self):
        if self.session is None:
            return
        if self.session.paused:
            self._run(self.session.resume)
            bridge.assign_views(slicer.mrmlScene, self._volume_ids, link=True)
        else:
            self.cancelDrawing()
            self._run(self.session.pause)
            bridge.blank_views(slicer.mrmlScene)

    def onSubmit(self):
        if self.session is None:
            return
        if not slicer.util.confirmOkCancelDisplay("Submit this phase? Answers become final.", windowTitle="Lesion Reader"):
            return
        opens = self._run(self.session.submit_phase)
        if opens is not None:
            slicer.util.infoDisplay(f"Phase submitted. Your next phase opens {opens:%Y-%m-%d %H:%M} UTC.", windowTitle="Lesion Reader")
            self.onClose()
            self.refreshPhases()

    def onTooManyLesions(self, checked: bool):
        if self.session is not None and bool(checked) != self.session.too_many_lesions:
            self._run(self.session.flag_too_many_lesions, bool(checked))

    def onShortcut(self, action: str):
        if self.session is None:
            return
        if action.startswith("grade"):
            self.onGrade(int(action[-1]))
        elif action == "next":
            self.onNext()
        elif action == "previous":
            self.onPrevious()
        elif action == "lesion":
            self.onAddLesion()
        elif action == "pause":
            self.onPause()

    # -- lesions ---------------------------------------------------------------------------
    def onAddLesion(self):
        if self.session is None or self.session.paused or not self.session.marks_lesions:
            return
        self.cancelDrawing()
        self._drawing = [bridge.new_axis_node(slicer.mrmlScene, bridge.LONG, "new lesion long")]
        self.ui.lesionHintLabel.text = "Click both ends of the lesion's LONG axis."
        self.startPlacing(self._drawing[0])

    def startPlacing(self, node):
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsLineNode")
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(0)
        interaction.SetCurrentInteractionMode(interaction.Place)
        self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onDrawingPointDefined)

    def onDrawingPointDefined(self, caller, event):
        if caller.GetNumberOfDefinedControlPoints() < 2 or not self._drawing or caller is not self._drawing[-1]:
            return
        self.removeObserver(caller, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onDrawingPointDefined)
        if len(self._drawing) == 1:
            self._drawing.append(bridge.new_axis_node(slicer.mrmlScene, bridge.SHORT, "new lesion short"))
            self.ui.lesionHintLabel.text = "Now the SHORT axis, across the lesion at right angles."
            qt.QTimer.singleShot(0, lambda: self.startPlacing(self._drawing[-1]))
            return
        long_node, short_node = self._drawing
        try:
            self.logic.commit_lesion(self.session, long_node, short_node)
        except LesionAxisError as exc:
            slicer.mrmlScene.RemoveNode(short_node)
            self._drawing = [long_node]
            self.ui.lesionHintLabel.text = f"{exc}. Draw the short axis again."
            qt.QTimer.singleShot(0, lambda: self.retryShortAxis())
            return
        except StudyError as exc:
            slicer.util.warningDisplay(str(exc), windowTitle="Lesion Reader")
            self.cancelDrawing()
            return
        self.observeLesionNode(long_node)
        self.observeLesionNode(short_node)
        self._drawing = []
        self.ui.lesionHintLabel.text = ""
        self.updateGUI()

    def retryShortAxis(self):
        self._drawing.append(bridge.new_axis_node(slicer.mrmlScene, bridge.SHORT, "new lesion short"))
        self.startPlacing(self._drawing[-1])

    def onInteractionModeChanged(self, caller, event):
        # Escape / right-click leaves place mode: an unfinished lesion is discarded (the only thing a crash may lose too).
        if self._drawing and caller.GetCurrentInteractionMode() != caller.Place:
            incomplete = self._drawing[-1].GetNumberOfDefinedControlPoints() < 2
            if incomplete:
                self.cancelDrawing()

    def cancelDrawing(self):
        for node in self._drawing:
            if slicer.mrmlScene.IsNodePresent(node):
                slicer.mrmlScene.RemoveNode(node)
        self._drawing = []
        if hasattr(self, "ui"):
            self.ui.lesionHintLabel.text = ""

    def onLesionMoved(self, caller, event):
        if self.session is None:
            return
        result = bridge.sync_lesions_to_session(slicer.mrmlScene, self.session)
        if result["rejected"]:
            self.ui.lesionHintLabel.text = "That change broke the long/short axis rules and was undone."
        self.updateGUI()

    def onRemoveLesion(self):
        row = self.ui.lesionTable.currentRow()
        if self.session is None or row < 0:
            return
        lesion_id = int(self.ui.lesionTable.item(row, 0).data(qt.Qt.UserRole))
        self._run(self.session.remove_lesion, lesion_id)
        bridge.show_lesions(slicer.mrmlScene, self.session.lesions())
        for long_node, short_node in bridge.lesion_node_pairs(slicer.mrmlScene).values():
            self.observeLesionNode(long_node)
            self.observeLesionNode(short_node)
        self.updateGUI()

    # -- display ---------------------------------------------------------------------------
    def updateTime(self):
        if self.session is not None and not self.session.closed:
            self.ui.timeLabel.text = f"{format_duration(self.session.case_seconds())} on this case, {format_duration(self.session.phase_seconds())} in this phase"

    def refreshStatus(self):
        study_dir = self._studyDir()
        if not study_dir:
            return
        try:
            reader = self.ui.readerLineEdit.text.strip() or None
            self.ui.statusText.plainText = format_status(study_status(study_dir, reader=reader))
        except StudyError as exc:
            self.ui.statusText.plainText = str(exc)

    def updateGUI(self):
        session = self.session if self.session is not None and not self.session.closed else None
        reading = session is not None
        for name in ("studyPathLineEdit", "readerLineEdit", "phaseComboBox", "openButton"):
            getattr(self.ui, name).enabled = not reading
        self.ui.readingCollapsibleButton.enabled = reading
        self.ui.closeButton.enabled = reading
        if not reading:
            self.ui.caseLabel.text = "No reading open"
            self.ui.progressLabel.text = ""
            self.ui.lesionTable.setRowCount(0)
            return
        state = session.state()
        paused = state["paused"]
        self.ui.caseLabel.text = f"{state['phase']} - {state['case_label']}" + (" (paused)" if paused else "")
        self.ui.progressLabel.text = f"{state['progress_text']}   ({state['done']} done)"
        self.ui.progressBar.maximum = state["total"]
        self.ui.progressBar.value = state["done"]
        for grade in GRADE_LABELS:
            button = getattr(self.ui, f"grade{grade}Button")
            button.checked = state["grade"] == grade
            button.enabled = not paused
        can_mark = state["marks_lesions"] and not paused and not state["too_many_lesions"]
        self.ui.addLesionButton.enabled = can_mark
        self.ui.removeLesionButton.enabled = can_mark
        self.ui.tooManyLesionsCheckBox.enabled = state["marks_lesions"] and not paused
        self.ui.tooManyLesionsCheckBox.blockSignals(True)
        self.ui.tooManyLesionsCheckBox.checked = state["too_many_lesions"]
        self.ui.tooManyLesionsCheckBox.text = f"Too many lesions (> {state['max_lesions']}): exclude case"
        self.ui.tooManyLesionsCheckBox.blockSignals(False)
        self.ui.lesionTable.setRowCount(len(state["lesions"]))
        for row, lesion in enumerate(state["lesions"]):
            cells = (f"L{lesion['number']}", f"{lesion['long_mm']:.1f}", f"{lesion['short_mm']:.1f}")
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                if column == 0:
                    item.setData(qt.Qt.UserRole, lesion["id"])
                self.ui.lesionTable.setItem(row, column, item)
        self.ui.previousButton.enabled = not paused and state["position"] > 0
        self.ui.nextButton.enabled = not paused
        self.ui.pauseButton.text = "Resume" if paused else "Pause"
        self.ui.submitButton.enabled = not paused and state["done"] == state["total"]
        self.updateTime()


class LesionReaderTest(ScriptedLoadableModuleTest):
    """In-Slicer test: a two-case study on synthetic volumes, read through the Logic and the scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_reading_round_trip()

    def test_reading_round_trip(self):
        import tempfile
        from pathlib import Path

        import numpy as np
        import SimpleITK as sitk

        from LesionReaderLib import init_study
        from LesionReaderLib.export import export_study

        self.delayDisplay("Creating a two-case study")
        root = Path(tempfile.mkdtemp(prefix="LesionReaderTest-"))
        folders = []
        for i in range(2):
            folder = root / "cases" / f"case{i}"
            folder.mkdir(parents=True)
            for name in ("t1c", "t1c_pro", "t1c_vfa", "flair"):
                sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 16, 16).astype(np.float32)), str(folder / f"{name}.nii.gz"))
            folders.append(folder)
        init_study(root / "study", folders, ["R1"])

        logic = LesionReaderLogic(slicer.mrmlScene)
        session = logic.open_session(str(root / "study"), "R1", "T1c")
        ids = logic.show_case(session)
        self.assertEqual(len(ids), 2)
        self.assertTrue(all(slicer.mrmlScene.GetNodeByID(i).GetName().startswith("Case 01") for i in ids))
        session.grade(3)
        long_node = bridge.new_axis_node(slicer.mrmlScene, bridge.LONG, "long", ((0, 0, 0), (10, 0, 0)))
        short_node = bridge.new_axis_node(slicer.mrmlScene, bridge.SHORT, "short", ((5, -2, 0), (5, 2, 0)))
        logic.commit_lesion(session, long_node, short_node)
        self.assertEqual(len(session.lesions()), 1)
        session.next_case()
        session.grade(2)
        session.next_case()
        session.submit_phase()
        grades, lesions = export_study(root / "study", root / "out")
        self.assertEqual(len(grades.read_text(encoding="utf-8").splitlines()), 3)
        self.assertEqual(len(lesions.read_text(encoding="utf-8").splitlines()), 2)
        logic.clear()
        self.delayDisplay("Test passed")
