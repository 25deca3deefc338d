"""The modules' amplification and training Logic for real, under the slicer-core wheel (no Qt).

ContrastAmplifierLogic.process runs the real ``contrast-amplifier predict`` child on real MRML
nodes made from a 3 mm phantom case, with a tiny random-weights bundle, one fold, one
mirroring, on the CPU, and the phantom's brain mask (skips HD-BET). ContrastAmplifierTrainingLogic
runs the real ``contrast-amplifier-train fit`` child on toy cached cases: Stop, then Resume.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel (test extra) is required")
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("torch")

from ContrastAmplifierCommon import process  # noqa: E402

from ContrastAmplifierLib import mrml_bridge  # noqa: E402
from ContrastAmplifierCommon.progress import CancelToken  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module

# The phantom case and random bundle (small_case_dir, random_bundle_dir) come from Testing/conftest.py.


@pytest.fixture(scope="module")
def ca():
    return _load(REPO / "ContrastAmplifier" / "ContrastAmplifier.py", "_slicer_module_ContrastAmplifier_amplify")


@pytest.fixture(scope="module")
def training():
    return _load(REPO / "ContrastAmplifierTraining" / "ContrastAmplifierTraining.py", "_slicer_module_Training_monitor")


def case_nodes(scene, case_dir: Path):
    names = {"t1": "T1 pre", "flair": "FLAIR", "adc": "ADC map", "t1c": "T1c routine"}
    nodes = {stem: mrml_bridge.import_volume_file(case_dir / f"{stem}.nii.gz", name, scene=scene) for stem, name in names.items()}
    mask = mrml_bridge.import_volume_file(case_dir / "brain_mask.nii.gz", "brain mask", scene=scene, label_map=True)
    return nodes, mask


def volume_names(scene):
    return sorted(n.GetName() for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"))


QUICK = dict(quality="quick", device="cpu", precision="exact", threads=1, installDependencies=False)


# -- settings, command line, validation (no child process) -------------------------------------


def test_quality_presets_choose_folds_and_mirrorings(ca, random_bundle_dir):
    logic = ca.ContrastAmplifierLogic()
    model = str(random_bundle_dir)
    assert logic.ensembleChoice("Quick", model) == ([0], 1)
    assert logic.ensembleChoice("balanced", model) == (None, 2)
    assert logic.ensembleChoice("PAPER", model) == (None, 8)
    assert logic.ensembleChoice("paper", model, folds=[1], flips=4) == ([1], 4)
    assert ca.QUALITY_PRESETS["paper"].predictions(5) == 40
    with pytest.raises(ValueError, match="Quality must be one of Quick, Balanced, Paper"):
        logic.ensembleChoice("best", model)
    with pytest.raises(ValueError, match="Mirrorings must be one of 1, 2, 4, 8"):
        logic.ensembleChoice("paper", model, flips=3)


def test_no_installed_model_is_said_plainly(ca, monkeypatch):
    logic = ca.ContrastAmplifierLogic()
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "availableModels", staticmethod(lambda: []))
    with pytest.raises(ValueError, match="No model bundle installed: add one with Add model in the Contrast Amplifier panel") as info:
        logic.ensembleChoice("quick", None)
    assert "contrast-amplifier models" not in str(info.value), "the panel names no console script (none exists inside Slicer)"


def test_predict_command_line_is_accepted_by_the_cli(ca, tmp_path):
    logic = ca.ContrastAmplifierLogic()
    files = {stem: tmp_path / f"{stem}.nrrd" for stem in ("t1", "flair", "adc", "t1c")}
    command = logic.predictCommand(files, tmp_path / "out.nrrd", model="demo", folds=[0, 2], flips=2, device="cuda",
                                   precision="fast", brainMask=tmp_path / "mask.nrrd", threads=2)
    assert command[:4] == [process.python_executable(), "-m", "ContrastAmplifierLib.cli", "predict"]
    joined = " ".join(command)
    for part in (f"--t1 {files['t1']}", f"--t1c {files['t1c']}", f"--out {tmp_path / 'out.nrrd'}", "--model demo",
                 "--folds 0 --folds 2", "--flips 2", "--device cuda", "--precision fast",
                 f"--brain-mask {tmp_path / 'mask.nrrd'}", "--threads 2", "--progress json"):
        assert part in joined
    assert "--folds" not in logic.predictCommand(files, tmp_path / "o.nrrd")
    with pytest.raises(ValueError, match="Device must be one of auto, cpu, cuda, mps"):
        logic.predictCommand(files, tmp_path / "o.nrrd", device="tpu")
    with pytest.raises(ValueError, match="Precision must be one of auto, exact, fast"):
        logic.predictCommand(files, tmp_path / "o.nrrd", precision="half")
    assert "predict" in process.available_cli_commands("ContrastAmplifierLib.cli")


def test_every_predict_option_the_module_writes_is_one_the_cli_has(ca, tmp_path):
    """The module builds the command line as text: each option in it must exist in `contrast-amplifier predict`
    (the DICOM output, the T1c's series and the PACS target included)."""
    import typer.main

    from ContrastAmplifierLib import cli

    logic = ca.ContrastAmplifierLogic()
    files = {stem: tmp_path / f"{stem}.nrrd" for stem in ("t1", "flair", "adc", "t1c")}
    command = logic.predictCommand(files, tmp_path / "out.nrrd", model="demo", folds=[0], flips=2, device="cpu",
                                   precision="exact", brainMask=tmp_path / "mask.nrrd", threads=1,
                                   dicomOutput=tmp_path / "series", t1cDicom=tmp_path / "t1c_dicom", sendTo="pacs")
    written = {part for part in command[4:] if part.startswith("--")}
    assert {"--out-dicom", "--t1c-dicom", "--send"} <= written
    predict = typer.main.get_command(cli.app).commands["predict"]
    known = {name for param in predict.params for name in getattr(param, "opts", [])}
    assert written <= known, f"options the CLI's predict does not have: {sorted(written - known)}"


def test_backend_reaches_both_command_lines_and_the_panel_says_what_runs(ca, tmp_path, monkeypatch):
    """The panel's Backend (auto, torch, openvino) becomes --backend of predict and of preprocess, and the
    panel line says what auto means here; OpenVINO on a GPU is refused before anything runs."""
    import typer.main

    from ContrastAmplifierLib import cli

    logic = ca.ContrastAmplifierLogic()
    files = {stem: tmp_path / f"{stem}.nrrd" for stem in ("t1", "flair", "adc", "t1c")}
    out = tmp_path / "out.nrrd"
    assert "--backend auto" in " ".join(logic.predictCommand(files, out))
    assert "--backend openvino" in " ".join(logic.predictCommand(files, out, device="cpu", backend="openvino"))
    preprocess = logic.preprocessCommand(tmp_path / "case", tmp_path / "pre", "cpu", backend="torch")
    assert "--backend torch" in " ".join(preprocess)
    commands = typer.main.get_command(cli.app).commands
    known = {name for param in commands["preprocess"].params for name in getattr(param, "opts", [])}
    assert {part for part in preprocess[4:] if str(part).startswith("--")} <= known
    with pytest.raises(ValueError, match="Backend must be one of auto, torch, openvino"):
        logic.predictCommand(files, out, backend="onnx")
    with pytest.raises(ValueError, match="OpenVINO runs on the CPU only: choose Device cpu, or Backend auto or torch"):
        logic.predictCommand(files, out, device="cuda", backend="openvino")
    with pytest.raises(ValueError, match="OpenVINO runs on the CPU only"):
        logic.preprocessCommand(tmp_path, tmp_path, "cuda", backend="openvino")
    installed = importlib.util.find_spec("openvino") is not None
    assert logic.resolveBackend("auto", "cpu") == ("openvino" if installed else "torch")
    assert logic.resolveBackend("auto", "cuda") == logic.resolveBackend("torch", "cpu") == "torch"
    assert logic.backendSummary("auto", "cuda") == "auto: PyTorch (on a GPU)."
    if installed:
        assert logic.backendSummary("auto", "cpu") == "auto: OpenVINO on the CPU (installed)."
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "openvinoInstalled", staticmethod(lambda: False))
    assert logic.resolveBackend("auto", "cpu") == "torch"
    assert "OpenVINO, optional and faster on the CPU, is not installed: Apply offers it" in logic.backendSummary("auto", "cpu")
    assert logic.backendSummary("openvino", "cpu").startswith("OpenVINO is not installed: Apply offers to install it")


