"""Reproduce the bundled demo ensemble ``ContrastAmplifier/Resources/Models/phantom-demo`` (synthetic phantoms only).

The demo model exists so that ``make demo``, the Slicer module and the tests have real weights
to run; it is trained on physics phantoms (``ContrastAmplifierLib.phantom``), at low resolution
(3 mm) and small width (8 base channels) so it trains on a 2-core CPU. It is **not** the
paper's model and must never be used on patients.

Phantom seeds: training cases use ``TRAIN_SEED + i`` and the held-out evaluation cases
``EVAL_SEED + i``; the tests and ``contrast-amplifier demo`` (seed 20260) use other seeds.

Reproduce with::

    contrast-amplifier-train demo-model build/demo-model --bundle-dir ContrastAmplifier/Resources/Models/phantom-demo
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ContrastAmplifierLib.bundle import ModelBundle
from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, SubProgress, null_progress

from .trainer import EpochCallback, TrainConfig

TRAIN_SEED = 710_000
EVAL_SEED = 720_000
DEMO_NAME = "phantom-demo"
DEMO_INTENDED_USE = "synthetic phantom demo - not for clinical use"


def build_demo_model(
    work_dir: Path,
    bundle_dir: Path,
    cases: int = 20,
    eval_cases: int = 4,
    spacing: float = 3.0,
    crop_size: tuple[int, int, int] = (56, 64, 56),
    base_channels: int = 8,
    levels: int = 4,
    input_skip: bool = True,
    epochs: int = 40,
    folds: Optional[Sequence[int]] = None,
    seed: int = 0,
    device: str = "cpu",
    percentile_levels: tuple[float, float] = (1.0, 99.0),
    grad_clip: Optional[float] = None,
    precision: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_epoch: Optional[EpochCallback] = None,
) -> tuple[Optional[ModelBundle], dict[str, dict[str, float]]]:
    """Generate phantoms, fit five folds, export the bundle and evaluate it on held-out phantoms.

    Every stage resumes: phantoms and cache are reused, finished epochs and folds are skipped.

    Returns:
        The bundle and the held-out metrics per method (see :mod:`.evaluate`).
    """
    from ContrastAmplifierLib.phantom import generate_cohort

    from .cache import prepare_cases
    from .evaluate import evaluate_bundle
    from .export import export_bundle
    from .fit import fit_cases, read_plan

    progress = progress or null_progress
    work_dir = Path(work_dir)
    spacing3 = (float(spacing),) * 3

    def phantoms(folder: Path, n: int, first_seed: int, start: float, stop: float) -> Path:
        record = {"cases": n, "seed": first_seed, "spacing": spacing}
        done = folder / "complete.json"
        if not done.is_file() or json.loads(done.read_text(encoding="utf-8")) != record:
            generate_cohort(folder, cases=n, seed=first_seed, spacing=spacing, skip_existing=True,
                            progress=SubProgress(progress, start, stop), cancel=cancel)
            done.write_text(json.dumps(record) + "\n", encoding="utf-8")
        return folder

    train_dir = phantoms(work_dir / "phantoms-train", cases, TRAIN_SEED, 0.0, 0.05)
    eval_dir = phantoms(work_dir / "phantoms-eval", eval_cases, EVAL_SEED, 0.05, 0.06)
    run_dir = work_dir / "run"
    cached = prepare_cases(train_dir, run_dir / "cache", spacing=spacing3, crop_size=crop_size,
                           progress=SubProgress(progress, 0.06, 0.1), cancel=cancel)
    config = TrainConfig(epochs=epochs, seed=seed, network=NetworkConfig(base_channels=base_channels, levels=levels, input_skip=input_skip), device=device,
                         grad_clip=grad_clip, precision=precision)
    fit_cases(cached, run_dir, folds=folds, n_folds=5, config=config, source=f"phantoms seeds {TRAIN_SEED}..{TRAIN_SEED + cases - 1}",
              progress=SubProgress(progress, 0.1, 0.95), cancel=cancel, on_epoch=on_epoch, percentile_levels=percentile_levels)
    if folds is not None and sorted(int(k) for k in folds) != list(range(5)):
        # Side-by-side fold jobs: the bundle is exported by a final run without --folds.
        progress("done", 1.0, f"folds {sorted(folds)} trained; run again without --folds to export the bundle")
        return None, {}
    held_out = prepare_cases(eval_dir, work_dir / "eval-cache", spacing=spacing3, crop_size=crop_size, cancel=cancel)
    metadata: dict[str, Any] = dict(
        name=DEMO_NAME,
        version="0.2.0",
        description=(
            "Demo 5-fold ensemble of the paper's residual 3D UNet (Bone, Ammari et al. 2022), trained on synthetic "
            f"brain phantoms at {spacing:g} mm with {base_channels} base channels: it exercises the whole pipeline "
            "(preprocessing, ensemble, mapping back) and shows the amplification idea on phantoms."
        ),
        intended_use=DEMO_INTENDED_USE,
        training_data=(
            f"trained on synthetic phantoms: {cases} cases (ContrastAmplifierLib.phantom seeds {TRAIN_SEED}-"
            f"{TRAIN_SEED + cases - 1}, {spacing:g} mm); no patient data"
        ),
    )
    plan = read_plan(run_dir)
    command = (f"contrast-amplifier-train demo-model {work_dir} --bundle-dir {bundle_dir} --cases {cases} --eval-cases {eval_cases} "
               f"--spacing {spacing:g} --crop {' '.join(map(str, crop_size))} --base-channels {base_channels} --levels {levels} "
               f"--epochs {epochs} --seed {seed} --clip-percentiles {percentile_levels[0]:g} {percentile_levels[1]:g}"
               + ("" if grad_clip is None else f" --grad-clip {grad_clip:g}")
               # the device and precision that trained the folds (the run may have moved machines)
               + f" --precision {plan.get('precision', precision)} --device {plan.get('device', device)}"
               + ("" if input_skip else " --no-input-skip"))
    bundle = export_bundle(run_dir, bundle_dir, folds=folds, extra_training={"command": command}, **metadata)
    progress("evaluate", 0.96, f"held-out phantoms ({eval_cases} cases, seeds from {EVAL_SEED})")
    metrics = evaluate_bundle(bundle, held_out, n_mirrorings=8, device=device)
    bundle = export_bundle(run_dir, bundle_dir, folds=folds, extra_training={
        "command": command,
        "held_out_evaluation": {"cases": eval_cases, "seeds": f"{EVAL_SEED}-{EVAL_SEED + eval_cases - 1}",
                                "space": "atlas crop grid, brain mask, [0, 1] scale of the t1c percentiles",
                                "ensemble": "all folds x 8 mirrorings", "metrics": metrics},
    }, **metadata)
    progress("done", 1.0, f"bundle written to {bundle.path}")
    return bundle, metrics
