"""Test-time ensemble: fold models x mirrorings, averaged in a running sum.

Paper, "Training and evaluating the model": "Exhaustive 8-way mirroring was used at test-time for
all five models. For each test case, the forty resulting predictions were averaged". Here the
number of folds and of mirrorings (1, 2, 4 or 8) is a quality/speed choice; the average is
accumulated in place, so memory does not grow with the number of predictions.

Tensors are ``(N, C, Z, Y, X)`` (SimpleITK array order), so spatial dims are 2, 3, 4 and the last
one is the patient's left-right axis.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel, null_progress

logger = logging.getLogger(__name__)

#: Mirrorings in order of usefulness: identity, left-right (the brain's symmetry axis) first, so
#: that 2 or 4 mirrorings are the most informative subsets. All 8 = every subset of the 3 axes.
MIRRORINGS: tuple[tuple[int, ...], ...] = ((), (4,), (3,), (2,), (3, 4), (2, 4), (2, 3), (2, 3, 4))

#: Precision modes. "exact": fp32 (channels-last; TF32 off on CUDA; same result to ~1e-7); "fast": bf16
#: autocast (max error ~3e-3 on the [0, 1] output, see README); "int8": OpenVINO only, each fold
#: quantised by NNCF (:mod:`.openvino_int8`: calibrated on phantoms, used only once accepted by its
#: accuracy rule); "auto": fast on CUDA, exact on CPU.
PRECISIONS = ("auto", "exact", "fast", "int8")

#: Inference backends. "torch": PyTorch (eager or ``torch.compile``), any device; "openvino": OpenVINO's
#: CPU runtime (:mod:`.openvino_backend`: each fold converted once per input shape, cached on disk);
#: "auto": OpenVINO on CPU when the ``openvino`` package imports (and ``compile`` is not asked for),
#: torch otherwise and always on CUDA/MPS.
BACKENDS = ("auto", "torch", "openvino")

#: ``compile=None`` compiles on CPU from this many voxels: at 160 x 192 x 160 (4.9 M) compiling
#: (7 s + 2 s per further fold) is repaid within the first predictions (2.8 s instead of 3.8 s
#: each); at the demo's 56 x 64 x 56 (0.2 M) it never is. On CUDA the measured gain was nil.
AUTO_COMPILE_VOXELS = 2_000_000


def mirrorings(count: int) -> tuple[tuple[int, ...], ...]:
    """The first ``count`` mirrorings of :data:`MIRRORINGS` (``count`` in 1, 2, 4, 8)."""
    if count not in (1, 2, 4, 8):
        raise ValueError(f"number of mirrorings must be 1, 2, 4 or 8 (got {count})")
    return MIRRORINGS[:count]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an unavailable explicit choice is an error."""
    device = device.lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was requested but Apple MPS is not available; use --device cpu or auto.")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(device)


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the ensemble.

    Attributes:
        device: resolved torch device.
        precision: "exact" (fp32), "fast" (bf16 autocast; OpenVINO: bf16 where the CPU has it) or "int8"
            (OpenVINO only; :mod:`.openvino_int8`).
        channels_last: use ``torch.channels_last_3d`` (2x faster fp32 convolutions on CPU here).
        max_batch: mirrorings per forward pass (halved automatically on out-of-memory).
        compile: run each fold model through ``torch.compile`` with Inductor weight freezing
            (fuses LeakyReLU/additions into the convolutions; same result to ~1e-7). It costs a
            few seconds per fold model (about 7 s for the first, 2 s for each further one at
            160 x 192 x 160 here) and makes each prediction about 1.3x faster on CPU, so it pays
            off for 1 mm cases and cohorts, not for the 3 mm demo. ``None`` (auto): on for CPU
            inputs of at least :data:`AUTO_COMPILE_VOXELS` voxels. Falls back to eager mode, with
            a warning, where compiling fails (e.g. no C++ compiler).
        window: ``(z, y, x)`` tile size for sliding-window inference (:mod:`.sliding_window`:
            tiles overlapping by half, Gaussian-weighted blend), e.g. a patch-trained model's
            patch size; ``None`` (default) or a window covering the volume: one whole-volume pass.
        backend: "torch" or "openvino" (CPU only; ``compile``, ``channels_last`` and autocast are
            torch's and do not apply to it; its "fast" is OpenVINO's bf16 where the CPU has it).
        calibration: precision "int8" only: the :class:`~.openvino_int8.CalibrationSet` the folds are
            quantised with (:func:`.openvino_int8.int8_settings` sets it after the accuracy check).
    """

    device: torch.device
    precision: str = "exact"
    channels_last: bool = True
    max_batch: int = 1
    compile: Optional[bool] = None
    window: Optional[tuple[int, int, int]] = None
    backend: str = "torch"
    calibration: Optional[Any] = field(default=None, compare=False, repr=False)

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", max_batch: Optional[int] = None,
               compile: Optional[bool] = None, window: Optional[tuple[int, int, int]] = None,
               backend: str = "torch") -> InferenceSettings:
        """Settings with ``auto`` choices resolved; ``backend`` "torch" (default here), "openvino" or
        "auto" (see :data:`BACKENDS`; ``amplify_case`` and the CLI default to "auto")."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
        dev = resolve_device(device)
        if precision == "int8":
            backend = _int8_backend(backend, dev, compile)
        backend = resolve_backend(backend, dev, compile)
        if precision == "auto":
            precision = "fast" if dev.type == "cuda" else "exact"
        if max_batch is None:
            # Batching mirrorings does not speed up CPU inference (measured); on GPU it does.
            max_batch = 8 if dev.type == "cuda" else 1
        return cls(device=dev, precision=precision, channels_last=dev.type != "mps", max_batch=max(1, int(max_batch)),
                   compile=None if compile is None else bool(compile), window=window, backend=backend)

    def compiles(self, voxels: int) -> bool:
        """Whether models are compiled for an input of ``voxels`` voxels (resolves ``compile=None``)."""
        if self.backend != "torch":
            return False
        if self.compile is not None:
            return self.compile
        return self.device.type == "cpu" and voxels >= AUTO_COMPILE_VOXELS

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "fast" or self.backend != "torch":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, compile: Optional[bool] = None) -> str:
    """The backend ("torch" or "openvino") that ``backend`` means on ``device`` (see :data:`BACKENDS`).

    Raises:
        ValueError: an unknown backend; "openvino" on a GPU, with ``compile=True``, or without the
            ``openvino`` package (one line naming the fix).
    """
    backend = str(backend).lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "torch":
        return backend
    if device.type != "cpu":
        if backend == "openvino":
            raise ValueError(f"--backend openvino runs on the CPU only, not on {device.type}: use --device cpu, "
                             "or --backend torch (or auto) for the GPU.")
        return "torch"
    if compile:
        if backend == "openvino":
            raise ValueError("--compile is torch.compile, which --backend openvino does not use: drop --compile, "
                             "or use --backend torch.")
        return "torch"
    from . import openvino_backend

    if backend == "openvino":
        openvino_backend.require_openvino()
        return backend
    return "openvino" if openvino_backend.available() else "torch"


