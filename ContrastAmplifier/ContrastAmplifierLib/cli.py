"""``contrast-amplifier`` command line: one verb per pipeline stage (nnU-Net style).

Heavy imports (torch, SimpleITK pipelines, HD-BET) happen inside the commands, so ``--help``
stays instant and the Slicer module can probe the CLI cheaply.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ContrastAmplifierCommon.cliapp import cli_job, fail, run_cli
from ContrastAmplifierCommon.progress import make_progress

from .cli_options import BackendOpt, PrecisionOpt
from .pacs_cli import pacs_app

if TYPE_CHECKING:  # preprocessing imports SimpleITK: only inside the commands, so --help stays instant
    from .preprocessing import Geometry

app = typer.Typer(
    name="contrast-amplifier",
    help="Amplify gadolinium contrast on brain MRI (Bone, Ammari et al. 2022): phantom, preprocess, demo, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ProgressOpt = typer.Option("bar", "--progress", help="bar (tqdm on stderr), json (one JSON object per line on stdout, read by Slicer) or none.")


@app.command()
def phantom(
    out_dir: Path = typer.Argument(..., help="Folder that receives case_NNN/ sub-folders."),
    cases: int = typer.Option(1, "--cases", min=1, help="Number of cases."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first case; case i uses seed + i. Same seed, same bytes."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Isotropic spacing (mm) of the T1/T1c grids; default 1 mm. Coarser = faster, for tests."),
    size: Optional[tuple[int, int, int]] = typer.Option(None, "--size", help="T1c grid size in voxels (x y z); default covers the head at --spacing."),
    field_strength: float = typer.Option(1.5, "--field-strength", help="1.5 or 3 (tesla): picks relaxation times and Table 1 sequence parameters."),
    protocol: str = typer.Option("paper", "--protocol", help="paper (default: the paper's 3D research protocol) or clinical (2D 4-6 mm slices, oblique stacks, own FOV per sequence, motion, distorted EPI ADC, scanner storage; --spacing is then a floor on every voxel size)."),
    t1c_acquisition: Optional[str] = typer.Option(None, "--t1c-acquisition", help="clinical protocol: auto (drawn from the seed, the default), 2d or 3d T1c."),
    lesions: str = typer.Option("default", "--lesions", help="Lesion profile: default (PHANTOM.md's mix) or small (for training: more metastases, 70% under 10 mm)."),
    progress: str = ProgressOpt,
) -> None:
    """Generate synthetic brain phantom cases (physics-based; for tests, demos and benchmarks only)."""
    from .phantom import generate_cohort
    from .phantom_clinical import ClinicalOptions

    report = make_progress(progress)
    with cli_job(report, "cancelled; finished cases are kept, the unfinished one was removed"):
        clinical = None if t1c_acquisition is None else ClinicalOptions(t1c_acquisition=t1c_acquisition)
        paths = generate_cohort(
            out_dir, cases=cases, seed=seed, spacing=spacing,
            size=size,
            field_strength=field_strength, progress=report,
            protocol=protocol, clinical=clinical, lesions=lesions,
        )
    for path in paths:
        typer.echo(str(path), err=progress == "json")


StrictOpt = typer.Option(False, "--strict", help="Plausibility warnings (not a brain, modalities that do not overlap, implausible motion or intensities) become errors. See README.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace this command's own output files where they already exist (nothing else is ever touched).")


@app.command()
def preprocess(
    case_dir: Path = typer.Argument(..., help="Folder with t1, flair, adc and t1c images (NIfTI/NRRD/MHA or DICOM sub-folders)."),
    out_dir: Path = typer.Argument(..., help="Output folder (new, or existing: only this command's files are written there)."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Atlas-space voxel spacing in mm; default 1 mm (paper). Not with --model."),
    crop: Optional[tuple[int, int, int]] = typer.Option(None, "--crop", help="Centre-crop size in voxels, x y z; default 160 192 160 (paper). Not with --model."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry name or bundle folder: use its spacing, crop and clip percentiles, i.e. exactly what `predict --model` feeds that network."),
    skull_strip: str = typer.Option("fast", "--skull-strip", help="HD-BET mode: fast (CPU default) or accurate (GPU, with mirroring)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (HD-BET)."),
    backend: str = BackendOpt,
    qc: bool = typer.Option(False, "--qc", help="Also write qc.png: mid slices of each registered modality with the template brain outline."),
    overwrite: bool = OverwriteOpt,
    strict: bool = StrictOpt,
    progress: str = ProgressOpt,
) -> None:
    """Run the paper's preprocessing on one case: skull-strip, register to ICBM 2009a, resample, crop, normalise."""
    from .preprocessing import preprocess_case_dir

    report = _WithWarnings(make_progress(progress), progress)
    with cli_job(report, "cancelled; nothing was written"):
        geometry = _preprocess_geometry(model, spacing, crop)
        result = preprocess_case_dir(
            case_dir, out_dir, geometry,
            skull_strip_mode=skull_strip, device=device, qc=qc, progress=report, overwrite=overwrite, strict=strict,
            backend=backend,
        )
    typer.echo(f"wrote {out_dir} ({result.timings_s.get('total', float('nan')):.1f} s)", err=progress == "json")
    _check_registration_line(result.findings, "qc.png (--qc) and preprocess.json" if qc else "preprocess.json")


