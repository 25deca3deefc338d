"""Patch sampling (patches.py): enhancing voxels, lesion fraction, bounds, determinism, mirroring,
the weighted loss, and the fit CLI's patch options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ContrastAmplifierTrainingLib.data import TrainingCase, save_cached_case, to_training_case, train_set_percentiles
from ContrastAmplifierTrainingLib.patches import (
    ENHANCEMENT_THRESHOLD,
    ListSource,
    PatchSampler,
    default_patches_per_epoch,
    enhancing_mask,
    weighted_mse,
)
from ContrastAmplifierTrainingLib.toy import toy_cohort
from ContrastAmplifierTrainingLib.trainer import TrainConfig


def _toy_cases(n: int = 4, shape=(24, 40, 32), seed: int = 11) -> list[TrainingCase]:
    cached = toy_cohort(n, shape, seed=seed)
    percentiles = train_set_percentiles(cached)
    return [to_training_case(c, percentiles) for c in cached]


class GeneratedCases:
    """A CaseSource that is not a list: builds each case on request (as an on-the-fly phantom generator would)."""

    def __init__(self, n: int, shape=(24, 40, 32)):
        self.n, self.shape, self.calls = n, shape, 0
        self.percentiles = train_set_percentiles(toy_cohort(n, shape, seed=11))

    def __len__(self) -> int:
        return self.n

    def case(self, index: int) -> TrainingCase:
        self.calls += 1
        return to_training_case(toy_cohort(self.n, self.shape, seed=11)[index], self.percentiles)


def test_enhancing_mask_is_where_target_exceeds_t1c_low_by_the_threshold():
    inputs = torch.zeros(4, 2, 2, 3)
    target = torch.zeros(1, 2, 2, 3)
    inputs[3, 0, 0] = torch.tensor([0.5, 0.5, 0.5])
    target[0, 0, 0] = torch.tensor([0.5 + ENHANCEMENT_THRESHOLD + 0.01, 0.5 + ENHANCEMENT_THRESHOLD - 0.01, 0.4])
    target[0, 1, 1, 2] = 0.9  # T1c-low dark (0), T1c bright: enhancing
    mask = enhancing_mask(TrainingCase("c", "p", inputs, target))
    assert mask.dtype == torch.bool and mask.shape == (2, 2, 3)
    assert mask.nonzero().tolist() == [[0, 0, 0], [1, 1, 2]]
    assert not enhancing_mask(TrainingCase("c", "p", inputs, target), threshold=0.95).any()


def test_lesion_fraction_of_sampled_patches_matches_within_binomial_tolerance():
    cases = _toy_cases()
    assert all(enhancing_mask(c).any() for c in cases)
    n = 3000
    for fraction in (1 / 3, 0.8):
        sampler = PatchSampler(ListSource(cases), (16, 16, 16), lesion_fraction=fraction)
        centred = sum(sampler.draw(0, 1, 2, step).centred for step in range(n))
        sd = math.sqrt(n * fraction * (1 - fraction))  # binomial standard deviation of the count
        assert abs(centred - n * fraction) <= 4 * sd, (fraction, centred)  # two-sided p ~ 6e-5
    never = PatchSampler(ListSource(cases), (16, 16, 16), lesion_fraction=0.0)
    assert not any(never.draw(0, 0, 0, s).centred for s in range(200))


def test_centred_patches_contain_enhancing_voxels_and_all_patches_stay_inside():
    cases = _toy_cases()
    masks = [enhancing_mask(c) for c in cases]
    sampler = PatchSampler(ListSource(cases), (16, 48, 8), lesion_fraction=0.5)  # y side clipped to the case's 40
    uniform_hits = []
    for step in range(400):
        draw = sampler.draw(3, 0, 0, step)
        assert draw.size == (16, 40, 8)
        assert all(0 <= a and a + s <= n for a, s, n in zip(draw.start, draw.size, (24, 40, 32)))
        hit = bool(masks[draw.case][draw.slices()].any())
        if draw.centred:
            assert hit
        else:
            uniform_hits.append(hit)
    assert 0 < np.mean(uniform_hits) < 1  # uniform patches do miss the small enhancing regions


def test_draws_are_deterministic_and_mirror_the_crop():
    cases = _toy_cases()
    a, b = (PatchSampler(ListSource(cases), (16, 16, 16)) for _ in range(2))
    draws = [a.draw(5, 1, 7, s) for s in range(50)]
    assert draws == [b.draw(5, 1, 7, s) for s in range(50)]
    assert draws != [a.draw(6, 1, 7, s) for s in range(50)]
    assert draws != [a.draw(5, 1, 8, s) for s in range(50)]
    mirrored = next(d for d in draws if all(d.mirror))
    x, y = a.crop(mirrored, torch.device("cpu"))
    region = (slice(None),) + mirrored.slices()
    assert torch.equal(x, torch.flip(cases[mirrored.case].inputs[region], (1, 2, 3)))
    assert torch.equal(y, torch.flip(cases[mirrored.case].target[region], (1, 2, 3)))
    xs, ys = a.batch(draws[:3], torch.device("cpu"))
    assert xs.shape == (3, 4, 16, 16, 16) and ys.shape == (3, 1, 16, 16, 16)
    unmirrored = PatchSampler(ListSource(cases), (16, 16, 16), mirror=False)
    assert not any(any(unmirrored.draw(5, 1, 7, s).mirror) for s in range(50))


def test_case_source_object_and_cases_without_enhancement():
    source = GeneratedCases(3)
    sampler = PatchSampler(source, (16, 16, 16), lesion_fraction=1.0)
    draws = [sampler.draw(0, 0, 0, s) for s in range(60)]
    assert all(d.centred for d in draws) and {d.case for d in draws} == {0, 1, 2}
    assert source.calls == 3, "enhancing voxels are computed once per case"
    flat = [TrainingCase("flat", "p", torch.full((4, 16, 16, 16), 0.5), torch.full((1, 16, 16, 16), 0.5))]
    fallback = PatchSampler(ListSource(flat), (8, 8, 8), lesion_fraction=1.0)
    assert not any(fallback.draw(0, 0, 0, s).centred for s in range(20))


def test_weighted_mse_on_a_hand_made_example():
    prediction = torch.tensor([0.0, 0.5, 0.5, 1.0])
    target = torch.tensor([1.0, 0.5, 0.5, 0.0])  # squared errors 1, 0, 0, 1
    enhancing = torch.tensor([False, False, True, True])
    # weights 1, 1, 4, 4: (1 + 4) / 10
    assert float(weighted_mse(prediction, target, enhancing, 3.0)) == pytest.approx(0.5)
    target = torch.tensor([1.0, 0.5, 0.5, -1.0])  # squared errors 1, 0, 0, 4
    assert float(weighted_mse(prediction, target, enhancing, 3.0)) == pytest.approx((1 + 16) / 10)
    assert torch.equal(weighted_mse(prediction, target, enhancing, 0.0), F.mse_loss(prediction, target))
    constant = torch.full((4,), 0.3)
    assert float(weighted_mse(constant, torch.zeros(4), enhancing, 7.0)) == pytest.approx(0.09)


def test_default_patches_per_epoch_and_config_checks(tiny_net):
    assert default_patches_per_epoch(10, (112, 128, 112), (64, 64, 64)) == 10 * 7  # 1.6 M / 262 k = 6.1
    assert default_patches_per_epoch(10, (56, 64, 56), (64, 64, 64)) == 10  # the patch covers the case
    assert TrainConfig(network=tiny_net, patch_size=[16, 16, 8]).patch_size == (16, 16, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiples of 4"):
        TrainConfig(network=tiny_net, patch_size=(16, 16, 10))
    with pytest.raises(ValueError, match="need --patch-size"):
        TrainConfig(network=tiny_net, batch_size=2)
    with pytest.raises(ValueError, match="lesion-fraction"):
        TrainConfig(network=tiny_net, patch_size=(16, 16, 16), lesion_fraction=1.5)


def test_fit_cli_patch_options_reach_the_plan(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ContrastAmplifierTrainingLib import cli

    cache = tmp_path / "cache"
    for case in toy_cohort(4, (16, 16, 16), seed=12):
        save_cached_case(case, cache / f"{case.case_id}.npz")
    monkeypatch.setattr(cli, "_install_sigterm", lambda cancel: None)
    args = cli.expand_multi_value_options([
        "fit", str(cache), str(tmp_path / "run"), "--n-folds", "2", "--folds", "0", "--epochs", "1", "--base-channels", "4",
        "--levels", "2", "--device", "cpu", "--progress", "none", "--patch-size", "8", "16", "8", "--batch-size", "2",
        "--lesion-fraction", "0.5", "--patches-per-epoch", "3", "--enhancement-weight", "2"])
    assert args[args.index("--patch-size"):][:6] == ["--patch-size", "8", "--patch-size", "16", "--patch-size", "8"]
    done = CliRunner().invoke(cli.app, args)
    assert done.exit_code == 0, done.output
    plan = json.loads((tmp_path / "run" / "plan.json").read_text(encoding="utf-8"))
    assert {k: plan[k] for k in ("patch_size", "lesion_fraction", "patches_per_epoch", "batch_size", "enhancement_weight")} == {
        "patch_size": [8, 16, 8], "lesion_fraction": 0.5, "patches_per_epoch": 3, "batch_size": 2, "enhancement_weight": 2.0}
    log = (tmp_path / "run" / "fold_0" / "log.csv").read_text(encoding="utf-8").splitlines()
    assert len(log) == 2
    from ContrastAmplifierTrainingLib.export import export_bundle

    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", folds=[0], name="toy-patches",
                           intended_use="tests only - not for clinical use", training_data="toy arrays")
    record = json.loads((bundle.path / "bundle.json").read_text(encoding="utf-8"))["training"]
    assert record["mode"] == "patches" and record["patch_size"] == [8, 16, 8] and record["batch_size"] == 2
    assert record["lesion_fraction"] == 0.5 and record["loss"] == "MSE weighted 1 + 2 on enhancing voxels"
    cube = CliRunner().invoke(cli.app, ["fit", str(cache), str(tmp_path / "cube"), "--n-folds", "2", "--folds", "0", "--epochs", "1",
                                        "--base-channels", "4", "--levels", "2", "--device", "cpu", "--progress", "none",
                                        "--patch-size", "8"])
    assert cube.exit_code == 0, cube.output
    assert json.loads((tmp_path / "cube" / "plan.json").read_text(encoding="utf-8"))["patch_size"] == [8, 8, 8]
    bad = CliRunner().invoke(cli.app, cli.expand_multi_value_options([
        "fit", str(cache), str(tmp_path / "bad"), "--epochs", "1", "--levels", "3", "--device", "cpu", "--progress", "none",
        "--patch-size", "8", "8"]))
    assert bad.exit_code == 2 and "one side (a cube) or three" in bad.output
