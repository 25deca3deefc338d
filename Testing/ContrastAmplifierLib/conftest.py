"""Fixtures shared by the ContrastAmplifierLib tests: a small phantom case and a tiny random bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

MODALITIES = ["t1", "flair", "adc", "t1c"]


@pytest.fixture(scope="session")
def small_case_dir(tmp_path_factory) -> Path:
    """One 3 mm phantom case (seed 31: a test seed, not used for training the demo model)."""
    from ContrastAmplifierLib.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("phantom"), cases=1, seed=31, spacing=3.0)[0]


@pytest.fixture(scope="session")
def random_bundle_dir(tmp_path_factory) -> Path:
    """A two-fold bundle of a 2-level, 2-channel UNet with random weights, 4 mm geometry."""
    from ContrastAmplifierLib.bundle import write_bundle
    from ContrastAmplifierLib.network import NetworkConfig, build_network

    config = NetworkConfig(base_channels=2, levels=2)
    torch.manual_seed(0)
    states = {k: build_network(config).state_dict() for k in (0, 1)}
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(out, states, name="random-tiny", version="0", description="random weights", intended_use="tests only",
                 training_data="none", modalities=MODALITIES, spacing=(4.0, 4.0, 4.0), crop_size=(40, 48, 40),
                 percentiles={m: (-2.0, 3.0) for m in MODALITIES}, network=config)
    return out
