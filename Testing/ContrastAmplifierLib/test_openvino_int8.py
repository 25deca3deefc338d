"""int8 precision (``--precision int8``): NNCF quantisation of the shipped demo bundle, its accuracy rule, its caches.

The module shares one cache folder, the real calibration set (2 phantoms) and one acceptance
phantom instead of 3 (the rule and the caches work the same way, in a minute instead of three);
the first test quantises the 5 folds and measures the verdict at the paper setting (5 folds x 8
mirrorings, the default of ``predict``), the later ones reuse both.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")
torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

from typer.testing import CliRunner  # noqa: E402

from ContrastAmplifierLib import openvino_backend as ovb  # noqa: E402
from ContrastAmplifierLib import openvino_int8 as oi  # noqa: E402
from ContrastAmplifierLib.bundle import load_bundle  # noqa: E402
from ContrastAmplifierLib.cli import app  # noqa: E402
from ContrastAmplifierLib.ensemble import InferenceSettings, _int8_backend, predict_ensemble  # noqa: E402
from ContrastAmplifierLib.metrics import healthy_brain_roi, roi_contrast  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "ContrastAmplifier" / "Resources" / "Models" / "phantom-demo"
FLIPS = 8


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory):
    """A fresh cache folder for the module, and one acceptance case."""
    patch = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("int8-cache")
    patch.setenv(ovb.CACHE_ENV, str(cache))
    patch.setattr(oi, "ACCEPTANCE_CASES", 1)
    yield cache
    patch.undo()


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO)


def _int8(bundle, models, **rule):
    return oi.int8_settings(InferenceSettings.create("cpu", "int8", backend="openvino"), bundle, models, FLIPS, **rule)


def _verdict(bundle, models, settings, **rule) -> dict:
    values = {"cases": 1, "seed": oi.ACCEPTANCE_SEED, "cnr_tolerance": oi.CNR_TOLERANCE, "max_diff_bound": oi.MAX_DIFF_BOUND, **rule}
    key, details = oi.verdict_key(bundle, models, FLIPS, settings.calibration, **values)
    stored = json.loads(oi.verdict_path(key).read_text(encoding="utf-8"))
    assert stored["key"] == details
    return stored["verdict"]


def _acceptance_case(bundle):
    case_dir = oi.phantom_case(oi.ACCEPTANCE_SEED, 3.0)
    return case_dir, oi.preprocessed_case(case_dir, bundle)


def test_demo_ensemble_in_int8_is_accepted_within_the_bound_and_matches_torch_fp32(int8_cache, demo, capsys):
    models = demo.load_models()
    before = oi.quantisations
    settings = _int8(demo, models)  # calibrates (phantoms 740000-1), quantises the 5 folds, checks on phantom 750000
    assert oi.quantisations == before + 5
    assert capsys.readouterr().out == ""  # NNCF's progress bars and logs stay off stdout (--progress json)
    verdict = _verdict(demo, models, settings)
    (case,) = verdict["cases"]
    assert verdict["accepted"] and case["seed"] == oi.ACCEPTANCE_SEED  # 750000 has lesions
    assert abs(case["cnr_change"]) <= oi.CNR_TOLERANCE and case["cnr_fp32"] > 1.0
    assert 1e-4 < case["max_abs_diff"] <= oi.MAX_DIFF_BOUND  # int8 really differs, within the bound
    assert case["mean_abs_diff"] < 3e-3

    # the same numbers again, here, and int8 against PyTorch's fp32 (the reference of every backend)
    case_dir, pre = _acceptance_case(demo)
    x, inside = oi.case_inputs(pre, demo), pre.mask_array
    int8 = predict_ensemble(models, x, FLIPS, settings)
    exact = predict_ensemble(models, x, FLIPS, replace(settings, precision="exact", calibration=None))
    reference = predict_ensemble(models, x, FLIPS, InferenceSettings.create("cpu", "exact", backend="torch"))
    assert float(np.abs(exact - reference)[inside].max()) <= 1e-5
    assert float(np.abs(int8 - exact)[inside].max()) == pytest.approx(case["max_abs_diff"], abs=1e-6)
    assert float(np.abs(int8 - reference)[inside].max()) <= oi.MAX_DIFF_BOUND

    # the quantised graph: int8 everywhere but the f32 tail (head, input-skip logit, sigmoid)
    quantised = oi.int8_model(models[0], (1, *x.shape), settings.calibration)
    fake = [op.get_friendly_name() for op in quantised.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    tail = oi.f32_tail(ovb.load_or_convert(models[0], (1, *x.shape)))
    assert len(fake) >= 20 and "/head/Conv/WithoutBiases" in tail
    assert not [name for name in fake if any(name.startswith(f"{op}/") for op in tail)]

    # a second run reads both caches: no NNCF run, no conversion, no new check
    def never(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oi, "evaluate_int8", never)
        patch.setattr(ovb, "convert", never)
        again = _int8(demo, demo.load_models())
    assert oi.quantisations == before + 5
    np.testing.assert_array_equal(predict_ensemble(models, x, FLIPS, again), int8)
    # settings sent to another process carry the calibration set's recipe, not its volumes
    shipped = pickle.loads(pickle.dumps(settings))
    assert shipped.calibration.identity == settings.calibration.identity and not shipped.calibration._made
    assert len(pickle.dumps(settings)) < 100_000


def test_refusals_name_the_numbers(int8_cache, demo):
    models = demo.load_models()
    settings = _int8(demo, models)  # accepted (cached by the first test when it ran before)
    measured = _verdict(demo, models, settings)["cases"][0]
    with pytest.raises(oi.Int8Refused) as refused:
        _int8(demo, models, max_diff_bound=1e-6)
    message = str(refused.value)
    assert message.startswith("int8 refused for model 'phantom-demo': 5 folds x 8 mirrorings on 1 held-out phantom case:")
    assert f"largest voxel difference in the brain {measured['max_abs_diff']:.4f} (limit 1e-06" in message
    assert f"seed {oi.ACCEPTANCE_SEED}: {measured['cnr_fp32']:.3f} -> {measured['cnr_int8']:.3f}" in message
    assert "Use --precision exact (fp32) instead, or more predictions" in message and "\n" not in message
    with pytest.raises(oi.Int8Refused, match=r"changed by [+-]\d\.\d\d % .*limit \+-1e-07 % in every case"):
        _int8(demo, models, cnr_tolerance=1e-9)  # the CNR rule alone (the voxel bound is met)


def test_verdict_rule_is_every_case_within_2_percent_and_the_bound():
    def judge(*cases):
        rows = [{"seed": 1, "cnr_fp32": 2.0, "cnr_int8": 2.0, "cnr_change": c, "max_abs_diff": d, "mean_abs_diff": 0.0}
                for c, d in cases]
        return oi.Verdict.judge(rows, 0.02, 0.03, 5, 8).accepted

    assert judge((0.019, 0.02), (-0.019, 0.03))
    assert not judge((0.019, 0.02), (-0.021, 0.01))  # one case out is enough (not the mean)
    assert not judge((0.0, 0.031))
    assert not judge((float("inf"), 0.0))  # a zero fp32 CNR cannot be judged


def test_changed_weights_recalibrate_and_a_stale_verdict_is_never_used(int8_cache, demo):
    original = demo.load_models()
    settings = _int8(demo, original)
    key, _ = oi.verdict_key(demo, original, FLIPS, settings.calibration, 1, oi.ACCEPTANCE_SEED, oi.CNR_TOLERANCE,
                            oi.MAX_DIFF_BOUND)
    changed = demo.load_models()
    with torch.no_grad():
        changed[0].head.bias.add_(0.01)  # another SHA-256: another int8 model of fold 0 and another verdict
    before = oi.quantisations
    _int8(demo, changed)
    assert oi.quantisations == before + 1  # the other 4 folds' int8 models are reused
    changed_key, _ = oi.verdict_key(demo, changed, FLIPS, settings.calibration, 1, oi.ACCEPTANCE_SEED,
                                    oi.CNR_TOLERANCE, oi.MAX_DIFF_BOUND)
    assert changed_key != key and oi.verdict_path(changed_key).is_file()

    # the changed model's verdict copied over the original's (a stale entry): never read as the original's
    stale = json.loads(oi.verdict_path(changed_key).read_text(encoding="utf-8"))
    stale["verdict"]["accepted"] = False
    oi.verdict_path(key).write_text(json.dumps(stale), encoding="utf-8")
    _, details = oi.verdict_key(demo, original, FLIPS, settings.calibration, 1, oi.ACCEPTANCE_SEED, oi.CNR_TOLERANCE,
                                oi.MAX_DIFF_BOUND)
    assert oi._read_verdict(oi.verdict_path(key), details) is None  # so accept_int8 measures it again
    oi.verdict_path(key).write_text("{", encoding="utf-8")  # a truncated one too
    assert oi._read_verdict(oi.verdict_path(key), details) is None
    assert oi._read_verdict(oi.verdict_path(changed_key), details) is None  # the key is checked, not only the name


def test_calibration_inputs_fit_any_tile_shape():
    volume = np.arange(2 * 4 * 6 * 5, dtype=np.float32).reshape(2, 4, 6, 5)
    fitted = oi._fit(volume, (2, 2, 8, 5))
    assert fitted.shape == (2, 2, 8, 5)
    np.testing.assert_array_equal(fitted[:, :, 1:7], volume[:, 1:3])  # cropped in z, zero-padded in y
    assert not fitted[:, :, [0, 7]].any()
    mirrored = oi.CalibrationSet({"kind": "test"}, lambda: [volume]).samples((1, 2, 4, 6, 5))
    samples = list(mirrored)
    assert len(mirrored) == len(samples) == 8 and all(s.shape == (1, 2, 4, 6, 5) for s in samples)
    assert len(list(mirrored)) == 8  # NNCF may iterate again
    np.testing.assert_array_equal(samples[1], volume[None, ..., ::-1])  # the ensemble's 2nd mirroring: left-right


def test_int8_needs_openvino_on_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match="--precision int8 is OpenVINO's .* drop --backend torch"):
        InferenceSettings.create("cpu", "int8", backend="torch")
    with pytest.raises(ValueError, match="drop --compile"):
        InferenceSettings.create("cpu", "int8", backend="auto", compile=True)
    with pytest.raises(ValueError, match="runs on OpenVINO's CPU backend only, not on cuda: use --device cpu"):
        _int8_backend("auto", torch.device("cuda"), None)
    assert InferenceSettings.create("cpu", "int8", backend="auto").backend == "openvino"
    with pytest.raises(ValueError, match="needs a calibration set"):
        predict_ensemble([torch.nn.Identity()], np.zeros((1, 4, 4, 4), np.float32), 1,
                         InferenceSettings.create("cpu", "int8", backend="openvino"))
    monkeypatch.setitem(__import__("sys").modules, "nncf", None)
    with pytest.raises(ValueError) as missing:
        InferenceSettings.create("cpu", "int8", backend="auto")
    assert 'pip install "slicer-contrast-amplifier[openvino]"' in str(missing.value) and "--precision exact" in str(missing.value)


def test_cli_refuses_int8_with_torch_before_any_work(tmp_path, small_case_dir):
    out = tmp_path / "pro.nii.gz"
    args = ["predict", *[a for m in ("t1", "flair", "adc", "t1c") for a in (f"--{m}", str(small_case_dir / f"{m}.nii.gz"))],
            "--out", str(out), "--device", "cpu", "--precision", "int8"]
    result = CliRunner().invoke(app, [*args, "--backend", "torch"])
    assert result.exit_code == 2 and "drop --backend torch" in result.output and "Traceback" not in result.output
    assert not out.exists()
    for command in ("predict", "predict-cohort"):
        assert "int8" in CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output


@pytest.mark.slow
def test_amplify_case_int8_writes_what_the_check_measured(int8_cache, demo, tmp_path):
    """End to end: T1c-pro of ``--precision int8`` has the lesion CNR the verdict recorded (metrics recomputed here)."""
    from ContrastAmplifierLib.inference import amplify_case

    settings = _int8(demo, demo.load_models())
    measured = _verdict(demo, demo.load_models(), settings)["cases"][0]
    case_dir, _ = _acceptance_case(demo)
    result = amplify_case(*(case_dir / f"{m}.nii.gz" for m in ("t1", "flair", "adc", "t1c")), bundle=demo,
                          out_path=tmp_path / "pro.nii.gz", n_mirrorings=FLIPS, device="cpu", precision="int8",
                          backend="openvino", brain_mask=case_dir / "brain_mask.nii.gz", threads=1)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output_path)))
    lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "lesion_labels.nii.gz"))) > 0
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "brain_mask.nii.gz"))) > 0
    cnr = roi_contrast(image, lesions, healthy_brain_roi(brain, lesions, margin_voxels=1)).cnr  # 3 mm: 1 voxel
    assert cnr == pytest.approx(measured["cnr_int8"], rel=1e-3)


def test_predict_cohort_checks_int8_once_before_any_case(int8_cache, demo, tmp_path):
    """A cohort's int8 is checked up front (cohort.py); one fold x 1 mirroring is refused (worst voxel ~0.06 > 0.03)."""
    from ContrastAmplifierLib.cohort import predict_cohort

    case_dir, _ = _acceptance_case(demo)
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "case_a").symlink_to(case_dir, target_is_directory=True)
    with pytest.raises(oi.Int8Refused, match=r"1 fold x 1 mirroring on 1 held-out phantom case: .* Use --precision exact"):
        predict_cohort(cases, tmp_path / "out", bundle=demo, folds=[0], n_mirrorings=1, device="cpu", precision="int8",
                       backend="openvino")
    assert not (tmp_path / "out" / "case_a").exists()
