"""``contrast-amplifier-train evaluate``: the metric functions on hand-made arrays with hand-worked
numbers, and the command end to end on small phantom cases with a tiny random bundle."""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from ContrastAmplifierLib.metrics import healthy_brain_roi, roi_contrast
from ContrastAmplifierTrainingLib import phantom_eval as pe
from ContrastAmplifierTrainingLib.cli import app, expand_multi_value_options
from ContrastAmplifierTrainingLib.metrics import ssim3d

# -- metric functions -----------------------------------------------------------------------------


def test_seed_ranges_and_their_errors():
    assert pe.parse_seed_range("730000-730002") == [730000, 730001, 730002]
    assert pe.parse_seed_range("7") == [7]
    for bad in ("5-2", "a-b", "1-2-3", "-3"):
        with pytest.raises(ValueError, match="--phantom-seeds") as info:
            pe.parse_seed_range(bad)
        assert "FIRST-LAST" in str(info.value)


def test_size_bands_at_their_edges():
    assert [pe.size_band(d) for d in (2.0, 4.99, 5.0, 7.5, 10.0, 10.01, 35.0)] == [
        "<5 mm", "<5 mm", "5-10 mm", "5-10 mm", "5-10 mm", ">10 mm", ">10 mm"]


def test_gap_fraction_hand_worked():
    # T1c CNR 1, T1c-x4 CNR 3: the gap is 2.
    assert pe.gap_fraction(2.0, 1.0, 3.0) == 0.5
    assert pe.gap_fraction(1.0, 1.0, 3.0) == 0.0
    assert pe.gap_fraction(3.5, 1.0, 3.0) == 1.25
    assert pe.gap_fraction(0.0, 1.0, 3.0) == -0.5
    assert math.isnan(pe.gap_fraction(2.0, 1.0, 1.0 + pe.MIN_CNR_GAP / 2))  # no gap worth recovering
    assert math.isnan(pe.gap_fraction(2.0, 1.0, math.nan))


def test_linear_dose_baseline():
    t1c = np.array([10.0, 5.0, 7.0])
    t1 = np.array([4.0, 5.0, math.nan])  # the last voxel is outside the T1's field of view
    assert pe.linear_dose_baseline(t1c, t1).tolist() == [28.0, 5.0, 7.0]  # 10 + 3 x 6; no enhancement; T1c


def test_false_enhancement_ratio_hand_worked():
    t1c = np.full((2, 2, 2), 50.0)
    image = t1c.copy()
    roi = np.zeros((2, 2, 2), bool)
    roi[0] = True  # four voxels: differences 1, -3, 2, 0 -> mean |d| = 1.5
    image[0] += np.array([[1.0, -3.0], [2.0, 0.0]])
    image[1] += 100.0  # outside the ROI: ignored
    assert pe.false_enhancement_ratio(image, t1c, roi, noise_sd=2.0) == pytest.approx(0.75)
    assert math.isnan(pe.false_enhancement_ratio(image, t1c, roi, noise_sd=0.0))
    assert math.isnan(pe.false_enhancement_ratio(image, t1c, np.zeros_like(roi), noise_sd=2.0))


def test_psnr_hand_worked_and_against_numpy():
    reference = np.zeros((3, 3, 3))
    reference[1, 1, 1] = 10.0  # range 10 inside the mask
    mask = np.ones_like(reference, bool)
    assert pe.psnr_in_mask(reference + 1.0, reference, mask) == pytest.approx(20.0)  # 20 log10(10 / 1)
    rng = np.random.default_rng(1)
    reference = rng.uniform(0, 5, (8, 9, 10))
    image = reference + rng.normal(0, 0.3, reference.shape)
    mask = rng.uniform(size=reference.shape) > 0.4
    rmse = np.sqrt(np.mean(np.square(image[mask] - reference[mask])))
    expected = 20 * np.log10(np.ptp(reference[mask]) / rmse)
    assert pe.psnr_in_mask(image, reference, mask) == pytest.approx(expected, rel=1e-12)
    assert pe.psnr_in_mask(reference, reference, mask) == math.inf


