"""The trajectory sampler (``rebel_diffusion.sampling``): recorded trajectories, CFG, per-image
seeds, re-scoring and the on-policy check.

References are independent of ``rebel_diffusion.sampling``: ``torch.distributions.Normal``, diffusers'
own ``DDIMScheduler`` / ``LCMScheduler`` / ``StableDiffusionPipeline``, and manual two-pass loops
written out here. The step math itself is tested in ``test_steps.py``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from step_references import ddim_reference, ddim_scheduler, gen, lcm_scheduler, normal_log_prob
from torch.testing import assert_close

from rebel_diffusion import sampling
from rebel_diffusion.errors import UsageError
from rebel_diffusion.models import SD_SCHEDULER_CONFIG
from rebel_diffusion.models.components import decode_latents, guidance_embedding
from rebel_diffusion.sampling import (
    SamplingSettings,
    make_scheduler,
    rescore_drift,
    rescore_log_probs,
    sample_trajectories,
    step_log_prob,
    steps_log_prob,
)

PROMPTS = ["a red circle on a blue background", "a green square, on grass!"]
K = 2  # images per prompt
SEED = 100
DDIM_SETTINGS = SamplingSettings(sampler="ddim", num_steps=4, ddim_eta=1.0, guidance_scale=5.0)
LCM_SETTINGS = SamplingSettings(num_steps=4, guidance_scale=8.0)
RESCORE_TOL = 1e-5  # fp32 CPU


# ----------------------------------------------------------------------------------------------
# helpers


def fresh_pipeline(pipe, scheduler=None):
    """A new pipeline object sharing ``pipe``'s modules, with its own scheduler (fixtures stay untouched)."""
    scheduler = scheduler if scheduler is not None else type(pipe.scheduler).from_config(pipe.scheduler.config)
    new = type(pipe)(**{**pipe.components, "scheduler": scheduler, "requires_safety_checker": False})
    new.set_progress_bar_config(disable=True)
    return new


@torch.no_grad()
def text_embeds(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(
        [prompt],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids)[0]


# ----------------------------------------------------------------------------------------------
# trajectories shared by the sampler tests (each sampled once per module)


@pytest.fixture(scope="module")
def ddim_traj(tiny_pipe):
    return sample_trajectories(tiny_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=DDIM_SETTINGS)


@pytest.fixture(scope="module")
def v_traj(tiny_v_pipe):
    return sample_trajectories(tiny_v_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=DDIM_SETTINGS)


@pytest.fixture(scope="module")
def lcm_traj(tiny_lcm_pipe):
    return sample_trajectories(tiny_lcm_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=LCM_SETTINGS)


CASES = {  # model -> (pipeline fixture, trajectory fixture, settings)
    "tiny": ("tiny_pipe", "ddim_traj", DDIM_SETTINGS),
    "tiny-v": ("tiny_v_pipe", "v_traj", DDIM_SETTINGS),
    "tiny-lcm": ("tiny_lcm_pipe", "lcm_traj", LCM_SETTINGS),
}


def case(request, name):
    pipe_fx, traj_fx, settings = CASES[name]
    return request.getfixturevalue(pipe_fx), request.getfixturevalue(traj_fx), settings


@pytest.fixture(scope="module")
def zero_variance_traj(tiny_pipe):
    pipe = fresh_pipeline(tiny_pipe)
    # set after construction: StableDiffusionPipeline.__init__ rewrites steps_offset=0 to 1
    pipe.scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "steps_offset": 0})
    return pipe, sample_trajectories(pipe, PROMPTS[:1], images_per_prompt=2, seed=SEED, settings=DDIM_SETTINGS)


def test_sampler_marks_zero_variance_ddim_step(zero_variance_traj):
    pipe, traj = zero_variance_traj
    assert traj.timesteps[-1] == 0
    assert traj.stochastic.tolist() == [True, True, True, False]
    assert torch.isfinite(traj.log_probs).all() and torch.isfinite(traj.latents).all()
    assert torch.equal(traj.log_probs[:, -1], torch.zeros(2))
    sched = make_scheduler(pipe, traj.settings)
    new = rescore_log_probs(pipe.unet, sched, traj)
    assert new.shape == (2, 3) and torch.isfinite(new).all()
    assert (new - traj.log_probs[:, :3]).abs().max() <= RESCORE_TOL
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob(pipe.unet, sched, traj, 3)


