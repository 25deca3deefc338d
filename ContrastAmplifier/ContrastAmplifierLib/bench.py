"""``contrast-amplifier bench`` / ``make bench``: preprocessing timings and the ANTs peer.

Two measurements, both on this machine and within one run (the machine is shared: compare
ratios, not absolute seconds):

1. Registration accuracy/speed: the 1 mm ICBM 2009a template moved by a
   known affine (10 degrees, 10 mm, scale 1.05) is registered back with our
   :func:`registration.register_affine` and with ANTsPy ``Affine`` and ``AffineFast``; each
   result is scored by its mean error in mm over the template brain against the known truth.
   ANTsPy (``antspyx==0.6.3``) downgrades numpy, so it runs in its own virtual environment
   (``--ants-python``) as a subprocess; images and transforms are exchanged as files.
2. The whole preprocessing of one 1 mm phantom case: HD-BET time, registration time, total.
3. ``--only registration`` (:func:`run_registration_bench`): the rigid registrations T1, FLAIR,
   ADC -> T1c of clinical-protocol phantom cases (2D thick-slice stacks, own fields of view,
   oblique, truncated slabs, motion, EPI distortion) against the phantom's ground truth, legacy
   two-start code vs the multi-start code, optionally ANTsPy ``Rigid`` and HD-BET's Dice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from ContrastAmplifierCommon.atomicfile import write_text_atomic
from .registration import AffineSettings, Template, load_template, mask_points_mm, mean_point_error_mm, register_affine, skull_stripped

__all__ = ["known_affine", "moved_template", "synthetic_head_case", "run_ants", "run_bench"]

#: Reference misalignment of the registration benchmark.
KNOWN_ROTATION_DEG = 10.0
KNOWN_TRANSLATION_MM = 10.0
KNOWN_SCALE = 1.05

ANTS_SCRIPT = r"""
import json, sys, time
import ants
fixed = ants.image_read(sys.argv[1])
moving = ants.image_read(sys.argv[2])
kind, out = sys.argv[3], sys.argv[4]
start = time.perf_counter()
result = ants.registration(fixed, moving, type_of_transform=kind, random_seed=1)
seconds = time.perf_counter() - start
tx = ants.read_transform(result["fwdtransforms"][0])
json.dump({"seconds": seconds, "parameters": [float(v) for v in tx.parameters],
           "fixed_parameters": [float(v) for v in tx.fixed_parameters], "type": kind}, open(out, "w", encoding="utf-8"))
