"""Differentiable Siamese Augmentation (mllmfl_dist.fl.strategies.dsa): each operation's effect, zero strength as the
identity, one draw shared by the whole batch, and the released mode 'S'."""

import math

import pytest
import torch

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.fl.strategies.dsa import DSA_OPERATIONS
from mllmfl_dist.fl.strategies import dsa

SMOKE = "configs/smoke.toml"


def batch(n: int = 4, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_flip_equals_torch_flip_and_no_flip_is_the_identity():
    x = batch()
    torch.testing.assert_close(dsa.flip(x, True), torch.flip(x, dims=[3]), rtol=0, atol=0)
    assert torch.equal(dsa.flip(x, False), x)


@pytest.mark.parametrize(("op", "neutral"), [(dsa.brightness, 0.0), (dsa.saturation, 1.0), (dsa.contrast, 1.0)])
def test_colour_steps_at_zero_strength_are_the_identity(op, neutral):
    x = batch()
    torch.testing.assert_close(op(x, neutral), x)


def test_colour_steps_do_what_they_say():
    x = batch()
    torch.testing.assert_close(dsa.brightness(x, 0.3), x + 0.3)
    grey = dsa.saturation(x, 0.0)  # no saturation: every channel is the pixel's channel mean
    torch.testing.assert_close(grey, x.mean(dim=1, keepdim=True).expand_as(x))
    flat = dsa.contrast(x, 0.0)  # no contrast: every pixel is the image's mean
    torch.testing.assert_close(flat, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))
    torch.testing.assert_close(dsa.saturation(x[:, :1], 2.0), x[:, :1])  # one channel: nothing to saturate


def test_translate_shifts_with_zero_fill_and_zero_shift_is_the_identity():
    x = batch()
    assert torch.equal(dsa.translate(x, 0, 0), x)
    shifted = dsa.translate(x, 2, -1)
    assert torch.equal(shifted[..., 2:, :-1], x[..., :-2, 1:])
    assert torch.all(shifted[..., :2, :] == 0) and torch.all(shifted[..., :, -1:] == 0)


def test_cutout_zeroes_one_window_clipped_to_the_image():
    x = batch() + 10  # no zero pixels before
    out = dsa.cutout(x, -2, 5, (4, 4))
    zero = out == 0
    assert torch.all(zero[..., 0:2, 5:8]) and zero.sum() == x.shape[0] * x.shape[1] * 2 * 3
    assert torch.equal(out[..., 2:, :], x[..., 2:, :])


def test_affine_identity_theta_keeps_the_image_and_a_quarter_turn_rotates_it():
    x = batch()
    torch.testing.assert_close(dsa.affine(x, dsa.scale_theta(1.0, 1.0)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(dsa.affine(x, dsa.rotate_theta(0.0)), x, atol=1e-5, rtol=0)
    quarter = dsa.affine(x, dsa.rotate_theta(math.pi / 2))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(2, 3)), atol=1e-4) or torch.allclose(
        quarter, torch.rot90(x, -1, dims=(2, 3)), atol=1e-4
    )
    # A scale above 1 samples beyond the image at the border (zeros there); the centre stays.
    zoom_out = dsa.affine(torch.ones(1, 1, 8, 8), dsa.scale_theta(1.5, 1.5))
    assert zoom_out[0, 0, 0, 0] < 0.5 and zoom_out[0, 0, 3:5, 3:5].eq(1).all()


@pytest.mark.parametrize("name", DSA_OPERATIONS)
def test_each_operation_draws_one_set_of_parameters_for_the_whole_batch(name):
    image = batch(n=1, seed=1)
    same = image.expand(6, -1, -1, -1).clone()
    out = dsa.apply_operation(same, name, torch.Generator().manual_seed(3))
    for i in range(1, 6):
        torch.testing.assert_close(out[i], out[0], rtol=0, atol=0)  # Siamese: identical images stay identical
    # The first image's result does not depend on the rest of the batch (one draw, not one per image).
    mixed = torch.cat([image, batch(n=5, seed=2)])
    torch.testing.assert_close(dsa.apply_operation(mixed, name, torch.Generator().manual_seed(3))[0], out[0])


def test_mode_s_picks_one_operation_per_batch_from_the_strategy_and_is_seeded():
    x = batch(n=3)
    out = dsa.dsa_siamese(x, "flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, x) or torch.equal(out, torch.flip(x, dims=[3]))
    a = dsa.dsa_siamese(x, "color_crop_cutout_flip_scale_rotate", torch.Generator().manual_seed(5))
    b = dsa.dsa_siamese(x, "color_crop_cutout_flip_scale_rotate", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert dsa.dsa_siamese(x, "none", torch.Generator()) is x
    # Only operations of the strategy are drawn: with cutout alone every batch loses a window.
    positive = x.abs() + 1
    for seed in range(10):
        assert (dsa.dsa_siamese(positive, "cutout", torch.Generator().manual_seed(seed)) == 0).any()
    with pytest.raises(ValueError, match="unknown DSA operation"):
        dsa.apply_operation(x, "blur", torch.Generator())


def test_config_checks_the_dsa_strategy():
    assert load_config(SMOKE).section("creff").dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert load_config(SMOKE, ["creff.dsa_strategy=none"]).section("creff").dsa_strategy == "none"
    with pytest.raises(ConfigError, match="creff.dsa_strategy"):
        load_config(SMOKE, ["creff.dsa_strategy=color_blur"])
