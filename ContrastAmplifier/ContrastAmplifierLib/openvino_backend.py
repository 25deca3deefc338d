"""OpenVINO CPU backend of the ensemble and of HD-BET (``--backend openvino``; ``auto`` on CPU when installed).

Each fold network is converted once per input shape: exported to ONNX (the TorchScript exporter,
then the dynamo one; a temporary file), read by OpenVINO, or, where no ONNX export works,
converted from the torch module itself (``openvino.convert_model(model, example_input=...)``).
The graph includes the network's own zero padding to ``2 ** (levels - 1)`` and the crop back, so
a mirrored input goes through exactly what the torch path runs. It is compiled for OpenVINO's
``CPU`` device with the inference precision hint ``f32`` ("exact") or ``bf16`` ("fast", only
where the CPU has BF16 instructions; elsewhere "fast" runs in f32 with a logged note). The
mirrorings and their average are :mod:`.ensemble`'s, shared with the torch path.

HD-BET's network (:mod:`.skullstrip_openvino`) goes through the same conversion and cache, with
dynamic spatial axes (``compiled_fold(..., export_shape=...)``): its input size follows each
image's field of view, so it is converted once, traced at a small size, and its cached IR is
reshaped to each input before compiling.

Cache: the converted model is saved as OpenVINO IR (``model.xml`` + ``model.bin``, fp32 weights)
in ``<user cache>/SlicerContrastAmplifier/openvino/<key>/`` (``$CA_OPENVINO_CACHE`` overrides the
folder), ``key`` hashing the weights' SHA-256 (over the state dict's names, dtypes, shapes and
bytes), the network, the input shape (-1 for a dynamic axis), the OpenVINO version and :data:`CACHE_FORMAT`. The entry's
``entry.json`` records the SHA-256 of ``model.xml`` and ``model.bin``; they are checked on every
load, and an entry that fails (corrupted, truncated, half-deleted, another key) is rebuilt, never
used. An entry is written into a temporary folder beside it and renamed into place, so a crash
leaves no partial entry. Compiled models are not kept in memory between folds or cases: each
holds its intermediate buffers (about 440 MB for a base-16 network at 112 x 128 x 112), and
reading and compiling a cached entry takes under 0.1 s.

``openvino`` (and ``onnx``) are imported here only: the rest of the package, and 3D Slicer's
Python, run without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ContrastAmplifierCommon.atomicfile import apply_umask

from .bundle import sha256_file

logger = logging.getLogger(__name__)

#: Environment variable naming the cache folder (tests, shared machines); default: the user cache.
CACHE_ENV = "CA_OPENVINO_CACHE"
#: Bumped when the conversion changes in a way that makes older entries wrong.
CACHE_FORMAT = 1
ENTRY_FILE = "entry.json"
#: What to install for this backend (one line of every error that asks for it).
INSTALL_HINT = 'pip install "slicer-contrast-amplifier[openvino]" (or: pip install openvino onnx onnxscript)'
#: Number of conversions (torch -> OpenVINO) this process made; the tests read it.
conversions = 0

_core: Any = None


def import_openvino() -> Any:
    """The ``openvino`` module; raises :class:`ImportError` when it is not installed or broken."""
    return importlib.import_module("openvino")


def available() -> bool:
    """Whether ``openvino`` imports (what ``--backend auto`` asks on CPU)."""
    try:
        import_openvino()
    except Exception:  # ImportError, or a broken install (missing shared library...)
        return False
    return True


def require_openvino() -> Any:
    """The ``openvino`` module, or a one-line :class:`ValueError` naming the fix."""
    try:
        return import_openvino()
    except Exception as exc:
        raise ValueError(f"--backend openvino needs the openvino package, which could not be imported ({type(exc).__name__}: "
                         f"{exc}); install it with {INSTALL_HINT}, or use --backend torch.") from None


def core() -> Any:
    """The process's ``openvino.Core``."""
    global _core
    if _core is None:
        _core = require_openvino().Core()
    return _core


def supports_bf16() -> bool:
    """Whether OpenVINO's CPU device has BF16 instructions (``OPTIMIZATION_CAPABILITIES``)."""
    try:
        return "BF16" in list(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # an old release without the property: assume not
        return False


def cache_dir() -> Path:
    """``$CA_OPENVINO_CACHE``, else ``<user cache>/SlicerContrastAmplifier/openvino``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("SlicerContrastAmplifier")) / "openvino"


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict: every tensor's name, dtype, shape and bytes, in name order.

    Remembered on the model while no tensor is replaced or changed in place (their storage and
    version counters), so sliding-window tiles and later cases do not hash the weights again.
    """
    state = sorted(model.state_dict(keep_vars=True).items())
    signature = tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for name, t in state)
    remembered = model.__dict__.get("_contrast_amplifier_sha256")
    if remembered is not None and remembered[0] == signature:
        return str(remembered[1])
    digest = hashlib.sha256()
    for name, tensor in state:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    model.__dict__["_contrast_amplifier_sha256"] = (signature, digest.hexdigest())
    return digest.hexdigest()