"""


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def known_affine(center: tuple[float, float, float], rotation_deg: float = KNOWN_ROTATION_DEG,
                 translation_mm: float = KNOWN_TRANSLATION_MM, scale: float = KNOWN_SCALE,
                 axis=(1.0, 1.0, 1.0)) -> sitk.AffineTransform:
    """Rotation about ``axis`` by ``rotation_deg``, isotropic ``scale``, ``translation_mm`` along ``axis``."""
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(float(c) for c in center))
    transform.SetMatrix(tuple((_rotation(axis, rotation_deg) * scale).ravel()))
    direction = np.asarray(axis, float) / np.linalg.norm(axis)
    transform.SetTranslation(tuple(float(v) for v in direction * translation_mm))
    return transform


def _brain_centre(template: Template) -> tuple[float, float, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(template.brain_mask)
    return stats.GetCentroid(1)


def moved_template(template: Template, transform: sitk.Transform) -> tuple[sitk.Image, sitk.Image]:
    """The template brain and its mask resampled through ``transform`` (moving(y) = template(T(y))).

    The registration truth (atlas -> moving points) is then ``transform.GetInverse()``.
    """
    moving = sitk.Resample(template.image, template.image, transform, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    mask = sitk.Resample(template.brain_mask, template.image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return moving, mask


def _head(template: Template) -> tuple[sitk.Image, sitk.Image]:
    """Template brain plus a CSF gap, a dark skull and a bright scalp, on a padded grid (T1-like)."""
    pad = [20, 20, 20]
    brain = sitk.ConstantPad(template.image, pad, pad, 0.0)
    mask = sitk.ConstantPad(template.brain_mask, pad, pad, 0)
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False,
                                                               useImageSpacing=True))
    head = sitk.GetArrayFromImage(brain)
    head = np.where((dist > 0) & (dist <= 3), 0.08, head)  # CSF
    head = np.where((dist > 3) & (dist <= 8), 0.03, head)  # skull
    head = np.where((dist > 8) & (dist <= 13), 0.85, head)  # scalp fat
    out = sitk.GetImageFromArray(head.astype(np.float32))
    out.CopyInformation(brain)
    return out, mask


def synthetic_head_case(out_dir: Union[str, os.PathLike], spacing: float = 2.0, seed: int = 0,
                        template: Optional[Template] = None) -> Path:
    """A template-based head case with known poses: exact ground truth for registration checks, faster than a phantom.

    Writes ``t1, flair, adc, t1c .nii.gz`` (each on its own grid and pose), ``brain_mask.nii.gz`` on
    the T1c grid and ``truth.json`` with ``atlas_to_t1c`` and ``t1c_to_<m>`` (ITK parameters).
    """
    template = template or load_template(1)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head, mask = _head(template)
    arr = sitk.GetArrayFromImage(head)
    brain = sitk.GetArrayFromImage(mask) > 0
    contrasts = {
        "t1c": arr,
        "t1": arr ** 1.2,
        "flair": np.where(brain, 1.0 - 0.8 * arr, np.where(arr > 0.5, 0.6, arr)),
        "adc": np.where(brain, 1.2 - arr, 0.0),
    }
    centre = np.array(_brain_centre(template))
    truth: dict[str, dict] = {}
    poses: dict[str, sitk.Transform] = {}
    for name, values in contrasts.items():
        # native -> atlas pose: the T1c gets an affine like the reference misalignment; the others the same head
        # (same scale) moved by a random rigid offset in native space, so T1c -> modality is rigid.
        if name == "t1c":
            pose = known_affine(centre, 8.0, 6.0, 1.0 / KNOWN_SCALE)
        else:
            rigid = known_affine(centre, float(rng.uniform(4, 8)), float(rng.uniform(4, 8)), 1.0, axis=rng.normal(size=3))
            pose = _as_affine(sitk.CompositeTransform([poses["t1c"], rigid]))
        poses[name] = pose
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.CopyInformation(head)
        sp = (spacing, spacing, spacing * (2.5 if name == "flair" else 1.0))
        size = [int(np.ceil(n * s0 / s1)) for n, s0, s1 in zip(head.GetSize(), head.GetSpacing(), sp)]
        grid = sitk.Image(size, sitk.sitkFloat32)
        grid.SetSpacing(sp)
        grid.SetOrigin(head.GetOrigin())
        grid.SetDirection(head.GetDirection())
        native = sitk.Resample(sitk.SmoothingRecursiveGaussian(image, spacing / 2.0), grid, pose, sitk.sitkLinear, 0.0)
        noise = rng.normal(0, 0.02, size=sitk.GetArrayViewFromImage(native).shape).astype(np.float32)
        native = sitk.GetImageFromArray(np.abs(sitk.GetArrayFromImage(native) + noise) * 1000.0)
        native.CopyInformation(grid)
        sitk.WriteImage(native, str(out / f"{name}.nii.gz"))
        if name == "t1c":
            sitk.WriteImage(sitk.Resample(mask, grid, pose, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
                            str(out / "brain_mask.nii.gz"))
    atlas_to_t1c = poses["t1c"].GetInverse()
    truth["atlas_to_t1c"] = _params(atlas_to_t1c)
    for name in contrasts:
        if name != "t1c":
            # native t1c point -> atlas (pose_t1c) -> native m (pose_m inverse)
            t = sitk.CompositeTransform([poses[name].GetInverse(), poses["t1c"]])
            truth[f"t1c_to_{name}"] = _params(_as_affine(t))
    write_text_atomic(json.dumps(truth, indent=2), out / "truth.json")
    return out


def _params(transform: sitk.Transform) -> dict:
    t = sitk.AffineTransform(_as_affine(transform))
    return {"matrix": list(t.GetMatrix()), "translation": list(t.GetTranslation()), "center": list(t.GetCenter())}


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Collapse any composition of linear transforms into one AffineTransform (centre 0)."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.array(transform.TransformPoint(tuple(np.eye(3)[i]))) - origin for i in range(3)]
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(np.stack(columns, axis=1).ravel()))
    out.SetTranslation(tuple(origin))
    return out


def affine_from_params(params: dict) -> sitk.AffineTransform:
    """Inverse of :func:`_params` (as stored in ``truth.json``)."""
    t = sitk.AffineTransform(3)
    t.SetCenter(params["center"])
    t.SetMatrix(params["matrix"])
    t.SetTranslation(params["translation"])
    return t


def run_ants(python: Union[str, os.PathLike], fixed: Path, moving: Path, kind: str, work: Path,
             threads: int = 2) -> tuple[float, sitk.AffineTransform]:
    """Run ``ants.registration(fixed, moving, type_of_transform=kind)`` in ``python``'s venv.

    Returns:
        (seconds spent in ``ants.registration`` alone, the forward transform: fixed -> moving points).
    """
    script = work / "ants_register.py"
    script.write_text(ANTS_SCRIPT, encoding="utf-8")
    out = work / f"ants_{kind}.json"
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    subprocess.run([str(python), str(script), str(fixed), str(moving), kind, str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text(encoding="utf-8"))
    t = sitk.AffineTransform(3)
    p = data["parameters"]
    t.SetMatrix(p[:9])
    t.SetTranslation(p[9:12])
    t.SetCenter(data["fixed_parameters"][:3])
    return float(data["seconds"]), t


def _phantom_case(work: Path, spacing: float) -> tuple[Path, str]:
    from .phantom import generate_cohort

    paths = generate_cohort(work / "phantom", cases=1, seed=20261, spacing=spacing)
    return Path(paths[0]), "synthetic phantom (phantom.py)"


def run_bench(out_dir: Union[str, os.PathLike], ants_python: Optional[Union[str, os.PathLike]] = None,
              spacing: float = 1.0, threads: int = 2, skip_pipeline: bool = False) -> dict:
    """Run both benchmarks, print a table, write ``out_dir/results.json``; return the results."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=out))
    template = load_template(1)
    truth_fwd = known_affine(_brain_centre(template))
    moving, _ = moved_template(template, truth_fwd)
    truth = truth_fwd.GetInverse()  # atlas points -> moving points
    points = mask_points_mm(template.brain_mask, 20000)
    results: dict = {"machine_threads": threads, "protocol": "1 mm ICBM 2009a brain moved by 10 deg, 10 mm, scale 1.05"}

    # Ours (the preprocessing's own call; moving mask from the moved template, as HD-BET would give).
    # The machine is shared, so ours is timed before *and* after the ANTs runs and the ratio uses
    # the median of all our runs.
    moving_mask = sitk.Cast(moving > 0.05, sitk.sitkUInt8)
    seconds: list = []

    def _ours(repeats: int = 3) -> sitk.AffineTransform:
        for _ in range(repeats):
            start = time.perf_counter()
            est = register_affine(template.image, moving, template.brain_mask, moving_mask, AffineSettings(threads=threads))
            seconds.append(time.perf_counter() - start)
        return est

    est = _ours()
    error = mean_point_error_mm(est, truth, points)
    print(f"registration (ours, SimpleITK affine):  {np.median(seconds):6.2f} s   mean error {error:.3f} mm")
    ants_runs = {}
    if ants_python:
        fixed_path, moving_path = work / "fixed.nii.gz", work / "moving.nii.gz"
        sitk.WriteImage(template.image, str(fixed_path))
        sitk.WriteImage(moving, str(moving_path))
        for kind in ("Affine", "AffineFast"):
            secs, tx = run_ants(ants_python, fixed_path, moving_path, kind, work, threads)
            ants_runs[kind] = (secs, mean_point_error_mm(tx, truth, points))
            print(f"registration (ANTsPy {kind:10s}):      {secs:6.2f} s   mean error {ants_runs[kind][1]:.3f} mm")
        _ours()
    else:
        print("ANTsPy peer skipped (pass --ants-python; `make bench` builds .bench-venv)")
    ours_seconds = float(np.median(seconds))
    results["ours_affine"] = {"seconds": ours_seconds, "seconds_all": seconds, "mean_error_mm": error,
                              "settings": AffineSettings().__dict__}
    for kind, (secs, err) in ants_runs.items():
        results[f"ants_{kind}"] = {"seconds": secs, "mean_error_mm": err, "ours_speedup": secs / ours_seconds}
        print(f"ANTsPy {kind:10s} / ours: time ratio {secs / ours_seconds:5.1f}x "
              f"(ours {ours_seconds:.2f} s median of {len(seconds)} runs before and after ANTs)")

    if not skip_pipeline:
        from .preprocessing import preprocess_case_dir

        case_dir, source = _phantom_case(work, spacing)
        case = preprocess_case_dir(case_dir, out / "preprocessed", skull_strip_mode="fast", device="cpu", qc=True,
                                   overwrite=True)  # the bench's own output of an earlier run
        t = case.timings_s
        pipeline = {"case": str(case_dir), "source": source, "spacing_mm": spacing, "timings_s": t}
        mask_path = case_dir / "brain_mask.nii.gz"
        if mask_path.exists():
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
            got = sitk.GetArrayFromImage(case.native_brain_mask) > 0
            pipeline["hdbet_dice"] = float(2 * (ref & got).sum() / max(ref.sum() + got.sum(), 1))
        results["pipeline"] = pipeline
        print(f"skull strip (HD-BET fast, CPU):         {t['skull_strip']:6.2f} s"
              + (f"   Dice vs phantom mask {pipeline['hdbet_dice']:.3f}" if "hdbet_dice" in pipeline else ""))
        print(f"registration (affine + 3 rigid):        {t['registration']:6.2f} s")
        print(f"total preprocessing ({spacing:g} mm case):       {t['total']:6.2f} s   ({source})")
    write_text_atomic(json.dumps(results, indent=2, default=float), out / "results.json")
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":  # pragma: no cover
    run_bench(sys.argv[1] if len(sys.argv) > 1 else "bench-output")


