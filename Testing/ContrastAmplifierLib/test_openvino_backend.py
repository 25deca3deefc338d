"""The OpenVINO CPU backend (``--backend openvino``): same ensemble as torch, cached conversions."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

from ContrastAmplifierLib import openvino_backend  # noqa: E402
from ContrastAmplifierLib.bundle import load_bundle, write_bundle  # noqa: E402
from ContrastAmplifierLib.ensemble import InferenceSettings, predict_ensemble, resolve_backend  # noqa: E402
from ContrastAmplifierLib.network import NetworkConfig, build_network  # noqa: E402

MODALITIES = ("t1", "flair", "adc", "t1c")
CONFIG = NetworkConfig(base_channels=4, levels=3)
SHAPE = (4, 24, 32, 24)  # (C, Z, Y, X)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """Two folds of a base-4, 3-level UNet with random weights (a bundle, as `predict` loads one)."""
    states = {}
    for fold in (0, 1):
        torch.manual_seed(100 + fold)
        states[fold] = build_network(CONFIG).state_dict()
    out = tmp_path_factory.mktemp("tiny-bundle")
    return write_bundle(out, states, name="random-ov", version="0", description="random weights", intended_use="tests only",
                        training_data="none", modalities=MODALITIES, spacing=(4.0, 4.0, 4.0), crop_size=(24, 32, 24),
                        percentiles={m: (-2.0, 3.0) for m in MODALITIES}, network=CONFIG)


@pytest.fixture
def ov_cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder ($CA_OPENVINO_CACHE)."""
    folder = tmp_path / "ov-cache"
    monkeypatch.setenv(openvino_backend.CACHE_ENV, str(folder))
    return folder


def _inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE, dtype=np.float32)


def _settings(backend: str, precision: str = "exact") -> InferenceSettings:
    return InferenceSettings.create("cpu", precision, max_batch=1, backend=backend)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.exists() else []


def test_openvino_exact_matches_torch_fp32_over_the_ensemble(tiny_bundle, ov_cache):
    models = tiny_bundle.load_models()
    x = _inputs()
    reference = predict_ensemble(models, x, 8, _settings("torch"))
    before = openvino_backend.conversions
    out = predict_ensemble(models, x, 8, _settings("openvino"))
    assert out.shape == SHAPE[1:] and out.dtype == np.float32
    assert float(np.abs(out - reference).max()) <= 1e-5
    assert openvino_backend.conversions == before + 2  # one per fold at this shape
    assert len(_entries(ov_cache)) == 2
    for entry in _entries(ov_cache):
        assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "model.bin", "model.xml"]
        recorded = json.loads((entry / "entry.json").read_text())
        assert recorded["key"]["input_shape"] == [1, *SHAPE] and recorded["key"]["network"] == CONFIG.to_dict()
    # a sliding window runs through the same backend (one more shape per fold)
    window = (24, 32, 16)
    tiled = predict_ensemble(models, x, 2, InferenceSettings.create("cpu", "exact", backend="openvino", window=window))
    tiled_torch = predict_ensemble(models, x, 2, InferenceSettings.create("cpu", "exact", backend="torch", window=window))
    assert tiled.shape == SHAPE[1:] and float(np.abs(tiled - tiled_torch).max()) <= 1e-5


def test_openvino_fast_is_bf16_within_5e3(tiny_bundle, ov_cache, caplog):
    models = tiny_bundle.load_models()
    x = _inputs(1)
    if not openvino_backend.supports_bf16():
        with caplog.at_level(logging.WARNING, logger=openvino_backend.__name__):
            fast = predict_ensemble(models, x, 2, _settings("openvino", "fast"))
        assert "no BF16 instructions" in caplog.text  # "fast" falls back to f32, saying so
        assert float(np.abs(fast - predict_ensemble(models, x, 2, _settings("torch"))).max()) <= 1e-5
        pytest.skip("this CPU has no BF16 instructions for OpenVINO: fast runs in f32 (checked above)")
    reference = predict_ensemble(models, x, 8, _settings("torch"))
    fast = predict_ensemble(models, x, 8, _settings("openvino", "fast"))
    assert float(np.abs(fast - reference).max()) <= 5e-3


