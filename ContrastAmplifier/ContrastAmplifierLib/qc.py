"""Quality-control picture of a preprocessed case (the paper ends preprocessing with an
"exhaustive quality control ... to remove ... failed alignment"; this is the picture for it).

One row per registered modality, three columns (axial, coronal, sagittal mid slices of the atlas
crop grid), with the ICBM 2009a template's brain outline drawn in red: a misregistration shows
as brain tissue crossing the outline. A modality whose rigid registration to the T1c looks wrong
(finding ``registration.suspect``, :func:`.plausibility.check_registration`) gets its row label
in red, "CHECK REGISTRATION", and a red frame around its three views.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import SimpleITK as sitk

from ContrastAmplifierCommon.atomicfile import save_figure_atomic

from .plausibility import suspect_modalities
from .registration import Template, load_template, resample

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["write_qc_png", "qc_figure", "CHECK_LABEL"]

#: Added to the row label of a modality whose registration looks wrong.
CHECK_LABEL = "CHECK REGISTRATION"
SUSPECT_COLOUR = "red"


def _views(volume: np.ndarray):
    z, y, x = (s // 2 for s in volume.shape)
    # Array order (z, y, x) on the template's grid, whose index axes point to the patient's
    # right, anterior and superior: origin="lower" puts anterior/superior at the top of each view.
    return [("axial", volume[z]), ("coronal", volume[:, y, :]), ("sagittal", volume[:, :, x])]


def write_qc_png(case, path: Union[str, os.PathLike], template: Optional[Template] = None, dpi: int = 80) -> Path:
    """Write the QC PNG of a :class:`preprocessing.PreprocessedCase` to ``path``."""
    return save_figure_atomic(qc_figure(case, template), path, dpi, suffix=".png")


def qc_figure(case, template: Optional[Template] = None) -> Figure:
    """The QC figure of a :class:`preprocessing.PreprocessedCase` (see the module docstring)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's (or Slicer's) backend is left alone

    template = template or load_template(1)
    outline: np.ndarray = sitk.GetArrayFromImage(
        resample(template.brain_mask, case.brain_mask, None, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ).astype(float)
    names = list(case.images)
    suspect = set(suspect_modalities(getattr(case, "findings", [])))
    fig = Figure(figsize=(9, 3 * len(names)))
    axes = fig.subplots(len(names), 3, squeeze=False)
    for row, name in enumerate(names):
        volume = sitk.GetArrayFromImage(case.images[name])
        for col, ((view, image), (_, contour)) in enumerate(zip(_views(volume), _views(outline))):
            # subplots returns an object array of Axes, which numpy's stubs type as ndarray
            ax: Axes = axes[row, col]  # type: ignore[assignment]
            ax.imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
            if contour.max() > 0:
                ax.contour(contour, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if name in suspect:
                _mark_suspect(ax, name, label=col == 0)
            elif col == 0:
                ax.set_ylabel(name.upper())
            if row == 0:
                ax.set_title(view)
    title = "Registered to ICBM 2009a (red: template brain outline)"
    if suspect:
        title += f"\n{CHECK_LABEL}: " + ", ".join(n.upper() for n in names if n in suspect)
    fig.suptitle(title, fontsize=10, color=SUSPECT_COLOUR if suspect else "black")
    fig.tight_layout()
    return fig


def _mark_suspect(ax: Axes, name: str, label: bool) -> None:
    """Red frame around a view of a suspect modality; on the first view, the red row label."""
    for spine in ax.spines.values():
        spine.set_edgecolor(SUSPECT_COLOUR)
        spine.set_linewidth(2.5)
    if label:
        ax.set_ylabel(f"{name.upper()}\n{CHECK_LABEL}", color=SUSPECT_COLOUR, fontweight="bold")
