"""Folds trained on phantom streams made on the fly: one tiny patch-mode run at 4 mm, exported."""

from __future__ import annotations

import json

import pytest

from ContrastAmplifierLib.network import NetworkConfig
from ContrastAmplifierTrainingLib.onthefly import PhantomSourceSettings
from ContrastAmplifierTrainingLib.patches import PatchSampler
from ContrastAmplifierTrainingLib.phantom_fit import fit_phantoms, fold_settings
from ContrastAmplifierTrainingLib.trainer import TrainConfig

SETTINGS = PhantomSourceSettings(first_seed=750_000, cases=2, spacing=4.0, crop_size=(40, 48, 40), lesions="small")


def test_walking_sampler_takes_each_case_for_walk_patches_in_order():
    class Source:
        walk = 3

        def __len__(self):
            return 4

        def case(self, index):
            raise AssertionError("the draw below never needs a case's voxels")  # pragma: no cover

    sampler = PatchSampler(Source(), (8, 8, 8), lesion_fraction=0.0, walk=3, patches_per_epoch=5)
    sampler._shapes = {i: (16, 16, 16) for i in range(4)}
    sampler._coords = {i: [] for i in range(4)}
    order = [sampler.draw(0, 0, epoch, step).case for epoch in range(3) for step in range(5)]
    assert order == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0]  # patch n of the run: case (n // 3) % 4
    with pytest.raises(ValueError, match="patches per epoch"):
        PatchSampler(Source(), (8, 8, 8), walk=3)


def test_two_fold_run_on_phantom_streams_trains_and_exports(tmp_path):
    from ContrastAmplifierTrainingLib.export import export_bundle

    config = TrainConfig(epochs=1, network=NetworkConfig(base_channels=4, levels=2), device="cpu", patch_size=(16, 16, 16),
                         patches_per_epoch=4)
    results = fit_phantoms(tmp_path / "run", SETTINGS, val_seed=760_000, val_cases=1, config=config, folds=[1], n_folds=2,
                           walk=2)
    assert [r.fold for r in results] == [1] and results[0].epochs == 1
    plan = json.loads((tmp_path / "run" / "plan.json").read_text(encoding="utf-8"))
    assert plan["phantoms"]["first_seed"] == 750_000 and plan["phantoms"]["val_seed"] == 760_000
    assert plan["patch_size"] == [16, 16, 16] and "phantoms made on the fly" in plan["source"]
    # Fold 1 walked its own stream (seeds 750002-750003), fold 0's first cases set the percentiles.
    cached = {p.name for p in (tmp_path / "run" / "phantoms").glob("*/cache/*.npz")}
    assert {"phantom_750002.npz", "phantom_750003.npz", "phantom_750000.npz", "phantom_760000.npz"} <= cached
    assert fold_settings(SETTINGS, 1).first_seed == 750_002
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", folds=[1], name="phantom-stream-test",
                           intended_use="tests only - not for clinical use", training_data="phantom streams")
    record = json.loads((bundle.path / "bundle.json").read_text(encoding="utf-8"))["training"]
    assert record["mode"] == "patches" and bundle.folds == [1]
    # A fold still training exports from its latest checkpoint only when asked, with the same weights.
    (tmp_path / "run" / "fold_1" / "done.json").unlink()
    with pytest.raises(ValueError, match="no fold of"):
        export_bundle(tmp_path / "run", tmp_path / "none")
    partial = export_bundle(tmp_path / "run", tmp_path / "partial", unfinished=True, intended_use="tests only - not for clinical use")
    manifest = json.loads((partial.path / "bundle.json").read_text(encoding="utf-8"))["training"]
    assert manifest["unfinished_folds"] == {"1": "checkpoint of epoch 1 (still training)"} and manifest["epochs"] == {"1": 1}
    from safetensors.torch import load_file

    ours, final = load_file(str(partial.path / "fold1.safetensors")), load_file(str(bundle.path / "fold1.safetensors"))
    assert ours.keys() == final.keys() and all(ours[k].equal(final[k]) for k in final)
    with pytest.raises(ValueError, match="overlap the training streams"):
        fit_phantoms(tmp_path / "other", SETTINGS, val_seed=750_001, val_cases=1, config=config)