def _int8_backend(backend: str, device: torch.device, compile: Optional[bool]) -> str:
    """The backend of precision "int8": OpenVINO (with NNCF) on the CPU, or a one-line error naming the fix."""
    if device.type != "cpu":
        raise ValueError(f"--precision int8 runs on OpenVINO's CPU backend only, not on {device.type}: use --device cpu, "
                         "or --precision fast on the GPU.")
    if compile:
        raise ValueError("--precision int8 runs on OpenVINO, which does not use torch.compile: drop --compile, or use "
                         "--precision exact or fast.")
    if str(backend).lower() == "torch":
        raise ValueError("--precision int8 is OpenVINO's (NNCF quantisation); PyTorch has no int8 path here: drop "
                         "--backend torch (--backend auto or openvino runs int8), or use --precision exact or fast.")
    from .openvino_int8 import require_nncf

    require_nncf()
    return "openvino" if str(backend).lower() in ("auto", "openvino") else backend


def configure_cpu_threads(threads: Optional[int] = None) -> int:
    """Use every core for intra-op parallelism (the CPU path is first-class); returns the count."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


#: Set by the first compilation that fails in this process (no C++ compiler, no Python headers
#: in an embedded Python...): later models then run eagerly at once instead of failing again.
_compile_failure: Optional[str] = None


class _CompiledModel:
    """``torch.compile`` (Inductor, weights frozen) of one fold model, with an eager fallback."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.compiled: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        try:  # importing Inductor can fail too (an embedded Python without its files, a C locale...)
            self.compiled = torch.compile(model)
        except Exception as error:
            self._give_up(error)

    @staticmethod
    def _give_up(error: BaseException) -> None:
        global _compile_failure
        _compile_failure = f"{type(error).__name__}: {error}"
        logger.warning("torch.compile failed (%s); running the models eagerly", _compile_failure)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            import torch._inductor.config as inductor_config

            try:
                with inductor_config.patch(freezing=True):
                    return self.compiled(batch)
            except Exception as error:  # a missing compiler, an unsupported platform...
                if _is_out_of_memory(error):
                    raise
                self._give_up(error)
                self.compiled = None
        return self.model(batch)


