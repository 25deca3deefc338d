"""``report.md`` / ``report.html`` and PNG plots in the layout of the paper's Tables 3-6.

Cells follow the paper: grades "2.7 (+-0.5)", times "1'48'' (+-1'25'')", sensitivity
"57% (106/187)" per reader and "59% [51; 65]" (Clopper-Pearson) for the reader average, false
detections per case "0.04 (3/79)" and "0.05 [+-0.04]" (Student t), p-values "P<.001*" with an
asterisk at the 5 % level (paper, "Statistical analysis").
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from ContrastAmplifierCommon.atomicfile import save_figure_atomic, write_text_atomic

from .results import AVERAGE, AnalysisResult, ordered_volumes
from .stats import format_p

if TYPE_CHECKING:  # annotations only: matplotlib is imported inside the plot functions
    from matplotlib.axes import Axes

Table = tuple[str, list[str], list[list[str]], str]  # title, header, rows, caption


# --------------------------------------------------------------------------- formatting


def _nan(x) -> bool:
    return x is None or x == "" or (isinstance(x, float) and math.isnan(x))


def format_minutes(seconds: float) -> str:
    """Seconds as the paper writes durations: ``1'48''``."""
    if _nan(seconds):
        return "n/a"
    total = int(round(float(seconds)))
    return f"{total // 60}'{total % 60:02d}''"


def _pct(x: float) -> str:
    return "n/a" if _nan(x) else f"{100 * x:.0f}%"


def _count(x: float) -> str:
    return "n/a" if _nan(x) else (f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}")


def _reader_label(reader: str) -> str:
    return "Reader Average" if reader == AVERAGE else f"Reader {reader}"


def _lookup(comparisons: Sequence[Mapping], **match) -> Optional[Mapping]:
    for row in comparisons:
        if all(str(row.get(k)) == str(v) for k, v in match.items()):
            return row
    return None


def _p(comparisons, **match) -> str:
    row = _lookup(comparisons, **match)
    return "n/a" if row is None else format_p(row["p_value"])


def _thr(t: float) -> str:
    return f"≥{t:g} mm"


# --------------------------------------------------------------------------- tables


def _mean_sd_cell(values: Optional[Mapping[str, float]], fmt: Callable[[float, float], str]) -> str:
    """``fmt(mean, SD)`` of per-case values (SD ``nan`` for one case), "n/a" for none."""
    if not values:
        return "n/a"
    x = np.array(list(values.values()), dtype=float)
    sd = x.std(ddof=1) if x.size > 1 else math.nan
    return fmt(x.mean(), sd)


def _summary_table(result: AnalysisResult, series_key: str, table: str, metric: str, title: str, caption: str, fmt) -> Table:
    """Tables 3 and 6: rows readers (+ average), columns phases, then phase comparisons."""
    series = result.per_case[series_key]
    phases = [p for p in result.phases if any(k[1] == p for k in series)]
    readers = [r for r in dict.fromkeys([k[0] for k in series]) if r != AVERAGE]
    order = ([AVERAGE] if any(k[0] == AVERAGE for k in series) else []) + readers
    pairs = list(itertools.combinations(phases, 2))
    header = [""] + phases + [f"{a} vs. {b}" for a, b in pairs]
    rows = []
    for reader in order:
        row = [_reader_label(reader)] + [_mean_sd_cell(series.get((reader, phase)), fmt) for phase in phases]
        for a, b in pairs:
            row.append(_p(result.comparisons, table=table, metric=metric, phase_a=a, phase_b=b, reader_a=reader, reader_b=reader))
        rows.append(row)
    for ra, rb in itertools.combinations(readers, 2):
        row = [f"{ra} vs. {rb}"]
        for phase in phases:
            row.append(_p(result.comparisons, table=table, metric=metric, phase_a=phase, phase_b=phase, reader_a=ra, reader_b=rb))
        rows.append(row + [""] * len(pairs))
    return title, header, rows, caption


