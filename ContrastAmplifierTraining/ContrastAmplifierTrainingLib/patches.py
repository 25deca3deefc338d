"""Patch sampling in the nnU-Net manner: random crops, a third of them centred on enhancing voxels.

Not in the paper (which trains on whole 160 x 192 x 160 crops, batch 1; ``TrainConfig.patch_size
= None``, the default "paper mode"). With ``patch_size`` set, each training step sees
``batch_size`` patches; with probability ``lesion_fraction`` a patch is centred on a random
*enhancing* voxel of its case, otherwise it is placed uniformly (nnU-Net's foreground
oversampling, with "foreground" = where contrast agent is taken up).

Enhancing voxels (:func:`enhancing_mask`) are brain voxels where the target T1c exceeds the
T1c-low input by more than :data:`ENHANCEMENT_THRESHOLD` on the [0, 1] training scale. They need
no lesion labels, so real cohorts work as they are. The default 0.2 was measured on physics
phantoms (``contrast-amplifier phantom``, seeds 880000+, 4 cases at 3 mm / 56 x 64 x 56 and 3 at
1.5 mm / 112 x 128 x 112, through the training preprocessing, against the same phantoms without
noise): T1c - T1c-low has a noise standard deviation of 0.054 at both spacings; lesions enhance by
0.14 (median; 0.35 at the 95th percentile), vessels and choroid plexus by 0.05-0.3. At 0.2 (3.7
noise SD), 0.04 % of the voxels without enhancement pass, 75-84 % of the flagged voxels truly
enhance and 82 % of those enhancing by more than 0.2 are found; at 0.1, 3 % of the unenhanced
brain passes and only 10-18 % of the flagged voxels enhance; at 0.15, 32-49 %. Cohorts with more
noise or misregistration between T1c-low and T1c may need a higher ``enhancement_threshold``.

Every draw is a pure function of ``(seed, fold, epoch, step)`` (like ``trainer.epoch_plan``), so
an interrupted and resumed run samples the very same patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, Union

import numpy as np
import torch

from .data import TrainingCase

#: Enhancement (target T1c minus T1c-low, [0, 1] scale) above which a brain voxel counts as
#: enhancing; measured on phantoms (module docstring).
ENHANCEMENT_THRESHOLD = 0.2
#: Channel of the T1c-low in ``TrainingCase.inputs`` (T1, FLAIR, ADC, T1c-low).
T1C_LOW_CHANNEL = 3


class CaseSource(Protocol):
    """Training cases by index: a list of :class:`TrainingCase`, or a generator making them on the fly.

    ``case(index)`` must return the same case for the same index (the enhancing voxels of each
    index are computed once and kept).
    """

    def __len__(self) -> int: ...

    def case(self, index: int) -> TrainingCase: ...


class ListSource:
    """A :class:`CaseSource` over a list of cases."""

    def __init__(self, cases: Sequence[TrainingCase]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, index: int) -> TrainingCase:
        return self.cases[index]


Cases = Union[Sequence[TrainingCase], CaseSource]


def as_case_source(cases: Cases) -> CaseSource:
    """``cases`` as a :class:`CaseSource` (a list is wrapped)."""
    return ListSource(cases) if isinstance(cases, Sequence) else cases


def enhancing_voxels(inputs: torch.Tensor, target: torch.Tensor, threshold: float = ENHANCEMENT_THRESHOLD) -> torch.Tensor:
    """Bool ``(Z, Y, X)`` (or ``(N, 1, Z, Y, X)`` for batches): target minus T1c-low above ``threshold`` in the brain."""
    if inputs.ndim == 5:
        low, tgt = inputs[:, T1C_LOW_CHANNEL : T1C_LOW_CHANNEL + 1], target
    else:
        low, tgt = inputs[T1C_LOW_CHANNEL], target[0]
    # outside the brain both are 0, so a positive threshold keeps the mask inside it
    return (tgt - low > threshold) & (tgt > 0)


def enhancing_mask(case: TrainingCase, threshold: float = ENHANCEMENT_THRESHOLD) -> torch.Tensor:
    """Bool ``(Z, Y, X)``: the case's brain voxels where T1c exceeds T1c-low by more than ``threshold``."""
    return enhancing_voxels(case.inputs, case.target, threshold)


@dataclass(frozen=True)
class PatchDraw:
    """One sampled patch: case index, corner and size (z, y, x), mirrored axes, lesion-centred or not."""

    case: int
    start: tuple[int, int, int]
    size: tuple[int, int, int]
    mirror: tuple[bool, bool, bool]
    centred: bool

    def slices(self) -> tuple[slice, slice, slice]:
        (z, y, x), (dz, dy, dx) = self.start, self.size
        return slice(z, z + dz), slice(y, y + dy), slice(x, x + dx)


def _triple(values: Sequence[int]) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in values)
    return z, y, x


