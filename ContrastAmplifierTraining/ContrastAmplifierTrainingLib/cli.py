"""``contrast-amplifier-train``: fit the five-fold ensemble and export it as a model bundle.

Verbs (nnU-Net style, one per stage)::

    contrast-amplifier-train prepare MANIFEST OUT_DIR            # preprocess into OUT_DIR/cache + plan.json
    contrast-amplifier-train fit MANIFEST OUT_DIR --folds 0 1 2 3 4 --epochs 300
    contrast-amplifier-train fit-phantoms OUT_DIR --spacing 1.5 --patch-size 64 --patches-per-epoch 200
    contrast-amplifier-train export OUT_DIR BUNDLE_DIR --name my-model
    contrast-amplifier-train fit MANIFEST OUT_DIR --executor slurm --partition gpu --no-wait   # one job per fold
    contrast-amplifier-train status OUT_DIR                      # epochs, last metrics and job of every fold

``--folds`` takes several values after one flag (``--folds 0 1 2``) or comma-separated
(``--folds 0,1,2``). With ``--progress json`` every line on stdout is one JSON object with
``stage``, ``fraction`` (0-1 over the whole job) and ``message``; ``"stage": "epoch"`` lines also
carry ``fold``, ``epoch``, ``epochs``, ``train_loss``, ``val_loss``, ``val_psnr``, ``val_ssim``,
``seconds``; the last line is ``"stage": "done"`` (or ``"stage": "error"`` / ``"cancelled"``).
SIGTERM or Ctrl-C stops between cases; rerunning the same command resumes.

``fit --executor local|slurm`` trains each fold as its own submitit job (:mod:`.fold_jobs`);
with ``--progress json`` its first line is ``"stage": "submitted"`` (``jobs``: fold -> job id),
which is also the last line with ``--no-wait``.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from ContrastAmplifierCommon.cliapp import cancelled, fail, run_cli
from ContrastAmplifierCommon.progress import CancelToken, Cancelled, make_progress

app = typer.Typer(
    name="contrast-amplifier-train",
    help="Train the contrast-amplification ensemble (Bone, Ammari et al. 2022) and export model bundles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MULTI_VALUE_OPTIONS = ("--folds", "--patch-size")

#: The command line being run (recorded in the plans of phantom-stream runs).
_command_line: Optional[str] = None


def _fail(message: str, progress: str, code: int = 2) -> None:
    if progress == "json":
        _json_line({"stage": "error", "fraction": 0.0, "message": message})
    fail(message, code)


_json_lock = threading.Lock()


RESUME_MESSAGE = "stopped; rerun the same command to resume (finished epochs, folds and cached cases are kept)"


def _cancelled(progress: str, message: str = RESUME_MESSAGE) -> None:
    if progress == "json":
        _json_line({"stage": "cancelled", "fraction": 0.0, "message": message})
    cancelled(message)


def _json_line(obj: dict[str, Any]) -> None:
    with _json_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _install_sigterm(cancel: CancelToken) -> None:
    """SIGTERM (the Slicer module's Stop) sets the cancel flag: the job stops between cases."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: cancel.cancel())


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _parse_folds(values: Optional[list[str]]) -> Optional[list[int]]:
    if not values:
        return None
    folds: list[int] = []
    for value in values:
        for part in str(value).replace(",", " ").split():
            try:
                folds.append(int(part))
            except ValueError:
                raise typer.BadParameter(f"--folds takes integers (e.g. --folds 0 1 2), got {part!r}") from None
    return sorted(set(folds))


def expand_multi_value_options(argv: Sequence[str], options: Sequence[str] = MULTI_VALUE_OPTIONS) -> list[str]:
    """Rewrite ``--folds 0 1 2`` as ``--folds 0 --folds 1 --folds 2`` (click takes one value per flag)."""
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        if token in options:
            first = True
            while i < len(argv) and (first or argv[i].replace(",", "").isdigit()):
                if not first:
                    out.append(token)
                out.append(argv[i])
                first = False
                i += 1
    return out


def _network_config(base_channels: int, levels: int, input_skip: bool = False):
    from ContrastAmplifierLib.network import NetworkConfig

    return NetworkConfig(base_channels=base_channels, levels=levels, input_skip=input_skip)


ProgressOpt = typer.Option("bar", "--progress", help="bar (tqdm on stderr), json (JSON lines on stdout, read by Slicer) or none.")
SpacingOpt = typer.Option(1.0, "--spacing", help="Atlas voxel spacing in mm (paper: 1).")
CropOpt = typer.Option((160, 192, 160), "--crop", help="Centre-crop size x y z in voxels (paper: 160 192 160).")


@app.command()
def prepare(
    manifest: Path = typer.Argument(..., help="Cohort: manifest CSV (case_id,patient_id,t1,flair,adc,t1c_low,t1c[,split]) or a folder of case folders."),
    out_dir: Path = typer.Argument(..., help="Run folder: the cache goes to OUT_DIR/cache."),
    spacing: float = SpacingOpt,
    crop: tuple[int, int, int] = CropOpt,
    simulate_low_dose: bool = typer.Option(False, "--simulate-low-dose", help="Synthesise T1c-low from T1 and T1c (approximation; see README)."),
    skull_strip: str = typer.Option("fast", "--skull-strip", help="HD-BET mode: fast or accurate."),
    device: str = typer.Option("cpu", "--device", help="Device for HD-BET during preprocessing (cpu or cuda)."),
    progress: str = ProgressOpt,
) -> None:
    """Preprocess every case once into OUT_DIR/cache (fit does this too; run it first for array jobs)."""
    from .cache import prepare_cases

    cancel = CancelToken()
    _install_sigterm(cancel)
    report = make_progress(progress)
    try:
        cases = prepare_cases(manifest, out_dir / "cache", spacing=(spacing,) * 3, crop_size=tuple(crop),
                              simulate_low_dose=simulate_low_dose, skull_strip=skull_strip, device=device,
                              progress=report, cancel=cancel)
    except Cancelled:
        _cancelled(progress)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc), progress)
    getattr(report, "close", lambda: None)()
    if progress == "json":
        _json_line({"stage": "done", "fraction": 1.0, "message": f"{len(cases)} cases cached in {out_dir / 'cache'}"})
    else:
        typer.echo(f"{len(cases)} cases cached in {out_dir / 'cache'}", err=True)