def quality_table(result: AnalysisResult) -> Table:
    """Table 3: image quality grades, mean (+-SD), paired t-tests."""
    n = result.n_reference_cases
    return _summary_table(
        result, "grade", "table3", "grade", "Table 3: image quality (IQ) ± SD (4-point scale)",
        f"Average image quality grades (1 poor - 4 excellent) over the analysed cases (reference read: {n} cases). "
        "SD in parentheses. Two-tailed t-tests (paired on common cases); * = P < .05.",
        lambda m, s: f"{m:.1f} (±{s:.1f})" if not _nan(s) else f"{m:.1f}",
    )


def times_table(result: AnalysisResult) -> Table:
    """Table 6: reading times, mean (+-SD) in minutes' and seconds'', paired t-tests."""
    return _summary_table(
        result, "seconds", "table6", "seconds", "Table 6: reading times (RT) ± SD",
        "Average reading time per case of the reads that marked lesions, in minutes (') and seconds (''). "
        "Two-tailed t-tests (paired on common cases); * = P < .05.",
        lambda m, s: f"{format_minutes(m)} (±{format_minutes(s)})" if not _nan(s) else format_minutes(m),
    )


def time_per_lesion_table(result: AnalysisResult) -> Table:
    """Reading time per marked lesion (paper, "Reading times")."""
    header = ["Reader", "Phase", "cases", "marks", "total", "s per mark", "paper-style s/lesion"]
    rows = [[_reader_label(r["reader"]), r["phase"], str(r["n_cases"]), _count(r["n_marks"]), format_minutes(r["total_seconds"]),
             "n/a" if _nan(r["seconds_per_mark"]) else f"{r['seconds_per_mark']:.1f}",
             "n/a" if _nan(r["paper_seconds_per_lesion"]) else f"{r['paper_seconds_per_lesion']:.2f}"] for r in result.times]
    caption = ("s per mark = total reading time / lesions marked. The paper's figures (0.96 s/lesion for T1c) equal the "
               "mean time per case divided by the total lesions marked: given as 'paper-style' for comparison.")
    return "Reading time per lesion", header, rows, caption


def contrast_table(result: AnalysisResult) -> Optional[Table]:
    """Table 4: CNR, LBR, CEP mean (+-SD) per volume and paired t-tests."""
    if not result.contrast:
        return None
    vols = ordered_volumes(r["volume"] for r in result.contrast)
    pairs = list(itertools.combinations(vols, 2))
    header = [""] + vols + [f"{a} vs. {b}" for a, b in pairs]
    rows = []
    for metric, label, digits in (("cnr", "CNR", 1), ("lbr", "LBR", 2), ("cep", "CEP (%)", 1)):
        row = [label]
        for v in vols:
            x = np.array([r[metric] for r in result.contrast if r["volume"] == v], dtype=float)
            x = x[np.isfinite(x)]
            row.append(f"{x.mean():.{digits}f} (±{x.std(ddof=1):.{digits}f})" if x.size > 1 else (f"{x.mean():.{digits}f}" if x.size else "n/a"))
        for a, b in pairs:
            row.append(_p(result.comparisons, table="table4", metric=metric, phase_a=a, phase_b=b))
        rows.append(row)
    n = len({r["case"] for r in result.contrast})
    kinds = sorted({r["brain_roi"] for r in result.contrast})
    caption = (f"Average CNR, LBR and CEP over the {n} cases with at least one reference lesion; SD in parentheses. "
               f"Lesion ROI: parallelograms of the reference axes, pooled per case; healthy-brain ROI: {', '.join(kinds)}. "
               "Two-tailed paired t-tests; * = P < .05.")
    return "Table 4: contrast enhancement", header, rows, caption


def _reader_cell(d: Optional[Mapping], metric: str) -> str:
    """A reader's Table 5 cell: "57% (106/187)" (SE), "0.04 (3/79)" (FDR), "60% (106/177)" (PPV), "58%" (F1)."""
    if d is None:
        return "n/a"
    if metric == "SE":
        return f"{_pct(d['sensitivity'])} ({_count(d['tp'])}/{_count(d['tp'] + d['fn'])})"
    if metric == "FDR":
        return f"{d['fdr_per_case']:.2f} ({_count(d['fp'])}/{d['n_cases']})" if not _nan(d["fdr_per_case"]) else "n/a"
    if metric == "PPV":
        return f"{_pct(d['ppv'])} ({_count(d['tp'])}/{_count(d['tp'] + d['fp'])})"
    return _pct(d["f1"])


