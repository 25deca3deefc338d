"""Model registry: listing, the explicit default model, import from folder/zip, refusal of bad bundles."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ContrastAmplifierLib import registry
from ContrastAmplifierLib.bundle import BUNDLE_FILE, BundleError, sha256_file, write_bundle
from ContrastAmplifierLib.cli import app
from ContrastAmplifierLib.network import NetworkConfig, build_network


def _make_bundle(folder: Path, name: str = "tiny", version: str = "1") -> Path:
    config = NetworkConfig(base_channels=2, levels=2)
    states = {}
    for fold in (0, 1):
        torch.manual_seed(fold)
        states[fold] = build_network(config).state_dict()
    write_bundle(
        folder, states, name=name, version=version, description="test bundle", intended_use="tests only",
        training_data="random weights", modalities=["t1", "flair", "adc", "t1c"], spacing=(4, 4, 4),
        crop_size=(16, 16, 16), percentiles={m: (-2.0, 3.0) for m in ("t1", "flair", "adc", "t1c")}, network=config,
    )
    return folder


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    target = tmp_path / "user-models"
    monkeypatch.setenv(registry.ENV_MODELS, str(target))
    return target


def test_import_from_folder_then_resolve_by_name(tmp_path, user_dir):
    source = _make_bundle(tmp_path / "src")
    bundle = registry.import_model(source)
    assert bundle.path == user_dir / "tiny"
    names = [e.name for e in registry.list_models()]
    assert names[0] == "tiny" and registry.default_model_name() == registry.shipped_default_name() == "phantom-demo-1.5mm"
    assert registry.resolve_model("tiny").folds == [0, 1]
    assert registry.resolve_model(str(source)).name == "tiny"  # a path works too
    with pytest.raises(BundleError, match="already installed"):
        registry.import_model(source)
    assert registry.import_model(source, overwrite=True).name == "tiny"


def test_import_from_zip_and_refuse_tampered_bundle(tmp_path, user_dir):
    source = _make_bundle(tmp_path / "zipped" / "tiny-bundle", name="zipped")
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.iterdir():
            zf.write(path, f"tiny-bundle/{path.name}")
    assert registry.import_model(archive).name == "zipped"

    tampered = _make_bundle(tmp_path / "tampered", name="tampered")
    weights = tampered / "fold1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="fold1.safetensors"):
        registry.import_model(tampered)
    assert not (user_dir / "tampered").exists()  # nothing half-installed


def test_verify_reports_a_bundle_modified_after_import(tmp_path, user_dir):
    registry.import_model(_make_bundle(tmp_path / "src"))
    weights = user_dir / "tiny" / "fold0.safetensors"
    weights.write_bytes(weights.read_bytes() + b"x")
    results = {entry.name: error for entry, error in registry.verify_models()}
    assert "fold0.safetensors" in results["tiny"]


def test_unknown_model_names_the_installed_ones(tmp_path, user_dir):
    registry.import_model(_make_bundle(tmp_path / "src"))
    with pytest.raises(BundleError, match=r"unknown model 'nope' \(installed: tiny"):
        registry.resolve_model("nope")


def test_builtin_models_are_listed_from_the_registry_file():
    root = registry.builtin_models_dir()
    assert root is not None, "ContrastAmplifier/Resources/Models/Models.json must ship with the extension"
    import jsonschema

    document = json.loads((root / registry.REGISTRY_FILE).read_text(encoding="utf-8"))
    jsonschema.validate(document, json.loads((root / "Models-schema.json").read_text(encoding="utf-8")))
    listed = document["models"]
    for item in listed:
        assert (root / item["folder"] / "bundle.json").is_file(), f"{item['folder']} listed but missing"


def test_listing_models_does_not_import_torch(tmp_path):
    """The Slicer model selector lists bundles in the GUI process: that must not load torch."""
    import subprocess
    import sys

    code = ("import sys; from ContrastAmplifierLib import registry; registry.list_models(); registry.default_model_name(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, registry.ENV_MODELS: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- bundles refused by import and verify ---------------------------------------------------------


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))
    edit(manifest)
    (folder / BUNDLE_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def _huge_crop(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["geometry"].__setitem__("crop_size", [1000, 1000, 1000]))


def _pickle_as_safetensors(folder: Path) -> None:
    """A pickle saved as fold0.safetensors with its SHA-256 updated in bundle.json."""
    (folder / "fold0.safetensors").write_bytes(pickle.dumps({"stem.weight": torch.zeros(2, 4, 3, 3, 3)}))
    _edit_manifest(folder, lambda m: m["files"].__setitem__("fold0.safetensors", sha256_file(folder / "fold0.safetensors")))


def _torch_zip_as_safetensors(folder: Path) -> None:
    """A torch.save zip saved as fold0.safetensors with its SHA-256 updated in bundle.json."""
    torch.save({"stem.weight": torch.zeros(2, 4, 3, 3, 3)}, folder / "fold0.safetensors")
    _edit_manifest(folder, lambda m: m["files"].__setitem__("fold0.safetensors", sha256_file(folder / "fold0.safetensors")))


BAD_BUNDLES = [
    pytest.param(_huge_crop, r"bundle\.json is not a valid model bundle manifest: at geometry/crop_size/\d: 1000 is greater", id="crop-1000^3"),
    pytest.param(_pickle_as_safetensors, r"fold0\.safetensors is not a safetensors file \(it is a Python pickle", id="pickle"),
    pytest.param(_torch_zip_as_safetensors, r"fold0\.safetensors is not a safetensors file \(it is a ZIP archive", id="torch-zip"),
]


@pytest.mark.parametrize("corrupt, message", BAD_BUNDLES)
def test_import_refuses_a_bad_bundle_and_installs_nothing(random_bundle_dir, tmp_path, user_dir, corrupt, message):
    source = Path(shutil.copytree(random_bundle_dir, tmp_path / "bad"))
    corrupt(source)
    with pytest.raises(BundleError, match=message):
        registry.import_model(source)
    assert not (user_dir / "random-tiny").exists()
    result = CliRunner().invoke(app, ["models", "import", str(source)])
    assert result.exit_code == 2 and "was not imported" in result.output and "Traceback" not in result.output
    assert not (user_dir / "random-tiny").exists()


@pytest.mark.parametrize("corrupt, message", BAD_BUNDLES)
def test_verify_reports_a_bundle_made_bad_after_import(random_bundle_dir, user_dir, corrupt, message):
    registry.import_model(random_bundle_dir)
    corrupt(user_dir / "random-tiny")
    results = {entry.name: error for entry, error in registry.verify_models()}
    assert results["phantom-demo"] is None
    assert re.search(message, results["random-tiny"])
    result = CliRunner().invoke(app, ["models", "verify"])
    assert result.exit_code == 1 and "FAIL random-tiny" in result.output and "OK   phantom-demo" in result.output


# -- the default model is explicit ----------------------------------------------------------------


def test_importing_bundles_keeps_the_shipped_default(tmp_path, user_dir):
    for name in ("aaa-first", "zzz-last"):
        registry.import_model(_make_bundle(tmp_path / name, name=name))
    assert [e.name for e in registry.list_models()][:2] == ["aaa-first", "zzz-last"]
    assert registry.default_model_name() == "phantom-demo-1.5mm"
    assert registry.resolve_model(None).name == "phantom-demo-1.5mm"
    assert not registry.default_model_file().exists()  # importing never writes a default


def test_set_default_survives_and_a_missing_default_is_an_error_not_a_fallback(tmp_path, user_dir):
    runner = CliRunner()
    registry.import_model(_make_bundle(tmp_path / "tiny"))
    result = runner.invoke(app, ["models", "set-default", "tiny"])
    assert result.exit_code == 0 and "default model: tiny" in result.output
    assert json.loads(registry.default_model_file().read_text(encoding="utf-8")) == {"default": "tiny"}
    registry.import_model(_make_bundle(tmp_path / "other", name="aaa-other"))  # another import: the choice stays
    assert registry.default_model_name() == "tiny" and registry.resolve_model(None).name == "tiny"
    listing = runner.invoke(app, ["models", "list"]).output.splitlines()
    assert any(line.startswith("* tiny\t") for line in listing) and any(line.startswith("  phantom-demo-1.5mm\t") for line in listing)

    shutil.rmtree(user_dir / "tiny")  # the chosen default is gone: say so, never use another model
    for call in (registry.default_model_name, registry.resolve_model):
        with pytest.raises(BundleError, match=r"the default model 'tiny' \(chosen in .*\.default\.json\) is not installed.*set-default --shipped"):
            call()
    assert runner.invoke(app, ["models", "verify"]).exit_code == 1

    result = runner.invoke(app, ["models", "set-default", "--shipped"])
    assert result.exit_code == 0 and "phantom-demo-1.5mm (the shipped one)" in result.output
    assert not registry.default_model_file().exists() and registry.default_model_name() == "phantom-demo-1.5mm"


def test_set_default_refuses_unknown_or_bad_models_and_reads_a_broken_choice_file_loudly(random_bundle_dir, tmp_path, user_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["models", "set-default", "nope"])
    assert result.exit_code == 2 and "unknown model 'nope'" in result.output and "models import" in result.output
    assert runner.invoke(app, ["models", "set-default"]).exit_code == 2  # neither NAME nor --shipped
    registry.import_model(random_bundle_dir)
    _huge_crop(user_dir / "random-tiny")
    with pytest.raises(BundleError, match="crop_size"):
        registry.set_default_model("random-tiny")
    assert not registry.default_model_file().exists()
    registry.default_model_file().write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match=r"\.default\.json is unreadable .*delete it or choose one"):
        registry.default_model_name()


# -- where the shipped and the user's bundles are found ----------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_shipped_models_are_the_module_resources_beside_the_lib():
    """Slicer installs the module's resources next to ContrastAmplifierLib (qt-scripted-modules/Resources/...):
    the registry looks exactly there, as it is in the source tree (ContrastAmplifier/Resources/Models)."""
    root = registry.builtin_models_dir()
    assert root == Path(registry.__file__).resolve().parent.parent / "Resources" / "Models"
    assert root == REPO / "ContrastAmplifier" / "Resources" / "Models"
    assert registry.shipped_default_name() == "phantom-demo-1.5mm"


def _lib_copy_lists(tmp_path: Path, models_at: list) -> str:
    """Copy ContrastAmplifierLib to tmp/lib/, put a shipped-models folder at each of ``models_at`` (relative to
    tmp/), and return what builtin_models_dir() says there (in a child, the copy first on sys.path)."""
    import os
    import subprocess
    import sys

    shutil.copytree(Path(registry.__file__).parent, tmp_path / "lib" / "ContrastAmplifierLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for where in models_at:
        shutil.copytree(registry.builtin_models_dir(), tmp_path / where, ignore=shutil.ignore_patterns("*.safetensors"))
    code = "from ContrastAmplifierLib import registry; print(registry.__file__); print(registry.builtin_models_dir())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "lib")})
    assert done.returncode == 0, done.stderr
    module_file, found = done.stdout.split()
    assert Path(module_file).parent == tmp_path / "lib" / "ContrastAmplifierLib"
    return found


def test_shipped_models_are_looked_for_beside_the_lib_only(tmp_path):
    """No walk over the parent folders: a Resources/Models higher up (the old top-level layout, or any
    folder above an installed extension) is not the extension's."""
    assert _lib_copy_lists(tmp_path, ["Resources/Models"]) == "None"
    assert _lib_copy_lists(tmp_path / "beside", ["lib/Resources/Models"]) == str(tmp_path / "beside" / "lib" / "Resources" / "Models")