def test_openvino_is_offered_once_for_auto_and_required_for_openvino(ca, monkeypatch):
    """The optional install: auto asks once (a decline is remembered, PyTorch runs), openvino asks every time
    and refuses to start without it, torch never asks (the real offer, a stand-in package name)."""
    from ContrastAmplifierCommon import dependencies

    monkeypatch.setattr(dependencies, "OPTIONAL_REQUIREMENTS", {"no-such-openvino-xyz>=1": "a stand-in for OpenVINO"})
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "openvinoInstalled", staticmethod(lambda: False))
    logic = ca.ContrastAmplifierLogic()
    asked = []
    logic.confirmInstall = lambda message: asked.append(message) or False  # the user declines
    logic.ensureOptionalDependencies("torch", "cpu")
    logic.ensureOptionalDependencies("auto", "cuda")
    assert asked == []
    logic.ensureOptionalDependencies("auto", "cpu")  # declined: no error, PyTorch runs
    assert len(asked) == 1 and "no-such-openvino-xyz>=1: a stand-in for OpenVINO" in asked[0]
    logic.ensureOptionalDependencies("auto", "cpu")
    assert len(asked) == 1, "a declined optional install is not asked again"
    with pytest.raises(ValueError, match="Backend openvino needs the OpenVINO package.*Choose Backend auto or torch"):
        logic.ensureOptionalDependencies("openvino", "cpu")
    assert len(asked) == 2


