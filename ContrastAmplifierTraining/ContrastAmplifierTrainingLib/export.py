"""Export a finished run (``OUT_DIR`` of ``fit``) as a model bundle (see ContrastAmplifierLib.bundle)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ContrastAmplifierLib.bundle import ModelBundle, write_bundle
from ContrastAmplifierLib.network import NetworkConfig

from .data import BUNDLE_MODALITIES
from .fit import read_plan
from .run_status import CHECKPOINT_FILE, DONE_FILE, FINAL_WEIGHTS_FILE, FOLD_DIR_PREFIX, fold_dir
from .trainer import PAPER_PATCH_RECORD

DEFAULT_INTENDED_USE = "research only - not for clinical use"
DEFAULT_DESCRIPTION = "Residual 3D UNet ensemble amplifying gadolinium contrast on brain MRI (Bone, Ammari et al., Invest Radiol 2022)."


def finished_folds(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Fold index -> ``done.json`` content, for every fold whose final weights exist."""
    done = {}
    for path in sorted(Path(out_dir).glob(f"{FOLD_DIR_PREFIX}*/{DONE_FILE}")):
        if (path.parent / FINAL_WEIGHTS_FILE).is_file():
            info = json.loads(path.read_text(encoding="utf-8"))
            done[int(info["fold"])] = info
    return done


def checkpoint_fold(out_dir: Path, fold: int, network: NetworkConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Weights and ``done.json``-like record of an unfinished fold, from its latest ``checkpoint.pt``.

    The checkpoint is read as a resume reads it (:func:`.trainer.restore_checkpoint`: tensors and
    plain data only, the run's network), so a refused or corrupted file is one clear error.
    """
    import torch

    from ContrastAmplifierLib.network import ResidualUNet3D

    from .trainer import restore_checkpoint

    path = fold_dir(out_dir, fold) / CHECKPOINT_FILE
    model = ResidualUNet3D(network)
    state = restore_checkpoint(path, model, torch.optim.Adam(model.parameters()), network, torch.device("cpu"))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    history = state["history"]
    return weights, {"fold": fold, "epochs": state["epoch"], "metrics": history[-1] if history else {}, "unfinished": True}


def export_bundle(
    out_dir: Path,
    bundle_dir: Path,
    folds: Optional[Sequence[int]] = None,
    name: str = "contrast-amplifier",
    version: str = "1.0.0",
    description: str = DEFAULT_DESCRIPTION,
    intended_use: str = DEFAULT_INTENDED_USE,
    training_data: Optional[str] = None,
    extra_training: Optional[dict[str, Any]] = None,
    unfinished: bool = False,
) -> ModelBundle:
    """Write the bundle of ``folds`` (default: every finished fold) of the run in ``out_dir``.

    ``unfinished`` also takes folds still training, from their latest checkpoint (for a look at a
    long run, as nnU-Net's ``checkpoint_latest``); ``training.epochs`` and
    ``training.unfinished_folds`` in ``bundle.json`` say so.

    Raises:
        FileNotFoundError: no plan in ``out_dir``.
        ValueError: a requested fold is unfinished, or none is finished.
    """
    from safetensors.torch import load_file

    plan = read_plan(out_dir)
    done = finished_folds(out_dir)
    partial: dict[int, dict[str, Any]] = {}
    states: dict[int, Any] = {}
    if unfinished:
        network = NetworkConfig.from_dict(plan["network"])
        for path in sorted(Path(out_dir).glob(f"{FOLD_DIR_PREFIX}*/{CHECKPOINT_FILE}")):
            fold = int(path.parent.name[len(FOLD_DIR_PREFIX):])
            if fold not in done and (folds is None or fold in folds):
                states[fold], partial[fold] = checkpoint_fold(out_dir, fold, network)
        done = {**done, **partial}
    if folds is None:
        folds = sorted(done)
        if not folds:
            raise ValueError(f"no fold of {out_dir} has finished; run `contrast-amplifier-train fit` to the end first.")
    missing = [k for k in folds if k not in done]
    if missing:
        raise ValueError(
            f"folds {missing} of {out_dir} have not finished (finished: {sorted(done)}); "
            "finish them with `contrast-amplifier-train fit ... --folds K` or export only finished folds with --folds."
        )
    states.update({k: load_file(str(fold_dir(out_dir, k) / FINAL_WEIGHTS_FILE)) for k in folds if k not in partial})
    states = {k: states[k] for k in folds}
    geometry = plan["geometry"]
    n_patients = len({c["patient_id"] for c in plan["cases"]})
    training: dict[str, Any] = {
        "paper": "Bone, Ammari et al., Invest Radiol 2022;57(8):527-535",
        "optimizer": "Adam",
        "learning_rate": plan["learning_rate"],
        **{k: plan.get(k, PAPER_PATCH_RECORD[k]) for k in PAPER_PATCH_RECORD},
        "mode": "whole volume (paper)" if plan.get("patch_size") is None else "patches",
        "loss": "MSE" if not plan.get("enhancement_weight") else
                f"MSE weighted 1 + {plan['enhancement_weight']:g} on enhancing voxels",
        "mirroring": plan["mirror"],
        "epochs": {str(k): done[k]["epochs"] for k in folds},
        "seed": plan["seed"],
        "n_folds": plan["n_folds"],
        "split_seed": plan["split_seed"],
        "cases": len(plan["cases"]),
        "patients": n_patients,
        "simulate_low_dose": plan["simulate_low_dose"],
        "device": plan.get("device"),
        "precision": plan.get("precision"),
        "grad_clip": plan.get("grad_clip"),
        "divergence_guard": plan.get("divergence_guard"),
        "final_validation": {str(k): done[k].get("metrics", {}) for k in folds},
    }
    if partial:
        training["unfinished_folds"] = {str(k): f"checkpoint of epoch {partial[k]['epochs']} (still training)" for k in sorted(partial)}
    if plan.get("phantoms"):  # fit_phantoms: the seed streams and the command that trained them
        training["phantoms"] = plan["phantoms"]
        training["cases"] = "phantoms made on the fly (see phantoms)"
    if plan.get("command"):
        training["command"] = plan["command"]
    if extra_training:
        training.update(extra_training)
    default_data = (str(plan.get("source")) if plan.get("phantoms") else
                    f"{len(plan['cases'])} cases of {n_patients} patients from {plan.get('source') or 'an unnamed cohort'}")
    return write_bundle(
        bundle_dir,
        states,
        name=name,
        version=version,
        description=description,
        intended_use=intended_use,
        training_data=training_data or default_data,
        modalities=BUNDLE_MODALITIES,
        spacing=geometry["spacing"],
        crop_size=geometry["crop_size"],
        percentiles=geometry["percentiles"],
        percentile_levels=geometry.get("percentile_levels", (1.0, 99.0)),
        network=NetworkConfig.from_dict(plan["network"]),
        training=training,
        extra={"citation": "Bone A, Ammari S, et al. From dose reduction to contrast maximization. Invest Radiol. 2022;57(8):527-535."},
    )