def _average_cell(d: Mapping, metric: str) -> str:
    """A reader-average Table 5 cell: "59% [51; 65]" (SE, Clopper-Pearson), "0.05 [±0.04]" (FDR, Student t)."""
    if metric == "SE":
        return (f"{_pct(d['sensitivity'])} [{100 * d['sensitivity_ci_low']:.0f}; {100 * d['sensitivity_ci_high']:.0f}]"
                if not _nan(d["sensitivity"]) else "n/a")
    if metric == "FDR":
        half = (d["fdr_ci_high"] - d["fdr_ci_low"]) / 2.0
        return f"{d['fdr_per_case']:.2f} [±{half:.2f}]" if not _nan(half) else "n/a"
    return _pct(d["ppv"] if metric == "PPV" else d["f1"])


def _test_cell(comparisons: Sequence[Mapping], metric: str, t: float, **match) -> str:
    """A Table 5 p-value: McNemar mid-p (SE), Wilcoxon (FDR); PPV is not tested ("n/a"), F1 left blank."""
    if metric not in ("SE", "FDR"):
        return "n/a" if metric == "PPV" else ""
    return _p(comparisons, table="table5", threshold_mm=f"{t}", metric="sensitivity" if metric == "SE" else "fdr_per_case", **match)


def _detection_row(result: AnalysisResult, det: Mapping[tuple[float, str, str], Mapping], t: float, metric: str,
                   readers: list[str], phases: list[str], avg_phases: list[str]) -> list[str]:
    """One Table 5 row: a metric at threshold ``t`` per reader and phase, reader tests, averages, phase tests.

    ``det`` maps (threshold, reader, phase) to the detection.csv row.
    """
    row = [_thr(t) if metric == "SE" else "", metric]
    row += [_reader_cell(det.get((t, r, p)), metric) for r in readers for p in phases]
    row += [_test_cell(result.comparisons, metric, t, phase_a=p, phase_b=p, reader_a=a, reader_b=b)
            for a, b in itertools.combinations(readers, 2) for p in phases]
    row += [_average_cell(det[(t, AVERAGE, p)], metric) for p in avg_phases]
    row += [_test_cell(result.comparisons, metric, t, phase_a=a, phase_b=b, reader_a=AVERAGE, reader_b=AVERAGE)
            for a, b in itertools.combinations(avg_phases, 2)]
    return row


def _detection_caption(result: AnalysisResult) -> str:
    """Table 5's caption: the reference, its lesion sizes, the metrics, tests and intervals."""
    long_mm = np.array(result.reference_long_mm, dtype=float)
    size = (f" with a median long axis of {np.median(long_mm):.1f} mm (IQR {np.subtract(*np.percentile(long_mm, [75, 25])):.1f} mm)"
            if long_mm.size else "")
    return (f"Reference: {result.n_reference_lesions} lesions marked by reader {result.reference_reader} on "
            f"{result.reference_phase} in {result.n_reference_cases} cases{size}. SE = sensitivity (TP / reference lesions), "
            "FDR = false detections per case, PPV = TP / (TP + FP), F1 = harmonic mean of SE and PPV; a lesion counts at a "
            "threshold when its long axis reaches it. Two-tailed McNemar mid-p (SE) and Wilcoxon signed-rank (FDR) tests; "
            "Clopper-Pearson (SE) and Student-t (FDR) 95% intervals in brackets; * = P < .05.")


def _detection_header(readers: list[str], phases: list[str], avg_phases: list[str]) -> list[str]:
    """Table 5's columns: readers x phases, reader pairs x phases, averages, average phase pairs."""
    header = ["", ""]
    header += [f"{r} {p}" for r in readers for p in phases]
    header += [f"{a} vs. {b} {p}" for a, b in itertools.combinations(readers, 2) for p in phases]
    header += [f"Average {p}" for p in avg_phases]
    header += [f"Average {a} vs. {b}" for a, b in itertools.combinations(avg_phases, 2)]
    return header


