"""The cohort bench's sizing arithmetic (the bench itself runs in `make bench`, not here)."""

from __future__ import annotations

import pytest

from ContrastAmplifierLib.bench_cohort import ensemble_pace, sizing_table, workers_per_gpu


def test_sizing_follows_the_slowest_stage():
    # 30 s of CPU work, an ensemble task of 1.5 s of which 1.5 s on the GPU: 20 CPU workers keep it busy.
    assert workers_per_gpu(30.0, 1.5) == 20
    assert workers_per_gpu(3.0, 1.5) == 2 and workers_per_gpu(1.0, 1.5) == 1
    rows = {r["cpu_workers"]: r for r in sizing_table(30.0, 1.5, 1.5, cases=1000, cpu_workers=(1, 8, 20, 40))}
    assert rows[1]["hours"] == pytest.approx((1000 * 30.0 + 31.5) / 3600)  # 8.34 h, CPU-bound
    assert rows[8]["hours"] == pytest.approx((1000 * 3.75 + 31.5) / 3600) and rows[8]["bound"] == "CPU"
    assert rows[8]["gpu_busy"] == pytest.approx(0.4)
    assert rows[20]["gpu_busy"] == pytest.approx(1.0) and rows[20]["hours"] == pytest.approx((1500 + 31.5) / 3600)
    assert rows[40]["bound"] == "GPU" and rows[40]["hours"] == rows[20]["hours"]  # more CPUs no longer help


def test_ensemble_slots_overlap_the_cpu_side_of_the_ensemble_tasks():
    # A 5 s ensemble task with 0.5 s on the GPU: one slot lets a case out every 5 s (GPU 10% busy),
    # 4 slots every 1.25 s, 10 or more every 0.5 s (the GPU itself).
    assert [ensemble_pace(5.0, 0.5, k) for k in (1, 4, 10, 16)] == [5.0, 1.25, 0.5, 0.5]
    one, four = (sizing_table(50.0, 5.0, 0.5, slots=k, cpu_workers=(100,))[0] for k in (1, 4))
    assert one["bound"] == "ensemble slots" and one["gpu_busy"] == pytest.approx(0.1)
    assert four["bound"] == "ensemble slots" and four["gpu_busy"] == pytest.approx(0.4)
    assert sizing_table(50.0, 5.0, 0.5, slots=4, cpu_workers=(10,))[0]["bound"] == "CPU"  # 5 s per case > 1.25 s
    with pytest.raises(ValueError, match="positive"):
        sizing_table(0.0)
    with pytest.raises(ValueError, match="slots >= 1"):
        sizing_table(10.0, slots=0)
