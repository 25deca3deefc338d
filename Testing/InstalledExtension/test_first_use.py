"""The installed extension after its first-use install, in Python that started with only Slicer's packages.

The user installs the extension, opens Contrast Amplifier and presses Apply: the Logic's
``ensureDependencies()`` asks, then installs what is missing through Slicer's own
``slicer.util.pip_install`` (5.6/5.8 signature) and torch through the PyTorch extension
(stand-ins: ``slicer_python_runner.slicer_app_standins``). That install runs here for real, with
pip, into a layer over the Slicer-like environment (conftest.py ``first_use``: cached until its
inputs change). Then, in that Python: Apply on a low-resolution phantom case with an imported
bundle and with the shipped default model, and each module's own self-test (``<Module>Test``,
``runTest``), as Slicer's "Reload and Test" runs it.

Differences from the application: Python 3.11 instead of 3.9.10 (the slicer-core wheel), no Qt
(the Widget classes are not exercised), the PyTorch extension replaced by a pip install of the
CPU wheel.
"""

from __future__ import annotations

import json
import os
import re

import pytest

SLICER_SERIES = os.environ.get("CA_SLICER_SERIES", "5.8")  # as conftest.py reads them
TORCH_SPEC = os.environ.get("CA_TORCH_SPEC", "torch==2.13.0")
MODULES = ("ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))


def _shipped(env) -> dict:
    """``{canonical name: version}`` of what the Slicer-like env holds (Slicer's pins, slicer-core, vtk)."""
    out = {}
    for requirement in env.requirements:
        name, version = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", requirement).groups()
        out[_canonical(name)] = version
    return out


# -- the install itself ------------------------------------------------------------------------


def test_first_use_install_asks_once_and_installs_only_what_is_missing(first_use, env):
    _, outcome = first_use
    missing = outcome["missing_before"]
    assert missing, "nothing was missing in Slicer's Python: the check did not start from Slicer's packages"
    assert outcome["missing_after"] == [], outcome
    assert len(outcome["asked"]) == 1 and all(r in outcome["asked"][0] for r in missing)
    shipped = _shipped(env)
    assert not [r for r in missing if _name(r) in shipped], f"Slicer {SLICER_SERIES} already meets these: {missing}"
    # torch through the PyTorch extension, the rest in one pip call with Slicer's packages pinned
    assert outcome["torch_calls"] == [next(r[len("torch"):] for r in missing if _name(r) == "torch")]
    [pip] = outcome["pip_calls"]
    assert pip["args"][:2] == ["--constraint", pip["args"][1]]
    assert pip["args"][2:] == [r for r in missing if _name(r) != "torch"]
    pinned = {_canonical(c.split("==")[0]): c.split("==")[1] for c in pip["constraints"]}
    for name in ("numpy", "scipy", "simpleitk", "pillow", "requests", "pydicom", "packaging"):
        assert pinned.get(name) == shipped[name], (name, pip["constraints"])


def test_slicer_packages_are_untouched_after_the_first_use_install(run_first_use, first_use, env):
    """Every package Slicer ships is still Slicer's own copy (same version, same folder): pip neither
    upgraded nor shadowed one, and the layer holds none of them."""
    layer, outcome = first_use
    seen = run_first_use("""
import importlib.metadata as m
emit([[d.metadata["Name"], d.version, str(d.locate_file(""))] for d in m.distributions()])
""")
    by_name = {}
    for name, version, location in seen:  # a name twice = a copy shadowing another
        by_name.setdefault(_canonical(name), []).append((version, location))
    # The PyTorch extension's own pip run may bring newer versions (on this 3.11 check, torch 2.13
    # needs setuptools >= 77; Slicer 5.6/5.8's Python 3.9 gets torch <= 2.8, which does not): that
    # is not the project's install, which must change nothing beyond it.
    by_torch = {_canonical(entry.split()[0]) for entry in outcome["torch_changed"]}
    changed = {name: by_name.get(name) for name, version in _shipped(env).items()
               if name not in by_torch and by_name.get(name) != [(version, str(env.site_packages))]}
    assert not changed, f"replaced or shadowed by the first-use install: {changed}"
    added = {name for name, places in by_name.items() if any(loc == str(layer.site_packages) for _, loc in places)}
    assert {"torch", "nibabel", "nilearn", "typer"} <= added


def test_nothing_is_asked_again_once_installed(run_first_use):
    result = run_first_use("""
new_scene()
module = load_module("ContrastAmplifier")
from ContrastAmplifierCommon import dependencies
logic = module.ContrastAmplifierLogic()
asked = []
logic.confirmInstall = lambda message: asked.append(message) or True
logic.ensureDependencies()
emit({"asked": asked, "missing": dependencies.missing_requirements()})
""")
    assert result == {"asked": [], "missing": []}


# -- Apply on a phantom case -------------------------------------------------------------------

#: A 4 mm phantom case as MRML volumes, its brain mask (skips HD-BET), and a synchronous Apply.
APPLY = """
from pathlib import Path
import numpy as np
new_scene()
import slicer
module = load_module("ContrastAmplifier")
from ContrastAmplifierLib import mrml_bridge
from ContrastAmplifierLib.phantom import generate_cohort
case = generate_cohort(Path("cases"), cases=1, seed=31, spacing=4.0)[0]
names = {"t1": "T1 pre", "flair": "FLAIR", "adc": "ADC map", "t1c": "T1c routine"}
nodes = {stem: mrml_bridge.import_volume_file(case / f"{stem}.nii.gz", label, scene=slicer.mrmlScene)
         for stem, label in names.items()}
mask = mrml_bridge.import_volume_file(case / "brain_mask.nii.gz", "brain mask", scene=slicer.mrmlScene, label_map=True)
logic = module.ContrastAmplifierLogic()
logic.confirmInstall = lambda message: False  # everything is installed: asking again would be a failure
MODEL = __MODEL__
result = logic.process(nodes["t1"], nodes["flair"], nodes["adc"], nodes["t1c"], model=MODEL, quality="quick",
                       device="cpu", precision="exact", brainMask=mask, threads=1, timeout=600)
voxels = slicer.util.arrayFromVolume(result)
emit({"name": result.GetName(), "in_scene": slicer.mrmlScene.GetNodeByID(result.GetID()) is not None,
       "same_grid": bool(np.allclose(mrml_bridge.ijk_to_ras_matrix(result), mrml_bridge.ijk_to_ras_matrix(nodes["t1c"]), atol=1e-6)),
       "shape_matches": list(voxels.shape) == list(slicer.util.arrayFromVolume(nodes["t1c"]).shape),
       "finite": bool(np.isfinite(voxels).all()), "std": float(voxels.std()),
       "volumes": sorted(n.GetName() for n in slicer.mrmlScene.GetNodesByClass("vtkMRMLScalarVolumeNode"))})
"""


def _assert_t1c_pro(result):
    assert result["name"] == "T1c routine T1c-pro" and result["in_scene"], result
    assert result["same_grid"] and result["shape_matches"] and result["finite"] and result["std"] > 0, result
    assert result["volumes"] == sorted(["T1 pre", "FLAIR", "ADC map", "T1c routine", "brain mask", "T1c routine T1c-pro"])


#: A tiny random-weights bundle written, zipped and imported into the user's models folder, as
#: ``contrast-amplifier models import`` does (each check is a fresh process with a fresh HOME).
IMPORT_BUNDLE = """
import shutil, torch
from pathlib import Path
from ContrastAmplifierLib.bundle import write_bundle
from ContrastAmplifierLib.network import NetworkConfig, build_network
from ContrastAmplifierLib import registry
config = NetworkConfig(base_channels=2, levels=2)
torch.manual_seed(0)
modalities = ["t1", "flair", "adc", "t1c"]
write_bundle(Path("bundle"), {0: build_network(config).state_dict()}, name="tiny-imported", version="0",
             description="random weights", intended_use="tests only", training_data="none", modalities=modalities,
             spacing=(4.0, 4.0, 4.0), crop_size=(40, 48, 40), percentiles={m: (-2.0, 3.0) for m in modalities},
             network=config)
registry.import_model(shutil.make_archive("tiny-imported", "zip", "bundle"))
IMPORTED = {e.name: e.source for e in registry.list_models()}
"""


def test_apply_with_an_imported_bundle_puts_t1c_pro_in_the_scene(run_first_use):
    """Import a bundle, then Apply with it: the child process runs on Slicer's Python too."""
    result = run_first_use(IMPORT_BUNDLE + APPLY.replace("__MODEL__", repr("tiny-imported")).replace(
        "emit({", "emit({\"imported\": IMPORTED, ", 1))
    assert result["imported"].get("tiny-imported") == "user", result["imported"]
    _assert_t1c_pro(result)


def test_apply_with_the_shipped_default_model_puts_t1c_pro_in_the_scene(run_first_use):
    """No model chosen: the registry's default, the demo bundle installed with the extension."""
    _assert_t1c_pro(run_first_use(APPLY.replace("__MODEL__", "None")))


# -- the modules' own self-tests ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_module_self_test_passes(run_first_use, name):
    """What Slicer's "Reload and Test" (and ``ScriptedLoadableModule.runTest``) does: instantiate
    ``<Module>Test`` and call its ``runTest()``, with the scene the application always has."""
    result = run_first_use(f"""
new_scene()
module = load_module({name!r})
test = getattr(module, {name + "Test"!r})()
test.messageDelay = 0
test.runTest()
emit("passed")
""")
    assert result == "passed"


def test_first_use_outcome_is_recorded(first_use):
    """The cached outcome is what the tests above read: it names the torch build installed."""
    _, outcome = first_use
    assert json.dumps(outcome) and outcome["torch"].startswith(TORCH_SPEC.split("==")[-1].split("+")[0])
