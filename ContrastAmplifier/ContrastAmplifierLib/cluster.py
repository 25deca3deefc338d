"""Dask clusters for ``predict-cohort --cluster``: ``local[:N]``, ``tcp://HOST:PORT`` or ``slurm``.

* ``local[:N]``: N worker processes on this machine (default: one per core), one thread each.
  With CUDA GPUs (or ``gpu_workers``), the first G workers declare the worker resource ``GPU=1``
  (each sees one GPU through ``CUDA_VISIBLE_DEVICES``); the others declare ``CPU=1`` and see no
  GPU. :mod:`.cohort_dask` sends ensembles to ``GPU`` workers and preprocessing to ``CPU`` ones,
  so a GPU never waits behind a registration.
* ``tcp://HOST:PORT``: a running scheduler (``dask scheduler``) and its workers, started by you;
  declare resources there with ``dask worker ... --resources "GPU=1"``.
* ``slurm``: ``dask-jobqueue``'s ``SLURMCluster`` from a YAML or JSON file (:func:`read_slurm_config`)
  that scales itself between ``minimum_jobs`` and ``maximum_jobs`` (``adapt``) as cases wait.

Dask and dask-jobqueue are optional (``pip install 'slicer-contrast-amplifier[cluster]'``): they
are imported here, inside the functions, and a missing one is one error line naming that command.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["CLUSTER_EXTRA", "ClusterError", "ClusterSpec", "CohortCluster", "SlurmConfig", "check_cluster_request",
           "parse_cluster", "read_slurm_config", "slurm_cluster", "start_cluster"]

#: The pip command that installs what ``--cluster`` needs.
CLUSTER_EXTRA = "pip install 'slicer-contrast-amplifier[cluster]'"
#: Top-level keys of the ``--cluster-config`` file.
SLURM_KEYS = ("slurm", "adapt")
#: Seconds to wait for a ``tcp://`` scheduler to answer.
CONNECT_TIMEOUT_S = 30


class ClusterError(ValueError):
    """A ``--cluster`` / ``--cluster-config`` that cannot be used (the message names the fix)."""


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value.

    Attributes:
        kind: ``"local"``, ``"tcp"`` or ``"slurm"``.
        workers: ``local``: worker processes (``None``: one per core).
        address: ``tcp``: the scheduler's address.
    """

    kind: str
    workers: Optional[int] = None
    address: Optional[str] = None


