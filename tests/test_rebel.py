"""REBEL and DDPO losses, pairing, reward normalisation, and the step-by-step exact gradient."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from rebel_diffusion.advantages import PerPromptStatTracker, normalize_rewards
from rebel_diffusion.ddpo import ppo_clip_loss
from rebel_diffusion.models import add_lora, load_pipeline
from rebel_diffusion.rebel import (
    pair_indices,
    pair_targets,
    rebel_loss,
    rebel_residual,
    rebel_surrogate,
    regression_fit,
    subsample_steps,
    trained_steps,
)
from rebel_diffusion.sampling import (
    SamplingSettings,
    make_scheduler,
    sample_trajectories,
    step_log_prob,
    steps_log_prob,
)
from rebel_diffusion.steps import gaussian_kl
from rebel_diffusion.updates import ddpo_accumulate, log_ratios, rebel_accumulate

# ------------------------------------------------------------------------------------------------
# pure math


def test_pair_indices_all_pairs_within_groups():
    group = torch.tensor([0, 0, 0, 1, 1, 2])  # k = 3, 2, 1
    pairs = pair_indices(group).tolist()
    assert pairs == [[0, 1], [0, 2], [1, 2], [3, 4]]  # k(k-1)/2 per group, none across groups


def test_rebel_loss_closed_form():
    la = torch.tensor([0.3, -0.2, 0.0])
    lb = torch.tensor([0.1, 0.4, 0.5])
    target = torch.tensor([1.0, -0.5, 0.25])
    eta = 0.5
    expected = np.mean(
        [((0.3 - 0.1) / 0.5 - 1.0) ** 2, ((-0.2 - 0.4) / 0.5 + 0.5) ** 2, ((0 - 0.5) / 0.5 - 0.25) ** 2]
    )
    assert rebel_loss(la, lb, target, eta).item() == pytest.approx(expected, rel=1e-6)
    assert rebel_residual(la, lb, target, eta)[0].item() == pytest.approx(0.4 - 1.0, rel=1e-6)


def test_surrogate_gradient_equals_loss_gradient():
    la = torch.randn(5, requires_grad=True)
    lb = torch.randn(5, requires_grad=True)
    target = torch.randn(5)
    eta = 0.7
    rebel_loss(la, lb, target, eta).backward()
    g_loss = (la.grad.clone(), lb.grad.clone())
    la.grad, lb.grad = None, None
    residual = rebel_residual(la.detach(), lb.detach(), target, eta)
    rebel_surrogate(la, lb, residual, eta, num_pairs=5).backward()
    torch.testing.assert_close(la.grad, g_loss[0])
    torch.testing.assert_close(lb.grad, g_loss[1])


def test_pair_targets_reward_gap_and_preference():
    adv = torch.tensor([1.0, -1.0, 0.5])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    assert pair_targets(adv, pairs).tolist() == [2.0, 0.5, -1.5]
    pref = torch.tensor([0.9, 0.5, 0.2])
    torch.testing.assert_close(pair_targets(adv, pairs, pref), torch.tensor([0.4, 0.0, -0.3]))


def test_subsample_steps_is_unbiased():
    steps = list(range(10))
    values = torch.arange(10.0) ** 2  # per-step terms g_t
    gen = torch.Generator().manual_seed(0)
    sub, scale = subsample_steps(steps, 0.3, gen)
    assert len(sub) == 3 and len(set(sub)) == 3 and scale == pytest.approx(10 / 3)
    # Exact expectation over all equally likely subsets of size 3: equals the full sum.
    subsets = list(itertools.combinations(steps, 3))
    expectation = np.mean([scale * values[list(s)].sum().item() for s in subsets])
    assert expectation == pytest.approx(values.sum().item(), rel=1e-9)
    assert subsample_steps(steps, 1.0, gen) == (steps, 1.0)
    with pytest.raises(ValueError):
        subsample_steps(steps, 0.0, gen)


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


def test_regression_fit_closed_forms():
    target = torch.tensor([1.0, -1.0, 2.0, 0.0])
    assert regression_fit(target, target) == pytest.approx({"fit_r2": 1.0, "fit_corr": 1.0})
    # predicting the target's mean explains nothing; on-policy (prediction 0) R^2 = -mean^2 / var
    fit = regression_fit(torch.full((4,), 0.5), target)
    assert fit["fit_r2"] == pytest.approx(0.0, abs=1e-12) and np.isnan(fit["fit_corr"])
    assert regression_fit(torch.zeros(4), target)["fit_r2"] == pytest.approx(-(0.5**2) / 1.25)
    assert regression_fit(2 * target + 1, target)["fit_corr"] == pytest.approx(1.0)


def test_trained_steps_leave_out_the_lowest_noise():
    std = [0.78, 0.5, 0.26, 0.041, 0.021, 0.0]  # toy's shape, and a deterministic last step
    assert trained_steps(std, 0.1) == [0, 1, 2]
    assert trained_steps(std, 0.0) == [0, 1, 2, 3, 4]  # never a deterministic step
    with pytest.raises(ValueError, match="no step left"):
        trained_steps(std, 1.0)


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


# ------------------------------------------------------------------------------------------------
# the exact step-by-step gradient on the tiny model


# fp32: the target bound (1e-5; batching changes fp32 summation order at that level). fp64: the
# same computation in double precision, where any algebraic difference would show above 1e-12.
GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
EXACTNESS_CASES = [  # (dtype, steps_per_pass)
    pytest.param(torch.float32, 1, id="fp32-1-step-per-pass"),
    pytest.param(torch.float64, 1, id="fp64-1-step-per-pass"),
    pytest.param(torch.float64, 3, id="fp64-3-steps-per-pass"),
]


@pytest.mark.parametrize("skip", [1, 2])
def test_rebel_gradient_is_exact_for_the_trained_steps_only(lora_setups, skip):
    """--min-step-std: the regression and its gradient cover the trained steps alone, exactly."""
    pipe, traj, scheduler, lora = lora_setups[torch.float64]
    pairs = pair_indices(traj.group)
    targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
    std = traj.step_std.tolist()
    assert std == sorted(std, reverse=True) and min(std) > 0  # DDIM: the noise falls step by step
    steps = trained_steps(std, (std[-skip] + std[-skip - 1]) / 2)  # a threshold between two steps
    assert steps == list(range(4 - skip))
    pipe.unet.zero_grad()
    stats = rebel_accumulate(
        pipe.unet,
        scheduler,
        traj,
        pairs,
        targets,
        eta=0.5,
        train_batch_size=2,
        steps=steps,
        steps_per_pass=2,
        ratio_steps=steps,
    )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    images = torch.arange(len(traj))
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    ratio = (new - traj.log_probs[:, steps]).sum(dim=1)
    loss = rebel_loss(ratio[pairs[:, 0]], ratio[pairs[:, 1]], targets, 0.5)
    loss.backward()
    naive = _grads(lora)
    assert ((ours - naive).norm() / naive.norm()).item() <= GRAD_TOL[torch.float64]
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-9)
    # the fit statistics' prediction is (1/eta) (D(y) - D(y')) over those steps
    torch.testing.assert_close(
        stats["prediction"].double(), ((ratio[pairs[:, 0]] - ratio[pairs[:, 1]]) / 0.5).detach(), rtol=1e-6, atol=1e-9
    )


def _lora_setup(dtype):
    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    add_lora(pipe.unet, rank=4, alpha=4)
    settings = SamplingSettings(num_steps=4, guidance_scale=3.0, ddim_eta=1.0)
    traj = sample_trajectories(pipe, ["a cat", "a dog"], images_per_prompt=3, settings=settings, seed=3)
    scheduler = make_scheduler(pipe, traj.settings)
    if dtype == torch.float64:  # the recorded trajectories and the model in double precision
        pipe.unet.double()
        traj = dataclasses.replace(
            traj,
            latents=traj.latents.double(),
            log_probs=traj.log_probs.double(),
            prompt_embeds=traj.prompt_embeds.double(),
            negative_embeds=traj.negative_embeds.double(),
        )
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    with torch.no_grad():  # move off-policy so the log-ratios (and the residual's first term) are non-zero
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    return pipe, traj, scheduler, lora


@pytest.fixture(scope="module")
def lora_setups():
    return {dtype: _lora_setup(dtype) for dtype in (torch.float32, torch.float64)}


def _grads(params):
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize(("dtype", "steps_per_pass"), EXACTNESS_CASES)  # 3 of 4 steps: groups [3, 1]
def test_rebel_gradient_equals_full_graph_autograd(lora_setups, dtype, steps_per_pass):
    pipe, traj, scheduler, lora = lora_setups[dtype]
    pairs = pair_indices(traj.group)  # 3 + 3 pairs
    targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
    steps = traj.stochastic_steps()
    eta = 0.5
    assert len(steps) == 4
    assert log_ratios(pipe.unet, scheduler, traj, torch.arange(len(traj))).abs().max() > 1e-4

    pipe.unet.zero_grad()
    stats = rebel_accumulate(
        pipe.unet,
        scheduler,
        traj,
        pairs,
        targets,
        eta=eta,
        train_batch_size=2,
        steps=steps,
        steps_per_pass=steps_per_pass,
    )
    ours = _grads(lora)

    # Naive: the whole graph of every step of every image, one backward.
    pipe.unet.zero_grad()
    images = torch.arange(len(traj))
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    ratio = (new - traj.log_probs[:, steps]).sum(dim=1)
    loss = rebel_loss(ratio[pairs[:, 0]], ratio[pairs[:, 1]], targets, eta)
    loss.backward()
    naive = _grads(lora)
    rel = ((ours - naive).norm() / naive.norm()).item()
    assert ours.dtype == dtype and rel <= GRAD_TOL[dtype], rel
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_rebel_on_policy_gradient_matches_rescored():
    """on_policy=True (log-ratio 0) equals the rescored computation when the weights sampled traj."""
    pipe = load_pipeline("tiny")
    torch.manual_seed(1)
    add_lora(pipe.unet, rank=4, alpha=4)
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    settings = SamplingSettings(num_steps=3, guidance_scale=2.0, ddim_eta=1.0)
    traj = sample_trajectories(pipe, ["a cat", "a dog"], images_per_prompt=2, settings=settings)
    scheduler = make_scheduler(pipe, traj.settings)
    pairs, targets = pair_indices(traj.group), torch.tensor([0.7, -0.3])
    grads = []
    for on_policy in (True, False):
        pipe.unet.zero_grad()
        rebel_accumulate(
            pipe.unet,
            scheduler,
            traj,
            pairs,
            targets,
            eta=1.0,
            train_batch_size=1,
            steps=[0, 1, 2],
            on_policy=on_policy,
        )
        grads.append(_grads(lora))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-4


@pytest.mark.parametrize(("dtype", "steps_per_pass"), EXACTNESS_CASES)
def test_ddpo_gradient_equals_full_graph_autograd(lora_setups, dtype, steps_per_pass):
    pipe, traj, scheduler, lora = lora_setups[dtype]
    steps = traj.stochastic_steps()
    adv = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.0, 0.0])
    images = torch.arange(len(traj))
    pipe.unet.zero_grad()
    stats = ddpo_accumulate(
        pipe.unet,
        scheduler,
        traj,
        images,
        adv,
        clip_range=0.2,
        adv_clip_max=5.0,
        train_batch_size=4,
        steps=steps,
        steps_per_pass=steps_per_pass,
    )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    old = traj.log_probs[:, steps]
    loss, naive_stats = ppo_clip_loss(
        new.flatten(), old.flatten(), adv[:, None].expand_as(new).flatten(), clip_range=0.2
    )
    (loss / new.numel()).backward()
    naive = _grads(lora)
    assert ((ours - naive).norm() / naive.norm()).item() <= GRAD_TOL[dtype]
    assert stats["loss"] == pytest.approx(loss.item() / new.numel(), rel=1e-5)
    assert stats["approx_kl"] == pytest.approx(naive_stats["approx_kl"].item(), rel=1e-4)
    assert stats["clipfrac"] == pytest.approx(naive_stats["clipfrac"].item(), abs=1e-6)


def _run_rebel_steps(sign: float, steps_n: int = 6):
    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    add_lora(pipe.unet, rank=4, alpha=4)
    settings = SamplingSettings(num_steps=3, guidance_scale=2.0, ddim_eta=1.0)
    traj = sample_trajectories(pipe, ["a cat", "a dog"], images_per_prompt=2, settings=settings, seed=7)
    scheduler = make_scheduler(pipe, traj.settings)
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(lora, lr=3e-4)
    pairs = pair_indices(traj.group)
    eta = 0.01  # small eta: the regression target eta * (A - A') is reachable in a few steps
    targets = sign * torch.tensor([1.0, 1.0])
    steps = [0, 1, 2]
    diffs, losses = [], []
    for s in range(steps_n):
        opt.zero_grad()
        stats = rebel_accumulate(
            pipe.unet, scheduler, traj, pairs, targets, eta=eta, train_batch_size=2, steps=steps, on_policy=s == 0
        )
        losses.append(stats["loss"])
        opt.step()
        ratio = log_ratios(pipe.unet, scheduler, traj, torch.arange(len(traj)))
        diffs.append((ratio[pairs[:, 0]] - ratio[pairs[:, 1]]).tolist())
    return np.array(diffs), np.array(losses), eta


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rebel_steps_move_log_ratio_toward_target(sign):
    diffs, losses, eta = _run_rebel_steps(sign)
    # Each pair's log-ratio difference moves toward eta * target, in the target's direction...
    assert np.all(sign * diffs[-1] > 0)
    assert np.all(np.abs(diffs[-1] - sign * eta) < np.abs(0.0 - sign * eta))
    # ...and the regression loss falls.
    assert losses[-1] < 0.5 * losses[0]


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    std = torch.tensor([0.3, 0.5, 1.2]).view(3, 1, 1, 1)
    expected = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
        )
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(gaussian_kl(mean, ref, std), expected)
    torch.testing.assert_close(gaussian_kl(mean, ref, 0.5), gaussian_kl(mean, ref, torch.full((3, 1, 1, 1), 0.5)))


def _reference_mean(pipe, scheduler, traj):
    """The base policy's step means: the same UNet with its LoRA adapters disabled (as the trainer)."""

    def mean(steps, index):
        pipe.unet.disable_adapters()
        try:
            return steps_log_prob(pipe.unet, scheduler, traj, steps, index=index, with_mean=True)[1]
        finally:
            pipe.unet.enable_adapters()

    return mean