def test_user_data_dir_without_platformdirs_is_platformdirs_own(tmp_path, monkeypatch):
    """Slicer ships no platformdirs: before the first-use install the registry computes the folder itself.
    It must be the one platformdirs gives (bundles imported by the command line are found in Slicer and
    back), on this machine and for macOS and Windows."""
    import platformdirs
    import platformdirs.macos
    import platformdirs.windows

    app = registry.APP_NAME
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in (None, str(tmp_path / "xdg-data"), "relative/xdg"):  # unset, absolute, relative (ignored)
        if xdg is None:
            monkeypatch.delenv("XDG_DATA_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_DATA_HOME", xdg)
        expected = Path(platformdirs.user_data_dir(app, appauthor=False))
        assert registry._fallback_user_data_dir(app) == expected, xdg
        assert registry.user_data_dir() == expected  # platformdirs importable here
        assert registry._fallback_user_data_dir(app, "darwin") == Path(platformdirs.macos.MacOS(app, appauthor=False).user_data_dir)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert registry._fallback_user_data_dir(app) == tmp_path / "home" / ".local" / "share" / app
    assert registry._fallback_user_data_dir(app, "darwin") == tmp_path / "home" / "Library" / "Application Support" / app
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))
    monkeypatch.setattr(platformdirs.windows, "get_win_folder", platformdirs.windows.get_win_folder_from_env_vars)
    windows = Path(platformdirs.windows.Windows(app, appauthor=False).user_data_dir)
    assert registry._fallback_user_data_dir(app, "win32") == windows == tmp_path / "AppData" / "Local" / app