def detection_table(result: AnalysisResult) -> Table:
    """Table 5: SE, FDR, PPV, F1 per reader and phase, reader comparisons, reader average.

    Paper, "Performance metrics" (metrics, size thresholds) and "Statistical analysis" (McNemar
    mid-p and Wilcoxon tests, Clopper-Pearson and Student-t intervals).
    """
    det = result.detection
    readers = [r for r in dict.fromkeys(d["reader"] for d in det) if r != AVERAGE]
    phases = [p for p in result.phases if any(d["phase"] == p for d in det)]
    avg_phases = [p for p in phases if any(d["reader"] == AVERAGE and d["phase"] == p for d in det)]
    header = _detection_header(readers, phases, avg_phases)
    by_key = {(d["threshold_mm"], d["reader"], d["phase"]): d for d in reversed(det)}  # the first row wins
    rows = [_detection_row(result, by_key, t, metric, readers, phases, avg_phases)
            for t in result.thresholds for metric in ("SE", "FDR", "PPV", "F1")]
    return "Table 5: lesion detection", header, rows, _detection_caption(result)


def beyond_tables(result: AnalysisResult) -> list[Table]:
    """Beyond the paper: weighted kappa between readers' grades; bootstrap CIs of the average SE."""
    tables: list[Table] = []
    if result.agreement:
        rows = [[r["phase"], f"{r['reader_a']} vs. {r['reader_b']}", str(r["n_cases"]),
                 "n/a" if _nan(r["kappa_linear"]) else f"{r['kappa_linear']:.2f}",
                 "n/a" if _nan(r["kappa_quadratic"]) else f"{r['kappa_quadratic']:.2f}"] for r in result.agreement]
        tables.append(("Beyond the paper: agreement between readers' grades", ["Phase", "Readers", "cases", "linear kappa", "quadratic kappa"],
                       rows, "Weighted Cohen's kappa on the 4-point image quality grades (1 = perfect agreement, 0 = chance)."))
    if result.bootstrap:
        clopper = {(d["threshold_mm"], d["phase"]): d for d in result.detection if d["reader"] == AVERAGE}
        rows = []
        for b in result.bootstrap:
            d = clopper.get((b["threshold_mm"], b["phase"]))
            cp = f"[{100 * d['sensitivity_ci_low']:.0f}; {100 * d['sensitivity_ci_high']:.0f}]" if d and not _nan(d["sensitivity_ci_low"]) else "n/a"
            boot = "n/a" if _nan(b["ci_low"]) else f"[{100 * b['ci_low']:.0f}; {100 * b['ci_high']:.0f}]"
            rows.append([_thr(b["threshold_mm"]), b["phase"], _pct(b["sensitivity"]), cp, boot])
        n_boot = result.bootstrap[0]["n_boot"]
        tables.append(("Beyond the paper: case-level bootstrap of the reader-average sensitivity",
                       ["Threshold", "Phase", "SE", "Clopper-Pearson 95% (paper)", "Case bootstrap 95%"], rows,
                       f"Percentile intervals from {n_boot} resamplings of cases (with all their lesions), which account for "
                       "lesions clustering within cases; the paper's Clopper-Pearson interval treats lesions as independent."))
    return tables


# --------------------------------------------------------------------------- rendering


def _markdown(table: Table) -> str:
    title, header, rows, caption = table
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines + ["", f"*{caption}*", ""])


def _html(table: Table) -> str:
    title, header, rows, caption = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td class=\"sig\">{html.escape(c)}</td>" if c.endswith("*") else f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows)
    return (f"<h3>{html.escape(title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"
            f"<p class=\"caption\">{html.escape(caption)}</p>\n")


# --------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically at 100 dpi."""
    return save_figure_atomic(fig, path, dpi=100)


