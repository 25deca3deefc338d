"""LesionReader: the blinded multi-phase reading study of Bone, Ammari et al. 2022, in Slicer.

Paper, "Reader study protocol": three successive phases (T1c, T1c-pro, T1c-vfa; T2-FLAIR always
shown, the routine T1c shown beside the processed images), 10 days' wash-out, 4-point image
quality grades, long and short axes of every enhancing lesion, automatic reading times.

This file is thin: the study, the session state machine, storage and the scene bridge live in
``LesionReaderLib`` (importable without Slicer). Qt imports are guarded so the Logic class can
be imported headless (``slicer-core``) by tests and batch scripts. The panel's choices (study
folder, reader id) live in a typed parameter node (``parameterNodeWrapper``, Slicer 5.8 scripted
module template); the reading itself lives in the study's crash-safe storage, never in the scene.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import slicer
import vtk

from ContrastAmplifierCommon.slicer_compat import IN_SLICER_APP as HAVE_GUI
from ContrastAmplifierCommon.slicer_compat import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    parameterNodeWrapper,
)
from ContrastAmplifierCommon.slicer_compat import tr as _

if HAVE_GUI:  # GUI parts: present in the Slicer application, absent under slicer-core
    import ctk  # noqa: F401
    import qt
    from slicer.util import VTKObservationMixin
else:
    qt = None  # type: ignore[assignment]

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

from LesionReaderLib import LesionAxisError, ReaderSession, StudyError
from LesionReaderLib import mrml_bridge as bridge
from LesionReaderLib.status import describe_opening, format_status, study_status
from LesionReaderLib.study import format_duration, load_study


class LesionReader(ScriptedLoadableModule):
    """Module description shown in Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Lesion Reader")
        # One category for the whole extension (the ExtensionsIndex category; Testing/SlicerModules/test_extension_index.py).
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = ["ContrastAmplifier"]  # imports ContrastAmplifierLib
        self.parent.contributors = ["SlicerContrastAmplifier developers"]
        self.parent.helpText = _(
            "Blinded multi-phase reader study (Bone, Ammari et al., Invest Radiol 2022): grade image quality 1-4 "
            "and mark each enhancing lesion's long and short axes; reading time is recorded automatically. "
            "Shortcuts: Alt+1 to Alt+4 grade, Alt+N confirm and next case, Alt+B previous case, Alt+L add lesion, "
            "Alt+P pause/resume (Slicer's own view keys, such as b/f for the previous/next slice, keep working). "
            "Research use only."
        )
        self.parent.acknowledgementText = _(
            "Reproduces the reading protocol of Bone A, Ammari S, et al. From dose reduction to contrast maximization. "
            "Invest Radiol 2022;57(8):527-535. Research use only."
        )


#
# LesionReaderParameterNode
#


@parameterNodeWrapper
class LesionReaderParameterNode:
    """What the reader chose in the "Study and reader" panel, kept in the module's parameter node.

    studyFolder - the folder holding study.json (bound to studyPathLineEdit). ``Path(".")``, Slicer's
                  default for a path parameter, means "none chosen yet".
    reader - the reader's id, e.g. R1 (bound to readerLineEdit).

    Nothing about the cases is kept here (the scene may be saved and shared): the reading's state
    lives in the study's crash-safe storage (LesionReaderLib.storage). The phase picker is filled
    per study from study.json, so it is not a parameter (Slicer binds a QComboBox to a fixed Choice).
    """

    studyFolder: pathlib.Path
    reader: str


class LesionReaderLogic(ScriptedLoadableModuleLogic):
    """Scene-side operations of a reading (no Qt): open a session, show a case, record a drawn lesion."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)

    def getParameterNode(self) -> LesionReaderParameterNode:
        """The module's parameter node (a singleton in ``slicer.mrmlScene``), typed."""
        return LesionReaderParameterNode(super().getParameterNode())

    @staticmethod
    def chosen_study_dir(folder: pathlib.Path) -> str:
        """``folder`` as the Lib takes it, or "" while none is chosen (a path parameter defaults to ".")."""
        return "" if folder == pathlib.Path() else str(folder)

    def phase_choices(self, study_dir: str, reader: str) -> list[dict[str, str]]:
        """Phases of ``reader`` with their state and a one-line description (for the phase picker)."""
        rows = study_status(study_dir, reader=reader)
        return [
            {
                "phase": r.phase,
                "state": r.state,
                "text": _("{phase}: {state}, {done} / {total}, {opening}").format(
                    phase=r.phase, state=r.state, done=r.done, total=r.total, opening=describe_opening(r)),
            }
            for r in rows
        ]

    def open_session(self, study_dir: str, reader: str, phase: str) -> ReaderSession:
        """Open the reading (raises :class:`StudyError` with a reader-facing message)."""
        return ReaderSession.open(study_dir, reader=reader, phase=phase)

    def show_case(self, session: ReaderSession) -> list[str]:
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