def _cpu_unless(gpu_for_auto: bool):
    """resolvePreprocessDevice as on a machine with (``True``) or without an NVIDIA GPU: explicit devices unchanged."""
    return staticmethod(lambda device: ("cuda" if gpu_for_auto else "cpu") if device == "auto" else device)


def test_int8_runs_on_openvino_on_the_cpu_and_reaches_the_command_line(ca, tmp_path, monkeypatch):
    """Precision int8 (the panel's choice, the command line's --precision int8): OpenVINO on the CPU, with Backend
    auto or openvino; Device auto without a GPU is passed as cpu (the child's auto could pick Apple's MPS)."""
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "resolvePreprocessDevice", _cpu_unless(gpu_for_auto=False))
    logic = ca.ContrastAmplifierLogic()
    files = {stem: tmp_path / f"{stem}.nrrd" for stem in ("t1", "flair", "adc", "t1c")}
    out = tmp_path / "out.nrrd"
    for device, backend in (("cpu", "auto"), ("cpu", "openvino"), ("auto", "auto")):
        joined = " ".join(map(str, logic.predictCommand(files, out, flips=8, device=device, precision="int8", backend=backend)))
        assert f"--device cpu --precision int8 --backend {backend}" in joined
        assert logic.resolveBackend(backend, device, "int8") == "openvino"
    assert "--device auto --precision exact" in " ".join(map(str, logic.predictCommand(files, out, precision="exact")))
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "openvinoInstalled", staticmethod(lambda: True))
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "nncfInstalled", staticmethod(lambda: True))
    assert logic.backendSummary("auto", "cpu", "int8") == (
        "int8 on OpenVINO on the CPU: each fold is quantised once and used only if its check on held-out phantoms "
        "passes (the first run with a model takes minutes).")
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "nncfInstalled", staticmethod(lambda: False))
    assert logic.backendSummary("openvino", "cpu", "int8") == (
        "int8 on OpenVINO: NNCF not installed: Apply offers to install them (or choose Precision exact or fast).")
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "openvinoInstalled", staticmethod(lambda: False))
    assert logic.backendSummary("auto", "cpu", "int8").startswith("int8 on OpenVINO: OpenVINO and NNCF not installed")
    assert logic.resolveBackend("auto", "cpu", "int8") == "openvino", "int8 is OpenVINO's even before it is installed"
    assert logic.resolveBackend("auto", "cpu", "exact") == "torch"


