"""Five-fold fit of the ensemble (paper, "Training and evaluating the model").

``fit`` reads a cohort, splits it into folds by patient, preprocesses every case once into a
cache, computes the train-set percentiles, and trains one network per requested fold. All of
it lands in ``OUT_DIR``::

    OUT_DIR/
      plan.json           cohort split, geometry + percentiles, network, settings (checked on resume)
      cache/<case>.npz    preprocessed brain z-scores (see data.py)
      fold_<K>/           checkpoint.pt, log.csv, tensorboard/, final.safetensors, done.json

Folds are independent: ``folds=[K]`` trains one, so a cluster array job or several GPUs can
run them side by side against the same ``OUT_DIR`` once the cache and plan exist (run
``prepare`` first, or let fold jobs start after one that built them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

from .cohort import assign_folds
from .data import PERCENTILE_LEVELS, CachedCase, TrainingCase, to_training_case, train_set_percentiles
from .patches import Cases
from .run_status import PLAN_FILE, fold_dir as fold_folder
from .trainer import PAPER_PATCH_RECORD, EpochCallback, FoldResult, TrainConfig, config_record, fit_fold, patch_record

#: Plan entries that must match on resume (anything else may change, e.g. more epochs); the patch
#: and loss settings (:func:`.trainer.patch_record`) too, the paper's assumed where a plan lacks them.
PLAN_KEYS_CHECKED = ("n_folds", "split_seed", "cases", "geometry", "network", "learning_rate", "seed", "mirror", "simulate_low_dose",
                     *PAPER_PATCH_RECORD)


class PlanMismatchError(ValueError):
    """``OUT_DIR`` holds a run made with other settings; the message names them and the fix."""


def make_plan(
    cases: Sequence[CachedCase],
    n_folds: int,
    split_seed: int,
    config: TrainConfig,
    simulate_low_dose: bool = False,
    source: str = "",
    percentile_levels: tuple[float, float] = PERCENTILE_LEVELS,
) -> dict[str, Any]:
    """The run's plan: patient-wise folds, geometry with train-set percentiles, settings."""
    low_level, high_level = (float(v) for v in percentile_levels)
    if not 0.0 <= low_level < high_level <= 100.0:
        raise ValueError(f"--clip-percentiles must satisfy 0 <= LOW < HIGH <= 100, got {low_level:g} {high_level:g}.")
    from .cohort import CaseRecord

    records = [CaseRecord(c.case_id, c.patient_id, {}) for c in cases]
    folds = assign_folds(records, n_folds=n_folds, seed=split_seed)
    spacing = {tuple(c.spacing) for c in cases}
    crops = {tuple(c.crop_size) for c in cases}
    if len(spacing) != 1 or len(crops) != 1:
        raise ValueError(f"cached cases disagree on geometry (spacings {sorted(spacing)}, crops {sorted(crops)}); rebuild the cache.")
    record = config_record(config)
    return {
        "format_version": 1,
        "source": source,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "n_folds": n_folds,
        "split_seed": split_seed,
        "cases": [{"case_id": c.case_id, "patient_id": c.patient_id, "fold": folds[c.case_id]} for c in cases],
        "geometry": {
            "spacing": list(next(iter(spacing))),
            "crop_size": list(next(iter(crops))),
            # Paper: "clipped to the global train-set first and last percentiles"; every case
            # given to fit belongs to the training sample (test rows are dropped by the cohort
            # reader), so the percentiles see no test data and one geometry serves all folds.
            "percentile_levels": [low_level, high_level],
            "percentiles": {k: list(v) for k, v in train_set_percentiles(cases, (low_level, high_level)).items()},
        },
        "network": record["network"],
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "mirror": config.mirror,
        "simulate_low_dose": simulate_low_dose,
        # Recorded for the bundle, not checked on resume (a run may move between machines).
        "device": config.resolved_device().type,
        "precision": config.resolved_precision(config.resolved_device()),
        "grad_clip": config.grad_clip,
        "divergence_guard": config.divergence_guard,
        # Patch mode and loss weighting (None / 1 / 0.0: the paper's whole volumes and plain MSE).
        **patch_record(config),
    }


#: Train-set percentiles (brain z-score units) that differ by less than this still resume a run:
#: a cache rebuilt elsewhere, or moved at float16 precision to a GPU node, shifts them by ~1e-3.
PERCENTILE_TOLERANCE = 1e-2


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= PERCENTILE_TOLERANCE
    return a == b


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Plan values agree: exactly, except the geometry's percentiles (:data:`PERCENTILE_TOLERANCE`)."""
    if key == "geometry" and isinstance(a, dict) and isinstance(b, dict):
        a, b = dict(a), dict(b)
        return _close(a.pop("percentiles", None), b.pop("percentiles", None)) and a == b
    return a == b


