"""One fold's fit loop: Adam, batch 1, MSE, random mirroring, per-epoch validation and checkpoints.

Hyper-parameters (paper, "Training and evaluating the model"): "300 Adam epochs with a learning
rate of 1/1000 and a mini-batch size of 1, [...] to minimize the mean square error between
their predictions and the routine T1c sequences. Random mirroring was used for all three axes".

Resume and determinism:

* after every epoch the fold folder gets ``checkpoint.pt`` (model + Adam state + metric history,
  written to a temporary file then renamed, read back with ``torch.load(weights_only=True)``, so a
  tampered or corrupted checkpoint is refused with a :class:`CheckpointError`, never executed),
  ``log.csv`` (rewritten from the history, so a crash never leaves a row of an unsaved epoch)
  and, once the last epoch is done, ``final.safetensors`` + ``done.json``;
* a rerun restarts after the last saved epoch; an epoch that was interrupted is redone from its
  start and finished epochs or folds are never repeated;
* every random choice (case order, mirroring) comes from ``numpy.random.default_rng((seed,
  fold, epoch))`` and the initial weights from ``torch.manual_seed``; with deterministic
  algorithms on CPU, an interrupted-and-resumed run and an uninterrupted one end with
  identical weights.

Divergence guard (not in the paper; on by default, ``TrainConfig.divergence_guard``): at Adam
1e-3 and batch 1, two folds of five on the phantom demo jumped after 41 and 81 good epochs to a
saturated sigmoid (constant output, zero gradient) and never recovered, in fp32 with gradient
clipping as in bf16. After each epoch, a validation loss above ``DIVERGENCE_FACTOR`` x the best so
far (or a non-finite loss) rolls model and Adam state back to the previous epoch's checkpoint,
halves the learning rate and redoes the epoch; ``log.csv`` records ``lr`` and ``rollbacks``. A
run that never diverges is unchanged.

Patch mode (not in the paper; ``TrainConfig.patch_size``, default ``None`` = the paper's whole
volumes): each step trains on ``batch_size`` random patches, a ``lesion_fraction`` of them centred
on enhancing voxels (:mod:`.patches`), ``patches_per_epoch`` per epoch; every patch comes from
``numpy.random.default_rng((seed, fold, epoch, patch index))``, so resume stays exact. Validation
stays whole-volume. ``enhancement_weight`` > 0 weights the MSE of enhancing voxels (either mode).
Checkpoints record these settings (:func:`patch_record`) and a resume with others is refused.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import pickle
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ContrastAmplifierCommon.atomicfile import atomic_path, write_text_atomic
from ContrastAmplifierLib.network import NetworkConfig, ResidualUNet3D, count_parameters
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel, null_progress

from .data import TrainingCase
from .patches import (ENHANCEMENT_THRESHOLD, CaseSource, Cases, ListSource, PatchSampler, default_patches_per_epoch,
                      enhancing_voxels, weighted_mse)
from .metrics import mse, psnr, ssim3d
from .run_status import CHECKPOINT_FILE, DONE_FILE, FINAL_WEIGHTS_FILE, LOG_FILE

LOG_COLUMNS = ("fold", "epoch", "train_loss", "val_loss", "val_psnr", "val_ssim", "seconds", "lr", "rollbacks")
#: Divergence guard: an epoch whose validation loss exceeds this factor x the best so far is undone.
DIVERGENCE_FACTOR = 2.0
#: Rollbacks allowed per fold before the fit stops with an error (the learning rate is then 1/256 of its start).
MAX_ROLLBACKS = 8
EpochCallback = Callable[[dict[str, Any]], None]
#: Entries of ``checkpoint.pt``, written by :func:`fit_fold` after every epoch.
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "history", "network")


class CheckpointError(ValueError):
    """A fold's ``checkpoint.pt`` cannot be used (refused, corrupted, or another run's); the message names it and the fix."""


@dataclass(frozen=True)
class TrainConfig:
    """Fit settings; the defaults are the paper's.

    Attributes:
        epochs: paper: 300 Adam epochs.
        learning_rate: paper: 1/1000 (Adam).
        seed: seeds weights, case order and mirroring.
        mirror: paper: "random mirroring [...] for all three axes".
        network: widths/depth (not given in the paper; bundle parameters).
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: ``fp32``, ``bf16`` (autocast; CUDA fast path) or ``auto`` (bf16 on CUDA, fp32 elsewhere).
        cudnn_benchmark: let cuDNN pick the fastest kernels (CUDA; makes runs non-deterministic).
        deterministic: use deterministic algorithms (on by default on CPU).
        grad_clip: clip the gradient's global L2 norm to this value (``None``: off, as in the paper).
            It did not prevent the divergences described in the module docstring (Adam rescales
            the step anyway); kept as an option.
        divergence_guard: roll back and halve the learning rate when an epoch diverges (module
            docstring); off reproduces the paper's loop exactly.
        patch_size: (z, y, x) patch sides, multiples of ``2 ** (levels - 1)``, clipped to the case
            size; ``None`` (default): whole volumes at batch 1, the paper's training.
        lesion_fraction: share of patches centred on an enhancing voxel (nnU-Net: 1/3).
        patches_per_epoch: patches per epoch (rounded up to whole batches); ``None``: training
            cases x ceil(case voxels / patch voxels), as many voxels as a whole-volume epoch.
        batch_size: patches per step (patch mode only; whole volumes use 1).
        enhancement_weight: ``w`` of the per-voxel loss weight ``1 + w`` on enhancing voxels (a
            weighted mean, :func:`.patches.weighted_mse`); 0 (default): the paper's plain MSE.
        enhancement_threshold: T1c minus T1c-low ([0, 1] scale) above which a voxel enhances
            (:data:`.patches.ENHANCEMENT_THRESHOLD`, measured on phantoms).
    """

    epochs: int = 300
    learning_rate: float = 1e-3
    seed: int = 0
    mirror: bool = True
    network: NetworkConfig = field(default_factory=NetworkConfig)
    device: str = "auto"
    precision: str = "auto"
    cudnn_benchmark: bool = True
    deterministic: bool = True
    grad_clip: Optional[float] = None
    divergence_guard: bool = True
    patch_size: Optional[tuple[int, int, int]] = None
    lesion_fraction: float = 1 / 3
    patches_per_epoch: Optional[int] = None
    batch_size: int = 1
    enhancement_weight: float = 0.0
    enhancement_threshold: float = ENHANCEMENT_THRESHOLD

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            size = tuple(int(s) for s in self.patch_size)
            multiple = self.network.size_multiple
            if len(size) != 3 or any(s < 1 or s % multiple for s in size):
                raise ValueError(f"--patch-size takes one or three positive multiples of {multiple} (2^(levels-1)), got {size}")
            object.__setattr__(self, "patch_size", size)
        elif self.batch_size != 1 or self.patches_per_epoch is not None:
            raise ValueError("--batch-size and --patches-per-epoch need --patch-size (whole volumes train at batch 1, as in the paper)")
        if not 0.0 <= self.lesion_fraction <= 1.0:
            raise ValueError(f"--lesion-fraction must be in [0, 1], got {self.lesion_fraction}")
        if self.batch_size < 1 or (self.patches_per_epoch is not None and self.patches_per_epoch < 1):
            raise ValueError("--batch-size and --patches-per-epoch must be at least 1")
        if self.enhancement_weight < 0:
            raise ValueError(f"--enhancement-weight must be >= 0, got {self.enhancement_weight}")

    def resolved_device(self) -> torch.device:
        from ContrastAmplifierLib.ensemble import resolve_device

        return resolve_device(self.device)

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16 (got {self.precision!r})")
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return self.precision


@dataclass
class FoldResult:
    """What a finished fold leaves: its weights file and the last epoch's metrics."""

    fold: int
    epochs: int
    weights: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(repr=False, default_factory=list)