# ---------------------------------------------------------------------------------------------
# Registration on the clinical-protocol phantom (``contrast-amplifier bench --only registration``)
# ---------------------------------------------------------------------------------------------

#: Seed of the first case of the registration bench's clinical phantom cohort (case i: seed + i).
REGISTRATION_BENCH_SEED = 700
#: Modalities registered rigidly to the T1c.
RIGID_MODALITIES = ("t1", "flair", "adc")
#: Targets (mean error over the brain, mm): every modality but the ADC, the ADC (EPI distortion
#: up to 3 mm that no rigid transform can undo), and the largest tolerated error of any case.
TARGET_MEAN_MM = {"t1": 1.5, "flair": 1.5, "adc": 2.5}
TARGET_CASE_MAX_MM = 3.0

ANTS_RIGID_SCRIPT = r"""
import json, sys, time
import numpy as np
import ants
jobs = json.load(open(sys.argv[1], encoding="utf-8"))
out = []
probe = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])
for job in jobs:
    fixed, moving = ants.image_read(job["fixed"]), ants.image_read(job["moving"])
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform=job["kind"], random_seed=1)
    seconds = time.perf_counter() - start
    tx = ants.read_transform(result["fwdtransforms"][0])
    mapped = np.array([tx.apply_to_point(tuple(float(v) for v in p)) for p in probe])
    matrix = np.eye(4)
    matrix[:3, 3] = mapped[0]
    matrix[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    out.append({"seconds": seconds, "matrix": matrix.tolist()})
json.dump(out, open(sys.argv[2], "w", encoding="utf-8"))
"""