def test_masked_ssim_is_ssim3d_away_from_the_edges():
    rng = np.random.default_rng(2)
    reference = ndimage_smooth(rng.normal(size=(20, 22, 24)))
    image = reference + rng.normal(0, 0.2, reference.shape)
    radius = int(3 * 1.5 + 0.5)
    interior = np.zeros(reference.shape, bool)
    interior[radius:-radius, radius:-radius, radius:-radius] = True  # exactly ssim3d's "valid" voxels
    expected = ssim3d(torch.from_numpy(image), torch.from_numpy(reference), data_range=2.0)
    assert pe.ssim_in_mask(image, reference, interior, data_range=2.0) == pytest.approx(expected, abs=1e-5)
    assert pe.ssim_in_mask(reference, reference, np.ones_like(interior), data_range=2.0) == pytest.approx(1.0)


def ndimage_smooth(volume: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(volume, 2.0)


def test_lesion_contrasts_hand_worked():
    image = np.empty((4, 4, 4))
    healthy = np.array([99.0, 101.0] * 32).reshape(4, 4, 4)
    image[...] = healthy
    labels = np.zeros((4, 4, 4), np.int32)
    labels[0, 0, 0], labels[3, 3, 3] = 1, 2
    image[0, 0, 0], image[3, 3, 3] = 120.0, 110.0
    # The two lesion voxels held 99 and 101 (positions 0 and 63): the 62 healthy voxels are 31 x 99 and 31 x 101,
    # mean 100, SD (n - 1) sqrt(62 / 61); pre-contrast 100 in both lesions.
    pre = np.full((4, 4, 4), 100.0)
    sd = math.sqrt(62 / 61)
    out = pe.lesion_contrasts({"t1c": image}, labels, np.ones((4, 4, 4), bool), pre, margin_voxels=0)
    assert out[1]["t1c"].cnr == pytest.approx(20 / sd) and out[2]["t1c"].cnr == pytest.approx(10 / sd)
    assert out[1]["t1c"].lbr == pytest.approx(1.2) and out[2]["t1c"].cep == pytest.approx(10.0)


def test_long_axis_from_label_voxels():
    labels = np.zeros((3, 3, 9), np.int32)
    labels[1, 1, 2:7] = 4  # five voxels along x, 2 mm apart: centres 8 mm apart, plus one voxel
    assert pe.long_axis_from_labels(labels, 4, (2.0, 1.0, 1.0)) == pytest.approx(10.0)
    labels[:] = 0
    labels[0, 0, 0] = labels[2, 2, 2] = 1  # the diagonal of a 2 x 2 x 2 mm box, plus one voxel along it
    assert pe.long_axis_from_labels(labels, 1, (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(12) + math.sqrt(3))
    sizes = pe.lesion_sizes(labels, (1.0, 1.0, 1.0), {"lesions_truth": []}, {"lesions": [{"id": 1, "long_mm": 7.0}]})
    assert sizes[1].long_axis_mm == 7.0 and sizes[1].source == "lesions.json long_mm"
    sizes = pe.lesion_sizes(labels, (1.0, 1.0, 1.0), {"lesions_truth": [{"id": 1, "long_axis_3d_mm": 4.2}]}, None)
    assert sizes[1].long_axis_mm == 4.2 and pe.size_band(sizes[1].long_axis_mm) == "<5 mm"


def test_scales_and_noise():
    assert pe.signal_scale({"scanner_gain": 10000.0, "sequences": {"t1c": {}}}, "t1c") == (10000.0, 0.0)
    clinical = {"scanner_gain": "per sequence", "sequences": {"t1c": {"storage": {"gain": 2.0, "offset": 5.0}}}}
    assert pe.to_signal(np.array([9.0]), clinical, "t1c").tolist() == [2.0]  # (9 - 5) / 2
    assert pe.signal_scale(None, "t1c") == (1.0, 0.0)
    air = np.random.default_rng(3).rayleigh(3.0, size=(40, 40, 40))
    assert pe.estimate_noise_sd(air) == pytest.approx(3.0, rel=0.05)


def test_summary_counts_and_means():
    def lesion(band_mm: float, t1c: float, pro: float, x4: float) -> dict:
        row = {"size_band": pe.size_band(band_mm), "long_axis_mm": band_mm}
        for key in pe.IMAGES:
            row.update({f"cnr_{key}": 1.0, f"lbr_{key}": 1.0, f"cep_{key}": 1.0})
        row.update(cnr_t1c=t1c, cnr_t1c_pro=pro, cnr_t1c_x4=x4)
        row["gap_fraction_t1c_pro"] = pe.gap_fraction(pro, t1c, x4)
        row["gap_fraction_t1c_lin"] = math.nan
        return row

    lesions = [lesion(3.0, 1.0, 2.0, 3.0), lesion(20.0, 1.0, 1.5, 2.0), lesion(30.0, 1.0, 3.0, 2.0)]
    case = {"n_lesions": 3, **{f"{m}_{k}": 1.0 for m in ("psnr", "ssim") for k in pe.COMPARED},
            **{f"false_enhancement_{k}": 0.5 for k in ("t1c_pro", "t1c_lin", "t1c_x4")}}
    summary = pe.summarise(lesions, [case | {"psnr_t1c_pro": 2.0}, case])
    bands = summary["size_bands"]
    assert [bands[b]["n_lesions"] for b in (*pe.SIZE_BANDS, "all")] == [1, 0, 2, 3]
    assert bands[">10 mm"]["gap_fraction_t1c_pro"]["mean"] == pytest.approx((0.5 + 2.0) / 2)
    assert bands["all"]["cnr"]["t1c_pro"] == pytest.approx(6.5 / 3)
    assert summary["cases"]["psnr_wins_t1c_pro_vs_t1c"] == 1
    text = pe.summary_markdown(summary, {"name": "m", "intended_use": "synthetic phantom demo - not for clinical use"}, "x")
    assert "synthetic phantom demo - not for clinical use" in text and "| >10 mm | 2 |" in text


# -- the command, end to end ----------------------------------------------------------------------


@pytest.fixture
def invoke():
    """Run ``contrast-amplifier-train ARGS`` in-process; the command's SIGTERM handler is undone afterwards."""
    saved = signal.getsignal(signal.SIGTERM)
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, expand_multi_value_options(["evaluate", *map(str, args)]))
    signal.signal(signal.SIGTERM, saved)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat64))