def _network_description(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else f"{type(model).__module__}.{type(model).__qualname__}: {model!r}"


def cache_key(model: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    """The entry's folder name and what it hashes (stored in ``entry.json``)."""
    details = {
        "format": CACHE_FORMAT,
        "weights_sha256": weights_sha256(model),
        "network": _network_description(model),
        "input_shape": [int(s) for s in input_shape],
        "openvino": str(require_openvino().get_version()),
    }
    return entry_key(details)


def entry_key(details: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A cache entry's folder name (a hash of ``details``) and ``details`` as ``entry.json`` reads them back."""
    text = json.dumps(details, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], json.loads(text)


def _check_entry(folder: Path, details: dict[str, Any]) -> Optional[str]:
    """``None`` when ``folder`` is a sound entry for ``details``, else what is wrong with it."""
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
        if entry.get("key") != details:
            return "it was made for another model, shape or OpenVINO version"
        for name, expected in entry["files"].items():
            if sha256_file(folder / name) != expected:
                return f"{name} does not match its SHA-256"
        if set(entry["files"]) != {"model.xml", "model.bin"}:
            return "its file list is wrong"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters print progress and warnings: keep stdout clean (``--progress json`` lives there)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: tuple[int, ...] = ()) -> None:
    """ONNX export: the TorchScript exporter (fast), then the dynamo one (needs onnxscript).

    ``dynamic``: axes of the input (and output) left dynamic in the graph.
    """
    has_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    attempts: list[dict[str, Any]] = [{"dynamo": False, "opset_version": 17}, {"dynamo": True}] if has_dynamo else [{"opset_version": 17}]
    axes = {name: {axis: f"dim{axis}" for axis in dynamic} for name in ("input", "output")} if dynamic else None
    errors: list[str] = []
    for extra in attempts:
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes=axes, **extra)
            return
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    raise RuntimeError("; ".join(errors))


def convert(model: torch.nn.Module, input_shape: tuple[int, ...], example_shape: Optional[tuple[int, ...]] = None) -> Any:
    """``openvino.Model`` of ``model`` for inputs of ``input_shape``, via ONNX where it works.

    ``input_shape`` is static, or holds -1 for dynamic axes (a fully convolutional network such as
    HD-BET's, whose input size follows each image's field of view): the model is then traced at
    ``example_shape`` (small, so that the export's forward pass is cheap) and the cached IR is
    reshaped to each input before compiling (``openvino.Model.reshape``).
    """
    global conversions
    ov = require_openvino()
    model = model.to("cpu").eval()
    dynamic = tuple(axis for axis, size in enumerate(input_shape) if int(size) < 0)
    traced = input_shape
    if dynamic:
        if example_shape is None:
            raise ValueError(f"input shape {tuple(input_shape)} has dynamic axes: give example_shape to trace the model at")
        traced = example_shape
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        example = torch.zeros(tuple(int(s) for s in traced), dtype=torch.float32)
        with tempfile.TemporaryDirectory(prefix="ca-onnx-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            try:
                _export_onnx(model, example, onnx_path, dynamic)
                converted = ov.convert_model(str(onnx_path))
            except Exception as exc:
                logger.info("ONNX export or conversion failed (%s); converting the torch module directly", exc)
                converted = ov.convert_model(model, example_input=example, input=[tuple(int(s) for s in input_shape)])
    conversions += 1
    return converted


def _write_entry(folder: Path, converted: Any, details: dict[str, Any]) -> None:
    """Save ``converted`` as the entry ``folder``: built in a temporary folder beside it, then renamed."""
    ov = require_openvino()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
        files = {name: sha256_file(tmp / name) for name in ("model.xml", "model.bin")}
        (tmp / ENTRY_FILE).write_text(json.dumps({"key": details, "files": files}, indent=2) + "\n", encoding="utf-8")
        for name in ("model.xml", "model.bin", ENTRY_FILE):
            apply_umask(tmp / name)
        apply_umask(tmp, directory=True)
        if folder.exists():  # a stale or corrupted entry: move it aside, then drop it
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, aside / "entry")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if _check_entry(folder, details) is not None:  # another process wrote a bad one meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_convert(model: torch.nn.Module, input_shape: tuple[int, ...],
                    example_shape: Optional[tuple[int, ...]] = None) -> Any:
    """The ``openvino.Model`` of ``model`` at ``input_shape``: from the cache when its entry is
    sound, else converted and cached (a cache that cannot be written is logged and skipped).

    ``input_shape`` may hold -1 for dynamic axes (then give ``example_shape``; see :func:`convert`).
    """
    key, details = cache_key(model, input_shape)
    return load_or_build(key, details, lambda: convert(model, input_shape, example_shape))


