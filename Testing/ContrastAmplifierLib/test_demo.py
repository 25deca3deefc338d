"""The shipped phantom demo bundle end to end: what `make demo` runs, on a small phantom case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib.bundle import load_bundle
from ContrastAmplifierLib.registry import list_models


#: The shipped default (Models.json's first entry): the 1.5 mm demo trained in patch mode on phantoms made on the fly.
DEFAULT_DEMO = "phantom-demo-1.5mm"
#: The first, coarse 3 mm demo: still shipped (fast; most tests use it).
COARSE_DEMO = "phantom-demo"


def _shipped(name):
    shipped = [e for e in list_models() if e.source == "builtin" and e.name == name]
    assert shipped, f"ContrastAmplifier/Resources/Models/{name} must ship with the extension (see README: the demo models)"
    return load_bundle(shipped[0].path)  # hash-checked


@pytest.fixture(scope="module")
def demo_bundle():
    return _shipped(COARSE_DEMO)


@pytest.mark.parametrize("name", [DEFAULT_DEMO, COARSE_DEMO])
def test_shipped_demo_bundles_are_labelled_as_phantom_demos(name):
    manifest = _shipped(name).manifest
    assert manifest["intended_use"] == "synthetic phantom demo - not for clinical use"
    assert "synthetic phantoms" in manifest["training_data"]
    # the 1.5 mm run's folds 1-3 stayed at the identity after 6 CPU epochs and were left out (README)
    assert _shipped(name).folds == ([0, 4] if name == DEFAULT_DEMO else [0, 1, 2, 3, 4])


def test_the_default_model_is_the_1_5_mm_demo():
    from ContrastAmplifierLib.registry import shipped_default_name

    assert shipped_default_name() == DEFAULT_DEMO
    bundle = _shipped(DEFAULT_DEMO)
    assert bundle.spacing == (1.5, 1.5, 1.5) and bundle.manifest["network"]["base_channels"] == 8


def test_default_demo_records_its_training_and_its_evaluation_on_unseen_phantoms():
    """The 1.5 mm demo carries how it was made (command, seed streams) and its held-out evaluation
    (``evaluate --record``: 20 phantom seeds no training run used), and that evaluation meets the
    bars it ships with: lesion CNR gap recovered >= 0.5 over all lesions and >= 0.3 under 10 mm,
    PSNR against T1c-x4 above the T1c's in every case, false enhancement below the noise SD."""
    manifest = _shipped(DEFAULT_DEMO).manifest
    training = manifest["training"]
    assert training["command"].startswith("contrast-amplifier-train fit-phantoms ")
    streams = training["phantoms"]
    train_seeds = range(streams["first_seed"], streams["first_seed"] + 5 * streams["cases_per_fold"])
    (record,) = [e for e in manifest["evaluation"] if e["settings"]["flips"] == 8 and e["n_cases"] >= 20]
    first, last = record["settings"]["seeds"]
    assert not set(range(first, last + 1)) & set(train_seeds)
    assert record["command"].startswith(f"contrast-amplifier-train evaluate {DEFAULT_DEMO} --phantom-seeds ")
    bands = record["summary"]["size_bands"]
    assert bands["all"]["gap_fraction_t1c_pro"]["mean"] >= 0.5
    small = [bands[band]["gap_fraction_t1c_pro"] for band in ("<5 mm", "5-10 mm")]
    n_small = sum(b["n_defined"] for b in small)
    assert n_small >= 20  # enough small lesions for the bar to mean something
    assert sum(b["mean"] * b["n_defined"] for b in small if b["n_defined"]) / n_small >= 0.3  # lesions under 10 mm
    cases = record["summary"]["cases"]
    assert cases["psnr_wins_t1c_pro_vs_t1c"] == cases["n_cases"] == record["n_cases"]
    assert cases["false_enhancement_t1c_pro"]["max"] < 1.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_bundle):
    from ContrastAmplifierLib.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, spacing=3.0, flips=2, device="cpu")


@pytest.mark.slow
def test_demo_end_to_end_writes_t1c_pro_on_the_t1c_grid(demo_run):
    out, summary = demo_run
    case = out / "phantom" / "case_000"
    t1c = sitk.ReadImage(str(case / "t1c.nii.gz"))
    pro = sitk.ReadImage(str(out / "T1c-pro.nii.gz"))
    assert pro.GetSize() == t1c.GetSize()
    np.testing.assert_allclose(pro.GetOrigin(), t1c.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pro.GetDirection(), t1c.GetDirection(), atol=1e-6)
    assert np.isfinite(sitk.GetArrayViewFromImage(pro)).all()
    assert (out / "demo.png").stat().st_size > 10_000
    contrast = json.loads((out / "demo.json").read_text(encoding="utf-8"))["contrast"]
    assert contrast == summary["contrast"]
    # the phantom physics the demo reports: contrast rises with dose
    assert contrast["T1c-low"]["cnr"] < contrast["T1c"]["cnr"] < contrast["T1c-x4"]["cnr"]
    assert summary["predictions"] == 4  # the default 1.5 mm demo: 2 folds x 2 mirrorings


@pytest.mark.slow
def test_demo_model_amplifies_lesion_cnr(demo_run):
    """Issue 5 "done when": T1c-pro's lesion CNR beats the T1c's (and stays below the 4x-dose truth's
    order of magnitude: the model amplifies, it does not invent a different image)."""
    contrast = demo_run[1]["contrast"]
    assert contrast["T1c-pro"]["cnr"] > 1.5 * contrast["T1c"]["cnr"]
    assert contrast["T1c-pro"]["lbr"] > contrast["T1c"]["lbr"]
    assert contrast["T1c-pro"]["cnr"] < 2.0 * contrast["T1c-x4"]["cnr"]