# ----------------------------------------------------------------------------------------------
# trajectory sampler


def test_trajectory_shapes_and_contents(tiny_pipe, ddim_traj):
    traj, b, t = ddim_traj, len(PROMPTS) * K, DDIM_SETTINGS.num_steps
    assert len(traj) == b and traj.prompts == [p for p in PROMPTS for _ in range(K)]
    assert traj.latents.shape == (b, t + 1, 4, 8, 8) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (b, t) and traj.log_probs.dtype == torch.float32
    assert traj.timesteps.shape == (t,) and traj.timesteps.dtype == torch.long
    assert traj.timesteps.tolist() == make_scheduler(tiny_pipe, traj.settings).timesteps.tolist()
    assert traj.stochastic.tolist() == [True] * t
    assert torch.isfinite(traj.log_probs).all()
    assert traj.images.shape == (b, 3, 32, 32) and traj.images.dtype == torch.float32
    assert traj.images.min() >= 0 and traj.images.max() <= 1 and traj.images.std() > 0
    assert traj.prompt_embeds.shape == (b, 77, 32) and traj.negative_embeds.shape == (b, 77, 32)
    assert traj.group.tolist() == [0, 0, 1, 1] and traj.seeds.tolist() == [SEED + i for i in range(b)]
    # x_T is each image's seeded N(0, I) draw, and the images decode x_0
    for i in range(b):
        assert torch.equal(traj.latents[i, 0], randn_tensor((1, 4, 8, 8), generator=gen(SEED + i))[0])
    assert_close(traj.images, decode_latents(tiny_pipe.vae, traj.latents[:, -1]))
    assert_close(traj.prompt_embeds[2], text_embeds(tiny_pipe, PROMPTS[1])[0])
    assert_close(traj.negative_embeds[0], text_embeds(tiny_pipe, "")[0])


def test_record_false_keeps_images_only(tiny_pipe, ddim_traj):
    lean = sample_trajectories(
        tiny_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=DDIM_SETTINGS, record=False
    )
    assert lean.latents.shape[1] == 1
    assert_close(lean.images, ddim_traj.images, rtol=0, atol=1e-6)
    assert_close(lean.log_probs, ddim_traj.log_probs, rtol=0, atol=1e-6)


def test_cfg_is_one_batched_unet_call_per_step(tiny_pipe, tiny_lcm_pipe):
    def count(pipe, settings):
        sizes = []
        handle = pipe.unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
        try:
            sample_trajectories(pipe, PROMPTS[:1], images_per_prompt=3, settings=settings)
        finally:
            handle.remove()
        return sizes

    assert count(tiny_pipe, DDIM_SETTINGS) == [6] * DDIM_SETTINGS.num_steps  # uncond + cond together
    assert count(tiny_pipe, replace(DDIM_SETTINGS, guidance_scale=1.0)) == [3] * DDIM_SETTINGS.num_steps
    assert count(tiny_lcm_pipe, LCM_SETTINGS) == [3] * LCM_SETTINGS.num_steps  # guidance as an embedding


@torch.no_grad()
def test_cfg_equals_manual_two_pass(tiny_pipe, ddim_traj):
    """Replay images 0 and 2 one at a time: unconditional and conditional UNet passes, diffusers' DDIM step."""
    w, eta = DDIM_SETTINGS.guidance_scale, DDIM_SETTINGS.ddim_eta
    uncond = text_embeds(tiny_pipe, "")
    gap = 0.0
    for i in (0, 2):
        sched = ddim_scheduler(DDIM_SETTINGS.num_steps)
        g = gen(int(ddim_traj.seeds[i]))
        x = randn_tensor((1, 4, 8, 8), generator=g)
        cond = text_embeds(tiny_pipe, ddim_traj.prompts[i])
        for j, t in enumerate(sched.timesteps):
            e_u = tiny_pipe.unet(x, t, encoder_hidden_states=uncond).sample
            e_c = tiny_pipe.unet(x, t, encoder_hidden_states=cond).sample
            gap = max(gap, float((e_c - e_u).abs().max()))
            guided = e_u + w * (e_c - e_u)
            mean, std, _ = ddim_reference(sched, guided, int(t), x, eta)
            x = sched.step(guided, t, x, eta=eta, generator=g).prev_sample
            assert_close(ddim_traj.latents[i, j + 1], x[0], rtol=1e-4, atol=1e-4)
            # the recorded log-prob is that of the GUIDED policy
            expected = normal_log_prob(ddim_traj.latents[i, j + 1 : j + 2].double(), mean, std)
            assert_close(ddim_traj.log_probs[i, j : j + 1].double(), expected, rtol=1e-5, atol=1e-4)
    assert gap > 1e-3  # the prompt moves the UNet output, so guidance is exercised


