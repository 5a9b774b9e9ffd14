"""One optimizer step's gradient (``rebel_diffusion.algorithms.updates``): REBEL and DDPO, step by step, equal to
full-graph autograd; the KL term; updates move the log-ratio toward the target."""

import dataclasses

import numpy as np
import pytest
import torch

from rebel_diffusion.algorithms.ddpo import ppo_clip_loss
from rebel_diffusion.algorithms.rebel import (
    pair_indices,
    rebel_loss,
    trained_steps,
)
from rebel_diffusion.algorithms.updates import StepModel, ddpo_accumulate, log_ratios, rebel_accumulate
from rebel_diffusion.config import TrainConfig, step_weights
from rebel_diffusion.errors import UsageError
from rebel_diffusion.models import add_lora, load_pipeline
from rebel_diffusion.sampling import (
    SamplingSettings,
    make_scheduler,
    sample_trajectories,
    step_log_prob,
    steps_log_prob,
)
from rebel_diffusion.sampling.steps import gaussian_kl

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
        StepModel(pipe.unet, scheduler, traj, steps_per_pass=2),
        pairs,
        targets,
        eta=0.5,
        train_batch_size=2,
        steps=steps,
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


@pytest.mark.parametrize(
    ("dtype", "steps_per_pass", "micro_batch"),
    [
        *[pytest.param(*case.values, 2, id=case.id) for case in EXACTNESS_CASES],  # 3 of 4 steps: groups [3, 1]
        pytest.param(torch.float64, 4, 6, id="fp64-whole-step-in-one-call"),  # the no-graph pass is skipped
    ],
)
def test_rebel_gradient_equals_full_graph_autograd(lora_setups, dtype, steps_per_pass, micro_batch):
    pipe, traj, scheduler, lora = lora_setups[dtype]
    pairs = pair_indices(traj.group)  # 3 + 3 pairs
    targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
    steps = traj.stochastic_steps()
    eta = 0.5
    assert len(steps) == 4
    assert log_ratios(pipe.unet, scheduler, traj, torch.arange(len(traj))).abs().max() > 1e-4

    pipe.unet.zero_grad()
    stats = rebel_accumulate(
        StepModel(pipe.unet, scheduler, traj, steps_per_pass=steps_per_pass),
        pairs,
        targets,
        eta=eta,
        train_batch_size=micro_batch,
        steps=steps,
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


def test_rebel_differentiates_each_image_once_whatever_its_pairs(lora_setups):
    """k = 3: every image is in 2 pairs, yet the backward passes see each image once per step."""
    pipe, traj, scheduler, _ = lora_setups[torch.float32]
    pairs = pair_indices(traj.group)  # 6 pairs of 6 images
    rows = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    try:
        rebel_accumulate(
            StepModel(pipe.unet, scheduler, traj),
            pairs,
            torch.ones(6),
            eta=1.0,
            train_batch_size=4,
            steps=[0, 1],
            on_policy=True,
        )
    finally:
        hook.remove()
        pipe.unet.zero_grad()
    cfg_copies = 2  # classifier-free guidance: conditional and unconditional rows
    assert sum(rows) == cfg_copies * len(traj) * 2  # 6 images x 2 steps, not 12 pair members x 2
    assert max(rows) == cfg_copies * 4  # micro-batches of train_batch_size images
    # Off-policy, with the whole step in one call: that call also gives the log-ratios.
    rows.clear()
    hook = pipe.unet.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    try:
        rebel_accumulate(
            StepModel(pipe.unet, scheduler, traj, steps_per_pass=4),
            pairs,
            torch.ones(6),
            eta=1.0,
            train_batch_size=6,
            steps=[0, 1, 2, 3],
        )
    finally:
        hook.remove()
        pipe.unet.zero_grad()
    assert rows == [cfg_copies * len(traj) * 4]


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
            StepModel(pipe.unet, scheduler, traj),
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
        StepModel(pipe.unet, scheduler, traj, steps_per_pass=steps_per_pass),
        images,
        adv,
        clip_range=0.2,
        adv_clip_max=5.0,
        train_batch_size=4,
        steps=steps,
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
            StepModel(pipe.unet, scheduler, traj),
            pairs,
            targets,
            eta=eta,
            train_batch_size=2,
            steps=steps,
            on_policy=s == 0,
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


@pytest.mark.parametrize("masked", [False, True], ids=["every-image", "kl-prompts"])
@pytest.mark.parametrize("algorithm", ["rebel", "rebel-whole-step", "ddpo"])
def test_kl_regularised_gradient_equals_full_graph_autograd(lora_setups, algorithm, masked):
    """The KL term toward the base (adapters disabled) adds exactly its gradient, step by step; with
    ``kl_images`` (--kl-prompts) only the covered images' KL, each at the same price per nat."""
    pipe, traj, scheduler, lora = lora_setups[torch.float64]
    steps, coef = [0, 1, 2], 0.3
    images = torch.arange(len(traj))
    covered = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]) if masked else None  # (B,) one per image
    pipe.unet.zero_grad()
    whole_step = algorithm == "rebel-whole-step"  # one call holds the step: no no-graph pass
    algorithm = algorithm.removesuffix("-whole-step")
    if algorithm == "rebel":
        pairs = pair_indices(traj.group)
        targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
        stats = rebel_accumulate(
            StepModel(
                pipe.unet,
                scheduler,
                traj,
                steps_per_pass=3 if whole_step else 2,
                kl_coef=coef,
                reference_mean=_reference_mean(pipe, scheduler, traj),
                kl_images=covered,
            ),
            pairs,
            targets,
            eta=0.5,
            train_batch_size=6 if whole_step else 2,
            steps=steps,
            ratio_steps=steps,
        )
    else:
        adv = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.0, 0.0])
        stats = ddpo_accumulate(
            StepModel(
                pipe.unet,
                scheduler,
                traj,
                steps_per_pass=2,
                kl_coef=coef,
                reference_mean=_reference_mean(pipe, scheduler, traj),
                kl_images=covered,
            ),
            images,
            adv,
            clip_range=0.2,
            adv_clip_max=5.0,
            train_batch_size=4,
            steps=steps,
        )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    kl = _naive_kl(pipe, scheduler, traj, steps, images)  # (B,)
    if masked:
        kl = kl * covered  # the others' KL is not in the loss, nor in the reported mean
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


