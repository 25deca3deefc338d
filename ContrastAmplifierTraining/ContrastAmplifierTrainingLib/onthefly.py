"""Phantom training cases made while training runs, by worker processes.

Case ``i`` of a :class:`PhantomCaseSource` is the phantom of seed ``first_seed + i``
(:func:`ContrastAmplifierLib.phantom.generate_case`, by default with the ``small`` lesion profile:
more metastases, 70 % under 10 mm), preprocessed exactly like a cohort case
(:func:`.cache.preprocess_record`, the phantom's own brain mask in place of HD-BET) into the
z-scores a cached case holds. With many cases (thousands of seeds) training sees a new brain, new
lesions and a new head pose almost every time instead of the same 16 cases per fold.

* Reproducible: a case is a pure function of its seed and the settings (the phantom is, and so is
  preprocessing: its registrations seed their metric sampling, :func:`~ContrastAmplifierLib.registration.sampling_seed`),
  so the same index gives the same arrays whichever process builds it (tested).
* Resumable: each case is kept in ``folder/cache/<case_id>.npz`` (written atomically) and read back
  on the next request or run; ``source.json`` records the settings and a folder made with other
  settings is refused. ``keep_cases`` bounds the disk used (the oldest built cases are deleted).
* Prefetching: asking for case ``i`` queues the next ``prefetch`` cases on the workers, so a
  trainer that walks the cases in order rarely waits (a 1.5 mm case takes about half a minute).

The phantom's images are deleted once a case is cached (``keep_phantoms`` keeps them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from ContrastAmplifierCommon.atomicfile import write_text_atomic

from .data import CachedCase, TrainingCase, load_cached_case, save_cached_case, to_training_case, train_set_percentiles

#: The file that records a source folder's settings.
SOURCE_FILE = "source.json"


class PhantomSourceError(ValueError):
    """A phantom source folder cannot be used as asked; the message names it and the fix."""


@dataclass(frozen=True)
class PhantomSourceSettings:
    """What every case of a source depends on.

    Attributes:
        first_seed: phantom seed of case 0 (case i: ``first_seed + i``); keep training seeds apart
            from every evaluation seed.
        cases: how many distinct cases the source holds.
        spacing: phantom voxel size and atlas spacing (mm).
        crop_size: atlas crop (x, y, z).
        lesions: phantom lesion profile (``small`` or ``default``).
        protocol: phantom protocol (``paper`` or ``clinical``).
    """

    first_seed: int
    cases: int
    spacing: float
    crop_size: tuple[int, int, int]
    lesions: str = "small"
    protocol: str = "paper"

    def case_id(self, index: int) -> str:
        return f"phantom_{self.first_seed + index}"


def build_case(folder: Union[str, Path], settings: PhantomSourceSettings, index: int, keep_phantom: bool = False) -> Path:
    """Generate, preprocess and cache case ``index``; return its ``.npz`` (runs in a worker process)."""
    from ContrastAmplifierLib.phantom import generate_case

    from .cache import preprocess_record
    from .cohort import CaseRecord

    folder = Path(folder)
    case_id = settings.case_id(index)
    target = folder / "cache" / f"{case_id}.npz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    phantoms = folder / "phantoms"
    phantoms.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=phantoms))
    try:
        generate_case(work, settings.first_seed + index, spacing=settings.spacing, protocol=settings.protocol,
                      lesions=settings.lesions)
        paths = {m: work / f"{m}.nii.gz" for m in ("t1", "flair", "adc", "t1c_low", "t1c", "brain_mask")}
        spacing3 = (settings.spacing,) * 3
        cached = preprocess_record(CaseRecord(case_id, case_id, paths), spacing3, settings.crop_size, work)
        save_cached_case(cached, target)
        if keep_phantom:
            final = phantoms / case_id
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _quiet_worker() -> None:
    """Worker start-up: one thread for ITK and torch, so that workers and the trainer share the cores."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is installed with the training extra
        pass