@torch.no_grad()
def test_lcm_guidance_embedding_path(tiny_lcm_pipe, lcm_traj):
    """tiny-lcm: one conditional pass per step with the guidance embedding, no negative embeddings."""
    pipe, w = tiny_lcm_pipe, LCM_SETTINGS.guidance_scale
    dim = pipe.unet.config.time_cond_proj_dim
    assert dim and lcm_traj.negative_embeds is None
    assert lcm_traj.stochastic.tolist() == [True, True, True, False]
    assert torch.equal(lcm_traj.log_probs[:, -1], torch.zeros(len(lcm_traj)))
    w_emb = pipe.get_guidance_scale_embedding(torch.tensor([w - 1.0]), embedding_dim=dim)
    assert_close(guidance_embedding(torch.tensor([w]), dim), w_emb)
    sched = lcm_scheduler(LCM_SETTINGS.num_steps)
    i = 1
    g = gen(int(lcm_traj.seeds[i]))
    x = randn_tensor((1, 4, 8, 8), generator=g)
    cond = text_embeds(pipe, lcm_traj.prompts[i])
    for j, t in enumerate(sched.timesteps):
        e = pipe.unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        if j == 0:  # the embedding matters
            other = pipe.get_guidance_scale_embedding(torch.tensor([1.0]), embedding_dim=dim)
            assert (pipe.unet(x, t, encoder_hidden_states=cond, timestep_cond=other).sample - e).abs().max() > 1e-4
        x = sched.step(e, t, x, generator=g).prev_sample
        assert_close(lcm_traj.latents[i, j + 1], x[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_images_equal_diffusers_pipeline(name, request):
    pipe, traj, settings = case(request, name)
    plain = fresh_pipeline(pipe)
    images = plain(
        PROMPTS,
        num_images_per_prompt=K,
        num_inference_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale,
        eta=settings.ddim_eta,
        generator=[gen(int(s)) for s in traj.seeds],
        output_type="pt",
    ).images
    assert images.shape == traj.images.shape
    assert_close(traj.images, images, rtol=0, atol=1e-5)


def test_per_image_seed_reproducible(tiny_pipe, ddim_traj):
    def sample(prompts, **kw):
        return sample_trajectories(tiny_pipe, prompts, settings=DDIM_SETTINGS, **kw)

    def same(a, b):  # images to 1e-5; latents (|x| up to ~4) to batched-conv rounding
        assert_close(a.images, b.images, rtol=0, atol=1e-5)
        assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)
        assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-4)

    alone = sample(PROMPTS[1:], seeds=[SEED + 2])
    same(alone, ddim_traj.select([2]))
    chunked = sample(PROMPTS, images_per_prompt=K, seed=SEED, batch_size=3)
    same(chunked, ddim_traj)
    bigger = sample([*PROMPTS, "a third prompt"], images_per_prompt=K, seed=SEED)
    same(bigger.select([0, 1, 2, 3]), ddim_traj)
    # and the seed matters: same prompt, different seeds, different images
    assert (ddim_traj.images[0] - ddim_traj.images[1]).abs().max() > 1e-3


