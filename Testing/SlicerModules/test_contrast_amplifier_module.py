"""The ContrastAmplifier module as a Slicer user gets it, headless (slicer-core, no Qt).

What the panel does goes through the Logic, so it is checked here without the application:
Apply's output node per run (never the previous patient's), the result's place in the subject
hierarchy and its side-by-side display, Add model (hash-checked, tampered bundles refused with
a message), the model info line, the panel working before the first-use install (no platformdirs,
no jsonschema), no SimpleITK at start-up, no exported images left when a child cannot start, and
the Sample Data entry that generates a phantom case.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
sitk = pytest.importorskip("SimpleITK")

from ContrastAmplifierCommon import process  # noqa: E402

from ContrastAmplifierLib import mrml_bridge, registry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "ContrastAmplifier" / "ContrastAmplifier.py"


@pytest.fixture(scope="module")
def ca():
    spec = importlib.util.spec_from_file_location("_slicer_module_ContrastAmplifier_panel", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the parameter wrapper look their module up
    spec.loader.exec_module(module)
    return module


def patient(scene, name: str, seed: int, shape=(6, 7, 8)):
    """Four small volumes of one patient: '<name> T1', ..., '<name> T1c'."""
    rng = np.random.default_rng(seed)
    nodes = {}
    for i, stem in enumerate(("t1", "flair", "adc", "t1c")):
        image = sitk.GetImageFromArray((rng.random(shape) * 1000).astype(np.float32))
        image.SetSpacing((1.0, 1.2, 2.0))
        image.SetOrigin((seed + i, -5.0, 3.0))
        nodes[stem] = mrml_bridge.add_volume_node_from_sitk(image, f"{name} {stem.upper()}", scene=scene)
    return nodes


#: Stands in for `contrast-amplifier predict`: writes 2 x T1c (atomically enough for the test) where --out says.
FAKE_PREDICT = textwrap.dedent(
    """
    import json, sys
    import SimpleITK as sitk
    t1c, out = sys.argv[1], sys.argv[2]
    print(json.dumps({"stage": "ensemble", "fraction": 0.5, "message": ""}), flush=True)
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(t1c), sitk.sitkFloat32) * 2.0, out)
    print(json.dumps({"stage": "done", "fraction": 1.0, "message": ""}), flush=True)
    """
)


@pytest.fixture()
def fake_predict(ca, tmp_path, monkeypatch):
    script = tmp_path / "fake_predict.py"
    script.write_text(FAKE_PREDICT, encoding="utf-8")

    def command(self, inputs, outPath, **options):
        return [sys.executable, str(script), str(inputs["t1c"]), str(outPath)]

    monkeypatch.setattr(ca.ContrastAmplifierLogic, "predictCommand", command)
    return script


def select(parameters, nodes):
    parameters.InputT1, parameters.InputFLAIR, parameters.InputADC, parameters.InputT1c = (
        nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"])


def apply(logic, parameters):
    """What the panel's Apply does (onApplyButton, then the timer's _finishAmplify)."""
    job = logic.startAmplifyFromParameters(parameters, installDependencies=False)
    assert job.process.wait(timeout=120) is process.ProcessState.SUCCEEDED, job.process.stderr_text
    return logic.finishAmplify(job, parameters), job


def voxels(node):
    return slicer.util.arrayFromVolume(node).copy()


# -- 4. a new T1c-pro per Apply ----------------------------------------------------------------


def test_each_apply_makes_its_own_t1c_pro_and_never_reuses_the_previous_patients(ca, scene, fake_predict, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    assert parameters.OutputVolume is None  # the selector's "Create new volume"
    first = patient(scene, "Patient A", 1)
    select(parameters, first)
    resultA, _ = apply(logic, parameters)
    assert resultA.GetName() == "Patient A T1C T1c-pro"
    assert parameters.OutputVolume is None, "the output selector must not keep the result: the next Apply would overwrite it"
    keptA = voxels(resultA)
    np.testing.assert_allclose(keptA, 2 * voxels(first["t1c"]), rtol=1e-6)

    second = patient(scene, "Patient B", 2)
    select(parameters, second)
    resultB, _ = apply(logic, parameters)
    assert resultB is not resultA and resultB.GetName() == "Patient B T1C T1c-pro"
    assert resultA.GetName() == "Patient A T1C T1c-pro" and np.array_equal(voxels(resultA), keptA), "patient A's result changed"

    again, _ = apply(logic, parameters)  # the same patient twice: a second volume, named apart
    assert again is not resultB and again.GetName().startswith("Patient B T1C T1c-pro") and again.GetName() != resultB.GetName()
    assert list(exchange_root.iterdir()) == [], "exported images and results are removed after loading"


def test_a_chosen_output_volume_is_used_once_then_the_selector_goes_back_to_create(ca, scene, fake_predict, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    nodes = patient(scene, "Patient A", 1)
    select(parameters, nodes)
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my T1c-pro")
    parameters.OutputVolume = chosen  # picked explicitly in the selector
    result, _ = apply(logic, parameters)
    assert result is chosen and chosen.GetName() == "my T1c-pro"
    assert parameters.OutputVolume is None
    following, _ = apply(logic, parameters)
    assert following is not chosen and following.GetName() == "Patient A T1C T1c-pro"


def test_a_failed_apply_keeps_the_chosen_output(ca, scene, tmp_path, monkeypatch, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nprint('error: no GPU', file=sys.stderr)\nsys.exit(2)\n", encoding="utf-8")
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "predictCommand", lambda self, *a, **k: [sys.executable, str(failing)])
    parameters = logic.getParameterNode()
    select(parameters, patient(scene, "Patient A", 1))
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my T1c-pro")
    parameters.OutputVolume = chosen
    job = logic.startAmplifyFromParameters(parameters, installDependencies=False)
    job.process.wait(timeout=60)
    assert logic.finishAmplify(job, parameters) is None and "no GPU" in job.error
    assert parameters.OutputVolume is chosen  # the user's choice stays for the retry


# -- 5. the result in the T1c's study, beside the T1c ----------------------------------------------


def test_result_joins_the_t1c_study_and_is_shown_linked_beside_it(ca, scene, fake_predict, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes = patient(scene, "Patient A", 1)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    subject = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient A")
    study = shNode.CreateStudyItem(subject, "MRI 2024-01-02")
    other = shNode.CreateStudyItem(subject, "MRI 2023-05-06")
    for node in nodes.values():
        shNode.CreateItem(study, node)
    # what the application's scene holds: a layout node and the slice views' composite nodes
    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    composites = {}
    for view in ("Red", "Yellow", "Green"):
        composites[view] = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composites[view].SetLayoutName(view)
    display = nodes["t1c"].GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(640.0, 310.0)

    parameters = logic.getParameterNode()
    select(parameters, nodes)
    result, _ = apply(logic, parameters)

    item = shNode.GetItemByDataNode(result)
    assert item and shNode.GetItemParent(item) == study != other, "T1c-pro belongs to the T1c's study"
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert composites["Red"].GetBackgroundVolumeID() == nodes["t1c"].GetID()
    assert composites["Yellow"].GetBackgroundVolumeID() == result.GetID()
    assert composites["Red"].GetLinkedControl() and composites["Yellow"].GetLinkedControl()
    assert composites["Green"].GetBackgroundVolumeID() is None
    shown = result.GetDisplayNode()
    assert not shown.GetAutoWindowLevel() and (shown.GetWindow(), shown.GetLevel()) == (640.0, 310.0)


def test_batch_mode_result_without_subject_hierarchy_items_still_loads(ca, scene, fake_predict, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes = patient(scene, "Patient A", 1)
    result = logic.process(*nodes.values(), quality="balanced", installDependencies=False, timeout=120)
    assert result.GetName() == "Patient A T1C T1c-pro"


# -- 6. start-up imports, and no patient data left when a child cannot start ----------------------


def test_loading_the_module_file_imports_no_simpleitk():
    """Slicer loads every module file at start-up: SimpleITK (and the MRML bridge, the registry's
    bundle checks, torch) are imported when a button needs them, not then."""
    code = textwrap.dedent(f"""
        import importlib.util, sys, types
        spec = importlib.util.spec_from_file_location("ContrastAmplifier", {str(MODULE_FILE)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["ContrastAmplifier"] = module
        spec.loader.exec_module(module)
        module.ContrastAmplifier(types.SimpleNamespace())
        logic = module.ContrastAmplifierLogic()
        print(sorted(name for name in ("SimpleITK", "torch", "jsonschema", "ContrastAmplifierLib.mrml_bridge") if name in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported at start-up: {done.stdout.strip()}"


def test_exported_images_are_deleted_when_the_child_cannot_start(ca, scene, tmp_path, monkeypatch, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes = patient(scene, "Patient A", 1)
    missing = [str(tmp_path / "no-such-python"), "-m", "ContrastAmplifierLib.cli"]
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "preprocessCommand", lambda self, *a, **k: missing)
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "predictCommand", lambda self, *a, **k: missing)
    with pytest.raises(process.ProcessError, match="could not start"):
        logic.startPreprocess(*nodes.values(), installDependencies=False)
    assert list(exchange_root.iterdir()) == [], "Preprocess left exported patient images in the temporary folder"
    with pytest.raises(process.ProcessError, match="could not start"):
        logic.startAmplify(*nodes.values(), quality="balanced", installDependencies=False)
    assert list(exchange_root.iterdir()) == [], "Apply left exported patient images in the temporary folder"
    given = tmp_path / "work"
    with pytest.raises(process.ProcessError):
        logic.startPreprocess(*nodes.values(), workDir=given, installDependencies=False)
    assert not given.exists()


# -- 3. Add model and the model line -----------------------------------------------------------------


def test_model_info_line_shows_version_geometry_folds_and_intended_use(ca):
    logic = ca.ContrastAmplifierLogic()
    entry = logic.findModel("phantom-demo")
    info = logic.modelInfo(entry)
    assert info == ("phantom-demo 0.2.0 - 3 mm grid - crop 56 x 64 x 56 voxels - folds 0, 1, 2, 3, 4 - "
                    "synthetic phantom demo - not for clinical use")
    assert logic.modelSummary(entry) == "phantom-demo 0.2.0: synthetic phantom demo - not for clinical use"
    assert logic.bundleFolds("phantom-demo") == [0, 1, 2, 3, 4] == logic.bundleFolds(str(entry.path))
    odd = registry.ModelEntry("odd", "1", "", "", Path("x"), "user", (2,), (0.8, 0.8, 2.5), (96, 96, 48))
    assert logic.modelInfo(odd) == "odd 1 - 0.8 x 0.8 x 2.5 mm grid - crop 96 x 96 x 48 voxels - folds 2 - intended use not stated"


def _tampered_copy(bundle_dir: Path, target: Path) -> Path:
    copy = Path(shutil.copytree(bundle_dir, target))
    weights = copy / "fold1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


def test_add_model_installs_a_checked_bundle_and_refuses_a_tampered_one(ca, random_bundle_dir, tmp_path, user_models):
    logic = ca.ContrastAmplifierLogic()
    tampered = _tampered_copy(random_bundle_dir, tmp_path / "tampered")
    entry, message = logic.addModel(tampered / "bundle.json", installDependencies=False)
    assert entry is None
    assert message.startswith("The model was not added.")
    assert "fold1.safetensors" in message and "SHA-256" in message and "modified or corrupted" in message
    assert not (user_models / "random-tiny").exists() and "random-tiny" not in [e.name for e in logic.availableModels()]

    entry, message = logic.addModel(random_bundle_dir / "bundle.json", installDependencies=False)  # what the file dialog gives
    assert entry.name == "random-tiny" and entry.source == "user" and entry.path == user_models / "random-tiny"
    assert message == f"Added model {logic.modelInfo(entry)}."
    assert [e.name for e in logic.availableModels()][:1] == ["random-tiny"]

    asked = []
    entry, message = logic.addModel(random_bundle_dir, confirmReplace=lambda q: asked.append(q) or False, installDependencies=False)
    assert entry is None and "is installed already and was kept" in message
    assert asked and "A model named 'random-tiny' is already installed" in asked[0]
    zipped = shutil.make_archive(str(tmp_path / "bundle"), "zip", random_bundle_dir.parent, random_bundle_dir.name)
    entry, _ = logic.addModel(zipped, confirmReplace=lambda q: True, installDependencies=False)
    assert entry.name == "random-tiny"


def _ui_strings() -> list:
    root = ET.parse(REPO / "ContrastAmplifier" / "Resources" / "UI" / "ContrastAmplifier.ui").getroot()
    return [s.text or "" for s in root.iter("string")]


def _translated_strings(tree: ast.AST) -> list:
    return [node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "_" and node.args and isinstance(node.args[0], ast.Constant)]


def test_panel_has_add_model_and_names_no_console_script():
    """Inside Slicer there is no `contrast-amplifier` command: the panel offers Add model instead."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    panel_texts = _ui_strings() + _translated_strings(tree)
    offending = [text for text in panel_texts if "contrast-amplifier" in text]
    assert not offending, f"the panel tells users to run a console script: {offending}"
    root = ET.parse(REPO / "ContrastAmplifier" / "Resources" / "UI" / "ContrastAmplifier.ui").getroot()
    assert any(w.get("name") == "addModelButton" and w.get("class") == "QPushButton" for w in root.iter("widget"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ContrastAmplifierWidget")
    assert "addModel" in {n.func.attr for n in ast.walk(widget) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


def test_user_visible_strings_go_through_tr():
    """Messages the Logic raises and the panel shows are wrapped in _() (Slicer's tr); f-strings are not
    (translations are looked up by the literal text), so placeholders use str.format."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and _last_name(node.exc.func) in ("ValueError", "FileNotFoundError", "TimeoutError"):
            argument = node.exc.args[0] if node.exc.args else None
            assert argument is not None and "_(" in ast.unparse(argument), f"line {node.lineno}: raise {ast.unparse(node.exc)[:80]}"
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_"):
        assert isinstance(call.args[0], ast.Constant), f"line {call.lineno}: _() of a computed string (f-string?)"


def _last_name(node) -> str:
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")


# -- 2. the panel before the first-use install -------------------------------------------------------


def test_panel_lists_and_describes_models_without_platformdirs_or_jsonschema(tmp_path):
    """Slicer ships neither: filling the model selector, its info line and Quick's fold must not need them."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        for name in ("platformdirs", "jsonschema", "torch", "safetensors"):
            sys.modules[name] = None  # not installed yet
        import slicer
        slicer.mrmlScene = slicer.vtkMRMLScene()
        spec = importlib.util.spec_from_file_location("ContrastAmplifier", {str(MODULE_FILE)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["ContrastAmplifier"] = module
        spec.loader.exec_module(module)
        logic = module.ContrastAmplifierLogic()
        models = logic.availableModels()
        print(logic.defaultModelName())
        print(logic.modelInfo(models[0]))
        print(logic.ensembleChoice("quick", "phantom-demo"))
    """)
    env = {k: v for k, v in os.environ.items() if k != registry.ENV_MODELS}
    env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    default, info, quick = done.stdout.splitlines()
    assert default == "phantom-demo-1.5mm" and info.startswith("phantom-demo-1.5mm ") and "folds 0, 4" in info and quick == "([0], 1)"


# -- 7. Slicer 5.x conventions ------------------------------------------------------------------------


def test_parameters_are_typed_and_stored_like_slicers_serializers(ca, scene):
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    assert isinstance(parameters, ca.ContrastAmplifierParameterNode)
    node = parameters.parameterNode
    assert (parameters.Quality, parameters.Device, parameters.QualityControl, parameters.Model) == ("Paper", "auto", True, "")
    assert (parameters.DicomOutputFolder, parameters.PacsTarget) == (Path("."), ""), "no DICOM output, nothing sent"
    parameters.DicomOutputFolder, parameters.PacsTarget = Path("/data/T1c-pro"), SEND_TARGET
    assert node.GetParameter("DicomOutputFolder") == "/data/T1c-pro" and node.GetParameter("PacsTarget") == SEND_TARGET
    parameters.QualityControl = False
    parameters.Quality = "Quick"
    assert node.GetParameter("QualityControl") == "False" and node.GetParameter("Quality") == "Quick"
    with pytest.raises(ValueError):
        parameters.Quality = "Best"
    with pytest.raises(ValueError):
        parameters.Device = "tpu"
    label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    parameters.InputBrainMask = label_map  # a label map is a scalar volume: the mask selector shows both
    assert logic.getParameterNode().InputBrainMask is label_map
    assert [label for label in ca.QUALITY_LABELS] == [p.label for p in ca.QUALITY_PRESETS.values()]


# -- 8. Sample Data: a generated phantom ---------------------------------------------------------------

#: registerCustomSampleDataSource's parameters in Slicer 5.6.2 and 5.8.1 (Modules/Scripted/SampleData/SampleData.py).
SAMPLE_DATA_SIGNATURES = {
    "5.6.2": "category='Custom', sampleName=None, uris=None, fileNames=None, nodeNames=None, customDownloader=None, "
             "thumbnailFileName=None, loadFileType='VolumeFile', loadFiles=None, loadFileProperties={}, checksums=None",
    "5.8.1": "category='Custom', sampleName=None, uris=None, fileNames=None, nodeNames=None, customDownloader=None, "
             "thumbnailFileName=None, loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None, loadFileType=None",
}


def fake_sample_data(version: str):
    """A SampleData module whose SampleDataLogic has Slicer <version>'s registration signature."""
    registered = {}
    namespace: dict = {}
    exec(f"def register({SAMPLE_DATA_SIGNATURES[version]}):\n    return locals()\n", namespace)
    signature = inspect.signature(namespace["register"])

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)  # TypeError for an argument that Slicer version lacks
            bound.apply_defaults()
            source = types.SimpleNamespace(**bound.arguments)
            registered.setdefault(source.category, []).append(source)

        @staticmethod
        def sampleDataSourcesByCategory(category=None):
            return registered.get(category, []) if category is not None else registered

    return types.SimpleNamespace(SampleDataLogic=SampleDataLogic), registered


@pytest.mark.parametrize("version", sorted(SAMPLE_DATA_SIGNATURES))
def test_phantom_is_registered_with_sample_data_of_slicer_5_6_and_5_8(ca, monkeypatch, version):
    module, registered = fake_sample_data(version)
    monkeypatch.setitem(sys.modules, "SampleData", module)
    ca.registerSampleData()
    ca.registerSampleData()  # a module reload registers nothing twice
    (source,) = registered[ca.PHANTOM_SAMPLE_CATEGORY]
    assert source.sampleName == ca.PHANTOM_SAMPLE_NAME and source.customDownloader is ca.loadPhantomSample
    assert Path(source.thumbnailFileName).is_file()
    assert isinstance(source.uris, str) and isinstance(source.fileNames, str)  # SampleDataSource pairs them


def test_no_sample_data_module_means_nothing_registered(ca, monkeypatch):
    monkeypatch.setitem(sys.modules, "SampleData", None)  # module disabled: import fails
    ca.registerSampleData()


def test_registration_waits_for_slicer_startup(ca, monkeypatch):
    calls = []
    monkeypatch.setattr(ca, "HAS_SLICER_APP", True)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda *args: calls.append(args)), raising=False)
    ca.ContrastAmplifier(types.SimpleNamespace())
    assert calls == [("startupCompleted()", ca.registerSampleData)]
    monkeypatch.setattr(ca, "HAS_SLICER_APP", False)
    ca.ContrastAmplifier(types.SimpleNamespace())
    assert len(calls) == 1  # headless: no application, nothing connected


