"""``contrast-amplifier pacs``: send DICOM files to a PACS, list its studies, fetch a study's input series.

The sub-app :data:`pacs_app` is mounted on the main command line as ``pacs``; ``python -m
ContrastAmplifierLib.pacs_cli`` runs it alone. The work is done by :mod:`.pacs` (imported inside
the commands, so ``--help`` stays instant); this module parses options and prints results.
Credentials never reach the output: endpoints are printed by :meth:`.pacs.Endpoint.display`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from ContrastAmplifierCommon.cliapp import cli_job, fail, run_cli
from ContrastAmplifierCommon.progress import make_progress

from .cli_options import BackendOpt, PrecisionOpt

if TYPE_CHECKING:  # pacs itself is light, but keep the import graph of --help minimal
    from .pacs import Endpoint, PacsConfig, RetryPolicy, SendReport

CONFIG_HELP = ("PACS config file (TOML or JSON) with named endpoints, credentials, AE titles and retries; default: "
               "$CA_PACS_CONFIG, else pacs.toml or pacs.json in the per-user config folder (`contrast-amplifier pacs "
               "endpoints` shows it).")

pacs_app = typer.Typer(
    help=("Talk to a PACS: send DICOM files (DICOMweb STOW-RS to http(s)://host:port/dicom-web, or DIMSE C-STORE to "
          "dicom://CALLED_AET@host:port), list studies and series (QIDO-RS), fetch a study's T1, FLAIR, ADC and T1c "
          "series (WADO-RS). Endpoints: a URL, a name from the config file, or $CA_PACS_URL; credentials from the "
          "config file or $CA_PACS_USER/$CA_PACS_PASSWORD ($CA_PACS_TOKEN for a bearer token)."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", help=CONFIG_HELP)
RetriesOpt = typer.Option(None, "--retries", min=0, help="Retries of a failed request or association (connection errors, HTTP 5xx/429/408, aborts); default 3 or the config file's.")
BackoffOpt = typer.Option(None, "--backoff", min=0.0, help="First pause between retries, seconds; doubles at each retry (default 1 or the config file's).")
TimeoutOpt = typer.Option(None, "--timeout", min=0.1, help="Network timeout of one request, seconds (default 30 or the config file's).")
RulesOpt = typer.Option(None, "--rules", help="TOML/JSON file of SeriesDescription patterns: a table per modality (t1, flair, adc, t1c) with include = \"REGEX\" and optionally exclude = \"REGEX\", and a top-level ignore = \"REGEX\"; modalities left out keep the defaults (case-insensitive search).")
SeriesOpt = typer.Option(None, "--series", help="Pick a series yourself: MODALITY=SERIES_NUMBER or MODALITY=SERIES_INSTANCE_UID (repeat; e.g. --series t1c=7).")
ProgressOpt = typer.Option("bar", "--progress", help="bar (on stderr), json (one JSON object per line on stdout) or none.")


class _LazyProgress:
    """A progress reporter made on first use, so that a command failing before any work prints no empty bar."""

    def __init__(self, kind: str):
        if kind not in ("bar", "json", "none"):
            fail(f"--progress must be one of bar, json, none (got {kind!r}).")
        self.kind = kind
        self._report: Optional[Callable[..., None]] = None

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if self._report is None:
            self._report = make_progress(self.kind)
        self._report(stage, fraction, message)

    def close(self) -> None:
        getattr(self._report, "close", lambda: None)()


def _settings(target: Optional[str], config_file: Optional[Path], retries: Optional[int], backoff: Optional[float],
              timeout: Optional[float], calling_aet: Optional[str] = None) -> tuple[Endpoint, RetryPolicy]:
    """The endpoint and retry policy from the options, the config file and the environment."""
    from .pacs_config import endpoint_and_policy

    return endpoint_and_policy(target, config_file, retries, backoff, timeout, calling_aet)


def _print_results(report: SendReport, verbose: bool, err: bool = False) -> None:
    for line in report.lines(verbose):
        typer.echo(line, err=err)


def send_and_report(paths: Any, endpoint: Endpoint, policy: RetryPolicy, err: bool = False,
                    what: str = "instances") -> SendReport:
    """Send ``paths`` and print what the PACS acknowledged (commands that send what they wrote).

    Prints the lines of instances not acknowledged and the ``sent N of M`` summary (on stderr with
    ``err``, for ``--progress json`` commands); exits 1 unless the PACS acknowledged everything.
    A refusal or an unreachable PACS raises :class:`.pacs.PacsError` (one ``error:`` line under
    :func:`ContrastAmplifierCommon.cliapp.cli_job`) after printing what was acknowledged before it.
    """
    from .pacs import PacsError, send_instances

    try:
        report = send_instances(paths, endpoint, policy)
    except PacsError as exc:
        if exc.report is not None and exc.report.n_sent:
            _print_results(exc.report, False, err)
            typer.echo(exc.report.summary(), err=err)
        raise
    _finish_report(report, err, what)
    return report


def _finish_report(report: SendReport, err: bool, what: Optional[str] = None) -> None:
    """Print what the PACS did not acknowledge and the summary; exit 1 unless it acknowledged all
    (with ``what``, a line saying how to resend them)."""
    _print_results(report, False, err)
    typer.echo(report.summary(), err=err)
    if not report.ok:
        if what:
            typer.echo(f"not every one of the {what} was acknowledged; resend with `contrast-amplifier pacs send` "
                       "once the PACS accepts them (a resend duplicates nothing).", err=True)
        raise typer.Exit(1)


@pacs_app.command("send")
def send(
    sources: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively; non-DICOM files are skipped)."),
    to: Optional[str] = typer.Option(None, "--to", help="PACS URL (https://host:port/dicom-web or dicom://CALLED_AET@host:port) or endpoint name from the config file; default $CA_PACS_URL or the config's default."),
    calling_aet: Optional[str] = typer.Option(None, "--calling-aet", help="Our AE title for DIMSE (default $CA_PACS_CALLING_AET, the config's, or CONTRASTAMP)."),
    batch_size: int = typer.Option(25, "--batch-size", min=1, help="Instances per STOW-RS request."),
    report_file: Optional[Path] = typer.Option(None, "--report", help="Also write the per-instance report as JSON here."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per instance (default: only those not acknowledged)."),
    config_file: Optional[Path] = ConfigOpt,
    retries: Optional[int] = RetriesOpt,
    backoff: Optional[float] = BackoffOpt,
    timeout: Optional[float] = TimeoutOpt,
    progress: str = ProgressOpt,
) -> None:
    """Send every DICOM instance under SOURCES; report what the PACS acknowledged (exit 1 if any instance was not)."""
    from ContrastAmplifierCommon.atomicfile import write_text_atomic

    from .pacs import PacsError, send_instances

    reporter = _LazyProgress(progress)
    with cli_job(reporter, "cancelled; the instances acknowledged so far are on the PACS"):
        endpoint, policy = _settings(to, config_file, retries, backoff, timeout, calling_aet)
        try:
            report = send_instances(sources, endpoint, policy, batch_size=batch_size, progress=reporter)
        except PacsError as exc:
            reporter.close()
            if exc.report is not None and report_file is not None:
                write_text_atomic(json.dumps(exc.report.to_dict(), indent=2) + "\n", report_file)
            if exc.report is not None and exc.report.n_sent:
                _print_results(exc.report, verbose)
                typer.echo(exc.report.summary())
            fail(str(exc))
    if report_file is not None:
        write_text_atomic(json.dumps(report.to_dict(), indent=2) + "\n", report_file)
    _print_results(report, verbose)
    typer.echo(report.summary(), err=progress == "json")
    if not report.ok:
        raise typer.Exit(1)


def _study_rows(studies: list[Any]) -> list[str]:
    rows = []
    for s in studies:
        counts = f"{'?' if s.n_series is None else s.n_series} series, {'?' if s.n_instances is None else s.n_instances} instances"
        rows.append(f"{s.study_instance_uid}  {s.date or '-':<8}  {s.patient_id or '-':<12}  {counts:<24}  "
                    f"{s.modalities or '-':<8}  {json.dumps(s.description)}")
    return rows


@pacs_app.command("query")
def query(
    source: Optional[str] = typer.Option(None, "--from", help="DICOMweb URL (https://host:port/dicom-web) or endpoint name; default $CA_PACS_URL or the config's default."),
    patient_id: Optional[str] = typer.Option(None, "--patient-id", help="Only this patient's studies."),
    study_uid: Optional[str] = typer.Option(None, "--study-uid", help="List this study's series (number, modality, instances, description, UID)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config_file: Optional[Path] = ConfigOpt,
    retries: Optional[int] = RetriesOpt,
    backoff: Optional[float] = BackoffOpt,
    timeout: Optional[float] = TimeoutOpt,
) -> None:
    """List the studies of a PACS (QIDO-RS), or the series of one study with --study-uid."""
    import dataclasses

    from .pacs import query_series, query_studies

    with cli_job(None):
        endpoint, policy = _settings(source, config_file, retries, backoff, timeout)
        if study_uid:
            series = query_series(endpoint, study_uid, policy)
            rows = [s.line() for s in series]
            items: list[Any] = series
            title = f"{len(series)} series in study {study_uid} on {endpoint.display()}"
        else:
            studies = query_studies(endpoint, patient_id=patient_id, policy=policy)
            rows, items = _study_rows(studies), studies
            who = f" of patient {patient_id}" if patient_id else ""
            title = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}{who} on {endpoint.display()}"
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(i) for i in items], indent=2))
        return
    typer.echo(title)
    for row in rows:
        typer.echo(row)


def _parse_overrides(values: Optional[list[str]]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for value in values or []:
        modality, sep, series = value.partition("=")
        if not sep or not modality.strip() or not series.strip():
            fail(f"--series {value!r}: write MODALITY=SERIES, e.g. --series t1c=7 (series number) or "
                 "--series t1c=1.2.840.... (Series Instance UID).")
        overrides[modality.strip().lower()] = series.strip()
    return overrides


@pacs_app.command("fetch")
def fetch(
    study_uid: str = typer.Argument(..., help="Study Instance UID (see `contrast-amplifier pacs query`)."),
    out_dir: Path = typer.Argument(..., help="Receives t1/, flair/, adc/, t1c/ (one DICOM series each) and series.json."),
    source: Optional[str] = typer.Option(None, "--from", help="DICOMweb URL (https://host:port/dicom-web) or endpoint name; default $CA_PACS_URL or the config's default."),
    rules_file: Optional[Path] = RulesOpt,
    series: Optional[list[str]] = SeriesOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing OUT_DIR/<modality> folders."),
    config_file: Optional[Path] = ConfigOpt,
    retries: Optional[int] = RetriesOpt,
    backoff: Optional[float] = BackoffOpt,
    timeout: Optional[float] = TimeoutOpt,
    progress: str = ProgressOpt,
) -> None:
    """Fetch a study's T1, FLAIR, ADC and T1c series (picked by SeriesDescription) into OUT_DIR/<modality>/."""
    from .pacs import fetch_study, load_rules

    overrides = _parse_overrides(series)
    reporter = _LazyProgress(progress)
    with cli_job(reporter, "cancelled; no series folder was left half-written"):
        endpoint, policy = _settings(source, config_file, retries, backoff, timeout)
        result = fetch_study(study_uid, out_dir, endpoint, rules=load_rules(rules_file), overrides=overrides,
                             policy=policy, overwrite=overwrite, progress=reporter)
    err = progress == "json"
    for modality, picked in result.series.items():
        typer.echo(f"{modality:<6} {picked.line().strip()}  -> {result.folders[modality]}", err=err)
    typer.echo(f"fetched {result.n_instances} instances from {endpoint.display()} in {result.elapsed_s:.1f} s; the choice "
               f"is recorded in {result.series_file}", err=err)
    folders = " ".join(f"--{m} {result.folders[m]}" for m in result.folders)
    typer.echo(f"next: contrast-amplifier predict {folders} --out T1c-pro.nii.gz", err=err)