class PatchSampler:
    """Draws patches of ``patch_size`` from a :class:`CaseSource` (see the module docstring).

    Args:
        source: the training cases.
        patch_size: (z, y, x); each side is clipped to the case's (the network pads what is not
            a multiple of ``2 ** (levels - 1)``).
        lesion_fraction: probability that a patch is centred on an enhancing voxel (a case
            without any falls back to a uniform patch, ``centred=False``).
        mirror: mirror random axes (the paper's augmentation).
        threshold: :func:`enhancing_mask`'s threshold.
        walk: patches per case when the cases are walked in order (a source that makes its cases
            as training runs, :class:`.onthefly.PhantomCaseSource`: case ``n // walk`` for the
            ``n``-th patch of the run, so it can prefetch the next ones); ``None``: a random case
            per patch.
        patches_per_epoch: with ``walk``, the patches of one epoch (to number the run's patches).
    """

    def __init__(self, source: CaseSource, patch_size: Sequence[int], lesion_fraction: float = 1 / 3,
                 mirror: bool = True, threshold: float = ENHANCEMENT_THRESHOLD, walk: Optional[int] = None,
                 patches_per_epoch: Optional[int] = None):
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch size must be three positive sides (z, y, x), got {tuple(patch_size)}")
        if not 0.0 <= lesion_fraction <= 1.0:
            raise ValueError(f"lesion fraction must be in [0, 1], got {lesion_fraction}")
        self.source = source
        self.patch_size = tuple(int(s) for s in patch_size)
        self.lesion_fraction = float(lesion_fraction)
        self.mirror = mirror
        self.threshold = float(threshold)
        if walk is not None and (walk < 1 or not patches_per_epoch):
            raise ValueError("walking the cases in order needs at least 1 patch per case and the patches per epoch")
        self.walk = walk
        self.patches_per_epoch = patches_per_epoch
        self._shapes: dict[int, tuple[int, int, int]] = {}
        self._coords: dict[int, np.ndarray] = {}

    def _describe(self, index: int) -> None:
        """Shape and enhancing voxels (flat int32 indices, 4 bytes each) of case ``index``, computed once."""
        case = self.source.case(index)
        self._shapes[index] = _triple(case.target.shape[1:])
        self._coords[index] = enhancing_mask(case, self.threshold).flatten().nonzero()[:, 0].cpu().numpy().astype(np.int32)

    def enhancing_coordinates(self, index: int) -> np.ndarray:
        """``(K, 3)`` (z, y, x) of case ``index``'s enhancing voxels."""
        return np.stack(np.unravel_index(self._enhancing(index), self.shape(index)), axis=1)

    def _enhancing(self, index: int) -> np.ndarray:
        if index not in self._coords:
            self._describe(index)
        return self._coords[index]

    def shape(self, index: int) -> tuple[int, int, int]:
        """Spatial shape (z, y, x) of case ``index``."""
        if index not in self._shapes:
            self._describe(index)
        return self._shapes[index]

    def draw(self, seed: int, fold: int, epoch: int, step: int) -> PatchDraw:
        """The ``step``-th patch of an epoch (a pure function of the arguments and the cases)."""
        rng = np.random.default_rng((seed, fold, epoch, step))
        index = int(rng.integers(len(self.source)))
        if self.walk is not None and self.patches_per_epoch:
            index = ((epoch * self.patches_per_epoch + step) // self.walk) % len(self.source)
        lesion = bool(rng.random() < self.lesion_fraction)
        axes = rng.integers(0, 2, size=3).astype(bool) & self.mirror
        flat = self._enhancing(index)
        shape = np.array(self.shape(index))
        size = np.minimum(self.patch_size, shape)
        centred = lesion and len(flat) > 0
        if centred:
            centre = np.array(np.unravel_index(int(flat[int(rng.integers(len(flat)))]), tuple(shape)))
            start = np.clip(centre - size // 2, 0, shape - size)
        else:
            start = np.array([int(rng.integers(0, s - p + 1)) for s, p in zip(shape, size)])
        return PatchDraw(index, _triple(start), _triple(size), (bool(axes[0]), bool(axes[1]), bool(axes[2])), centred)

    def crop(self, draw: PatchDraw, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs (4, z, y, x), target (1, z, y, x))`` of a draw on ``device``, mirrored."""
        case = self.source.case(draw.case)
        region = (slice(None),) + draw.slices()
        dims = [d + 1 for d in range(3) if draw.mirror[d]]
        x, y = case.inputs[region].to(device), case.target[region].to(device)
        return (torch.flip(x, dims), torch.flip(y, dims)) if dims else (x.contiguous(), y.contiguous())

    def batch(self, draws: Sequence[PatchDraw], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws stacked into ``(N, 4, z, y, x)`` and ``(N, 1, z, y, x)``."""
        pairs = [self.crop(d, device) for d in draws]
        sizes = {tuple(x.shape) for x, _ in pairs}
        if len(sizes) > 1:
            raise ValueError(f"patches of one batch differ in size {sorted(sizes)}: cases smaller than the patch size "
                             "must all have the same shape, or use --batch-size 1")
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def default_patches_per_epoch(n_cases: int, case_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """Patches per epoch when not given: ``n_cases x ceil(case voxels / patch voxels)``.

    An epoch then covers about as many voxels as a whole-volume epoch, so ``--epochs`` keeps the
    paper's meaning (each voxel seen about once per epoch on average) and an epoch costs about
    the same time (see README "Patch training" for the step timings).
    """
    size = np.minimum(np.asarray(patch_size), np.asarray(case_shape))
    return int(n_cases) * int(np.ceil(np.prod(case_shape) / np.prod(size)))


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, enhancing: torch.Tensor, weight: float) -> torch.Tensor:
    """Mean squared error with per-voxel weight ``1 + weight`` on enhancing voxels, 1 elsewhere.

    Normalised by the sum of the weights (a weighted mean), so ``weight = 0`` is the plain MSE
    and a constant error gives the same loss whatever the weight.
    """
    weights = 1.0 + float(weight) * enhancing.to(prediction.dtype)
    return (weights * (prediction - target) ** 2).sum() / weights.sum()
