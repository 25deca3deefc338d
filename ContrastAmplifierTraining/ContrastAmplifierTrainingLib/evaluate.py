"""Held-out evaluation of a bundle's T1c-low -> T1c prediction against simple baselines.

On cached (preprocessed) cases with a real T1c-low, compares inside the brain mask, on the
bundle's [0, 1] scale (T1c-low and T1c both normalised with the bundle's "t1c" pair):

* ``model``: the ensemble (folds x mirrorings, :func:`ContrastAmplifierLib.ensemble.predict_ensemble`);
* ``identity``: the T1c-low itself;
* ``linear_dose``: linear extrapolation of the enhancement to the routine dose,
  T1 + (0.1 / 0.025) * (T1c-low - T1), on brain z-scores;
* ``linear_fit``: the best global affine map a * T1c-low + b (least squares over the cases;
  an upper bound for any global linear scaling).

Metrics: NRMSE (RMSE / RMS of the target, inside the brain) and PSNR (data range 1, inside the brain).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ContrastAmplifierLib.bundle import ModelBundle

from .data import CachedCase, normalize

DOSE_FACTOR = 0.1 / 0.025


def _metrics(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    error = prediction[mask].astype(np.float64) - target[mask]
    mse = float(np.mean(error**2))
    rms = float(np.sqrt(np.mean(target[mask].astype(np.float64) ** 2)))
    return {"nrmse": math.sqrt(mse) / max(rms, 1e-12), "psnr": math.inf if mse == 0 else 10 * math.log10(1.0 / mse)}


def evaluate_bundle(bundle: ModelBundle, cases: Sequence[CachedCase], n_mirrorings: int = 8, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Mean NRMSE and PSNR per method (see the module docstring) over ``cases``."""
    from ContrastAmplifierLib.ensemble import InferenceSettings, predict_ensemble

    models = bundle.load_models(device=device)
    settings = InferenceSettings.create(device=device, precision="exact")
    percentiles = bundle.percentiles
    lo, hi = percentiles["t1c"]
    per_method: dict[str, list[dict[str, float]]] = {"model": [], "identity": [], "linear_dose": [], "linear_fit": []}
    lows, targets, masks = [], [], []
    for case in cases:
        mask = case.mask
        channels = [normalize(case.channel(m), mask, *percentiles[k]) for m, k in
                    (("t1", "t1"), ("flair", "flair"), ("adc", "adc"), ("t1c_low", "t1c"))]
        target = normalize(case.channel("t1c"), mask, lo, hi)
        prediction = predict_ensemble(models, np.stack(channels), n_mirrorings=n_mirrorings, settings=settings)
        prediction = np.where(mask, prediction, 0.0)
        extrapolated = case.channel("t1") + DOSE_FACTOR * (case.channel("t1c_low") - case.channel("t1"))
        per_method["model"].append(_metrics(prediction, target, mask))
        per_method["identity"].append(_metrics(channels[3], target, mask))
        per_method["linear_dose"].append(_metrics(normalize(extrapolated, mask, lo, hi), target, mask))
        lows.append(channels[3][mask])
        targets.append(target[mask])
        masks.append((channels[3], target, mask))
    x, y = np.concatenate(lows), np.concatenate(targets)
    a, b = np.polyfit(x, y, 1)
    for low, target, mask in masks:
        per_method["linear_fit"].append(_metrics(np.where(mask, a * low + b, 0.0), target, mask))
    return {
        method: {key: float(np.mean([r[key] for r in rows])) for key in ("nrmse", "psnr")}
        for method, rows in per_method.items()
    }
