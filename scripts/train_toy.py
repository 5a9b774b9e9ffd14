#!/usr/bin/env python
"""Train the built-in ``toy`` text-to-image model and its attribute classifier, on a CPU.

Data: ``rebel_diffusion.toy.data`` (one coloured shape on a coloured background, 32x32, captioned
"a red circle on a blue background"). Stages, each checkpointed in the work folder and resumable:

1. ``vae``: a small ``AutoencoderKL`` (16, 32, 64), 4 latent channels, scale factor 4: 32x32
   images <-> 4x8x8 latents. MSE on [-1, 1] pixels + 1e-6 KL.
2. ``classifier``: ``ToyClassifier`` (shape, colour and background heads), on generator images of
   all 224 combinations, half of each batch passed through the VAE (samples are VAE decodes) and
   lightly noised/blurred. Used by the ``toy-alignment`` reward.
3. ``latents``: encodes a fixed pool of training images (train combinations only) with the VAE,
   sets the VAE's ``scaling_factor`` to 1 / latent std, and embeds every caption with a frozen,
   seeded random ``CLIPTextModel`` (hidden 32, 2 layers) and the real CLIP tokenizer.
4. ``unet``: a ``UNet2DConditionModel`` (32, 64, 80) on 8x8 latents, cross-attention at 4x4 and
   2x2, epsilon prediction on SD 1.x's noise schedule, 10 % empty captions (classifier-free
   guidance), min-SNR-5 loss weights, small offset noise, EMA of the weights.
5. ``export``: a diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors, SD 1.x DDIM
   scheduler config) to ``rebel_diffusion/toy/model/`` and the classifier to its ``classifier/``.
6. ``eval``: loads the exported ``toy`` model like a user does, samples held-out captions (none
   seen in training) and writes ``benchmarks/results/toy_model.json`` (classifier accuracy, how
   often base samples match their prompt, wall times, sizes) and ``toy_samples.png``.

Everything is seeded; batches, noise and timesteps come from per-step generators, so a run
continued with ``--resume`` (after an interruption, or to redo later stages) gives the same
weights as an uninterrupted one. Progress is printed every ``--log-every`` steps; run it in the
background as::

    OMP_NUM_THREADS=1 nohup python scripts/train_toy.py > .toy_work/train.log 2>&1 &
    python scripts/train_toy.py --resume        # continue after an interruption

Measured wall time of the shipped model (seed 0, defaults, ``--threads 1`` on a 2-core AMD EPYC VM
shared with other jobs, load average 2-6; figures in benchmarks/results/toy_model.json):

    vae         1200 steps x 32 images    7.9 min  (0.39 s/step)
    classifier   600 steps x 128 images   4.1 min
    latents    32768 images encoded       1.1 min
    unet        6500 steps x 64 latents  40.8 min  (0.38 s/step; 0.27-0.34 s/step on a free core)
    export                                0.0 min
    training total                       53.9 min  (about 40-48 min of CPU time on a free core)
    eval                                  2.9 min  (2,560 samples + grid)

Result: 10.9 MB (fp16 safetensors). Held-out captions, DDIM 20 steps, guidance 4: the toy
classifier finds the prompted colour and shape in 94 % of samples (71 % without guidance).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rebel_diffusion.models import SD_SCHEDULER_CONFIG, TOY_MODEL_DIR, build_clip_tokenizer  # noqa: E402
from rebel_diffusion.rewards.toy_alignment import ToyClassifier, save_classifier  # noqa: E402
from rebel_diffusion.toy import data  # noqa: E402

STAGES = ("vae", "classifier", "latents", "unet", "export", "eval")
OFFSET_NOISE = 0.05  # lets the model move a latent's per-channel mean (background colour) freely
MIN_SNR_GAMMA = 5.0


# ----------------------------------------------------------------------------------------------
# Models


def build_vae():
    """AutoencoderKL, 32x32x3 <-> 4x8x8 (three blocks: scale factor 4). About 0.68 M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=data.IMAGE_SIZE,
    )


