"""``lesion-reader`` command line: set up a blinded reader study, follow it, export the reads.

One verb per stage (nnU-Net style): ``init`` writes ``study.json``; ``status`` prints, per
reader and phase, cases done / total, time spent and when the next phase opens; ``export``
writes the long-format ``grades.csv`` and ``lesions.csv`` that the analysis (``analyze``,
paper section "Performance metrics" / "Statistical analysis") reads.

Extending: add a command with ``@app.command()`` below (imports inside the function, so
``--help`` stays instant); shared helpers are :func:`fail` and the ``StudyDirArg`` argument.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from ContrastAmplifierCommon.cliapp import cli_job, fail, run_cli  # one error path for every command line
from ContrastAmplifierCommon.progress import make_progress

app = typer.Typer(
    name="lesion-reader",
    help="Blinded multi-phase lesion reader study (Bone, Ammari et al. 2022, 'Reader study protocol'): init, status, export, analyze.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StudyDirArg = typer.Argument(..., help="Study folder (holds study.json and reads.sqlite).")


@app.command()
def init(
    study_dir: Path = typer.Argument(..., help="Folder to create the study in (study.json and the reads database go here)."),
    cases: list[Path] = typer.Option(..., "--cases", help="Case folders (files named after their modality: t1c.nii.gz, t1c_pro.nii.gz, flair.nii.gz...) and/or a CSV manifest with header 'case,<modality>,...'. Repeat the option or pass a shell glob."),
    readers: list[str] = typer.Option(..., "--readers", help="Reader ids, e.g. --readers R1 --readers R2 (names only; no password)."),
    phases: Optional[list[str]] = typer.Option(None, "--phases", help="Phases in reading order: NAME (paper defaults: T1c shows T1c+T2-FLAIR; T1c-pro and T1c-vfa also show T1c) or NAME=VOL1+VOL2+... Default: T1c T1c-pro T1c-vfa."),
    reference_reader: Optional[str] = typer.Option(None, "--reference-reader", help="Reader whose marks in the reference phase are the reference lesions (default: the last reader)."),
    reference_phase: Optional[str] = typer.Option(None, "--reference-phase", help="Phase whose lesions only the reference reader marks (default: T1c-vfa when present, else none)."),
    washout_days: float = typer.Option(10.0, "--washout-days", min=0.0, help="Minimum delay between a reader's phases (paper: 10 days)."),
    max_lesions: int = typer.Option(20, "--max-lesions", min=1, help="Cases with more lesions are flagged 'too many lesions' and excluded (paper: 20)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-reader, per-phase case orders."),
    name: Optional[str] = typer.Option(None, "--name", help="Study title shown to readers (default: the folder name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing study.json that has no reads yet."),
) -> None:
    """Create ``STUDY_DIR/study.json`` from case folders or a manifest, and an empty reads database."""
    from .study import StudyError, init_study, parse_phase_spec

    try:
        study = init_study(
            study_dir,
            cases=cases,
            readers=readers,
            phases=[parse_phase_spec(p) for p in phases] if phases else None,
            reference_reader=reference_reader,
            reference_phase=reference_phase,
            washout_days=washout_days,
            max_lesions=max_lesions,
            seed=seed,
            name=name,
            force=force,
        )
    except StudyError as exc:
        fail(str(exc))
    typer.echo(
        f"wrote {Path(study_dir) / 'study.json'}: {len(study.cases)} cases, readers {', '.join(study.readers)}, "
        f"phases {' -> '.join(p.name for p in study.phases)} ({study.washout_days:g} days apart)"
    )


@app.command()
def status(
    study_dir: Path = StudyDirArg,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Per reader and phase: cases done / total, active reading time, and when the phase opens."""
    from .status import format_status, study_status
    from .study import StudyError

    try:
        rows = study_status(study_dir)
    except StudyError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        typer.echo(format_status(rows))


@app.command()
def export(
    study_dir: Path = StudyDirArg,
    out_dir: Path = typer.Argument(..., help="Folder that receives grades.csv and lesions.csv."),
    dicom_sr: bool = typer.Option(False, "--dicom-sr", help="Also write each reader's lesions and grade as DICOM SR (TID 1500, long/short axes) in OUT_DIR/sr/ for cases read on DICOM series (needs highdicom)."),
) -> None:
    """Write ``grades.csv`` and ``lesions.csv`` (long format, RAS mm) for the analysis and other tools."""
    from .export import export_study
    from .study import StudyError

    try:
        paths = export_study(study_dir, out_dir, dicom_sr=dicom_sr, note=lambda message: typer.echo(f"note: {message}", err=True))
    except StudyError as exc:
        fail(str(exc))
    for path in paths:
        typer.echo(str(path))


@app.command()
def analyze(
    study_dir: Path = typer.Argument(..., help="Study folder (study.json), or a folder holding only grades.csv and lesions.csv (+ optional volumes.csv)."),
    out: Path = typer.Option(..., "--out", help="Folder that receives detection.csv, comparisons.csv, contrast.csv, quality.csv, times.csv, report.md/.html and plots."),
    reference_phase: Optional[str] = typer.Option(None, "--reference-phase", help="Phase of the reference lesions (default: study.json, else T1c-vfa)."),
    reference_reader: Optional[str] = typer.Option(None, "--reference-reader", help="Reader of the reference lesions (default: study.json, else the only reader with marks in that phase)."),
    thresholds: Optional[list[float]] = typer.Option(None, "--threshold", help="Long-axis size thresholds in mm, repeatable (paper: 0 5 10)."),
    contrast: bool = typer.Option(True, "--contrast/--no-contrast", help="Compute CNR/LBR/CEP when the study lists the volumes."),
    brain_margin_mm: float = typer.Option(5.0, "--brain-margin", min=0.0, help="Margin (mm) around lesions removed from the automatic healthy-brain ROI."),
    n_boot: int = typer.Option(2000, "--n-boot", min=0, help="Case-level bootstrap replicates of the reader-average sensitivity (beyond the paper; 0 skips)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    progress: str = typer.Option("none", "--progress", help="none, bar (tqdm on stderr) or json (one JSON object per line on stdout, read by Slicer)."),
) -> None:
    """Paper's metrics and statistics (Tables 3-6): detection, contrast, grades, reading times, report."""
    from .analysis import analyze as run_analysis

    report = make_progress(progress)
    with cli_job(report, "cancelled; nothing was written (a failed or cancelled analysis leaves no output)"):
        result = run_analysis(
            study_dir, out, reference_phase=reference_phase, reference_reader=reference_reader,
            thresholds=thresholds or (0.0, 5.0, 10.0), contrast=contrast, brain_margin_mm=brain_margin_mm,
            n_boot=n_boot, seed=seed, report=True, progress=report,  # report: report.md/.html + plots
        )
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for path in result.files.values():
        typer.echo(str(path), err=progress == "json")


def main(argv: Optional[list[str]] = None) -> None:  # console-script entry point
    """Run the ``lesion-reader`` app: one error line instead of a traceback (``--debug`` shows it), 130 on Ctrl-C."""
    run_cli(app, argv, prog_name="lesion-reader")


if __name__ == "__main__":
    main()