# Training options shared by `fit` (a cohort) and `fit-phantoms` (phantom streams).
FoldsOpt = typer.Option(None, "--folds", "--fold", help="Folds to train, e.g. --folds 0 1 2 3 4 (default all) or --fold 3 for one array job.")
NFoldsOpt = typer.Option(5, "--n-folds", min=2, help="Number of folds (paper: 5).")
EpochsOpt = typer.Option(300, "--epochs", min=1, help="Epochs per fold (paper: 300).")
LrOpt = typer.Option(1e-3, "--lr", help="Adam learning rate (paper: 1e-3).")
SeedOpt = typer.Option(0, "--seed", help="Seed of weights, case order and mirroring.")
BaseChannelsOpt = typer.Option(16, "--base-channels", min=1, help="Channels of the first level, doubled per level.")
LevelsOpt = typer.Option(4, "--levels", min=1, help="Resolution levels of the UNet.")
InputSkipOpt = typer.Option(False, "--input-skip/--no-input-skip", help="Add the post-contrast input's logit before the sigmoid (starts as identity; see README).")
NoMirrorOpt = typer.Option(False, "--no-mirror", help="Disable random mirroring (the paper mirrors all three axes).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16.")
CudnnOpt = typer.Option(True, "--cudnn-benchmark/--no-cudnn-benchmark", help="cuDNN autotuning on CUDA (faster, not bit-reproducible).")
GradClipOpt = typer.Option(None, "--grad-clip", min=0.0, help="Clip the gradient norm to this value (default off, as in the paper).")
GuardOpt = typer.Option(True, "--divergence-guard/--no-divergence-guard", help="Roll a diverged epoch back and halve the learning rate (default on; off = the paper's loop exactly; see README).")
PatchSizeOpt = typer.Option(None, "--patch-size", help="Train on patches: --patch-size Z Y X or --patch-size 64 (a cube), multiples of 2^(levels-1); default: whole volumes (the paper; see README 'Patch training').")
LesionFractionOpt = typer.Option(1 / 3, "--lesion-fraction", min=0.0, max=1.0, help="Share of patches centred on an enhancing voxel (nnU-Net: 1/3).")
PatchesPerEpochOpt = typer.Option(None, "--patches-per-epoch", min=1, help="Patches per epoch (default: training cases x ceil(case voxels / patch voxels)).")
BatchSizeOpt = typer.Option(1, "--batch-size", min=1, help="Patches per step (patch mode; whole volumes use 1, as in the paper).")
EnhancementWeightOpt = typer.Option(0.0, "--enhancement-weight", min=0.0, help="Loss weight 1 + W on enhancing voxels (default 0: the paper's plain MSE).")
EnhancementThresholdOpt = typer.Option(0.2, "--enhancement-threshold", min=0.0, help="T1c minus T1c-low (0-1 scale) above which a voxel counts as enhancing (patch centres, loss weight; 0.2 measured on phantoms, see README).")
ClipPercentilesOpt = typer.Option((1.0, 99.0), "--clip-percentiles", help="Train-set percentiles LOW HIGH that clip each modality before [0, 1] (paper: 1 99; see README 'Clip percentiles').")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores; use 1 on a busy shared machine).")


#: The parameters of `fit` and `fit-phantoms` that make the TrainConfig (passed on by name).
TRAIN_OPTIONS = ("epochs", "learning_rate", "seed", "no_mirror", "base_channels", "levels", "input_skip", "device",
                 "precision", "cudnn_benchmark", "grad_clip", "divergence_guard", "patch_size", "lesion_fraction",
                 "patches_per_epoch", "batch_size", "enhancement_weight", "enhancement_threshold")


def _train_config(progress: str, *, epochs: int, learning_rate: float, seed: int, no_mirror: bool, base_channels: int,
                  levels: int, input_skip: bool, device: str, precision: str, cudnn_benchmark: bool,
                  grad_clip: Optional[float], divergence_guard: bool, patch_size: Optional[list[str]],
                  lesion_fraction: float, patches_per_epoch: Optional[int], batch_size: int,
                  enhancement_weight: float, enhancement_threshold: float) -> Any:
    """The :class:`.trainer.TrainConfig` of the shared training options (one error line if they clash)."""
    from .trainer import TrainConfig

    try:
        sides = [int(v) for value in patch_size or [] for v in str(value).replace(",", " ").split()]
        if len(sides) not in (0, 1, 3):
            raise ValueError(f"--patch-size takes one side (a cube) or three (Z Y X), got {len(sides)}: {sides}")
        patch = (sides[0],) * 3 if len(sides) == 1 else (sides[0], sides[1], sides[2]) if sides else None
        config = TrainConfig(
            epochs=epochs, learning_rate=learning_rate, seed=seed, mirror=not no_mirror,
            network=_network_config(base_channels, levels, input_skip), device=device, precision=precision,
            cudnn_benchmark=cudnn_benchmark, grad_clip=grad_clip, divergence_guard=divergence_guard,
            patch_size=patch, lesion_fraction=lesion_fraction, patches_per_epoch=patches_per_epoch,
            batch_size=batch_size, enhancement_weight=enhancement_weight, enhancement_threshold=enhancement_threshold,
        )
        config.resolved_precision(config.resolved_device())
    except ValueError as exc:
        _fail(str(exc), progress)
    return config