def clinical_cohort(work: Path, cases: int, seed: int, spacing: Optional[float]) -> list[Path]:
    """The bench's clinical-protocol phantom cases (kept between runs: a folder per seed and spacing)."""
    from .phantom import generate_cohort

    folder = work / f"clinical-seed{seed}-{'native' if spacing is None else f'{spacing:g}mm'}"
    return generate_cohort(folder, cases=cases, seed=seed, spacing=spacing, protocol="clinical", skip_existing=True)


def _rigid_rows(case: Path, threads: int) -> list[dict]:
    """Legacy and multi-start rigid registrations of one case, scored against the phantom's truth."""
    from .imageio import read_image
    from .phantom import registration_error_mm
    from .plausibility import check_alignment, check_registration
    from .registration import RigidSettings, mask_points_mm, register_rigid_detailed

    t1c = read_image(case / "t1c.nii.gz", "T1c")
    mask = sitk.ReadImage(str(case / "brain_mask.nii.gz"), sitk.sitkUInt8)
    points = mask_points_mm(mask, 5000)
    rows = []
    for modality in RIGID_MODALITIES:
        image = read_image(case / f"{modality}.nii.gz", modality)
        for method in ("legacy", "multi"):
            result = register_rigid_detailed(t1c, image, mask, RigidSettings(starts=method, threads=threads))
            error = registration_error_mm(case, modality, result.transform)
            other_checks = check_alignment(modality, t1c, image, result.transform, mask, points)
            rows.append({"case": case.name, "modality": modality, "method": method, "mean_mm": error.mean_mm,
                         "max_mm": error.max_mm, "seconds": result.seconds, "peak": result.peak, "nmi": result.nmi,
                         "start": result.start, "agreeing_starts": result.agreeing_starts,
                         "suspect": bool(check_registration(modality, result)),
                         "other_findings": [f.code for f in other_checks]})
    return rows