def test_ddpo_kl_weighs_nats_against_advantages_as_rebel():
    """With ``ddpo_kl_coef``, DDPO's gradient is 1/(D*m) times that of the KL-regularised objective
    in nats: mean_i [-A_i sum_t r_it * D + kl_coef * KL_i], r the per-step probability ratio (no
    clipping here), D = C*h*w. So --kl-coef prices a nat of KL the same for both algorithms."""
    from rebel_diffusion.algorithms.ddpo import ddpo_kl_coef

    pipe, traj, scheduler, lora = _lora_setup(torch.float64)
    steps, coef = [0, 1, 2], 0.3
    dims = traj.latents[0, 0].numel()
    images = torch.arange(len(traj))
    adv = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.0, 0.0], dtype=torch.float64)
    pipe.unet.zero_grad()
    ddpo_accumulate(
        StepModel(
            pipe.unet,
            scheduler,
            traj,
            kl_coef=ddpo_kl_coef(coef, dims, len(steps)),
            reference_mean=_reference_mean(pipe, scheduler, traj),
        ),
        images,
        adv,
        clip_range=1e9,
        adv_clip_max=5.0,
        train_batch_size=4,
        steps=steps,
    )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)  # (B, m)
    ratio = torch.exp(new - traj.log_probs[:, steps])  # per-dim mean log-probs, as DDPO
    objective = -(adv[:, None] * ratio * dims).sum(dim=1) + coef * _naive_kl(pipe, scheduler, traj, steps, images)
    (objective.mean() / (dims * len(steps))).backward()
    naive = _grads(lora)
    # ppo_clip_loss forms its ratios in float32 (as DDPO), this reference in float64.
    assert ((ours - naive).norm() / naive.norm()).item() <= 1e-6
    assert ddpo_kl_coef(0.1, 256, 8) == pytest.approx(0.1 / 2048)


# ------------------------------------------------------------------------------------------------
# the base anchor (--anchor base): regression against the frozen base, clipped around the sampler