def test_second_run_uses_the_cache_without_converting(tiny_bundle, ov_cache, monkeypatch):
    models = tiny_bundle.load_models()
    x = _inputs(2)
    first = predict_ensemble(models, x, 2, _settings("openvino"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(openvino_backend, "convert", no_conversion)
    before = openvino_backend.conversions
    again = predict_ensemble(tiny_bundle.load_models(), x, 2, _settings("openvino"))
    assert openvino_backend.conversions == before
    np.testing.assert_array_equal(again, first)


def test_changed_weights_get_a_new_cache_entry(tiny_bundle, ov_cache):
    models = tiny_bundle.load_models()
    x = _inputs(3)
    predict_ensemble(models[:1], x, 1, _settings("openvino"))
    first = _entries(ov_cache)
    assert len(first) == 1
    with torch.no_grad():
        models[0].head.bias.add_(0.5)  # in place: another SHA-256
    changed = predict_ensemble(models[:1], x, 1, _settings("openvino"))
    assert len(_entries(ov_cache)) == 2 and first[0] in _entries(ov_cache)
    np.testing.assert_allclose(changed, predict_ensemble(models[:1], x, 1, _settings("torch")), atol=1e-5)
    # another input shape is another entry too
    predict_ensemble(models[:1], _inputs(3)[:, :16], 1, _settings("openvino"))
    assert len(_entries(ov_cache)) == 3


@pytest.mark.parametrize("damage", ["bin", "xml", "sidecar"])
def test_a_corrupted_cache_entry_is_detected_and_rebuilt(tiny_bundle, ov_cache, caplog, damage):
    models = tiny_bundle.load_models()[:1]
    x = _inputs(4)
    expected = predict_ensemble(models, x, 1, _settings("openvino"))
    (entry,) = _entries(ov_cache)
    if damage == "bin":
        data = bytearray((entry / "model.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF  # one weight byte: a plausible file OpenVINO would happily read
        (entry / "model.bin").write_bytes(bytes(data))
    elif damage == "xml":
        (entry / "model.xml").write_text((entry / "model.xml").read_text()[:-50])
    else:
        (entry / "entry.json").write_text("{")
    before = openvino_backend.conversions
    with caplog.at_level(logging.WARNING, logger=openvino_backend.__name__):
        again = predict_ensemble(models, x, 1, _settings("openvino"))
    assert openvino_backend.conversions == before + 1
    assert f"OpenVINO cache entry {entry} is unusable" in caplog.text
    np.testing.assert_array_equal(again, expected)
    assert _entries(ov_cache) == [entry]
    assert openvino_backend._check_entry(entry, openvino_backend.cache_key(models[0], (1, *SHAPE))[1]) is None


def test_falls_back_to_direct_conversion_when_onnx_export_fails(tiny_bundle, ov_cache, monkeypatch):
    models = tiny_bundle.load_models()[:1]
    x = _inputs(5)

    def broken_export(*args, **kwargs):
        raise RuntimeError("no ONNX today")

    monkeypatch.setattr(openvino_backend, "_export_onnx", broken_export)
    out = predict_ensemble(models, x, 2, _settings("openvino"))
    np.testing.assert_allclose(out, predict_ensemble(models, x, 2, _settings("torch")), atol=1e-5)


def test_backend_choice_and_its_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "openvino"  # installed here
    assert resolve_backend("auto", cpu, compile=True) == "torch"  # torch.compile asked for: torch
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    assert InferenceSettings.create("cpu").backend == "torch"  # the library default stays torch
    with pytest.raises(ValueError, match="runs on the CPU only, not on cuda: use --device cpu"):
        resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="drop --compile, or use --backend torch"):
        InferenceSettings.create("cpu", backend="openvino", compile=True)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, openvino"):
        InferenceSettings.create("cpu", backend="onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError) as refused:
        InferenceSettings.create("cpu", backend="openvino")
    message = str(refused.value)
    assert "\n" not in message and "--backend openvino needs the openvino package" in message
    assert 'pip install "slicer-contrast-amplifier[openvino]"' in message and "or use --backend torch" in message


def _predict(case: Path, bundle: Path, out: Path, backend: str, cache: Path, *extra: str,
             env: Optional[dict] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ContrastAmplifierLib.cli", "predict", *[
        arg for m in ("t1", "flair", "adc", "t1c") for arg in (f"--{m}", str(case / f"{m}.nii.gz"))],
        "--model", str(bundle), "--flips", "2", "--device", "cpu", "--brain-mask", str(case / "brain_mask.nii.gz"),
        "--threads", "1", "--progress", "json", "--out", str(out), "--backend", backend, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", openvino_backend.CACHE_ENV: str(cache), **(env or {})})


@pytest.mark.slow
def test_predict_backend_openvino_matches_torch_end_to_end(tmp_path, small_case_dir, random_bundle_dir):
    cache = tmp_path / "ov-cache"
    torch_run = _predict(small_case_dir, random_bundle_dir, tmp_path / "torch.nii.gz", "torch", cache)
    assert torch_run.returncode == 0, torch_run.stderr
    assert not cache.exists()  # torch never touches the OpenVINO cache
    ov_run = _predict(small_case_dir, random_bundle_dir, tmp_path / "ov.nii.gz", "openvino", cache)
    assert ov_run.returncode == 0, ov_run.stderr
    for line in ov_run.stdout.splitlines():  # exporter chatter stays off the JSON progress stream
        json.loads(line)
    assert len(_entries(cache)) == 2  # both folds at the bundle's crop
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "torch.nii.gz")))
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ov.nii.gz")))
    scale = float(np.abs(reference).max())
    assert float(np.abs(out - reference).max()) <= 1e-4 * scale


def test_predict_refuses_openvino_with_compile_before_any_work(tmp_path, small_case_dir, random_bundle_dir):
    refused = _predict(small_case_dir, random_bundle_dir, tmp_path / "ov.nii.gz", "openvino", tmp_path / "c",
                       "--compile")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--compile is torch.compile, which --backend openvino does not use" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "ov.nii.gz").exists()


def test_load_bundle_models_hash_like_the_weights(tiny_bundle):
    """The cache key follows the weights, not the model object: reloaded folds share their entries."""
    bundle = load_bundle(tiny_bundle.path)
    first, again = bundle.load_model(0), bundle.load_model(0)
    assert openvino_backend.weights_sha256(first) == openvino_backend.weights_sha256(again)
    assert openvino_backend.weights_sha256(first) != openvino_backend.weights_sha256(bundle.load_model(1))
