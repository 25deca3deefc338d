"""ContrastAmplifierTraining.py on the slicer-core wheel: the typed parameter node and its .ui binding,
settings reaching the command line, "Export and add to models" on a tiny real fit, cached panel
refreshes, and translatable user-visible text.

The Widget's Qt side cannot run here (no Qt): its parameter-change handler runs against the
real parameter node with stand-in widgets, and Slicer's ``connectGui`` is replaced by what its
connectors do (write the node on each edit); the .ui <-> field binding is checked against the
rules of Slicer's guiConnectors.py instead.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")

from ContrastAmplifierCommon import process  # noqa: E402
from ContrastAmplifierTrainingLib import run_status  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "ContrastAmplifierTraining" / "ContrastAmplifierTraining.py"
UI = REPO / "ContrastAmplifierTraining" / "Resources" / "UI" / "ContrastAmplifierTraining.ui"


def load_module_file():
    spec = importlib.util.spec_from_file_location("_slicer_module_ContrastAmplifierTraining_under_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as Slicer's imp.load_source does (the typed fields resolve in it)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def training():
    return load_module_file()


# -- 1. typed parameter node: .ui binding and settings ---------------------------------------------

def _unannotated(hint):
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _annotations(hint) -> list:
    return list(typing.get_args(hint)[1:]) if typing.get_origin(hint) is typing.Annotated else []


def ui_parameter_widgets() -> dict:
    """SlicerParameterName -> (widget class, widget name, {property: text})."""
    found = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        props = {p.get("name"): (p.find("*").text if p.find("*") is not None else None) for p in widget.findall("property")}
        if props.get("SlicerParameterName"):
            found[props["SlicerParameterName"]] = (widget.get("class"), widget.get("name"), props)
    return found


def test_the_clip_percentile_spin_box_is_bound_to_a_float_field(training):
    """The QDoubleSpinBox the old slicer.util helpers never bound now names a float field, which
    Slicer's QDoubleSpinBox connector binds (every widget/field pair: test_parameter_binding.py)."""
    hints = typing.get_type_hints(training.ContrastAmplifierTrainingParameterNode, include_extras=True)
    widgets = ui_parameter_widgets()
    assert set(widgets) == set(hints)
    assert widgets["upperClipPercentile"][:2] == ("QDoubleSpinBox", "clipPercentileSpinBox")
    assert _unannotated(hints["upperClipPercentile"]) is float


def test_the_ui_ranges_match_the_fields_validators(training):
    """connectGui sets a spin box's range from WithinRange; the .ui shows the same range in Designer."""
    hints = typing.get_type_hints(training.ContrastAmplifierTrainingParameterNode, include_extras=True)
    for name, (_, widget_name, props) in ui_parameter_widgets().items():
        within = [a for a in _annotations(hints[name]) if type(a).__name__ == "WithinRange"]
        if within and "minimum" in props:
            assert (float(props["minimum"]), float(props["maximum"])) == (within[0].minimum, within[0].maximum), widget_name


def test_new_parameter_node_has_the_papers_defaults_in_slicers_storage_format(training, scene):
    logic = training.ContrastAmplifierTrainingLogic()
    p = logic.getParameterNode()
    node = p.parameterNode
    assert node.GetAttribute("ModuleName") == "ContrastAmplifierTraining"
    assert (p.folds, p.epochs, p.device, p.upperClipPercentile, p.modelName) == ("0 1 2 3 4", 300, "auto", 99.0, "")
    assert [node.GetParameter(k) for k in ("epochs", "upperClipPercentile", "manifestPath")] == ["300", "99.0", "."]
    with pytest.raises(ValueError):
        p.upperClipPercentile = 101.0
    with pytest.raises(ValueError):
        p.device = "tpu"


@pytest.fixture()
def manifest(tmp_path):
    path = tmp_path / "cohort.csv"
    path.write_text("case_id\n", encoding="utf-8")
    return path


