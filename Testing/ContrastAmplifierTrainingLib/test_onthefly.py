"""Phantom cases made on the fly by worker processes: shapes, reproducibility, prefetch, resume,
disk bound, settings guard (4 mm phantoms, the ``small`` lesion profile)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ContrastAmplifierTrainingLib.onthefly import (
    PhantomCaseSource,
    PhantomSourceError,
    PhantomSourceSettings,
    build_case,
)

SETTINGS = PhantomSourceSettings(first_seed=740_000, cases=3, spacing=4.0, crop_size=(40, 48, 40), lesions="small")


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onthefly")
    with PhantomCaseSource(folder, SETTINGS, workers=1, prefetch=1, keep_phantoms=True) as source:
        case = source.case(0)
        assert tuple(case.inputs.shape) == (4, 40, 48, 40) and tuple(case.target.shape) == (1, 40, 48, 40)
        assert float(case.inputs.min()) >= 0.0 and float(case.inputs.max()) <= 1.0 + 1e-6  # float32 rounding
        deadline = time.monotonic() + 120
        while not (folder / "cache" / "phantom_740001.npz").is_file():  # prefetched by the worker
            assert time.monotonic() < deadline, "case 1 was not prefetched"
            time.sleep(0.2)
    return folder


def test_cases_are_cached_with_the_small_lesion_profile(source_dir):
    meta = json.loads((source_dir / "phantoms" / "phantom_740000" / "phantom.json").read_text())
    assert meta["seed"] == 740_000 and meta["lesion_profile"]["name"] == "small"
    assert json.loads((source_dir / "source.json").read_text())["lesions"] == "small"
    assert not list((source_dir / "phantoms").glob(".*"))  # no half-built case left behind


def test_a_case_is_the_same_whoever_builds_it(source_dir, tmp_path):
    """Built again in this process (not a worker), case 0's arrays are identical."""
    from ContrastAmplifierTrainingLib.data import load_cached_case

    again = load_cached_case(build_case(tmp_path, SETTINGS, 0))
    first = load_cached_case(source_dir / "cache" / "phantom_740000.npz")
    assert np.array_equal(again.mask, first.mask)
    # Equal up to the order in which two registration threads add their sums (1e-12 mm).
    np.testing.assert_allclose(again.zscores, first.zscores, rtol=0, atol=1e-4)


def test_resume_reads_the_cache_and_other_settings_are_refused(source_dir):
    stamp = (source_dir / "cache" / "phantom_740000.npz").stat().st_mtime_ns
    with PhantomCaseSource(source_dir, SETTINGS, prefetch=0) as source:
        t0 = time.monotonic()
        source.cached(0)
        assert time.monotonic() - t0 < 5  # read back, not rebuilt
    assert (source_dir / "cache" / "phantom_740000.npz").stat().st_mtime_ns == stamp
    other = PhantomSourceSettings(first_seed=740_000, cases=3, spacing=3.0, crop_size=(40, 48, 40))
    with pytest.raises(PhantomSourceError, match=r"other settings \(spacing 4\.0 there, 3\.0 asked\)"):
        PhantomCaseSource(source_dir, other)
    with pytest.raises(IndexError):
        PhantomCaseSource(source_dir, SETTINGS, prefetch=0).cached(3)


def test_keep_cases_bounds_the_disk(source_dir):
    with PhantomCaseSource(source_dir, SETTINGS, prefetch=0, keep_cases=1,
                           percentiles={m: (-3.0, 3.0) for m in ("t1", "flair", "adc", "t1c")}) as source:
        source.case(0)
        source.case(1)
        assert not (source_dir / "cache" / "phantom_740000.npz").exists()
        assert (source_dir / "cache" / "phantom_740001.npz").exists()
        assert len(source) == 3 and source.percentiles["t1c"] == (-3.0, 3.0)