def _check_registration_line(findings, where: str) -> None:
    """A red ``CHECK REGISTRATION`` line on stderr naming the modalities whose registration looks wrong."""
    from .imageio import display_name
    from .plausibility import suspect_modalities

    suspect = suspect_modalities(findings)
    if suspect:
        typer.secho(f"CHECK REGISTRATION: {', '.join(display_name(m) for m in suspect)} may be misaligned with the T1c "
                    f"(see the warnings above and {where}).", err=True, fg=typer.colors.RED)


def _preprocess_geometry(model: Optional[str], spacing: Optional[float], crop: Optional[tuple[int, int, int]]) -> Geometry:
    """The geometry of ``preprocess``: the bundle's with ``--model``, else ``--spacing``/``--crop`` over the paper's.

    Args:
        model: registry name or bundle folder (``registry.resolve_model``), or ``None``.
        spacing: isotropic atlas spacing in mm (``None``: :class:`Geometry`'s default, 1 mm).
        crop: centre-crop size x y z (``None``: :class:`Geometry`'s default, 160 x 192 x 160).

    Raises:
        ValueError: ``--model`` together with ``--spacing`` or ``--crop``.
        BundleError: the model is not installed or fails its checks (the message says which and the fix).
    """
    from .preprocessing import Geometry

    if model is None:
        paper = Geometry()
        return Geometry(spacing=paper.spacing if spacing is None else (spacing,) * 3,
                        crop_size=paper.crop_size if crop is None else crop)
    given = [name for name, value in (("--spacing", spacing), ("--crop", crop)) if value is not None]
    if given:
        raise ValueError(f"--model {model} sets the spacing, crop and clip percentiles from the bundle; "
                         f"drop {' and '.join(given)}, or drop --model to choose the geometry yourself.")
    from .registry import resolve_model

    return resolve_model(model).geometry()


class _WithWarnings:
    """Show plausibility warnings (progress stage ``warning``) as ``warning:`` lines on stderr.

    With ``--progress json`` they also stay in the JSON stream, where the Slicer module reads them.
    ``close`` is the wrapped reporter's, so :func:`cli_job` closes the bar.
    """

    def __init__(self, report, progress: str) -> None:
        self.report = report
        self.progress = progress
        self.bar = getattr(report, "bar", None)
        self.close = getattr(report, "close", lambda: None)

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if stage == "warning":
            line = typer.style(f"warning: {message}", fg=typer.colors.YELLOW)
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)  # above the progress bar, not through it
            else:
                typer.echo(line, err=True)
            if self.progress != "json":
                return
        self.report(stage, fraction, message)