def test_a_changed_clip_percentile_reaches_the_command_line(training, scene, manifest, tmp_path):
    logic = training.ContrastAmplifierTrainingLogic()
    p = logic.getParameterNode()
    p.manifestPath, p.outputFolder = manifest, tmp_path / "run"
    p.folds, p.epochs, p.device = "0, 2", 7, "cpu"
    # what the QDoubleSpinBox's connector does when the user sets 99.9: the node's value changes
    p.parameterNode.SetParameter("upperClipPercentile", "99.9")
    settings = logic.trainingSettings()  # the module's own node, read again
    assert settings.upperClipPercentile == 99.9 and settings.folds == (0, 2) and settings.epochs == 7
    joined = " ".join(logic.fitCommandFromParameters())
    assert "--folds 0 --folds 2 --epochs 7 --device cpu --clip-percentiles 1 99.9 --progress json" in joined
    assert str(manifest) in joined and str(tmp_path / "run") in joined


class FakeJob:
    """Stands in for process.BackgroundProcess: records the command, finishes at once."""

    commands: list = []

    def __init__(self, command, env=None):
        FakeJob.commands.append(list(map(str, command)))
        self.on_progress = None
        self.running = False

    def start(self):
        return self

    def wait(self, timeout=None):
        return process.ProcessState.SUCCEEDED

    def raise_for_state(self):
        return None


def test_train_takes_the_clip_percentile_from_the_parameter_node(training, scene, manifest, tmp_path, monkeypatch):
    """The batch-mode ``train`` (README example, settings not given) runs with the node's percentile."""
    monkeypatch.setattr(process, "BackgroundProcess", FakeJob)
    FakeJob.commands = []
    logic = training.ContrastAmplifierTrainingLogic()
    p = logic.getParameterNode()
    p.upperClipPercentile = 99.99
    logic.train(manifest, tmp_path / "run", folds=[0, 1], epochs=2, device="cpu", installDependencies=False)
    assert "--clip-percentiles 1 99.99" in " ".join(FakeJob.commands[-1])
    p.upperClipPercentile, p.manifestPath, p.outputFolder, p.folds = 99.5, manifest, tmp_path / "run2", "3"
    logic.train(parameters=p, installDependencies=False)
    assert " ".join(FakeJob.commands[-1]).endswith(
        "--folds 3 --epochs 300 --device auto --clip-percentiles 1 99.5 --progress json")
    assert logic.train(manifest, tmp_path / "run3", upperClipPercentile=99.0, installDependencies=False)
    assert "--clip-percentiles 1 99 " in " ".join(FakeJob.commands[-1])


def test_unchosen_paths_are_said_plainly(training, scene, manifest):
    logic = training.ContrastAmplifierTrainingLogic()
    p = logic.getParameterNode()  # manifestPath, outputFolder: Path() -> "."
    with pytest.raises(ValueError, match="No manifest selected"):
        logic.fitCommandFromParameters(p)
    p.manifestPath = manifest
    with pytest.raises(ValueError, match="No output folder selected"):
        logic.fitCommandFromParameters(p)
    p.folds = "a b"
    with pytest.raises(ValueError, match="whole numbers"):
        logic.fitCommandFromParameters(p)


def test_module_self_test_runs_headless(training, scene):
    training.ContrastAmplifierTrainingTest().runTest()


# -- 2. Export and add to models ------------------------------------------------------------------


def _fit(run: Path, folds):
    import torch

    from ContrastAmplifierLib.network import NetworkConfig
    from ContrastAmplifierTrainingLib.fit import fit_cases
    from ContrastAmplifierTrainingLib.toy import toy_cohort
    from ContrastAmplifierTrainingLib.trainer import TrainConfig

    torch.set_num_threads(1)
    config = TrainConfig(epochs=1, seed=0, network=NetworkConfig(base_channels=4, levels=2), device="cpu")
    fit_cases(toy_cohort(4, (16, 16, 16), seed=3), run, folds=folds, n_folds=2, config=config)