def test_phantom_sample_is_generated_loaded_selected_and_its_files_removed(ca, scene, exchange_root, monkeypatch):
    from ContrastAmplifierLib.demo import DEMO_SEED

    assert ca.PHANTOM_SEED == DEMO_SEED  # the demo's case: never used to train the shipped model
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "ensureDependencies", lambda self: None)
    module, registered = fake_sample_data("5.8.1")
    monkeypatch.setitem(sys.modules, "SampleData", module)
    ca.registerSampleData()
    (source,) = registered[ca.PHANTOM_SAMPLE_CATEGORY]
    nodes = source.customDownloader(source)  # what the Sample Data button does
    assert sorted(nodes) == ["adc", "flair", "t1", "t1c", "t1c_x4"]
    assert nodes["t1c"].GetName() == "Phantom T1c" and nodes["t1c_x4"].GetName().startswith("Phantom T1c-x4")
    for node in nodes.values():
        assert node.GetScene() is scene and node.GetImageData() is not None
    parameters = ca.ContrastAmplifierLogic().getParameterNode()
    assert (parameters.InputT1, parameters.InputFLAIR, parameters.InputADC, parameters.InputT1c) == (
        nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"])
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    studies = {shNode.GetItemParent(shNode.GetItemByDataNode(node)) for node in nodes.values()}
    assert len(studies) == 1 and shNode.GetItemLevel(studies.pop()) == "Study"
    truth = voxels(nodes["t1c_x4"])
    assert truth.shape == voxels(nodes["t1c"]).shape and truth.max() > voxels(nodes["t1c"]).max()  # 4x dose enhances more
    assert list(exchange_root.iterdir()) == [], "the generated files are deleted once loaded"
    assert re.search(r"not clinical", shNode.GetItemName(shNode.GetItemParent(shNode.GetItemByDataNode(nodes["t1"]))))


# -- 9. DICOM output and sending to a PACS (issue 16) ----------------------------------------------------

#: Stands in for `contrast-amplifier predict ... [--out-dicom DIR] [--send TARGET]`: writes 2 x T1c where --out
#: says and a file into the series folder (the real series is checked by the command line's own tests and by
#: test_contrast_amplifier_logic.py); with an error message, fails after writing them, as a refused send does.
FAKE_PREDICT_DICOM = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import SimpleITK as sitk
    t1c, out, dicom, error, write = sys.argv[1:6]
    if write == "yes":
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(t1c), sitk.sitkFloat32) * 2.0, out)
        if dicom:
            Path(dicom).mkdir(parents=True, exist_ok=True)
            (Path(dicom) / "IM00001.dcm").write_bytes(b"a stand-in for the series")
    print(json.dumps({"stage": "done", "fraction": 1.0, "message": ""}), flush=True)
    if error:
        print("error: " + error, file=sys.stderr)
        sys.exit(1)
    """
)

SEND_TARGET = "dicom://PACS@localhost:104"


@pytest.fixture()
def recording_predict(ca, tmp_path, monkeypatch):
    """The real predictCommand is built (and recorded with its options and the T1c DICOM files handed to it);
    the fake command above runs in its place. ``state["error"]`` makes it fail, ``state["write"]`` = "no" before writing."""
    script = tmp_path / "fake_predict_dicom.py"
    script.write_text(FAKE_PREDICT_DICOM, encoding="utf-8")
    real = ca.ContrastAmplifierLogic.predictCommand
    calls: list = []
    state = {"error": "", "write": "yes"}

    def command(self, inputs, outPath, **options):
        t1cDicom = options.get("t1cDicom")
        calls.append(types.SimpleNamespace(
            command=real(self, inputs, outPath, **options), options=options,
            t1cDicomFiles=sorted(p.name for p in Path(t1cDicom).iterdir()) if t1cDicom else []))
        dicom = options.get("dicomOutput")
        return [sys.executable, str(script), str(inputs["t1c"]), str(outPath), str(dicom or ""), state["error"], state["write"]]

    monkeypatch.setattr(ca.ContrastAmplifierLogic, "predictCommand", command)
    monkeypatch.setitem(sys.modules, "DICOMLib", None)  # as in batch mode and under slicer-core: no DICOM module
    return types.SimpleNamespace(calls=calls, state=state)


def run_apply(logic, parameters, state=process.ProcessState.SUCCEEDED):
    job = logic.startAmplifyFromParameters(parameters, installDependencies=False)
    assert job.process.wait(timeout=120) is state, job.process.stderr_text
    return logic.finishAmplify(job, parameters), job


def loaded_from_dicom(node, uids) -> None:
    """What Slicer's DICOM scalar-volume plugin leaves on a volume it loaded."""
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))