def _affine_row(case: Path, threads: int) -> dict:
    """The T1c -> ICBM 2009a affine (skull-stripped with the phantom's mask), scored on the T1c brain.

    The phantom's world is the template's space, so ``world_to_native_lps`` of the T1c is the true
    atlas -> T1c map: error = |estimate(truth^-1(p)) - p| over the T1c brain voxels p.
    """
    from .imageio import read_image

    template = load_template(1)
    t1c = read_image(case / "t1c.nii.gz", "T1c")
    mask = sitk.ReadImage(str(case / "brain_mask.nii.gz"), sitk.sitkUInt8)
    start = time.perf_counter()
    estimate = register_affine(template.image, skull_stripped(t1c, mask), template.brain_mask, mask, AffineSettings(threads=threads))
    seconds = time.perf_counter() - start
    error = _atlas_error_mm(case, estimate, mask)
    return {"case": case.name, "modality": "t1c", "method": "affine_to_atlas", "mean_mm": float(error.mean()),
            "max_mm": float(error.max()), "seconds": seconds}


def _atlas_error_mm(case: Path, estimate: sitk.Transform, mask: sitk.Image) -> np.ndarray:
    """|estimate(truth^-1(p)) - p| over the T1c brain voxels p (mm); truth = the T1c's ``world_to_native_lps``."""
    truth = np.array(json.loads((case / "phantom.json").read_text(encoding="utf-8"))["sequences"]["t1c"]["world_to_native_lps"])
    points = mask_points_mm(mask, 5000)
    world = (np.linalg.inv(truth) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    return np.linalg.norm(np.array([estimate.TransformPoint(tuple(p)) for p in world]) - points, axis=1)


def _ants_rows(python: Union[str, os.PathLike], cases: list[Path], work: Path, threads: int) -> list[dict]:
    """ANTsPy in its own venv: ``Rigid`` (modality -> T1c) and ``AffineFast`` (T1c brain -> ICBM 2009a brain)."""
    from .imageio import read_image
    from .phantom import registration_error_mm

    template_path = work / "template.nii.gz"
    sitk.WriteImage(load_template(1).image, str(template_path))
    jobs, keys = [], []
    for case in cases:
        for modality in RIGID_MODALITIES:
            jobs.append({"fixed": str(case / "t1c.nii.gz"), "moving": str(case / f"{modality}.nii.gz"), "kind": "Rigid"})
            keys.append((case, modality, "ants_rigid"))
        brain = work / f"{case.name}_t1c_brain.nii.gz"
        mask = sitk.ReadImage(str(case / "brain_mask.nii.gz"), sitk.sitkUInt8)
        sitk.WriteImage(skull_stripped(read_image(case / "t1c.nii.gz", "T1c"), mask), str(brain))
        jobs.append({"fixed": str(template_path), "moving": str(brain), "kind": "AffineFast"})
        keys.append((case, "t1c", "ants_affine_fast"))
    script, job_file, out_file = work / "ants_rigid.py", work / "ants_jobs.json", work / "ants_rigid.json"
    script.write_text(ANTS_RIGID_SCRIPT, encoding="utf-8")
    job_file.write_text(json.dumps(jobs), encoding="utf-8")
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    subprocess.run([str(python), str(script), str(job_file), str(out_file)], check=True, env=env, stdout=subprocess.DEVNULL)
    rows = []
    for (case, modality, method), done in zip(keys, json.loads(out_file.read_text(encoding="utf-8"))):
        matrix = np.array(done["matrix"])
        if modality == "t1c":
            estimate = sitk.AffineTransform(3)
            estimate.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
            estimate.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
            error = _atlas_error_mm(case, estimate, sitk.ReadImage(str(case / "brain_mask.nii.gz"), sitk.sitkUInt8))
            mean_mm, max_mm = float(error.mean()), float(error.max())
        else:
            measured = registration_error_mm(case, modality, matrix)
            mean_mm, max_mm = measured.mean_mm, measured.max_mm
        rows.append({"case": case.name, "modality": modality, "method": method, "mean_mm": mean_mm, "max_mm": max_mm,
                     "seconds": done["seconds"]})
    return rows


def _hdbet_rows(cases: list[Path]) -> list[dict]:
    """HD-BET (fast, CPU) on each native T1c: Dice with the phantom's brain mask, and seconds."""
    from .imageio import read_image
    from .plausibility import dice
    from .skullstrip import skull_strip

    rows = []
    for case in cases:
        t1c = read_image(case / "t1c.nii.gz", "T1c")
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "brain_mask.nii.gz"))) > 0
        result = skull_strip(t1c, mode="fast", device="cpu")
        meta = json.loads((case / "phantom.json").read_text(encoding="utf-8"))["sequences"]["t1c"]
        rows.append({"case": case.name, "dice": dice(sitk.GetArrayFromImage(result.mask) > 0, truth),
                     "seconds": result.seconds, "t1c_mode": meta["acquisition"]["mode"],
                     "t1c_section": meta["acquisition"]["section"], "t1c_spacing_mm": t1c.GetSpacing()})
    return rows


