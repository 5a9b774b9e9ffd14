"""DDPO's PPO-clip loss and its units (pure math)."""

import pytest
import torch

from rebel_diffusion.algorithms.ddpo import CLIP_NATS, ddpo_clip_range, ddpo_kl_coef, ppo_clip_loss


def test_ppo_clip_loss_closed_form():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.00005]))
    adv = torch.tensor([1.0, 2.0, -10.0])  # the last is clipped to -5
    loss, stats = ppo_clip_loss(new, old, adv, clip_range=1e-4, adv_clip_max=5.0)
    ratio = torch.tensor([1.5, 0.5, 1.00005])
    a = torch.tensor([1.0, 2.0, -5.0])
    expected = torch.maximum(-a * ratio, -a * ratio.clamp(1 - 1e-4, 1 + 1e-4)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # hand values: max(-1.5, -1.0001) = -1.0001; max(-1.0, -1.9998) = -1.0; max(5.00025, 5.00025) = 5.00025
    assert loss.item() == pytest.approx(-1.0001 - 1.0 + 5.00025, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


def test_ddpo_default_clip_range_is_the_same_nats_at_every_resolution():

    sd15_512 = 4 * 64 * 64
    assert ddpo_clip_range(None, sd15_512) == pytest.approx(1e-4, rel=0.03)  # DDPO's published setting
    for dims in (256, sd15_512, 4 * 96 * 96, 4 * 128 * 128):
        assert ddpo_clip_range(None, dims) * dims == pytest.approx(CLIP_NATS)
    assert ddpo_clip_range(2e-4, 256) == 2e-4  # a value given is used as it is


def test_ddpo_kl_coef_is_the_price_of_a_nat_per_dim_and_step():
    assert ddpo_kl_coef(0.1, 256, 8) == pytest.approx(0.1 / 2048)
