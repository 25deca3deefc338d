"""HD-BET skull stripping on a coarse phantom case, scored against the phantom's brain mask.

HD-BET 'fast' on CPU takes ~15-25 s and ~2.5 GB at 1 mm (issue 3); a 2 mm case runs once per
session through a module-scoped fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastAmplifierLib.phantom import generate_cohort
from ContrastAmplifierLib.skullstrip import resolve_device, skull_strip

pytestmark = pytest.mark.slow  # HD-BET: measured 60-105 s on the shared 2-core machine under load


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("phantom"), cases=1, seed=11, spacing=2.0)[0]


@pytest.fixture(scope="module")
def stripped(phantom_case):
    t1c = sitk.ReadImage(str(phantom_case / "t1c.nii.gz"), sitk.sitkFloat32)
    return t1c, skull_strip(t1c, mode="fast", device="cpu")


def test_hdbet_dice_against_phantom_mask(phantom_case, stripped, capsys):
    t1c, result = stripped
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_case / "brain_mask.nii.gz"))) > 0
    mask = sitk.GetArrayFromImage(result.mask) > 0
    dice = 2 * (reference & mask).sum() / (reference.sum() + mask.sum())
    with capsys.disabled():
        print(f"\nHD-BET fast/CPU on a 2 mm phantom T1c: Dice {dice:.3f}, {result.seconds:.1f} s")
    assert dice >= 0.85  # aim (issue 3): >= 0.9


def test_mask_is_on_the_input_grid_and_prints_are_silenced(stripped, capsys):
    t1c, result = stripped
    assert result.mask.GetSize() == t1c.GetSize()
    assert result.mask.GetOrigin() == t1c.GetOrigin() and result.mask.GetDirection() == t1c.GetDirection()
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    brain = sitk.GetArrayFromImage(result.brain)
    assert np.all(brain[sitk.GetArrayFromImage(result.mask) == 0] == 0)
    assert capsys.readouterr().out == ""  # HD-BET's prints would break the JSON-lines protocol


def test_device_and_mode_arguments():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == 0 and resolve_device("cuda:1") == 1
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'fast' or 'accurate'"):
        skull_strip(sitk.Image([4, 4, 4], sitk.sitkFloat32), mode="slow")


def test_memory_estimate_matches_the_measured_runs_and_refuses_before_allocating():
    """Issue: 15 mm voxels (inside the allowed spacing) made HD-BET ask for 45 GB after 165 s."""
    import SimpleITK as sitk

    from ContrastAmplifierLib.imageio import ImageValidationError
    from ContrastAmplifierLib.skullstrip import available_memory_bytes, check_memory, hd_bet_memory_bytes, skull_strip

    head = sitk.Image([67, 82, 73], sitk.sitkFloat32)
    head.SetSpacing((3.0, 3.0, 3.0))  # 201 x 246 x 219 mm: measured peak 3.41 GB
    assert 3.41e9 < hd_bet_memory_bytes(head) < 1.15 * 3.41e9
    head.SetSpacing((4.8, 4.8, 4.8))  # 322 x 394 x 350 mm: measured peak 10.70 GB
    assert 10.70e9 < hd_bet_memory_bytes(head) < 1.15 * 10.70e9
    check_memory(head, available=16e9)  # fits: no error
    with pytest.raises(ImageValidationError, match=r"skull stripping the T1c would need about 11\.\d GB .*but 4\.0 GB are free\. Crop the T1c"):
        check_memory(head, available=4e9)
    head.SetSpacing((15.0, 15.0, 15.0))  # the case (~37 GB): refused at once on this 24 GB machine
    if hd_bet_memory_bytes(head) > (available_memory_bytes() or 0):
        with pytest.raises(ImageValidationError, match="would need about"):
            skull_strip(head)