def _epoch_reporter(requested: Sequence[int], epochs: int, progress: str, side_by_side: Optional[dict[int, int]] = None) -> Any:
    """The ``on_epoch`` callback: a JSON ``epoch`` line, or one tqdm line per finished epoch.

    ``side_by_side`` (fold -> epochs done before): the folds train at once (fold jobs), so the
    fraction is the share of all their epochs done; otherwise they train one after another.
    """

    def on_epoch(row: dict[str, Any]) -> None:
        if side_by_side is None:
            done = list(requested).index(row["fold"]) + row["epoch"] / epochs
        else:
            side_by_side[row["fold"]] = row["epoch"]
            done = sum(min(e, epochs) for e in side_by_side.values()) / epochs
        message = (f"fold {row['fold']} epoch {row['epoch']}/{epochs}: train {row['train_loss']:.5f}, val {row['val_loss']:.5f}, "
                   f"PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.4f} ({row['seconds']:.1f} s)")
        if progress == "json":
            _json_line({"stage": "epoch", "fraction": round(done / len(requested), 4), "message": message, "epochs": epochs, **row})
        elif progress == "bar":
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    return on_epoch


def _finish_fit(results: Sequence[Any], out_dir: Path, progress: str, bundle: Optional[Any] = None) -> None:
    summary = ", ".join(f"fold {r.fold}: val PSNR {r.metrics.get('val_psnr', float('nan')):.2f} dB" for r in results)
    if progress == "json":
        _json_line({"stage": "done", "fraction": 1.0, "message": summary, "out_dir": str(out_dir),
                    "folds": [r.fold for r in results], **({"bundle": str(bundle.path)} if bundle is not None else {})})
    elif bundle is not None:
        typer.echo(f"finished {summary}; wrote bundle {bundle.name!r} with folds {bundle.folds} to {bundle.path}", err=True)
    else:
        typer.echo(f"finished {summary}; export with: contrast-amplifier-train export {out_dir} BUNDLE_DIR", err=True)


# Fold jobs (`fit --executor`, fold_jobs.py): where and how each fold's job runs.
ExecutorOpt = typer.Option(None, "--executor", help="Train each fold as its own job through submitit: local (processes on this machine) or slurm (a job array). Default: the folds one after another in this process.")
WaitOpt = typer.Option(True, "--wait/--no-wait", help="With --executor: wait for the fold jobs and export (--bundle-dir), or return once they are submitted (follow them with `status`).")
ParallelOpt = typer.Option(None, "--parallel", min=1, help="Fold jobs training at once (local default: one per visible GPU, else 1; slurm: the array's %N, default all).")
PartitionOpt = typer.Option(None, "--partition", help="SLURM partition of the fold jobs.")
GpusPerJobOpt = typer.Option(None, "--gpus-per-job", min=0, help="SLURM GPUs per fold job (default 1, 0 with --device cpu).")
CpusPerJobOpt = typer.Option(None, "--cpus-per-job", min=1, help="SLURM CPUs per fold job (default 4; also the job's torch threads unless --threads).")
MemOpt = typer.Option(None, "--mem-gb", min=0.1, help="SLURM memory per fold job in GB (default: the partition's).")
JobMinutesOpt = typer.Option(24 * 60, "--job-minutes", min=1, help="Time limit of one fold job; at the limit it is requeued and resumes from its last epoch.")
SlurmOptionOpt = typer.Option(None, "--slurm-option", help="Extra sbatch option KEY=VALUE (repeatable), e.g. --slurm-option account=proj42 --slurm-option qos=long.")
JobSetupOpt = typer.Option(None, "--job-setup", help="Shell line run first in each SLURM job (repeatable), e.g. --job-setup 'module load cuda'.")
BundleDirOpt = typer.Option(None, "--bundle-dir", help="Once every requested fold has finished, export the run's finished folds as a bundle here (as `export` does).")
BundleNameOpt = typer.Option("contrast-amplifier", "--bundle-name", help="Bundle name for --bundle-dir.")


def _executor_settings(progress: str, executor: Optional[str], wait: bool, parallel: Optional[int], **slurm: Any) -> Any:
    """The checked :class:`.fold_jobs.ExecutorSettings` of ``fit``'s options (``None``: train in this process)."""
    from .fold_jobs import ExecutorSettings

    given = [f"--{name.replace('_', '-')}" for name, value in slurm.items() if value not in (None, (), [])]
    if executor is None:
        alone = (["--no-wait"] if not wait else []) + (["--parallel"] if parallel else []) + [g for g in given if g != "--job-minutes"]
        if alone:
            _fail(f"{', '.join(alone)}: only with --executor local or slurm (without it fit trains the folds in this process).", progress)
        return None
    settings = ExecutorSettings(executor, parallel, slurm["partition"], slurm["gpus_per_job"], slurm["cpus_per_job"],
                                slurm["mem_gb"], slurm["job_minutes"], tuple(slurm["slurm_option"] or ()),
                                tuple(slurm["job_setup"] or ()))
    try:
        settings.check()
    except ValueError as exc:
        _fail(str(exc), progress)
    return settings


