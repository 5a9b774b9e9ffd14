"""The training configuration: one dataclass whose fields carry their help text and become CLI flags.

Precedence, lowest first: field defaults < ``--preset`` < ``--config FILE.yaml`` < command-line flags
(``resolve_config``; the ``train`` command turns every field into a flag).
On ``--resume`` the run's own ``config.yaml`` takes the place of the defaults, and only the fields in
``SAFE_ON_RESUME`` may differ from it. Every field is used by the recipe (``training``); the
resolved configuration (less the actions --resume and --overwrite) is written to
``OUTPUT_DIR/config.yaml`` when the run starts. Every number is checked (finite, in ``RANGES``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .algorithms.ddpo import CLIP_NATS
from .errors import UsageError
from .models import DEFAULT_LORA_TARGETS, DEFAULT_MODEL


def _f(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # --- model and sampler -----------------------------------------------------------------------
    model: str = _f(
        DEFAULT_MODEL,
        "hub id, local diffusers folder or .safetensors file (SD 1.x/2.x, LCM or SDXL base), or built-in: "
        "tiny, tiny-lcm, tiny-v, toy, sd15-random, tiny-sdxl, sdxl-random",
    )
    vae: str | None = _f(
        None,
        "a VAE in place of the model's: hub id, diffusers folder or .safetensors file "
        "(SDXL in fp16: madebyollin/sdxl-vae-fp16-fix; without it SDXL's VAE decodes in fp32)",
    )
    sampler: str = _f("auto", "denoising sampler; auto = LCM for LCM models, else DDIM", ("auto", "ddim", "lcm"))
    num_steps: int = _f(50, "denoising steps per image (the trajectory length T)")
    ddim_eta: float = _f(1.0, "DDIM noise scale (> 0; 1.0 as DDPO); unused by LCM")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale (LCM models: their guidance embedding)")
    sample_guidance_scale: float | None = _f(
        None,
        "REBEL with --anchor base: draw the training images at this guidance instead of --guidance-scale "
        "(the policy trained, graded and exported), so that the pairs show what the policy itself rarely "
        "draws; they are re-scored under the policy at --guidance-scale before the update (its proximal "
        "clip is around the policy), and the regression's optimum, pi_base exp(eta A), does not depend on "
        "who drew the pairs. The batch reward is then the guided sampler's; the grid's and held-out are the "
        "policy's. Default: --guidance-scale (on-policy)",
    )
    resolution: int | None = _f(None, "image height and width in pixels (default: the model's native size)")
    negative_prompt: str = _f("", "the unconditional prompt of classifier-free guidance")
    # --- prompts and reward ----------------------------------------------------------------------
    prompts: str = _f("simple_animals", "training prompts: a set in prompts/ (simple_animals, ...) or a file path")
    reward: str = _f(
        "aesthetic",
        "reward: aesthetic, clip, pickscore, hpsv2, imagereward, jpeg-compressibility, jpeg-incompressibility, "
        "toy-alignment, toy-alignment-full, module.path:attribute (a plug-in), or an http(s):// URL (a reward server)",
    )
    reward_combine: str = _f(
        "sum",
        "several rewards (--reward a=1,b=0.5): sum = the weighted sum of raw rewards, normalised as one; "
        "normalized = each reward normalised on its own, then the weighted sum of those advantages",
        ("sum", "normalized"),
    )
    aesthetic_head: str | None = _f(None, "local file of the LAION aesthetic head (default: from the model hub)")
    clip_model: str | None = _f(None, "open_clip architecture of the aesthetic/clip rewards (default ViT-L-14)")
    clip_pretrained: str | None = _f(None, "open_clip pretrained tag or local weights file (default openai)")
    pickscore_model: str | None = _f(
        None, "local folder of PickScore (hf download yuvalkirstain/PickScore_v1; default: from the model hub)"
    )
    hpsv2_checkpoint: str | None = _f(
        None, "local HPS_v2.1_compressed.pt or its folder (hf download xswu/HPSv2; default: from the model hub)"
    )
    imagereward_checkpoint: str | None = _f(
        None, "local ImageReward.pt or its folder (hf download THUDM/ImageReward; default: from the model hub)"
    )
    preference: str | None = _f(
        None,
        "preference model on top of the reward (bradley-terry or module:attr); "
        "REBEL then regresses on P(y > y') - 1/2",
    )
    preference_temperature: float = _f(1.0, "temperature of the bradley-terry preference")
    # --- algorithm -------------------------------------------------------------------------------
    algorithm: str = _f("rebel", "update rule: rebel, or the ddpo (PPO-clip) baseline", ("rebel", "ddpo"))
    eta: float = _f(
        2.0,
        "REBEL's eta, against the trajectory log-likelihood (summed over latent dims and trained "
        "steps): the regression moves a pair's log-likelihood ratio by eta nats per unit of "
        "advantage gap, at any resolution",
    )
    anchor: str = _f(
        "auto",
        "what REBEL's log-ratios are taken against: policy = the policy that sampled the epoch (the "
        "paper; each epoch a fresh trust region, nothing bounds the drift over many epochs); base = the "
        "frozen base model (PRDP's form: the fixed point is pi_base exp(eta A), so eta bounds the "
        "log-likelihood ratio to the base), each step's ratio to the sampling policy clipped at --clip-range; "
        "auto = base for REBEL (over 60 epochs it keeps prompt following within 0.05 where the policy "
        "anchor with a KL term does not: docs/tuning.md), policy for DDPO (PPO's own ratio)",
        ("auto", "policy", "base"),
    )
    normalization: str = _f(
        "per-group",
        "reward normalisation into advantages: per-group (the k images of a "
        "prompt in this batch), per-prompt (running statistics), batch, none",
        ("per-group", "per-prompt", "batch", "none"),
    )
    adv_std_floor: float = _f(
        1.0,
        "the std that normalises rewards is at least this fraction of the batch's std: at 1, "
        "per-group advantages are centred on the group and scaled by the batch (a group whose "
        "images differ by noise gets advantages that size, not +-1); 0: the group's own std",
    )
    tracker_buffer_size: int = _f(32, "per-prompt normalisation: rewards kept per prompt")
    tracker_min_count: int = _f(
        16, "per-prompt normalisation: rewards a prompt needs before its own statistics are used"
    )
    clip_range: float | None = _f(
        None,
        "DDPO's PPO clip range, and REBEL's proximal clip with --anchor base: a bound on each step's "
        "log-ratio to the sampling policy, in per-dim mean log-probs (DDPO's convention); default "
        f"{CLIP_NATS:g} / D for D = C*h*w latent dims: DDPO's 1e-4 at SD 1.5, 512 px, and the same "
        "trust region in nats per step at every resolution",
    )
    adv_clip_max: float = _f(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max] (REBEL and DDPO)")
    min_step_std: float = _f(
        0.1,
        "train only denoising steps whose noise std is at least this (0: all): the "
        "lowest-noise steps barely change the image but dominate the log-ratio",
    )
    kl_coef: float = _f(
        0.1,
        "KL regularisation toward the base model: the price, in advantage units, of one nat of "
        "per-image KL over the trained steps (closed form; LoRA's base: adapters disabled); "
        "REBEL and DDPO weigh it alike",
    )
    timestep_fraction: float = _f(1.0, "fraction of the trained steps used per optimizer step (rescaled: unbiased)")
    policy_step_weights: str = _f(
        "uniform",
        "weight of each denoising step in the policy term (REBEL: in the trajectory log-ratio; DDPO: its "
        "PPO term): uniform, linear:FIRST,LAST (from the first sampling step to the last), or "
        "--num-steps comma-separated numbers",
    )
    kl_step_weights: str = _f("uniform", "weight of each denoising step in the KL term: as --policy-step-weights")
    kl_prompts: str | None = _f(
        None,
        "prompt list whose images alone get the KL term (default: every image): a prior-preservation "
        "set of training prompts the model should keep drawing as the base does, while the others "
        "move with the policy term alone",
    )
    # --- batches ---------------------------------------------------------------------------------
    epochs: int = _f(100, "training epochs (each: sample, score, update)")
    images_per_prompt: int = _f(2, "images per prompt k (REBEL uses all k(k-1)/2 pairs; the paper: 2)")
    prompt_sampling: str = _f(
        "replacement",
        "how each sampling batch's prompts are drawn from the list: replacement = independently, with "
        "replacement (as DDPO; over a short run some prompts come up far less often than others); "
        "shuffle = in shuffled passes over the list, so every prompt comes up equally often (within one)",
        ("replacement", "shuffle"),
    )
    prompts_per_batch: int = _f(8, "prompts per sampling batch, per process")
    batches_per_epoch: int = _f(4, "sampling batches per epoch, per process")
    train_batch_size: int = _f(4, "micro-batch: images per forward/backward (REBEL and DDPO)")
    gradient_accumulation_steps: int = _f(
        4,
        "micro-batches per optimizer step; REBEL's steps take whole prompts (all pairs of their k "
        "images), so train-batch-size x this must be a multiple of --images-per-prompt",
    )
    steps_per_pass: int | None = _f(
        None,
        "denoising steps of a micro-batch trained in one UNet forward/backward: "
        "activation memory grows with it, never with --num-steps; default 1 on a GPU, "
        "10 on a CPU (where per-call overhead dominates)",
    )
    inner_epochs: int = _f(1, "passes over each epoch's samples")
    # --- optimizer -------------------------------------------------------------------------------
    learning_rate: float = _f(1e-4, "AdamW learning rate (the paper: 1e-4)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    ema_decay: float = _f(
        0.0,
        "EMA of the trainable weights, w_ema <- d w_ema + (1 - d) w after every optimizer "
        "step (0: off); when on, the exported LoRA and sample/eval/preview use the EMA weights",
    )
    lr_scheduler: str = _f(
        "constant", "learning-rate schedule", ("constant", "constant_with_warmup", "linear", "cosine")
    )
    lr_warmup_steps: int = _f(0, "warm-up optimizer steps of the schedule")
    # --- what is trained, and how fast -----------------------------------------------------------
    finetune: str = _f("lora", "train LoRA adapters or the full UNet", ("lora", "full"))
    lora_rank: int = _f(8, "LoRA rank (the paper: 8)")
    lora_alpha: float = _f(8.0, "LoRA alpha (the paper: 8)")
    lora_targets: str = _f(",".join(DEFAULT_LORA_TARGETS), "comma-separated UNet modules that get LoRA")
    mixed_precision: str = _f(
        "auto",
        "auto = bf16 on a GPU that has it, else no; trainable weights stay fp32",
        ("auto", "no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in the backward pass (less memory)")
    xformers: bool = _f(False, "xformers attention (extra: xformers) instead of torch SDPA")
    # --- eval, logging, output -------------------------------------------------------------------
    seed: int = _f(0, "seed of prompts, noise and LoRA initialisation (process r adds r to its sampling seeds)")
    grid_prompts: str | None = _f(None, "prompts of the fixed per-epoch image grid (default: the training prompts)")
    grid_num_images: int = _f(
        8, "images in the per-epoch grid (fixed prompts and seeds), scored into grid_reward_mean"
    )
    heldout_every: int = _f(
        0,
        "every N epochs (and before training) score held-out prompts with --heldout-rewards "
        "and a diversity figure into metrics.jsonl as heldout/<name> (0: off)",
    )
    heldout_rewards: str | None = _f(
        None, "comma-separated rewards of the held-out evaluation (default: the trained reward and the jpeg ones)"
    )
    heldout_prompts: str = _f("heldout_animals", "prompts of the held-out evaluation (none of them trained on)")
    heldout_images: int = _f(2, "images per held-out prompt (>= 2 gives the diversity figure)")
    heldout_diversity: str = _f(
        "auto", "image embedding of the held-out diversity figure: auto, clip, pixels, none, clip:MODEL:PRETRAINED"
    )
    rescore_check: bool = _f(True, "re-score a few recorded steps each epoch and log the drift (on-policy check)")
    output_dir: str = _f("runs/rebel-diffusion", "run folder (refused if it exists, unless --resume or --overwrite)")
    resume: bool = _f(False, "continue the run in --output-dir from its last checkpoint")
    overwrite: bool = _f(False, "delete an existing --output-dir and start afresh")
    checkpoint_every: int = _f(1, "write a resumable checkpoint every N epochs (and at the end)")
    checkpoints_keep: int = _f(2, "checkpoints kept (oldest deleted)")
    stop_grace: float = _f(
        20.0,
        "seconds from SIGINT/SIGTERM to a written checkpoint: the epoch in progress is "
        "finished if it ends in time, else cut short (torch elastic kills workers after 30 s)",
    )
    log_with: str = _f("none", "experiment tracker through accelerate", ("none", "tensorboard", "wandb"))
    progress: str = _f(
        "auto",
        "what the console shows: bar = progress bars and a line per epoch; lines = a line per epoch (with "
        "the held-out figures), for log files; none = warnings and errors only (--quiet); auto = bar on a "
        "terminal, lines otherwise (nohup, SLURM, CI) or when TQDM_DISABLE is set",
        ("auto", "bar", "lines", "none"),
    )
    num_threads: int | None = _f(
        None,
        "torch CPU threads per process (default: the CPUs idle at start divided among the "
        "local processes, at least 1: all of an idle machine's, none that other work keeps busy, "
        "where threads sharing a CPU spin against each other)",
    )

    # -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``UsageError`` (one line) for a value the run cannot use, before any heavy work."""
        for name, value in dataclasses.asdict(self).items():
            if value is None or isinstance(value, bool | str):
                continue
            if not math.isfinite(value):
                raise UsageError(f"--{_flag(name)} must be a finite number, got {value}")
            if name in RANGES:
                lo, hi = RANGES[name]
                if (lo is not None and not lo(value)) or (hi is not None and not hi(value)):
                    raise UsageError(f"--{_flag(name)} must be {RANGE_TEXT[name]}, got {value:g}")
        if self.sampler != "lcm" and not self.ddim_eta > 0:
            raise UsageError(f"--ddim-eta must be > 0 (got {self.ddim_eta}): eta = 0 DDIM has no log-prob to train")
        for name, value in dataclasses.asdict(self).items():
            choices = _field(name).metadata["choices"]
            if choices and value not in choices:
                raise UsageError(f"--{_flag(name)} must be one of {', '.join(choices)}, got {value!r}")
        if self.algorithm == "rebel" and self.images_per_prompt < 2:
            raise UsageError("REBEL regresses on pairs: --images-per-prompt must be >= 2")
        if self.anchor == "auto":  # resolved once: config.yaml stores what ran
            self.anchor = "base" if self.algorithm == "rebel" else "policy"
        if self.anchor != "policy" and self.algorithm != "rebel":
            raise UsageError(
                f"--anchor {self.anchor} is REBEL's (DDPO's PPO loss has no anchor); drop it or use --algorithm rebel"
            )
        if self.sample_guidance_scale is not None and self.anchor != "base":
            raise UsageError(
                f"--sample-guidance-scale {self.sample_guidance_scale:g} needs REBEL with --anchor base (its "
                "optimum does not depend on who drew the pairs; the policy anchor's and PPO's do)"
            )
        if self.preference and self.algorithm != "rebel":
            raise UsageError("--preference needs --algorithm rebel (DDPO has no pairwise target)")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        if self.kl_prompts and not self.kl_coef > 0:
            raise UsageError(f"--kl-prompts {self.kl_prompts}: the KL term is off (--kl-coef 0); set --kl-coef > 0")
        for name in ("policy_step_weights", "kl_step_weights"):
            step_weights(getattr(self, name), self.num_steps, f"--{_flag(name)}")
        per_step = self.images_per_step()
        if self.algorithm == "rebel" and per_step % self.images_per_prompt:
            raise UsageError(
                f"REBEL's optimizer steps take whole prompts: --train-batch-size {self.train_batch_size} x "
                f"--gradient-accumulation-steps {self.gradient_accumulation_steps} = {per_step} images is not a "
                f"multiple of --images-per-prompt {self.images_per_prompt}"
            )
        if self.images_per_epoch() % per_step:
            raise UsageError(
                f"{self.images_per_epoch()} images per process per epoch do not divide into optimizer steps of "
                f"--train-batch-size {self.train_batch_size} x --gradient-accumulation-steps "
                f"{self.gradient_accumulation_steps}"
            )

    def images_per_epoch(self, num_processes: int = 1) -> int:
        return self.prompts_per_batch * self.batches_per_epoch * self.images_per_prompt * num_processes

    def images_per_step(self) -> int:
        """Images per optimizer step, per process (REBEL: whole prompts, all their pairs)."""
        return self.train_batch_size * self.gradient_accumulation_steps

    def pairs_per_epoch(self) -> int:
        """REBEL's pairs per process per epoch: k(k-1)/2 for each prompt's k images."""
        k = self.images_per_prompt
        return self.prompts_per_batch * self.batches_per_epoch * k * (k - 1) // 2

    def optimizer_steps_per_epoch(self) -> int:
        return self.images_per_epoch() // self.images_per_step() * self.inner_epochs

    def to_yaml(self) -> str:
        """The run's stored configuration: every field but the actions (--resume, --overwrite)."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in ACTIONS}
        return yaml.safe_dump(values, sort_keys=False)


def step_weights(spec: str, num_steps: int, flag: str = "--policy-step-weights") -> list[float] | None:
    """Per-step weights from their flag: None for ``uniform`` (every step 1), else ``num_steps`` values.

    ``linear:FIRST,LAST``: evenly from the first sampling step (the noisiest) to the last;
    ``w1,...,wT``: one finite, non-negative number per step. Anything else is a one-line UsageError.
    """
    text = spec.strip()
    if text == "uniform":
        return None
    ramp = text.startswith("linear:")
    try:
        values = [float(v) for v in text.removeprefix("linear:").split(",")]
    except ValueError:
        values = []
    if ramp and len(values) == 2:
        first, last = values
        values = [first + (last - first) * t / max(num_steps - 1, 1) for t in range(num_steps)]
    if len(values) != num_steps or not all(math.isfinite(v) and v >= 0 for v in values):
        raise UsageError(
            f"{flag} {spec}: use uniform, linear:FIRST,LAST or {num_steps} comma-separated numbers >= 0 "
            f"(one per step of --num-steps {num_steps})"
        )
    return values


# Fields an earlier release stored and this one no longer has (what replaced them): dropped when a
# run's config.yaml is read, so its lora/ still samples and evaluates.
REMOVED = {"skip_final_steps": "min_step_std"}


# Field names of the previous release, read (with a warning) from flags and files; a run's own
# config.yaml written before the rename reads silently.
RENAMED = {
    "eval_prompts": "grid_prompts",
    "eval_num_images": "grid_num_images",
    "eval_every": "heldout_every",
    "eval_rewards": "heldout_rewards",
    "eval_diversity": "heldout_diversity",
}

# What the command does with --output-dir, not part of a run: never stored, never read from a file.
ACTIONS = ("resume", "overwrite")
# The only fields a --resume may change: how long, how often to checkpoint, and logging.
SAFE_ON_RESUME = (
    "epochs",
    "checkpoint_every",
    "checkpoints_keep",
    "log_with",
    "stop_grace",
    "num_threads",
    "progress",
    "output_dir",
) + ACTIONS


def _ge(x):
    return lambda v: v >= x


def _gt(x):
    return lambda v: v > x


def _le(x):
    return lambda v: v <= x


def _lt(x):
    return lambda v: v < x


# Allowed range of each numeric field (every float must also be finite): (lower test, upper test), text.
_RANGES = {
    **{
        name: ((_ge(1), None), ">= 1")
        for name in (
            "num_steps",
            "epochs",
            "images_per_prompt",
            "prompts_per_batch",
            "batches_per_epoch",
            "train_batch_size",
            "gradient_accumulation_steps",
            "inner_epochs",
            "lora_rank",
            "grid_num_images",
            "checkpoint_every",
            "checkpoints_keep",
            "tracker_buffer_size",
            "tracker_min_count",
            "heldout_images",
            "steps_per_pass",
            "num_threads",
            "resolution",
        )
    },
    **{
        name: ((_gt(0), None), "> 0")
        for name in (
            "eta",
            "learning_rate",
            "preference_temperature",
            "stop_grace",
            "clip_range",
            "adv_clip_max",
            "adam_epsilon",
            "lora_alpha",
        )
    },
    **{
        name: ((_ge(0), None), ">= 0")
        for name in (
            "adv_std_floor",
            "kl_coef",
            "min_step_std",
            "heldout_every",
            "lr_warmup_steps",
            "weight_decay",
            "ddim_eta",
            "guidance_scale",
            "sample_guidance_scale",
            "max_grad_norm",
            "seed",
        )
    },
    **{name: ((_ge(0), _lt(1)), "in [0, 1)") for name in ("adam_beta1", "adam_beta2", "ema_decay")},
    "timestep_fraction": ((_gt(0), _le(1)), "in (0, 1]"),
}
RANGES = {name: tests for name, (tests, _) in _RANGES.items()}
RANGE_TEXT = {name: text for name, (_, text) in _RANGES.items()}


# What the toy presets share: 10 DDIM steps, 4 images per prompt (6 pairs each), optimizer steps of
# 8 images (2 prompts), lr 1e-3, no gradient clipping (Adam normalises the step; clipping at 1.0
# clipped every step), and the defaults: eta 2, KL 0.1, advantages centred per prompt and scaled by
# the batch's std, the two lowest-noise steps (std 0.04, 0.02) left out by --min-step-std 0.1.
_TOY = dict(
    model="toy",
    anchor="policy",  # the toy presets' figures (docs/tuning.md) were measured against the sampling policy
    prompts="toy_shapes",
    num_steps=10,
    images_per_prompt=4,
    prompts_per_batch=8,
    batches_per_epoch=2,
    train_batch_size=8,
    gradient_accumulation_steps=1,
    learning_rate=1e-3,
    max_grad_norm=0.0,
    grid_prompts="toy_heldout",
    grid_num_images=16,
    heldout_prompts="toy_heldout",
)

# Presets: named bundles of defaults (applied before --config and flags).
PRESETS: dict[str, dict] = {
    # The REBEL paper's image setup (RLCM code): LCM Dreamshaper v7, 8 steps, guidance 8 as an embedding,
    # 8 prompts x 2 images, 10 batches, micro-batch 2 pairs (4 images), lr 1e-4, rank 8 / alpha 8.
    "lcm": dict(
        model="SimianLuo/LCM_Dreamshaper_v7",
        anchor="policy",  # the paper's regression
        sampler="lcm",
        num_steps=8,
        guidance_scale=8.0,
        resolution=768,
        prompts_per_batch=8,
        batches_per_epoch=10,
        train_batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=1e-4,
    ),
    # DDPO's aesthetic setup on SD 1.5: 50 DDIM steps, eta 1, guidance 5, lr 3e-4.
    "ddpo": dict(
        algorithm="ddpo",
        num_steps=50,
        ddim_eta=1.0,
        guidance_scale=5.0,
        learning_rate=3e-4,
        images_per_prompt=2,
        prompts_per_batch=8,
        batches_per_epoch=4,
        train_batch_size=4,
        gradient_accumulation_steps=4,
    ),
    # SDXL base 1.0 from the SDXL RL/DPO recipes (SPO, Diffusion-DPO, LPO): 1024 px (size conditioning
    # of the size sampled), DDIM from its own scheduler config with ddim_eta 1, 30 steps, guidance 5,
    # LoRA rank 32 / alpha 32 on attention, lr 3e-5, gradient checkpointing, 2 images a micro-batch
    # (8 an optimizer step); its VAE decodes in fp32 under fp16 (force_upcast) unless --vae swaps it.
    "sdxl": dict(
        model="stabilityai/stable-diffusion-xl-base-1.0",
        sampler="ddim",
        num_steps=30,
        ddim_eta=1.0,
        guidance_scale=5.0,
        resolution=1024,
        images_per_prompt=2,
        prompts_per_batch=8,
        batches_per_epoch=2,
        train_batch_size=2,
        gradient_accumulation_steps=4,
        steps_per_pass=1,
        lora_rank=32,
        lora_alpha=32.0,
        learning_rate=3e-5,
        gradient_checkpointing=True,
        grid_num_images=8,
    ),
    # The toy tasks (the built-in toy model on a CPU).
    # toy: the offline quick start. Prompt following at guidance 1 on the 16 combinations the toy model
    # never saw in training (prompts/toy_novel.txt, where the base is right about 4 times in 5); the
    # other 16 (toy_novel_heldout) are held out. The training mix (toy_novel_contrast) adds, beside
    # each combination, the known captions the base draws instead of it, so the update must keep
    # "orange" where orange is asked while it teaches "yellow" (rebel_diffusion.toy.contrast).
    # Anchored to the base (--anchor base), the early denoising steps (where shape and colours are
    # decided) weighted most: both keep the held-out twin closer to the base than a fresh trust
    # region per epoch or uniform steps do. eta 6 teaches the novel combinations more than eta 3;
    # alone it lost the twin (-0.05 to -0.20), so the KL term prices leaving the base on the known
    # captions of the mix alone (--kl-prompts toy_shapes: prior preservation), and the novel ones
    # move freely (docs/tuning.md). 32 prompts x 4 images an epoch, optimizer steps of 2 prompts at
    # lr 1e-3.
    "toy": {
        **_TOY,
        "prompts": "toy_novel_contrast",
        "policy_step_weights": "linear:2,0",
        "grid_prompts": "toy_novel",
        "grid_num_images": 16,  # one fixed seed a caption
        "heldout_prompts": "toy_novel_heldout",
        "heldout_every": 5,
        "heldout_rewards": "toy-alignment-full",
        "heldout_images": 4,
        "heldout_diversity": "pixels",
        "reward": "toy-alignment-full",
        "guidance_scale": 1.0,
        "prompts_per_batch": 16,
        "eta": 6.0,
        "anchor": "base",
        "kl_coef": 1.0,
        "kl_prompts": "toy_shapes",
        "epochs": 20,
    },
    # toy-jpeg: JPEG compressibility at guidance 3 with a KL term that keeps the shapes on-prompt
    # (without it shapes shrink and blur, toy-alignment falls ~0.25 in 8 epochs). eta 4 and KL 0.03
    # (the policy term weighs 1 / (eta x KL) against the KL term: 8.3, against 5 at the defaults):
    # advantages scaled by the batch's spread are smaller than +-1 (docs/tuning.md).
    "toy-jpeg": dict(**_TOY, eta=4.0, kl_coef=0.03, reward="jpeg-compressibility", guidance_scale=3.0, epochs=10),
    # RL in place of classifier-free guidance: toy-alignment at guidance 1, more prompts an epoch.
    # Far from the base on purpose, so no KL term; 16 prompts an epoch, a smaller step.
    "toy-alignment": dict(
        **{**_TOY, "prompts_per_batch": 16, "learning_rate": 3e-4, "eta": 3.0},
        reward="toy-alignment",
        guidance_scale=1.0,
        kl_coef=0.0,
        epochs=30,
    ),
    # A near-saturated reward (the base scores ~0.96 at guidance 3): training must not lower it.
    "toy-alignment-saturated": dict(**_TOY, reward="toy-alignment", guidance_scale=3.0, epochs=10),
}


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}[name]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(tp):
    """int | None -> int; str -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def read_yaml(path: str | Path, what: str = "--config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path}: expected a mapping of config fields")
    return data