def test_per_image_seed_reproducible_lcm(tiny_lcm_pipe, lcm_traj):
    alone = sample_trajectories(tiny_lcm_pipe, PROMPTS[:1], seeds=[SEED + 1], settings=LCM_SETTINGS)
    chunked = sample_trajectories(
        tiny_lcm_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=LCM_SETTINGS, batch_size=3
    )
    assert_close(alone.images[0], lcm_traj.images[1], rtol=0, atol=1e-5)
    assert_close(chunked.images, lcm_traj.images, rtol=0, atol=1e-5)
    assert_close(chunked.log_probs, lcm_traj.log_probs, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# re-scoring


@pytest.mark.parametrize("name", list(CASES))
def test_rescore_reproduces_recorded_log_probs(name, request):
    pipe, traj, _ = case(request, name)
    sched = make_scheduler(pipe, traj.settings)
    steps = traj.stochastic_steps()
    new = rescore_log_probs(pipe.unet, sched, traj)
    assert new.shape == (len(traj), len(steps)) and new.dtype == torch.float32
    assert float((new - traj.log_probs[:, steps]).abs().max()) <= RESCORE_TOL
    assert rescore_drift(pipe.unet, sched, traj) <= RESCORE_TOL
    some = rescore_log_probs(pipe.unet, sched, traj, steps=steps[1:], index=[3, 0], batch_size=1)
    # Another batch size changes the matmul blocking: a few float32 ulps of log-probs ~2.
    assert_close(some, new[[3, 0]][:, 1:], rtol=0, atol=4e-6)
    # Several steps in one UNet call (per-sample timesteps): the same log-probs as step by step.
    for steps_per_pass in (2, len(steps)):
        batched = rescore_log_probs(pipe.unet, sched, traj, steps_per_pass=steps_per_pass)
        assert float((batched - traj.log_probs[:, steps]).abs().max()) <= RESCORE_TOL
    mixed = steps_log_prob(pipe.unet, sched, traj, [steps[-1], steps[0]], index=[1, 2])  # any order, (2, 2)
    assert_close(
        mixed,
        torch.stack([step_log_prob(pipe.unet, sched, traj, j, index=[1, 2]) for j in (steps[-1], steps[0])], dim=1),
        rtol=0,
        atol=1e-6,
    )


def test_rescore_without_stochastic_steps(tiny_lcm_pipe):
    """A 1-step LCM trajectory has only the deterministic final step: nothing to score, no crash."""
    traj = sample_trajectories(
        tiny_lcm_pipe, PROMPTS[:1], images_per_prompt=2, settings=replace(LCM_SETTINGS, num_steps=1)
    )
    assert traj.stochastic.tolist() == [False] and torch.equal(traj.log_probs, torch.zeros(2, 1))
    sched = make_scheduler(tiny_lcm_pipe, traj.settings)
    assert rescore_log_probs(tiny_lcm_pipe.unet, sched, traj).shape == (2, 0)
    assert rescore_drift(tiny_lcm_pipe.unet, sched, traj) == 0.0


def test_rescore_depends_on_guidance_and_weights(tiny_pipe, ddim_traj):
    sched = make_scheduler(tiny_pipe, ddim_traj.settings)
    wrong_w = replace(ddim_traj, settings=replace(ddim_traj.settings, guidance_scale=2.0))
    assert rescore_drift(tiny_pipe.unet, sched, wrong_w) > 1e-3
    no_cfg = replace(ddim_traj, negative_embeds=None)
    assert rescore_drift(tiny_pipe.unet, sched, no_cfg) > 1e-3

    unet = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen(0)))
    assert rescore_drift(unet, sched, ddim_traj) > 1e-4
    # step_log_prob is differentiable w.r.t. the weights (training uses it)
    unet.zero_grad(set_to_none=True)
    step_log_prob(unet, sched, ddim_traj, 1, index=[0, 2]).sum().backward()
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().max()) > 0 for g in grads)


def test_v_prediction_model(tiny_v_pipe, v_traj):
    assert tiny_v_pipe.scheduler.config.prediction_type == "v_prediction"
    assert torch.isfinite(v_traj.log_probs).all() and v_traj.stochastic.all()
    assert v_traj.images.min() >= 0 and v_traj.images.max() <= 1
    sched = make_scheduler(tiny_v_pipe, v_traj.settings)
    assert sched.config.prediction_type == "v_prediction"
    assert rescore_drift(tiny_v_pipe.unet, sched, v_traj, num_images=4, num_steps=4) <= RESCORE_TOL
    # scoring the same trajectories as if the model predicted epsilon gives other log-probs
    as_eps = DDIMScheduler.from_config(sched.config, prediction_type="epsilon")
    as_eps.set_timesteps(DDIM_SETTINGS.num_steps)
    assert rescore_drift(tiny_v_pipe.unet, as_eps, v_traj) > 1e-3


# ----------------------------------------------------------------------------------------------
# bad input: one UsageError each, before any heavy work


@pytest.fixture
def tripwired(tiny_pipe, monkeypatch):
    """tiny_pipe whose text encoder, UNet and VAE fail the test if called (undone after the test)."""

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work ran before the input was validated")

    monkeypatch.setattr(sampling.sampler, "encode_prompts", heavy)
    monkeypatch.setattr(sampling.sampler, "decode_latents", heavy)
    for module in (tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.vae):
        monkeypatch.setattr(module, "forward", heavy)
    return tiny_pipe