def patch_record(config: TrainConfig) -> dict[str, Any]:
    """Patch and loss settings as plain data: in every checkpoint and plan.json; a resume must match them."""
    patched = config.patch_size is not None
    return {
        "patch_size": list(config.patch_size) if config.patch_size is not None else None,
        "lesion_fraction": config.lesion_fraction if patched else None,
        "patches_per_epoch": config.patches_per_epoch,
        "batch_size": config.batch_size,
        "enhancement_weight": float(config.enhancement_weight),
        "enhancement_threshold": float(config.enhancement_threshold) if patched or config.enhancement_weight else None,
    }


#: The paper's settings, assumed for checkpoints and plans written before patch mode existed.
PAPER_PATCH_RECORD = patch_record(TrainConfig())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def restore_checkpoint(
    path: Path, model: ResidualUNet3D, optimizer: torch.optim.Optimizer, network: NetworkConfig, device: torch.device,
    patch: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Load ``checkpoint.pt`` into ``model`` and ``optimizer``; return it (epoch, history, ...).

    ``torch.load(weights_only=True)`` never runs code from the file: a pickle holding anything but
    tensors and plain data is refused, and so is a truncated or corrupted file, with one error.

    Raises:
        CheckpointError: the file is refused, unreadable, incomplete, or made for another network
            or other ``patch`` settings (:func:`patch_record`); the message names it and the fix.
    """
    fix = (f"delete the fold folder {path.parent} to train this fold again from its first epoch (the other folds "
           f"are kept), or restore {path.name} from a backup")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warnings: the error below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} was refused: it holds Python objects other than tensors and plain data, which are never "
            f"unpickled (a file not written by contrast-amplifier-train, or tampered with); {fix}."
        ) from None
    except Exception as exc:  # truncated zip (RuntimeError), empty file (EOFError), junk (KeyError), I/O
        reason = str(exc).split(". ")[0].strip()[:120] or "no detail"
        raise CheckpointError(f"{path} is truncated or corrupted ({type(exc).__name__}: {reason}); {fix}.") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {missing}); {fix}.")
    if state["network"] != network.to_dict():
        raise CheckpointError(
            f"{path} was made with network {state['network']}, not {network.to_dict()}; "
            "use a new output folder or the original network options."
        )
    recorded = state.get("patch", PAPER_PATCH_RECORD)
    if patch is not None and recorded != patch:
        changed = ", ".join(f"{k} {recorded.get(k)} -> {patch.get(k)}" for k in patch if recorded.get(k) != patch.get(k))
        raise CheckpointError(
            f"{path} was made with other patch/loss settings ({changed}); use a new output folder or the original "
            "--patch-size, --lesion-fraction, --patches-per-epoch, --batch-size and --enhancement-weight."
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        state["epoch"], state["history"] = int(state["epoch"]), list(state["history"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = str(exc).split("\n")[0][:160]
        raise CheckpointError(f"{path} does not fit the network and optimiser of this run ({reason}); {fix}.") from None
    return state


def _write_log(history: Sequence[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(buffer.getvalue(), path)


@contextlib.contextmanager
def _torch_settings(device: torch.device, config: TrainConfig) -> Iterator[None]:
    """Deterministic algorithms on CPU, cuDNN benchmark on CUDA; restored afterwards."""
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_bench = torch.backends.cudnn.benchmark
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(config.cudnn_benchmark)
            torch.use_deterministic_algorithms(bool(config.deterministic and not config.cudnn_benchmark), warn_only=True)
        else:
            torch.use_deterministic_algorithms(bool(config.deterministic), warn_only=True)
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.backends.cudnn.benchmark = previous_bench


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mirror(tensor: torch.Tensor, axes: np.ndarray) -> torch.Tensor:
    dims = [d + 1 for d in range(3) if axes[d]]  # tensors are (C, Z, Y, X): spatial dims 1..3
    return torch.flip(tensor, dims) if dims else tensor


def epoch_plan(seed: int, fold: int, epoch: int, n_cases: int, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """Case order and per-case mirrored axes of one epoch (a pure function of its arguments)."""
    rng = np.random.default_rng((seed, fold, epoch))
    order = rng.permutation(n_cases)
    axes = rng.integers(0, 2, size=(n_cases, 3)).astype(bool)
    return order, axes if mirror else np.zeros_like(axes)


def _epoch_batches(source: CaseSource, sampler: Optional[PatchSampler], config: TrainConfig, fold: int, epoch: int,
                   steps: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, target)`` batches of one epoch: whole cases in epoch_plan order, or sampled patches."""
    if sampler is None:
        order, axes = epoch_plan(config.seed, fold, epoch, len(source), config.mirror)
        for index in order:
            case = source.case(int(index)).to(device)
            yield _mirror(case.inputs, axes[index])[None], _mirror(case.target, axes[index])[None]
        return
    for step in range(steps):
        first = step * config.batch_size
        yield sampler.batch([sampler.draw(config.seed, fold, epoch, first + i) for i in range(config.batch_size)], device)


def _loss(prediction: torch.Tensor, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The paper's MSE, or with ``enhancement_weight`` the weighted MSE of :func:`.patches.weighted_mse`."""
    if not config.enhancement_weight:
        return F.mse_loss(prediction.float(), y)
    return weighted_mse(prediction.float(), y, enhancing_voxels(x, y, config.enhancement_threshold), config.enhancement_weight)


def _sampling(train_cases: Cases, config: TrainConfig, device: torch.device) -> tuple[CaseSource, Optional[PatchSampler], int]:
    """The training cases as a source (a list moved to ``device`` once), the patch sampler and steps per epoch."""
    source = ListSource([c.to(device) for c in train_cases]) if isinstance(train_cases, Sequence) else train_cases
    if config.patch_size is None:
        return source, None, len(source)
    walk = getattr(source, "walk", None)  # a source made as training runs is walked in order
    if walk is not None and config.patches_per_epoch is None:
        raise ValueError("cases made on the fly need --patches-per-epoch (their number is not an epoch's size)")
    sampler = PatchSampler(source, config.patch_size, config.lesion_fraction, config.mirror, config.enhancement_threshold,
                           walk=walk, patches_per_epoch=config.patches_per_epoch)
    patches = config.patches_per_epoch or default_patches_per_epoch(len(source), sampler.shape(0), config.patch_size)
    return source, sampler, -(-patches // config.batch_size)


def evaluate(model: ResidualUNet3D, cases: Sequence[TrainingCase], device: torch.device, precision: str) -> dict[str, float]:
    """Mean MSE, PSNR and SSIM of the model's predictions on ``cases`` (no mirroring)."""
    if not cases:
        return {"val_loss": math.nan, "val_psnr": math.nan, "val_ssim": math.nan}
    model.eval()
    losses, psnrs, ssims = [], [], []
    with torch.inference_mode():
        for case in cases:
            with _autocast(device, precision):
                prediction = model(case.inputs[None].to(device))[0].float()
            target = case.target.to(device)
            losses.append(mse(prediction, target))
            psnrs.append(psnr(prediction, target))
            ssims.append(ssim3d(prediction, target))
    return {"val_loss": float(np.mean(losses)), "val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims))}


def fit_fold(
    fold: int,
    train_cases: Cases,
    val_cases: Sequence[TrainingCase],
    fold_dir: Path,
    config: TrainConfig,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_epoch: Optional[EpochCallback] = None,
) -> FoldResult:
    """Train (or resume, or skip if finished) the network of one fold.

    Args:
        fold: fold index (seeds the weights and the epoch plans).
        train_cases: the other folds' cases: a list, or a :class:`.patches.CaseSource`.
        val_cases: the held-out fold's cases (validation loss, PSNR, SSIM each epoch).
        fold_dir: where checkpoint, log and final weights go.
        config: see :class:`TrainConfig`.
        progress: ``(stage, fraction, message)`` with fraction over this fold's epochs.
        cancel: checked between cases (patch batches); a cancel loses at most the current epoch.
        on_epoch: receives each finished epoch's log row.

    Returns:
        The fold's :class:`FoldResult` (weights in ``fold_dir / "final.safetensors"``).
    """
    from safetensors.torch import save_file

    if len(train_cases) == 0:
        raise ValueError(f"fold {fold} has no training cases; the cohort needs at least two folds' worth of patients.")
    progress = progress or null_progress
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = fold_dir / CHECKPOINT_FILE
    final_path = fold_dir / FINAL_WEIGHTS_FILE
    done_path = fold_dir / DONE_FILE
    device = config.resolved_device()
    precision = config.resolved_precision(device)

    if done_path.is_file() and final_path.is_file() and not checkpoint_path.is_file():
        # A finished fold copied without its (bulky) checkpoint, e.g. back from a GPU node.
        done = json.loads(done_path.read_text(encoding="utf-8"))
        if int(done.get("epochs", 0)) >= config.epochs:
            progress("fit", 1.0, f"fold {fold} already finished ({done['epochs']} epochs)")
            return FoldResult(fold, int(done["epochs"]), final_path, dict(done.get("metrics", {})), [])
        raise ValueError(
            f"{fold_dir} finished {done.get('epochs')} epochs and has no checkpoint.pt to continue to {config.epochs}; "
            "copy the checkpoint back, or ask for the epochs it has."
        )
    with _torch_settings(device, config):
        torch.manual_seed(config.seed * 1000 + fold)
        model = ResidualUNet3D(config.network).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if checkpoint_path.is_file():
            state = restore_checkpoint(checkpoint_path, model, optimizer, config.network, device, patch_record(config))
            history, start_epoch = state["history"], state["epoch"]
        if start_epoch >= config.epochs and final_path.is_file():
            progress("fit", 1.0, f"fold {fold} already finished ({start_epoch} epochs)")
            return FoldResult(fold, start_epoch, final_path, dict(history[-1]) if history else {}, history)

        source, sampler, steps = _sampling(train_cases, config, device)
        unit = "case" if sampler is None else "batch"
        val_data = [c.to(device) for c in val_cases]
        rollbacks = int(history[-1].get("rollbacks", 0)) if history else 0
        epoch = start_epoch
        while epoch < config.epochs:
            started = time.perf_counter()
            model.train()
            total = 0.0
            for step, (x, y) in enumerate(_epoch_batches(source, sampler, config, fold, epoch, steps, device)):
                check_cancel(cancel)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, precision):
                    prediction = model(x)
                loss = _loss(prediction, x, y, config)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.grad_clip))
                optimizer.step()
                total += float(loss.detach())
                fraction = (epoch + (step + 1) / steps) / config.epochs
                progress("fit", fraction, f"fold {fold} epoch {epoch + 1}/{config.epochs} {unit} {step + 1}/{steps}")
            check_cancel(cancel)
            row: dict[str, Any] = {"fold": fold, "epoch": epoch + 1, "train_loss": total / steps}
            row.update(evaluate(model, val_data, device, precision))
            row["seconds"] = time.perf_counter() - started
            if config.divergence_guard and history and _diverged(row, history):
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS:
                    raise RuntimeError(
                        f"fold {fold} diverged {rollbacks} times (last at epoch {epoch + 1}); restart it with a lower --lr."
                    )
                restore_checkpoint(checkpoint_path, model, optimizer, config.network, device, patch_record(config))
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
                progress("fit", epoch / config.epochs, f"fold {fold} epoch {epoch + 1} diverged (val loss {row['val_loss']:.3g}); "
                         f"rolled back, learning rate now {optimizer.param_groups[0]['lr']:.3g}")
                continue
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["rollbacks"] = rollbacks
            history.append(row)
            _atomic_torch_save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "network": config.network.to_dict(),
                    "patch": patch_record(config),
                },
                checkpoint_path,
            )
            _write_log(history, fold_dir / LOG_FILE)
            if on_epoch is not None:
                on_epoch(dict(row))
            epoch += 1
        with atomic_path(final_path, ".safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        write_text_atomic(
            json.dumps(
                {"fold": fold, "epochs": config.epochs, "parameters": count_parameters(model), "metrics": history[-1] if history else {}},
                indent=2,
            )
            + "\n",
            done_path,
        )
    progress("fit", 1.0, f"fold {fold} finished")
    return FoldResult(fold, config.epochs, final_path, dict(history[-1]) if history else {}, history)


def _diverged(row: dict[str, Any], history: Sequence[dict[str, Any]]) -> bool:
    """The epoch in ``row`` blew up: non-finite loss, or validation loss > factor x the best so far."""
    key = "val_loss" if math.isfinite(float(history[0].get("val_loss", math.nan))) else "train_loss"
    if not (math.isfinite(float(row["train_loss"])) and math.isfinite(float(row.get(key, math.nan)))):
        return True
    best = min(float(r[key]) for r in history)
    return float(row[key]) > DIVERGENCE_FACTOR * best


def config_record(config: TrainConfig) -> dict[str, Any]:
    """JSON-ready record of a config (for plan.json and the bundle's ``training`` entry)."""
    record = asdict(config)
    record["network"] = config.network.to_dict()
    return record
