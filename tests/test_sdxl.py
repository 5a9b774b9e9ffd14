"""SDXL (``tiny-sdxl``): loading and refusals, the conditioning the UNet sees, the sampler against
diffusers' own ``StableDiffusionXLPipeline``, re-scoring, exact gradients, training, export.

References are diffusers' SDXL pipeline (``encode_prompt``, ``__call__``), diffusers' and PEFT's
LoRA loaders, and full-graph autograd written out here.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file
from step_references import gen
from torch.testing import assert_close

from rebel_diffusion import models
from rebel_diffusion.algorithms.ddpo import ppo_clip_loss
from rebel_diffusion.algorithms.rebel import pair_indices, rebel_loss
from rebel_diffusion.algorithms.updates import StepModel, ddpo_accumulate, rebel_accumulate
from rebel_diffusion.cli import main
from rebel_diffusion.errors import UsageError
from rebel_diffusion.models import add_lora, build_tiny_sdxl_pipeline, check_sd_components, load_pipeline
from rebel_diffusion.models.components import decode_latents, is_sdxl
from rebel_diffusion.sampling import (
    SamplingSettings,
    Trajectories,
    make_scheduler,
    rescore_log_probs,
    sample_trajectories,
    step_log_prob,
)

PROMPTS = ["a red circle on a blue background", "a green square, on grass!"]
K = 2
SEED = 100
SETTINGS = SamplingSettings(sampler="ddim", num_steps=4, ddim_eta=1.0, guidance_scale=5.0)


def plain_pipeline(pipe):
    """diffusers' own SDXL pipeline on the same modules, with DDIM from the model's scheduler config."""
    plain = StableDiffusionXLPipeline(
        **{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}
    )
    plain.set_progress_bar_config(disable=True)
    return plain


@pytest.fixture(scope="module")
def sdxl_traj(tiny_sdxl_pipe):
    return sample_trajectories(tiny_sdxl_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=SETTINGS)


# ----------------------------------------------------------------------------------------------
# loading and refusals


def test_tiny_sdxl_has_sdxl_parts(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_sdxl(pipe) and is_sdxl(pipe.unet)
    assert pipe.config.force_zeros_for_empty_prompt
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # SDXL's second tokenizer pads with "!" (id 0), the first with the end token
    ids = pipe.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73
    assert pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids[4:] == [49407] * 73
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == models.SDXL_VAE_SCALING
    check_sd_components(pipe)
    assert not is_sdxl(load_pipeline("tiny"))


def test_refiner_and_other_unets_are_refused(tiny_sdxl_pipe):
    p = tiny_sdxl_pipe
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=p.vae, text_encoder=None, text_encoder_2=p.text_encoder_2, tokenizer=None, tokenizer_2=p.tokenizer_2,
        unet=p.unet, scheduler=p.scheduler, requires_aesthetics_score=True,
    )  # fmt: skip
    with pytest.raises(UsageError, match="SDXL refiner .* pass an SDXL base model"):
        check_sd_components(refiner, "some/refiner")
    inpaint = copy.copy(p)
    inpaint.unet = copy.copy(p.unet)
    inpaint.unet.register_to_config(in_channels=9)
    with pytest.raises(UsageError, match="9 input channels"):
        check_sd_components(inpaint)


def test_refiner_folder_is_refused_before_training(tiny_sdxl_pipe, tmp_path, capsys):
    p = tiny_sdxl_pipe
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=p.vae, text_encoder=None, text_encoder_2=p.text_encoder_2, tokenizer=None, tokenizer_2=p.tokenizer_2,
        unet=p.unet, scheduler=p.scheduler, requires_aesthetics_score=True,
    )  # fmt: skip
    refiner.save_pretrained(tmp_path / "refiner")
    code = main(
        ["train", "--model", str(tmp_path / "refiner"), "--reward", "jpeg-compressibility",
         "--output-dir", str(tmp_path / "run")]
    )  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if "refiner" in line or "safety_checker" in line]
    assert code == 2 and len(err) == 1 and "SDXL refiner" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.transformer.y"], "sdxl"),
        (["conditioner.embedders.0.model.transformer.resblocks.0.x"], "sdxl-refiner"),
        (["cond_stage_model.transformer.text_model.x", "model.diffusion_model.input_blocks.0.0.weight"], "sd"),
        (["unet.down_blocks.0.attn1.to_q.lora_A.weight", "unet.down_blocks.0.attn1.to_q.lora_B.weight"], "lora"),
        (["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight", "lora_unet_down_blocks_0_attn1_to_q.alpha"], "lora"),
    ],
)
def test_single_file_family_from_its_keys(tmp_path, keys, family):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert models.single_file_family(path) == family


def test_single_file_sdxl_loads_with_the_sdxl_pipeline(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.w": torch.zeros(1)}, str(path))
    calls = []
    monkeypatch.setattr(
        StableDiffusionXLPipeline, "from_single_file", classmethod(lambda cls, *a, **kw: calls.append(cls) or "xl")
    )
    assert load_pipeline_external(str(path)) == "xl" and calls == [StableDiffusionXLPipeline]
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.w": torch.zeros(1)}, str(refiner))
    with pytest.raises(UsageError, match="SDXL refiner"):
        load_pipeline_external(str(refiner))


def test_a_lora_file_as_the_model_says_what_to_pass(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1)}, str(path))
    with pytest.raises(UsageError, match="is a LoRA, not a base model; pass the base model with --model"):
        load_pipeline_external(str(path))


def load_pipeline_external(model):
    return models.loading._load_external(model, torch.float32)


def test_a_local_sdxl_folder_is_recognised_without_a_flag(tiny_sdxl_pipe, tmp_path):
    tiny_sdxl_pipe.save_pretrained(tmp_path / "sdxl")
    pipe = load_pipeline(str(tmp_path / "sdxl"))
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_sdxl(pipe)
    check_sd_components(pipe)
    a = sample_trajectories(pipe, PROMPTS[:1], seed=SEED, settings=SETTINGS, record=False)
    b = sample_trajectories(tiny_sdxl_pipe, PROMPTS[:1], seed=SEED, settings=SETTINGS, record=False)
    # The same weights in two copies: fp32 kernels may round the last bits differently (1.5e-6 on an
    # AVX2-only CPU); another model's images differ by orders of magnitude more.
    assert_close(a.images, b.images, rtol=0, atol=1e-5)


def test_vae_swap_from_a_folder_and_a_clear_error(tmp_path):
    other = build_tiny_sdxl_pipeline(seed=1).vae
    other.save_pretrained(tmp_path / "vae")
    pipe = load_pipeline("tiny-sdxl", vae=str(tmp_path / "vae"))
    for name, value in other.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    assert not torch.equal(
        pipe.vae.state_dict()["decoder.conv_out.weight"], load_pipeline("tiny-sdxl").vae.decoder.conv_out.weight
    )
    with pytest.raises(UsageError, match="--vae .*could not load a VAE"):
        load_pipeline("tiny-sdxl", vae=str(tmp_path / "missing"))


def test_fp16_vae_with_force_upcast_decodes_in_fp32(tiny_sdxl_pipe):
    from helpers import diffusers_log

    vae = copy.deepcopy(tiny_sdxl_pipe.vae).half()
    latents = torch.randn(2, 4, 8, 8, generator=gen(0))
    with diffusers_log() as log:
        upcast = decode_latents(vae, latents, upcast=True)
    assert vae.dtype == torch.float16  # restored
    assert log == []  # no warning from diffusers each epoch (its .to(dtype) logs one)
    reference = decode_latents(copy.deepcopy(vae).float(), latents)  # the same fp16 weights, in fp32
    assert_close(upcast, reference, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# conditioning and sampling


def test_conditioning_equals_diffusers_encode_prompt(tiny_sdxl_pipe, sdxl_traj):
    pipe, traj = tiny_sdxl_pipe, sdxl_traj
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        traj.prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=None
    )
    assert traj.prompt_embeds.shape == (len(traj), 77, 64) and traj.added["text_embeds"].shape == (len(traj), 32)
    assert_close(traj.prompt_embeds, embeds, rtol=0, atol=1e-6)
    assert_close(traj.added["text_embeds"], pooled, rtol=0, atol=1e-6)
    # no negative prompt and force_zeros_for_empty_prompt: the unconditional branch is zeros
    assert torch.equal(traj.negative_embeds, negative) and not negative.any()
    assert torch.equal(traj.negative_added["text_embeds"], negative_pooled) and not negative_pooled.any()
    expected_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(len(traj), 6)
    assert torch.equal(traj.added["time_ids"], expected_ids) and torch.equal(
        traj.negative_added["time_ids"], expected_ids
    )
    # a negative prompt is encoded as diffusers encodes it
    settings = dataclasses.replace(SETTINGS, negative_prompt="blurry")
    with_negative = sample_trajectories(pipe, PROMPTS[:1], seed=SEED, settings=settings)
    _, negative, _, negative_pooled = pipe.encode_prompt(
        PROMPTS[:1], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="blurry"
    )
    assert negative.abs().max() > 0
    assert_close(with_negative.negative_embeds, negative, rtol=0, atol=1e-6)
    assert_close(with_negative.negative_added["text_embeds"], negative_pooled, rtol=0, atol=1e-6)


def test_size_conditioning_reaches_the_unet(tiny_sdxl_pipe, sdxl_traj):
    """The six size numbers change the UNet's output: replaying them is not a no-op."""
    traj, unet = sdxl_traj, tiny_sdxl_pipe.unet
    x, t, emb = traj.latents[:1, 1], traj.timesteps[1:2], traj.prompt_embeds[:1]
    added = {"text_embeds": traj.added["text_embeds"][:1], "time_ids": traj.added["time_ids"][:1]}
    other = {**added, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a = unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        b = unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=other).sample
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("size", "guidance", "negative"),
    [(None, 5.0, None), (48, 3.0, "blurry"), (None, 1.0, None)],
    ids=["native-cfg", "48px-negative-prompt", "no-cfg"],
)
def test_images_equal_diffusers_sdxl_pipeline(tiny_sdxl_pipe, size, guidance, negative):
    settings = SamplingSettings(
        sampler="ddim", num_steps=4, ddim_eta=1.0, guidance_scale=guidance, height=size, width=size,
        negative_prompt=negative or "",
    )  # fmt: skip
    traj = sample_trajectories(tiny_sdxl_pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=settings)
    images = plain_pipeline(tiny_sdxl_pipe)(
        PROMPTS,
        negative_prompt=negative,
        num_images_per_prompt=K,
        num_inference_steps=4,
        guidance_scale=guidance,
        eta=1.0,
        height=size,
        width=size,
        generator=[gen(int(s)) for s in traj.seeds],
        output_type="pt",
    ).images
    side = size or 32
    assert images.shape == traj.images.shape == (len(PROMPTS) * K, 3, side, side)
    assert_close(traj.images, images, rtol=0, atol=1e-5)
    assert traj.added["time_ids"][0].tolist() == [side, side, 0, 0, side, side]
    assert (traj.negative_embeds is None) == (guidance <= 1.0)


