"""``predict-cohort --cluster``: the cases of a cohort as Dask tasks, CPU and GPU work apart.

Each case that is not finished becomes two tasks:

1. **preprocess** (:func:`preprocess_task`): the checks of its outputs, then
   :func:`.inference.prepare_case` (read, HD-BET, registration, resampling). CPU work: HD-BET
   runs on the CPU in its fast mode (on ``backend``'s CPU runtime, as serially) on whichever worker
   runs it, so a case's result does not depend on where it ran. When a worker declares the
   resource ``CPU``, these tasks ask for it.
2. **ensemble** (:func:`ensemble_task`): :func:`.inference.finish_case` (the fold models x
   mirrorings, the mapping back, the atomic writes). It asks for the resource ``GPU`` when a worker
   of the cluster declares one, and runs on ``device`` there (``auto``: the worker's CUDA GPU if it
   has one, else its CPU). Each worker loads the bundle's fold models once
   (:func:`worker_models`), not once per case.

With ``GPU`` workers and ``CPU`` workers (``--cluster local`` on a GPU machine, or the ``--resources
GPU=1,CPU=7`` of one SLURM job per GPU, see README), a GPU works on ensembles only: it never waits
behind a registration, and preprocessing runs ahead on the CPUs.

Between the two tasks the preprocessed case travels as the first task's result
(:class:`.inference.PreparedCase`: SimpleITK images and transforms, pickled exactly), which Dask
moves from worker to worker, rather than through files in a scratch folder under the output:

* it is exact, so the Dask path writes the same T1c-pro, to the bit, as the serial one
  (:mod:`.cohort`, ``threads``); a NIfTI/``.tfm`` round trip would round the transforms;
* when the worker holding it dies, Dask recomputes it from the task graph, with no half-written
  scratch file to find and remove, and nothing is left in the output folder;
* its size is bounded: the z-scores, which the ensemble does not need, are dropped; what is left
  at 1 mm is the four normalised inputs (160 x 192 x 160 float32: 79 MB) and the native T1c with
  its brain mask (64 MB pickled for a 228 x 253 x 209 phantom T1c, measured), about 150 MB per case.
  No more than :func:`in_flight` cases (twice the worker threads) are submitted at a time, so a slow
  GPU does not make preprocessed cases pile up in the workers' memory (about 2.4 GB in flight for 8
  worker threads at 1 mm); Dask spills to disk beyond its memory limits anyway.

The client (this process) keeps what ``predict-cohort`` promises: it skips finished cases before
submitting anything, writes the summary after every case, reports a failing case (or a case whose
worker died three times: Dask's ``KilledWorker``) in its row without stopping the others, removes
temporaries that a killed worker left (:meth:`.cohort.CohortCase.remove_temporaries`), and reports
progress: per case stage (``<case>: <message>``, relayed from the workers as Dask events) and
overall (the mean of the cases' fractions; ``"case done"`` with ``N/M cases`` after each). The
cancel token stops submitting, cancels the pending tasks and closes a cluster started here (its
workers stop; outputs are only renamed into place once complete, so none is half-written).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ContrastAmplifierCommon.progress import CancelToken, ProgressCallback, check_cancel

from .cluster import dask_module
from .cohort import OUTPUT_NAME, CohortCase, failure_fields, itk_threads, result_fields, write_summary

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .cluster import CohortCluster
    from .inference import PreparedCase

__all__ = ["CaseFailure", "CohortJob", "predict_cohort_on_cluster", "preprocess_task", "ensemble_task", "worker_models"]

#: Cases kept in flight per worker thread (at least :data:`MIN_IN_FLIGHT`).
IN_FLIGHT_PER_THREAD = 2
MIN_IN_FLIGHT = 4
#: Seconds between two looks at the futures, the workers' progress events and the cancel token.
POLL_S = 0.2


class CaseFailure(Exception):
    """A case failed inside a task: ``args`` = (summary fields, seconds spent, worker name)."""


@dataclass(frozen=True)
class CohortJob:
    """What every task of one cohort run needs (pickled into each task: small).

    ``threads``: CPU threads per case, torch's and ITK's, in every task (a worker process runs one
    case per worker thread).
    """

    bundle: ModelBundle
    bundle_sha256: str
    options: dict[str, Any]
    threads: int
    brain_mask: Optional[str]
    topic: str


# -- worker side -----------------------------------------------------------------------------

_models_lock = threading.Lock()
#: This worker's loaded fold models: ``{(bundle folder, bundle.json SHA-256, folds): models}`` (one entry).
_models: dict[tuple, list] = {}
#: How often this worker process loaded a bundle's models (read by the tests).
model_loads = 0


def worker_models(bundle: ModelBundle, sha256: str, folds: Optional[list[int]]) -> tuple[list, bool]:
    """The fold models of ``bundle`` in this worker process, loaded on first use; ``(models, loaded_now)``.

    The key holds the SHA-256 of ``bundle.json`` (which holds every weight file's SHA-256): a bundle
    changed in place is loaded again, and a worker whose copy of the bundle differs from the one the
    cohort was started with refuses it.
    """
    from .bundle import BundleError, manifest_path_of, sha256_file

    global model_loads
    key = (str(bundle.path), sha256, tuple(bundle.folds if folds is None else folds))
    with _models_lock:
        if key in _models:
            return _models[key], False
        here = sha256_file(manifest_path_of(bundle.path))
        if here != sha256:
            raise BundleError(f"the bundle {bundle.path} on this worker is not the one the cohort was started with "
                              f"(bundle.json SHA-256 {here[:12]} here, {sha256[:12]} there); give every worker the "
                              "same bundle (a shared folder).")
        models = bundle.load_models(list(key[2]))
        _models.clear()  # one bundle at a time per worker
        _models[key] = models
        model_loads += 1
        return models, True


class _EventProgress:
    """A progress callback that sends ``(case, stage, fraction, message)`` to the client as a Dask event."""

    def __init__(self, topic: str, case: str) -> None:
        self.worker = dask_module().get_worker()
        self.topic = topic
        self.case = case

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self.worker.log_event(self.topic, {"case": self.case, "stage": stage, "fraction": float(fraction),
                                           "message": message})


def _worker_name() -> str:
    return str(dask_module().get_worker().name)


@contextlib.contextmanager
def _case_context(job: CohortJob) -> Iterator[None]:
    """torch's and ITK's threads for a case on this worker (:attr:`CohortJob.threads`)."""
    from .ensemble import configure_cpu_threads

    configure_cpu_threads(job.threads)
    with itk_threads(job.threads):
        yield


def preprocess_task(case: CohortCase, job: CohortJob) -> tuple[PreparedCase, dict[str, Any]]:
    """Task 1 of a case: its output checks and :func:`.inference.prepare_case` (HD-BET on the CPU).

    Returns:
        The prepared case and ``{"worker": name, "seconds": task time}``.

    Raises:
        CaseFailure: anything went wrong with the case (its summary fields).
    """
    from .inference import check_case_outputs, check_modalities, prepare_case

    start = time.perf_counter()
    options = job.options
    with _case_context(job):
        try:
            inputs = case.inputs(job.brain_mask)
            check_case_outputs(list(inputs.values()), case.target, case.series_dir, bool(options["overwrite"]))
            check_modalities(job.bundle)
            prepared = prepare_case({m: inputs[m] for m in ("t1", "flair", "adc", "t1c")}, job.bundle,
                                    mapping=options["mapping"], skull_strip_mode="fast", skull_strip_device="cpu",
                                    skull_strip_backend=options["backend"],
                                    brain_mask=inputs[job.brain_mask] if job.brain_mask else None,
                                    progress=_EventProgress(job.topic, case.name), strict=bool(options["strict"]))
        except Exception as exc:
            raise CaseFailure(failure_fields(exc), time.perf_counter() - start, _worker_name()) from None
    prepared.preprocessed.zscores = {}  # not needed by the ensemble: half the bytes to move
    return prepared, {"worker": _worker_name(), "seconds": time.perf_counter() - start}


def ensemble_task(preprocessed: tuple[PreparedCase, dict[str, Any]], case: CohortCase, job: CohortJob) -> dict[str, Any]:
    """Task 2 of a case: :func:`.inference.finish_case` with this worker's cached models.

    Returns:
        ``fields`` (the summary fields), both tasks' ``worker`` and ``seconds`` (``preprocess`` and
        ``ensemble``), the ``device`` and ``model_loaded`` (whether this task loaded the bundle on its worker).

    Raises:
        CaseFailure: anything went wrong with the case.
    """
    from .ensemble import InferenceSettings
    from .inference import finish_case

    start = time.perf_counter()
    prepared, first = preprocessed
    options = job.options
    with _case_context(job):
        try:
            settings = InferenceSettings.create(options["device"], options["precision"], compile=options["compile"],
                                                backend=options["backend"])
            models, loaded = worker_models(job.bundle, job.bundle_sha256, options["folds"])
            if settings.precision == "int8":  # the verdict the client's check cached (openvino_int8), read again here
                from .openvino_int8 import int8_settings

                settings = int8_settings(settings, job.bundle, models, options["n_mirrorings"])
            # overwrite: the preprocessing task checked the outputs with the user's --overwrite; what
            # can stand there now is this case's own output from an attempt on a worker that died.
            result = finish_case(prepared, job.bundle, settings, models=models, folds=options["folds"],
                                 n_mirrorings=options["n_mirrorings"], out_path=case.target, out_dicom=case.series_dir,
                                 overwrite=True, progress=_EventProgress(job.topic, case.name))
        except Exception as exc:
            raise CaseFailure(failure_fields(exc), first["seconds"] + time.perf_counter() - start, _worker_name()) from None
    return {"fields": result_fields(result), "preprocess": first,
            "ensemble": {"worker": _worker_name(), "seconds": time.perf_counter() - start},
            "device": str(settings.device), "model_loaded": loaded}


def series_task(case: CohortCase, job: CohortJob) -> dict[str, Any]:
    """The one task of a case whose T1c-pro exists but whose DICOM series does not (:mod:`.cohort`)."""
    from .cohort import _series_from_file

    start = time.perf_counter()
    with _case_context(job):
        try:
            assert case.series_dir is not None
            _EventProgress(job.topic, case.name)("write DICOM", 0.5, f"DICOM series from the existing {OUTPUT_NAME}")
            _series_from_file(case.target, case.series_dir, case.inputs(job.brain_mask), job.bundle)
        except Exception as exc:
            raise CaseFailure(failure_fields(exc), time.perf_counter() - start, _worker_name()) from None
    task = {"worker": _worker_name(), "seconds": time.perf_counter() - start}
    return {"fields": {"status": "done"}, "preprocess": task, "ensemble": {"worker": "", "seconds": 0.0},
            "device": "cpu", "model_loaded": False}


# -- client side -----------------------------------------------------------------------------

class _CohortProgress:
    """Per case fractions -> one overall fraction (their mean) on the cohort's progress callback."""

    def __init__(self, report: ProgressCallback, names: list[str]) -> None:
        self.report = report
        self.fraction = dict.fromkeys(names, 0.0)
        self.done = 0

    def overall(self) -> float:
        return sum(self.fraction.values()) / max(1, len(self.fraction))

    def event(self, case: str, stage: str, fraction: float, message: str) -> None:
        if case not in self.fraction:
            return
        if stage != "warning":  # a case that restarts on another worker does not go back
            self.fraction[case] = min(1.0, max(self.fraction[case], float(fraction)))
        self.report(stage, self.overall(), f"{case}: {message}")

    def finished(self, row: dict[str, object]) -> None:
        name = str(row["case"])
        self.fraction[name] = 1.0
        self.done += 1
        if row["status"] == "skipped":
            self.report("skip", self.overall(), f"{name}: already done")
            return
        detail = f": {row['error']}" if row["status"] == "failed" else ""
        self.report("case done", self.overall(), f"{self.done}/{len(self.fraction)} cases ({name} {row['status']}{detail})")


