"""``lesion-reader`` command line: set up a blinded reader study, follow it, export the reads.

One verb per stage (nnU-Net style): ``init`` writes ``study.json`` (cases from folders, a
manifest, or a PACS with ``--pacs-case``); ``status`` prints, per reader and phase, cases done /
total, time spent and when the next phase opens; ``export`` writes the long-format
``grades.csv`` and ``lesions.csv`` that the analysis (``analyze``, paper section "Performance
metrics" / "Statistical analysis") reads, and optionally DICOM SR documents, sent to a PACS with
``--send``. The PACS side of ``init`` and ``export`` is :mod:`.pacs_cases`.

Extending: add a command with ``@app.command()`` below (imports inside the function, so
``--help`` stays instant); shared helpers are :func:`fail` and the ``StudyDirArg`` argument.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from ContrastAmplifierCommon.cliapp import cli_job, fail, run_cli  # one error path for every command line
from ContrastAmplifierCommon.progress import make_progress

if TYPE_CHECKING:  # imported inside the commands, so that --help stays instant
    from ContrastAmplifierLib.pacs import Endpoint, RetryPolicy

    from .study import Phase, Study

app = typer.Typer(
    name="lesion-reader",
    help="Blinded multi-phase lesion reader study (Bone, Ammari et al. 2022, 'Reader study protocol'): init, status, export, analyze.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StudyDirArg = typer.Argument(..., help="Study folder (holds study.json and reads.sqlite).")
PacsConfigOpt = typer.Option(None, "--pacs-config", help="PACS config file (TOML or JSON: named endpoints, credentials, AE titles, retries) as for `contrast-amplifier pacs`; default $CA_PACS_CONFIG, else pacs.toml or pacs.json in the per-user config folder.")


@app.command()
def init(
    study_dir: Path = typer.Argument(..., help="Folder to create the study in (study.json and the reads database go here)."),
    cases: Optional[list[Path]] = typer.Option(None, "--cases", help="Case folders (files named after their modality: t1c.nii.gz, t1c_pro.nii.gz, flair.nii.gz...) and/or a CSV manifest with header 'case,<modality>,...'. Repeat the option or pass a shell glob."),
    readers: list[str] = typer.Option(..., "--readers", help="Reader ids, e.g. --readers R1 --readers R2 (names only; no password)."),
    phases: Optional[list[str]] = typer.Option(None, "--phases", help="Phases in reading order: NAME (paper defaults: T1c shows T1c+T2-FLAIR; T1c-pro and T1c-vfa also show T1c) or NAME=VOL1+VOL2+... Default: T1c T1c-pro T1c-vfa."),
    reference_reader: Optional[str] = typer.Option(None, "--reference-reader", help="Reader whose marks in the reference phase are the reference lesions (default: the last reader)."),
    reference_phase: Optional[str] = typer.Option(None, "--reference-phase", help="Phase whose lesions only the reference reader marks (default: T1c-vfa when present, else none)."),
    washout_days: float = typer.Option(10.0, "--washout-days", min=0.0, help="Minimum delay between a reader's phases (paper: 10 days)."),
    max_lesions: int = typer.Option(20, "--max-lesions", min=1, help="Cases with more lesions are flagged 'too many lesions' and excluded (paper: 20)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-reader, per-phase case orders."),
    name: Optional[str] = typer.Option(None, "--name", help="Study title shown to readers (default: the folder name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing study.json that has no reads yet."),
    pacs_cases: Optional[list[str]] = typer.Option(None, "--pacs-case", help="CASE=STUDY_INSTANCE_UID: fetch the case's volumes (for each volume the phases show, the series picked by its SeriesDescription) from the PACS of --from into STUDY_DIR/cases/CASE/<volume>/. Repeat per case; may be combined with --cases."),
    source: Optional[str] = typer.Option(None, "--from", help="PACS of --pacs-case: DICOMweb URL (https://host:port/dicom-web) or endpoint name of the PACS config file; default $CA_PACS_URL or the config's default."),
    pacs_rules: Optional[Path] = typer.Option(None, "--pacs-rules", help="TOML/JSON file of SeriesDescription patterns for --pacs-case: a table per volume folder (t1c, t1c_pro, t1c_vfa, flair, or a volume of your phases) with include = \"REGEX\" and optionally exclude = \"REGEX\"; volumes left out keep the defaults (case-insensitive search)."),
    pacs_config: Optional[Path] = PacsConfigOpt,
    progress: str = typer.Option("none", "--progress", help="Progress of the --pacs-case retrieval: none, bar (on stderr) or json (one JSON object per line on stdout)."),
) -> None:
    """Create ``STUDY_DIR/study.json`` from case folders, a manifest or PACS studies, and an empty reads database."""
    from .study import StudyError, init_study, parse_phase_spec

    if not cases and not pacs_cases:
        fail("no cases: give --cases FOLDER_OR_CSV (repeat per case) and/or --pacs-case CASE=STUDY_INSTANCE_UID with --from PACS")
    if not pacs_cases and (source or pacs_rules or pacs_config):
        fail("--from, --pacs-rules and --pacs-config go with --pacs-case CASE=STUDY_INSTANCE_UID")
    options: dict[str, Any] = {"reference_reader": reference_reader, "reference_phase": reference_phase,
                               "washout_days": washout_days, "max_lesions": max_lesions, "seed": seed, "name": name, "force": force}
    try:
        phase_list = [parse_phase_spec(p) for p in phases] if phases else None
        if pacs_cases:
            study = _init_from_pacs(study_dir, pacs_cases, source, pacs_rules, pacs_config, progress, cases or [], readers,
                                    phase_list, options)
        else:
            study = init_study(study_dir, cases=cases or [], readers=readers, phases=phase_list, **options)
    except StudyError as exc:
        fail(str(exc))
    typer.echo(
        f"wrote {Path(study_dir) / 'study.json'}: {len(study.cases)} cases, readers {', '.join(study.readers)}, "
        f"phases {' -> '.join(p.name for p in study.phases)} ({study.washout_days:g} days apart)"
    )


def _init_from_pacs(study_dir: Path, specs: list[str], source: Optional[str], rules: Optional[Path], config: Optional[Path],
                    progress: str, cases: list[Path], readers: list[str], phases: Optional[list[Phase]],
                    options: dict[str, Any]) -> Study:
    """``init --pacs-case``: fetch the cases (:mod:`.pacs_cases`), print one line per case, return the study."""
    from ContrastAmplifierLib.pacs import endpoint_and_policy

    from .pacs_cases import init_study_from_pacs, parse_pacs_case

    reporter = make_progress(progress)
    with cli_job(reporter, "cancelled; no study was written (volume folders already fetched stay in STUDY_DIR/cases)"):
        pacs_cases = [parse_pacs_case(spec) for spec in specs]
        endpoint, policy = endpoint_and_policy(source, config)
        study, fetched = init_study_from_pacs(study_dir, pacs_cases, endpoint, readers, phases, other_cases=cases, rules_file=rules,
                                              policy=policy, progress=reporter, **options)
    for case_id, result in fetched.items():
        typer.echo(f"fetched case {case_id}: {len(result.series)} series, {result.n_instances} instances from "
                   f"{endpoint.display()} -> {result.out_dir}", err=progress == "json")
    return study


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
    send: Optional[str] = typer.Option(None, "--send", help="Then send the SR documents written to this PACS: a URL (https://host:port/dicom-web or dicom://CALLED_AET@host:port) or an endpoint name of the PACS config file. Prints 'sent N of M'; exit 1 if the PACS did not acknowledge every document. Needs --dicom-sr."),
    pacs_config: Optional[Path] = PacsConfigOpt,
) -> None:
    """Write ``grades.csv`` and ``lesions.csv`` (long format, RAS mm) for the analysis and other tools; with
    ``--dicom-sr`` also DICOM SR documents, sent to a PACS with ``--send``."""
    from .export import export_study
    from .study import StudyError

    if send is not None and not dicom_sr:
        fail("--send sends the DICOM SR documents: add --dicom-sr (grades.csv and lesions.csv are not DICOM)")
    if pacs_config is not None and send is None:
        fail("--pacs-config goes with --send PACS")
    if send is not None:
        from ContrastAmplifierLib.pacs import endpoint_and_policy

        with cli_job(None):  # a wrong PACS or config file is reported before anything is written
            endpoint, policy = endpoint_and_policy(send, pacs_config)
    try:
        paths = export_study(study_dir, out_dir, dicom_sr=dicom_sr, note=lambda message: typer.echo(f"note: {message}", err=True))
    except StudyError as exc:
        fail(str(exc))
    for path in paths:
        typer.echo(str(path))
    if send is not None:
        _send_sr([p for p in paths if p.suffix == ".dcm"], endpoint, policy)


def _send_sr(files: list[Path], endpoint: Endpoint, policy: RetryPolicy) -> None:
    """``export --send``: send the SR documents, print what the PACS acknowledged, exit 1 unless all."""
    from ContrastAmplifierLib.pacs_cli import send_and_report

    from .study import StudyError

    with cli_job(None, "cancelled; the SR documents acknowledged so far are on the PACS"):
        if not files:
            raise StudyError("--send: no DICOM SR document was written (no confirmed read of a case whose volume is a "
                             "DICOM series), so nothing was sent; the CSV files are written")
        send_and_report(files, endpoint, policy, what="SR documents")


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