@pytest.mark.parametrize("steps_per_pass", [1, 3])
def test_rescored_log_probs_equal_recorded(tiny_sdxl_pipe, sdxl_traj, steps_per_pass):
    scheduler = make_scheduler(tiny_sdxl_pipe, sdxl_traj.settings)
    new = rescore_log_probs(tiny_sdxl_pipe.unet, scheduler, sdxl_traj, steps_per_pass=steps_per_pass, batch_size=3)
    assert new.shape == (len(sdxl_traj), 4)
    assert (new - sdxl_traj.log_probs).abs().max() <= 1e-5
    # a sub-batch and a concatenation carry the SDXL conditioning with their rows
    part = Trajectories.cat([sdxl_traj.select([3, 1]), sdxl_traj.select([0])])
    assert torch.equal(part.added["time_ids"], sdxl_traj.added["time_ids"][[3, 1, 0]])
    assert torch.equal(part.added["text_embeds"], sdxl_traj.added["text_embeds"][[3, 1, 0]])
    again = rescore_log_probs(tiny_sdxl_pipe.unet, scheduler, part)
    assert (again - sdxl_traj.log_probs[[3, 1, 0]]).abs().max() <= 1e-5
    # and the pooled text matters to the score: zeroing it moves the log-probs
    blind = dataclasses.replace(part, added={**part.added, "text_embeds": torch.zeros_like(part.added["text_embeds"])})
    assert (rescore_log_probs(tiny_sdxl_pipe.unet, scheduler, blind) - again).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# exact gradients (as for SD 1.5 in test_updates.py), in fp64


