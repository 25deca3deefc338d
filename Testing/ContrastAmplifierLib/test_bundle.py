"""Model bundles: schema and bounds, SHA-256 per file, weight files parsed as safetensors, round trip."""

from __future__ import annotations

import io
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from ContrastAmplifierLib.bundle import BUNDLE_FILE, BundleError, load_bundle, network_tensor_shapes, sha256_file, write_bundle
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


# -- full validation: geometry and network bounds, weight files parsed as safetensors -----------


def _copy_bundle(source: Path, tmp_path: Path) -> Path:
    """A private copy of a bundle folder, free to corrupt."""
    return Path(shutil.copytree(source, tmp_path / "copy"))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))
    edit(manifest)
    (folder / BUNDLE_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def _replace_weights(folder: Path, name: str, data: bytes) -> None:
    """Overwrite a weight file and update its SHA-256 in bundle.json, as a tamperer would."""
    (folder / name).write_bytes(data)
    _edit_manifest(folder, lambda m: m["files"].__setitem__(name, sha256_file(folder / name)))


def _set(path: str, value):
    def edit(manifest):
        *parents, leaf = path.split("/")
        node = manifest
        for key in parents:
            node = node[key]
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return edit


@pytest.mark.parametrize("path, value, message", [
    ("geometry/crop_size", [1000, 1000, 1000], r"geometry/crop_size/\d: 1000 is greater than the maximum of 512"),
    ("geometry/crop_size", [400, 400, 400], r"geometry/crop_size: 400x400x400 = 64,000,000 voxels exceeds MAX_CROP_VOXELS"),
    ("geometry/spacing", [0.0, 1.0, 1.0], r"geometry/spacing/0: 0.0 is less than the minimum of 0.25"),
    ("geometry/spacing", [float("nan"), 1.0, 1.0], r"geometry/spacing/0: is not a finite number"),
    ("geometry/percentiles/t1c", [3.0, -2.0], r"geometry/percentiles/t1c: low 3.0 is not below high -2.0"),
    ("network/base_channels", 4096, r"network/base_channels: 4096 is greater than the maximum of 64"),
    ("network/levels", 12, r"network/levels: 12 is greater than the maximum of 6"),
    ("network/out_channels", 3, r"network/out_channels: 1 was expected"),
    ("files/extra.safetensors", "0" * 64, r"files: .*\['extra.safetensors'\] belong to no fold"),
])
def test_out_of_bounds_manifest_is_refused_naming_field_and_fix(random_bundle_dir, tmp_path, path, value, message):
    folder = _copy_bundle(random_bundle_dir, tmp_path)
    _edit_manifest(folder, _set(path, value))
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(folder)
    text = str(caught.value)
    assert str(folder / BUNDLE_FILE) in text and ("re-export" in text or "retrain" in text)  # names the file and the fix


def test_crop_smaller_than_the_network_downsampling_is_refused_by_the_writer(tmp_path):
    config = NetworkConfig(base_channels=1, levels=6)  # 5 downsamplings: sides of at least 32 voxels
    with pytest.raises(BundleError, match=r"geometry/crop_size: \[16, 64, 64\] has a side below 32 voxels"):
        write_bundle(tmp_path, {0: ResidualUNet3D(config).state_dict()}, name="deep", version="0", description="d",
                     intended_use="tests only", training_data="none", modalities=["t1", "flair", "adc", "t1c"],
                     spacing=(2, 2, 2), crop_size=(16, 64, 64), percentiles={m: (-2, 3) for m in ("t1", "flair", "adc", "t1c")},
                     network=config)
    assert not (tmp_path / BUNDLE_FILE).exists()


def _pickled(state: dict) -> bytes:
    return pickle.dumps(dict(state))


def _torch_zip(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def _wrong_shape(state: dict) -> bytes:
    tensors = dict(state)
    tensors["stem.weight"] = torch.zeros(3, 4, 3, 3, 3)
    return safetensors_save(tensors)


def _integer_dtype(state: dict) -> bytes:
    tensors = dict(state)
    tensors["head.bias"] = tensors["head.bias"].to(torch.int32)
    return safetensors_save(tensors)


def _missing_and_extra(state: dict) -> bytes:
    tensors = dict(state)
    tensors["backdoor.weight"] = tensors.pop("head.weight")
    return safetensors_save(tensors)


def _header_longer_than_file(state: dict) -> bytes:
    data = safetensors_save(dict(state))
    return (len(data) + 1).to_bytes(8, "little") + data[8:]


def _truncated(state: dict) -> bytes:
    return safetensors_save(dict(state))[:-4]


@pytest.mark.parametrize("corrupt, message", [
    (_pickled, r"fold0\.safetensors is not a safetensors file \(it is a Python pickle"),
    (_torch_zip, r"fold0\.safetensors is not a safetensors file \(it is a ZIP archive, e\.g\. a torch\.save checkpoint\)"),
    (_header_longer_than_file, r"fold0\.safetensors is not a safetensors file: its header length \d+ does not fit in the file"),
    (_truncated, r"fold0\.safetensors is not a valid safetensors file"),
    (_wrong_shape, r"fold0\.safetensors does not hold the weights of the network .*wrong shapes: stem\.weight \[3, 4, 3, 3, 3\] \(needs \[2, 4, 3, 3, 3\]\)"),
    (_integer_dtype, r"fold0\.safetensors does not hold .*dtypes other than F16/BF16/F32/F64: head\.bias I32"),
    (_missing_and_extra, r"fold0\.safetensors does not hold .*missing tensors: head\.weight; unexpected tensors: backdoor\.weight"),
])
def test_weight_file_that_is_not_the_declared_network_is_refused_despite_a_matching_hash(random_bundle_dir, tmp_path, corrupt, message):
    folder = _copy_bundle(random_bundle_dir, tmp_path)
    state = load_bundle(folder).load_state_dict(0)
    _replace_weights(folder, "fold0.safetensors", corrupt(state))
    with pytest.raises(BundleError, match=message):
        load_bundle(folder)
    unverified = load_bundle(folder, verify=False)  # a fold is checked again right before it is read
    unverified.load_model(1)
    with pytest.raises(BundleError, match=message):
        unverified.load_model(0)


def test_network_shapes_come_from_the_meta_device_without_allocating():
    """The paper-sized network's shapes are known without building its ~1.8 M parameters in memory."""
    shapes = network_tensor_shapes(NetworkConfig())
    assert shapes["stem.weight"] == (16, 4, 3, 3, 3) and shapes["head.weight"] == (1, 16, 1, 1, 1)
    assert sum(math.prod(s) for s in shapes.values()) == 1_785_329
    huge = network_tensor_shapes(NetworkConfig(base_channels=64, levels=6))  # ~1.8e8 parameters, no memory
    assert huge["encoders.5.conv2.weight"] == (2048, 2048, 3, 3, 3)


def test_shipped_demo_bundle_passes_every_check():
    from ContrastAmplifierLib.registry import builtin_models_dir

    bundle = load_bundle(builtin_models_dir() / "phantom-demo")
    assert bundle.crop_size == (56, 64, 56) and len(bundle.folds) == 5


# -- the manifest alone, without torch (the Slicer GUI reads folds and geometry with it) ----------


def test_read_manifest_is_the_validated_bundle_json(random_bundle_dir, tmp_path):
    from ContrastAmplifierLib.bundle import read_manifest

    manifest = read_manifest(random_bundle_dir)
    assert manifest == load_bundle(random_bundle_dir).manifest
    assert read_manifest(random_bundle_dir / BUNDLE_FILE) == manifest
    assert manifest["folds"] == [0, 1] and manifest["geometry"]["crop_size"] == [40, 48, 40]
    with pytest.raises(BundleError, match=r"no bundle\.json in .*point to a model bundle folder"):
        read_manifest(tmp_path)
    folder = _copy_bundle(random_bundle_dir, tmp_path)
    (folder / "fold0.safetensors").write_bytes(b"not read: only the manifest is")
    assert read_manifest(folder) == manifest
    _edit_manifest(folder, _set("network/levels", 6))  # 5 downsamplings: crop sides of at least 32 voxels
    _edit_manifest(folder, _set("geometry/crop_size", [16, 48, 40]))
    with pytest.raises(BundleError, match=r"geometry/crop_size: \[16, 48, 40\] has a side below 32 voxels"):
        read_manifest(folder)


def test_reading_a_manifest_does_not_import_torch(random_bundle_dir, tmp_path):
    """``import ContrastAmplifierLib.bundle`` and :func:`read_manifest` (valid or refused) leave torch unloaded."""
    import subprocess
    import sys

    refused = _copy_bundle(random_bundle_dir, tmp_path)
    _edit_manifest(refused, _set("network/levels", 6))  # refused by the cross-field crop rule, not the schema
    _edit_manifest(refused, _set("geometry/crop_size", [16, 48, 40]))
    code = (
        "import sys\n"
        "import ContrastAmplifierLib.bundle as bundle\n"
        f"folds = bundle.read_manifest({str(random_bundle_dir)!r})['folds']\n"
        "try:\n"
        f"    bundle.read_manifest({str(refused)!r})\n"
        "except bundle.BundleError:\n"
        "    folds.append('refused')\n"
        "print(folds, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 'refused'] False"
