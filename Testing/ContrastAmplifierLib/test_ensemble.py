"""Ensemble averaging: flip algebra, equivariance, OOM fallback, progress and cancel."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from ContrastAmplifierLib.ensemble import (
    MIRRORINGS,
    InferenceSettings,
    mirrorings,
    predict_ensemble,
    resolve_device,
)
from ContrastAmplifierCommon.progress import CancelToken, Cancelled

torch.set_num_threads(1)


def _random_conv(seed: int, in_channels: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(in_channels, 1, 3, padding=1), torch.nn.Sigmoid())
    return net


def _cpu(precision: str = "exact", max_batch: int = 1) -> InferenceSettings:
    return InferenceSettings.create("cpu", precision=precision, max_batch=max_batch)


def test_mirrorings_are_all_subsets_of_the_three_axes():
    assert len(set(MIRRORINGS)) == 8
    assert set(MIRRORINGS) == {c for r in range(4) for c in itertools.combinations((2, 3, 4), r)}
    assert mirrorings(1) == ((),) and mirrorings(2) == ((), (4,))
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        mirrorings(3)


def test_eight_way_average_is_flip_equivariant_for_a_non_symmetric_model():
    rng = np.random.default_rng(0)
    x = rng.random((2, 7, 9, 6), dtype=np.float32)  # odd sizes, as the crop may produce
    models = [_random_conv(1), _random_conv(2)]
    base = predict_ensemble(models, x, 8, _cpu())
    for dims in MIRRORINGS[1:]:
        array_axes = tuple(d - 1 for d in dims)  # (C,Z,Y,X) -> spatial axes 1..3
        flipped = predict_ensemble(models, np.flip(x, array_axes).copy(), 8, _cpu())
        np.testing.assert_allclose(np.flip(flipped, tuple(a - 1 for a in array_axes)), base, atol=1e-6)
    # a single (identity) prediction of the same models is *not* equivariant: the test can fail
    single = predict_ensemble(models, x, 1, _cpu())
    flipped_single = predict_ensemble(models, np.flip(x, 3).copy(), 1, _cpu())
    assert np.abs(np.flip(flipped_single, 2) - single).max() > 1e-3


def test_symmetric_toy_model_gives_its_own_output_and_mean_is_exact():
    """A model with a fully symmetric kernel is flip-equivariant: all 8 predictions coincide."""
    conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        kernel = torch.rand(3, 3, 3)
        for dims in ((0,), (1,), (2,)):
            kernel = kernel + torch.flip(kernel, dims)
        conv.weight.copy_(kernel[None, None])
    x = np.random.default_rng(1).random((1, 8, 8, 8), dtype=np.float32)
    expected = conv(torch.from_numpy(x)[None]).detach().numpy()[0, 0]
    np.testing.assert_allclose(predict_ensemble([conv], x, 8, _cpu()), expected, rtol=1e-5, atol=1e-5)


def test_mean_of_fold_models_equals_average_of_their_predictions():
    x = np.random.default_rng(2).random((2, 6, 6, 6), dtype=np.float32)
    models = [_random_conv(s) for s in (3, 4, 5)]
    each = [predict_ensemble([m], x, 4, _cpu()) for m in models]
    np.testing.assert_allclose(predict_ensemble(models, x, 4, _cpu()), np.mean(each, axis=0), atol=1e-6)


def test_batched_mirrorings_match_one_at_a_time():
    x = np.random.default_rng(3).random((2, 5, 6, 7), dtype=np.float32)
    models = [_random_conv(6)]
    np.testing.assert_allclose(
        predict_ensemble(models, x, 8, _cpu(max_batch=8)), predict_ensemble(models, x, 8, _cpu(max_batch=1)), atol=1e-6
    )


class _OutOfMemoryAboveOne(torch.nn.Module):
    """Raises the CUDA-style OOM error for batches larger than one (exercises the fallback)."""

    def __init__(self):
        super().__init__()
        self.inner = _random_conv(7, in_channels=1)
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_instead_of_failing():
    x = np.random.default_rng(4).random((1, 6, 6, 6), dtype=np.float32)
    model = _OutOfMemoryAboveOne()
    out = predict_ensemble([model], x, 8, _cpu(max_batch=8))
    assert model.batch_sizes[:3] == [8, 4, 2] and set(model.batch_sizes[3:]) == {1}
    np.testing.assert_allclose(out, predict_ensemble([model.inner], x, 8, _cpu()), atol=1e-6)


def test_bf16_fast_mode_is_close_to_fp32():
    x = np.random.default_rng(5).random((2, 8, 8, 8), dtype=np.float32)
    models = [_random_conv(8)]
    exact = predict_ensemble(models, x, 2, _cpu("exact"))
    fast = predict_ensemble(models, x, 2, _cpu("fast"))
    assert np.abs(fast - exact).max() < 1e-2


def test_progress_reaches_one_and_cancel_stops_before_the_next_pass():
    x = np.random.default_rng(6).random((2, 4, 4, 4), dtype=np.float32)
    seen: list[float] = []
    predict_ensemble([_random_conv(9), _random_conv(10)], x, 4, _cpu(), progress=lambda s, f, m="": seen.append(f))
    assert seen == pytest.approx([i / 8 for i in range(1, 9)])

    token = CancelToken()

    def cancel_after_first(stage, fraction, message=""):
        token.cancel()

    with pytest.raises(Cancelled):
        predict_ensemble([_random_conv(9)], x, 8, _cpu(), progress=cancel_after_first, cancel=token)


def test_device_resolution_errors_name_the_fix():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu_fp32():
    x = np.random.default_rng(7).random((2, 16, 16, 16), dtype=np.float32)
    models = [_random_conv(11)]
    cpu = predict_ensemble(models, x, 8, _cpu("exact"))
    gpu = predict_ensemble(models, x, 8, InferenceSettings.create("cuda", "fast"))
    assert np.abs(gpu - cpu).max() < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_bundle_on_cuda_matches_cpu_fp32():
    """The shipped bundle's real weights, 5 folds x 8 mirrorings: CUDA exact (TF32 off) and CUDA
    bf16 against the CPU fp32 reference, within the documented tolerances (1e-5, 5e-3)."""
    from ContrastAmplifierLib.bench_inference import _input_volume
    from ContrastAmplifierLib.bundle import load_bundle

    bundle = load_bundle(Path(__file__).resolve().parents[2] / "ContrastAmplifier" / "Resources" / "Models" / "phantom-demo")
    x = _input_volume(bundle.crop_size[::-1], bundle.network_config.in_channels, seed=3)
    reference = predict_ensemble(bundle.load_models(), x, 8, _cpu("exact"))
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    exact = predict_ensemble(bundle.load_models(), x, 8, InferenceSettings.create("cuda", "exact"))
    fast = predict_ensemble(bundle.load_models(), x, 8, InferenceSettings.create("cuda", "fast"))
    assert np.abs(exact - reference).max() <= 1e-5
    assert np.abs(fast - reference).max() <= 5e-3
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags  # restored


def _small_unet(seed: int) -> torch.nn.Module:
    from ContrastAmplifierLib.network import NetworkConfig, ResidualUNet3D

    torch.manual_seed(seed)
    return ResidualUNet3D(NetworkConfig(in_channels=2, base_channels=4, levels=2)).eval()


def test_compiled_ensemble_matches_eager_fp32():
    """--compile (torch.compile, frozen weights) changes speed, not the result (exact-mode tolerance)."""
    x = np.random.default_rng(12).random((2, 16, 16, 16), dtype=np.float32)
    model = _small_unet(5)
    eager = predict_ensemble([model], x, 2, _cpu("exact"))
    compiled = predict_ensemble([model], x, 2, InferenceSettings.create("cpu", "exact", max_batch=1, compile=True))
    assert np.abs(compiled - eager).max() <= 1e-5
    again = predict_ensemble([model], x, 2, InferenceSettings.create("cpu", "exact", max_batch=1, compile=True))
    np.testing.assert_array_equal(again, compiled)  # the compiled wrapper is reused for the same model


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    def broken_compile(model):
        def run(batch):
            raise RuntimeError("no C++ compiler found")
        return run

    from ContrastAmplifierLib import ensemble

    monkeypatch.setattr(ensemble, "_compile_failure", None)  # restored after the test
    monkeypatch.setattr(torch, "compile", broken_compile)
    x = np.random.default_rng(13).random((2, 16, 16, 16), dtype=np.float32)
    model = _small_unet(6)
    eager = predict_ensemble([model], x, 2, _cpu("exact"))
    with caplog.at_level("WARNING"):
        out = predict_ensemble([model], x, 2, InferenceSettings.create("cpu", "exact", max_batch=1, compile=True))
    np.testing.assert_allclose(out, eager, atol=1e-6)
    assert any("torch.compile failed" in r.message and "no C++ compiler" in r.message for r in caplog.records)
    # the failure is remembered: the next model is not compiled again (no second attempt, no warning)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model: calls.append(model) or broken_compile(model))
    caplog.clear()
    predict_ensemble([_small_unet(7)], x, 2, InferenceSettings.create("cpu", "exact", max_batch=1, compile=True))
    assert calls == [] and not caplog.records


def test_compile_that_fails_to_start_falls_back_too(monkeypatch, caplog):
    """torch.compile itself can raise (Inductor failed to import: seen under a C locale)."""
    from ContrastAmplifierLib import ensemble

    def cannot_start(model):
        raise UnicodeDecodeError("ascii", b"\xe2", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(ensemble, "_compile_failure", None)
    monkeypatch.setattr(torch, "compile", cannot_start)
    x = np.random.default_rng(14).random((2, 16, 16, 16), dtype=np.float32)
    model = _small_unet(8)
    eager = predict_ensemble([model], x, 2, _cpu("exact"))
    with caplog.at_level("WARNING"):
        out = predict_ensemble([model], x, 2, InferenceSettings.create("cpu", "exact", max_batch=1, compile=True))
    np.testing.assert_allclose(out, eager, atol=1e-6)
    assert any("torch.compile failed (UnicodeDecodeError" in r.message for r in caplog.records)


def test_compile_auto_means_cpu_and_a_paper_size_volume():
    from ContrastAmplifierLib.ensemble import AUTO_COMPILE_VOXELS

    auto = InferenceSettings.create("cpu", "exact")
    assert auto.compile is None
    assert auto.compiles(160 * 192 * 160) and not auto.compiles(56 * 64 * 56)  # paper crop vs demo crop
    assert not auto.compiles(AUTO_COMPILE_VOXELS - 1)
    assert not InferenceSettings.create("cpu", "exact", compile=False).compiles(160 * 192 * 160)
    assert InferenceSettings.create("cpu", "exact", compile=True).compiles(10)
