"""The inference benchmark runs its modes in child processes, compares them honestly and judges issue 18's targets."""

from __future__ import annotations

import pytest

from ContrastAmplifierLib.bench_inference import _input_volume, run_inference_bench, target_rows, targets_table


def test_input_volume_is_normalised_brain_like():
    x = _input_volume((12, 14, 10), 4)
    assert x.shape == (4, 12, 14, 10) and x.min() == 0.0 and x.max() <= 1.0
    assert (x[:, 0, 0, 0] == 0).all()  # background


def test_modes_agree_and_ratios_are_reported(tmp_path, random_bundle_dir):
    results = run_inference_bench(tmp_path, threads=1, bundle_dir=random_bundle_dir, shape_zyx=(16, 24, 16),
                                  paper_predictions=(1, 8), modes=("exact", "compiled", "fast"))  # torch's (OpenVINO's below)
    rows = {r["mode"]: r for r in results["paper_8_predictions"]}
    assert rows["naive"]["speedup_vs_naive"] == 1.0
    assert rows["exact"]["max_abs_diff_vs_naive"] <= 1e-5  # exact mode: same result as the baseline
    assert rows["fast"]["max_abs_diff_vs_naive"] <= 5e-3  # bf16: within the documented bound
    assert all(r["peak_rss_mb"] > 0 for r in rows.values())
    assert set(results["paper_seconds_per_case"]["exact"]) == {1, 8}
    bundle_rows = {r["mode"]: r for r in results["bundle"]["rows"]}
    assert bundle_rows["exact"]["predictions"] == 16  # 2 folds x 8 mirrorings
    assert bundle_rows["exact"]["max_abs_diff_vs_naive"] <= 1e-5
    assert not list(tmp_path.glob("bench-inference-*"))  # scratch removed


def test_openvino_modes_and_the_targets_table(tmp_path, monkeypatch):
    """OpenVINO exact/fast/int8 against naive in one run, and issue 18's targets judged from it."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    monkeypatch.setenv("CA_OPENVINO_CACHE", str(tmp_path / "ov-cache"))  # the children inherit it
    results = run_inference_bench(tmp_path, threads=1, shape_zyx=(16, 24, 16), paper_predictions=(8,),
                                  modes=("ov-exact", "ov-fast", "ov-int8"))
    rows = {r["mode"]: r for r in results["paper_8_predictions"]}
    assert list(rows) == ["naive", "ov-exact", "ov-fast", "ov-int8"]
    assert rows["ov-exact"]["max_abs_diff_vs_naive"] <= 1e-5
    assert rows["ov-fast"]["max_abs_diff_vs_naive"] <= 5e-3
    assert 1e-5 < rows["ov-int8"]["max_abs_diff_vs_naive"] < 0.1  # quantised (not f32), still the same image
    for mode in ("ov-exact", "ov-fast", "ov-int8"):
        assert rows[mode]["first_use_seconds"] > 0 and rows[mode]["first_use_peak_rss_mb"] > 0
        assert rows[mode]["speedup_vs_naive"] == pytest.approx(rows["naive"]["seconds"] / rows[mode]["seconds"])
    assert len(list((tmp_path / "ov-cache").glob("*/entry.json"))) == 2  # fold 0 in f32 (exact and fast share it) and int8

    targets = {r["target"].split(":")[0]: r for r in results["targets"]}
    assert set(targets) == {"exact", "fast", "int8", "peak RAM < 4 GB"}
    for precision in ("exact", "fast", "int8"):
        row = targets[precision]
        assert row["mode"] == f"ov-{precision}" and row["speedup"] == rows[row["mode"]]["speedup_vs_naive"]
    assert targets["exact"]["passed"] == (rows["ov-exact"]["speedup_vs_naive"] >= 2.5)  # its accuracy is met (above)
    assert not targets["int8"]["passed"] and "rule not checked" in targets["int8"]["accuracy"]  # no bundle: no verdict
    peak = max(r["peak_rss_mb"] for r in rows.values())
    assert targets["peak RAM < 4 GB"]["passed"] and f"largest {peak:.0f} MB" == targets["peak RAM < 4 GB"]["accuracy"]
    table = targets_table(results["targets"])
    assert table.count("\n") == 5 and "| int8: >= 5x naive, accuracy rule | ov-int8 |" in table and "FAIL |" in table


def test_target_rows_judge_speed_accuracy_and_the_int8_verdict():
    verdict = {"accepted": True, "cases": [{"cnr_change": -0.01}], "cnr_tolerance": 0.02, "max_abs_diff": 0.018,
               "max_diff_bound": 0.03, "folds": 5, "mirrorings": 8}
    paper = [{"mode": "naive", "speedup_vs_naive": 1.0, "max_abs_diff_vs_naive": 0.0},
             {"mode": "ov-exact", "speedup_vs_naive": 2.6, "max_abs_diff_vs_naive": 2e-7},
             {"mode": "ov-fast", "speedup_vs_naive": 3.4, "max_abs_diff_vs_naive": 2e-7},
             {"mode": "ov-int8", "speedup_vs_naive": 6.0, "max_abs_diff_vs_naive": 0.02}]
    bundle = [{"mode": "ov-exact", "max_abs_diff_vs_naive": 2e-5, "peak_rss_mb": 900.0},
              {"mode": "ov-int8", "max_abs_diff_vs_naive": 0.02, "peak_rss_mb": 950.0, "int8_verdict": verdict}]
    results = {"paper_8_predictions": paper, "bundle": {"rows": bundle}, "paper_peak_rss_mb": {"naive": 3900.0},
               "openvino_bf16": False}
    rows = {r["target"].split(":")[0]: r for r in target_rows(results)}
    assert not rows["exact"]["passed"] and "2.0e-05 (bundle)" in rows["exact"]["accuracy"]  # fast enough, not exact enough
    assert not rows["fast"]["passed"] and "no BF16 on this CPU" in rows["fast"]["accuracy"]  # 3.4x < 3.5x
    assert rows["int8"]["passed"] and "accepted (5 folds x 8 mirrorings)" in rows["int8"]["accuracy"]
    assert rows["peak RAM < 4 GB"]["passed"] and rows["peak RAM < 4 GB"]["accuracy"] == "largest 3900 MB"
    verdict["accepted"] = False
    assert not {r["target"].split(":")[0]: r for r in target_rows(results)}["int8"]["passed"]
    results["paper_peak_rss_mb"] = {"naive": 4100.0}
    assert not target_rows(results)[-1]["passed"]