@app.command()
def demo(
    out_dir: Path = typer.Argument(Path("demo-output"), help="Where the demo writes its case, T1c-pro, demo.png and demo.json."),
    spacing: float = typer.Option(1.0, "--spacing", help="Phantom spacing in mm."),
    seed: int = typer.Option(20260, "--seed", help="Phantom seed (the demo's own; the demo model was trained on other seeds)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry name or bundle folder (default: the default model, the shipped demo unless set with `models set-default`)."),
    flips: int = typer.Option(8, "--flips", help="Mirrorings per fold (paper: 8)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
) -> None:
    """End-to-end demo on a synthetic phantom case: T1c-pro, a figure, and CNR/LBR of T1c vs T1c-pro."""
    from .demo import run_demo

    try:
        run_demo(out_dir, spacing=spacing, seed=seed, model=model, flips=flips, device=device)
    except ValueError as exc:
        fail(str(exc))


@app.command()
def bench(
    out_dir: Path = typer.Argument(Path("bench-output"), help="Where the bench writes its phantom case and results.json."),
    ants_python: Optional[Path] = typer.Option(None, "--ants-python", help="Python of a separate venv with antspyx, for the ANTs peer timings."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Phantom spacing in mm (default 1 mm: the paper's atlas resolution; registration bench: 3 mm, 0 = the clinical protocol's native voxels)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for every measurement."),
    only: Optional[str] = typer.Option(None, "--only", help="preprocessing, registration, inference, end-to-end or cohort (8 phantoms at 3 mm, serial vs --cluster local:2; needs dask) (default: all)."),
    device: str = typer.Option("cpu", "--device", help="Device of the inference bench: cpu or cuda (end-to-end and preprocessing stay on the CPU)."),
    cases: int = typer.Option(20, "--cases", min=1, help="Registration bench: clinical-protocol phantom cases (kept in OUT_DIR for the next run)."),
    hdbet: bool = typer.Option(False, "--hdbet", help="Registration bench: also run HD-BET on every case's T1c (Dice vs the phantom's brain mask; ~30 s a case on the CPU)."),
) -> None:
    """Benchmarks (ratios within one run; this machine is shared and noisy); writes OUT_DIR/*.json."""
    import json

    from ContrastAmplifierCommon.atomicfile import write_text_atomic

    if only not in (None, "preprocessing", "registration", "inference", "end-to-end", "cohort"):
        fail(f"--only {only}: use preprocessing, registration, inference, end-to-end or cohort")
    results = {}
    if only in (None, "registration"):
        from .bench import run_registration_bench

        clinical_spacing = 3.0 if spacing is None else (None if spacing == 0 else spacing)
        results["registration"] = run_registration_bench(out_dir, cases=cases, spacing=clinical_spacing,
                                                         ants_python=ants_python, threads=threads, hdbet=hdbet)
    spacing = 1.0 if spacing is None else spacing
    if only in (None, "preprocessing"):
        from .bench import run_bench

        results["preprocessing"] = run_bench(out_dir, ants_python=ants_python, spacing=spacing, threads=threads)
    from .registry import list_models

    shipped = [e for e in list_models() if e.source == "builtin"]
    bundle_dir = shipped[0].path if shipped else None
    if only in (None, "inference", "end-to-end"):
        from .bench_inference import run_end_to_end_bench, run_inference_bench

        if only in (None, "inference"):
            results["inference"] = run_inference_bench(out_dir, threads=threads, bundle_dir=bundle_dir, device=device)
        if only in (None, "end-to-end") and bundle_dir is not None:
            results["end_to_end"] = run_end_to_end_bench(out_dir, bundle_dir, spacing=spacing, threads=threads)
    if only in (None, "cohort") and bundle_dir is not None:
        from .bench_cohort import run_cohort_bench
        from .cluster import ClusterError, require_dask

        try:
            require_dask()
        except ClusterError as exc:  # the other parts' results are still written
            if only == "cohort":
                fail(str(exc))
            typer.secho(f"cohort bench skipped: {exc}", err=True, fg=typer.colors.YELLOW)
        else:
            results["cohort"] = run_cohort_bench(out_dir, bundle_dir, threads=threads)
    write_text_atomic(json.dumps(results, indent=2, default=float), Path(out_dir) / "bench.json")
    typer.echo(f"wrote {Path(out_dir) / 'bench.json'}")


QUALITY_HELP = "Mirrorings per fold: 8 (paper), or 1, 2, 4 for a quicker look."
SEND_HELP = ("Then send the --out-dicom series to this PACS: a URL (https://host:port/dicom-web or "
             "dicom://CALLED_AET@host:port) or an endpoint name of the PACS config file (`contrast-amplifier pacs "
             "endpoints`). Checked before any work; prints 'sent N of M'; exit 1 unless the PACS acknowledged every instance.")
PACS_CONFIG_HELP = "PACS config file for --send (default: $CA_PACS_CONFIG, else pacs.toml/pacs.json in the user config folder)."
OUT_DICOM_HELP = ("Also write T1c-pro as a DICOM MR series (one file per T1c slice) into this new or empty folder: a new "
                  "series of the T1c's study when --t1c is a DICOM series folder, else a new de-identified study. "
                  "Checked before any work. See README, DICOM output.")
MappingOpt = typer.Option("auto", "--mapping", help="How T1c-pro returns to the T1c grid: auto, direct (the prediction itself) or residual (the T1c plus the network's change; keeps the T1c's resolution). See README.")
CompileOpt = typer.Option(None, "--compile/--no-compile", help="torch.compile each fold model (~1.3x faster per prediction on CPU, seconds to compile). Default: on for CPU at 1 mm sizes, off otherwise (see README).")


@app.command()
def predict(
    t1: Path = typer.Option(..., "--t1", help="Pre-contrast T1 (file or DICOM folder)."),
    flair: Path = typer.Option(..., "--flair", help="T2-FLAIR."),
    adc: Path = typer.Option(..., "--adc", help="ADC map."),
    t1c: Path = typer.Option(..., "--t1c", help="Routine contrast-enhanced T1 (T1c); T1c-pro is written on its grid."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output T1c-pro file (.nii.gz, .nii, .nrrd, .mha); checked before any work, written atomically. Needed unless --out-dicom is given."),
    out_dicom: Optional[Path] = typer.Option(None, "--out-dicom", help=OUT_DICOM_HELP),
    send: Optional[str] = typer.Option(None, "--send", help=SEND_HELP),
    pacs_config: Optional[Path] = typer.Option(None, "--pacs-config", help=PACS_CONFIG_HELP),
    t1c_dicom: Optional[Path] = typer.Option(None, "--t1c-dicom", help="The DICOM series folder the T1c came from, when --t1c is an exported file (as from Slicer): the --out-dicom series joins its study."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry name or bundle folder (default: the default model; see `models list` / `models set-default`)."),
    folds: Optional[list[int]] = typer.Option(None, "--folds", help="Fold models to average (repeat the option; default: all)."),
    flips: int = typer.Option(8, "--flips", help=QUALITY_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = PrecisionOpt,
    mapping: str = MappingOpt,
    compile_models: Optional[bool] = CompileOpt,
    backend: str = BackendOpt,
    skull_strip: Optional[str] = typer.Option(None, "--skull-strip", help="HD-BET fast or accurate (default: accurate on CUDA, fast on CPU)."),
    brain_mask: Optional[Path] = typer.Option(None, "--brain-mask", help="Brain mask on the T1c grid; skips HD-BET."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file, and an earlier T1c-pro series in the --out-dicom folder."),
    strict: bool = StrictOpt,
    progress: str = ProgressOpt,
) -> None:
    """Amplify one case: T1, T2-FLAIR, ADC and T1c in, T1c-pro out (5 folds x 8 mirrorings by default)."""
    if out is None and out_dicom is None:
        fail("give --out FILE, --out-dicom DIR or both: where T1c-pro goes")
    from .inference import amplify_case

    pacs = _pacs_target(send, pacs_config, out_dicom)
    report = _WithWarnings(make_progress(progress), progress)
    with cli_job(report, "cancelled; no output was written"):
        result = amplify_case(t1, flair, adc, t1c, bundle=model, out_path=out, folds=folds, n_mirrorings=flips,
                              device=device, precision=precision, compile=compile_models, mapping=mapping, skull_strip_mode=skull_strip, brain_mask=brain_mask,
                              threads=threads, progress=report, overwrite=overwrite, strict=strict, out_dicom=out_dicom,
                              t1c_dicom=t1c_dicom, backend=backend)
    written = [str(result.output_path)] if result.output_path is not None else []
    if result.dicom_series is not None:
        series = result.dicom_series
        study = "the T1c's study" if series.from_dicom else "a new de-identified study"
        written.append(f"the DICOM series {series.folder} ({len(series.files)} MR images, {study})")
    typer.echo(f"wrote {' and '.join(written)} ({result.n_predictions} predictions, {result.timings_s['total']:.1f} s)",
               err=progress == "json")
    _check_registration_line(result.preprocessed.findings, "`contrast-amplifier preprocess --qc` on this case")
    if pacs is not None and result.dicom_series is not None:
        _send_written([result.dicom_series.folder], pacs, progress)


def _pacs_target(send: Optional[str], pacs_config: Optional[Path], out_dicom: Optional[Path]):
    """``--send``'s endpoint and retry policy, resolved before any work (a typo fails at once), or None."""
    if send is None:
        if pacs_config is not None:
            fail("--pacs-config goes with --send PACS")
        return None
    if out_dicom is None:
        fail("--send sends the DICOM series: add --out-dicom DIR (T1c-pro files in NIfTI/NRRD/MHA are not DICOM)")
    from .pacs import endpoint_and_policy

    with cli_job(None):
        return endpoint_and_policy(send, pacs_config)


def _send_written(folders: list[Path], pacs, progress: str) -> None:
    """Send the series just written; a refused or unreachable PACS is one error line that keeps them."""
    from .pacs import PacsError, resend_command
    from .pacs_cli import send_and_report

    endpoint, policy = pacs
    try:
        send_and_report(folders, endpoint, policy, err=progress == "json", what="T1c-pro instances")
    except PacsError as exc:
        fail(f"{exc} The T1c-pro series are written; send them later with `{resend_command(folders, endpoint)}`.")


CLUSTER_HELP = ("Run the cases on a Dask cluster: local (one worker per core), local:N (N worker processes; with "
                "CUDA GPUs, one worker per GPU takes the ensembles), tcp://HOST:PORT (a running Dask scheduler) or slurm "
                "(SLURM jobs from --cluster-config, scaled with the queue). Prints the Dask dashboard link. Needs Dask "
                "(the package's cluster extra). See README, Cohorts beyond one machine.")
CLUSTER_CONFIG_HELP = ("YAML or JSON file for --cluster slurm: 'slurm:' (dask-jobqueue SLURMCluster options: queue, "
                       "account, cores, processes, memory, walltime, job_extra_directives, worker_extra_args) and "
                       "'adapt:' (minimum_jobs, maximum_jobs). See README.")
NUM_PARTS_HELP = ("Split the cohort into N parts (round robin over the sorted case folders) and run only --part-id K: "
                  "for an sbatch array, no Dask needed. The summary is then summary-part-K-of-N.csv.")
PART_ID_HELP = "Which part to run, 0 to N-1 (e.g. $SLURM_ARRAY_TASK_ID of sbatch --array=0-(N-1))."
COHORT_THREADS_HELP = ("CPU threads per case (torch and ITK). Default: all cores serially, cores/N with --cluster "
                       "local:N. 1 makes every run's T1c-pro the same to the bit (see README).")
BRAIN_MASK_NAME_HELP = ("Use the image of this name in each case folder as its brain mask (e.g. brain_mask for "
                        "brain_mask.nii.gz; the file name works too), instead of HD-BET; a case without one fails.")


class _CohortConsole(_WithWarnings):
    """``predict-cohort``'s console: also prints the Dask dashboard's link (stage ``dashboard``) on stderr;
    with ``--progress json`` it stays in the JSON stream too."""

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if stage == "dashboard":
            import importlib.util

            viewer = "" if importlib.util.find_spec("bokeh") else " (`pip install bokeh` to view it)"
            line = f"Dask dashboard: {message}{viewer}"
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                typer.echo(line, err=True)
            if self.progress != "json":
                return
        super().__call__(stage, fraction, message)


@app.command("predict-cohort")
def predict_cohort(
    cases_dir: Path = typer.Argument(..., help="Folder of case folders, each with t1, flair, adc, t1c images."),
    out_dir: Path = typer.Argument(..., help="Receives <case>/T1c-pro.nii.gz and summary.csv."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry name or bundle folder."),
    folds: Optional[list[int]] = typer.Option(None, "--folds", help="Fold models to average (default: all)."),
    flips: int = typer.Option(8, "--flips", help=QUALITY_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = PrecisionOpt,
    mapping: str = MappingOpt,
    compile_models: Optional[bool] = CompileOpt,
    backend: str = BackendOpt,
    send: Optional[str] = typer.Option(None, "--send", help=SEND_HELP + " Sends the series of every finished case (a resend duplicates nothing)."),
    pacs_config: Optional[Path] = typer.Option(None, "--pacs-config", help=PACS_CONFIG_HELP),
    out_dicom: Optional[Path] = typer.Option(None, "--out-dicom", help="Also write each case's T1c-pro as a DICOM MR series into DIR/<case>/ (the T1c's study for a DICOM T1c, else a new de-identified study). A case whose T1c-pro file exists gets its series from that file. See README, DICOM output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo cases whose T1c-pro already exists (and replace their DICOM series)."),
    strict: bool = StrictOpt,
    threads: Optional[int] = typer.Option(None, "--threads", help=COHORT_THREADS_HELP),
    brain_mask_name: Optional[str] = typer.Option(None, "--brain-mask-name", help=BRAIN_MASK_NAME_HELP),
    cluster: Optional[str] = typer.Option(None, "--cluster", help=CLUSTER_HELP),
    cluster_config: Optional[Path] = typer.Option(None, "--cluster-config", help=CLUSTER_CONFIG_HELP),
    num_parts: Optional[int] = typer.Option(None, "--num-parts", help=NUM_PARTS_HELP),
    part_id: Optional[int] = typer.Option(None, "--part-id", help=PART_ID_HELP),
    progress: str = ProgressOpt,
) -> None:
    """Amplify every case of a folder; finished cases are skipped, a failing case does not stop the others."""
    from .cohort import predict_cohort as run_cohort
    from .cohort import summary_name

    pacs = _pacs_target(send, pacs_config, out_dicom)
    report = _CohortConsole(make_progress(progress), progress)
    with cli_job(report, "cancelled; finished cases are kept, the current one was not written"):
        rows = run_cohort(cases_dir, out_dir, bundle=model, folds=folds, n_mirrorings=flips, device=device,
                          precision=precision, overwrite=overwrite, compile=compile_models, mapping=mapping,
                          strict=strict, progress=report, out_dicom=out_dicom, backend=backend, threads=threads,
                          brain_mask=brain_mask_name, num_parts=num_parts, part_id=part_id, cluster=cluster,
                          cluster_config=cluster_config)
    failed = [r for r in rows if r["status"] == "failed"]
    part = "" if num_parts is None else f" (part {part_id} of {num_parts})"
    typer.echo(f"{len(rows)} cases{part}: {sum(r['status'] == 'done' for r in rows)} done, "
               f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {len(failed)} failed; see "
               f"{out_dir / summary_name(num_parts, part_id)}", err=progress == "json")
    check = [f"{r['case']} ({str(r['check_registration']).replace(';', ', ')})" for r in rows if r.get("check_registration")]
    if check:
        typer.secho(f"CHECK REGISTRATION in {len(check)} case(s): {'; '.join(check)} (column check_registration of "
                    "summary.csv).", err=True, fg=typer.colors.RED)
    folders = [Path(str(r["dicom"])) for r in rows if r["status"] != "failed" and r.get("dicom")]
    if pacs is not None and folders:
        _send_written(folders, pacs, progress)
    if failed:
        raise typer.Exit(1)


models_app = typer.Typer(help="Model bundles: list, verify, import, set-default, path (per-user registry + shipped demo).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(pacs_app, name="pacs")


@models_app.command("list")
def models_list() -> None:
    """List installed bundles (user folder first, then the shipped ones); * marks the default model."""
    from .bundle import BundleError
    from .registry import default_model_name, list_models

    entries = list_models()
    if not entries:
        typer.echo("no model bundle installed; see `contrast-amplifier models import --help`")
    try:
        default: Optional[str] = default_model_name()
    except BundleError as exc:
        default = None
        typer.secho(f"warning: {exc}", err=True, fg=typer.colors.YELLOW)
    for entry in entries:
        mark = "*" if entry.name == default else " "
        typer.echo(f"{mark} {entry.name}\t{entry.version}\t{entry.source}\t{entry.intended_use}\t{entry.path}")
    if default is not None:
        typer.echo(f"* default model ({default}); change it with `contrast-amplifier models set-default NAME`")


@models_app.command("verify")
def models_verify() -> None:
    """Check every bundle in full (manifest, SHA-256, tensors of every weight file) and the default; exit 1 on any failure."""
    from .bundle import BundleError
    from .registry import default_model_name, verify_models

    failed = 0
    for entry, error in verify_models():
        typer.echo(f"{'OK  ' if error is None else 'FAIL'} {entry.name} ({entry.path})" + ("" if error is None else f": {error}"))
        failed += error is not None
    try:
        typer.echo(f"OK   default model: {default_model_name()}")
    except BundleError as exc:
        typer.echo(f"FAIL default model: {exc}")
        failed += 1
    if failed:
        raise typer.Exit(1)


@models_app.command("import")
def models_import(
    source: Path = typer.Argument(..., help="A bundle folder (with bundle.json) or a .zip of one."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an installed bundle of the same name."),
) -> None:
    """Check a bundle in full (manifest, hashes, tensors) and copy it into the per-user models folder; the default model is unchanged."""
    from .bundle import BundleError
    from .registry import import_model

    try:
        bundle = import_model(source, overwrite=overwrite)
    except BundleError as exc:
        fail(str(exc))
    typer.echo(f"imported {bundle.name} {bundle.manifest['version']} -> {bundle.path}")


@models_app.command("set-default")
def models_set_default(
    name: Optional[str] = typer.Argument(None, help="An installed model's name (see `contrast-amplifier models list`)."),
    shipped: bool = typer.Option(False, "--shipped", help="Go back to the model shipped with the extension."),
) -> None:
    """Choose the model used when none is named (predict, the Slicer module); it is checked in full first."""
    from .bundle import BundleError
    from .registry import default_model_file, set_default_model

    if (name is None) != shipped:
        fail("give either a model NAME or --shipped (see `contrast-amplifier models list`)")
    try:
        default = set_default_model(name)
    except BundleError as exc:
        fail(str(exc))
    if name is not None:
        typer.echo(f"default model: {default} (stored in {default_model_file()})")
    elif default is not None:
        typer.echo(f"default model: {default} (the shipped one)")
    else:
        typer.echo("no default model: none is shipped with this installation; name one with `models set-default NAME`")


@models_app.command("path")
def models_path() -> None:
    """Print the per-user models folder (set $CONTRAST_AMPLIFIER_MODELS to move it)."""
    from .registry import user_models_dir

    typer.echo(str(user_models_dir()))


def main(argv: Optional[list[str]] = None) -> None:  # console-script entry point
    """``contrast-amplifier``: one error line instead of a traceback (``--debug`` shows it); the
    Slicer module's Stop (SIGTERM) unwinds like Ctrl-C, so no half-written output is left."""
    run_cli(app, argv, prog_name="contrast-amplifier")


if __name__ == "__main__":
    main()
