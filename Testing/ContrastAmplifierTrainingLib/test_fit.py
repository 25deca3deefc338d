"""The five-fold fit (fit.py) on toy 32^3 cases: the run plan, reruns, clip percentiles, copied-back folds."""

from __future__ import annotations

import json

import pytest

from ContrastAmplifierLib.bundle import load_bundle
from ContrastAmplifierTrainingLib.export import export_bundle
from ContrastAmplifierTrainingLib.fit import PlanMismatchError, fit_cases
from ContrastAmplifierTrainingLib.toy import toy_cohort
from ContrastAmplifierTrainingLib.trainer import TrainConfig


def test_rerun_skips_finished_folds_and_refuses_other_settings(tmp_path, toy_shape, tiny_net, cpu_config):
    cases = toy_cohort(4, toy_shape, seed=3)
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=cpu_config(1))
    before = (tmp_path / "run" / "fold_0" / "final.safetensors").stat().st_mtime_ns
    rows = []
    fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=cpu_config(1), on_epoch=rows.append)
    assert rows == [] and (tmp_path / "run" / "fold_0" / "final.safetensors").stat().st_mtime_ns == before
    with pytest.raises(PlanMismatchError, match="seed"):
        fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=cpu_config(1, seed=5))
    other_lr = TrainConfig(epochs=1, network=tiny_net, device="cpu", learning_rate=5e-4)  # close, but not the same run
    with pytest.raises(PlanMismatchError, match="learning_rate"):
        fit_cases(cases, tmp_path / "run", folds=[0], n_folds=2, config=other_lr)


def test_clip_percentiles_are_an_option_recorded_in_plan_and_bundle(tmp_path, toy_shape, cpu_config):
    """--clip-percentiles: a higher T1c clip (demo model: 1 99.99) reaches the plan and the bundle."""
    cases = toy_cohort(4, toy_shape, seed=4)
    fit_cases(cases, tmp_path / "paper", folds=[0], n_folds=2, config=cpu_config(1))
    fit_cases(cases, tmp_path / "wide", folds=[0], n_folds=2, config=cpu_config(1), percentile_levels=(1.0, 99.99))
    paper = json.loads((tmp_path / "paper" / "plan.json").read_text(encoding="utf-8"))["geometry"]
    wide = json.loads((tmp_path / "wide" / "plan.json").read_text(encoding="utf-8"))["geometry"]
    assert paper["percentile_levels"] == [1.0, 99.0] and wide["percentile_levels"] == [1.0, 99.99]
    assert wide["percentiles"]["t1c"][1] > paper["percentiles"]["t1c"][1]
    assert wide["percentiles"]["t1c"][0] == pytest.approx(paper["percentiles"]["t1c"][0])
    bundle = export_bundle(tmp_path / "wide", tmp_path / "bundle", folds=[0], name="toy", intended_use="tests only - not for clinical use")
    assert load_bundle(bundle.path).manifest["geometry"]["percentile_levels"] == [1.0, 99.99]
    with pytest.raises(ValueError, match="--clip-percentiles"):
        fit_cases(cases, tmp_path / "bad", folds=[0], n_folds=2, config=cpu_config(1), percentile_levels=(99.0, 1.0))


def test_fold_copied_back_without_checkpoint_and_plan_within_tolerance_resume(tmp_path, toy_shape, cpu_config):
    """A run trained elsewhere and copied back without checkpoint.pt (as from the GPU node) is
    finished; plan percentiles off by < 0.01 z (a float16 copy of the cache) still match."""
    cases = toy_cohort(4, toy_shape, seed=5)
    run = tmp_path / "run"
    fit_cases(cases, run, folds=[0], n_folds=2, config=cpu_config(2))
    (run / "fold_0" / "checkpoint.pt").unlink()
    stamp = (run / "fold_0" / "final.safetensors").stat().st_mtime_ns
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    plan["geometry"]["percentiles"]["t1c"][1] += 0.005
    (run / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    rows = []
    (result,) = fit_cases(cases, run, folds=[0], n_folds=2, config=cpu_config(2), on_epoch=rows.append)
    assert rows == [] and result.epochs == 2
    assert (run / "fold_0" / "final.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        fit_cases(cases, run, folds=[0], n_folds=2, config=cpu_config(3))
    plan["geometry"]["percentiles"]["t1c"][1] += 0.5
    (run / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    with pytest.raises(PlanMismatchError, match="geometry"):
        fit_cases(cases, run, folds=[0], n_folds=2, config=cpu_config(2))
