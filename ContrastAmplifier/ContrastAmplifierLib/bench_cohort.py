"""``contrast-amplifier bench --only cohort``: one phantom cohort serially and on ``--cluster local:N``.

The same cases (8 phantoms at 3 mm, HD-BET included, the shipped demo bundle with all its folds x 8
mirrorings, on the CPU) run twice within one run, so the ratio is comparable even on a shared
machine:

* serially (:func:`.cohort.predict_cohort`), one case after the other with ``threads`` CPU threads
  each (torch and ITK);
* on a local Dask cluster of ``workers`` single-threaded worker processes (the same cores), a
  preprocessing task and an ensemble task per case (:mod:`.cohort_dask`).

Where the time goes comes from the per-task timings the Dask path records (preprocessing and
ensemble task seconds per case, and the worker of each), and the workers' busy fraction: task
seconds / (wall time x workers). :func:`sizing_table` turns the per-case CPU (preprocessing) time and
the ensemble task's time (GPU compute plus its CPU side) into the CPU workers that keep one GPU's
ensemble stage fed and the time of a 1,000-case cohort (an estimate: the steady state of a two-stage
pipeline, the slower stage setting the pace).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["COHORT_BENCH_SEED", "ENSEMBLE_TASK_SECONDS", "GPU_SECONDS", "run_cohort_bench", "sizing_table", "workers_per_gpu"]

#: First phantom seed of the cohort bench (not a training seed of the demo bundle, nor a test's).
COHORT_BENCH_SEED = 20270
#: GPU compute per 1 mm case assumed for the sizing (an estimate): 40 predictions at 160 x 192 x 160
#: in the default fast mode, transfers included (README, Benchmarks: 0.50 s on an H100, 0.43 s on an H200).
GPU_SECONDS = 0.5
#: One ensemble task per 1 mm case, GPU compute and its CPU side together (an estimate): 0.5 s on the
#: GPU, 0.9 s mapping back to the T1c grid and 4.0 s writing the compressed 1 mm NIfTI (228 x 253 x 209),
#: both measured with one thread on the 2-core development machine (2026-11-30, loaded).
ENSEMBLE_TASK_SECONDS = 5.4


def ensemble_pace(task_seconds: float, gpu_seconds: float, slots: int) -> float:
    """Seconds between two cases leaving one GPU with ``slots`` ensemble tasks at a time (``--resources
    GPU=slots``): their CPU sides overlap, their GPU computes queue on the one GPU."""
    return max(task_seconds / slots, gpu_seconds)


def sizing_table(cpu_seconds: float, task_seconds: float = ENSEMBLE_TASK_SECONDS, gpu_seconds: float = GPU_SECONDS,
                 slots: int = 1, cases: int = 1000,
                 cpu_workers: Sequence[int] = (4, 8, 16, 32, 64, 128)) -> list[dict[str, Any]]:
    """Cohort time on one GPU fed by ``w`` single-threaded CPU (preprocessing) workers, for each ``w``.

    Steady state of the two-stage pipeline: a case leaves it every ``max(cpu_seconds / w,
    ensemble_pace)`` seconds (:func:`ensemble_pace`); filling and draining it adds one case's
    ``cpu_seconds + task_seconds``.

    Returns:
        Rows of ``cpu_workers``, ``hours`` (whole cohort), ``gpu_busy`` (fraction of the time the GPU
        computes) and ``bound``: ``"CPU"`` (preprocessing), ``"GPU"`` or ``"ensemble slots"`` (the
        ensemble tasks' CPU side: more slots per GPU would help).
    """
    if min(cpu_seconds, task_seconds, gpu_seconds) <= 0 or slots < 1:
        raise ValueError(f"per-case seconds must be positive and slots >= 1 (cpu {cpu_seconds}, task {task_seconds}, "
                         f"gpu {gpu_seconds}, slots {slots})")
    ensemble = ensemble_pace(task_seconds, gpu_seconds, slots)
    rows = []
    for workers in cpu_workers:
        pace = max(cpu_seconds / workers, ensemble)
        bound = "CPU" if cpu_seconds / workers > ensemble else ("GPU" if gpu_seconds >= task_seconds / slots else "ensemble slots")
        rows.append({"cpu_workers": workers, "hours": (cases * pace + cpu_seconds + task_seconds) / 3600.0,
                     "gpu_busy": gpu_seconds / pace, "bound": bound})
    return rows


def workers_per_gpu(cpu_seconds: float, ensemble_seconds: float) -> int:
    """The fewest CPU workers that keep up with one GPU's ensemble stage: ``ceil(cpu_seconds / ensemble_seconds)``."""
    return max(1, math.ceil(cpu_seconds / ensemble_seconds - 1e-9))


def _phantoms(folder: Path, cases: int, spacing: float) -> Path:
    """The bench's phantom cases (kept in ``folder`` for the next run, made here the first time)."""
    from .phantom import generate_cohort

    expected = [folder / f"case_{i:03d}" for i in range(cases)]
    if not all((case / "phantom.json").is_file() for case in expected):
        generate_cohort(folder, cases=cases, seed=COHORT_BENCH_SEED, spacing=spacing)
    return folder


def _max_difference(a: Path, b: Path) -> float:
    import SimpleITK as sitk

    return float(np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(a))) - sitk.GetArrayFromImage(sitk.ReadImage(str(b)))).max())


