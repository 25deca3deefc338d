"""Held-out evaluation of a bundle against baselines (evaluate.py), on tiny inputs."""

from __future__ import annotations

import math

from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierTrainingLib.evaluate import evaluate_bundle
from ContrastAmplifierTrainingLib.export import export_bundle
from ContrastAmplifierTrainingLib.fit import fit_cases
from ContrastAmplifierTrainingLib.toy import toy_cohort
from ContrastAmplifierTrainingLib.trainer import TrainConfig


def test_evaluate_bundle_reports_model_and_baselines(tmp_path):
    config = TrainConfig(epochs=1, network=NetworkConfig(base_channels=4, levels=2), device="cpu")
    fit_cases(toy_cohort(4, (16, 16, 16), seed=11), tmp_path / "run", n_folds=2, config=config)
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle")
    metrics = evaluate_bundle(bundle, toy_cohort(2, (16, 16, 16), seed=12), n_mirrorings=2)
    assert set(metrics) == {"model", "identity", "linear_dose", "linear_fit"}
    for values in metrics.values():
        assert values["nrmse"] > 0 and math.isfinite(values["psnr"])
    # The least-squares linear fit can only improve on the identity it contains.
    assert metrics["linear_fit"]["nrmse"] <= metrics["identity"]["nrmse"] + 1e-9
