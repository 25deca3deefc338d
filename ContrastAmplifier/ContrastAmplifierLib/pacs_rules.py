"""Picking a study's series by their SeriesDescription: one rule per volume, defaults, rules files.

A *volume* (``t1``, ``flair``, ``adc``, ``t1c``, ``t1c_pro``...: also the name of the folder it is
fetched into) is picked by a :class:`SeriesRule`: case-insensitive regular expressions
(``re.search``) its SeriesDescription must match (``include``) and must not match
(``exclude``), and the DICOM Modality it must have (MR). :data:`VOLUME_RULES` holds the default
rule of every volume this project knows; :func:`default_rules` assembles the rules of the
volumes one fetch needs (:data:`DEFAULT_RULES`: the four inputs of ``contrast-amplifier
predict``) and :func:`load_rules` lets a TOML or JSON file change them or add volumes of its own.

Rules are exclusive, and ties are errors, never guesses:

* a T1c-pro series (``T1c-pro (contrast amplified, <model>)``, as ``contrast-amplifier predict
  --out-dicom`` writes it) is never taken for the routine T1c;
* a default rule *yields* to the more specific volumes fetched with it (:data:`YIELDS`): when
  ``t1c_vfa`` is fetched too, the ``t1c`` rule also excludes what the ``t1c_vfa`` rule includes
  (a post-contrast SPACE is then the T1c-vfa, not a second T1c);
* a volume matched by no series or by several, or a series matched by two volumes, stops
  :func:`pick_series` with an error that lists every series of the study and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .pacs_config import PacsConfigError, PathLike, SeriesSelectionError, check_keys, read_mapping
from .pacs_query import SeriesInfo

#: The input series of a case, in the order the network reads them; also the fetch folders' names.
MODALITIES = ("t1", "flair", "adc", "t1c")

T1C_PATTERN = r"post|gd|gad|\+c|contrast|t1c|mprage.*post"
#: T1c-pro as this project writes it (SeriesDescription ``T1c-pro (contrast amplified, <model>)``).
T1C_PRO_PATTERN = r"t1c.?pro|contrast.?amplified"
#: 3D turbo spin echo with variable flip angles: SPACE (Siemens), CUBE (GE), VISTA (Philips).
T1C_VFA_PATTERN = r"vfa|space|cube|vista|3d.?tse|tse.?3d"
T1C_LOW_PATTERN = r"low.?dose|reduced.?dose|t1c.?low"
_NOT_PRE = r"(?<![a-z])pre(?![a-z])|native"  # "pre" as a word: "T1 SPACE pre", not "compressed"

#: volume -> the volumes whose default rule takes precedence when both are fetched.
YIELDS: Mapping[str, tuple[str, ...]] = {"t1": ("t1c_low",), "t1c": ("t1c_vfa", "t1c_low")}


@dataclass(frozen=True)
class SeriesRule:
    """Which series descriptions name one volume (case-insensitive regular expressions, ``re.search``).

    Attributes:
        include: a description must match this.
        exclude: and must not match this ("" excludes nothing).
        modality: the DICOM Modality the series must have ("" accepts any).
    """

    include: str
    exclude: str = ""
    modality: str = "MR"

    def matches(self, series: SeriesInfo, ignore: str = "") -> bool:
        text = series.description or ""
        if self.modality and series.modality and series.modality.upper() != self.modality.upper():
            return False
        if ignore and re.search(ignore, text, re.IGNORECASE):
            return False
        if not re.search(self.include, text, re.IGNORECASE):
            return False
        return not (self.exclude and re.search(self.exclude, text, re.IGNORECASE))

    def text(self) -> str:
        return f"include /{self.include}/" + (f", exclude /{self.exclude}/" if self.exclude else "")


@dataclass(frozen=True)
class SeriesRules:
    """The rule of each volume, and the descriptions never picked (localizers)."""

    rules: Mapping[str, SeriesRule]
    ignore: str = r"localizer|localiser|scout|survey|3.?plane|pilot"
    source: str = "default rules"


#: The default rule of every volume this project knows, by volume (folder) name.
VOLUME_RULES: Mapping[str, SeriesRule] = {
    "t1": SeriesRule(include=r"t1", exclude=T1C_PATTERN),
    "flair": SeriesRule(include=r"flair", exclude=r"t1"),
    "adc": SeriesRule(include=r"adc|apparent"),
    "t1c": SeriesRule(include=T1C_PATTERN, exclude=f"t2|flair|adc|apparent|dwi|diffusion|{T1C_PRO_PATTERN}"),
    "t1c_pro": SeriesRule(include=T1C_PRO_PATTERN),
    "t1c_vfa": SeriesRule(include=T1C_VFA_PATTERN, exclude=rf"t2|flair|\bdir\b|{T1C_PRO_PATTERN}|{_NOT_PRE}"),
    "t1c_low": SeriesRule(include=T1C_LOW_PATTERN, exclude=rf"t2|flair|adc|dwi|{T1C_PRO_PATTERN}"),
}


def _with_yields(rules: Mapping[str, SeriesRule], volumes: Sequence[str], fixed: Sequence[str] = ()) -> dict[str, SeriesRule]:
    """``rules`` where each volume of :data:`YIELDS` (except those in ``fixed``) also excludes what
    the rules of the volumes it yields to include, when those are among ``volumes``."""
    result = dict(rules)
    for volume, others in YIELDS.items():
        if volume not in result or volume in fixed:
            continue
        extra = [rules[o].include for o in others if o in volumes and o in rules]
        if extra:
            rule = result[volume]
            result[volume] = SeriesRule(include=rule.include, exclude="|".join([p for p in (rule.exclude, *extra) if p]),
                                        modality=rule.modality)
    return result


def default_rules(volumes: Sequence[str] = MODALITIES) -> SeriesRules:
    """The default rules of ``volumes`` (names of :data:`VOLUME_RULES`), each yielding as :data:`YIELDS` says.

    Raises:
        PacsConfigError: a volume without a default rule (the message says how to give one).
    """
    unknown = [v for v in volumes if v not in VOLUME_RULES]
    if unknown:
        raise PacsConfigError(f"no default series rule for volume(s) {', '.join(unknown)} (defaults exist for "
                              f"{', '.join(VOLUME_RULES)}); give the SeriesDescription pattern in a rules file: "
                              f"[{unknown[0]}] include = \"REGEX\".")
    return SeriesRules(rules=_with_yields({v: VOLUME_RULES[v] for v in volumes}, volumes))


DEFAULT_RULES = default_rules(MODALITIES)


def _compile_check(pattern: str, where: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PacsConfigError(f"{where}: {pattern!r} is not a valid regular expression ({exc}); fix the rules file.") from exc
    return pattern


def _rule_tables(data: Mapping[str, Any], path: Path) -> dict[str, Mapping[str, Any]]:
    """The volume tables of a rules file, checked: each a table of include, exclude and modality."""
    tables: dict[str, Mapping[str, Any]] = {}
    for volume, entry in data.items():
        if volume == "ignore":
            continue
        where = f"rules file {path}, [{volume}]"
        if not isinstance(entry, dict):
            raise PacsConfigError(f"{where} must be a table with include = \"REGEX\" (and optionally exclude, modality).")
        check_keys(entry, {"include", "exclude", "modality"}, where)
        tables[volume] = entry
    return tables


def load_rules(path: Optional[PathLike] = None, volumes: Sequence[str] = MODALITIES) -> SeriesRules:
    """Series-picking rules of ``volumes`` from a TOML or JSON file; what it leaves out keeps the defaults.

    A table per volume changes its rule (keys left out keep the default's) or, for a volume
    without a default, gives it (``include`` required). A volume whose table sets ``exclude``
    takes it as written: it no longer yields to the others (:data:`YIELDS`). Tables of known
    volumes that are not fetched are checked and left unused, so one file can serve
    ``contrast-amplifier pacs fetch`` and ``lesion-reader init``.

    Example (``rules.toml``)::

        ignore = "localizer|scout"      # descriptions never picked
        [t1c]
        include = "t1.*(post|gd)|mprage.*gd"
        exclude = "flair"
        [adc]
        include = "adc"
        modality = "MR"

    Raises:
        PacsConfigError: unknown keys or volumes, a volume without any rule, or a pattern that is
            not a regular expression.
    """
    if path is None:
        return default_rules(volumes)
    path = Path(path)
    data = read_mapping(path, "rules file")
    check_keys(data, {"ignore", *VOLUME_RULES, *volumes}, f"rules file {path}")
    tables = _rule_tables(data, path)
    rules: dict[str, SeriesRule] = {}
    for volume in volumes:
        entry = tables.get(volume, {})
        base = VOLUME_RULES.get(volume)
        where = f"rules file {path}, [{volume}]"
        if base is None and "include" not in entry:
            raise PacsConfigError(f"rules file {path}: volume {volume!r} has no default rule; add [{volume}] with "
                                  "include = \"REGEX\" (matched against the SeriesDescription).")
        rules[volume] = SeriesRule(include=_compile_check(str(entry.get("include", base.include if base else "")), where),
                                   exclude=_compile_check(str(entry.get("exclude", base.exclude if base else "")), where),
                                   modality=str(entry.get("modality", base.modality if base else "MR")))
    for volume, entry in tables.items():  # the unused tables are checked too
        where = f"rules file {path}, [{volume}]"
        for key in ("include", "exclude"):
            if key in entry:
                _compile_check(str(entry[key]), where)
    ignore = _compile_check(str(data.get("ignore", DEFAULT_RULES.ignore)), f"rules file {path}, ignore")
    fixed = [v for v in volumes if "exclude" in tables.get(v, {})]
    return SeriesRules(rules=_with_yields(rules, volumes, fixed), ignore=ignore, source=str(path))


def _override_series(series: Sequence[SeriesInfo], volume: str, value: str) -> SeriesInfo:
    """The series ``--series volume=value`` names (a series number or a Series Instance UID)."""
    value = value.strip()
    if value.isdigit():
        hits = [s for s in series if s.number == int(value)]
    else:
        hits = [s for s in series if s.series_instance_uid == value]
    if len(hits) != 1:
        state = "matches several series" if hits else "matches no series of the study"
        raise SeriesSelectionError(f"--series {volume}={value} {state}" + listing(series)
                                   + "\nFix: name one of the series above by its Series Instance UID.")
    return hits[0]


def listing(series: Sequence[SeriesInfo]) -> str:
    """``\\nseries found (N):`` and one :meth:`.SeriesInfo.line` per series, for error messages."""
    lines = [s.line() for s in series] or ["  (none)"]
    return f"\nseries found ({len(series)}):\n" + "\n".join(lines)


def _match_problems(series: Sequence[SeriesInfo], rules: SeriesRules, wanted: Sequence[str]) -> tuple[dict[str, SeriesInfo], list[str]]:
    """Pick one series per volume of ``wanted`` by ``rules``; return the picks and the problems."""
    candidates = {m: [s for s in series if rules.rules[m].matches(s, rules.ignore)] for m in wanted}
    claims: dict[str, list[str]] = {}
    for volume, hits in candidates.items():
        for s in hits:
            claims.setdefault(s.series_instance_uid, []).append(volume)
    picked: dict[str, SeriesInfo] = {}
    problems: list[str] = []
    for volume in wanted:
        hits = candidates[volume]
        rule = rules.rules[volume].text()
        if not hits:
            problems.append(f"no series matches {volume} ({rule})")
        elif len(hits) > 1:
            names = ", ".join(f"#{s.number} {s.description!r}" for s in hits)
            problems.append(f"{len(hits)} series match {volume} ({rule}): {names}")
        elif len(claims[hits[0].series_instance_uid]) > 1:
            both = " and ".join(claims[hits[0].series_instance_uid])
            problems.append(f"series #{hits[0].number} {hits[0].description!r} matches both {both}")
        else:
            picked[volume] = hits[0]
    return picked, problems


DEFAULT_FIX = ("Fix: name the series, e.g. --series t1c=SERIES_NUMBER (or =SERIES_INSTANCE_UID), or adapt the patterns "
               "in a rules file (--rules FILE; see `contrast-amplifier pacs fetch --help`).")


def pick_series(series: Sequence[SeriesInfo], rules: SeriesRules = DEFAULT_RULES,
                overrides: Optional[Mapping[str, str]] = None, modalities: Sequence[str] = MODALITIES,
                study_uid: str = "", fix: str = DEFAULT_FIX) -> dict[str, SeriesInfo]:
    """One series per volume of ``modalities``: ``overrides`` (volume -> series number or UID) first, then ``rules``.

    A series may stand for one volume only; ties are errors, never a guess.

    Args:
        fix: the last line of a :class:`.SeriesSelectionError` (how to fix the choice; the
            default names the options of ``contrast-amplifier pacs fetch``).

    Raises:
        PacsConfigError: an override of a volume not asked for, or a volume without a rule.
        SeriesSelectionError: a volume matched by no series or by several, or a series matched by
            two volumes; the message lists every series of the study and says how to fix it.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(modalities))
    if unknown:
        raise PacsConfigError(f"--series names unknown modality {', '.join(unknown)}; use {', '.join(modalities)}.")
    ruleless = [m for m in modalities if m not in rules.rules and m not in overrides]
    if ruleless:
        raise PacsConfigError(f"the {rules.source} have no rule for {', '.join(ruleless)}; add [{ruleless[0]}] with "
                              "include = \"REGEX\" to a rules file.")
    picked = {m: _override_series(series, m, v) for m, v in overrides.items()}
    taken = {s.series_instance_uid for s in picked.values()}
    if len(taken) < len(picked):
        raise SeriesSelectionError("--series names the same series for two modalities" + listing(series))
    remaining = [s for s in series if s.series_instance_uid not in taken]
    matched, problems = _match_problems(remaining, rules, [m for m in modalities if m not in picked])
    for volume in [m for m in modalities if m not in picked and m not in matched]:
        given = [f"#{s.number} to {m}" for m, s in picked.items() if rules.rules[volume].matches(s, rules.ignore)]
        if given:
            problems.append(f"({volume} would match the series --series gives: {', '.join(given)})")
    if problems:
        study = f" of study {study_uid}" if study_uid else ""
        raise SeriesSelectionError(f"cannot pick the input series{study} with the {rules.source}: " + "; ".join(problems)
                                   + listing(series) + "\n" + fix)
    picked.update(matched)
    return {m: picked[m] for m in modalities}
