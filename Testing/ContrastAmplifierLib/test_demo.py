"""The shipped phantom demo bundle end to end: what `make demo` runs, on a small phantom case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib.bundle import load_bundle
from ContrastAmplifierLib.registry import list_models


@pytest.fixture(scope="module")
def demo_bundle():
    shipped = [e for e in list_models() if e.source == "builtin" and e.name == "phantom-demo"]
    assert shipped, "Resources/Models/phantom-demo must ship with the extension (see README: the demo model)"
    return load_bundle(shipped[0].path)  # hash-checked


def test_demo_bundle_is_labelled_as_a_phantom_demo(demo_bundle):
    manifest = demo_bundle.manifest
    assert "not for clinical use" in manifest["intended_use"]
    assert "synthetic phantoms" in manifest["training_data"]
    assert demo_bundle.folds == [0, 1, 2, 3, 4]
    evaluation = manifest["training"]["held_out_evaluation"]["metrics"]
    assert {"ensemble", "identity"} <= set(evaluation)


@pytest.mark.slow
def test_demo_end_to_end_amplifies_lesion_contrast(tmp_path, demo_bundle):
    from ContrastAmplifierLib.demo import run_demo

    summary = run_demo(tmp_path, spacing=3.0, flips=2, device="cpu")
    case = tmp_path / "phantom" / "case_000"
    t1c = sitk.ReadImage(str(case / "t1c.nii.gz"))
    pro = sitk.ReadImage(str(tmp_path / "T1c-pro.nii.gz"))
    assert pro.GetSize() == t1c.GetSize()
    np.testing.assert_allclose(pro.GetOrigin(), t1c.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pro.GetDirection(), t1c.GetDirection(), atol=1e-6)
    assert np.isfinite(sitk.GetArrayViewFromImage(pro)).all()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    contrast = json.loads((tmp_path / "demo.json").read_text())["contrast"]
    assert contrast == summary["contrast"]
    assert contrast["T1c-pro"]["cnr"] > contrast["T1c"]["cnr"]
    assert summary["predictions"] == 10  # 5 folds x 2 mirrorings