def _compiled(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's compiled wrapper, made once per model object (later cases reuse it); the model
    itself once a compilation has failed in this process."""
    if _compile_failure is not None:
        return model
    wrapper = model.__dict__.get("_contrast_amplifier_compiled")
    if wrapper is None:
        wrapper = _CompiledModel(model)
        model.__dict__["_contrast_amplifier_compiled"] = wrapper
    return wrapper


def _forward_mirrored(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flips: Sequence[tuple[int, ...]],
                      settings: InferenceSettings) -> torch.Tensor:
    """Sum over ``flips`` of flip^-1(model(flip(x))) as float32, one forward pass for the batch.

    ``model`` is a torch module (or its compiled wrapper) or an OpenVINO :class:`~.openvino_backend.CompiledFold`:
    both backends share the mirroring and the sum.
    """
    batch = torch.cat([torch.flip(x, dims) if dims else x for dims in flips], dim=0)
    if settings.channels_last and settings.backend == "torch":
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
    with settings.autocast():
        out = model(batch).float()
    total = torch.zeros_like(out[:1])
    for i, dims in enumerate(flips):
        total += torch.flip(out[i : i + 1], dims) if dims else out[i : i + 1]
    return total


@contextlib.contextmanager
def _strict_fp32(settings: InferenceSettings) -> Iterator[None]:
    """In "exact" mode on CUDA, turn TF32 off (cuDNN and matmul) so fp32 means fp32 (restored after)."""
    if settings.device.type != "cuda" or settings.precision != "exact":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def predict_ensemble(
    models: Sequence[torch.nn.Module],
    inputs: np.ndarray,
    n_mirrorings: int = 8,
    settings: Optional[InferenceSettings] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> np.ndarray:
    """Average of ``len(models) x n_mirrorings`` predictions on one case.

    Args:
        models: one network per fold (already loaded; moved to the device here).
        inputs: float32 array ``(C, Z, Y, X)`` of normalised modalities in the bundle's order.
        n_mirrorings: 1, 2, 4 or 8 (paper: 8).
        settings: device/precision/batching/sliding window; default :meth:`InferenceSettings.create`.
        progress: ``(stage, fraction, message)`` callback, fraction over all predictions.
        cancel: checked before every forward pass.

    Returns:
        float32 array ``(Z, Y, X)``: the mean prediction.
    """
    if inputs.ndim != 4:
        raise ValueError(f"ensemble input must be (C, Z, Y, X); got shape {inputs.shape}")
    if not models:
        raise ValueError("the ensemble needs at least one fold model")
    settings = settings or InferenceSettings.create()
    progress = progress or null_progress
    flips = mirrorings(n_mirrorings)
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None].to(settings.device)
    # Activations near zero become denormal floats on CPU and slow convolutions down many times
    # (measured 20x on HD-BET here); flushing them changes results by < 1e-38.
    flushing = settings.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        with _strict_fp32(settings):
            window = settings.window
            if window is None or all(int(w) >= s for w, s in zip(window, x.shape[2:])):
                return _run(models, x, flips, settings, progress, cancel)
            from .sliding_window import sliding_window_predict

            tiles = sliding_window_predict(lambda tile, sub: torch.from_numpy(_run(models, tile, flips, settings, sub, cancel)),
                                           x, window, progress=progress)
            return tiles.numpy()
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def _prepare(model, x: torch.Tensor, settings: InferenceSettings) -> Callable[[torch.Tensor], torch.Tensor]:
    """What :func:`_forward_mirrored` calls for one fold: the torch module on the device
    (channels-last, compiled where asked) or its OpenVINO compilation for ``x``'s shape."""
    if settings.precision == "int8":
        from .openvino_int8 import compiled_int8_fold

        if settings.calibration is None:
            raise ValueError("precision int8 needs a calibration set: run through amplify_case, or set one with "
                             "openvino_int8.int8_settings (bundles) or dataclasses.replace(settings, calibration=...)")
        return compiled_int8_fold(model, tuple(x.shape), settings.calibration)
    if settings.backend == "openvino":
        from .openvino_backend import compiled_fold

        return compiled_fold(model, tuple(x.shape), settings.precision)
    model = model.to(settings.device).eval()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if settings.compiles(int(x[0, 0].numel())):
        return _compiled(model)
    return model


def _run(models, x, flips, settings, progress, cancel) -> np.ndarray:
    total_predictions = len(models) * len(flips)
    accumulator: Optional[torch.Tensor] = None
    done = 0
    batch_size = min(settings.max_batch, len(flips))
    with torch.inference_mode():
        for fold_index, fold in enumerate(models):
            if settings.backend == "openvino":  # the first time at a crop size: a conversion of a few seconds
                made = "converted and quantised to int8" if settings.precision == "int8" else "converted"
                progress("ensemble", done / total_predictions, f"fold {fold_index + 1}/{len(models)}: OpenVINO model "
                         f"for {'x'.join(map(str, x.shape[2:]))} ({made} once, then cached)")
            model = _prepare(fold, x, settings)
            pending = list(flips)
            while pending:
                check_cancel(cancel)
                group = pending[:batch_size]
                try:
                    summed = _forward_mirrored(model, x, group, settings)
                except Exception as error:  # fall back to smaller batches instead of failing
                    if not _is_out_of_memory(error) or batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    if settings.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                accumulator = summed if accumulator is None else accumulator.add_(summed)
                pending = pending[len(group) :]
                done += len(group)
                progress("ensemble", done / total_predictions, f"fold {fold_index + 1}/{len(models)}, {done}/{total_predictions} predictions")
            del model  # an OpenVINO fold's buffers go before the next fold is compiled
    assert accumulator is not None
    return (accumulator / total_predictions)[0, 0].cpu().numpy().astype(np.float32)