def run_cohort_bench(out_dir: Union[str, Path], bundle_dir: Union[str, Path], cases: int = 8, spacing: float = 3.0,
                     workers: int = 2, threads: int = 2, n_mirrorings: int = 8, folds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Print and return the cohort benchmark (module doc).

    Args:
        out_dir: holds ``cohort-bench/`` (the phantoms, kept; both runs' outputs, rewritten).
        bundle_dir: the model bundle (the shipped demo bundle in ``make bench``).
        cases, spacing: the phantom cohort.
        workers: worker processes of the Dask run (``local:N``), one thread each.
        threads: CPU threads per case of the serial run (the same cores).
    """
    from .cluster import start_cluster
    from .cohort import predict_cohort

    work = Path(out_dir) / "cohort-bench"
    cohort = _phantoms(work / "cases", cases, spacing)
    settings: dict[str, Any] = dict(bundle=bundle_dir, folds=None if folds is None else list(folds),
                                    n_mirrorings=n_mirrorings, device="cpu", overwrite=True)
    print(f"\ncohort: {cases} phantom cases at {spacing:g} mm (HD-BET, {Path(bundle_dir).name}, "
          f"{'all' if folds is None else len(folds)} folds x {n_mirrorings}), serial ({threads} threads) vs "
          f"--cluster local:{workers} (1 thread per worker)")
    start = time.perf_counter()
    serial: list[dict[str, Any]] = predict_cohort(cohort, work / "serial", threads=threads, **settings)
    serial_s = time.perf_counter() - start

    start = time.perf_counter()
    with start_cluster(f"local:{workers}") as handle:
        cluster_up_s = time.perf_counter() - start
        parallel: list[dict[str, Any]] = predict_cohort(cohort, work / "dask", cluster=handle, **settings)
    dask_s = time.perf_counter() - start
    failed = [r["case"] for r in serial + parallel if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"cohort bench: cases failed: {failed}; see {work}/*/summary.csv")

    busy = sum(float(r["preprocess_task_s"]) + float(r["ensemble_task_s"]) for r in parallel)
    per_case = [{"case": s["case"], "serial_preprocess_s": s["preprocess_s"], "serial_ensemble_s": s["ensemble_s"],
                 "dask_preprocess_task_s": d["preprocess_task_s"], "dask_ensemble_task_s": d["ensemble_task_s"],
                 "dask_preprocess_s": d["preprocess_s"], "dask_ensemble_s": d["ensemble_s"],
                 "preprocess_worker": d["preprocess_worker"], "ensemble_worker": d["ensemble_worker"],
                 "max_abs_diff": _max_difference(Path(str(s["output"])), Path(str(d["output"])))}
                for s, d in zip(serial, parallel)]
    cpu_case_s = statistics.median(float(r["preprocess_task_s"]) for r in parallel)
    results: dict[str, Any] = {
        "cases": cases, "spacing_mm": spacing, "workers": workers, "threads_serial": threads,
        "serial_s": serial_s, "dask_s": dask_s, "cluster_start_s": cluster_up_s, "speedup": serial_s / dask_s,
        "worker_busy_fraction": busy / ((dask_s - cluster_up_s) * workers), "per_case": per_case,
        "median_preprocess_task_s": cpu_case_s,
        "median_ensemble_task_s": statistics.median(float(r["ensemble_task_s"]) for r in parallel),
        "sizing": {"cpu_seconds": cpu_case_s, "ensemble_task_seconds": ENSEMBLE_TASK_SECONDS, "gpu_seconds": GPU_SECONDS,
                   **{f"slots_{k}": {"cpu_workers_per_gpu": workers_per_gpu(cpu_case_s, ensemble_pace(ENSEMBLE_TASK_SECONDS, GPU_SECONDS, k)),
                                     "rows": sizing_table(cpu_case_s, slots=k)} for k in (1, 8)}},
    }
    print(f"  serial {serial_s:7.1f} s   local:{workers} {dask_s:7.1f} s (cluster start {cluster_up_s:.1f} s)   "
          f"speed-up x{results['speedup']:.2f}   workers busy {100 * results['worker_busy_fraction']:.0f}%")
    print("  case      serial: preprocess  ensemble | dask tasks: preprocess (worker)  ensemble (worker) | max |diff|")
    for row in per_case:
        print(f"  {row['case']:<9} {row['serial_preprocess_s']:17.1f} {row['serial_ensemble_s']:9.1f} | "
              f"{row['dask_preprocess_task_s']:22.1f} ({row['preprocess_worker']}) {row['dask_ensemble_task_s']:9.1f} "
              f"({row['ensemble_worker']}) | {row['max_abs_diff']:.1e}")
    print(f"  median task: preprocess {cpu_case_s:.1f} s, ensemble {results['median_ensemble_task_s']:.1f} s (CPU, 1 thread)")
    print(f"  sizing, 1,000 cases on one GPU: CPU {cpu_case_s:.1f} s per case (measured above), ensemble task "
          f"{ENSEMBLE_TASK_SECONDS:g} s of which {GPU_SECONDS:g} s on the GPU (assumed, 1 mm; see README)")
    for k in (1, 8):
        sizing = results["sizing"][f"slots_{k}"]
        print(f"    GPU={k} ({k} ensemble task{'s' if k > 1 else ''} at a time): {sizing['cpu_workers_per_gpu']} CPU workers "
              "keep up; " + ", ".join(f"{r['cpu_workers']} workers {r['hours']:.2f} h (GPU {100 * r['gpu_busy']:.0f}%)"
                                      for r in sizing["rows"]))
    return results