def _export_after_fit(out_dir: Path, bundle_dir: Optional[Path], name: str, progress: str) -> Optional[Any]:
    """Export the run's finished folds to ``bundle_dir`` (``None``: nothing to do)."""
    if bundle_dir is None:
        return None
    from ContrastAmplifierLib.bundle import BundleError

    from .export import DEFAULT_DESCRIPTION, export_bundle

    try:
        return export_bundle(out_dir, bundle_dir, name=name, description=DEFAULT_DESCRIPTION)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), progress)
    return None


def _fold_results(out_dir: Path, folds: Sequence[int]) -> list[Any]:
    """:class:`.trainer.FoldResult` of finished folds, from their ``done.json`` (trained by fold jobs)."""
    from .export import finished_folds
    from .run_status import FINAL_WEIGHTS_FILE, fold_dir
    from .trainer import FoldResult

    done = finished_folds(out_dir)
    return [FoldResult(k, int(done[k]["epochs"]), fold_dir(out_dir, k) / FINAL_WEIGHTS_FILE, dict(done[k].get("metrics", {})))
            for k in folds if k in done]


def _announce_jobs(submission: Any, settings: Any, out_dir: Path, wait: bool, progress: str) -> None:
    """Say which jobs were submitted or are followed, and how to follow them."""
    from .fold_job import jobs_dir

    jobs = {str(h.fold): h.job_id for h in submission.handles}
    status = f"contrast-amplifier-train status {shlex.quote(str(out_dir))}"
    parts = [f"fold {h.fold} -> job {h.job_id}" + (" (already running)" if h.fold in submission.attached else "")
             for h in submission.handles]
    message = (f"{settings.kind} fold jobs: {', '.join(parts) or 'none'}"
               + (f"; already finished: folds {submission.finished}" if submission.finished else "")
               + f"; logs in {jobs_dir(out_dir)}; follow them with: {status}")
    if progress == "json":
        _json_line({"stage": "submitted", "fraction": 0.0, "message": message, "executor": settings.kind, "jobs": jobs,
                    "finished": submission.finished, "status_command": status, "waiting": wait})
    else:
        typer.echo(message, err=True)


def _fit_with_jobs(cases: Sequence[Any], manifest: Path, out_dir: Path, requested: list[int], settings: Any, wait: bool,
                   progress: str, cancel: CancelToken, job: Any) -> Optional[list[Any]]:
    """Submit (or follow) the fold jobs; with ``wait``, wait for them and return the folds' results."""
    from .fit import check_or_write_plan, make_plan
    from .fold_jobs import stop_local_jobs, submit_folds, wait_for_folds

    check_or_write_plan(out_dir, make_plan(cases, job.n_folds, job.split_seed, job.config, job.simulate_low_dose,
                                           str(manifest), job.percentile_levels))
    submission = submit_folds(job, requested, settings, command=_command_line, device=job.config.device)
    _announce_jobs(submission, settings, out_dir, wait, progress)
    if not wait or not submission.handles:
        return _fold_results(out_dir, requested) if not submission.handles else None
    from .run_status import fold_dir, read_fold_status

    epochs = job.config.epochs
    before = {h.fold: read_fold_status(fold_dir(out_dir, h.fold), h.fold).epochs_done for h in submission.handles}
    on_epoch = _epoch_reporter([h.fold for h in submission.handles], epochs, progress, side_by_side=before)
    report = make_progress(progress)
    try:
        outcome = wait_for_folds(out_dir, submission.handles, epochs, report, cancel, on_epoch)
    except (Cancelled, KeyboardInterrupt):
        getattr(report, "close", lambda: None)()
        if settings.kind == "local":
            stop_local_jobs(submission.handles)
            _cancelled(progress, "stopped the fold jobs; " + RESUME_MESSAGE.split("; ", 1)[1])
        _cancelled(progress, f"stopped waiting; the SLURM jobs keep running (stop them with: scancel "
                             f"{' '.join(h.job_id for h in submission.handles)}); follow them with: contrast-amplifier-train "
                             f"status {shlex.quote(str(out_dir))}, or rerun the same command to wait again")
    getattr(report, "close", lambda: None)()
    failed = [h for h in submission.handles if outcome.get(h.fold)]
    if failed:
        resume = _command_line or f"contrast-amplifier-train fit ... {out_dir} --executor {settings.kind}"
        _fail("; ".join(f"fold {h.fold} (job {h.job_id}) failed: {outcome[h.fold]} (log: {h.record.get('stderr')})" for h in failed)
              + f". Finished epochs are kept; to resume, rerun: {resume}", progress, code=1)
    return _fold_results(out_dir, requested)


