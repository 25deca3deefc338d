"""The training-throughput bench (bench.py), on a tiny input."""

from __future__ import annotations

from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierTrainingLib.bench import training_iteration_seconds


def test_training_iteration_bench_runs():
    result = training_iteration_seconds((16, 16, 16), NetworkConfig(base_channels=4, levels=2), iterations=1)
    assert result["seconds_per_iteration"] > 0 and result["parameters"] > 0