def _apply(cfg: TrainConfig, values: dict, source: str) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"{source}: unknown config field(s) {', '.join(unknown)}")
    out = {}
    for k, v in values.items():
        out[k] = _coerce(k, v, _base_type(hints[k]), source)
    return dataclasses.replace(cfg, **out)


def _coerce(name: str, value, tp, source: str):
    """A YAML/flag value as the field's type: 1e-4 (which PyYAML reads as a string) is a float; a bool is
    never a number; an int is a float where a float is wanted."""
    if value is None:
        return None
    if name == "reward" and isinstance(value, dict):  # YAML: reward: {aesthetic: 1.0, clip: 0.5}
        from .rewards.combined import format_reward_weights, parse_reward_weights

        return format_reward_weights(parse_reward_weights(value))
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise UsageError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise UsageError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    return value


def _without_actions(values: dict, source: str) -> dict:
    """A stored or user config without --resume/--overwrite; either set to true there is refused."""
    for name in ACTIONS:
        if values.get(name):
            raise UsageError(f"{source}: {name} is an action, not a config field: pass --{name} on the command line")
    return {k: v for k, v in values.items() if k not in ACTIONS}


def resolve_config(
    flags: dict,
    *,
    config_file: str | None = None,
    preset: str | None = None,
    read_run: Callable[[Path], TrainConfig] | None = None,
) -> TrainConfig:
    """The configuration from defaults, the run's saved config (on resume), preset, file and ``flags``
    ({field: value} of the fields given on the command line), in that order of precedence.
    ``read_run``: the reader of a run folder's saved config (``run_folder.read_run_config``).

    On resume a value that differs from the run's saved one is refused unless the field is in
    ``SAFE_ON_RESUME``: the checkpoint, the batches and the random streams depend on the rest.
    """
    flags = _renamed(flags, "flags", warn=True)
    cfg = TrainConfig()
    file_values = {}
    if config_file:
        file_values = _renamed(
            _without_actions(read_yaml(config_file), f"--config {config_file}"), f"--config {config_file}", warn=True
        )
    if flags.get("resume") and flags.get("overwrite"):
        raise UsageError("--resume and --overwrite exclude each other")
    saved_cfg = None
    if flags.get("resume"):
        if read_run is None:
            raise ValueError("resolve_config: --resume needs read_run (run_folder.read_run_config)")
        out = Path(flags.get("output_dir") or file_values.get("output_dir") or cfg.output_dir)
        try:
            cfg = saved_cfg = read_run(out)
        except UsageError as e:
            raise UsageError(f"--resume: {e}") from e
    if preset:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset}: unknown; choose one of {', '.join(sorted(PRESETS))}")
        cfg = _apply(cfg, PRESETS[preset], f"--preset {preset}")
    cfg = _apply(cfg, file_values, f"--config {config_file}" if file_values else "config")
    cfg = _apply(cfg, flags, "flags")
    if saved_cfg is not None:
        for name in (f.name for f in dataclasses.fields(TrainConfig)):
            old, new = getattr(saved_cfg, name), getattr(cfg, name)
            if name not in SAFE_ON_RESUME and old != new:
                may = ", ".join("--" + _flag(n) for n in SAFE_ON_RESUME if n not in ("output_dir", *ACTIONS))
                raise UsageError(
                    f"--resume: --{_flag(name)} {new!r} differs from the run's {old!r}; a resumed run keeps its "
                    f"settings except {may} (start a new run to change it)"
                )
    if (
        cfg.resume
        and saved_cfg is not None
        and cfg.epochs != saved_cfg.epochs
        and cfg.lr_scheduler in ("linear", "cosine")
    ):
        raise UsageError(
            f"--resume: --epochs changes the {cfg.lr_scheduler} learning-rate schedule of this run; "
            "only a constant schedule can be extended"
        )
    cfg.validate()
    return cfg