FAST = ("--flips", "1", "--folds", "0", "--device", "cpu", "--threads", "1", "--progress", "none")
MODELS_ENV = "CONTRAST_AMPLIFIER_MODELS"


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, random_bundle_dir):
    """``(bundle, out, result)``: one ``evaluate --record`` of phantom seeds 730000-730001 at 4 mm by an
    installed copy of the tiny random bundle (``$CONTRAST_AMPLIFIER_MODELS/random-tiny``), named by its path.
    The end-to-end test checks the outputs, the record test what was recorded."""
    root = tmp_path_factory.mktemp("recorded")
    bundle = Path(shutil.copytree(random_bundle_dir, root / "models" / "random-tiny"))
    out = root / "eval"
    saved = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODELS_ENV, str(root / "models"))
        # 730001 has no lesion: it counts for PSNR/SSIM/false enhancement only
        args = ["evaluate", str(bundle), str(out), "--phantom-seeds", "730000-730001", "--spacing", "4", "--record", *FAST]
        result = CliRunner().invoke(app, expand_multi_value_options(args))
    signal.signal(signal.SIGTERM, saved)
    return bundle, out, result


def test_evaluate_phantom_seeds_end_to_end(recorded_run, random_bundle_dir, invoke):
    _, out, result = recorded_run
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() and (out / name).stat().st_size > 0 for name in pe.OUTPUT_FILES)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "random-tiny" in summary and "tests only" in summary and "| all |" in summary

    lesions, cases = _read_csv(out / "lesions.csv"), _read_csv(out / "cases.csv")
    assert [c["case"] for c in cases] == ["seed_730000", "seed_730001"] and cases[1]["n_lesions"] == "0"
    assert lesions and {r["case"] for r in lesions} == {"seed_730000"}
    case_dir = out / "cases" / "seed_730000"
    labels = _array(case_dir / "lesion_labels.nii.gz").astype(int)
    brain = _array(case_dir / "brain_mask.nii.gz") > 0
    x4 = _array(case_dir / "t1c_x4.nii.gz")
    roi = healthy_brain_roi(brain, labels > 0, margin_voxels=1)  # 3 mm at 4 mm voxels
    for row in lesions:
        cnr = {k: float(row[f"cnr_{k}"]) for k in pe.IMAGES}
        assert float(row["gap_fraction_t1c_pro"]) == pytest.approx(
            (cnr["t1c_pro"] - cnr["t1c"]) / (cnr["t1c_x4"] - cnr["t1c"]), rel=1e-4, abs=1e-5) \
            if cnr["t1c_x4"] - cnr["t1c"] >= pe.MIN_CNR_GAP else row["gap_fraction_t1c_pro"] == "nan"
        assert row["size_band"] == pe.size_band(float(row["long_axis_mm"]))
        independent = roi_contrast(x4, labels == int(row["lesion"]), roi)
        assert float(row["cnr_t1c_x4"]) == pytest.approx(independent.cnr, rel=1e-5)
        assert float(row["lbr_t1c_x4"]) == pytest.approx(independent.lbr, rel=1e-5)  # paper protocol: one gain, no offset

    t1c = _array(case_dir / "t1c.nii.gz") / 10000.0
    x4s = x4 / 10000.0
    mse = np.mean((t1c[brain] - x4s[brain]) ** 2)
    assert float(cases[0]["psnr_t1c"]) == pytest.approx(10 * np.log10(np.ptp(x4s[brain]) ** 2 / mse), rel=1e-5)
    for case in cases:
        assert 0 < float(case["false_enhancement_t1c_x4"]) < 3 and int(case["wm_voxels"]) > 100
    report = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert report["bundle"]["intended_use"] == "tests only" and report["settings"]["folds"] == [0]
    assert report["summary"]["size_bands"]["all"]["n_lesions"] == len(lesions)

    stamp = (case_dir / "phantom.json").stat().st_mtime_ns
    again = invoke(random_bundle_dir, out, "--phantom-seeds", "730000-730001", "--spacing", "4", *FAST)
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    again = invoke(random_bundle_dir, out, "--phantom-seeds", "730000-730001", "--spacing", "3", "--overwrite", *FAST)
    assert again.exit_code == 2 and "seed_730000" in again.output and "3 mm" in again.output  # another spacing: refused
    assert (case_dir / "phantom.json").stat().st_mtime_ns == stamp  # the generated cases are kept as they were


