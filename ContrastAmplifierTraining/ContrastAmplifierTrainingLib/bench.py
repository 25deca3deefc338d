"""Training throughput: seconds per training iteration (one case: forward, MSE, backward, Adam step).

For ``make bench``: the demo size and the paper's 160 x 192 x 160 crop, on CPU and on
CUDA when one is visible. An epoch costs about ``seconds_per_iteration x training cases``
(plus one forward pass per validation case).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from ContrastAmplifierLib.network import NetworkConfig, ResidualUNet3D, count_parameters


def training_iteration_seconds(
    shape_zyx: Sequence[int],
    network: NetworkConfig = NetworkConfig(),
    iterations: int = 2,
    warmup: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    threads: Optional[int] = None,
) -> dict[str, float]:
    """Median seconds of ``iterations`` training steps at ``shape_zyx`` (after ``warmup`` steps).

    Args:
        shape_zyx: crop size in array order (z, y, x).
        network: network hyper-parameters.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``bf16`` (autocast).
        threads: CPU threads (default: torch's current setting).
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = ResidualUNet3D(network).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand((1, network.in_channels) + tuple(shape_zyx), device=dev)
    y = torch.rand((1, 1) + tuple(shape_zyx), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    times = []
    peak = 0.0
    for i in range(warmup + iterations):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            prediction = model(x)
        F.mse_loss(prediction.float(), y).backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return {
        "seconds_per_iteration": times[len(times) // 2],
        "parameters": float(count_parameters(model)),
        "threads": float(torch.get_num_threads()),
        **({"cuda_peak_gib": peak} if dev.type == "cuda" else {}),
    }


def run_training_bench(devices: Sequence[str] = ("cpu",)) -> dict[str, dict[str, float]]:
    """Demo size (3 mm, 56 x 64 x 56, base 8: the shipped demo bundle) and paper size (1 mm, 160 x 192 x 160, base 16)."""
    results: dict[str, dict[str, float]] = {}
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        precisions = ("fp32", "bf16") if device == "cuda" else ("fp32",)
        for precision in precisions:
            results[f"{device}/{precision}/demo_3mm_56x64x56_base8"] = training_iteration_seconds(
                (56, 64, 56), NetworkConfig(base_channels=8, levels=4, input_skip=True), device=device, precision=precision)
            results[f"{device}/{precision}/paper_1mm_160x192x160_base16"] = training_iteration_seconds(
                (160, 192, 160), NetworkConfig(), iterations=1, device=device, precision=precision)
    return results