@app.command()
def fit(
    manifest: Path = typer.Argument(..., help="Cohort: manifest CSV, a folder of case folders, or a folder of cached *.npz cases."),
    out_dir: Path = typer.Argument(..., help="Run folder (plan, cache, fold_K/ checkpoints and logs). Rerun to resume."),
    folds: Optional[list[str]] = FoldsOpt,
    n_folds: int = NFoldsOpt,
    epochs: int = EpochsOpt,
    learning_rate: float = LrOpt,
    seed: int = SeedOpt,
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the patient-wise fold split."),
    base_channels: int = BaseChannelsOpt,
    levels: int = LevelsOpt,
    input_skip: bool = InputSkipOpt,
    no_mirror: bool = NoMirrorOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cudnn_benchmark: bool = CudnnOpt,
    grad_clip: Optional[float] = GradClipOpt,
    divergence_guard: bool = GuardOpt,
    patch_size: Optional[list[str]] = PatchSizeOpt,
    lesion_fraction: float = LesionFractionOpt,
    patches_per_epoch: Optional[int] = PatchesPerEpochOpt,
    batch_size: int = BatchSizeOpt,
    enhancement_weight: float = EnhancementWeightOpt,
    enhancement_threshold: float = EnhancementThresholdOpt,
    spacing: float = SpacingOpt,
    crop: tuple[int, int, int] = CropOpt,
    clip_percentiles: tuple[float, float] = ClipPercentilesOpt,
    simulate_low_dose: bool = typer.Option(False, "--simulate-low-dose", help="Synthesise T1c-low from T1 and T1c (approximation; see README)."),
    skull_strip: str = typer.Option("fast", "--skull-strip", help="HD-BET mode for preprocessing: fast or accurate."),
    threads: Optional[int] = ThreadsOpt,
    executor: Optional[str] = ExecutorOpt,
    wait: bool = WaitOpt,
    parallel: Optional[int] = ParallelOpt,
    partition: Optional[str] = PartitionOpt,
    gpus_per_job: Optional[int] = GpusPerJobOpt,
    cpus_per_job: Optional[int] = CpusPerJobOpt,
    mem_gb: Optional[float] = MemOpt,
    job_minutes: int = JobMinutesOpt,
    slurm_option: Optional[list[str]] = SlurmOptionOpt,
    job_setup: Optional[list[str]] = JobSetupOpt,
    bundle_dir: Optional[Path] = BundleDirOpt,
    bundle_name: str = BundleNameOpt,
    progress: str = ProgressOpt,
) -> None:
    """Train one network per fold (Adam 1e-3, batch 1, MSE, random mirroring), resuming if OUT_DIR has a run."""
    from .cache import prepare_cases
    from .fit import PlanMismatchError, fit_cases, requested_folds

    fold_list = _parse_folds(folds)
    settings = _executor_settings(progress, executor, wait, parallel, partition=partition, gpus_per_job=gpus_per_job,
                                  cpus_per_job=cpus_per_job, mem_gb=mem_gb, job_minutes=job_minutes,
                                  slurm_option=slurm_option, job_setup=job_setup)
    config = _train_config(progress, **{name: value for name, value in locals().items() if name in TRAIN_OPTIONS})
    if bundle_dir is not None:
        from ContrastAmplifierCommon.outputs import check_output_folder

        if not wait:
            _fail("--bundle-dir exports once the folds are done, which --no-wait does not wait for: drop one of them "
                  "(rerun with --bundle-dir and without --no-wait to wait and export, or use `export` later).", progress)

        try:  # before any training: a bundle folder that cannot be written fails now, not after days
            check_output_folder(bundle_dir, ["bundle.json"], inputs=[manifest, out_dir / "cache"], overwrite=True, what="bundle folder")
        except ValueError as exc:
            _fail(str(exc), progress)
    _set_threads(threads)
    cancel = CancelToken()
    _install_sigterm(cancel)
    report = make_progress(progress) if settings is None else None
    on_epoch = _epoch_reporter(fold_list if fold_list is not None else list(range(n_folds)), epochs, progress)
    try:
        requested = requested_folds(fold_list, n_folds)
        _refuse_folds_with_live_jobs(out_dir, requested, settings)
        cases = prepare_cases(manifest, out_dir / "cache", spacing=(spacing,) * 3, crop_size=tuple(crop),
                              simulate_low_dose=simulate_low_dose, skull_strip=skull_strip,
                              device="cpu" if config.resolved_device().type != "cuda" else "cuda",
                              progress=report, cancel=cancel)
        if settings is not None:
            from .fold_job import FoldJob

            cache_dir = manifest if manifest.is_dir() and any(manifest.glob("*.npz")) else out_dir / "cache"
            job = FoldJob(str(out_dir.resolve()), str(cache_dir.resolve()), n_folds, split_seed, config, simulate_low_dose,
                          str(manifest), (float(clip_percentiles[0]), float(clip_percentiles[1])), threads)
            results = _fit_with_jobs(cases, manifest, out_dir, requested, settings, wait, progress, cancel, job)
        else:
            results = fit_cases(cases, out_dir, folds=fold_list, n_folds=n_folds, split_seed=split_seed, config=config,
                                simulate_low_dose=simulate_low_dose, source=str(manifest), progress=report,
                                cancel=cancel, on_epoch=on_epoch, percentile_levels=clip_percentiles)
    except Cancelled:
        getattr(report, "close", lambda: None)()
        _cancelled(progress)
    except (PlanMismatchError, ValueError, FileNotFoundError) as exc:
        getattr(report, "close", lambda: None)()
        _fail(str(exc), progress)
    getattr(report, "close", lambda: None)()
    if results is None:  # --no-wait: the "submitted" line was the last
        return
    _finish_fit(results, out_dir, progress, _export_after_fit(out_dir, bundle_dir, bundle_name, progress))


def _refuse_folds_with_live_jobs(out_dir: Path, folds: Sequence[int], settings: Any) -> None:
    """The serial fit must not train a fold that a fold job is training (``fit --executor`` attaches instead)."""
    if settings is not None:
        return
    from .fold_jobs import live_jobs

    live = live_jobs(out_dir, folds)
    if live:
        raise ValueError(f"folds {sorted(live)} of {out_dir} are being trained by fold jobs ({', '.join(f'fold {k}: job {j}' for k, j in sorted(live.items()))}); "
                         f"follow them with `contrast-amplifier-train status {out_dir}` or wait for them with the same "
                         "command and --executor.")