def build_text_encoder():
    """Small CLIPTextModel with the SD vocabulary (hidden 32, 2 layers); kept frozen at its random init."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_unet():
    """UNet2DConditionModel on 4x8x8 latents, (32, 64, 80) channels. About 2.1 M parameters.

    No attention at 8x8 (the costliest place for it on a CPU); cross-attention to the caption at
    4x4 and 2x2, whose receptive field already covers the whole image.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=data.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 80),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Helpers


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """A generator for one step of one stage: resuming at ``step`` draws exactly what a full run draws."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def step_seed(seed: int, stage: str, step: int) -> int:
    return int(torch.randint(2**62, (1,), generator=step_generator(seed, stage + "/data", step)))


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class State:
    """``state.json`` in the work folder: finished stages and their wall times."""

    def __init__(self, work: Path):
        self.path = work / "state.json"
        self.d = json.loads(self.path.read_text()) if self.path.exists() else {"done": [], "wall_s": {}}

    def done(self, stage: str) -> bool:
        return stage in self.d["done"]

    def finish(self, stage: str, wall_s: float, cpu_s: float, **extra) -> None:
        if stage not in self.d["done"]:
            self.d["done"].append(stage)
        self.d["wall_s"][stage] = round(wall_s, 1)
        self.d.setdefault("cpu_s", {})[stage] = round(cpu_s, 1)  # wall_s minus time lost to other processes
        self.d.update(extra)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(self.d, indent=2))
        os.replace(tmp, self.path)


class Progress:
    """Periodic log lines: step, smoothed loss, seconds a step, ETA."""

    def __init__(self, stage: str, total: int, start: int, every: int):
        self.stage, self.total, self.every = stage, total, every
        self.t0, self.s0, self.loss = time.time(), start, None

    def update(self, step: int, loss: float, **extra) -> None:
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            rate = (time.time() - self.t0) / max(1, step + 1 - self.s0)
            more = " ".join(f"{k} {v:.3g}" for k, v in extra.items())
            print(
                f"[{self.stage}] step {step + 1}/{self.total} loss {self.loss:.4f} {more} "
                f"{rate:.2f}s/step eta {rate * (self.total - step - 1) / 60:.1f} min",
                flush=True,
            )


def run_steps(stage, args, work, model, params, total, lr, loss_fn, ema=None):
    """Generic resumable training loop: AdamW, warmup + cosine, grad clipping, checkpoints.

    Returns (wall seconds, CPU seconds) of the whole stage, summed over resumed runs.
    """
    ckpt = work / f"{stage}.ckpt"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, elapsed, cpu = 0, 0.0, 0.0
    if ckpt.exists():
        c = torch.load(ckpt, weights_only=False)
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        if ema is not None:
            ema.load_state_dict(c["ema"])
        start, elapsed, cpu = c["step"], c["elapsed"], c.get("cpu", float("nan"))
        print(f"[{stage}] resuming at step {start}/{total} ({elapsed / 60:.1f} min done)", flush=True)
    t0, c0 = time.time(), time.process_time()
    progress = Progress(stage, total, start, args.log_every)
    model.train()
    for step in range(start, total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr)
        loss, logs = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(gnorm):  # skip a rare bad step instead of poisoning the weights
            opt.step()
        if ema is not None:
            ema.update(model, step)
        progress.update(step, float(loss), **logs)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total:
            atomic_save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "step": step + 1,
                    "elapsed": elapsed + time.time() - t0,
                    "cpu": cpu + time.process_time() - c0,
                },
                ckpt,
            )
    model.eval()
    return elapsed + time.time() - t0, cpu + time.process_time() - c0


class EMA:
    """Exponential moving average of a model's weights (decay ramps up over the first steps)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, sd):
        self.shadow = {k: v.clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# Stages


def train_vae(args, work: Path, state: State):
    torch.manual_seed(args.seed)
    vae = build_vae()
    combos = data.train_combos()

    def loss_fn(step):
        x = data.make_batch(args.vae_batch, step_seed(args.seed, "vae", step), combos)[0] * 2 - 1  # (B, 3, 32, 32)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=step_generator(args.seed, "vae", step))
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        return mse + 1e-6 * post.kl().mean(), {"mse": float(mse)}

    wall, cpu = run_steps("vae", args, work, vae, list(vae.parameters()), args.vae_steps, args.vae_lr, loss_fn)
    vae.save_pretrained(work / "vae")
    with torch.no_grad():  # reconstruction error on fresh images of all combinations
        x = data.make_batch(256, args.seed + 10_001)[0] * 2 - 1
        mse = float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))
    print(f"[vae] done in {wall / 60:.1f} min, held-out reconstruction MSE {mse:.4f} on [-1, 1]", flush=True)
    state.finish("vae", wall, cpu, vae_mse=round(mse, 5), vae_params=n_params(vae))


