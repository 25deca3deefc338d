"""MR signal equations used by the synthetic phantom (magnitude, noise-free, plus Rician noise).

Every equation and constant comes from ``shared/PHANTOM.md`` ("Signal equations",
"Gadolinium") and the paper's Table 1 (Bone, Ammari et al., Invest Radiol 2022, "MRI Protocol").
Times are in milliseconds, concentrations in mmol/L, relaxivities in L/mmol/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

import numpy as np

ArrayLike = Union[float, np.ndarray]

#: Gadoterate meglumine relaxivities (plasma, 37 C), PHANTOM.md "Gadolinium": r1 3.6 at 1.5 T,
#: 3.5 at 3 T; r2 about 4.3 (L/mmol/s).
RELAXIVITY_R1 = {1.5: 3.6, 3.0: 3.5}
RELAXIVITY_R2 = 4.3

#: Doses simulated (mmol/kg), PHANTOM.md "Gadolinium" and paper "MRI Protocol".
DOSES_MMOL_PER_KG = {"t1": 0.0, "t1c_low": 0.025, "t1c": 0.1, "t1c_x4": 0.4}
STANDARD_DOSE = 0.1


@dataclass(frozen=True)
class GradientEcho:
    """Spoiled 3D gradient echo (paper Table 1 "3D rapid gradient echo", flip 12 deg)."""

    tr_ms: float
    te_ms: float
    flip_deg: float = 12.0
    kind: str = "spoiled_gradient_echo"


@dataclass(frozen=True)
class InversionRecovery:
    """T2-FLAIR: turbo spin echo with an inversion pulse nulling CSF (Table 1 TR/TE)."""

    tr_ms: float
    te_ms: float
    ti_ms: float
    kind: str = "inversion_recovery"


@dataclass(frozen=True)
class SpinEcho:
    """T1 turbo spin echo with variable flip angles (T1c-vfa), PHANTOM.md approximation."""

    tr_ms: float
    te_ms: float
    kind: str = "spin_echo"


@dataclass(frozen=True)
class DiffusionEPI:
    """Spin-echo EPI diffusion with b = 0 and b = ``b_value`` s/mm^2 (Table 1 ADC row)."""

    tr_ms: float
    te_ms: float
    b_value: float = 1000.0
    kind: str = "diffusion_epi"


Protocol = Union[GradientEcho, InversionRecovery, SpinEcho, DiffusionEPI]


def protocol_dict(protocol: Protocol) -> dict:
    """JSON-ready description of a protocol."""
    return asdict(protocol)


def csf_null_inversion_time(t1_csf_ms: float, tr_ms: float) -> float:
    """Inversion time (ms) that nulls a tissue of ``t1_csf_ms`` in inversion recovery.

    Solves ``1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0`` (PHANTOM.md FLAIR equation).
    """
    return float(t1_csf_ms * np.log(2.0 / (1.0 + np.exp(-tr_ms / t1_csf_ms))))


def table1_protocols(field_strength: float) -> dict[str, Protocol]:
    """Sequence parameters of the paper's Table 1 for the 1.5 T (Optima) or 3 T (Discovery) scanner.

    ``t1`` uses the T1c row on purpose: the dose series t1 / t1c_low / t1c / t1c_x4 is one
    sequence at four doses, so dose is the only difference (PHANTOM.md "Doses to simulate").
    FLAIR's TI nulls a nominal CSF T1 of 4000 ms (1.5 T) / 4150 ms (3 T).

    Raises:
        ValueError: ``field_strength`` is not 1.5 or 3.
    """
    fs = _check_field_strength(field_strength)
    if fs == 1.5:
        gre = GradientEcho(tr_ms=6.1, te_ms=1.2, flip_deg=12.0)
        flair_tr, flair_te, csf_t1 = 7002.0, 138.0, 4000.0
        dwi = DiffusionEPI(tr_ms=3349.0, te_ms=79.0)
    else:
        gre = GradientEcho(tr_ms=6.1, te_ms=2.1, flip_deg=12.0)
        flair_tr, flair_te, csf_t1 = 7002.0, 118.0, 4150.0
        dwi = DiffusionEPI(tr_ms=5375.0, te_ms=62.6)
    flair = InversionRecovery(flair_tr, flair_te, round(csf_null_inversion_time(csf_t1, flair_tr), 1))
    return {
        "t1": gre, "t1c_low": gre, "t1c": gre, "t1c_x4": gre,
        "flair": flair, "adc": dwi, "t1c_vfa": SpinEcho(tr_ms=575.0, te_ms=10.0),
    }


def _check_field_strength(field_strength: float) -> float:
    fs = float(field_strength)
    if fs not in (1.5, 3.0):
        raise ValueError(f"field strength {field_strength!r} T is not supported; use 1.5 or 3 (paper Table 1).")
    return fs


def relax_with_gadolinium(t1_ms: ArrayLike, t2_ms: ArrayLike, conc_mmol_l: ArrayLike,
                          field_strength: float = 1.5) -> tuple[ArrayLike, ArrayLike]:
    """Relaxation times shortened by gadolinium: ``1/T = 1/T_0 + r * C`` (PHANTOM.md).

    Args:
        t1_ms, t2_ms: native relaxation times (ms).
        conc_mmol_l: gadolinium concentration (mmol/L), >= 0.
        field_strength: 1.5 or 3 (T), selects r1.

    Returns:
        ``(T1, T2)`` in ms.
    """
    r1 = RELAXIVITY_R1[_check_field_strength(field_strength)]
    c = np.asarray(conc_mmol_l, dtype=np.float64)
    t1 = 1000.0 / (1000.0 / np.asarray(t1_ms, dtype=np.float64) + r1 * c)
    t2 = 1000.0 / (1000.0 / np.asarray(t2_ms, dtype=np.float64) + RELAXIVITY_R2 * c)
    return t1, t2


def spoiled_gre(pd: ArrayLike, t1_ms: ArrayLike, t2star_ms: ArrayLike, protocol: GradientEcho) -> np.ndarray:
    """Spoiled gradient-echo magnitude ``PD sin a (1-E1)/(1-cos a E1) exp(-TE/T2*)`` (PHANTOM.md)."""
    alpha = np.deg2rad(protocol.flip_deg)
    e1 = np.exp(-protocol.tr_ms / np.asarray(t1_ms, dtype=np.float64))
    decay = np.exp(-protocol.te_ms / np.maximum(np.asarray(t2star_ms, dtype=np.float64), 1e-6))
    return np.asarray(pd) * np.sin(alpha) * (1.0 - e1) / (1.0 - np.cos(alpha) * e1) * decay


def inversion_recovery(pd: ArrayLike, t1_ms: ArrayLike, t2_ms: ArrayLike, protocol: InversionRecovery) -> np.ndarray:
    """FLAIR magnitude ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)`` (PHANTOM.md)."""
    t1 = np.asarray(t1_ms, dtype=np.float64)
    mz = np.abs(1.0 - 2.0 * np.exp(-protocol.ti_ms / t1) + np.exp(-protocol.tr_ms / t1))
    return np.asarray(pd) * mz * np.exp(-protocol.te_ms / np.maximum(np.asarray(t2_ms, dtype=np.float64), 1e-6))


def spin_echo(pd: ArrayLike, t1_ms: ArrayLike, t2_ms: ArrayLike, protocol: Union[SpinEcho, DiffusionEPI]) -> np.ndarray:
    """Spin-echo magnitude ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (PHANTOM.md, T1c-vfa and DWI b=0)."""
    t1 = np.asarray(t1_ms, dtype=np.float64)
    return np.asarray(pd) * (1.0 - np.exp(-protocol.tr_ms / t1)) * np.exp(
        -protocol.te_ms / np.maximum(np.asarray(t2_ms, dtype=np.float64), 1e-6))


def diffusion_attenuation(adc_mm2_s: ArrayLike, b_value: float) -> np.ndarray:
    """Mono-exponential diffusion attenuation ``exp(-b ADC)`` (b in s/mm^2, ADC in mm^2/s)."""
    return np.exp(-b_value * np.asarray(adc_mm2_s, dtype=np.float64))


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``(S + n_re) + i n_im`` with Gaussian ``n`` of std ``sigma`` (PHANTOM.md "Noise")."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    s = np.asarray(signal, dtype=np.float32)
    if sigma == 0:
        return s.copy()
    real = rng.standard_normal(s.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += s
    imag = rng.standard_normal(s.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    return np.hypot(real, imag)