@pytest.fixture(scope="module")
def sdxl_lora_setup():
    pipe = build_tiny_sdxl_pipeline()
    torch.manual_seed(0)
    add_lora(pipe.unet, rank=4, alpha=4)
    settings = SamplingSettings(num_steps=3, guidance_scale=3.0, ddim_eta=1.0)
    traj = sample_trajectories(pipe, ["a cat", "a dog"], images_per_prompt=3, settings=settings, seed=3)
    pipe.unet.double()
    double = {k: v.double() for k, v in traj.added.items()}
    traj = dataclasses.replace(
        traj,
        latents=traj.latents.double(),
        log_probs=traj.log_probs.double(),
        prompt_embeds=traj.prompt_embeds.double(),
        negative_embeds=traj.negative_embeds.double(),
        added=double,
        negative_added={k: v.double() for k, v in traj.negative_added.items()},
    )
    lora = [p for p in pipe.unet.parameters() if p.requires_grad]
    with torch.no_grad():  # off-policy, so the log-ratios are non-zero
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    return pipe, traj, make_scheduler(pipe, traj.settings), lora


def _grads(params):
    return torch.cat([p.grad.flatten() for p in params])


def _naive_log_ratios(pipe, scheduler, traj, steps):
    images = torch.arange(len(traj))
    new = torch.stack([step_log_prob(pipe.unet, scheduler, traj, j, index=images) for j in steps], dim=1)
    return new, new - traj.log_probs[:, steps]