def in_flight(handle: CohortCluster) -> int:
    """How many cases to keep submitted: twice the worker threads (connected or to come), at least 4."""
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * max(handle.worker_threads(), handle.slots))


class _Run:
    """One cohort on one cluster: submits, collects, writes the summary (see the module doc)."""

    def __init__(self, cases: list[CohortCase], job: CohortJob, summary: Path, report: ProgressCallback,
                 cancel: Optional[CancelToken]) -> None:
        self.cases = cases
        self.job = job
        self.summary = summary
        self.progress = _CohortProgress(report, [c.name for c in cases])
        self.cancel = cancel
        self.rows: dict[str, dict[str, object]] = {c.name: c.new_row() for c in cases}
        self.active: dict[Any, tuple[str, CohortCase]] = {}
        self.events: queue.Queue = queue.Queue()

    def skip_finished(self) -> list[CohortCase]:
        """Record the finished cases as skipped (summary written); returns the others, in order."""
        overwrite = bool(self.job.options["overwrite"])
        todo: list[CohortCase] = []
        for case in self.cases:
            if case.finished(overwrite):
                self._finish(case, {"status": "skipped"})
            else:
                todo.append(case)
        self._write()
        return todo

    def run(self, todo: list[CohortCase], handle: CohortCluster) -> list[dict[str, object]]:
        """Run the cases of ``todo`` on ``handle``'s cluster; returns every row in case order."""
        self.handle = handle
        self.client = handle.client
        self.client.subscribe_topic(self.job.topic, self.events.put)
        try:
            self._loop(todo[::-1], bool(self.job.options["overwrite"]))
        finally:
            pending = list(self.active)
            if pending:
                self.client.cancel(pending)
            self.client.unsubscribe_topic(self.job.topic)
        return self.result()

    def result(self) -> list[dict[str, object]]:
        return [self.rows[c.name] for c in self.cases]

    def _loop(self, todo: list[CohortCase], overwrite: bool) -> None:
        wait = dask_module().wait
        while todo or self.active:
            while todo and len(self.active) < in_flight(self.handle):
                self._submit_first(todo.pop(), overwrite)
            self._drain_events()
            check_cancel(self.cancel)
            try:
                done = wait(list(self.active), timeout=POLL_S, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                continue
            for future in done:
                stage, case = self.active.pop(future)
                self._collect(future, stage, case)

    def _resources(self, name: str) -> Optional[dict[str, float]]:
        return {name: 1} if name in self.handle.declared_resources() else None

    def _submit_first(self, case: CohortCase, overwrite: bool) -> None:
        key = f"{case.name}-{self.job.topic}"
        if case.series_only(overwrite):
            future = self.client.submit(series_task, case, self.job, key=f"series-{key}", pure=False,
                                        resources=self._resources("CPU"))
            self.active[future] = ("series", case)
        else:
            future = self.client.submit(preprocess_task, case, self.job, key=f"preprocess-{key}", pure=False,
                                        resources=self._resources("CPU"))
            self.active[future] = ("preprocess", case)

    def _collect(self, future: Any, stage: str, case: CohortCase) -> None:
        self._drain_events()
        if future.status != "finished":
            self._finish(case, self._failure(future))
            return
        if stage == "preprocess":  # the prepared case stays on its worker until the ensemble task fetches it
            second = self.client.submit(ensemble_task, future, case, self.job, key=f"ensemble-{case.name}-{self.job.topic}",
                                        pure=False, priority=1, resources=self._resources("GPU"))
            self.active[second] = ("ensemble", case)
            return
        outcome = future.result()
        first, second = outcome["preprocess"], outcome["ensemble"]
        self._finish(case, {**outcome["fields"], "seconds": round(first["seconds"] + second["seconds"], 2),
                            "preprocess_task_s": round(first["seconds"], 3), "ensemble_task_s": round(second["seconds"], 3),
                            "preprocess_worker": first["worker"], "ensemble_worker": second["worker"],
                            "device": outcome["device"], "model_loaded": outcome["model_loaded"]})

    @staticmethod
    def _failure(future: Any) -> dict[str, object]:
        error = future.exception()
        if isinstance(error, CaseFailure):
            fields, seconds, worker = error.args
            return {**fields, "seconds": round(float(seconds), 2), "failed_worker": worker}
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}  # KilledWorker, cancelled

    def _finish(self, case: CohortCase, fields: dict[str, object]) -> None:
        row = self.rows[case.name]
        row.update(fields)
        case.remove_temporaries()
        self.progress.finished(row)
        self._write()

    def _write(self) -> None:
        write_summary(self.summary, [self.rows[c.name] for c in self.cases if self.rows[c.name]["status"]])

    def _drain_events(self) -> None:
        while True:
            try:
                _, event = self.events.get_nowait()
            except queue.Empty:
                return
            self.progress.event(str(event["case"]), str(event["stage"]), float(event["fraction"]), str(event["message"]))