def test_predict_command_adds_the_dicom_output_the_t1c_series_and_the_pacs(ca, tmp_path):
    logic = ca.ContrastAmplifierLogic()
    files = {stem: tmp_path / f"{stem}.nrrd" for stem in ("t1", "flair", "adc", "t1c")}
    command = logic.predictCommand(files, tmp_path / "out.nrrd", dicomOutput=tmp_path / "series",
                                   t1cDicom=tmp_path / "t1c_dicom", sendTo=SEND_TARGET)
    joined = " ".join(command)
    for part in (f"--out {tmp_path / 'out.nrrd'}", f"--out-dicom {tmp_path / 'series'}",
                 f"--t1c-dicom {tmp_path / 't1c_dicom'}", f"--send {SEND_TARGET}"):
        assert part in joined
    assert command[-2:] == ["--progress", "json"]
    plain = " ".join(logic.predictCommand(files, tmp_path / "out.nrrd"))
    assert "--out-dicom" not in plain and "--t1c-dicom" not in plain and "--send" not in plain
    assert "--t1c-dicom" not in " ".join(logic.predictCommand(files, tmp_path / "o.nrrd", dicomOutput=tmp_path / "s"))
    with pytest.raises(ValueError, match="The T1c's DICOM series is only used for a DICOM output"):
        logic.predictCommand(files, tmp_path / "o.nrrd", t1cDicom=tmp_path / "t1c_dicom")
    with pytest.raises(ValueError, match="Sending to a PACS needs a DICOM series"):
        logic.predictCommand(files, tmp_path / "o.nrrd", sendTo=SEND_TARGET)