def test_sdxl_rebel_gradient_equals_full_graph_autograd(sdxl_lora_setup):
    pipe, traj, scheduler, lora = sdxl_lora_setup
    pairs, steps, eta = pair_indices(traj.group), traj.stochastic_steps(), 0.5
    targets = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4, 0.8])
    pipe.unet.zero_grad()
    stats = rebel_accumulate(
        StepModel(pipe.unet, scheduler, traj, steps_per_pass=2),
        pairs,
        targets,
        eta=eta,
        train_batch_size=2,
        steps=steps,
    )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    _, ratio = _naive_log_ratios(pipe, scheduler, traj, steps)
    ratio = ratio.sum(dim=1)
    assert ratio.abs().max() > 1e-4
    loss = rebel_loss(ratio[pairs[:, 0]], ratio[pairs[:, 1]], targets, eta)
    loss.backward()
    naive = _grads(lora)
    assert ((ours - naive).norm() / naive.norm()).item() <= 1e-12
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-9)


def test_sdxl_ddpo_gradient_equals_full_graph_autograd(sdxl_lora_setup):
    pipe, traj, scheduler, lora = sdxl_lora_setup
    steps, images = traj.stochastic_steps(), torch.arange(len(traj))
    adv = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.0, 0.0])
    pipe.unet.zero_grad()
    ddpo_accumulate(
        StepModel(pipe.unet, scheduler, traj, steps_per_pass=2),
        images,
        adv,
        clip_range=0.2,
        adv_clip_max=5.0,
        train_batch_size=4,
        steps=steps,
    )
    ours = _grads(lora)
    pipe.unet.zero_grad()
    new, _ = _naive_log_ratios(pipe, scheduler, traj, steps)
    old = traj.log_probs[:, steps]
    loss, _ = ppo_clip_loss(new.flatten(), old.flatten(), adv[:, None].expand_as(new).flatten(), clip_range=0.2)
    (loss / new.numel()).backward()
    naive = _grads(lora)
    assert ((ours - naive).norm() / naive.norm()).item() <= 1e-12


