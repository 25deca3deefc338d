"""Model bundles: schema validation, SHA-256 per file, refusal of modified files, round trip."""

from __future__ import annotations

import json

import pytest
import torch

from ContrastAmplifierLib.bundle import BUNDLE_FILE, BundleError, load_bundle, sha256_file, write_bundle
from ContrastAmplifierLib.network import NetworkConfig, ResidualUNet3D

torch.set_num_threads(1)
CONFIG = NetworkConfig(base_channels=4, levels=3)


def _write(tmp_path, folds=(0, 1)):
    states = {}
    for k in folds:
        torch.manual_seed(k)
        states[k] = ResidualUNet3D(CONFIG).state_dict()
    bundle = write_bundle(
        tmp_path / "bundle", states, name="toy-model", version="0.0.1", description="unit test",
        intended_use="tests only - not for clinical use", training_data="random weights",
        modalities=["t1", "flair", "adc", "t1c"], spacing=(2.0, 2.0, 2.0), crop_size=(16, 16, 16),
        percentiles={"t1": (-2.0, 2.5), "flair": (-2, 3), "adc": (-1.5, 3), "t1c": (-2, 4)}, network=CONFIG,
        training={"epochs": 0},
    )
    return bundle, states


def test_round_trip_and_hashes(tmp_path):
    bundle, states = _write(tmp_path)
    manifest = json.loads((bundle.path / BUNDLE_FILE).read_text(encoding="utf-8"))
    assert manifest["files"] == {f"fold{k}.safetensors": sha256_file(bundle.path / f"fold{k}.safetensors") for k in (0, 1)}
    again = load_bundle(bundle.path / BUNDLE_FILE)
    assert again.folds == [0, 1] and again.modalities == ["t1", "flair", "adc", "t1c"]
    assert again.spacing == (2.0, 2.0, 2.0) and again.crop_size == (16, 16, 16)
    assert again.percentiles["t1c"] == (-2.0, 4.0)
    models = again.load_models()
    for k, model in enumerate(models):
        assert not model.training
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, states[k][name])
    with torch.no_grad():
        assert models[0](torch.rand(1, 4, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_modified_weight_file_is_refused_naming_the_file(tmp_path):
    bundle, _ = _write(tmp_path)
    target = bundle.path / "fold1.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"fold1\.safetensors.*SHA-256"):
        load_bundle(bundle.path)
    # Loading without verification still refuses to read that fold's weights.
    unverified = load_bundle(bundle.path, verify=False)
    unverified.load_model(0)
    with pytest.raises(BundleError, match="fold1.safetensors"):
        unverified.load_model(1)


def test_missing_file_and_invalid_manifest_are_refused(tmp_path):
    bundle, _ = _write(tmp_path)
    (bundle.path / "fold0.safetensors").unlink()
    with pytest.raises(BundleError, match="missing.*fold0.safetensors"):
        load_bundle(bundle.path)
    bundle, _ = _write(tmp_path / "b")
    manifest = json.loads((bundle.path / BUNDLE_FILE).read_text(encoding="utf-8"))
    manifest["geometry"]["crop_size"] = [16, 16]
    (bundle.path / BUNDLE_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match="geometry/crop_size"):
        load_bundle(bundle.path)
    manifest["geometry"]["crop_size"] = [16, 16, 16]
    manifest["modalities"] = ["t1", "flair", "t1c"]
    (bundle.path / BUNDLE_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match="3 modalities"):
        load_bundle(bundle.path)
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path / "nowhere")