def test_int8_is_refused_on_a_gpu_and_with_torch_naming_the_fix(ca, tmp_path, monkeypatch):
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "resolvePreprocessDevice", _cpu_unless(gpu_for_auto=False))
    logic = ca.ContrastAmplifierLogic()
    asked = []
    logic.confirmInstall = lambda message: asked.append(message) or False
    files = {stem: tmp_path / f"{stem}.nrrd" for stem in ("t1", "flair", "adc", "t1c")}
    out = tmp_path / "out.nrrd"
    for device in ("cuda", "mps"):
        gpu = f"Precision int8 runs on OpenVINO on the CPU only, not on {device}: choose Device cpu, or Precision fast"
        with pytest.raises(ValueError, match=gpu):
            logic.predictCommand(files, out, device=device, precision="int8")
        with pytest.raises(ValueError, match=gpu):
            logic.ensureOptionalDependencies("auto", device, "int8")
        assert logic.backendSummary("auto", device, "int8").startswith(gpu)
    torch_fix = "PyTorch has no int8 path: choose Backend auto or openvino, or Precision exact or fast"
    with pytest.raises(ValueError, match=torch_fix):
        logic.predictCommand(files, out, device="cpu", precision="int8", backend="torch")
    with pytest.raises(ValueError, match=torch_fix):
        logic.ensureOptionalDependencies("torch", "cpu", "int8")
    assert torch_fix in logic.backendSummary("torch", "cpu", "int8")
    with pytest.raises(ValueError, match="Precision must be one of auto, exact, fast, int8 .got 'int4'"):
        logic.resolveBackend("auto", "cpu", "int4")
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "resolvePreprocessDevice", _cpu_unless(gpu_for_auto=True))
    with pytest.raises(ValueError, match="Precision int8 runs on OpenVINO on the CPU only, and Device auto picks the GPU "
                                         "here: choose Device cpu"):
        logic.predictCommand(files, out, device="auto", precision="int8")
    assert asked == [], "a refused setting offers no install"