def test_export_and_add_to_models_after_a_tiny_fit(training, scene, tmp_path, user_models):
    from ContrastAmplifierLib import registry
    from ContrastAmplifierLib.bundle import BundleError, load_bundle

    logic = training.ContrastAmplifierTrainingLogic()
    run = tmp_path / "toy run"
    p = logic.getParameterNode()
    p.outputFolder = run
    assert logic.exportProblem(run) == f"{run} holds no training run: train into it first."

    _fit(run, [0])  # fold 1 of the 2-fold split is missing: refused, nothing installed
    with pytest.raises(ValueError, match=r"Folds 1 of .*toy run have not finished \(finished: 0\).*Folds: '1'"):
        logic.exportAndAddModel(installDependencies=False)
    assert not user_models.exists() or not any(user_models.iterdir())

    _fit(run, [1])
    assert logic.exportProblem(run) is None
    assert logic.exportModelName(p) == "toy-run"  # from the folder's name, as a registry name
    bundle = logic.exportAndAddModel(installDependencies=False)
    assert bundle.name == "toy-run" and bundle.folds == [0, 1]
    assert bundle.path == user_models / "toy-run" and logic.userModelPath("toy-run") == bundle.path
    entry = next(e for e in registry.list_models() if e.name == "toy-run")  # what Contrast Amplifier's selector lists
    assert entry.source == "user" and entry.folds == (0, 1) and "not for clinical use" in entry.intended_use
    again = registry.resolve_model("toy-run")  # loaded with every file's SHA-256 checked
    assert again.folds == [0, 1] and json.loads((bundle.path / "bundle.json").read_text(encoding="utf-8"))["files"]
    assert not registry.default_model_file().exists(), "adding a model never changes the default"

    with pytest.raises(BundleError, match="already installed"):
        logic.exportAndAddModel(run, "toy-run", installDependencies=False)
    p.modelName = "toy.v2"
    assert logic.exportAndAddModel(installDependencies=False).path == user_models / "toy.v2"
    assert logic.exportAndAddModel(run, "toy-run", overwrite=True, installDependencies=False).folds == [0, 1]
    assert load_bundle(user_models / "toy-run").name == "toy-run"
    with pytest.raises(ValueError, match="Model name 'bad name' is not valid"):
        logic.exportAndAddModel(run, "bad name", installDependencies=False)
    assert sorted(p.name for p in user_models.iterdir() if not p.name.startswith(".")) == ["toy-run", "toy.v2"]


def test_export_refuses_a_folder_without_a_readable_plan(training, scene, tmp_path, user_models):
    logic = training.ContrastAmplifierTrainingLogic()
    run = tmp_path / "run"
    run.mkdir()
    (run / run_status.PLAN_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="plan of .* is unreadable"):
        logic.exportAndAddModel(run, "x", installDependencies=False)
    with pytest.raises(ValueError, match="No output folder selected"):
        logic.exportAndAddModel("", "x", installDependencies=False)


# -- 3. the panel reads nothing again while the user types -----------------------------------------


class FakeWidget(SimpleNamespace):
    """Any .ui widget: takes the properties the module sets (text, enabled, toolTip, ...)."""


def fake_ui() -> SimpleNamespace:
    names = ("startButton", "stopButton", "exportButton", "statusLabel", "lossesLabel", "progressBar", "foldTable",
             "logTextEdit")
    return SimpleNamespace(**{name: FakeWidget(text="", enabled=False, toolTip="") for name in names})


class Counter:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture()
def panel(training, scene, monkeypatch):
    """The Widget with stand-in widgets, bound like connectGui does, counting CLI probes and run-folder reads."""
    probes = Counter(process.available_cli_commands)
    reads = Counter(run_status.read_run_status)
    monkeypatch.setattr(process, "available_cli_commands", probes)
    monkeypatch.setattr(run_status, "read_run_status", reads)
    monkeypatch.setattr(training.ContrastAmplifierTrainingLogic, "_commandsCache", {})  # a new session
    wrapper = training.ContrastAmplifierTrainingParameterNode
    monkeypatch.setattr(wrapper, "connectGui", lambda self, gui: "tag")  # Qt-free: the connectors' writes are done by hand
    monkeypatch.setattr(wrapper, "disconnectGui", lambda self, tag: None, raising=False)
    widget = training.ContrastAmplifierTrainingWidget()
    widget.logic = training.ContrastAmplifierTrainingLogic()
    widget.ui = fake_ui()
    tables = []
    monkeypatch.setattr(widget, "_fillFoldTable", lambda rows: tables.append(list(rows)))
    return SimpleNamespace(widget=widget, probes=probes, reads=reads, tables=tables)


