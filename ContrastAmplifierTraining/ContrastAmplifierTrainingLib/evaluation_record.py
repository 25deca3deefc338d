"""``contrast-amplifier-train evaluate ... --record``: keep a phantom evaluation's summary in the bundle it evaluated.

A shipped bundle then carries its own evaluation table: ``bundle.json`` gets a top-level
``evaluation`` list (``bundle-schema.json``), one entry per distinct evaluation, i.e. per
``source`` (seed range or cohort, spacing, protocol) and ``settings`` (seeds, cohort folder name,
spacing, protocol, HD-BET, mirrorings, folds; not the device, nor any absolute path). Each entry::

    label, source, settings, n_cases, n_lesions,
    summary            exactly evaluation.json's "summary" (size bands, per-case image metrics; NaN as null)
    date               UTC, ISO 8601, seconds
    command            the command line that reproduces it (the registry name of an installed bundle)
    package_version    slicer-contrast-amplifier's version

Re-recording the same source and settings replaces that entry in place; other entries are kept.
``bundle.json`` is rewritten atomically (:func:`ContrastAmplifierCommon.atomicfile.write_text_atomic`)
with its permission bits kept; the weight files and their hashes are not touched, so the bundle
still passes :func:`ContrastAmplifierLib.bundle.load_bundle`. :func:`check_recordable` refuses,
before any work, a bundle that is not a folder or whose ``bundle.json`` cannot be written.
:func:`recorded_table` renders the recorded entries as ``summary.md``'s two tables.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from ContrastAmplifierCommon.atomicfile import write_text_atomic

from .phantom_eval import PHANTOM_LABEL, contrast_table, json_safe, similarity_table

BUNDLE_FILE = "bundle.json"
#: The ``bundle.json`` key holding the recorded evaluations.
RECORD_KEY = "evaluation"
#: Settings of ``evaluation.json`` left out of a record: they depend on the machine, not on the result.
MACHINE_SETTINGS = ("device",)
PROGRAM = "contrast-amplifier-train"


def _writable_manifest(folder: Path) -> Path:
    """``folder/bundle.json`` when it can be replaced; one-line ValueError naming the fix otherwise.

    A ``bundle.json`` without any write permission bit is refused even for a user whom the system
    would let write it (root): its owner made it read-only.
    """
    manifest = folder / BUNDLE_FILE
    copy_fix = (f"or record into a copy of the bundle (`contrast-amplifier models import {folder}`, then evaluate it by "
                "name with --record)")
    if not os.access(manifest, os.W_OK) or not manifest.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"--record: {manifest} is read-only; make it writable (chmod u+w {shlex.quote(str(manifest))}) "
                         f"{copy_fix}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--record: the bundle folder {folder} is not writable (bundle.json is replaced through a temporary "
                         f"file beside it); make it writable (chmod u+w {shlex.quote(str(folder))}) {copy_fix}.")
    return manifest


def check_recordable(bundle: Union[str, Path]) -> Optional[Path]:
    """The bundle folder ``--record`` will write to, checked before any work.

    ``bundle`` as ``evaluate`` takes it: a bundle folder, its ``bundle.json``, or a registry name.
    ``None`` for a name that is not installed (:func:`ContrastAmplifierLib.registry.resolve_model`
    refuses it next, naming the installed ones).

    Raises:
        ValueError: ``bundle`` is a file other than ``bundle.json`` (a ``.zip``), or ``bundle.json``
            or its folder is not writable; one line naming the file and the fix.
    """
    from ContrastAmplifierLib.registry import list_models

    candidate = Path(bundle)
    if candidate.is_file():
        if candidate.name != BUNDLE_FILE:
            raise ValueError(f"--record needs a bundle folder, and {bundle} is a file; unzip it or import it "
                             f"(`contrast-amplifier models import {shlex.quote(str(bundle))}`) and pass the folder or its name.")
        folder = candidate.parent
    elif (candidate / BUNDLE_FILE).is_file():
        folder = candidate
    else:
        found = [entry.path for entry in list_models() if entry.name == str(bundle)]
        if not found:
            return None
        folder = Path(found[0])
    _writable_manifest(folder)
    return folder


def bundle_reference(bundle: Union[str, Path], name: str, path: Union[str, Path]) -> str:
    """How the reproducing command names the bundle: its registry name when the evaluated folder is
    the installed model of that name, else ``bundle`` as it was given."""
    from ContrastAmplifierLib.registry import list_models

    here = Path(path).resolve()
    for entry in list_models():
        if entry.name == name and Path(entry.path).resolve() == here:
            return name
    return str(bundle)


def reproduce_command(bundle_ref: str, settings: Mapping[str, Any], out_dir: Union[str, Path], bundle_folds: Sequence[int]) -> str:
    """The ``contrast-amplifier-train evaluate`` command line of an evaluation's ``settings``
    (``evaluation.json``'s); ``--folds`` only when not all of the bundle's, no device or threads."""
    args = [PROGRAM, "evaluate", bundle_ref]
    seeds = settings.get("seeds")
    if seeds is not None:
        args += ["--phantom-seeds", f"{int(seeds[0])}-{int(seeds[-1])}", "--spacing", f"{float(settings['spacing_mm']):g}",
                 "--protocol", str(settings["protocol"])]
    else:
        args += ["--cohort", str(settings["cohort"])]
    if settings.get("hdbet"):
        args.append("--hdbet")
    folds = [int(k) for k in settings.get("folds") or []]
    if folds and sorted(folds) != sorted(int(k) for k in bundle_folds):
        args += ["--folds", *map(str, folds)]
    args += ["--flips", str(int(settings["flips"])), str(out_dir)]
    return shlex.join(args)


def evaluation_entry(result: Mapping[str, Any], bundle: Union[str, Path], out_dir: Union[str, Path],
                     bundle_folds: Sequence[int]) -> dict[str, Any]:
    """The record of one evaluation (see the module docstring), from what ``run_evaluation`` returns.

    ``bundle`` and ``out_dir`` as the command was given them (for the reproducing command).
    The entry is plain JSON (NaN as null), as it will read back from ``bundle.json``.
    """
    from ContrastAmplifierLib import __version__

    settings = {k: v for k, v in result["settings"].items() if k not in MACHINE_SETTINGS}
    source = str(result["source"])
    cohort = settings.get("cohort")
    if cohort is not None:  # the folder's name, not where it lies on this machine
        settings["cohort"] = Path(str(cohort)).name
        source = source.replace(str(cohort), settings["cohort"], 1)
    summary = result["summary"]
    info = result["bundle"]
    entry = {
        "label": str(result.get("label", PHANTOM_LABEL)),
        "source": source,
        "settings": settings,
        "n_cases": int(summary["cases"]["n_cases"]),
        "n_lesions": int(summary["size_bands"]["all"]["n_lesions"]),
        "summary": summary,
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "command": reproduce_command(bundle_reference(bundle, info["name"], info["path"]), result["settings"], out_dir,
                                     bundle_folds),
        "package_version": __version__,
    }
    return json.loads(json.dumps(json_safe(entry), allow_nan=False))


def _identity(entry: Mapping[str, Any]) -> str:
    """What makes two records the same evaluation: source and settings (key order ignored)."""
    return json.dumps([entry.get("source"), entry.get("settings")], sort_keys=True)


def merge_records(records: Sequence[Mapping[str, Any]], entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``records`` with ``entry`` in place of the one of the same source and settings, else appended."""
    out: list[dict[str, Any]] = []
    placed = False
    for record in records:
        if _identity(record) == _identity(entry):
            if not placed:
                out.append(dict(entry))
                placed = True
            continue
        out.append(dict(record))
    if not placed:
        out.append(dict(entry))
    return out


def record_evaluation(folder: Union[str, Path], evaluated: Mapping[str, Any], entry: Mapping[str, Any]) -> Path:
    """Write ``entry`` into ``folder/bundle.json``'s ``evaluation`` list (atomically, permissions kept).

    ``evaluated`` is the manifest the evaluation loaded: when ``bundle.json`` has changed since
    (anything but its ``evaluation`` list) nothing is written.

    Returns:
        The ``bundle.json`` written.

    Raises:
        ValueError: ``bundle.json`` is not writable, changed during the evaluation, or the result
            would not validate (:class:`ContrastAmplifierLib.bundle.BundleError`).
    """
    from ContrastAmplifierLib.bundle import read_manifest, validate_manifest

    manifest_path = _writable_manifest(Path(folder))
    current = read_manifest(manifest_path)

    def weights_part(manifest: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in manifest.items() if k != RECORD_KEY}

    if weights_part(current) != weights_part(evaluated):
        raise ValueError(f"--record: {manifest_path} changed while the evaluation ran, so this evaluation may not be of "
                         "that bundle; nothing was recorded (the evaluation outputs are written): rerun the command.")
    updated = {**current, RECORD_KEY: merge_records(current.get(RECORD_KEY, []), entry)}
    validate_manifest(updated, str(manifest_path))
    write_text_atomic(json.dumps(updated, indent=2) + "\n", manifest_path, mode=stat.S_IMODE(manifest_path.stat().st_mode))
    return manifest_path


def recorded_table(manifest: Mapping[str, Any]) -> str:
    """The recorded evaluations of a ``bundle.json`` as Markdown: per entry, its source and command,
    ``summary.md``'s lesion-contrast table per size band and its PSNR / SSIM / false-enhancement table.

    An empty string when nothing is recorded.
    """
    records = manifest.get(RECORD_KEY) or []
    if not records:
        return ""
    title = f"{manifest.get('name', 'bundle')} {manifest.get('version', '')}".rstrip()
    lines = [f"## Recorded phantom evaluations of `{title}`", ""]
    for entry in records:
        summary = entry["summary"]
        lines += [
            f"### {entry['source']}",
            "",
            f"{str(entry['label']).capitalize()}: {entry['n_cases']} cases, {entry['n_lesions']} lesions; recorded "
            f"{entry['date']} with slicer-contrast-amplifier {entry['package_version']} by `{entry['command']}`.",
            "",
            *contrast_table(summary["size_bands"]),
            "",
            *similarity_table(summary["cases"]),
            "",
        ]
    return "\n".join(lines)