def test_dicom_folder_and_one_new_series_folder_per_apply(ca, scene, tmp_path):
    logic = ca.ContrastAmplifierLogic()
    assert logic.getParameterNode().DicomOutputFolder == Path(".")  # the empty path parameter
    for nothing in (None, "", ".", Path(""), Path(".")):
        assert logic.dicomFolder(nothing) is None
    assert logic.dicomFolder("relative/series") == Path.cwd() / "relative" / "series"
    t1c = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Patient/A: T1c")
    first = logic.dicomSeriesFolder(tmp_path, t1c)
    assert first == tmp_path / "Patient_A_ T1c T1c-pro"
    first.mkdir()
    assert logic.dicomSeriesFolder(tmp_path, t1c) == first, "an empty folder is fine"
    (first / "IM00001.dcm").write_bytes(b"x")
    assert logic.dicomSeriesFolder(tmp_path, t1c) == tmp_path / "Patient_A_ T1c T1c-pro 2"
    (tmp_path / "Patient_A_ T1c T1c-pro 2").write_text("a file, not a folder")
    assert logic.dicomSeriesFolder(tmp_path, t1c) == tmp_path / "Patient_A_ T1c T1c-pro 3"


def test_t1c_dicom_files_come_from_the_database_or_the_reason_is_said(ca, scene, tmp_path, dicom_database, monkeypatch):
    logic = ca.ContrastAmplifierLogic()
    nodes = patient(scene, "Patient A", 1)
    t1c = nodes["t1c"]
    assert logic.t1cDicomFiles(t1c) == ([], "T1c 'Patient A T1C' was not loaded from DICOM")
    database, uids = dicom_database(mrml_bridge.volume_node_to_sitk(t1c), tmp_path / "db" / "series")
    loaded_from_dicom(t1c, uids)
    files, why = logic.t1cDicomFiles(t1c)  # slicer.dicomDatabase by default
    assert why == "" and files == [database.files[uid] for uid in uids] and len(files) == 6
    assert database.asked == uids

    copied, why = logic.copyT1cDicom(t1c, tmp_path / "exchange" / "t1c_dicom")
    assert why == "" and copied == tmp_path / "exchange" / "t1c_dicom"
    assert sorted(p.read_bytes() for p in copied.iterdir()) == sorted(p.read_bytes() for p in files)

    database.isOpen = False
    assert logic.t1cDicomFiles(t1c) == ([], "Slicer's DICOM database is not open")
    database.isOpen = True
    other = type(database)({})
    assert logic.t1cDicomFiles(t1c, other)[1] == "6 of 6 DICOM files of T1c 'Patient A T1C' were not found through the DICOM database"
    files[2].unlink()  # deleted behind the database's back
    assert logic.t1cDicomFiles(t1c)[1] == "1 of 6 DICOM files of T1c 'Patient A T1C' were not found through the DICOM database"
    assert logic.copyT1cDicom(t1c, tmp_path / "nothing")[0] is None and not (tmp_path / "nothing").exists()
    monkeypatch.setattr(slicer, "dicomDatabase", None, raising=False)
    assert logic.t1cDicomFiles(t1c) == ([], "Slicer's DICOM database is not available")
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t1c.SetAndObserveTransformNodeID(moved.GetID())
    assert "is under a transform" in logic.t1cDicomFiles(t1c, database)[1]