def test_typing_in_a_field_reads_nothing_again(panel, tmp_path, manifest):
    run = tmp_path / "run"
    run_status.fold_dir(run, 0).mkdir(parents=True)
    (run / run_status.PLAN_FILE).write_text(json.dumps({"n_folds": 2}), encoding="utf-8")
    (run_status.fold_dir(run, 0) / run_status.LOG_FILE).write_text("fold,epoch,train_loss\n0,1,0.5\n", encoding="utf-8")
    (run_status.fold_dir(run, 0) / run_status.DONE_FILE).write_text(json.dumps({"fold": 0, "epochs": 1}), encoding="utf-8")

    widget = panel.widget
    widget.initializeParameterNode()
    p = widget._parameterNode
    p.manifestPath, p.outputFolder = manifest, run  # each write: ModifiedEvent -> _checkCanApply
    assert widget.ui.startButton.text == "Resume training" and widget.ui.startButton.enabled
    assert not widget.ui.exportButton.enabled and "Folds 1 of" in widget.ui.exportButton.toolTip
    assert panel.tables[-1][0].epochs_done == 1
    probes, reads = panel.probes.calls, panel.reads.calls
    assert probes == 1, "the command line is probed once per session"

    for text in ("0", "0 ", "0 1", "0 1 2", "0 1 2 3"):  # a QLineEdit's connector writes on every keystroke
        p.folds = text
    for value in (99.1, 99.2, 99.25):
        p.upperClipPercentile = value
    p.epochs, p.device, p.modelName = 12, "cpu", "my-model"
    assert (panel.probes.calls, panel.reads.calls) == (probes, reads), "typing re-imported the CLI or re-read the run"
    assert "'my-model'" not in widget.ui.exportButton.toolTip  # still refused: fold 1 is missing

    widget.enter()  # back to the module: files unchanged on disk -> stat only, no read
    assert panel.reads.calls == reads
    (run_status.fold_dir(run, 0) / run_status.LOG_FILE).write_text(
        "fold,epoch,train_loss\n0,1,0.5\n0,2,0.25\n", encoding="utf-8")
    widget.enter()  # a file changed (size, mtime): read again
    assert panel.reads.calls == reads + 1 and panel.tables[-1][0].epochs_done == 2
    p.outputFolder = tmp_path / "elsewhere"  # another folder: read it once, the buttons follow
    assert panel.reads.calls == reads + 2 and widget.ui.startButton.text == "Start training"
    p.folds = "0 1"
    assert panel.reads.calls == reads + 2 and panel.probes.calls == probes


def test_a_failed_probe_is_not_kept(training, panel, monkeypatch):
    """Packages missing: the probe raises ImportError; after installing, the next probe sees the CLI."""
    calls = []

    def missing(module):
        calls.append(module)
        raise ImportError("No module named 'typer'")

    monkeypatch.setattr(process, "available_cli_commands", missing)
    logic = training.ContrastAmplifierTrainingLogic()
    assert logic.trainingAvailability()[0] and "not installed yet" in logic.trainingAvailability()[1]
    assert len(calls) == 2
    monkeypatch.setattr(process, "available_cli_commands", panel.probes)
    assert logic.trainingAvailability() == (True, "Ready: runs 'contrast-amplifier-train fit' in a background process.")
    logic.trainingAvailability()
    assert panel.probes.calls == 1


# -- 4. user-visible text goes through _() ---------------------------------------------------------

#: Properties and calls whose text the user reads.
TEXT_PROPERTIES = {"text", "toolTip", "title", "helpText", "acknowledgementText", "placeholderText", "windowTitle"}
TEXT_CALLS = {"errorDisplay", "warningDisplay", "infoDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay",
              "tryWithErrorDisplay", "setHorizontalHeaderLabels", "appendPlainText", "setText", "setToolTip"}