#: Keys Slicer itself binds, read in Slicer's sources at tag v5.8.1 (the same in v5.6.2), keyed by
#: the source file. Key sequences are written in QKeySequence portable text ("Num+" = a keypad
#: key, Qt::KeypadModifier; "Any+" = the key with any modifiers, vtkEvent::AnyModifier; a VTK
#: keysym "b" is Qt's "B", keysym "V" is Shift+V). A QShortcut on the main window takes its key
#: before the focused slice or 3D view sees it, so the reader's SHORTCUTS avoid every one of
#: these (checked by Testing/SlicerModules/test_lesion_reader_module_ui.py; Qt also matches a
#: keypad key against a shortcut without "Num+", so "1" would take the 3D view's keypad 1 too).
SLICER_KEY_BINDINGS = {
    # Slice views: vtkMRMLSliceIntersectionWidget::UpdateInteractionEventMapping()
    "Libs/MRML/DisplayableManager/vtkMRMLSliceIntersectionWidget.cxx": (
        ("G", "toggle label map / segmentation visibility"),
        ("T", "toggle foreground volume visibility"),
        ("Right", "next slice"),
        ("Left", "previous slice"),
        ("Up", "next slice"),
        ("Down", "previous slice"),
        ("F", "next slice"),
        ("B", "previous slice"),
        ("V", "toggle the slice's visibility in 3D"),
        ("Any+V", "toggle all slices' visibility in 3D (keysym V)"),
        ("Any+[", "previous volume as background"),
        ("Any+]", "next volume as background"),
        ("Any+{", "previous volume as foreground"),
        ("Any+}", "next volume as foreground"),
        ("R", "reset zoom and pan"),
    ),
    # 3D views: vtkMRMLCameraWidget::vtkMRMLCameraWidget()
    "Libs/MRML/DisplayableManager/vtkMRMLCameraWidget.cxx": (
        ("Num+1", "view from anterior"), ("End", "view from anterior"),
        ("Shift+Num+1", "view from posterior"), ("Shift+End", "view from posterior"),
        ("Num+3", "view from left"), ("PgDown", "view from left"),
        ("Shift+Num+3", "view from right"), ("Shift+PgDown", "view from right"),
        ("Num+7", "view from superior"), ("Home", "view from superior"),
        ("Shift+Num+7", "view from inferior"), ("Shift+Home", "view from inferior"),
        ("Num+2", "rotate"), ("Down", "rotate"), ("Num+8", "rotate"), ("Up", "rotate"),
        ("Num+4", "rotate"), ("Left", "rotate"), ("Num+6", "rotate"), ("Right", "rotate"),
        ("Shift+Num+2", "pan"), ("Shift+Down", "pan"), ("Shift+Num+8", "pan"), ("Shift+Up", "pan"),
        ("Shift+Num+4", "pan"), ("Shift+Left", "pan"), ("Shift+Num+6", "pan"), ("Shift+Right", "pan"),
        ("+", "zoom in"), ("-", "zoom out"),
        ("Ctrl+B", "toggle camera tilt lock"),
        ("Num+0", "reset camera"), ("Ins", "reset camera"),
        ("Num+5", "reset rotation"), ("Clear", "reset rotation"),
        ("Shift+Num+5", "reset translation"), ("Shift+Clear", "reset translation"),
        ("R", "reset field of view"),
    ),
    "Libs/MRML/DisplayableManager/vtkMRMLModelDisplayableManager.cxx": (("I", "hold and click: pick in the 3D view"),),
    "Libs/MRML/DisplayableManager/vtkMRMLInteractionWidget.cxx": (("Esc", "cancel a handle drag"),),
    "Libs/MRML/DisplayableManager/vtkMRMLWindowLevelWidget.cxx": (("Any+Esc", "cancel window/level adjustment"),),
    "Modules/Loadable/Transforms/MRMLDM/vtkMRMLTransformHandleWidget.cxx": (("Esc", "cancel moving the transform centre"),),
    # Markups (the lesion axes are line markups): keys over a control point
    "Modules/Loadable/Markups/VTKWidgets/vtkSlicerMarkupsWidget.cxx": (
        ("S", "snap control point to slice"),
        ("Del", "delete control point"),
        ("Backspace", "delete control point"),
        ("Shift+Del", "delete all control points"),
    ),
    # Application-wide Qt shortcuts and menu mnemonics
    "Base/QTApp/Resources/UI/qSlicerMainWindow.ui": (
        ("Ctrl+O", "add data"), ("Ctrl+S", "save"), ("Ctrl+W", "close scene"), ("Ctrl+Z", "undo"), ("Ctrl+Y", "redo"),
        ("Ctrl+2", "application settings"), ("Ctrl+4", "extensions manager"), ("Ctrl+6", "maximize view"),
        ("Ctrl+X", "cut"), ("Ctrl+C", "copy"), ("Ctrl+V", "paste"), ("Ctrl+H", "home module"),
        ("Alt+F", "File menu"), ("Alt+E", "Edit menu"), ("Alt+V", "View menu"), ("Alt+H", "Help menu"),
    ),
    "Base/QTApp/qSlicerMainWindow.cxx": (
        ("Ctrl+0", "error log"), ("Ctrl+3", "Python console"), ("Ctrl+`", "Python console"), ("Ctrl+5", "module panel"),
    ),
    "Applications/SlicerApp/qSlicerAppMainWindow.cxx": (("Ctrl+1", "documentation"),),
    "Base/QTGUI/qSlicerModuleSelectorToolBar.cxx": (
        ("Ctrl+F", "find module"), ("Ctrl+Left", "previous module"), ("Ctrl+Right", "next module"),
    ),
    "Modules/Loadable/Markups/Widgets/qMRMLMarkupsToolBar.cxx": (
        ("Ctrl+Shift+A", "create markup"), ("Ctrl+Shift+T", "toggle place persistence"), ("Ctrl+Shift+Space", "place point"),
    ),
    "Modules/Loadable/Sequences/Widgets/qMRMLSequenceBrowserPlayWidget.cxx": (
        ("Ctrl+Shift+Down", "play/pause sequence"), ("Ctrl+Shift+Left", "previous frame"), ("Ctrl+Shift+Right", "next frame"),
    ),
    "Modules/Loadable/SubjectHierarchy/Widgets/qSlicerSubjectHierarchyViewContextMenuPlugin.cxx": (
        ("Ctrl+B", "toggle tilt lock"),
    ),
    # Installed on the main window while a Segment Editor is shown (installKeyboardShortcuts)
    "Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx": (
        ("1", "effect 1"), ("2", "effect 2"), ("3", "effect 3"), ("4", "effect 4"), ("5", "effect 5"),
        ("6", "effect 6"), ("7", "effect 7"), ("8", "effect 8"), ("9", "effect 9"), ("0", "effect 10"),
        ("Shift+1", "effect 11"), ("Shift+2", "effect 12"), ("Shift+3", "effect 13"), ("Shift+4", "effect 14"),
        ("Shift+5", "effect 15"), ("Shift+6", "effect 16"), ("Shift+7", "effect 17"), ("Shift+8", "effect 18"),
        ("Shift+9", "effect 19"), ("Shift+0", "effect 20"),
        ("Esc", "deactivate effect"), ("Space", "toggle last effect"),
        ("Z", "undo"), ("Ctrl+Z", "undo"), ("Y", "redo"), ("Ctrl+Y", "redo"), ("Ctrl+Shift+Z", "redo"),
        ("Q", "previous segment"), ("W", "next segment"), ("/", "previous segment"), ("*", "next segment"),
        (",", "previous segment"), (".", "next segment"), (">", "previous segment"), ("<", "next segment"),
        ("I", "toggle intensity mask"),
    ),
    "Libs/MRML/Widgets/qMRMLPlotView.cxx": (("S", "plot: select points"), ("R", "plot: reset view"), ("U", "plot: unselect")),
    "Libs/MRML/Widgets/qMRMLTableView.cxx": (("Ctrl+C", "copy cells"), ("Ctrl+V", "paste cells")),
}


class LesionReaderWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The reader's panel: study picker, login, grades, lesions, navigation, pause, status."""

    #: Key sequence (QKeySequence portable text) -> reader action. Alt+ keys: Slicer binds none of
    #: them (SLICER_KEY_BINDINGS), while a plain letter or digit is a view key ("b" is the slice
    #: view's previous slice, keypad digits turn the 3D view) or a Segment Editor key.
    SHORTCUTS = {
        "Alt+1": "grade1",
        "Alt+2": "grade2",
        "Alt+3": "grade3",
        "Alt+4": "grade4",
        "Alt+N": "next",
        "Alt+B": "previous",
        "Alt+L": "lesion",
        "Alt+P": "pause",
    }

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic: Optional[LesionReaderLogic] = None
        self._parameterNode: Optional[LesionReaderParameterNode] = None
        self._parameterNodeGuiTag = None
        self._phasesListedFor: Optional[str] = None  # study folder the phase picker was filled from
        self.session: Optional[ReaderSession] = None
        self._drawing: list[object] = []  # [long] or [long, short] line nodes being placed
        self._shortcuts: list[object] = []
        self._volume_ids: list[str] = []

    # -- set-up ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/LesionReader.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionReaderLogic(slicer.mrmlScene)

        # The parameter node is reset when the scene closes: let go of it, and of the reading.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # studyPathLineEdit and readerLineEdit are bound to the parameter node (SlicerParameterName in
        # the .ui); a new study folder refreshes the phases through onParameterNodeModified.
        self.ui.readerLineEdit.editingFinished.connect(self.refreshPhases)
        self.ui.openButton.clicked.connect(self.onOpen)
        self.ui.closeButton.clicked.connect(self.onClose)
        for grade in (1, 2, 3, 4):
            button = getattr(self.ui, f"grade{grade}Button")
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

        # Make sure the parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self.updateGUI()

    def cleanup(self):
        self.onClose()
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
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
        # Do not react to parameter node changes (the GUI is updated when the reader comes back).
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    # -- parameter node --------------------------------------------------------------------
    def onSceneStartClose(self, caller, event):
        # The reading's nodes go with the scene: close the reading (its answers and time are stored).
        self.onClose()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Ensure the parameter node exists and is observed and bound to the GUI."""
        parameters = self.logic.getParameterNode()
        if not LesionReaderLogic.chosen_study_dir(parameters.studyFolder) and self.ui.studyPathLineEdit.currentPath:
            # First use in this scene: start from the folder the path field remembers (its settingKey history).
            parameters.studyFolder = pathlib.Path(self.ui.studyPathLineEdit.currentPath)
        self.setParameterNode(parameters)

    def setParameterNode(self, inputParameterNode: Optional[LesionReaderParameterNode]):
        """Set and observe the parameter node; its study folder and reader id show in the bound widgets."""
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            # In the .ui file the Qt dynamic property "SlicerParameterName" names the bound field.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        if self._parameterNode is not None and self._studyDir() != self._phasesListedFor:
            self.refreshPhases()

    # -- study and login -------------------------------------------------------------------
    def _studyDir(self) -> str:
        return LesionReaderLogic.chosen_study_dir(self._parameterNode.studyFolder) if self._parameterNode is not None else ""

    def _reader(self) -> str:
        return self._parameterNode.reader.strip() if self._parameterNode is not None else ""

    def refreshPhases(self, *args):
        self.ui.phaseComboBox.clear()
        study_dir, reader = self._studyDir(), self._reader()
        self._phasesListedFor = study_dir
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
            self.session = self.logic.open_session(self._studyDir(), self._reader(), phase)
        except StudyError as exc:  # wash-out, unknown reader, submitted phase: the message says what to do
            slicer.util.warningDisplay(str(exc), windowTitle=_("Lesion Reader"))
            return
        self.ui.studyPathLineEdit.addCurrentPathToHistory()
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
            slicer.util.warningDisplay(str(exc), windowTitle=_("Lesion Reader"))
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
                slicer.util.infoDisplay(_("All cases are confirmed. Review them if you wish, then press Submit phase."), windowTitle=_("Lesion Reader"))
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
        if not slicer.util.confirmOkCancelDisplay(_("Submit this phase? Answers become final."), windowTitle=_("Lesion Reader")):
            return
        opens = self._run(self.session.submit_phase)
        if opens is not None:
            slicer.util.infoDisplay(_("Phase submitted. Your next phase opens {time} UTC.").format(time=opens.strftime("%Y-%m-%d %H:%M")),
                                    windowTitle=_("Lesion Reader"))
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
        self._drawing = [bridge.new_axis_node(slicer.mrmlScene, bridge.LONG, _("new lesion long"))]
        self.ui.lesionHintLabel.text = _("Click both ends of the lesion's LONG axis.")
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
            self._drawing.append(bridge.new_axis_node(slicer.mrmlScene, bridge.SHORT, _("new lesion short")))
            self.ui.lesionHintLabel.text = _("Now the SHORT axis, across the lesion at right angles.")
            qt.QTimer.singleShot(0, lambda: self.startPlacing(self._drawing[-1]))
            return
        long_node, short_node = self._drawing
        try:
            self.logic.commit_lesion(self.session, long_node, short_node)
        except LesionAxisError as exc:
            slicer.mrmlScene.RemoveNode(short_node)
            self._drawing = [long_node]
            self.ui.lesionHintLabel.text = _("{error}. Draw the short axis again.").format(error=exc)
            qt.QTimer.singleShot(0, lambda: self.retryShortAxis())
            return
        except StudyError as exc:
            slicer.util.warningDisplay(str(exc), windowTitle=_("Lesion Reader"))
            self.cancelDrawing()
            return
        self.observeLesionNode(long_node)
        self.observeLesionNode(short_node)
        self._drawing = []
        self.ui.lesionHintLabel.text = ""
        self.updateGUI()

    def retryShortAxis(self):
        self._drawing.append(bridge.new_axis_node(slicer.mrmlScene, bridge.SHORT, _("new lesion short")))
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
            self.ui.lesionHintLabel.text = _("That change broke the long/short axis rules and was undone.")
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
            self.ui.timeLabel.text = _("{case_time} on this case, {phase_time} in this phase").format(
                case_time=format_duration(self.session.case_seconds()), phase_time=format_duration(self.session.phase_seconds()))

    def refreshStatus(self):
        study_dir = self._studyDir()
        if not study_dir:
            return
        try:
            reader = self._reader() or None
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
            self.ui.caseLabel.text = _("No reading open")
            self.ui.progressLabel.text = ""
            self.ui.lesionTable.setRowCount(0)
            return
        state = session.state()
        paused = state["paused"]
        case_text = f"{state['phase']} - {state['case_label']}"
        self.ui.caseLabel.text = _("{case} (paused)").format(case=case_text) if paused else case_text
        self.ui.progressLabel.text = _("{progress}   ({done} done)").format(progress=state["progress_text"], done=state["done"])
        self.ui.progressBar.maximum = state["total"]
        self.ui.progressBar.value = state["done"]
        for grade in (1, 2, 3, 4):
            button = getattr(self.ui, f"grade{grade}Button")
            button.checked = state["grade"] == grade
            button.enabled = not paused
        can_mark = state["marks_lesions"] and not paused and not state["too_many_lesions"]
        self.ui.addLesionButton.enabled = can_mark
        self.ui.removeLesionButton.enabled = can_mark
        self.ui.tooManyLesionsCheckBox.enabled = state["marks_lesions"] and not paused
        self.ui.tooManyLesionsCheckBox.blockSignals(True)
        self.ui.tooManyLesionsCheckBox.checked = state["too_many_lesions"]
        self.ui.tooManyLesionsCheckBox.text = _("Too many lesions (> {count}): exclude case").format(count=state["max_lesions"])
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
        self.ui.pauseButton.text = _("Resume") if paused else _("Pause")
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
        """The two-case study lives in a temporary folder that is removed afterwards, pass or fail."""
        import tempfile
        from pathlib import Path

        self.delayDisplay("Creating a two-case study")
        with tempfile.TemporaryDirectory(prefix="LesionReaderTest-") as folder:
            self._round_trip_in(Path(folder))

    def _round_trip_in(self, root):
        import numpy as np
        import SimpleITK as sitk

        from LesionReaderLib import init_study
        from LesionReaderLib.export import export_study

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
