"""Model registry: listing, default model, import from folder/zip, hash refusal."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from ContrastAmplifierLib import registry
from ContrastAmplifierLib.bundle import BundleError, write_bundle
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
    assert names[0] == "tiny" and registry.default_model_name() == "tiny"
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
    assert root is not None, "Resources/Models/Models.json must ship with the extension"
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

    code = "import sys; from ContrastAmplifierLib import registry; registry.list_models(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, registry.ENV_MODELS: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