@app.command("fit-phantoms")
def fit_phantoms_command(
    out_dir: Path = typer.Argument(..., help="Run folder (plan, phantoms/ caches, fold_K/ checkpoints and logs). Rerun to resume."),
    first_seed: int = typer.Option(770_000, "--first-seed", min=0, help="Phantom seed of fold 0's first case; fold K starts at FIRST + K x CASES."),
    cases: int = typer.Option(2000, "--cases", min=1, help="Distinct phantom seeds per fold's stream."),
    val_seeds: str = typer.Option("790000-790003", "--val-seeds", help="Held-out validation phantoms FIRST-LAST (inclusive), outside every stream."),
    lesions: str = typer.Option("small", "--lesions", help="Phantom lesion profile: small (70 % under 10 mm) or default."),
    protocol: str = typer.Option("paper", "--protocol", help="Phantom acquisition protocol: paper or clinical."),
    walk: int = typer.Option(8, "--walk", min=1, help="Patches taken from each case before the next one (patch mode)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes making phantom cases ahead of the trainer."),
    keep_cases: Optional[int] = typer.Option(None, "--keep-cases", min=1, help="Cached cases kept on disk per stream (oldest deleted; default all)."),
    folds: Optional[list[str]] = FoldsOpt,
    n_folds: int = NFoldsOpt,
    epochs: int = EpochsOpt,
    learning_rate: float = LrOpt,
    seed: int = SeedOpt,
    base_channels: int = BaseChannelsOpt,
    levels: int = LevelsOpt,
    input_skip: bool = InputSkipOpt,
    no_mirror: bool = NoMirrorOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cudnn_benchmark: bool = CudnnOpt,
    grad_clip: Optional[float] = GradClipOpt,
    divergence_guard: bool = GuardOpt,
    patch_size: Optional[list[str]] = PatchSizeOpt,
    lesion_fraction: float = LesionFractionOpt,
    patches_per_epoch: Optional[int] = PatchesPerEpochOpt,
    batch_size: int = BatchSizeOpt,
    enhancement_weight: float = EnhancementWeightOpt,
    enhancement_threshold: float = EnhancementThresholdOpt,
    spacing: float = SpacingOpt,
    crop: tuple[int, int, int] = CropOpt,
    clip_percentiles: tuple[float, float] = ClipPercentilesOpt,
    threads: Optional[int] = ThreadsOpt,
    progress: str = ProgressOpt,
) -> None:
    """Train the folds on phantoms made while training runs: each fold its own seed stream (not in the paper; see README)."""
    from ContrastAmplifierLib.phantom_lesions import LESION_PROFILES

    from .fit import PlanMismatchError
    from .onthefly import PhantomSourceError, PhantomSourceSettings
    from .phantom_eval import parse_seed_range
    from .phantom_fit import fit_phantoms

    fold_list = _parse_folds(folds)
    try:
        validation = parse_seed_range(val_seeds, option="--val-seeds")
        if lesions not in LESION_PROFILES:
            raise ValueError(f"--lesions {lesions!r} is not a phantom lesion profile; choose one of {', '.join(sorted(LESION_PROFILES))}.")
        if protocol not in ("paper", "clinical"):
            raise ValueError(f"--protocol {protocol!r}: choose paper or clinical.")
    except ValueError as exc:
        _fail(str(exc), progress)
    config = _train_config(progress, **{name: value for name, value in locals().items() if name in TRAIN_OPTIONS})
    _set_threads(threads)
    cancel = CancelToken()
    _install_sigterm(cancel)
    report = make_progress(progress)
    on_epoch = _epoch_reporter(fold_list if fold_list is not None else list(range(n_folds)), epochs, progress)
    settings = PhantomSourceSettings(first_seed=first_seed, cases=cases, spacing=spacing, crop_size=(crop[0], crop[1], crop[2]),
                                     lesions=lesions, protocol=protocol)
    try:
        results = fit_phantoms(out_dir, settings, val_seed=validation[0], val_cases=len(validation), config=config,
                               folds=fold_list, n_folds=n_folds, walk=walk, workers=workers, keep_cases=keep_cases,
                               progress=report, cancel=cancel, on_epoch=on_epoch, percentile_levels=clip_percentiles,
                               command=_command_line)
    except Cancelled:
        getattr(report, "close", lambda: None)()
        _cancelled(progress)
    except (PlanMismatchError, PhantomSourceError, ValueError, FileNotFoundError) as exc:
        getattr(report, "close", lambda: None)()
        _fail(str(exc), progress)
    getattr(report, "close", lambda: None)()
    _finish_fit(results, out_dir, progress)