def summarise_registration(rows: list[dict]) -> dict:
    """Per method and modality: mean / median / max over cases of the mean error, worst point error, time, flags."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        for modality in RIGID_MODALITIES + ("t1c",):
            sel = [r for r in rows if r["method"] == method and r["modality"] == modality]
            if not sel:
                continue
            means = np.array([r["mean_mm"] for r in sel])
            entry = {"cases": len(sel), "mean_mm": float(means.mean()), "median_mm": float(np.median(means)),
                     "max_mm": float(means.max()), "worst_point_mm": float(max(r["max_mm"] for r in sel)),
                     "cases_over_3mm": int((means > TARGET_CASE_MAX_MM).sum()),
                     "median_seconds": float(np.median([r["seconds"] for r in sel]))}
            if "suspect" in sel[0]:
                entry["flagged"] = int(sum(r["suspect"] for r in sel))
                entry["flagged_over_3mm"] = int(sum(r["suspect"] for r in sel if r["mean_mm"] > TARGET_CASE_MAX_MM))
            if "other_findings" in sel[0]:  # the other alignment checks (field of view, motion, edges)
                entry["warned"] = int(sum(bool(r["other_findings"]) for r in sel))
            summary.setdefault(method, {})[modality] = entry
    return summary


def registration_table(summary: dict) -> str:
    """Markdown table of :func:`summarise_registration`."""
    lines = ["| method | modality | cases | mean of means (mm) | median (mm) | max (mm) | worst point (mm) | > 3 mm | "
             "flagged (of > 3 mm) | other warnings | median s |", "|" + "---|" * 11]
    for method, per in summary.items():
        for modality, e in per.items():
            flags = f"{e['flagged']} ({e['flagged_over_3mm']})" if "flagged" in e else "-"
            lines.append(f"| {method} | {modality} | {e['cases']} | {e['mean_mm']:.2f} | {e['median_mm']:.2f} | "
                         f"{e['max_mm']:.2f} | {e['worst_point_mm']:.2f} | {e['cases_over_3mm']} | {flags} | "
                         f"{e.get('warned', '-')} | {e['median_seconds']:.2f} |")
    return "\n".join(lines)


def run_registration_bench(out_dir: Union[str, os.PathLike], cases: int = 20, seed: int = REGISTRATION_BENCH_SEED,
                           spacing: Optional[float] = 3.0, ants_python: Optional[Union[str, os.PathLike]] = None,
                           threads: int = 2, hdbet: bool = False) -> dict:
    """Rigid registration (T1, FLAIR, ADC -> T1c) on clinical-protocol phantom cases against their ground truth.

    Each case is registered by the legacy two-start code and the multi-start code (the
    preprocessing's, with the phantom's brain mask in place of HD-BET), its T1c brain by the
    atlas affine; optionally by ANTsPy ``Rigid`` and ``AffineFast`` (defaults) in
    ``ants_python``'s venv; and HD-BET's Dice is measured on every native T1c with ``hdbet``. Writes ``registration.json`` (every row and the summary) and
    ``registration.md`` (the table) into ``out_dir``; the phantom cases are kept in
    ``out_dir/clinical-seed<seed>-<spacing>`` for the next run.
    """
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = clinical_cohort(out, cases, seed, spacing)
    rows = []
    for index, case in enumerate(paths):
        rows += _rigid_rows(case, threads) + [_affine_row(case, threads)]
        print(f"registration bench: case {index + 1}/{len(paths)} ({case.name}): " + ", ".join(
            f"{r['modality']} {r['method']} {r['mean_mm']:.2f} mm" for r in rows[-2 * len(RIGID_MODALITIES) - 1:]), flush=True)
    if ants_python:
        with tempfile.TemporaryDirectory(dir=out) as work:
            rows += _ants_rows(ants_python, paths, Path(work), threads)
    summary = summarise_registration(rows)
    results: dict = {"protocol": f"clinical phantom, {cases} cases, seeds {seed}-{seed + cases - 1}, "
                                 f"{'native voxels' if spacing is None else f'voxels >= {spacing:g} mm'}",
                     "targets": {"mean_mm": TARGET_MEAN_MM, "case_max_mm": TARGET_CASE_MAX_MM},
                     "threads": threads, "summary": summary, "rows": rows}
    table = registration_table(summary)
    if hdbet:
        dices = _hdbet_rows(paths)
        values = [r["dice"] for r in dices]
        results["hdbet"] = {"rows": dices, "mean_dice": float(np.mean(values)), "min_dice": float(np.min(values)),
                            "median_seconds": float(np.median([r["seconds"] for r in dices]))}
        table += (f"\n\nHD-BET fast (CPU) on the native T1c: Dice vs phantom brain mask mean {np.mean(values):.3f}, "
                  f"min {np.min(values):.3f} ({len(values)} cases)")
    print(table)
    write_text_atomic(json.dumps(results, indent=2, default=float), out / "registration.json")
    write_text_atomic(table + "\n", out / "registration.md")
    print(f"wrote {out / 'registration.json'} and {out / 'registration.md'}")
    return results
