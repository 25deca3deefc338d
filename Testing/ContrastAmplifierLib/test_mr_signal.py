"""Signal equations against PHANTOM.md's worked example and basic MR physics."""

from __future__ import annotations

import numpy as np
import pytest

from ContrastAmplifierLib import mr_signal as mr

TR_WORKED = mr.GradientEcho(tr_ms=6.1, te_ms=0.0, flip_deg=12.0)


def test_worked_example_white_matter():
    """PHANTOM.md: white matter T1 650 ms at TR 6.1 ms, flip 12 deg gives S about 0.063."""
    assert mr.spoiled_gre(1.0, 650.0, 1e9, TR_WORKED) == pytest.approx(0.063, abs=0.001)


@pytest.mark.parametrize("conc, expected, ratio", [(0.075, 0.049, 0.78), (0.3, 0.073, 1.16), (1.2, 0.123, 1.97)])
def test_worked_example_lesion_doses(conc, expected, ratio):
    """PHANTOM.md: lesion T1_0 1200 ms at C 0.075 / 0.3 / 1.2 mmol/L gives 0.049 / 0.073 / 0.123."""
    t1, _ = mr.relax_with_gadolinium(1200.0, 100.0, conc, field_strength=1.5)
    s = mr.spoiled_gre(1.0, t1, 1e9, TR_WORKED)
    wm = mr.spoiled_gre(1.0, 650.0, 1e9, TR_WORKED)
    assert s == pytest.approx(expected, abs=0.0015)
    assert s / wm == pytest.approx(ratio, abs=0.02)


def test_gadolinium_shortens_relaxation_and_saturates():
    conc = np.array([0.0, 0.075, 0.3, 1.2])
    t1, t2 = mr.relax_with_gadolinium(1200.0, 110.0, conc)
    assert t1[0] == pytest.approx(1200.0) and t2[0] == pytest.approx(110.0)
    assert np.all(np.diff(t1) < 0) and np.all(np.diff(t2) < 0)
    s = mr.spoiled_gre(0.85, t1, 0.7 * t2, mr.table1_protocols(1.5)["t1c"])
    gains = np.diff(s) / np.diff(conc)
    assert np.all(gains > 0) and np.all(np.diff(gains) < 0), "GRE signal must rise with C and saturate"


def test_r1_depends_on_field_strength():
    t1_15, _ = mr.relax_with_gadolinium(1000.0, 100.0, 1.0, 1.5)
    t1_3, _ = mr.relax_with_gadolinium(1000.0, 100.0, 1.0, 3)
    assert 1000 / t1_15 - 1 == pytest.approx(3.6) and 1000 / t1_3 - 1 == pytest.approx(3.5)


def test_flair_nulls_csf():
    ti = mr.csf_null_inversion_time(4000.0, 7002.0)
    proto = mr.InversionRecovery(tr_ms=7002.0, te_ms=138.0, ti_ms=ti)
    csf = mr.inversion_recovery(1.0, 4000.0, 2000.0, proto)
    wm = mr.inversion_recovery(0.7, 700.0, 80.0, proto)
    oedema = mr.inversion_recovery(0.9, 1300.0, 160.0, proto)
    assert csf < 1e-6
    assert oedema > wm > 0.1


def test_spin_echo_and_diffusion():
    se = mr.SpinEcho(tr_ms=575.0, te_ms=10.0)
    assert mr.spin_echo(1.0, 650.0, 80.0, se) == pytest.approx((1 - np.exp(-575 / 650)) * np.exp(-10 / 80))
    assert mr.diffusion_attenuation(0.7e-3, 1000.0) == pytest.approx(np.exp(-0.7))


def test_table1_protocols():
    p15, p3 = mr.table1_protocols(1.5), mr.table1_protocols(3)
    assert (p15["t1c"].tr_ms, p15["t1c"].te_ms, p15["t1c"].flip_deg) == (6.1, 1.2, 12.0)
    assert (p3["t1c"].tr_ms, p3["t1c"].te_ms) == (6.1, 2.1)
    assert p15["t1"] == p15["t1c"] == p15["t1c_low"] == p15["t1c_x4"]
    assert (p15["adc"].tr_ms, p15["adc"].te_ms, p3["adc"].tr_ms) == (3349.0, 79.0, 5375.0)
    assert (p15["t1c_vfa"].tr_ms, p15["t1c_vfa"].te_ms) == (575.0, 10.0)
    assert 2000 < p15["flair"].ti_ms < 2500
    with pytest.raises(ValueError, match="use 1.5 or 3"):
        mr.table1_protocols(2.0)


def test_rician_noise_statistics():
    rng = np.random.default_rng(0)
    zero = mr.add_rician_noise(np.zeros(200_000, np.float32), 2.0, rng)
    assert zero.mean() == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.02)  # Rayleigh floor
    high = mr.add_rician_noise(np.full(200_000, 100.0, np.float32), 2.0, rng)
    assert high.mean() == pytest.approx(100.0, abs=0.1) and high.std() == pytest.approx(2.0, rel=0.03)
    clean = np.arange(5, dtype=np.float32)
    assert np.array_equal(mr.add_rician_noise(clean, 0.0, rng), clean)
    with pytest.raises(ValueError):
        mr.add_rician_noise(clean, -1.0, rng)
