"""The inference benchmark runs its three modes in child processes and compares them honestly."""

from __future__ import annotations


from ContrastAmplifierLib.bench_inference import _input_volume, run_inference_bench


def test_input_volume_is_normalised_brain_like():
    x = _input_volume((12, 14, 10), 4)
    assert x.shape == (4, 12, 14, 10) and x.min() == 0.0 and x.max() <= 1.0
    assert (x[:, 0, 0, 0] == 0).all()  # background


def test_modes_agree_and_ratios_are_reported(tmp_path, random_bundle_dir):
    results = run_inference_bench(tmp_path, threads=1, bundle_dir=random_bundle_dir, shape_zyx=(16, 24, 16),
                                  paper_predictions=(1, 8))
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