class PhantomCaseSource:
    """Training cases ``0 .. cases-1`` made on demand from phantom seeds (see the module docstring).

    Works as a training set: ``len(source)`` and ``source.case(i)`` (a :class:`.data.TrainingCase`
    normalised with :attr:`percentiles`). Call :meth:`close` (or use it as a context manager) to
    stop the workers.

    Args:
        folder: where ``source.json``, ``cache/`` and (with ``keep_phantoms``) ``phantoms/`` go.
        settings: the cases' settings; a folder made with others is refused.
        percentiles: the bundle's clip percentiles; default: :meth:`fit_percentiles` on the first
            ``percentile_cases`` cases (train-set percentiles, as the paper does).
        workers: processes building cases.
        prefetch: cases queued ahead of the last one asked for.
        keep_cases: cached cases kept on disk (oldest deleted beyond this); ``None`` keeps all.
        walk: patches a patch-mode fit takes from each case before the next one (it walks the
            cases in order, so the prefetch works: :class:`.patches.PatchSampler`).
    """

    def __init__(self, folder: Union[str, Path], settings: PhantomSourceSettings,
                 percentiles: Optional[Mapping[str, Sequence[float]]] = None, workers: int = 1, prefetch: int = 2,
                 keep_cases: Optional[int] = None, keep_phantoms: bool = False, percentile_cases: int = 8,
                 walk: int = 8) -> None:
        if settings.cases < 1:
            raise PhantomSourceError(f"a phantom source needs at least one case (got {settings.cases}).")
        self.folder = Path(folder)
        self.settings = settings
        self.prefetch = max(0, int(prefetch))
        self.keep_cases = keep_cases
        self.keep_phantoms = keep_phantoms
        self.walk = max(1, int(walk))
        self._last: Optional[tuple[int, TrainingCase]] = None  # the patches of a walk reuse one case
        self._check_folder()
        self._pool = ProcessPoolExecutor(max_workers=max(1, int(workers)), initializer=_quiet_worker)
        self._pending: dict[int, Future] = {}
        self._built: OrderedDict[int, Path] = OrderedDict()
        self._percentile_cases = max(1, min(percentile_cases, settings.cases))
        self._percentiles = {k: (float(v[0]), float(v[1])) for k, v in percentiles.items()} if percentiles else None

    def _check_folder(self) -> None:
        record = {**asdict(self.settings), "crop_size": list(self.settings.crop_size)}
        path = self.folder / SOURCE_FILE
        if path.is_file():
            found = json.loads(path.read_text(encoding="utf-8"))
            if found != record:
                changed = sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))
                differences = "; ".join(f"{k} {found.get(k)!r} there, {record.get(k)!r} asked" for k in changed)
                raise PhantomSourceError(
                    f"{self.folder} holds phantom cases made with other settings ({differences}); use another "
                    "folder, or the same settings.")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(record, indent=2) + "\n", path)

    def __len__(self) -> int:
        return self.settings.cases

    def __enter__(self) -> PhantomCaseSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (queued cases are dropped; finished ones stay cached)."""
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _path(self, index: int) -> Path:
        return self.folder / "cache" / f"{self.settings.case_id(index)}.npz"

    def _submit(self, index: int) -> None:
        if 0 <= index < len(self) and index not in self._pending and not self._path(index).is_file():
            self._pending[index] = self._pool.submit(build_case, self.folder, self.settings, index, self.keep_phantoms)

    def cached(self, index: int) -> CachedCase:
        """Case ``index``'s z-scores: from the disk cache, or built now (and the next ones queued)."""
        if not 0 <= index < len(self):
            raise IndexError(f"phantom case {index} outside 0..{len(self) - 1}")
        for ahead in range(index, index + self.prefetch + 1):
            self._submit(ahead)
        future = self._pending.pop(index, None)
        path = future.result() if future is not None else self._path(index)
        case = load_cached_case(path)
        self._remember(index, path)
        return case

    def _remember(self, index: int, path: Path) -> None:
        self._built[index] = path
        self._built.move_to_end(index)
        while self.keep_cases is not None and len(self._built) > max(1, self.keep_cases):
            _, oldest = self._built.popitem(last=False)
            oldest.unlink(missing_ok=True)

    def fit_percentiles(self) -> dict[str, tuple[float, float]]:
        """Train-set clip percentiles over the first cases (computed once, then kept)."""
        if self._percentiles is None:
            self._percentiles = train_set_percentiles([self.cached(i) for i in range(self._percentile_cases)])
        return self._percentiles

    @property
    def percentiles(self) -> dict[str, tuple[float, float]]:
        return self.fit_percentiles()

    def case(self, index: int) -> TrainingCase:
        """Case ``index`` as network tensors (normalised with :attr:`percentiles`; the last one is kept)."""
        if self._last is None or self._last[0] != index:
            self._last = (index, to_training_case(self.cached(index), self.percentiles))
        return self._last[1]