def _raw_text(node) -> bool:
    """A literal the user would read untranslated: a str constant or f-string with words in it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(re.search(r"[A-Za-z]{2}", node.value))
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.Constant) and re.search(r"[A-Za-z]{2}", v.value) for v in node.values)
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_raw_text(e) for e in node.elts)
    if isinstance(node, ast.BinOp):
        return _raw_text(node.left) or _raw_text(node.right)
    return False


def untranslated_strings(tree: ast.AST) -> list:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            found += [(node.lineno, "raise") for a in node.exc.args if _raw_text(a)]
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr in TEXT_PROPERTIES and _raw_text(node.value):
                    found.append((node.lineno, target.attr))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in TEXT_CALLS and any(_raw_text(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and _raw_text(node.value):
            found.append((node.lineno, "return"))
    return sorted(found)


def test_user_visible_strings_are_translatable():
    source = MODULE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert "from ContrastAmplifierCommon.slicer_compat import tr as _" in source
    assert untranslated_strings(tree) == [], "wrap these in _() (ContrastAmplifierCommon.slicer_compat.tr)"
    # _() takes literals (lupdate reads them) and placeholders are filled after translation, never an f-string
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_":
            assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), f"line {node.lineno}: _() of a non-literal"


def test_the_text_check_catches_the_old_style():
    old = ast.parse('raise ValueError(f"Epochs must be at least 1 (got {epochs}).")\n'
                    'self.ui.statusLabel.text = "Training started..."\n'
                    'table.setHorizontalHeaderLabels(["Fold", "Epochs"])\n'
                    'return False, "not installed"\n'.replace("return", "def f():\n    return"))
    assert [kind for _, kind in untranslated_strings(old)] == ["raise", "text", "setHorizontalHeaderLabels", "return"]
    ok = ast.parse('raise ValueError(_("Epochs must be at least 1 (got {epochs}).").format(epochs=epochs))\n'
                   'self.ui.statusLabel.text = f"{event.stage}: {event.message}"\n')
    assert untranslated_strings(ok) == []


def test_gui_is_disconnected_on_exit_even_where_connectGui_returns_no_tag(training, panel, monkeypatch):
    """Slicer 5.6/5.8's connectGui returns None (fixed in 5.10): the widget takes the wrapper's last tag,
    so exit() really unbinds the widgets instead of stacking one more set of connectors per enter()."""
    wrapper = training.ContrastAmplifierTrainingParameterNode
    connected, disconnected = [], []

    def connect(self, gui):  # what Slicer 5.8's _connectGui does: register the connection under the next tag, return nothing
        self._nextParameterGUIsTag = getattr(self, "_nextParameterGUIsTag", 0) + 1
        connected.append(self._nextParameterGUIsTag - 1)

    monkeypatch.setattr(wrapper, "connectGui", connect)
    monkeypatch.setattr(wrapper, "disconnectGui", lambda self, tag: disconnected.append(tag), raising=False)
    widget = panel.widget
    for _ in range(3):
        widget.enter()
        widget.exit()
    # a new wrapper per enter(), each unbound on exit() (the next enter()'s disconnectGui(None) is the template's no-op)
    assert connected == [0, 0, 0] and [t for t in disconnected if t is not None] == [0, 0, 0]
    node = widget._parameterNode.parameterNode
    assert not widget.hasObserver(node, training.vtk.vtkCommand.ModifiedEvent, widget._checkCanApply)
    widget.enter()
    assert widget.hasObserver(node, training.vtk.vtkCommand.ModifiedEvent, widget._checkCanApply)


def test_closing_slicer_during_a_fit_stops_it_within_seconds(training, scene, tmp_path):
    """Widget cleanup (application close) uses CLOSE_GRACE_S, not the 30 s Stop grace: a child
    that ignores SIGTERM (like a fit in the middle of an epoch) is killed and the call returns."""
    import time

    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        "print('ready', flush=True)\ntime.sleep(120)\n", encoding="utf-8")
    job = process.BackgroundProcess([sys.executable, str(stubborn)]).start()
    time.sleep(0.5)
    logic = training.ContrastAmplifierTrainingLogic()
    assert logic.CLOSE_GRACE_S <= 5 < logic.STOP_GRACE_S
    started = time.monotonic()
    logic.stopTraining(job, wait=True, grace_s=logic.CLOSE_GRACE_S)
    elapsed = time.monotonic() - started
    assert not job.running
    assert elapsed < logic.CLOSE_GRACE_S + process.KILL_WAIT_S + 2.0, elapsed
    # the widget's cleanup passes exactly that grace
    source = MODULE.read_text(encoding="utf-8")
    cleanup = source[source.index("    def cleanup(self)"):]
    assert "grace_s=self.logic.CLOSE_GRACE_S" in cleanup.split("\n    def ", 1)[0]