def _anchored_loss(new, recorded, base, pairs, targets, eta, epsilon, w=1.0):
    """The anchored loss written out with autograd: mean over pairs of max(rho^2, rho_clip^2);
    ``w`` (S,): the per-step weights of D."""
    step = new - recorded  # (B, S) ln pi_theta - ln pi_t
    offset = ((recorded - base) * w).sum(dim=1)  # (B,) ln pi_t - ln pi_ref
    full = (step * w).sum(dim=1) + offset
    clipped = (step.clamp(-epsilon, epsilon) * w).sum(dim=1) + offset
    rho = (full[pairs[:, 0]] - full[pairs[:, 1]]) / eta - targets
    rho_clip = (clipped[pairs[:, 0]] - clipped[pairs[:, 1]]) / eta - targets
    return torch.maximum(rho.pow(2), rho_clip.pow(2)).mean()


@pytest.mark.parametrize("epsilon", [1e9, 2e-3, 1e-6], ids=["no-clip", "some-clipped", "all-clipped"])
@pytest.mark.parametrize("steps_per_pass", [1, 4])
def test_anchored_rebel_gradient_equals_full_graph_autograd(lora_setups, epsilon, steps_per_pass):
    pipe, traj, scheduler, lora = lora_setups[torch.float64]
    pairs = pair_indices(traj.group)
    targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
    steps = traj.stochastic_steps()
    gen = torch.Generator().manual_seed(1)
    base = traj.log_probs - 1e-2 * torch.rand(traj.log_probs.shape, generator=gen, dtype=torch.float64)
    pipe.unet.zero_grad()
    stats = rebel_accumulate(
        StepModel(pipe.unet, scheduler, traj, steps_per_pass=steps_per_pass),
        pairs,
        targets,
        eta=0.5,
        train_batch_size=2,
        steps=steps,
        base_log_probs=base,
        epsilon=epsilon,
    )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    images = torch.arange(len(traj))
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    ratio = (new - traj.log_probs[:, steps]).detach()
    clipped = int((ratio.abs() > epsilon).sum())
    assert clipped == {1e9: 0, 2e-3: clipped, 1e-6: ratio.numel()}[epsilon]
    if epsilon == 2e-3:  # the case must clip some steps and leave others
        assert 0 < clipped < ratio.numel()
    loss = _anchored_loss(new, traj.log_probs[:, steps], base[:, steps], pairs, targets, 0.5, epsilon)
    loss.backward()
    naive = _grads(lora)
    assert ((ours - naive).norm() / naive.norm()).item() <= 1e-12
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-9)