# ----------------------------------------------------------------------------------------------
# training, resume and export

SMALL = [
    "--model", "tiny-sdxl", "--reward", "jpeg-compressibility", "--num-steps", "3", "--prompts-per-batch", "2",
    "--batches-per-epoch", "1", "--train-batch-size", "1", "--gradient-accumulation-steps", "2",
    "--grid-num-images", "2", "--guidance-scale", "2.0", "--learning-rate", "1e-3", "--heldout-every", "0",
]  # fmt: skip


@torch.no_grad()
def sdxl_unet_out(unet):
    g = gen(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return unet(x, torch.tensor([500, 20]), encoder_hidden_states=emb, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl") / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--output-dir", str(out)]) == 0
    return out


def test_sdxl_lora_loads_into_plain_diffusers_and_peft(sdxl_run):
    from peft import PeftModel

    from rebel_diffusion.outputs.run_folder import apply_checkpoint, latest_checkpoint

    trained = build_tiny_sdxl_pipeline()
    apply_checkpoint(trained, latest_checkpoint(sdxl_run))
    expected = sdxl_unet_out(trained.unet)
    base = build_tiny_sdxl_pipeline()
    before = sdxl_unet_out(base.unet)
    assert (expected - before).abs().max() > 1e-5  # training moved the LoRA
    plain = build_tiny_sdxl_pipeline()
    plain.load_lora_weights(str(sdxl_run / "lora"))  # StableDiffusionXLPipeline's own loader
    assert_close(sdxl_unet_out(plain.unet), expected, rtol=1e-5, atol=1e-5)
    kohya = build_tiny_sdxl_pipeline()
    kohya.load_lora_weights(str(sdxl_run / "lora"), weight_name=models.KOHYA_FILE)  # ComfyUI's file, back
    assert_close(sdxl_unet_out(kohya.unet), expected, rtol=1e-5, atol=1e-5)
    peft_unet = PeftModel.from_pretrained(build_tiny_sdxl_pipeline().unet, str(sdxl_run / "lora"))
    assert_close(sdxl_unet_out(peft_unet), expected, rtol=1e-5, atol=1e-5)
    records = [json.loads(line) for line in (sdxl_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rescore_drift"] <= 1e-4 for r in records[1:])  # the on-policy check ran, and held
    card = (sdxl_run / "lora" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-sdxl" and "stable-diffusion-xl" in front["tags"]
    assert "LoRA of the SDXL model `tiny-sdxl`" in card


def test_sdxl_run_samples_and_evaluates(sdxl_run, tmp_path):
    assert main(["sample", "--run", str(sdxl_run), "--prompts", "simple_animals", "--num-images", "1",
                 "--output-dir", str(tmp_path / "s"), "--quiet"]) == 0  # fmt: skip
    assert len(list((tmp_path / "s").glob("p*_seed*.png"))) == 45
    assert main(["eval", "--run", str(sdxl_run), "--prompts", "simple_animals", "--num-images", "2",
                 "--rewards", "jpeg-compressibility", "--diversity-model", "pixels",
                 "--output-dir", str(tmp_path / "e"), "--quiet"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert "jpeg-compressibility" in json.dumps(report)


def test_sdxl_run_in_the_preview(sdxl_run):
    pytest.importorskip("gradio", reason="the preview extra (gradio) is not installed")
    from rebel_diffusion.outputs.preview import build_app

    app = build_app(sdxl_run, default_prompt="a cat", default_seed=0)
    try:
        base, tuned = app.comparer.images("a cat", [0, 1])
    finally:
        app.close()
    assert base.shape == tuned.shape == (2, 3, 32, 32)
    assert (base - tuned).abs().max() > 0  # the LoRA is applied to the SDXL UNet
    settings = SamplingSettings(sampler="ddim", num_steps=3, ddim_eta=1.0, guidance_scale=2.0)
    expected = sample_trajectories(
        build_tiny_sdxl_pipeline(), ["a cat"], images_per_prompt=2, seeds=[0, 1], settings=settings, record=False
    )
    assert_close(base, expected.images, rtol=0, atol=1e-5)  # the base side is plain tiny-sdxl


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sdxl_resume_is_exact_and_the_base_stays_the_base(tmp_path, finetune):
    """REBEL anchored to the base with a KL term: a resumed run repeats an uninterrupted one, and
    the log-probs it regresses against are the pristine model's after the resume."""
    from rebel_diffusion.config import TrainConfig
    from rebel_diffusion.training.plans import run_trained_steps
    from rebel_diffusion.training.recipe import TIME_KEYS, sample_epoch, setup
    from rebel_diffusion.training.reference import base_log_probs

    extra = ["--finetune", finetune, "--anchor", "base", "--kl-coef", "0.1"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", *SMALL, *extra, "--epochs", "2", "--output-dir", str(full)]) == 0
    assert main(["train", *SMALL, *extra, "--epochs", "1", "--output-dir", str(split)]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(split)]) == 0

    def metrics(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]

    assert metrics(full) == metrics(split) and len(metrics(full)) == 3
    assert (split / ("lora" if finetune == "lora" else "unet")).is_dir()

    cfg = TrainConfig(**{**yaml.safe_load((split / "config.yaml").read_text()), "resume": True, "epochs": 3})
    cfg.validate()
    run = setup(cfg)  # the trained weights of epoch 2 are loaded
    traj = sample_epoch(run, 3)
    steps = run_trained_steps(run, traj)
    expected = rescore_log_probs(build_tiny_sdxl_pipeline().unet, run.scheduler, traj, steps)
    torch.testing.assert_close(base_log_probs(run, traj, steps)[:, steps], expected, rtol=0, atol=1e-5)
    trained = rescore_log_probs(run.accelerator.unwrap_model(run.unet), run.scheduler, traj, steps)
    assert (trained - expected).abs().max() > 1e-4


def test_sdxl_ddpo_trains_a_lora(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--algorithm", "ddpo", "--epochs", "1", "--output-dir", str(out)]) == 0
    trained = build_tiny_sdxl_pipeline()
    from rebel_diffusion.outputs.run_folder import apply_checkpoint, latest_checkpoint

    apply_checkpoint(trained, latest_checkpoint(out))
    base = build_tiny_sdxl_pipeline()
    assert (sdxl_unet_out(trained.unet) - sdxl_unet_out(base.unet)).abs().max() > 1e-5
    lora = {n for n, _ in trained.unet.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, base.unet.state_dict()[n]) for n, p in trained.unet.state_dict().items()
                        if "lora_" not in n and "base_layer" not in n)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# text conditioning computed once per prompt


@pytest.mark.parametrize("name", ["tiny_pipe", "tiny_sdxl_pipe"])
def test_text_cache_encodes_each_prompt_once_and_changes_nothing(request, name, monkeypatch):
    from rebel_diffusion.models.components import TextCache

    pipe = request.getfixturevalue(name)
    plain = sample_trajectories(pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=SETTINGS)
    from rebel_diffusion.models import components

    calls = []
    for fn in ("encode_prompts", "encode_prompts_sdxl"):
        original = getattr(components, fn)
        monkeypatch.setattr(
            components, fn, lambda pipe, prompts, f=original: calls.extend(prompts) or f(pipe, prompts)
        )
    cache = TextCache(max_prompts=3)
    for _ in range(2):  # a second epoch of the same prompts encodes nothing
        cached = sample_trajectories(
            pipe, PROMPTS, images_per_prompt=K, seed=SEED, settings=SETTINGS, text_cache=cache
        )
        assert_close(cached.images, plain.images, rtol=0, atol=1e-5)
        assert_close(cached.prompt_embeds, plain.prompt_embeds, rtol=0, atol=1e-5)
        assert_close(cached.negative_embeds, plain.negative_embeds, rtol=0, atol=1e-6)
        if plain.added is not None:
            assert_close(cached.added["text_embeds"], plain.added["text_embeds"], rtol=0, atol=1e-5)
    sd_negative = 0 if is_sdxl(pipe) else 1  # SDXL's unconditional branch is zeros: nothing to encode
    assert sorted(calls) == sorted(PROMPTS + [""] * sd_negative)  # one prompt a call, each once
    sample_trajectories(pipe, ["a third", "a fourth"], seed=SEED, settings=SETTINGS, text_cache=cache)
    assert len(cache.store) == 3 and {"a third", "a fourth"} <= set(cache.store)  # the oldest dropped
    assert not set(PROMPTS) <= set(cache.store)


def test_sdxl_preset_runs_with_gradient_checkpointing(tmp_path):
    """--preset sdxl's settings (DDIM eta 1, LoRA rank 32, gradient checkpointing, one step a UNet
    pass) on tiny-sdxl at its own size: the LoRA trains and the checkpointed gradient is used."""
    out = tmp_path / "run"
    flags = [
        "--preset", "sdxl", "--model", "tiny-sdxl", "--resolution", "32", "--num-steps", "3", "--epochs", "1",
        "--prompts-per-batch", "2", "--batches-per-epoch", "1", "--reward", "jpeg-compressibility",
        "--grid-num-images", "2", "--learning-rate", "1e-3", "--gradient-accumulation-steps", "2",
    ]  # fmt: skip
    assert main(["train", *flags, "--output-dir", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["gradient_checkpointing"] is True and saved["lora_rank"] == 32 and saved["resolution"] == 32
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["epoch"] == 1 and record["grad_norm"] > 0


@pytest.mark.slow
def test_sdxl_two_processes_one_set_of_outputs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
        "-m", "rebel_diffusion", "train", *SMALL, "--epochs", "2", "--output-dir", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[1]["images"] == 8
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    plain = build_tiny_sdxl_pipeline()
    plain.load_lora_weights(str(out / "lora"))
    assert (sdxl_unet_out(plain.unet) - sdxl_unet_out(build_tiny_sdxl_pipeline().unet)).abs().max() > 1e-6


def test_grid_and_heldout_at_another_sdxl_size(tmp_path):
    """A run at 64 px (twice the native size): the held-out evaluation runs at that size and the
    size conditioning follows --resolution; grid tiles of SDXL's 1024 px are downscaled to 256."""
    from rebel_diffusion.outputs.generation import grid_tiles

    out = tmp_path / "run"
    flags = ["--resolution", "64", "--heldout-every", "1", "--heldout-prompts", "simple_animals",
             "--heldout-images", "2", "--heldout-diversity", "pixels", "--epochs", "1"]  # fmt: skip
    assert main(["train", *SMALL[:-2], *flags, "--output-dir", str(out)]) == 0
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert "heldout/jpeg-compressibility" in record
    tiles = grid_tiles(torch.rand(2, 3, 1024, 1024))
    assert tiles.shape == (2, 3, 256, 256) and 0 <= tiles.min() and tiles.max() <= 1