def test_send_without_a_dicom_folder_writes_the_series_in_the_exchange_folder(ca, scene, recording_predict, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    select(parameters, patient(scene, "Patient A", 1))
    parameters.PacsTarget = SEND_TARGET
    result, job = run_apply(logic, parameters)
    (call,) = recording_predict.calls
    assert call.options["dicomOutput"] == job.workDir / "result" / "dicom" and call.options["sendTo"] == SEND_TARGET
    assert call.options["t1cDicom"] is None, "the T1c was not loaded from DICOM: a new de-identified study"
    assert f"--send {SEND_TARGET}" in " ".join(call.command) and "--t1c-dicom" not in call.command
    assert result.GetName() == "Patient A T1C T1c-pro" and job.sendError is None
    assert not job.keepDicom and not job.importedToDatabase
    assert list(exchange_root.iterdir()) == [], "the series written only to be sent goes with the exchange folder"
    assert logic.dicomSummary(job) == ("DICOM series (a new de-identified study: T1c 'Patient A T1C' was not loaded from "
                                       f"DICOM) sent to {SEND_TARGET}.")
    parameters.PacsTarget = "   "  # blank: not sent, and no series
    run_apply(logic, parameters)
    assert recording_predict.calls[-1].options["dicomOutput"] is None and recording_predict.calls[-1].options["sendTo"] is None


def test_dicom_output_folder_gets_a_series_per_apply_in_the_t1c_study(ca, scene, tmp_path, recording_predict,
                                                                       dicom_database, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    nodes = patient(scene, "Patient A", 1)
    database, uids = dicom_database(mrml_bridge.volume_node_to_sitk(nodes["t1c"]), tmp_path / "db" / "series")
    loaded_from_dicom(nodes["t1c"], uids)
    select(parameters, nodes)
    parameters.DicomOutputFolder = tmp_path / "out"
    result, job = run_apply(logic, parameters)
    (call,) = recording_predict.calls
    series = tmp_path / "out" / "Patient A T1C T1c-pro"
    assert call.options["dicomOutput"] == series == job.dicomOutput and job.keepDicom
    assert call.options["t1cDicom"] == job.workDir / "case" / "t1c_dicom" and len(call.t1cDicomFiles) == len(uids) == 6
    assert f"--t1c-dicom {job.workDir / 'case' / 't1c_dicom'}" in " ".join(call.command) and "--send" not in call.command
    assert result is not None and [p.name for p in series.iterdir()] == ["IM00001.dcm"]
    assert job.importToDatabase and not job.importedToDatabase, "no DICOMLib here: nothing imported, nothing failed"
    assert logic.dicomSummary(job) == f"DICOM series in {series} (the T1c's study)."
    assert list(exchange_root.iterdir()) == [], "the copies of the T1c's DICOM files are removed with the exchange folder"
    assert all(path.is_file() for path in database.files.values()), "the database's own files are untouched"

    again, job = run_apply(logic, parameters)  # the next Apply never collides with the first series
    assert job.dicomOutput == tmp_path / "out" / "Patient A T1C T1c-pro 2" and (job.dicomOutput / "IM00001.dcm").is_file()
    assert [p.name for p in series.iterdir()] == ["IM00001.dcm"]


def test_a_failed_send_still_loads_the_result_and_says_why(ca, scene, tmp_path, recording_predict, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    select(parameters, patient(scene, "Patient A", 1))
    parameters.DicomOutputFolder = tmp_path / "out"
    parameters.PacsTarget = SEND_TARGET
    refused = f"PACS {SEND_TARGET} rejected the association (calling AE title CONTRASTAMP unknown)"
    recording_predict.state["error"] = refused
    result, job = run_apply(logic, parameters, process.ProcessState.FAILED)
    assert result is not None and result.GetName() == "Patient A T1C T1c-pro", "the computed T1c-pro is not thrown away"
    assert job.error is None and job.sendError == refused
    assert logic.dicomSummary(job) == (f"DICOM series in {job.dicomOutput} (a new de-identified study: T1c 'Patient A T1C' "
                                       f"was not loaded from DICOM) NOT sent to {SEND_TARGET}: {refused}.")
    assert (job.dicomOutput / "IM00001.dcm").is_file() and list(exchange_root.iterdir()) == []
    assert parameters.OutputVolume is None

    nodes = logic.inputNodes(parameters)
    with pytest.raises(process.ProcessError, match="T1c-pro 'Patient A T1C T1c-pro.*' was computed and loaded, but not sent to"):
        logic.process(*nodes.values(), quality="balanced", installDependencies=False, timeout=120,
                      dicomOutput=tmp_path / "batch", sendTo=SEND_TARGET)

    recording_predict.state["write"] = "no"  # failed before anything was written: an ordinary failure
    result, job = run_apply(logic, parameters, process.ProcessState.FAILED)
    assert result is None and job.error == refused and job.sendError is None
    assert list(exchange_root.iterdir()) == []


def test_dicom_output_and_pacs_widgets_are_in_the_outputs_section():
    root = ET.parse(REPO / "ContrastAmplifier" / "Resources" / "UI" / "ContrastAmplifier.ui").getroot()
    outputs = next(w for w in root.iter("widget") if w.get("name") == "outputsCollapsibleButton")
    widgets = {w.get("name"): w for w in outputs.iter("widget")}

    def prop(widget, name):
        found = [p for p in widget.findall("property") if p.get("name") == name]
        return (found[0][0].text or "") if found else None

    folder, pacs = widgets["dicomOutputFolderPathLineEdit"], widgets["pacsTargetLineEdit"]
    assert folder.get("class") == "ctkPathLineEdit" and prop(folder, "filters") == "ctkPathLineEdit::Dirs"
    assert pacs.get("class") == "QLineEdit" and prop(pacs, "placeholderText") == "URL or endpoint name; empty: do not send"
    assert (prop(folder, "SlicerParameterName"), prop(pacs, "SlicerParameterName")) == ("DicomOutputFolder", "PacsTarget")
    assert "DICOM" in prop(folder, "toolTip") and "PACS" in prop(pacs, "toolTip")
    assert prop(widgets["dicomOutputFolderLabel"], "text") == "DICOM output folder:"
    assert prop(widgets["pacsTargetLabel"], "text") == "Send to PACS:"


# -- 10. Precision int8 (OpenVINO + NNCF on the CPU) ----------------------------------------------------


def test_apply_with_precision_int8_passes_it_and_says_openvino(ca, scene, recording_predict, exchange_root):
    """The panel's Precision int8 reaches the command line Apply runs, and the status line names OpenVINO int8."""
    logic = ca.ContrastAmplifierLogic()
    parameters = logic.getParameterNode()
    select(parameters, patient(scene, "Patient I", 9))
    parameters.Device, parameters.Precision, parameters.Backend = "cpu", "int8", "auto"
    result, job = run_apply(logic, parameters)
    (call,) = recording_predict.calls
    assert call.options["precision"] == "int8" and call.options["device"] == "cpu" and call.options["backend"] == "auto"
    assert "--device cpu --precision int8 --backend auto" in " ".join(map(str, call.command))
    assert (job.backend, job.precision) == ("openvino", "int8") and result.GetName() == "Patient I T1C T1c-pro"
    assert ca.ContrastAmplifierWidget._startedText("Amplification started", job) == (
        "Amplification started (OpenVINO int8; the first run with a model quantises and checks each fold: minutes)...")
    parameters.Backend = "torch"
    with pytest.raises(ValueError, match="PyTorch has no int8 path"):
        logic.startAmplifyFromParameters(parameters, installDependencies=False)
    assert len(recording_predict.calls) == 1 and list(exchange_root.iterdir()) == []


def test_precision_tooltip_says_what_int8_is():
    root = ET.parse(REPO / "ContrastAmplifier" / "Resources" / "UI" / "ContrastAmplifier.ui").getroot()
    combo = next(w for w in root.iter("widget") if w.get("name") == "precisionComboBox")
    assert combo.get("class") == "QComboBox" and combo.find("item") is None, "the items come from the parameter's Choice"
    tip = next(p for p in combo.findall("property") if p.get("name") == "toolTip")[0].text
    from ContrastAmplifierLib import openvino_int8  # the accuracy rule the tooltip quotes

    for part in ("int8: OpenVINO on the CPU only", "Backend auto or openvino", "OpenVINO and NNCF", "quantised to int8 once",
                 "check on held-out phantoms", f"within {openvino_int8.CNR_TOLERANCE * 100:g} %",
                 f"more than {openvino_int8.MAX_DIFF_BOUND:g})", "Apply stops", "takes minutes"):
        assert part in tip, part
