"""``contrast-amplifier demo`` (what ``make demo`` runs): the whole pipeline on a synthetic phantom.

1. generate one phantom case (seed 20260: metastases; never used to train the demo model),
2. amplify its routine T1c with the default model bundle (the shipped phantom demo ensemble:
   5 folds x 8 mirrorings, as in the paper's "Training and evaluating the model"),
3. write T1c-pro, a PNG figure (T2-FLAIR | T1c | T1c-pro | T1c-x4 ground truth, same axial slice
   through the largest lesion, the three T1c-like images in one window) and ``demo.json``,
4. print CNR and LBR (paper, "Performance metrics") of T1c-low, T1c, T1c-pro and T1c-x4 in the
   phantom's true lesions, against an automatic healthy-brain ROI (brain minus dilated lesions).

Everything here is synthetic: the numbers show the pipeline works, not clinical benefit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ContrastAmplifierCommon.atomicfile import save_figure_atomic, write_text_atomic
from .metrics import healthy_brain_roi, roi_contrast
from ContrastAmplifierCommon.progress import TqdmProgress

DEMO_SEED = 20260


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


def _flair_on_t1c_grid(case_dir: Path, t1c: sitk.Image, t1c_to_flair: Optional[sitk.Transform]) -> np.ndarray:
    """The FLAIR resampled onto the T1c grid with the rigid transform found by preprocessing."""
    flair = sitk.ReadImage(str(case_dir / "flair.nii.gz"), sitk.sitkFloat32)
    transform = t1c_to_flair if t1c_to_flair is not None else sitk.Transform()
    return sitk.GetArrayFromImage(sitk.Resample(flair, t1c, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def write_figure(panels: dict[str, np.ndarray], slice_index: int, window: tuple, path: Path, title: str) -> Path:
    """Side-by-side axial slices; every panel but the first (FLAIR, own window) shares ``window``."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    fig = Figure(figsize=(4 * len(panels), 4.6), dpi=110)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (ax, (name, volume)) in enumerate(zip(axes, panels.items())):
        image = volume[slice_index]
        if i == 0:
            low, high = np.percentile(image[image > 0], [1, 99.5]) if (image > 0).any() else (0, 1)
        else:
            low, high = window
        ax.imshow(np.flipud(image), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure_atomic(fig, path, suffix=".png")


def run_demo(out_dir: Path, spacing: float = 1.0, seed: int = DEMO_SEED, model: Optional[str] = None,
             flips: int = 8, device: str = "auto") -> dict:
    """Run the demo into ``out_dir`` and print the contrast table; returns what ``demo.json`` holds."""
    from .inference import amplify_case
    from .phantom import generate_cohort
    from .registry import resolve_model

    out_dir = Path(out_dir)
    bundle = resolve_model(model)
    print(f"model: {bundle.name} {bundle.manifest['version']} - {bundle.manifest['intended_use']}")
    case_dir = out_dir / "phantom" / "case_000"
    if not (case_dir / "phantom.json").is_file():
        print(f"generating synthetic phantom case (seed {seed}, {spacing} mm) ...")
        bar = TqdmProgress()
        generate_cohort(out_dir / "phantom", cases=1, seed=seed, spacing=spacing, progress=bar)
        bar.close()
    bar = TqdmProgress()
    t1_path, flair_path, adc_path, t1c_path = (case_dir / f"{m}.nii.gz" for m in ("t1", "flair", "adc", "t1c"))
    result = amplify_case(t1_path, flair_path, adc_path, t1c_path, bundle=bundle,
                          out_path=out_dir / "T1c-pro.nii.gz", overwrite=True,  # the demo's own output of an earlier run
                          n_mirrorings=flips, device=device, progress=bar)
    bar.close()

    t1c_image = sitk.ReadImage(str(case_dir / "t1c.nii.gz"), sitk.sitkFloat32)
    volumes = {name: _array(case_dir / f"{file}.nii.gz") for name, file in
               (("T1", "t1"), ("T1c-low", "t1c_low"), ("T1c", "t1c"), ("T1c-x4", "t1c_x4"))}
    volumes["T1c-pro"] = sitk.GetArrayFromImage(result.image)
    labels: np.ndarray = _array(case_dir / "lesion_labels.nii.gz").astype(np.int32)
    brain = _array(case_dir / "brain_mask.nii.gz") > 0
    lesions = labels > 0
    # T1 and T1c-low have their own poses: bring them onto the T1c grid for the pre-contrast SI
    for name, file in (("T1", "t1"), ("T1c-low", "t1c_low")):
        moving = sitk.ReadImage(str(case_dir / f"{file}.nii.gz"), sitk.sitkFloat32)
        transform = result.preprocessed.t1c_to.get(file, sitk.Transform()) if file == "t1" else _pose(case_dir, file)
        volumes[name] = sitk.GetArrayFromImage(sitk.Resample(moving, t1c_image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    metrics: dict[str, dict] = {}
    if lesions.any():
        roi = healthy_brain_roi(brain, lesions, margin_voxels=max(1, int(round(3.0 / min(t1c_image.GetSpacing())))))
        for name in ("T1c-low", "T1c", "T1c-pro", "T1c-x4"):
            r = roi_contrast(volumes[name], lesions, roi, pre=volumes["T1"])
            metrics[name] = {"cnr": r.cnr, "lbr": r.lbr, "cep_percent": r.cep}
        largest = int(np.argmax(np.bincount(labels[lesions])[1:])) + 1
        slice_index = int(np.round(np.argwhere(labels == largest)[:, 0].mean()))
    else:
        slice_index = labels.shape[0] // 2

    window = (0.0, float(np.percentile(volumes["T1c-x4"][brain], 99.8)))
    flair = _flair_on_t1c_grid(case_dir, t1c_image, result.preprocessed.t1c_to.get("flair"))
    figure = write_figure({"T2-FLAIR": flair, "T1c": volumes["T1c"], "T1c-pro": volumes["T1c-pro"], "T1c-x4 (ground truth)": volumes["T1c-x4"]},
                          slice_index, window, out_dir / "demo.png",
                          f"SYNTHETIC PHANTOM (seed {seed}) - model '{bundle.name}': {bundle.manifest['intended_use']}")

    summary = {
        "label": "synthetic phantom demo - not clinical data",
        "model": {"name": bundle.name, "version": bundle.manifest["version"], "intended_use": bundle.manifest["intended_use"]},
        "phantom_seed": seed, "spacing_mm": spacing, "predictions": result.n_predictions, "mapping": result.mapping,
        "timings_s": {k: round(v, 2) for k, v in result.timings_s.items()},
        "contrast": metrics, "outputs": {"t1c_pro": str(out_dir / "T1c-pro.nii.gz"), "figure": str(figure)},
        "roi": "lesions = the phantom's true lesion labels (pooled); healthy brain = brain mask minus lesions dilated by 3 mm",
    }
    write_text_atomic(json.dumps(summary, indent=2), out_dir / "demo.json")
    print(f"\nT1c-pro: {out_dir / 'T1c-pro.nii.gz'}   figure: {figure}   ({result.n_predictions} predictions, "
          f"{result.mapping} mapping, {result.timings_s['total']:.1f} s)")
    if metrics:
        print("\ncontrast in the phantom's lesions (synthetic; paper Table 4 metrics):")
        print(f"{'image':<10}{'CNR':>8}{'LBR':>8}{'CEP %':>9}")
        for name, m in metrics.items():
            print(f"{name:<10}{m['cnr']:>8.2f}{m['lbr']:>8.3f}{m['cep_percent']:>9.1f}")
    return summary


def _pose(case_dir: Path, name: str) -> sitk.Transform:
    """Ground-truth rigid map from T1c points to ``name``'s points, from the phantom's recorded poses.

    Only used for T1c-low, which amplify_case does not take as an input (so it is not registered).
    """
    meta = json.loads((case_dir / "phantom.json").read_text(encoding="utf-8"))
    a_t1c = np.array(meta["sequences"]["t1c"]["world_to_native_lps"], dtype=float)
    a_s = np.array(meta["sequences"][name]["world_to_native_lps"], dtype=float)
    m = a_s @ np.linalg.inv(a_t1c)  # T1c point -> world -> sequence point
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(m[:3, :3].ravel().tolist())
    transform.SetTranslation(m[:3, 3].tolist())
    return transform