def predict_cohort_on_cluster(
    cases: list[CohortCase],
    model: ModelBundle,
    options: dict[str, Any],
    cluster: Union[str, CohortCluster],
    summary: Path,
    cluster_config: Union[str, os.PathLike, None] = None,
    threads: Optional[int] = None,
    brain_mask: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> list[dict[str, object]]:
    """:func:`.cohort.predict_cohort` on a Dask cluster (module doc); returns the summary rows in case order.

    Args:
        cases: the cohort's cases (their outputs checked by the caller).
        model: the bundle, loaded and hash-checked.
        options: ``folds``, ``n_mirrorings``, ``device``, ``precision``, ``compile``, ``mapping``,
            ``overwrite``, ``strict``, ``backend`` (as :func:`.cohort.predict_cohort`'s).
        cluster: a ``--cluster`` value (started here, closed at the end) or a started
            :class:`.cluster.CohortCluster` (left running).
        threads: CPU threads per case (``None``: ``local:N``'s cores / N, else 1: one case per worker
            thread keeps the cores busy, and one thread gives the same bytes on every run).
        summary: the summary file.
        progress: the stage ``"dashboard"`` carries the Dask dashboard's link first, then per case
            stages and ``"case done"`` (module doc).
    """
    from .bundle import manifest_path_of, sha256_file
    from .cluster import start_cluster

    from ContrastAmplifierCommon.progress import null_progress

    report = progress or null_progress
    job = CohortJob(model, sha256_file(manifest_path_of(model.path)), dict(options), threads or 1, brain_mask,
                    f"contrast-amplifier-cohort-{uuid.uuid4().hex[:12]}")
    run = _Run(cases, job, summary, report, cancel)
    todo = run.skip_finished()
    if not todo:  # nothing to compute: no cluster to start (or SLURM job to queue)
        return run.result()
    handle = start_cluster(cluster, cluster_config) if isinstance(cluster, str) else cluster
    try:
        link = handle.dashboard_link
        if link:
            report("dashboard", 0.0, link)
        if threads is None:
            run.job = replace(job, threads=handle.threads)
        return run.run(todo, handle)
    finally:
        if isinstance(cluster, str):
            handle.close()
