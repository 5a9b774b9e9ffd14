"""Rewards into advantages: per group, per prompt (running statistics), per batch; the std floor and
the clip; several rewards normalised apart (pure math)."""

import numpy as np
import pytest
import torch

from rebel_diffusion.algorithms.advantages import PerPromptStatTracker, epoch_advantages, normalize_rewards


def test_stat_tracker_batch_then_prompt_statistics():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b", "b"]
    r1 = np.array([1.0, 3.0, 10.0, 14.0])
    adv, fallback = tracker.update(prompts, r1)
    # fewer than min_count per prompt: the batch's statistics, and the fall-back is reported
    np.testing.assert_allclose(adv, (r1 - r1.mean()) / (r1.std() + 1e-6))
    assert fallback == 4
    r2 = np.array([5.0, 7.0, 12.0, 16.0])
    adv, fallback = tracker.update(prompts, r2)
    assert fallback == 0
    buf_a = np.array([1.0, 3.0, 5.0, 7.0])
    buf_b = np.array([10.0, 14.0, 12.0, 16.0])
    np.testing.assert_allclose(adv[:2], (r2[:2] - buf_a.mean()) / (buf_a.std() + 1e-6))
    np.testing.assert_allclose(adv[2:], (r2[2:] - buf_b.mean()) / (buf_b.std() + 1e-6))
    # the buffer keeps the last 4 only; state round-trips
    tracker.update(["a"], np.array([100.0]))
    assert list(tracker.stats["a"]) == [3.0, 5.0, 7.0, 100.0]
    clone = PerPromptStatTracker()
    clone.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(clone.update(["a"], np.array([1.0]))[0], tracker.update(["a"], np.array([1.0]))[0])


def test_normalize_modes():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv, used = normalize_rewards(r, list("abcd"), "none")
    torch.testing.assert_close(adv, r)
    assert used == {"none": 4}
    z, used = normalize_rewards(r, list("abcd"), "batch")
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6) and z.std(unbiased=False).item() == pytest.approx(
        1.0, rel=1e-4
    )
    assert used == {"batch": 4}
    with pytest.raises(ValueError):
        normalize_rewards(r, list("abcd"), "per-prompt")
    with pytest.raises(ValueError):
        normalize_rewards(r, list("abcd"), "per-group")


def test_per_group_normalisation_uses_each_group_alone():
    r = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0, 5.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, used = normalize_rewards(r, list("aabbcc"), "per-group", group=group)
    # each pair of two is (-1, +1) whatever its scale; a constant group gives 0, not a blow-up
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert used == {"per-group": 6}


def test_default_floor_centres_on_the_group_and_scales_by_the_batch():
    """std_floor 1 (the trainer's default): A = (r - group mean) / max(group std, batch std)."""
    from rebel_diffusion.config import TrainConfig

    assert TrainConfig().adv_std_floor == 1.0
    r = torch.tensor([1.0, 1.02, 0.0, 10.0, 4.0, 6.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, _ = normalize_rewards(r, list("aabbcc"), "per-group", group=group, std_floor=1.0)
    batch = float(r.std(unbiased=False))  # 3.35; the groups' own: 0.01, 5, 1
    expected = [-0.01 / batch, 0.01 / batch, -1.0, 1.0, -1 / batch, 1 / batch]  # group 1's std 5 > batch
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_std_floor_and_advantage_clip():
    # A near-constant group: its own std is 0.01, the batch's is large; the floor caps |A|.
    r = torch.tensor([1.0, 1.02, 0.0, 10.0])
    group = torch.tensor([0, 0, 1, 1])
    batch_std = float(r.double().std(unbiased=False))
    adv, _ = normalize_rewards(r, list("aabb"), "per-group", group=group, std_floor=0.1)
    expected_first = 0.01 / (0.1 * batch_std + 1e-6)
    assert adv[1].item() == pytest.approx(expected_first, rel=1e-4) and adv[1].item() < 1.0
    unfloored, _ = normalize_rewards(r, list("aabb"), "per-group", group=group)
    assert unfloored[1].item() == pytest.approx(1.0, rel=1e-3)
    # One failure among saturated images under batch statistics: |A| ~ 7.9, clipped to 5.
    r = torch.tensor([1.0] * 63 + [0.0])
    adv, _ = normalize_rewards(r, ["p"] * 64, "batch")
    assert adv.min().item() == pytest.approx(-63 / 63**0.5, rel=1e-3)
    clipped, _ = normalize_rewards(r, ["p"] * 64, "batch", adv_clip_max=5.0)
    assert clipped.min().item() == pytest.approx(-5.0)


def test_epoch_advantages_of_several_rewards_normalised_apart():
    """--reward-combine normalized: each reward normalised on its own, then weighted; a non-finite
    reward gets advantage 0 and leaves the statistics alone."""
    group = torch.tensor([0, 0, 1, 1])
    prompts = ["a", "a", "b", "b"]
    big = torch.tensor([100.0, 300.0, 10.0, 30.0])  # a reward on a large scale
    small = torch.tensor([0.2, 0.1, 0.4, 0.3])
    rewards = big + small
    rewards[3] = float("nan")
    adv, used = epoch_advantages(
        rewards, prompts, group, "batch", None, components={"big": big, "small": small},
        weights={"big": 1.0, "small": 2.0},
    )  # fmt: skip
    kept = [0, 1, 2]
    expected = (
        normalize_rewards(big[kept], prompts[:3], "batch")[0]
        + 2 * normalize_rewards(small[kept], prompts[:3], "batch")[0]
    )
    torch.testing.assert_close(adv[kept], expected)
    assert adv[3] == 0 and used == {"batch": 3}
    # one reward: normalised as one
    adv, _ = epoch_advantages(rewards, prompts, group, "batch", None)
    torch.testing.assert_close(adv[kept], normalize_rewards(rewards[kept], prompts[:3], "batch")[0])