@app.command()
def export(
    out_dir: Path = typer.Argument(..., help="Run folder written by fit."),
    bundle_dir: Path = typer.Argument(..., help="Bundle folder to write (bundle.json + fold<K>.safetensors)."),
    folds: Optional[list[str]] = typer.Option(None, "--folds", help="Folds to include (default: every finished fold)."),
    name: str = typer.Option("contrast-amplifier", "--name", help="Bundle name in the model registry."),
    version: str = typer.Option("1.0.0", "--version", help="Bundle version."),
    description: Optional[str] = typer.Option(None, "--description", help="One-paragraph description."),
    intended_use: str = typer.Option("research only - not for clinical use", "--intended-use", help="Intended use statement."),
    training_data: Optional[str] = typer.Option(None, "--training-data", help="Cohort description (default: counts and source)."),
    unfinished: bool = typer.Option(False, "--unfinished", help="Also export folds still training, from their latest checkpoint (bundle.json says so)."),
) -> None:
    """Write a model bundle (SHA-256 per file, validated bundle.json) from a finished run."""
    from ContrastAmplifierLib.bundle import BundleError

    from .export import DEFAULT_DESCRIPTION, export_bundle

    try:
        bundle = export_bundle(out_dir, bundle_dir, folds=_parse_folds(folds), name=name, version=version,
                               description=DEFAULT_DESCRIPTION if description is None else description,
                               intended_use=intended_use, training_data=training_data, unfinished=unfinished)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), "bar")
    typer.echo(f"wrote bundle {bundle.name!r} with folds {bundle.folds} to {bundle.path}")


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="Run folder of fit (with or without --executor)."),
    progress: str = typer.Option("bar", "--progress", help="bar or none (lines on stdout), or json (one JSON object per fold, then a done line)."),
) -> None:
    """Where each fold of a run stands: epochs done, last validation metrics, and its job (fit --executor)."""
    from .fold_jobs import fold_job_status
    from .run_status import FINISHED, has_run

    if not has_run(run_dir):
        _fail(f"{run_dir} holds no run (no plan.json): give the OUT_DIR of `contrast-amplifier-train fit`.", progress)
    folds = fold_job_status(run_dir)
    total = sum(f.epochs or f.progress.epochs or 0 for f in folds)
    done = sum(min(f.progress.epochs_done, f.epochs or f.progress.epochs or 0) for f in folds)
    finished = [f.progress.fold for f in folds if f.progress.state == FINISHED]
    summary = f"{len(finished)}/{len(folds)} folds finished" + (f", {done}/{total} epochs" if total else "")
    if any(f.record.get("executor") == "slurm" and f.job_state.startswith("unknown") for f in folds):
        summary += " (no sacct here: SLURM job states unknown, progress read from the fold folders)"
    for fold in folds:
        p = fold.progress
        if progress == "json":
            _json_line({"stage": "fold", "fraction": round(p.epochs_done / fold.epochs, 4) if fold.epochs else 0.0,
                        "message": fold.line(), "fold": p.fold, "epochs_done": p.epochs_done, "epochs": fold.epochs,
                        "state": p.state, "train_loss": p.train_loss, "val_loss": p.val_loss, "val_psnr": p.val_psnr,
                        "val_ssim": p.val_ssim, "executor": fold.record.get("executor"), "job_id": fold.record.get("job_id"),
                        "job_state": fold.job_state or None, "attempts": len(fold.attempts), "log": fold.record.get("stderr")})
        else:
            typer.echo(fold.line())
    if progress == "json":
        _json_line({"stage": "done", "fraction": round(done / total, 4) if total else 0.0, "message": summary,
                    "run_dir": str(run_dir), "finished": finished})
    else:
        typer.echo(summary)


@app.command()
def bench(
    out_dir: Path = typer.Argument(Path("bench-output"), help="Where training.json is written."),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads."),
) -> None:
    """Training throughput: seconds per iteration (one case: forward, MSE, backward, Adam) at demo and paper size."""
    import json

    from ContrastAmplifierCommon.atomicfile import write_text_atomic

    from .bench import run_training_bench

    _set_threads(threads)
    results = run_training_bench(("cpu", "cuda"))
    for name, row in results.items():
        typer.echo(f"training {name}: {row['seconds_per_iteration']:.2f} s per iteration ({int(row['parameters']):,} parameters)")
    write_text_atomic(json.dumps(results, indent=2), Path(out_dir) / "training.json")


@app.command("demo-model")
def demo_model(
    work_dir: Path = typer.Argument(Path("build/demo-model"), help="Working folder (phantoms, cache, run); reused to resume."),
    bundle_dir: Path = typer.Option(Path("ContrastAmplifier/Resources/Models/phantom-demo"), "--bundle-dir", help="Where the demo bundle is written."),
    cases: int = typer.Option(20, "--cases", min=5, help="Training phantom cases."),
    eval_cases: int = typer.Option(4, "--eval-cases", min=1, help="Held-out phantom cases for the evaluation."),
    spacing: float = typer.Option(3.0, "--spacing", help="Atlas spacing in mm (phantoms are generated at this spacing too)."),
    crop: tuple[int, int, int] = typer.Option((56, 64, 56), "--crop", help="Crop size x y z in voxels."),
    base_channels: int = typer.Option(8, "--base-channels", min=1, help="UNet base channels."),
    levels: int = typer.Option(4, "--levels", min=1, help="UNet levels."),
    input_skip: bool = typer.Option(True, "--input-skip/--no-input-skip", help="Post-contrast input skip (starts as identity; without it 150 epochs at 4 mm did not beat the identity baseline)."),
    folds: Optional[list[int]] = typer.Option(None, "--folds", help="Train only these folds (to run folds side by side); the bundle is exported once all five exist."),
    epochs: int = typer.Option(40, "--epochs", min=1, help="Epochs per fold."),
    clip_percentiles: tuple[float, float] = typer.Option((1.0, 99.0), "--clip-percentiles", help="Train-set percentiles LOW HIGH that clip each modality (paper: 1 99; the shipped demo uses 1 99.99, see README)."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", min=0.0, help="Clip the gradient norm (default off, as in the paper)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores; use 1 on a busy shared machine)."),
    progress: str = ProgressOpt,
) -> None:
    """Train the synthetic-phantom demo ensemble and evaluate it against identity and linear baselines."""
    from .demo_model import build_demo_model

    _set_threads(threads)
    cancel = CancelToken()
    _install_sigterm(cancel)
    report = make_progress(progress)
    try:
        bundle, metrics = build_demo_model(work_dir, bundle_dir, cases=cases, eval_cases=eval_cases, spacing=spacing,
                                           crop_size=crop, base_channels=base_channels, levels=levels, epochs=epochs,
                                           input_skip=input_skip, folds=folds, seed=seed, device=device, progress=report, cancel=cancel,
                                           percentile_levels=clip_percentiles, grad_clip=grad_clip, precision=precision)
    except Cancelled:
        _cancelled(progress)
    getattr(report, "close", lambda: None)()
    if bundle is None:
        typer.echo(f"folds {folds} trained in {work_dir}; run the same command without --folds to export and evaluate the bundle")
        return
    lines = [f"{method:12s} NRMSE {m['nrmse']:.4f}  PSNR {m['psnr']:.2f} dB" for method, m in metrics.items()]
    typer.echo(f"bundle {bundle.path}; held-out phantoms (T1c-low -> T1c):\n" + "\n".join(lines))