def load_vae(work: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light noise, blur and per-channel brightness jitter on (B, 3, H, W) [0, 1] images."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(b, 1, 1, 1, generator=g) < 0.3).float() * torch.rand(b, 1, 1, 1, generator=g)
    x = x + mix * (blur - x)
    x = x + 0.04 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    x = x + 0.06 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def train_classifier(args, work: Path, state: State):
    torch.manual_seed(args.seed + 1)
    clf = ToyClassifier()
    vae = load_vae(work)

    def loss_fn(step):
        g = step_generator(args.seed, "classifier", step)
        x, labels, _ = data.make_batch(args.clf_batch, step_seed(args.seed, "classifier", step))  # all combos
        half = args.clf_batch // 2
        with torch.no_grad():  # half the batch as the VAE renders it: the look of decoded samples
            post = vae.encode(x[:half] * 2 - 1).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            x = torch.cat([(vae.decode(z).sample / 2 + 0.5).clamp(0, 1), x[half:]])
        logits = clf(augment(x, g))
        losses = {k: F.cross_entropy(logits[k], labels[k]) for k in ("shape", "colour", "background")}
        acc = sum(float((logits[k].argmax(-1) == labels[k]).float().mean()) for k in losses) / 3
        return sum(losses.values()), {"acc": acc}

    wall, cpu = run_steps("classifier", args, work, clf, list(clf.parameters()), args.clf_steps, args.clf_lr, loss_fn)
    save_classifier(clf, work / "classifier")
    acc = classifier_accuracy(clf, vae, args.seed)
    print(f"[classifier] done in {wall / 60:.1f} min, accuracy on fresh images {acc}", flush=True)
    state.finish("classifier", wall, cpu, classifier_accuracy=acc, classifier_params=n_params(clf))


@torch.no_grad()
def classifier_accuracy(clf, vae, seed: int, n: int = 2048) -> dict:
    """Accuracy per head on fresh generator images, as drawn and after a VAE round trip."""
    x, labels, _ = data.make_batch(n, seed + 20_002)
    rec = torch.cat(
        [(vae.decode(vae.encode(c * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1) for c in x.split(256)]
    )
    out = {}
    for name, imgs in (("real", x), ("vae_roundtrip", rec)):
        logits = clf(imgs)
        out[name] = {
            k: round(float((logits[k].argmax(-1) == labels[k]).float().mean()), 4)
            for k in ("shape", "colour", "background")
        }
    return out


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def make_latents(args, work: Path, state: State):
    t0, c0 = time.time(), time.process_time()
    vae = load_vae(work)
    combos = data.train_combos()
    images, attrs, _ = data.make_batch(args.pool, args.seed + 30_003, combos)
    means, stds = [], []
    with torch.no_grad():
        for chunk in images.split(512):
            post = vae.encode(chunk * 2 - 1).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)  # (N, 4, 8, 8)
    scaling = float(1.0 / mean.std())  # as SD's 0.18215: unit-variance latents for the UNet
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(work / "vae")

    torch.manual_seed(args.seed + 2)
    text_encoder = build_text_encoder()
    tokenizer = build_clip_tokenizer()
    captions = [data.caption(*t) for t in combos] + [""]  # the last one: the unconditional caption
    with torch.no_grad():
        emb = text_encoder(tokenize(tokenizer, captions))[0]  # (len(combos) + 1, 77, 32)
    text_encoder.save_pretrained(work / "text_encoder")
    torch.save(
        {"mean": mean, "std": std, "combo": attrs["combo"], "emb": emb, "captions": captions},
        work / "latents.pt",
    )
    wall = time.time() - t0
    print(f"[latents] {len(mean)} latents, scaling factor {scaling:.4f}, {wall:.0f} s", flush=True)
    state.finish("latents", wall, time.process_time() - c0, scaling_factor=scaling)


def train_unet(args, work: Path, state: State):
    from diffusers import DDPMScheduler

    lat = torch.load(work / "latents.pt")
    scaling = state.d["scaling_factor"]
    mean, std, combo, emb = lat["mean"], lat["std"], lat["combo"], lat["emb"]
    uncond = len(emb) - 1
    sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # min-SNR-gamma, epsilon prediction

    torch.manual_seed(args.seed + 3)
    unet = build_unet()
    ema = EMA(unet, args.ema_decay)
    n = len(mean)

    def loss_fn(step):
        g = step_generator(args.seed, "unet", step)
        idx = torch.randint(n, (args.unet_batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling  # (B, 4, 8, 8)
        cond = combo[idx].clone()
        cond[torch.rand(len(idx), generator=g) < args.cfg_dropout] = uncond  # empty caption
        noise = torch.randn(z0.shape, generator=g) + OFFSET_NOISE * torch.randn(len(idx), 4, 1, 1, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, emb[cond]).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        return (weight[t] * per).mean(), {}

    wall, cpu = run_steps(
        "unet", args, work, unet, list(unet.parameters()), args.unet_steps, args.unet_lr, loss_fn, ema=ema
    )
    unet.load_state_dict(ema.state_dict())  # ship the EMA weights
    unet.save_pretrained(work / "unet")
    print(f"[unet] done in {wall / 60:.1f} min", flush=True)
    state.finish("unet", wall, cpu, unet_params=n_params(unet))


def export(args, work: Path, state: State):
    """Write the pipeline folder (fp16 safetensors) and the classifier, replacing ``args.out`` whole."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    t0, c0 = time.time(), time.process_time()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=build_clip_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    compact_tokenizer(tmp / "tokenizer")
    shutil.copytree(work / "classifier", tmp / "classifier")
    if out.exists():  # swap in whole: a reader never sees a half-written model
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    print(f"[export] {out}: {sum(sizes.values()) / 1e6:.2f} MB", flush=True)
    state.finish("export", time.time() - t0, time.process_time() - c0, file_sizes=sizes)


def compact_tokenizer(folder: Path) -> None:
    """Keep the tokenizer as vocab.json + merges.txt (1.5 MB) instead of tokenizer.json (3.6 MB).

    CLIPTokenizer.from_pretrained rebuilds the same tokenizer from them (checked: same ids).
    """
    src = Path(build_clip_tokenizer().vocab_file).parent  # the files build_clip_tokenizer() wrote
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, folder / name)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    from transformers import CLIPTokenizer

    probe = ["a red circle on a blue background", "an orange cross on a white background", ""]
    a, b = build_clip_tokenizer(), CLIPTokenizer.from_pretrained(str(folder))
    if any(tokenize(a, [p]).tolist() != tokenize(b, [p]).tolist() for p in probe):
        raise RuntimeError(f"{folder}: the compact tokenizer gives other ids than build_clip_tokenizer()")


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, eta: float = 0.0) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1], one seeded generator per image."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=gens, output_type="pt"
    ).images


def match_rates(reward, images, prompts) -> dict:
    """How often the classifier's prediction matches the prompt, and the mean reward."""
    from rebel_diffusion.rewards.jpeg import jpeg_size, to_uint8

    d = reward.details(images, prompts)
    hit = {k: d[f"match_{k}"] == 1 for k in ("shape", "colour", "background")}
    jpeg_kb = torch.tensor([jpeg_size(a) / 1000 for a in to_uint8(images)])
    return {
        "n": len(prompts),
        "colour": round(float(hit["colour"].float().mean()), 4),
        "shape": round(float(hit["shape"].float().mean()), 4),
        "colour_and_shape": round(float((hit["colour"] & hit["shape"]).float().mean()), 4),
        "background": round(float(hit["background"].float().mean()), 4),
        "all_three": round(float((hit["colour"] & hit["shape"] & hit["background"]).float().mean()), 4),
        "mean_reward": round(float(d["reward"].mean()), 4),
        "reward_std": round(float(d["reward"].std()), 4),
        "jpeg_kb_mean": round(float(jpeg_kb.mean()), 4),
        "jpeg_kb_std": round(float(jpeg_kb.std()), 4),
    }


def evaluate(args, work: Path, state: State):
    import rebel_diffusion.models as models
    from rebel_diffusion.rewards.toy_alignment import ToyAlignmentReward

    t0, c0 = time.time(), time.process_time()
    models.loading.TOY_MODEL_DIR = Path(args.out)  # evaluate exactly what was exported
    pipe = models.load_pipeline("toy")
    reward = ToyAlignmentReward(classifier_path=Path(args.out) / "classifier")
    held = data.prompt_lines("heldout")
    train = data.prompt_lines("train")
    results = {}

    # The headline figure: 64 held-out samples (each held-out caption twice), 20 steps, guidance 4.
    prompts = [p for p in held for _ in range(2)]
    seeds = [1000 + i for i in range(len(prompts))]
    images = sample(pipe, prompts, seeds, 20, 4.0)
    results["heldout_20steps_cfg4_n64"] = match_rates(reward, images, prompts)
    save_grid(images, prompts, Path(args.results) / "toy_samples.png")

    # Steadier numbers and their dependence on guidance and steps: 256 samples a setting.
    sweep = {}
    prompts = [p for p in held for _ in range(8)]
    seeds = [2000 + i for i in range(len(prompts))]
    for steps, guidance, eta in (
        (20, 1.0, 0.0),
        (20, 3.0, 0.0),
        (20, 4.0, 0.0),
        (20, 5.0, 0.0),
        (20, 7.5, 0.0),
        (10, 3.0, 0.0),
        (10, 4.0, 0.0),
        (10, 3.0, 1.0),
        (20, 4.0, 1.0),
    ):
        key = f"{steps}steps_cfg{guidance:g}_eta{eta:g}"
        sweep[key] = match_rates(reward, sample(pipe, prompts, seeds, steps, guidance, eta), prompts)
        print(f"[eval] held-out, {key}: {sweep[key]}", flush=True)
    results["heldout_n256"] = sweep
    results["train_captions_20steps_cfg4_n192"] = match_rates(  # each training caption once
        reward, sample(pipe, train, [3000 + i for i in range(len(train))], 20, 4.0), train
    )

    # Cost of a sample, the quantity RL training multiplies.
    t = time.time()
    sample(pipe, held[:8], list(range(8)), 20, 4.0)
    sample_s = (time.time() - t) / 8

    wall = time.time() - t0
    out = Path(args.out)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    report = {
        "model": "toy",
        "image_size": data.IMAGE_SIZE,
        "latent_shape": [4, data.IMAGE_SIZE // 4, data.IMAGE_SIZE // 4],
        "seed": args.seed,
        "threads": args.threads,
        "classifier_accuracy_on_generator_images": state.d.get("classifier_accuracy"),
        "base_sample_prompt_match": results,
        "base_sample_prompt_match_note": (
            "held-out captions (combinations never seen by the UNet), DDIM, classifier-free guidance; "
            "a sample matches when the toy classifier's argmax equals the prompted attribute; "
            "mean_reward is toy-alignment's P(colour) * P(shape)"
        ),
        "seconds_per_sample_20steps_cfg4_batch8": round(sample_s, 3),
        "vae_reconstruction_mse": state.d.get("vae_mse"),
        "vae_scaling_factor": state.d.get("scaling_factor"),
        "parameters": {
            "vae": n_params(pipe.vae),
            "unet": n_params(pipe.unet),
            "text_encoder": n_params(pipe.text_encoder),
            "classifier": state.d.get("classifier_params"),
        },
        "training_steps": {
            "vae": [args.vae_steps, args.vae_batch],
            "classifier": [args.clf_steps, args.clf_batch],
            "unet": [args.unet_steps, args.unet_batch],
            "latent_pool": args.pool,
        },
        "wall_s": {**state.d["wall_s"], "eval": round(wall, 1)},
        "wall_s_training_total": round(sum(v for k, v in state.d["wall_s"].items() if k != "eval"), 1),
        "cpu_s": {**state.d.get("cpu_s", {}), "eval": round(time.process_time() - c0, 1)},
        "timing_note": (
            "one thread on a 2-core VM shared with other jobs: wall_s includes waiting for the "
            "CPU, cpu_s is this process's CPU time (NaN/absent for stages run by an earlier "
            "version of the script)"
        ),
        "file_sizes_bytes": sizes,
        "total_size_mb": round(sum(sizes.values()) / 1e6, 2),
    }
    path = Path(args.results) / "toy_model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[eval] {json.dumps(results['heldout_20steps_cfg4_n64'])}", flush=True)
    print(f"[eval] wrote {path} and toy_samples.png in {wall:.0f} s", flush=True)
    state.finish("eval", wall, time.process_time() - c0)


def save_grid(
    images: torch.Tensor, prompts: list[str], path: Path, per_caption: int = 2, cols: int = 8, scale: int = 3
) -> None:
    """Captioned grid: ``per_caption`` consecutive samples side by side under each caption."""
    from PIL import Image, ImageDraw

    pils = data.to_pil(images)
    side = data.IMAGE_SIZE * scale
    cell_w, cell_h, pad = per_caption * side + (per_caption - 1) * 2, side + 30, 8
    n_cells = len(pils) // per_caption
    rows = math.ceil(n_cells / cols)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad + 20), "white")
    draw = ImageDraw.Draw(grid)
    draw.text(
        (pad, 4),
        "toy model, held-out captions (never seen in training): DDIM 20 steps, guidance 4",
        fill="black",
    )
    for c in range(n_cells):
        x0, y0 = pad + (c % cols) * (cell_w + pad), 20 + pad + (c // cols) * (cell_h + pad)
        for j in range(per_caption):
            grid.paste(pils[c * per_caption + j].resize((side, side), Image.NEAREST), (x0 + j * (side + 2), y0))
        words = prompts[c * per_caption].split(" on ")
        draw.text((x0, y0 + side + 2), words[0], fill="black")
        draw.text((x0, y0 + side + 14), "on " + words[1] if len(words) > 1 else "", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default=str(ROOT / ".toy_work"), help="checkpoints and intermediate files")
    p.add_argument("--out", default=str(TOY_MODEL_DIR), help="the pipeline folder to write")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --work")
    p.add_argument("--redo", default="", help="comma-separated stages to rerun (with --resume), e.g. export,eval")
    p.add_argument("--stop-after", choices=STAGES, default="eval")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a few steps a stage, into --work/smoke_*")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--clf-steps", type=int, default=600)
    p.add_argument("--clf-batch", type=int, default=128)
    p.add_argument("--clf-lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=32768, help="training images encoded for the UNet")
    p.add_argument("--unet-steps", type=int, default=6500)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.clf_steps, args.unet_steps, args.pool = 4, 4, 4, 256
        args.log_every, args.ckpt_every = 2, 2
        args.work = str(Path(args.work) / "smoke")
        args.out = str(Path(args.work) / "model")
        args.results = str(Path(args.work) / "results")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.smoke and work.exists():
        shutil.rmtree(work)
    if work.exists() and any(work.glob("*.ckpt")) and not args.resume:
        print(f"error: {work} holds a run; pass --resume to continue it, or delete the folder", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    state = State(work)
    for stage in filter(None, args.redo.split(",")):
        if stage not in STAGES:
            print(f"error: --redo {stage}: not one of {', '.join(STAGES)}", file=sys.stderr)
            return 2
        if stage in state.d["done"]:
            state.d["done"].remove(stage)
    runners = {
        "vae": train_vae,
        "classifier": train_classifier,
        "latents": make_latents,
        "unet": train_unet,
        "export": export,
        "eval": evaluate,
    }
    for stage in STAGES:
        if state.done(stage):
            print(f"[{stage}] done already ({state.d['wall_s'].get(stage, 0) / 60:.1f} min)", flush=True)
        else:
            print(f"[{stage}] starting", flush=True)
            runners[stage](args, work, state)
        if stage == args.stop_after:
            break
    total = sum(v for k, v in state.d["wall_s"].items() if k != "eval")
    print(f"training wall time {total / 60:.1f} min ({args.threads} thread(s))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