def parse_cluster(text: str) -> ClusterSpec:
    """``local``, ``local:N``, ``tcp://HOST:PORT`` or ``slurm`` as a :class:`ClusterSpec`.

    Raises:
        ClusterError: anything else (the message lists the accepted forms).
    """
    value = str(text).strip()
    forms = "use local, local:N (N worker processes), tcp://HOST:PORT (a running Dask scheduler) or slurm"
    if value == "local":
        return ClusterSpec("local")
    if value.startswith("local:"):
        count = value[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise ClusterError(f"--cluster {value}: the worker count must be a whole number >= 1 ({forms}).")
        return ClusterSpec("local", workers=int(count))
    if value == "slurm":
        return ClusterSpec("slurm")
    match = re.fullmatch(r"tcp://([^\s:/]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", value)
    if match:
        if not 0 < int(match.group(2)) < 65536:
            raise ClusterError(f"--cluster {value}: port {match.group(2)} is out of range ({forms}).")
        return ClusterSpec("tcp", address=value)
    raise ClusterError(f"--cluster {value!r} is not understood: {forms}.")


def dask_module(name: str = "distributed") -> Any:
    """The optional package ``name`` (``distributed``, ``dask_jobqueue``), or :class:`ClusterError` naming
    the pip command. Imported by name and typed ``Any``: the 3.9 type check cannot parse tornado, under
    distributed, which uses 3.10 syntax."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ClusterError(f"--cluster needs the {name.replace('_', '-')} package, which is not installed "
                           f"({exc}); install it with `{CLUSTER_EXTRA}`.") from None


def require_dask(*modules: str) -> None:
    """Import ``distributed`` (and ``modules``) or raise :class:`ClusterError` naming the pip command."""
    for name in ("distributed", *modules):
        dask_module(name)


@dataclass(frozen=True)
class SlurmConfig:
    """A ``--cluster-config`` file for ``--cluster slurm``.

    Attributes:
        cluster: keyword arguments of ``dask_jobqueue.SLURMCluster`` (``queue``, ``account``,
            ``cores``, ``processes``, ``memory``, ``walltime``, ``job_extra_directives``,
            ``worker_extra_args``, ``job_script_prologue`` ...: see dask-jobqueue's documentation).
        minimum_jobs, maximum_jobs: the ``adapt`` range (SLURM jobs).
        source: the file it was read from.
    """

    cluster: dict[str, Any]
    minimum_jobs: int = 0
    maximum_jobs: int = 1
    source: Optional[Path] = None

    @property
    def resources(self) -> dict[str, float]:
        """Worker resources the jobs declare (``--resources`` in ``worker_extra_args``)."""
        return worker_resources(self.cluster.get("worker_extra_args") or [])

    @property
    def slots(self) -> int:
        """Worker threads at ``maximum_jobs`` (cores per job x jobs)."""
        return int(self.cluster.get("cores") or 1) * self.maximum_jobs


def worker_resources(args: list) -> dict[str, float]:
    """The ``--resources "GPU=1,CPU=7"`` of a ``dask worker`` command line as a dict."""
    found: dict[str, float] = {}
    for i, arg in enumerate(args):
        text = str(arg)
        value = None
        if text == "--resources" and i + 1 < len(args):
            value = str(args[i + 1])
        elif text.startswith("--resources="):
            value = text.split("=", 1)[1]
        for item in (value or "").replace(",", " ").split():
            name, _, amount = item.partition("=")
            try:
                found[name.strip()] = float(amount)
            except ValueError:
                raise ClusterError(f"worker resource {item!r} in worker_extra_args is not NAME=NUMBER "
                                   "(e.g. --resources GPU=1,CPU=7).") from None
    return found


def read_slurm_config(path: Union[str, os.PathLike]) -> SlurmConfig:
    """Read and check a ``--cluster-config`` file (YAML, or JSON by its ``.json`` ending).

    The file holds ``slurm:`` (``SLURMCluster`` keyword arguments) and ``adapt:`` (``minimum_jobs``,
    ``maximum_jobs``); see the README for an example.

    Raises:
        ClusterError: the file is missing or unreadable, not a mapping of those two keys, or the
            ``adapt`` range is not ``0 <= minimum_jobs <= maximum_jobs``, ``maximum_jobs >= 1``.
    """
    source = Path(path)
    where = f"--cluster-config {source}"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterError(f"{where} cannot be read ({exc.strerror or exc}); give the SLURM cluster file "
                           "(see README, Cohorts beyond one machine).") from None
    try:
        if source.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = importlib.import_module("yaml").safe_load(text)  # PyYAML: a dask dependency
    except Exception as exc:  # yaml.YAMLError / JSONDecodeError: both name the line
        raise ClusterError(f"{where} is not valid {'JSON' if source.suffix.lower() == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("slurm"), dict):
        raise ClusterError(f"{where} must hold a 'slurm:' mapping of SLURMCluster options (queue, cores, memory, "
                           "walltime ...) and optionally 'adapt:' with minimum_jobs and maximum_jobs.")
    unknown = sorted(set(data) - set(SLURM_KEYS))
    if unknown:
        raise ClusterError(f"{where}: unknown key(s) {', '.join(unknown)}; the file holds 'slurm:' and 'adapt:' only.")
    adapt = data.get("adapt") or {}
    if not isinstance(adapt, dict) or set(adapt) - {"minimum_jobs", "maximum_jobs"}:
        raise ClusterError(f"{where}: 'adapt:' takes minimum_jobs and maximum_jobs only (got {adapt!r}).")
    low, high = adapt.get("minimum_jobs", 0), adapt.get("maximum_jobs", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not 0 <= low <= high or high < 1:
        raise ClusterError(f"{where}: adapt needs whole numbers 0 <= minimum_jobs <= maximum_jobs, maximum_jobs >= 1 "
                           f"(got minimum_jobs={low!r}, maximum_jobs={high!r}).")
    config = SlurmConfig(dict(data["slurm"]), low, high, source)
    config.resources  # noqa: B018  (checks the --resources syntax now, before any work)
    return config


def slurm_cluster(config: SlurmConfig) -> Any:
    """The ``SLURMCluster`` of ``config`` (not scaled: no job is submitted yet, so no SLURM is needed).

    The scheduler runs in this process; its dashboard takes a free port unless ``scheduler_options``
    names one.
    """
    slurm_cluster_class = dask_module("dask_jobqueue").SLURMCluster
    options = dict(config.cluster)
    scheduler = {"dashboard_address": ":0", **dict(options.pop("scheduler_options", None) or {})}
    try:
        return slurm_cluster_class(scheduler_options=scheduler, **options)
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"--cluster-config {config.source}: SLURMCluster refused its 'slurm:' options ({exc}); "
                           "see dask-jobqueue's SLURMCluster parameters.") from None


def check_cluster_request(cluster: str, cluster_config: Union[str, os.PathLike, None] = None
                          ) -> tuple[ClusterSpec, Optional[SlurmConfig]]:
    """Everything about ``--cluster``/``--cluster-config`` that can fail, checked before any work.

    Raises:
        ClusterError: unparseable ``--cluster``; Dask (or dask-jobqueue) not installed; ``slurm``
            without ``--cluster-config``, with a bad file, or without ``sbatch`` on the PATH; a
            ``--cluster-config`` with another kind of cluster.
    """
    spec = parse_cluster(cluster)
    require_dask()
    if spec.kind != "slurm":
        if cluster_config is not None:
            raise ClusterError(f"--cluster-config is the SLURM cluster file; it does not apply to --cluster {cluster}.")
        return spec, None
    require_dask("dask_jobqueue")
    if cluster_config is None:
        raise ClusterError("--cluster slurm needs --cluster-config FILE: the SLURM jobs' queue, cores, memory and "
                           "walltime (see README, Cohorts beyond one machine).")
    config = read_slurm_config(cluster_config)
    if shutil.which("sbatch") is None:
        raise ClusterError("--cluster slurm submits SLURM jobs with sbatch, which is not on the PATH here: run "
                           "predict-cohort on a SLURM login node, or split the cohort over an sbatch array with "
                           "--num-parts N --part-id K (see README).")
    return spec, config


@dataclass
class CohortCluster:
    """A connected Dask client, and the cluster it owns (closed by :meth:`close`).

    Attributes:
        client: the ``distributed.Client``.
        cluster: the cluster object this started (``None`` for a ``tcp://`` scheduler).
        threads: CPU threads per case the cluster was sized for (``local:N``: cores / N; else 1,
            one case per worker thread: start workers with as many threads as cores).
        resources: worker resources the cluster declares before its workers exist (SLURM jobs).
        slots: worker threads it may reach (sizes how many cases are kept in flight).
    """

    client: Any
    cluster: Any = None
    threads: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    slots: int = 0

    @property
    def dashboard_link(self) -> Optional[str]:
        try:
            return str(self.client.dashboard_link)
        except Exception:  # no dashboard (a scheduler started without one)
            return None

    def workers(self) -> dict[str, dict]:
        """The connected workers' information (all of them: some distributed releases list 5 by default)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:  # releases before the n_workers argument list every worker
            info = self.client.scheduler_info()
        return dict(info.get("workers") or {})

    def declared_resources(self) -> set[str]:
        """Resource names declared by the cluster spec or by any connected worker."""
        names = set(self.resources)
        for worker in self.workers().values():
            names.update(worker.get("resources") or {})
        return names

    def worker_threads(self) -> int:
        """Threads of the connected workers together."""
        return sum(int(w.get("nthreads", 1)) for w in self.workers().values())

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()

    def __enter__(self) -> CohortCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cuda_devices() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def local_cluster(workers: Optional[int] = None, gpu_workers: Optional[int] = None) -> CohortCluster:
    """``local[:N]``: worker processes on this machine (module doc), bound to 127.0.0.1.

    Args:
        workers: worker processes (default: one per core).
        gpu_workers: how many of them declare ``GPU=1`` (default: the CUDA GPUs here, at most
            ``workers``). Declaring one without a GPU is allowed: its ensembles then run on the CPU
            (the tests route work this way on a CPU-only machine).
    """
    distributed = dask_module()
    nanny = distributed.Nanny
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = workers or cores
    devices = _cuda_devices()
    gpus = min(count, devices if gpu_workers is None else int(gpu_workers))
    memory = _total_memory()
    specs: dict[str, dict] = {}
    for i in range(count):
        # A failing case is reported once, in its summary row and on the console: the worker's own
        # "Compute Failed" ERROR record of the same exception is left out.
        options: dict[str, Any] = {"nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.CRITICAL,
                                   "memory_limit": int(memory / count) if memory else "auto"}
        if i < gpus:
            options["resources"] = {"GPU": 1}
            if devices:
                options["env"] = {"CUDA_VISIBLE_DEVICES": str(i % devices)}
            specs[f"gpu-{i}"] = {"cls": nanny, "options": options}
        else:
            options["resources"] = {"CPU": 1}
            options["env"] = {"CUDA_VISIBLE_DEVICES": ""}
            specs[f"cpu-{i - gpus}"] = {"cls": nanny, "options": options}
    scheduler = {"cls": distributed.Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    cluster = distributed.SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.ERROR,
                                      name="contrast-amplifier")
    try:
        client = distributed.Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return CohortCluster(client, cluster, threads=max(1, cores // count), slots=count)


def _total_memory() -> Optional[int]:
    try:
        return int(importlib.import_module("psutil").virtual_memory().total)  # a distributed dependency
    except ImportError:
        return None


def start_cluster(cluster: str, cluster_config: Union[str, os.PathLike, None] = None,
                  gpu_workers: Optional[int] = None) -> CohortCluster:
    """Start (``local``, ``slurm``) or connect to (``tcp://``) the cluster of a ``--cluster`` value.

    ``gpu_workers``: ``local`` only (see :func:`local_cluster`).

    Raises:
        ClusterError: see :func:`check_cluster_request`; a ``tcp://`` scheduler that does not answer.
    """
    spec, config = check_cluster_request(cluster, cluster_config)
    if gpu_workers is not None and spec.kind != "local":
        raise ClusterError("gpu_workers applies to a local cluster; declare GPU workers of other clusters with "
                           "--resources GPU=1 on their workers.")
    if spec.kind == "local":
        return local_cluster(spec.workers, gpu_workers)
    client_class = dask_module().Client
    if spec.kind == "tcp":
        try:
            client = client_class(spec.address, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise ClusterError(f"--cluster {spec.address}: no Dask scheduler answered ({exc}); start one with "
                               "`dask scheduler` and workers with `dask worker ADDRESS --nthreads 1`.") from None
        return CohortCluster(client)
    assert config is not None
    jobs = slurm_cluster(config)
    try:
        jobs.adapt(minimum_jobs=config.minimum_jobs, maximum_jobs=config.maximum_jobs)
        client = client_class(jobs)
    except BaseException:
        jobs.close()
        raise
    return CohortCluster(client, jobs, resources=config.resources, slots=config.slots)