@pacs_app.command("amplify")
def amplify(
    study_uid: str = typer.Argument(..., help="Study Instance UID on the --from PACS."),
    out_dir: Path = typer.Argument(..., help="Receives inputs/ (the fetched series), T1c-pro.nii.gz and T1c-pro-dicom/ (the series sent back)."),
    source: Optional[str] = typer.Option(None, "--from", help="DICOMweb URL or endpoint name the inputs come from; default $CA_PACS_URL or the config's default."),
    to: Optional[str] = typer.Option(None, "--to", help="Where T1c-pro's series goes (URL or endpoint name); default: the --from PACS."),
    no_send: bool = typer.Option(False, "--no-send", help="Keep the T1c-pro series here (do not send it)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry name or bundle folder (default: the default model)."),
    folds: Optional[list[int]] = typer.Option(None, "--folds", help="Fold models to average (repeat the option; default: all)."),
    flips: int = typer.Option(8, "--flips", help="Mirrorings per fold: 8 (paper), or 1, 2, 4 for a quicker look."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = PrecisionOpt,
    backend: str = BackendOpt,
    brain_mask: Optional[Path] = typer.Option(None, "--brain-mask", help="Brain mask on the T1c grid; skips HD-BET."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    rules_file: Optional[Path] = RulesOpt,
    series: Optional[list[str]] = SeriesOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Fetch again and replace this command's earlier outputs in OUT_DIR."),
    config_file: Optional[Path] = ConfigOpt,
    retries: Optional[int] = RetriesOpt,
    backoff: Optional[float] = BackoffOpt,
    timeout: Optional[float] = TimeoutOpt,
    progress: str = ProgressOpt,
) -> None:
    """Fetch a study's inputs, amplify, and send T1c-pro back as a new series of the study (the worklist loop)."""
    from .pacs import load_rules
    from .pacs_amplify import amplify_study

    overrides = _parse_overrides(series)
    if no_send and to is not None:
        fail("--no-send and --to contradict each other: keep one")
    reporter = _LazyProgress(progress)
    with cli_job(reporter, "cancelled; the fetched inputs are kept (a rerun reuses them), no T1c-pro was written"):
        endpoint, policy = _settings(source, config_file, retries, backoff, timeout)
        target = None if no_send else endpoint if to is None else _settings(to, config_file, retries, backoff, timeout)[0]
        done = amplify_study(study_uid, out_dir, endpoint, target, rules=load_rules(rules_file), overrides=overrides,
                             policy=policy, overwrite=overwrite, progress=reporter, bundle=model, folds=folds,
                             n_mirrorings=flips, device=device, precision=precision, brain_mask=brain_mask,
                             threads=threads, backend=backend)
    reporter.close()
    err = progress == "json"
    result = done.result
    how = "fetched" if done.fetched is not None else "reused"
    typer.echo(f"inputs {how} in {out_dir / 'inputs'}; wrote {result.output_path} and the DICOM series "
               f"{result.dicom_series.folder} ({len(result.dicom_series.files)} MR images, {result.n_predictions} "
               f"predictions, {result.timings_s['total']:.1f} s)", err=err)
    if done.sent is not None:
        _finish_report(done.sent, err)


@pacs_app.command("endpoints")
def endpoints(config_file: Optional[Path] = ConfigOpt) -> None:
    """Show the config file used and its endpoints (credentials masked)."""
    from .pacs import ENV_URL, PacsError, load_config, mask_url, resolve_endpoint

    with cli_job(None):
        config: PacsConfig = load_config(config_file)
    typer.echo(f"config file: {config.where()}")
    for name in sorted(config.endpoints):
        marker = "*" if name == config.default else " "
        try:
            shown = resolve_endpoint(name, config).display()
        except PacsError as exc:
            shown = f"(not usable: {exc})"
        typer.echo(f"{marker} {name:<16} {shown}")
    if os.environ.get(ENV_URL):
        typer.echo(f"${ENV_URL}: {mask_url(os.environ[ENV_URL])}")


def main(argv: Optional[list[str]] = None) -> None:
    """Run the ``pacs`` commands alone (``python -m ContrastAmplifierLib.pacs_cli``)."""
    run_cli(pacs_app, argv, prog_name="contrast-amplifier pacs")


if __name__ == "__main__":
    main()