def _sensitivity_panel(ax, det: Sequence[Mapping], phases: Sequence[str]) -> None:
    """One reader's sensitivity (%) by threshold with its CI, one line per phase, offset along x."""
    for k, phase in enumerate(phases):
        rows = sorted((d for d in det if d["phase"] == phase), key=lambda d: d["threshold_mm"])
        if not rows:
            continue
        x = np.array([d["threshold_mm"] for d in rows]) + 0.25 * (k - (len(phases) - 1) / 2)
        y = np.array([d["sensitivity"] for d in rows])
        err = np.array([[d["sensitivity"] - d["sensitivity_ci_low"] for d in rows], [d["sensitivity_ci_high"] - d["sensitivity"] for d in rows]])
        ax.errorbar(x, 100 * y, yerr=100 * err, marker="o", capsize=3, label=phase)


def plot_sensitivity(result: AnalysisResult, path: Path) -> Optional[Path]:
    """Sensitivity by size threshold with Clopper-Pearson 95% CIs, one line per phase, one panel per reader."""
    from matplotlib.figure import Figure  # no pyplot: the caller's (or Slicer's) backend is left alone

    det = [d for d in result.detection if not _nan(d["sensitivity"])]
    if not det:
        return None
    readers = list(dict.fromkeys(d["reader"] for d in det))
    phases = [p for p in result.phases if any(d["phase"] == p for d in det)]
    fig = Figure(figsize=(4 * len(readers), 3.5))
    # squeeze=False: a 1 x n array of Axes, typed as a bare ndarray (its items as ndarrays); listed as Axes.
    panels: list[Axes] = list(fig.subplots(1, len(readers), sharey=True, squeeze=False)[0])
    for ax, reader in zip(panels, readers):
        _sensitivity_panel(ax, [d for d in det if d["reader"] == reader], phases)
        ax.set_title(_reader_label(reader))
        ax.set_xlabel("minimum long axis (mm)")
        ax.set_xticks(result.thresholds)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("sensitivity (%) with 95% CI")
    panels[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_contrast(result: AnalysisResult, path: Path) -> Optional[Path]:
    """CNR, LBR and CEP per case across volumes, paired (one line per case)."""
    if not result.contrast:
        return None
    from matplotlib.figure import Figure  # no pyplot: the caller's (or Slicer's) backend is left alone

    vols = ordered_volumes(r["volume"] for r in result.contrast)
    cases = list(dict.fromkeys(r["case"] for r in result.contrast))
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 3)
    for ax, (metric, label) in zip(axes, (("cnr", "CNR"), ("lbr", "LBR"), ("cep", "CEP (%)"))):
        for case in cases:
            ys = [next((r[metric] for r in result.contrast if r["case"] == case and r["volume"] == v), np.nan) for v in vols]
            ax.plot(range(len(vols)), ys, "-o", color="0.5", alpha=0.6, markersize=3)
        means = [np.nanmean([r[metric] for r in result.contrast if r["volume"] == v]) for v in vols]
        ax.plot(range(len(vols)), means, "-s", color="C3", linewidth=2.5, label="mean")
        ax.set_xticks(range(len(vols)))
        ax.set_xticklabels(vols)
        ax.set_title(f"{label} per case")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_grades(result: AnalysisResult, path: Path) -> Optional[Path]:
    """Grade distributions (counts of 1-4) per reader and phase."""
    rows = [q for q in result.quality if q["reader"] != AVERAGE and q["n_cases"]]
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: the caller's (or Slicer's) backend is left alone

    fig = Figure(figsize=(max(5, 1.2 * len(rows)), 3.5))
    ax = fig.subplots()
    bottom = np.zeros(len(rows))
    labels = {1: "1 poor", 2: "2 average", 3: "3 good", 4: "4 excellent"}
    for g in range(1, 5):
        counts = np.array([q[f"n_grade_{g}"] for q in rows], dtype=float)
        ax.bar(range(len(rows)), counts, bottom=bottom, label=labels[g])
        bottom += counts
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{q['reader']}\n{q['phase']}" for q in rows], fontsize=8)
    ax.set_ylabel("cases")
    ax.set_title("Image quality grades")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_times(result: AnalysisResult, path: Path) -> Optional[Path]:
    """Reading time per case (box plots) per reader and phase."""
    series = {k: v for k, v in result.per_case["seconds"].items() if k[0] != AVERAGE and v}
    if not series:
        return None
    from matplotlib.figure import Figure  # no pyplot: the caller's (or Slicer's) backend is left alone

    keys = sorted(series, key=lambda k: (result.phases.index(k[1]) if k[1] in result.phases else 99, k[0]))
    fig = Figure(figsize=(max(5, 1.2 * len(keys)), 3.5))
    ax = fig.subplots()
    ax.boxplot([np.array(list(series[k].values())) / 60.0 for k in keys])
    ax.set_xticks(range(1, len(keys) + 1))
    ax.set_xticklabels([f"{r}\n{p}" for r, p in keys], fontsize=8)
    ax.set_ylabel("minutes per case")
    ax.set_title("Reading times")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- report