def config_from_stored(values: dict, source: str) -> TrainConfig:
    """A run's stored fields (its config.yaml, as a dict) as the ``TrainConfig`` it trained with.

    Field names of an earlier release read as today's (``RENAMED``, silently), fields its release did
    not write take their defaults, except ``anchor`` (runs from before it regressed against the
    sampling policy) and ``prompt_sampling`` (they drew prompts with replacement). Values are checked
    as ``validate`` checks them; nothing outside is (a prompts file may have moved since). Errors are
    one-line ``UsageError``s naming ``source``.
    """
    # Format-1 runs stored the actions (as false); fields since removed are dropped.
    stored = {k: v for k, v in values.items() if k not in ACTIONS and k not in REMOVED}
    stored.setdefault("anchor", "policy")
    stored.setdefault("prompt_sampling", "replacement")
    cfg = _apply(TrainConfig(), _renamed(stored, source, warn=False), source)
    unset = [f.name for f in dataclasses.fields(cfg) if f.default is not None and getattr(cfg, f.name) is None]
    if unset:  # YAML null where the field has a value by default
        raise UsageError(f"{source}: {unset[0]} is null: give it a value, or delete the line for its default")
    try:
        cfg.validate()  # also resolves anchor 'auto' as the run did
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from e
    return cfg


def _renamed(values: dict, source: str, *, warn: bool) -> dict:
    """``values`` with the field names of the previous release (``RENAMED``) replaced by today's."""
    out = {}
    for key, value in values.items():
        new = RENAMED.get(key)
        if new is None:
            out[key] = value
            continue
        if new in values:
            raise UsageError(f"{source}: both {key} and its new name {new} are set; keep {new}")
        if warn:
            warnings.warn(
                f"{source}: {key} is deprecated and will be removed in the next release; use {new}",
                FutureWarning,
                stacklevel=3,
            )
        out[new] = value
    return out


def field_help(name: str) -> str:
    """A field's help text with its default, as the ``train`` command shows it."""
    f = _field(name)
    text = f.metadata["help"]
    if "(default" in text or f.default is None:  # the help says it, or there is nothing to show
        return text
    return f"{text} (default: {f.default})"


def field_type(name: str):
    """The field's value type (``int | None`` -> int)."""
    return _base_type(typing.get_type_hints(TrainConfig)[name])