def _naive_kl(pipe, scheduler, traj, steps, images):
    """sum_t KL_t of each image by full-graph autograd: (n,)."""
    out = []
    for j in steps:
        _, mean, std = steps_log_prob(pipe.unet, scheduler, traj, [j], index=images, with_mean=True)
        with torch.no_grad():
            ref = _reference_mean(pipe, scheduler, traj)([j], images)
        out.append(gaussian_kl(mean, ref, std))
    return torch.stack(out, dim=1).sum(dim=1)


@pytest.mark.parametrize("algorithm", ["rebel", "ddpo"])
def test_kl_regularised_gradient_equals_full_graph_autograd(lora_setups, algorithm):
    """The KL term toward the base (adapters disabled) adds exactly its gradient, step by step."""
    pipe, traj, scheduler, lora = lora_setups[torch.float64]
    steps, coef = [0, 1, 2], 0.3
    images = torch.arange(len(traj))
    pipe.unet.zero_grad()
    if algorithm == "rebel":
        pairs = pair_indices(traj.group)
        targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
        stats = rebel_accumulate(
            pipe.unet,
            scheduler,
            traj,
            pairs,
            targets,
            eta=0.5,
            train_batch_size=2,
            steps=steps,
            steps_per_pass=2,
            ratio_steps=steps,
            kl_coef=coef,
            reference_mean=_reference_mean(pipe, scheduler, traj),
        )
    else:
        adv = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.0, 0.0])
        stats = ddpo_accumulate(
            pipe.unet,
            scheduler,
            traj,
            images,
            adv,
            clip_range=0.2,
            adv_clip_max=5.0,
            train_batch_size=4,
            steps=steps,
            steps_per_pass=2,
            kl_coef=coef,
            reference_mean=_reference_mean(pipe, scheduler, traj),
        )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    kl = _naive_kl(pipe, scheduler, traj, steps, images)  # (B,)
    if algorithm == "rebel":
        ratio = (new - traj.log_probs[:, steps]).sum(dim=1)
        members = pairs.flatten()  # each image once per pair it is in
        loss = rebel_loss(ratio[pairs[:, 0]], ratio[pairs[:, 1]], targets, 0.5) + coef * kl[members].mean()
        expected_kl = kl[members].mean()
    else:
        old = traj.log_probs[:, steps]
        ppo, _ = ppo_clip_loss(new.flatten(), old.flatten(), adv[:, None].expand_as(new).flatten(), clip_range=0.2)
        loss = ppo / new.numel() + coef * kl.mean()
        expected_kl = kl.mean()
    loss.backward()
    naive = _grads(lora)
    assert expected_kl.item() > 1e-6  # off the base: the term is not zero
    assert ((ours - naive).norm() / naive.norm()).item() <= GRAD_TOL[torch.float64]
    assert stats["kl"] == pytest.approx(expected_kl.item(), rel=1e-9)
