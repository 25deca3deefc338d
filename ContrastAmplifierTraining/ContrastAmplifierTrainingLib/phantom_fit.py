"""Fit the folds on phantom cases made while training runs (not in the paper: a demo-model tool).

The paper's five folds split one fixed cohort. With phantoms there is no fixed cohort: fold ``k``
trains on its own stream of seeds, ``first_seed + k x cases`` onwards
(:class:`.onthefly.PhantomCaseSource`, walked in order in patch mode), so the five models see
different brains, lesions and poses, and every fold is validated on one held-out phantom set
(``val_seed`` onwards). The clip percentiles come from the first cases of fold 0's stream and are
fixed in ``plan.json`` (one geometry for every fold, as :func:`.fit.make_plan` does for a cohort),
so :func:`.export.export_bundle` exports the run as it exports a cohort's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, check_cancel, null_progress

from .data import PERCENTILE_LEVELS
from .fit import check_or_write_plan, make_plan, requested_folds, train_fold
from .onthefly import PhantomCaseSource, PhantomSourceSettings
from .trainer import EpochCallback, FoldResult, TrainConfig

#: Cases of fold 0's stream whose brain z-scores set the clip percentiles.
PERCENTILE_CASES = 8


def fold_settings(settings: PhantomSourceSettings, fold: int) -> PhantomSourceSettings:
    """Fold ``fold``'s stream: ``settings.cases`` seeds from ``first_seed + fold x cases``."""
    return replace(settings, first_seed=settings.first_seed + fold * settings.cases)


def fit_phantoms(
    out_dir: Path,
    settings: PhantomSourceSettings,
    val_seed: int,
    val_cases: int,
    config: TrainConfig,
    folds: Optional[Sequence[int]] = None,
    n_folds: int = 5,
    walk: int = 8,
    workers: int = 1,
    keep_cases: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_epoch: Optional[EpochCallback] = None,
    percentile_levels: tuple[float, float] = PERCENTILE_LEVELS,
    command: Optional[str] = None,
) -> list[FoldResult]:
    """Train the requested folds, each on its own phantom stream; resume like :func:`.fit.fit_cases`.

    Args:
        out_dir: run folder: ``plan.json``, ``fold_K/`` and ``phantoms/`` (the cases' caches).
        settings: every fold's stream settings (``first_seed`` is fold 0's, ``cases`` per fold).
        val_seed, val_cases: the held-out validation phantoms (keep them apart from every stream).
        config: training settings; patch mode needs ``patches_per_epoch``.
        walk: patches taken from each case before the next (patch mode).
        workers, keep_cases: see :class:`.onthefly.PhantomCaseSource`.
        command: the command line that started the run, kept in ``plan.json`` and the exported bundle.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or null_progress
    folds = requested_folds(folds, n_folds)
    last = settings.first_seed + n_folds * settings.cases
    if settings.first_seed <= val_seed < last or settings.first_seed < val_seed + val_cases <= last:
        raise ValueError(f"validation seeds {val_seed}-{val_seed + val_cases - 1} overlap the training streams "
                         f"{settings.first_seed}-{last - 1}; choose seeds outside them.")
    phantoms = out_dir / "phantoms"
    with PhantomCaseSource(phantoms / "fold_0", fold_settings(settings, 0), workers=workers, walk=walk,
                           keep_cases=keep_cases) as first:
        sample = [first.cached(i) for i in range(min(PERCENTILE_CASES, settings.cases))]
    source = (f"phantoms made on the fly: {n_folds} folds x {settings.cases} seeds from {settings.first_seed} "
              f"({settings.spacing:g} mm, {settings.protocol} protocol, {settings.lesions} lesions); validation seeds "
              f"{val_seed}-{val_seed + val_cases - 1}")
    plan: dict[str, Any] = make_plan(sample, n_folds, 0, config, source=source, percentile_levels=percentile_levels)
    plan["cases"] = []  # no fixed cohort: the streams below are the cases
    plan["phantoms"] = {"first_seed": settings.first_seed, "cases_per_fold": settings.cases, "spacing": settings.spacing,
                        "crop_size": list(settings.crop_size), "lesions": settings.lesions,
                        "protocol": settings.protocol, "val_seed": val_seed, "val_cases": val_cases, "walk": walk}
    if command:
        plan["command"] = command  # the first run's; a resume need not repeat it word for word
    plan = check_or_write_plan(out_dir, plan)
    percentiles = plan["geometry"]["percentiles"]
    validation = PhantomCaseSource(phantoms / "validation", replace(settings, first_seed=val_seed, cases=val_cases),
                                   percentiles=percentiles, workers=workers)
    try:
        held_out = [validation.case(i) for i in range(val_cases)]
    finally:
        validation.close()
    results = []
    for i, fold in enumerate(folds):
        check_cancel(cancel)
        with PhantomCaseSource(phantoms / f"fold_{fold}", fold_settings(settings, fold), percentiles=percentiles,
                               workers=workers, walk=walk, keep_cases=keep_cases) as stream:
            results.append(train_fold(out_dir, fold, stream, held_out, config,
                                      SubProgress(progress, i / len(folds), (i + 1) / len(folds)), cancel, on_epoch))
    return results