def test_anchored_rebel_on_policy_regresses_the_log_ratio_to_the_base(lora_setups):
    """On-policy the ratio to the sampler is 0, so the prediction is the recorded log-ratio to the base."""
    pipe, traj, scheduler, _ = lora_setups[torch.float32]
    pairs = pair_indices(traj.group)
    targets = torch.zeros(len(pairs))
    steps = traj.stochastic_steps()
    base = traj.log_probs.clone()
    base[:, steps] -= torch.arange(len(traj), dtype=torch.float32)[:, None] * 1e-3  # image i: 4i e-3 above base
    stats = rebel_accumulate(
        StepModel(pipe.unet, scheduler, traj, backward=lambda loss, last: None),
        pairs,
        targets,
        eta=2.0,
        train_batch_size=6,
        steps=steps,
        on_policy=True,
        base_log_probs=base,
        epsilon=1.0,
    )
    expected = (pairs[:, 0] - pairs[:, 1]).float() * 4e-3 / 2.0
    torch.testing.assert_close(stats["prediction"], expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# per-step weights (--policy-step-weights, --kl-step-weights)

WEIGHTS = torch.tensor([2.0, 0.5, 1.5, 0.25], dtype=torch.float64)  # one per step of the 4-step setup


@pytest.mark.parametrize("anchor", ["policy", "base"])
def test_weighted_rebel_gradient_is_that_of_the_weighted_regression(lora_setups, anchor):
    """D(y) = sum_t w_t (ln pi_theta - ln pi_t)(y, t): the accumulated gradient is autograd's of that loss."""
    pipe, traj, scheduler, lora = lora_setups[torch.float64]
    pairs = pair_indices(traj.group)
    targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
    steps = traj.stochastic_steps()
    gen = torch.Generator().manual_seed(2)
    base = traj.log_probs - 1e-2 * torch.rand(traj.log_probs.shape, generator=gen, dtype=torch.float64)
    anchored = {"base_log_probs": base, "epsilon": 2e-3} if anchor == "base" else {}
    pipe.unet.zero_grad()
    model = StepModel(pipe.unet, scheduler, traj, policy_weights=WEIGHTS)
    stats = rebel_accumulate(model, pairs, targets, eta=0.5, train_batch_size=2, steps=steps, **anchored)
    ours = _grads(lora)
    pipe.unet.zero_grad()
    images = torch.arange(len(traj))
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    w = WEIGHTS[steps]
    if anchor == "base":
        loss = _anchored_loss(new, traj.log_probs[:, steps], base[:, steps], pairs, targets, 0.5, 2e-3, w)
    else:
        ratio = ((new - traj.log_probs[:, steps]) * w).sum(dim=1)
        loss = rebel_loss(ratio[pairs[:, 0]], ratio[pairs[:, 1]], targets, 0.5)
    loss.backward()
    naive = _grads(lora)
    assert ((ours - naive).norm() / naive.norm()).item() <= GRAD_TOL[torch.float64]
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-9)
    # and the weights matter: uniform weights give another gradient
    pipe.unet.zero_grad()
    rebel_accumulate(
        StepModel(pipe.unet, scheduler, traj), pairs, targets, eta=0.5, train_batch_size=2, steps=steps, **anchored
    )
    assert ((_grads(lora) - ours).norm() / ours.norm()).item() > 1e-3


def test_weighted_ddpo_and_kl_gradients_are_those_of_the_weighted_objective(lora_setups):
    pipe, traj, scheduler, lora = lora_setups[torch.float64]
    steps, coef = [0, 1, 2], 0.3
    kl_w = torch.tensor([0.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    images = torch.arange(len(traj))
    adv = torch.linspace(-1, 1, len(traj), dtype=torch.float64)
    pipe.unet.zero_grad()
    model = StepModel(
        pipe.unet, scheduler, traj, kl_coef=coef, reference_mean=_reference_mean(pipe, scheduler, traj),
        policy_weights=WEIGHTS, kl_weights=kl_w,
    )  # fmt: skip
    ddpo_accumulate(model, images, adv, clip_range=1e9, adv_clip_max=5.0, train_batch_size=4, steps=steps)
    ours = _grads(lora)
    pipe.unet.zero_grad()
    # mean over (image, step) of -w_t A r  +  coef * mean over images of sum_t v_t KL_t (no clipping)
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    ratio = torch.exp(new - traj.log_probs[:, steps])
    policy = -(WEIGHTS[steps] * adv[:, None] * ratio).mean()
    kl = []
    for j in steps:
        _, mean, std = steps_log_prob(pipe.unet, scheduler, traj, [j], index=images, with_mean=True)
        with torch.no_grad():
            ref = _reference_mean(pipe, scheduler, traj)([j], images)
        kl.append(gaussian_kl(mean, ref, std) * kl_w[j])
    (policy + coef * torch.stack(kl, dim=1).sum(dim=1).mean()).backward()
    naive = _grads(lora)
    # ppo_clip_loss forms its ratios in float32 (as DDPO), this reference in float64.
    assert ((ours - naive).norm() / naive.norm()).item() <= 1e-6


def test_step_weights_flags():
    assert step_weights("uniform", 4) is None
    assert step_weights("linear:0,3", 4) == [0.0, 1.0, 2.0, 3.0]
    assert step_weights("1,2,0.5,0", 4) == [1.0, 2.0, 0.5, 0.0]
    for bad in ("linear:1", "1,2,3", "1,2,3,-1", "1,2,nan,1", "steep"):
        with pytest.raises(UsageError, match="--policy-step-weights"):
            step_weights(bad, 4)
    with pytest.raises(UsageError, match="--kl-step-weights 1,2: use uniform"):
        TrainConfig(num_steps=3, kl_step_weights="1,2").validate()