BAD_INPUTS = {
    "empty prompt list": (dict(prompts=[]), "prompt list is empty"),
    "images_per_prompt 0": (dict(images_per_prompt=0), "images per prompt must be >= 1"),
    "num_steps 0": (dict(settings=SamplingSettings(num_steps=0)), "steps must be >= 1"),
    "eta negative": (dict(settings=SamplingSettings(ddim_eta=-1.0)), "eta must be >= 0"),
    "height not a multiple": (
        dict(settings=SamplingSettings(height=33)),
        "height must be a positive multiple",
    ),
    "width not a multiple": (dict(settings=SamplingSettings(width=31)), "width must be a positive multiple"),
    "height zero": (dict(settings=SamplingSettings(height=0)), "height must be a positive multiple"),
    "width negative": (dict(settings=SamplingSettings(width=-32)), "width must be a positive multiple"),
    "unknown sampler": (dict(settings=SamplingSettings(sampler="euler")), "sampler must be"),
    "seed count": (dict(seeds=[1, 2, 3]), "3 seeds for 2 images"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_input_raises_usage_error_early(bad, tripwired):
    overrides, message = BAD_INPUTS[bad]
    kwargs = dict(prompts=PROMPTS, images_per_prompt=1, settings=SamplingSettings(num_steps=2), **{})
    kwargs.update(overrides)
    prompts = kwargs.pop("prompts")
    with pytest.raises(UsageError, match=message) as info:
        sample_trajectories(tripwired, prompts, **kwargs)
    assert "\n" not in str(info.value)


def test_tripwire_fires_on_valid_input(tripwired):
    """The bad-input test would notice heavy work: a valid call does reach it."""
    with pytest.raises(AssertionError, match="heavy work"):
        sample_trajectories(tripwired, PROMPTS, settings=SamplingSettings(num_steps=1))


def test_guidance_embedding_matches_reference_formula():
    w, dim = torch.tensor([1.0, 3.5, 8.0]), 32
    half = dim // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
    arg = ((w - 1) * 1000)[:, None] * freqs[None]
    assert_close(guidance_embedding(w, dim), torch.cat([arg.sin(), arg.cos()], dim=1))


def test_recorded_step_std_is_ddims_closed_form(tiny_pipe):
    """Trajectories.step_std: eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) per step."""
    from rebel_diffusion.sampling import SamplingSettings, make_scheduler, sample_trajectories

    settings = SamplingSettings(num_steps=4, guidance_scale=1.0, ddim_eta=0.7)
    traj = sample_trajectories(tiny_pipe, ["a cat"], settings=settings)
    scheduler = make_scheduler(tiny_pipe, traj.settings)
    acp = scheduler.alphas_cumprod.double()
    step = scheduler.config.num_train_timesteps // 4
    expected = []
    for t in scheduler.timesteps.tolist():
        a_t = acp[t]
        a_prev = acp[t - step] if t - step >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
        expected.append(0.7 * float(((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()))
    torch.testing.assert_close(traj.step_std.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_planned_step_std_equals_what_the_sampler_records(name, request):
    """The steps' noise std is known from the scheduler alone (the trainer checks --min-step-std
    before anything is written) and equals the sampler's record, step for step."""
    pipe, traj, _ = case(request, name)
    planned = sampling.planned_step_std(make_scheduler(pipe, traj.settings), traj.settings)
    assert planned == traj.step_std.tolist()
    assert [s > 0 for s in planned] == traj.stochastic.tolist()


def test_deterministic_ddim_draws_with_no_log_prob(tiny_pipe):
    """--ddim-eta 0 is for drawing: every step deterministic, the same image whatever the seed's noise
    after x_T, equal to diffusers' own eta-0 DDIM."""
    settings = SamplingSettings(sampler="ddim", num_steps=4, ddim_eta=0.0, guidance_scale=5.0)
    traj = sample_trajectories(tiny_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=settings)
    assert traj.stochastic.tolist() == [False] * 4 and not traj.log_probs.any() and traj.stochastic_steps() == []
    images = fresh_pipeline(tiny_pipe)(
        PROMPTS, num_images_per_prompt=K, num_inference_steps=4, guidance_scale=5.0, eta=0.0,
        generator=[gen(int(s)) for s in traj.seeds], output_type="pt",
    ).images  # fmt: skip
    assert_close(traj.images, images, rtol=0, atol=1e-5)