def load_or_build(key: str, details: dict[str, Any], build: Callable[[], Any]) -> Any:
    """The ``openvino.Model`` of the cache entry ``key`` (:func:`entry_key` of ``details``) when it is
    sound, else ``build()``'s, cached (the int8 models of :mod:`.openvino_int8` are entries too)."""
    folder = cache_dir() / key
    if folder.exists():
        problem = _check_entry(folder, details)
        if problem is None:
            try:
                return core().read_model(str(folder / "model.xml"))
            except Exception as exc:
                problem = f"OpenVINO could not read it ({exc})"
        logger.warning("OpenVINO cache entry %s is unusable (%s); rebuilding it", folder, problem)
    converted = build()
    try:
        _write_entry(folder, converted, details)
    except OSError as exc:
        logger.warning("could not write the OpenVINO cache entry %s (%s); the converted model is used uncached", folder, exc)
    return converted


def precision_hint(precision: str) -> str:
    """OpenVINO's inference precision for ``precision``: ``bf16`` for "fast" where the CPU has BF16, else ``f32``."""
    return "bf16" if precision == "fast" and supports_bf16() else "f32"


def _compile(converted: Any, precision: str, hint: str, threads: int) -> Any:
    if precision == "fast" and hint != "bf16":
        logger.warning("precision fast: this CPU has no BF16 instructions for OpenVINO; running in f32 (exact) instead")
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
              "CPU_DENORMALS_OPTIMIZATION": True}
    return core().compile_model(converted, "CPU", config)


class CompiledFold:
    """One fold network compiled by OpenVINO for one input shape: ``torch`` batch in, ``torch`` batch out.

    A batch of several mirrorings runs one item at a time (the model is compiled for batch 1).
    """

    def __init__(self, compiled: Any, input_shape: tuple[int, ...], precision_hint: str):
        self.compiled = compiled
        self.input_shape = tuple(input_shape)
        self.precision_hint = precision_hint
        self.request = compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        items = batch.detach().to("cpu", torch.float32).numpy()
        outputs = []
        for item in items:
            item = np.ascontiguousarray(item[None])
            if item.shape != self.input_shape:
                raise ValueError(f"OpenVINO model compiled for {self.input_shape}, given {item.shape}")
            result = self.request.infer({0: item})
            outputs.append(np.array(result[self.compiled.output(0)], dtype=np.float32, copy=True))
        return torch.from_numpy(np.concatenate(outputs, axis=0))


def compiled_fold(model: torch.nn.Module, input_shape: tuple[int, ...], precision: str = "exact",
                  threads: Optional[int] = None, export_shape: Optional[tuple[int, ...]] = None) -> CompiledFold:
    """``model`` as a :class:`CompiledFold` for batch-1 inputs of ``input_shape`` ``(N, C, Z, Y, X)``,
    from the cache (converted and cached the first time).

    ``threads``: OpenVINO's CPU threads (default: torch's, i.e. ``--threads``).
    ``export_shape``: convert once for every spatial size (the cache entry's spatial axes are
    dynamic; the model is traced at this small shape) and reshape the IR to ``input_shape`` here,
    for a fully convolutional network whose input size changes from image to image (HD-BET).
    ``None``: one static conversion per ``input_shape`` (the ensemble's folds).
    """
    input_shape = (1, *(int(s) for s in input_shape[1:]))
    if export_shape is None:
        return compile_converted(load_or_convert(model, input_shape), input_shape, precision, threads)
    dynamic = (1, input_shape[1], *(-1 for _ in input_shape[2:]))
    converted = load_or_convert(model, dynamic, example_shape=tuple(int(s) for s in export_shape))
    converted.reshape(list(input_shape))
    return compile_converted(converted, input_shape, precision, threads)


def compile_converted(converted: Any, input_shape: tuple[int, ...], precision: str = "exact",
                      threads: Optional[int] = None) -> CompiledFold:
    """An ``openvino.Model`` (converted, or quantised by :mod:`.openvino_int8`) compiled for the CPU."""
    hint = precision_hint(precision)
    return CompiledFold(_compile(converted, precision, hint, int(threads or torch.get_num_threads())), tuple(input_shape), hint)