def test_models_are_listed_without_platformdirs_or_jsonschema(tmp_path):
    """What the Slicer panel calls before the first-use install (no platformdirs, no jsonschema, no torch):
    a bundle imported where platformdirs puts it is listed, with the shipped demo and the default."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != registry.ENV_MODELS}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "home" / "data"))
    # where the command line (platformdirs installed) imports bundles, in the child's environment
    code_where = "from ContrastAmplifierLib import registry; print(registry.user_models_dir())"
    where = subprocess.run([sys.executable, "-c", code_where], capture_output=True, text=True, timeout=120, env=env)
    assert where.returncode == 0, where.stderr
    user_dir = Path(where.stdout.strip())
    assert user_dir == tmp_path / "home" / "data" / registry.APP_NAME / "models"  # platformdirs' answer
    _make_bundle(user_dir / "mine", name="mine")

    blocked = ("import sys\n"
               "for name in ('platformdirs', 'jsonschema', 'torch', 'safetensors'):\n"
               "    sys.modules[name] = None  # as absent as in Slicer before the first-use install\n"
               "from ContrastAmplifierLib import registry\n"
               "entries = registry.list_models()\n"
               "print(registry.user_models_dir())\n"
               "print(' | '.join(f'{e.name}:{e.source}:{list(e.folds)}:{list(e.spacing)}' for e in entries))\n"
               "print(registry.default_model_name())\n")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    folder, listing, default = done.stdout.splitlines()
    assert Path(folder) == user_dir
    assert listing.split(" | ") == ["mine:user:[0, 1]:[4.0, 4.0, 4.0]", "phantom-demo-1.5mm:builtin:[0, 4]:[1.5, 1.5, 1.5]",
                                   "phantom-demo:builtin:[0, 1, 2, 3, 4]:[3.0, 3.0, 3.0]"]
    assert default == "phantom-demo-1.5mm"


def test_read_entry_describes_a_bundle_from_plain_json(tmp_path):
    entry = registry.read_entry(registry.builtin_models_dir() / "phantom-demo", "builtin")
    assert (entry.name, entry.folds, entry.spacing, entry.crop_size) == ("phantom-demo", (0, 1, 2, 3, 4), (3.0, 3.0, 3.0), (56, 64, 56))
    assert entry.intended_use == "synthetic phantom demo - not for clinical use"
    assert registry.read_entry(tmp_path) is None  # no bundle.json
    (tmp_path / "bundle.json").write_text("[1, 2]", encoding="utf-8")
    broken = registry.read_entry(tmp_path)
    assert broken.description == "unreadable bundle.json" and broken.folds == () and broken.spacing == ()


def test_import_takes_the_bundle_json_and_names_an_existing_model(tmp_path, user_dir):
    source = _make_bundle(tmp_path / "src")
    assert registry.import_model(source / "bundle.json").name == "tiny"  # what a file dialog returns
    with pytest.raises(registry.ModelAlreadyInstalledError, match="already installed") as info:
        registry.import_model(source)
    assert isinstance(info.value, BundleError) and info.value.name == "tiny" and info.value.path == user_dir / "tiny"