def test_the_modules_int8_rule_is_the_command_lines(ca, monkeypatch):
    """The Logic mirrors ensemble._int8_backend (Slicer's Python may lack torch): both refuse the same settings."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import torch

    from ContrastAmplifierLib import ensemble

    assert ca.ContrastAmplifierLogic.PRECISIONS == ca.PRECISIONS == ensemble.PRECISIONS
    assert ca.ContrastAmplifierLogic.BACKENDS == ensemble.BACKENDS
    logic = ca.ContrastAmplifierLogic()
    for device in ("cpu", "cuda", "mps"):
        for backend in ensemble.BACKENDS:
            try:
                cli = ensemble._int8_backend(backend, torch.device(device), None)
            except ValueError:
                cli = None
            try:
                module = logic.resolveBackend(backend, device, "int8")
            except ValueError:
                module = None
            assert module == cli, (device, backend)


def test_int8_offers_openvino_and_nncf_every_time_and_refuses_without_them(ca, monkeypatch):
    """Precision int8 offers what it lacks of OpenVINO and NNCF each time (the real offer, stand-in package names);
    declined or not importable afterwards, Apply stops with the two ways out."""
    from ContrastAmplifierCommon import dependencies

    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]["openvino"]
    assert list(dependencies.INT8_REQUIREMENTS) and set(dependencies.INT8_REQUIREMENTS) <= set(extra)
    assert not any(dependencies.is_slicer_shipped(r) for r in dependencies.INT8_REQUIREMENTS)
    real = ca.ContrastAmplifierLogic()
    if real.openvinoInstalled() and real.nncfInstalled():  # nothing missing: nothing asked
        real.confirmInstall = lambda message: pytest.fail(f"asked: {message}")
        real.ensureOptionalDependencies("auto", "cpu", "int8")
    monkeypatch.setattr(dependencies, "OPTIONAL_REQUIREMENTS", {"no-such-openvino-xyz>=1": "a stand-in for OpenVINO"})
    monkeypatch.setattr(dependencies, "INT8_REQUIREMENTS", {"no-such-nncf-xyz>=1": "a stand-in for NNCF"})
    have = {"openvino": False, "nncf": False}
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "openvinoInstalled", staticmethod(lambda: have["openvino"]))
    monkeypatch.setattr(ca.ContrastAmplifierLogic, "nncfInstalled", staticmethod(lambda: have["nncf"]))
    logic = ca.ContrastAmplifierLogic()
    asked, installed = [], []
    logic.confirmInstall = lambda message: asked.append(message) or False  # the user declines
    logic.installOptional = installed.append
    logic.ensureOptionalDependencies("auto", "cpu")  # Backend auto, Precision auto: declined and remembered
    assert len(asked) == 1
    refused = (r"Precision int8 needs OpenVINO and NNCF, not installed \(declined or failed: see the log\)\. Choose "
               r"Precision exact or fast, or install them from the Python console with "
               r"slicer\.util\.pip_install\('openvino nncf'\)\.")
    for attempt in (2, 3):  # int8 asks every time, though Backend auto's offer was declined
        with pytest.raises(ValueError, match=refused):
            logic.ensureOptionalDependencies("auto", "cpu", "int8")
        assert len(asked) == attempt
    assert "no-such-openvino-xyz>=1: a stand-in for OpenVINO" in asked[-1]
    assert "no-such-nncf-xyz>=1: a stand-in for NNCF" in asked[-1]
    assert "Without them Precision int8 cannot run (exact and fast can)." in asked[-1] and "PyTorch" not in asked[-1]
    assert installed == [], "declined: nothing installed"
    # OpenVINO there, NNCF not: only NNCF is offered; accepted, the installer gets it
    monkeypatch.setattr(dependencies, "OPTIONAL_REQUIREMENTS", {"pytest>=1": "installed, so never offered"})
    have["openvino"] = True
    logic.confirmInstall = lambda message: asked.append(message) or True

    def install(requirements):
        installed.append(requirements)
        have["nncf"] = True  # stands for pip's effect

    logic.installOptional = install
    logic.ensureOptionalDependencies("openvino", "cpu", "int8")
    assert installed == [["no-such-nncf-xyz>=1"]] and "pytest" not in asked[-1]
    have["nncf"] = False
    logic.installOptional = installed.append  # "installs", yet NNCF is still not importable
    with pytest.raises(ValueError, match="Precision int8 needs NNCF, not installed"):
        logic.ensureOptionalDependencies("auto", "cpu", "int8")
    assert installed[-1] == ["no-such-nncf-xyz>=1"]


@pytest.mark.slow
def test_int8_runs_for_real_and_its_verdict_reaches_the_user(ca, scene, small_case_dir, random_bundle_dir, exchange_root,
                                                             tmp_path, monkeypatch):
    """The real command line with --precision int8 (the tiny random bundle, Quick: 1 fold x 1 mirroring): calibrated,
    checked on the held-out phantoms, accepted (that bundle barely depends on its input), its verdict passed to the
    progress callback; T1c-pro loaded on the T1c grid, no file left. About 35 s here, most of it the phantoms."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    cache = tmp_path / "openvino-cache"
    monkeypatch.setenv("CA_OPENVINO_CACHE", str(cache))  # the child's OpenVINO cache: not the user's
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    events = []
    result = logic.process(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], model=str(random_bundle_dir),
                           brainMask=mask, progress=events.append, timeout=600, **{**QUICK, "precision": "int8"})
    assert result.GetName() == "T1c routine T1c-pro"
    np.testing.assert_allclose(mrml_bridge.ijk_to_ras_matrix(result), mrml_bridge.ijk_to_ras_matrix(nodes["t1c"]), atol=1e-6)
    assert np.isfinite(slicer.util.arrayFromVolume(result)).all()
    assert "--device cpu --precision int8 --backend auto" in result.GetAttribute("ContrastAmplifier.Command")
    verdicts = [e.message for e in events if e.message.startswith("int8 accepted: 1 fold x 1 mirroring on 3 held-out")]
    assert len(verdicts) == 1 and "limit +-2 % in every case" in verdicts[0]
    assert any("quantised to int8" in e.message for e in events if e.stage == "ensemble")
    assert len(list((cache / "int8-verdicts").glob("*.json"))) == 1, "the verdict is cached for the next run"
    assert list(exchange_root.iterdir()) == []