def check_or_write_plan(out_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Write ``plan.json``, or check an existing one agrees (resume); returns the plan in force."""
    path = Path(out_dir) / PLAN_FILE
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        for key in PLAN_KEYS_CHECKED:
            before = existing.get(key, PAPER_PATCH_RECORD.get(key))
            if not _same_setting(key, json.loads(json.dumps(before)), json.loads(json.dumps(plan.get(key)))):
                raise PlanMismatchError(
                    f"{path} was made with a different {key!r}; resuming would mix two runs. "
                    "Use a new output folder, or rerun with the original options and cohort."
                )
        return existing
    write_text_atomic(json.dumps(plan, indent=2) + "\n", path)
    return plan


def read_plan(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PLAN_FILE} in {out_dir}: run `contrast-amplifier-train fit` into this folder first.")
    return json.loads(path.read_text(encoding="utf-8"))


def split_cases(cases: Sequence[TrainingCase], plan: Mapping[str, Any], fold: int) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """(training cases, held-out cases) of ``fold`` according to the plan."""
    fold_of = {c["case_id"]: int(c["fold"]) for c in plan["cases"]}
    train = [c for c in cases if fold_of[c.case_id] != fold]
    held_out = [c for c in cases if fold_of[c.case_id] == fold]
    return train, held_out


def _tensorboard_callback(fold_dir: Path) -> tuple[Optional[EpochCallback], Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except Exception:  # ImportError, or tensorboard present but broken
        return None, None
    writer = SummaryWriter(log_dir=str(fold_dir / "tensorboard"))

    def log(row: dict[str, Any]) -> None:
        for key in ("train_loss", "val_loss", "val_psnr", "val_ssim"):
            writer.add_scalar(key, row[key], row["epoch"])
        writer.flush()

    return log, writer


def _both_callbacks(first: Optional[EpochCallback], second: Optional[EpochCallback]) -> EpochCallback:
    """One epoch callback that feeds each row to ``first`` then ``second`` (either may be None)."""

    def epoch_done(row: dict[str, Any]) -> None:
        if first is not None:
            first(row)
        if second is not None:
            second(row)

    return epoch_done


def fit_cases(
    cases: Sequence[CachedCase],
    out_dir: Path,
    folds: Optional[Sequence[int]] = None,
    n_folds: int = 5,
    split_seed: int = 0,
    config: TrainConfig = TrainConfig(),
    simulate_low_dose: bool = False,
    source: str = "",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_epoch: Optional[EpochCallback] = None,
    percentile_levels: tuple[float, float] = PERCENTILE_LEVELS,
) -> list[FoldResult]:
    """Train the requested folds on preprocessed cases (the part of :func:`fit` after the cache).

    Args:
        cases: cached cases of the whole training sample.
        out_dir: run folder (plan, fold folders); reused to resume.
        folds: fold indices to train (default all ``n_folds``), e.g. ``[2]`` for one array job.
        n_folds: paper: five-fold.
        split_seed: seed of the patient-wise split.
        config: training settings (paper defaults).
        progress: ``(stage, fraction, message)``, fraction over all requested folds' epochs.
        cancel: stops between cases (the last finished epoch stays saved).
        on_epoch: receives each epoch's log row (``fold``, ``epoch``, losses, PSNR, SSIM, seconds).
        percentile_levels: which train-set percentiles clip each modality (paper: 1st and 99th;
            see README "Clip percentiles" for when a higher T1c level is needed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or null_progress
    folds = requested_folds(folds, n_folds)
    plan = check_or_write_plan(out_dir, make_plan(cases, n_folds, split_seed, config, simulate_low_dose, source, percentile_levels))
    percentiles = plan["geometry"]["percentiles"]
    tensors = [to_training_case(c, percentiles) for c in cases]
    results = []
    for i, fold in enumerate(folds):
        check_cancel(cancel)
        train, held_out = split_cases(tensors, plan, fold)
        results.append(train_fold(out_dir, fold, train, held_out, config, SubProgress(progress, i / len(folds), (i + 1) / len(folds)),
                                  cancel, on_epoch))
    return results


def requested_folds(folds: Optional[Sequence[int]], n_folds: int) -> list[int]:
    """The fold indices to train (default all ``n_folds``); refuses indices out of range."""
    chosen = list(range(n_folds)) if folds is None else [int(k) for k in folds]
    bad = [k for k in chosen if not 0 <= k < n_folds]
    if bad:
        raise ValueError(f"--folds {bad} out of range: folds are 0..{n_folds - 1}.")
    return chosen


def train_fold(out_dir: Path, fold: int, train: Cases, held_out: Sequence[TrainingCase], config: TrainConfig,
               progress: ProgressCallback, cancel: Optional[CancelToken], on_epoch: Optional[EpochCallback]) -> FoldResult:
    """:func:`.trainer.fit_fold` into ``out_dir/fold_K`` with its TensorBoard log (when tensorboard is installed)."""
    fold_dir = fold_folder(out_dir, fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    tb_log, writer = _tensorboard_callback(fold_dir)
    try:
        return fit_fold(fold, train, held_out, fold_dir, config, progress=progress, cancel=cancel,
                        on_epoch=_both_callbacks(tb_log, on_epoch))
    finally:
        if writer is not None:
            writer.close()
