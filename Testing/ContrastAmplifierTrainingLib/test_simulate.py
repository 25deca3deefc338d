"""--simulate-low-dose: linear interpolation of the enhancement plus matched noise."""

from __future__ import annotations

import numpy as np

from ContrastAmplifierTrainingLib.simulate import DOSE_RATIO, estimate_noise_sigma, simulate_low_dose_arrays


def test_enhancement_scaled_by_dose_ratio_and_noise_matched():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    anatomy = np.full(shape, 100.0)
    enhancement = np.zeros(shape)
    enhancement[15:25, 15:25, 15:25] = 80.0
    sigma = 4.0
    t1 = anatomy + sigma * rng.standard_normal(shape)
    t1c = anatomy + enhancement + sigma * rng.standard_normal(shape)
    assert abs(estimate_noise_sigma(t1) - sigma) < 0.3
    low = simulate_low_dose_arrays(t1, t1c, seed=1)
    inside = (slice(17, 23),) * 3
    assert abs(low[inside].mean() - (100 + DOSE_RATIO * 80)) < 1.0
    assert abs(low[:10].mean() - 100) < 0.5
    assert abs(estimate_noise_sigma(low) - sigma) < 0.4, "the simulated T1c-low keeps the T1c's noise level"