def test_int8_is_refused_before_any_export_or_install(ca, scene, small_case_dir, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    asked = []
    logic.confirmInstall = lambda message: asked.append(message) or False
    nodes, mask = case_nodes(scene, small_case_dir)
    args = (nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"])
    with pytest.raises(ValueError, match="Precision int8 runs on OpenVINO on the CPU only, not on cuda"):
        logic.process(*args, quality="quick", device="cuda", precision="int8", brainMask=mask)
    with pytest.raises(ValueError, match="PyTorch has no int8 path"):
        logic.process(*args, quality="quick", device="cpu", precision="int8", backend="torch", brainMask=mask)
    assert asked == [] and list(exchange_root.iterdir()) == []
    assert not any(name.endswith("T1c-pro") for name in volume_names(scene))


def test_inputs_mask_and_output_are_validated_before_anything_runs(ca, scene, small_case_dir, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    args = (nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"])
    with pytest.raises(ValueError, match=r"No ADC volume selected: choose it in Inputs > ADC"):
        logic.process(nodes["t1"], nodes["flair"], None, nodes["t1c"], **QUICK)
    with pytest.raises(ValueError, match="Output volume 'FLAIR' is one of the inputs"):
        logic.process(*args, output=nodes["flair"], **QUICK)
    shifted = mrml_bridge.import_volume_file(small_case_dir / "t1.nii.gz", "mask on the T1 grid", scene=scene, label_map=True)
    shifted.SetOrigin(*(np.array(shifted.GetOrigin()) + 7.0))
    with pytest.raises(ValueError, match=r"Brain mask 'mask on the T1 grid' .* is not on the grid of T1c 'T1c routine'.*resample it"):
        logic.process(*args, brainMask=shifted, **QUICK)
    assert list(exchange_root.iterdir()) == [], "nothing is exported when validation fails"
    assert not any(name.endswith("T1c-pro") for name in volume_names(scene))


def test_parameter_node_holds_every_amplification_setting(ca, scene):
    logic = ca.ContrastAmplifierLogic()
    node = logic.getParameterNode().parameterNode
    logic.setDefaultParameters(node)
    assert node.GetParameter("Quality") == "Paper" and node.GetParameter("Device") == "auto"
    assert node.GetParameter("Precision") == "auto" and node.GetParameter("Model") == ""
    assert node.GetParameter("Backend") == "auto"
    assert {"InputBrainMask", "OutputVolume"} <= set(ca.ContrastAmplifierParameterNode.allParameters)
    parameters = logic.getParameterNode()
    for precision in logic.PRECISIONS:  # the panel's Precision choices: every one the Logic and the CLI take
        parameters.Precision = precision
        assert node.GetParameter("Precision") == precision
    assert parameters.Precision == "int8"
    with pytest.raises(ValueError):
        parameters.Precision = "int4"
    assert logic.resolvePreprocessDevice("auto") in ("cpu", "cuda")
    assert "--device cpu" in " ".join(logic.preprocessCommand(Path("c"), Path("o"), device="cpu"))


# -- the real command line through the Logic ---------------------------------------------------


def test_synchronous_amplify_makes_a_named_node_on_the_t1c_grid(ca, scene, small_case_dir, random_bundle_dir, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    before = volume_names(scene)
    events = []
    result = logic.process(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], model=str(random_bundle_dir),
                           brainMask=mask, progress=events.append, timeout=600, **QUICK)
    assert result.GetName() == "T1c routine T1c-pro"
    assert volume_names(scene) == sorted(before + ["T1c routine T1c-pro"])
    np.testing.assert_allclose(mrml_bridge.ijk_to_ras_matrix(result), mrml_bridge.ijk_to_ras_matrix(nodes["t1c"]), atol=1e-6)
    voxels = slicer.util.arrayFromVolume(result) if hasattr(slicer.util, "arrayFromVolume") else None
    voxels = sitk.GetArrayFromImage(mrml_bridge.volume_node_to_sitk(result)) if voxels is None else voxels
    assert voxels.shape == sitk.GetArrayFromImage(mrml_bridge.volume_node_to_sitk(nodes["t1c"])).shape
    assert np.isfinite(voxels).all() and voxels.std() > 0
    assert events and events[-1].fraction == pytest.approx(1.0)
    assert {"ensemble", "done"} <= {e.stage for e in events}
    command = result.GetAttribute("ContrastAmplifier.Command")
    assert "--folds 0" in command and "--flips 1" in command and "--brain-mask" in command
    assert list(exchange_root.iterdir()) == [], "exported inputs and the result file must be deleted after loading"


def test_amplify_writes_its_dicom_series_into_the_study_of_a_dicom_t1c(ca, scene, small_case_dir, random_bundle_dir,
                                                                      exchange_root, dicom_database, tmp_path, monkeypatch):
    """Issue 16 in the module: a T1c loaded from DICOM (its files in the DICOM database) gives a T1c-pro series of its study."""
    pydicom = pytest.importorskip("pydicom")
    from ContrastAmplifierLib.imageio import read_image

    monkeypatch.setitem(sys.modules, "DICOMLib", None)  # batch mode: no DICOM module, so nothing is imported
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    database, uids = dicom_database(sitk.ReadImage(str(small_case_dir / "t1c.nii.gz"), sitk.sitkFloat32), tmp_path / "db" / "t1c")
    # the T1c as Slicer's DICOM plugin loads it: the series' voxels, its instances listed on the node
    t1c = mrml_bridge.add_volume_node_from_sitk(read_image(tmp_path / "db" / "t1c", "T1c"), "T1c from DICOM", scene=scene)
    t1c.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    series = tmp_path / "T1c-pro series"
    result = logic.process(nodes["t1"], nodes["flair"], nodes["adc"], t1c, model=str(random_bundle_dir), brainMask=mask,
                           timeout=600, dicomOutput=series, importToDatabase=True, **QUICK)
    assert result.GetName() == "T1c from DICOM T1c-pro"
    assert "--t1c-dicom" in result.GetAttribute("ContrastAmplifier.Command") and set(database.asked) == set(uids)
    files = sorted(series.iterdir())
    assert len(files) == len(uids)
    written = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    source = pydicom.dcmread(str(database.files[uids[0]]), stop_before_pixels=True)
    assert (written.StudyInstanceUID, written.PatientID, written.FrameOfReferenceUID) == (
        source.StudyInstanceUID, source.PatientID, source.FrameOfReferenceUID)
    assert written.SeriesInstanceUID != source.SeriesInstanceUID and written.Modality == "MR"
    assert list(exchange_root.iterdir()) == [], "the exported inputs and the T1c's copied DICOM files are removed"


@pytest.mark.slow
def test_amplify_sends_its_series_to_a_pacs_and_a_refused_send_keeps_the_result(ca, scene, small_case_dir, random_bundle_dir,
                                                                                  exchange_root, empty_orthanc, tmp_path):
    """Send to PACS through the real command line and a real Orthanc (skipped without Orthanc): sent from the
    exchange folder when no DICOM folder is chosen; a refused association still loads T1c-pro and keeps its series."""
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    args = (nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"])
    slices = sitk.ReadImage(str(small_case_dir / "t1c.nii.gz")).GetSize()[2]
    result = logic.process(*args, model=str(random_bundle_dir), brainMask=mask, timeout=600, sendTo=empty_orthanc.dimse_url,
                           **QUICK)
    assert f"--send {empty_orthanc.dimse_url}" in result.GetAttribute("ContrastAmplifier.Command")
    assert empty_orthanc.instance_count() == slices and len(empty_orthanc.study_uids()) == 1
    assert list(exchange_root.iterdir()) == [], "the series written only to be sent goes with the exchange folder"

    refused = f"dicom://NOTORTHANC@127.0.0.1:{empty_orthanc.dicom_port}"
    before = volume_names(scene)
    with pytest.raises(process.ProcessError, match=f"was computed and loaded, but not sent to {refused}: .*NOTORTHANC"):
        logic.process(*args, model=str(random_bundle_dir), brainMask=mask, timeout=600, sendTo=refused,
                      dicomOutput=tmp_path / "kept", **QUICK)
    assert len(volume_names(scene)) == len(before) + 1, "the computed T1c-pro is loaded all the same"
    assert len(list((tmp_path / "kept").iterdir())) == slices, "the series stays for a later send"
    assert empty_orthanc.instance_count() == slices and list(exchange_root.iterdir()) == []


def test_background_amplify_fills_a_chosen_output_node(ca, scene, small_case_dir, random_bundle_dir, exchange_root):
    """The GUI path: start, poll (as the widget's QTimer does), result in the user's node, in the T1c's space."""
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my T1c-pro")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    output.SetAndObserveTransformNodeID(transform.GetID())
    job = logic.process(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], output=output,
                        model=str(random_bundle_dir), brainMask=mask, synchronous=False, **QUICK)
    assert isinstance(job, ca.AmplifyJob) and job.process.running
    deadline = time.monotonic() + 600
    while not logic.pollAmplify(job):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job.error is None, job.error
    assert job.result is output and output.GetName() == "my T1c-pro"
    assert output.GetParentTransformNode() is None, "T1c-pro is written in world space: no transform on top"
    np.testing.assert_allclose(mrml_bridge.ijk_to_ras_matrix(output), mrml_bridge.ijk_to_ras_matrix(nodes["t1c"]), atol=1e-6)
    assert not job.workDir.exists()


def test_cancel_mid_run_leaves_no_node_and_no_file(ca, scene, small_case_dir, random_bundle_dir, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    before = volume_names(scene)
    job = logic.process(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], model=str(random_bundle_dir),
                        brainMask=mask, synchronous=False, **QUICK)
    deadline = time.monotonic() + 300
    while job.process.latest is None:  # the child is working (its first progress line arrived)
        assert not logic.pollAmplify(job), f"finished before it could be cancelled: {job.error}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    logic.cancelJob(job, wait=True)
    assert job.process.state is process.ProcessState.CANCELLED
    assert job.result is None and "Cancelled" in job.error
    assert volume_names(scene) == before, "a cancelled run must not create an output node"
    assert not job.outputPath.exists() and not job.workDir.exists()
    assert list(exchange_root.iterdir()) == []


def test_synchronous_cancel_through_a_token_raises_and_leaves_nothing(ca, scene, small_case_dir, random_bundle_dir, exchange_root):
    logic = ca.ContrastAmplifierLogic()
    nodes, mask = case_nodes(scene, small_case_dir)
    before = volume_names(scene)
    token = CancelToken()
    with pytest.raises(process.ProcessCancelled, match="Cancelled by the user"):
        logic.process(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], model=str(random_bundle_dir),
                      brainMask=mask, progress=lambda event: token.cancel(), cancel=token, timeout=300, **QUICK)
    assert volume_names(scene) == before
    assert list(exchange_root.iterdir()) == []


# -- training: per-fold progress, Stop and Resume -------------------------------------------------
# (the progress monitor itself is tested in Testing/ContrastAmplifierTrainingLib/test_run_status.py)


def test_stop_then_resume_continues_after_the_last_saved_epoch(training, tmp_path):
    """Stop (SIGTERM through the Logic) after the first epoch; Resume repeats no finished epoch."""
    from ContrastAmplifierTrainingLib.data import save_cached_case
    from ContrastAmplifierTrainingLib.toy import toy_cohort

    logic = training.ContrastAmplifierTrainingLogic()
    available, reason = logic.trainingAvailability()
    if not available:
        pytest.skip(reason)
    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=11):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    run = tmp_path / "run"
    extra = ["--n-folds", "2", "--base-channels", "4", "--levels", "2"]
    assert not logic.hasRun(run) and logic.runStatus(run) == {}

    monitor = training.TrainingMonitor([0, 1], 3)
    job = logic.startTraining(cache, run, [0, 1], 3, "cpu", installDependencies=False, extraArgs=extra)
    deadline = time.monotonic() + 300
    while job.running:
        for event in job.poll():
            monitor.update(event)
            if event.stage == "epoch":
                logic.stopTraining(job)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.state is process.ProcessState.CANCELLED, job.error_message()
    monitor.mark_stopped()
    assert monitor.fold_status[0].epochs_done >= 1 and monitor.fold_status[0].train_loss is not None
    assert logic.hasRun(run)
    saved = logic.runStatus(run)
    assert saved[0].epochs_done == monitor.fold_status[0].epochs_done and saved[0].state in ("stopped", "finished")

    resumed = training.TrainingMonitor([0, 1], 3, initial=saved)
    epochs = []
    job = logic.startTraining(cache, run, [0, 1], 3, "cpu", installDependencies=False, extraArgs=extra)
    while job.running:
        for event in job.poll():
            resumed.update(event)
            if event.stage == "epoch":
                epochs.append((event.extra["fold"], event.extra["epoch"]))
        assert time.monotonic() < deadline + 300
        time.sleep(0.05)
    assert job.state is process.ProcessState.SUCCEEDED, job.error_message()
    done_before = saved[0].epochs_done
    assert epochs[0] == (0, done_before + 1) if done_before < 3 else epochs[0] == (1, 1)
    assert len(epochs) == len(set(epochs)) == 6 - done_before, "no finished epoch is repeated"
    assert all(p.state == "finished" for p in resumed.fold_status.values())
    assert {k: (p.epochs_done, p.state) for k, p in logic.runStatus(run).items()} == {0: (3, "finished"), 1: (3, "finished")}