def _reuse_cases(out: Path, target: Path, seeds: tuple[int, ...]) -> Path:
    """A new evaluation folder holding copies of ``out``'s generated phantom cases (reused, not regenerated)."""
    for seed in seeds:
        shutil.copytree(out / "cases" / f"seed_{seed}", target / "cases" / f"seed_{seed}")
    return target


def _table_rows(table: str, first_cells: tuple[str, ...]) -> dict[str, list[str]]:
    """The Markdown table rows whose first cell is one of ``first_cells``: first cell -> the other cells."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            rows[cells[0]] = cells[1:]
    return rows


def _cell(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def test_record_evaluation_in_the_bundle(recorded_run, random_bundle_dir, tmp_path, monkeypatch):
    from ContrastAmplifierLib.bundle import BundleError, load_bundle, read_manifest, validate_manifest
    from ContrastAmplifierTrainingLib import evaluation_record as er

    bundle, out, result = recorded_run
    assert result.exit_code == 0, result.output
    monkeypatch.setenv(MODELS_ENV, str(bundle.parent))
    manifest_path = bundle / "bundle.json"
    original = json.loads((random_bundle_dir / "bundle.json").read_text(encoding="utf-8"))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert {k: v for k, v in manifest.items() if k != "evaluation"} == original  # only the record was added
    assert load_bundle(bundle).folds == [0, 1]  # schema, cross-field rules, SHA-256 and tensors of both weight files
    assert read_manifest(bundle)["evaluation"] == manifest["evaluation"]

    report = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    [entry] = manifest["evaluation"]
    assert entry["summary"] == report["summary"]
    assert entry["settings"] == {k: v for k, v in report["settings"].items() if k != "device"}
    assert entry["source"] == report["source"] == "phantom seeds 730000-730001 (2 cases, 4 mm, paper protocol)"
    assert entry["label"] == pe.PHANTOM_LABEL and entry["package_version"] == "0.1.0"
    assert (entry["n_cases"], entry["n_lesions"]) == (2, len(_read_csv(out / "lesions.csv")))
    recorded_at = datetime.fromisoformat(entry["date"])
    assert recorded_at.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - recorded_at) < timedelta(hours=1)
    # an installed model (given by its path): the command names it by its registry name; --folds 0 is not all folds
    assert entry["command"] == shlex.join(["contrast-amplifier-train", "evaluate", "random-tiny", "--phantom-seeds",
                                           "730000-730001", "--spacing", "4", "--protocol", "paper", "--folds", "0",
                                           "--flips", "1", str(out)])
    assert er.bundle_reference(str(random_bundle_dir), "random-tiny", random_bundle_dir) == str(random_bundle_dir)

    # the recorded table: summary.md's two tables, numbers as in the summary
    table = er.recorded_table(manifest)
    bands = _table_rows(table, (*pe.SIZE_BANDS, "all"))
    assert list(bands) == [*pe.SIZE_BANDS, "all"]
    for band, cells in bands.items():
        values = entry["summary"]["size_bands"][band]
        pro, lin = values["gap_fraction_t1c_pro"], values["gap_fraction_t1c_lin"]
        assert cells == [str(values["n_lesions"]), *(_cell(values["cnr"][k]) for k in pe.IMAGES),
                         f"{_cell(pro['mean'])} / {_cell(pro['median'])} (n={pro['n_defined']})", _cell(lin["mean"])]
        assert all(math.isclose(float(c), values["cnr"][k], abs_tol=0.005)
                   for c, k in zip(cells[1:6], pe.IMAGES) if c != "n/a")
    per_case = entry["summary"]["cases"]
    images = _table_rows(table, tuple(pe.IMAGES[k] for k in pe.COMPARED))
    for key in pe.COMPARED:
        psnr, ssim, fe = images[pe.IMAGES[key]]
        assert float(psnr) == pytest.approx(per_case[f"psnr_{key}"], abs=0.005)
        assert float(ssim) == pytest.approx(per_case[f"ssim_{key}"], abs=0.00005)
        if key != "t1c":
            fe_mean, fe_max = (float(v) for v in fe.split(" / "))
            assert (fe_mean, fe_max) == pytest.approx((per_case[f"false_enhancement_{key}"]["mean"],
                                                       per_case[f"false_enhancement_{key}"]["max"]), abs=0.005)
    assert entry["command"] in table and er.recorded_table(original) == ""

    # the recorded command, rerun (cases reused): the same source and settings replace the entry
    again = _reuse_cases(out, tmp_path / "again", (730000, 730001))
    command = shlex.split(entry["command"])[1:-1] + [str(again), "--device", "cpu", "--threads", "1", "--progress", "none",
                                                     "--record"]
    rerun = CliRunner().invoke(app, expand_multi_value_options(command))
    assert rerun.exit_code == 0, rerun.output
    [replaced] = read_manifest(bundle)["evaluation"]
    assert replaced["command"] == shlex.join(shlex.split(entry["command"])[:-1] + [str(again)])
    assert replaced["summary"] == json.loads((again / "evaluation.json").read_text(encoding="utf-8"))["summary"]
    assert replaced["date"] >= entry["date"] and replaced["n_lesions"] == entry["n_lesions"]
    # another seed range adds an entry after it
    one = _reuse_cases(out, tmp_path / "one", (730000,))
    added = CliRunner().invoke(app, expand_multi_value_options(
        ["evaluate", str(bundle), str(one), "--phantom-seeds", "730000-730000", "--spacing", "4", "--record", *FAST]))
    assert added.exit_code == 0, added.output
    records = load_bundle(bundle).manifest["evaluation"]
    assert [r["source"] for r in records] == [entry["source"], "phantom seeds 730000-730000 (1 cases, 4 mm, paper protocol)"]
    assert records[0] == replaced and records[1]["n_cases"] == 1
    assert records[1]["summary"] == json.loads((one / "evaluation.json").read_text(encoding="utf-8"))["summary"]
    assert [line for line in er.recorded_table(read_manifest(bundle)).splitlines() if line.startswith("### ")] == \
        [f"### {r['source']}" for r in records]
    broken = read_manifest(bundle)
    del broken["evaluation"][1]["summary"]
    with pytest.raises(BundleError, match="evaluation/1"):
        validate_manifest(broken)

    # refused before any work: a read-only bundle.json, or a bundle that is not a folder
    before = manifest_path.read_bytes()
    manifest_path.chmod(0o444)
    try:
        refused = CliRunner().invoke(app, expand_multi_value_options(
            ["evaluate", str(bundle), str(tmp_path / "refused"), "--phantom-seeds", "730002-730003", "--spacing", "4", "--record", *FAST]))
    finally:
        manifest_path.chmod(0o644)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "read-only" in refused.output and f"chmod u+w {manifest_path}" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert manifest_path.read_bytes() == before and not (tmp_path / "refused").exists()  # no phantom generated
    archive = Path(shutil.make_archive(str(tmp_path / "bundle"), "zip", bundle))
    refused = CliRunner().invoke(app, expand_multi_value_options(
        ["evaluate", str(archive), str(tmp_path / "refused"), "--phantom-seeds", "730002-730003", "--spacing", "4", "--record", *FAST]))
    assert refused.exit_code == 2 and "needs a bundle folder" in refused.output and "models import" in refused.output
    assert not (tmp_path / "refused").exists()


def test_evaluate_a_clinical_cohort_and_its_input_errors(tmp_path, small_case_dir, random_bundle_dir, invoke):
    from ContrastAmplifierLib.phantom import generate_cohort, read_signal

    cohort = tmp_path / "cohort"
    shutil.copytree(small_case_dir, cohort / "case_a")  # seed 31: no lesion
    generated = generate_cohort(tmp_path / "gen", cases=1, seed=730002, spacing=4.0, protocol="clinical")[0]
    case_b = Path(shutil.copytree(generated, cohort / "case_b"))  # a glioma; own gain and offset per sequence
    bundle = Path(shutil.copytree(random_bundle_dir, tmp_path / "bundle"))  # not installed: named by its path
    result = invoke(bundle, tmp_path / "eval", "--cohort", cohort, "--record", *FAST)
    assert result.exit_code == 0, result.output
    [entry] = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))["evaluation"]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text(encoding="utf-8"))
    assert entry["summary"] == report["summary"] and report["source"] == f"cohort {cohort} (2 cases)"
    assert entry["source"] == "cohort cohort (2 cases)" and entry["settings"]["cohort"] == "cohort"  # no machine path
    assert str(tmp_path) not in json.dumps({k: v for k, v in entry.items() if k != "command"})
    assert entry["command"] == shlex.join(["contrast-amplifier-train", "evaluate", str(bundle), "--cohort", str(cohort),
                                           "--folds", "0", "--flips", "1", str(tmp_path / "eval")])
    lesions, cases = _read_csv(tmp_path / "eval" / "lesions.csv"), _read_csv(tmp_path / "eval" / "cases.csv")
    assert [(c["case"], c["n_lesions"]) for c in cases] == [("case_a", "0"), ("case_b", str(len(lesions)))]
    assert lesions and {r["case"] for r in lesions} == {"case_b"}
    labels = _array(case_b / "lesion_labels.nii.gz").astype(int)
    brain = _array(case_b / "brain_mask.nii.gz") > 0
    x4 = read_signal(case_b, "t1c_x4")  # the phantom's own reader: signal units, storage undone
    margin = max(1, round(3.0 / min(sitk.ReadImage(str(case_b / "t1c.nii.gz")).GetSpacing())))
    roi = healthy_brain_roi(brain, labels > 0, margin_voxels=margin)
    for row in lesions:
        independent = roi_contrast(x4, labels == int(row["lesion"]), roi)
        assert float(row["cnr_t1c_x4"]) == pytest.approx(independent.cnr, rel=1e-5)
        assert float(row["lbr_t1c_x4"]) == pytest.approx(independent.lbr, rel=1e-5)

    only_a = tmp_path / "only_a"
    shutil.copytree(small_case_dir, only_a / "case_a")
    bad = invoke(random_bundle_dir, tmp_path / "e0", "--cohort", only_a, *FAST)
    assert bad.exit_code == 2 and "none of the 1 cases has a lesion" in bad.output
    bad = invoke(random_bundle_dir, tmp_path / "e1", "--phantom-seeds", "5-2")
    assert bad.exit_code == 2 and "--phantom-seeds '5-2'" in bad.output and "Traceback" not in bad.output
    (case_b / "t1c_x4.nii.gz").rename(tmp_path / "x4.nii.gz")
    bad = invoke(random_bundle_dir, tmp_path / "e2", "--cohort", cohort, *FAST)
    assert bad.exit_code == 2 and "t1c_x4.nii.gz is missing" in bad.output and "case_b" in bad.output
    (tmp_path / "x4.nii.gz").rename(case_b / "t1c_x4.nii.gz")
    labels_image = sitk.ReadImage(str(case_b / "lesion_labels.nii.gz"))
    sitk.WriteImage(labels_image * 0, str(case_b / "lesion_labels.nii.gz"))
    bad = invoke(random_bundle_dir, tmp_path / "e3", "--cohort", cohort, *FAST)
    assert bad.exit_code == 2 and "lesion_labels.nii.gz is empty" in bad.output and "1..N" in bad.output
    assert not any((tmp_path / name).exists() for name in ("e0", "e1", "e2", "e3"))