@app.command("evaluate")
def evaluate(
    bundle: str = typer.Argument(..., help="Model bundle: a bundle folder or a registry name (e.g. ContrastAmplifier/Resources/Models/phantom-demo)."),
    out_dir: Path = typer.Argument(..., help="Receives lesions.csv, cases.csv, summary.md, evaluation.json, evaluation.png (and cases/ with --phantom-seeds, kept and reused)."),
    phantom_seeds: Optional[str] = typer.Option(None, "--phantom-seeds", help="Phantom seeds FIRST-LAST (inclusive, e.g. 730000-730019), generated into OUT_DIR/cases/seed_N."),
    cohort: Optional[Path] = typer.Option(None, "--cohort", help="Instead of --phantom-seeds: a folder of case folders with t1, flair, adc, t1c, t1c_x4, lesion_labels and brain_mask (what `contrast-amplifier phantom` writes)."),
    spacing: float = typer.Option(1.0, "--spacing", help="Phantom spacing in mm (--phantom-seeds; the clinical protocol's voxel floor)."),
    protocol: str = typer.Option("paper", "--protocol", help="Phantom acquisition protocol (--phantom-seeds): paper or clinical."),
    hdbet: bool = typer.Option(False, "--hdbet", help="Skull-strip with HD-BET as in production (default: the case's own brain_mask.nii.gz)."),
    folds: Optional[list[str]] = typer.Option(None, "--folds", help="Fold models to average (default: all of the bundle's)."),
    flips: int = typer.Option(8, "--flips", help="Mirrorings per fold: 8 (paper), or 1, 2, 4 for a quicker look."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace this command's own output files in OUT_DIR (phantom cases there are always reused)."),
    record: bool = typer.Option(False, "--record", help="Also record the summary in BUNDLE's bundle.json (key `evaluation`), replacing an earlier one made with the same seeds/cohort and settings."),
    progress: str = ProgressOpt,
) -> None:
    """Evaluate a bundle on phantoms with known lesions: CNR/LBR/CEP per lesion and size band, PSNR/SSIM, false enhancement."""
    from .phantom_eval import AmplifySettings, check_arguments, parse_seed_range, run_evaluation

    fold_list = _parse_folds(folds)
    try:
        seeds = None if phantom_seeds is None else parse_seed_range(phantom_seeds)
        check_arguments(seeds, cohort, spacing, protocol)
    except ValueError as exc:
        _fail(str(exc), progress)
    cancel = CancelToken()
    _install_sigterm(cancel)
    report = make_progress(progress)
    try:
        settings = AmplifySettings(hdbet=hdbet, flips=flips, folds=fold_list, device=device, threads=threads)
        result = run_evaluation(bundle, out_dir, seeds=seeds, cohort=cohort, spacing=spacing, protocol=protocol,
                                settings=settings, overwrite=overwrite, record=record, progress=report, cancel=cancel)
    except Cancelled:
        getattr(report, "close", lambda: None)()
        if progress == "json":
            _json_line({"stage": "cancelled", "fraction": 0.0, "message": "cancelled; no evaluation output was written"})
        cancelled("cancelled; no evaluation output was written (generated phantom cases in OUT_DIR/cases are kept)")
    except (ValueError, FileNotFoundError) as exc:
        getattr(report, "close", lambda: None)()
        _fail(str(exc), progress)
    getattr(report, "close", lambda: None)()
    summary = (out_dir / "summary.md").read_text(encoding="utf-8")
    recorded = Path(result["bundle"]["path"]) / "bundle.json" if record else None
    if progress == "json":
        _json_line({"stage": "done", "fraction": 1.0, "message": f"wrote {out_dir / 'summary.md'}", "out_dir": str(out_dir),
                    **({"recorded": str(recorded)} if recorded is not None else {})})
    typer.echo(summary, err=progress == "json")
    if recorded is not None:
        typer.echo(f"recorded the summary in {recorded} (key `evaluation`)", err=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``contrast-amplifier-train``)."""
    global _command_line
    raw = list(sys.argv[1:] if argv is None else argv)
    _command_line = "contrast-amplifier-train " + shlex.join(raw)
    args = expand_multi_value_options(raw)
    # SIGTERM is the commands' own (it sets their cancel flag); Ctrl-C elsewhere prints one line.
    run_cli(app, args, prog_name="contrast-amplifier-train", sigterm_as_interrupt=False, cancelled_message=RESUME_MESSAGE)


if __name__ == "__main__":
    main()
