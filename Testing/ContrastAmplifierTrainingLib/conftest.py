"""Fixtures shared by the ContrastAmplifierTrainingLib tests: a tiny network on toy 32^3 cases, the
training CLI's command line, a finished fold's weights and checkpoints that must never be unpickled."""

from __future__ import annotations

import builtins
import io
import pickle
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierTrainingLib.trainer import TrainConfig

# Two pytest-xdist workers share two cores: one intra-op thread each.
torch.set_num_threads(1)


@pytest.fixture
def tiny_net() -> NetworkConfig:
    """The network the fit tests train: base 8 channels, 3 levels."""
    return NetworkConfig(base_channels=8, levels=3)


@pytest.fixture
def toy_shape() -> tuple[int, int, int]:
    """The toy cases' shape for the fit tests."""
    return (32, 32, 32)


@pytest.fixture
def cpu_config(tiny_net) -> Callable[..., TrainConfig]:
    """``cpu_config(epochs, seed=0)``: a CPU training configuration of :func:`tiny_net`."""

    def _config(epochs: int, seed: int = 0) -> TrainConfig:
        return TrainConfig(epochs=epochs, seed=seed, network=tiny_net, device="cpu")

    return _config


@pytest.fixture
def fold_weights() -> Callable[[Path, int], dict[str, torch.Tensor]]:
    """``fold_weights(run_dir, fold)``: the final weights a finished fold wrote."""

    def _weights(out_dir: Path, fold: int) -> dict[str, torch.Tensor]:
        return load_file(str(out_dir / f"fold_{fold}" / "final.safetensors"))

    return _weights


@pytest.fixture
def train_cli() -> Callable[..., list[str]]:
    """``train_cli(*args)``: the command line of ``contrast-amplifier-train`` in this interpreter."""

    def _cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "ContrastAmplifierTrainingLib.cli", *args]

    return _cli


# -- a checkpoint that torch.load(weights_only=True) refuses -----------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"epoch": 1, "model": _Payload(marker)})


def _malicious_torch_zip(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model": _Payload(marker)}, buffer)
    return buffer.getvalue()


MALICIOUS_CHECKPOINTS = {"pickle": _malicious_pickle, "torch-zip": _malicious_torch_zip}


@pytest.fixture
def malicious_checkpoint() -> Callable[[str, Path], bytes]:
    """``malicious_checkpoint(kind, marker)``: checkpoint bytes ("pickle" or "torch-zip") that create
    ``marker`` if they are ever unpickled."""

    def _make(kind: str, marker: Path) -> bytes:
        return MALICIOUS_CHECKPOINTS[kind](marker)

    return _make