_CSS = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #bbb;padding:3px 6px;text-align:center}
th{background:#eee}td.sig{font-weight:bold}.caption{font-size:12px;color:#444;max-width:1100px}img{max-width:100%}"""


def write_report(result: AnalysisResult) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``result.out_dir``.

    Returns:
        name -> path of every file written.
    """
    out = Path(result.out_dir)
    files: dict[str, Path] = {}
    plots = {
        "sensitivity_plot": ("sensitivity_by_threshold.png", plot_sensitivity, "Sensitivity by size threshold (95% Clopper-Pearson CI)"),
        "contrast_plot": ("contrast_per_case.png", plot_contrast, "CNR, LBR and CEP per case (paired)"),
        "grades_plot": ("grades.png", plot_grades, "Image quality grade distributions"),
        "times_plot": ("reading_times.png", plot_times, "Reading times per case"),
    }
    made = {}
    for key, (name, fn, caption) in plots.items():
        path = fn(result, out / name)
        if path is not None:
            files[key] = path
            made[key] = (name, caption)
    tables: list[tuple[Optional[Table], Optional[str]]] = [  # contrast_table: None when not computed
        (quality_table(result), "grades_plot"),
        (contrast_table(result), "contrast_plot"),
        (detection_table(result), "sensitivity_plot"),
        (times_table(result), "times_plot"),
        (time_per_lesion_table(result), None),
    ] + [(t, None) for t in beyond_tables(result)]
    intro = (f"Reader study analysis (Bône, Ammari et al., Invest Radiol 2022, 'Performance metrics' and 'Statistical analysis'). "
             f"Reference lesions: reader {result.reference_reader}, phase {result.reference_phase}: "
             f"{result.n_reference_lesions} lesions in {result.n_reference_cases} cases. Readers: {', '.join(result.readers)}. "
             f"Phases: {', '.join(result.phases)}.")
    md = ["# Reader study report", "", intro, ""]
    body = [f"<h1>Reader study report</h1>\n<p>{html.escape(intro)}</p>\n"]
    for table, plot in tables:
        if table is None:
            note = "Contrast metrics (Table 4) were not computed; see the notes below."
            md += ["### Table 4: contrast enhancement", "", note, ""]
            body.append(f"<h3>Table 4: contrast enhancement</h3>\n<p>{html.escape(note)}</p>\n")
            continue
        md.append(_markdown(table))
        body.append(_html(table))
        if plot and plot in made:
            name, caption = made[plot]
            md += [f"![{caption}]({name})", ""]
            body.append(f"<figure><img src=\"{name}\" alt=\"{html.escape(caption)}\"><figcaption>{html.escape(caption)}</figcaption></figure>\n")
    if result.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
        body.append("<h2>Notes</h2>\n<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>\n")
    files["report_md"] = write_text_atomic("\n".join(md), out / "report.md")
    files["report_html"] = write_text_atomic(
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Reader study report</title><style>{_CSS}</style></head>\n<body>\n"
        + "".join(body) + "</body></html>\n", out / "report.html")
    return files
