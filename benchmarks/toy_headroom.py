"""How much room the toy tasks leave for RL, measured on the base model before any training.

Two figures bound what the toy presets can show:

1. ``toy-alignment`` at guidance 1 (``--preset toy-alignment``): the base model's score on the
   captions REBEL trains on (``prompts/toy_shapes.txt``) against the held-out captions
   (``prompts/toy_heldout.txt``), at guidance 1 and 3. REBEL learns from the training images that
   fail; where nearly none fail, there is little to learn from, whatever the held-out figure. The
   32 captions that name only a colour and a shape ("a red circle"), which the model never saw,
   are scored too: a low score at both guidance scales is a caption out of the model's
   distribution, not a gap that guidance (or RL in its place) closes.
2. ``jpeg-compressibility`` (``--preset toy``): how many kB a sample can lose without leaving its
   prompt. Fixed transforms of the base model's held-out samples (a 3x3 binomial blur, the
   background flattened to its border colour, the content shrunk about the centre) each give the
   change of JPEG size and of toy-alignment: a transform that saves kB at no loss of alignment is an
   on-prompt route to a smaller file.
3. The same held-out captions and seeds at guidance 1, 1.5, 2 and 3: how much of a smaller file a
   policy could get by weakening the guidance it is sampled with, and what that costs in alignment.

    python -m benchmarks.toy_headroom            # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks import env
from rebel_diffusion.models import load_pipeline
from rebel_diffusion.outputs.generation import sample_images
from rebel_diffusion.rewards import load_reward
from rebel_diffusion.sampling import SamplingSettings
from rebel_diffusion.toy.data import COLOUR_NAMES, SHAPES, prompt_lines


def binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur ([1, 2, 1] x [1, 2, 1] / 16), edges replicated. (B, 3, H, W) -> same."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=images.dtype)
    kernel = (k1[:, None] * k1[None, :] / 16).expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])


def border_colour(images: torch.Tensor) -> torch.Tensor:
    """The median colour of each image's one-pixel border (the toy's background). (B, 3, H, W) -> (B, 3)."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    return border.median(dim=2).values


def flatten_background(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels within ``threshold`` (max over channels) of the border colour set to it exactly. -> same shape."""
    colour = border_colour(images)[:, :, None, None]  # (B, 3, 1, 1)
    near = (images - colour).abs().amax(dim=1, keepdim=True) < threshold  # (B, 1, H, W)
    return torch.where(near, colour.expand_as(images), images)


def shrink(images: torch.Tensor, scale: float) -> torch.Tensor:
    """The image resized by ``scale`` about its centre, the rest filled with the border colour. -> same shape."""
    h, w = images.shape[-2:]
    nh, nw = round(h * scale), round(w * scale)
    small = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    out = border_colour(images)[:, :, None, None].expand_as(images).clone()
    top, left = (h - nh) // 2, (w - nw) // 2
    out[:, :, top : top + nh, left : left + nw] = small
    return out


TRANSFORMS = {
    "blur 3x3": binomial_blur,
    "background flattened (0.05)": lambda x: flatten_background(x, 0.05),
    "background flattened (0.1)": lambda x: flatten_background(x, 0.1),
    "shrunk to 0.9": lambda x: shrink(x, 0.9),
    "shrunk to 0.8": lambda x: shrink(x, 0.8),
}

# Guidance scales compared with the quick start's 3 (section 3 of ``main``).
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)


def mean_and_error(values: torch.Tensor) -> dict:
    """Mean and standard error of a (N,) sample."""
    v = values.double()
    return {"n": len(v), "mean": float(v.mean()), "stderr": float(v.std() / len(v) ** 0.5)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy_headroom", description=__doc__.splitlines()[0])
    p.add_argument("--train-seeds", type=int, default=2, help="seeds per training caption (192 captions)")
    p.add_argument("--heldout-seeds", type=int, default=8, help="seeds per held-out caption (32 captions)")
    p.add_argument("--max-train-prompts", type=int, default=None, help="the first N training captions only")
    p.add_argument("--num-steps", type=int, default=10, help="DDIM steps (eta 1), as the toy presets")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default=None, help="JSON path (default: results/toy_headroom_cpu_DATE.json, a new file)")
    args = p.parse_args(argv)
    for name in ("train_seeds", "heldout_seeds", "num_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline("toy")
    alignment, jpeg = load_reward("toy-alignment"), load_reward("jpeg-compressibility")
    captions = {
        "train": prompt_lines("train")[: args.max_train_prompts],
        "heldout": prompt_lines("heldout"),
        "colour and shape only": [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for s in SHAPES for c in COLOUR_NAMES],
    }
    # Seeds far from the trainer's and the held-out evaluation's (which start at the run's seed).
    counts = {"train": args.train_seeds, "heldout": args.heldout_seeds, "colour and shape only": args.heldout_seeds}
    seeds = {split: list(range(1000, 1000 + n)) for split, n in counts.items()}

    def draw(split: str, guidance: float) -> tuple[torch.Tensor, list[str]]:
        settings = SamplingSettings(sampler="ddim", num_steps=args.num_steps, ddim_eta=1.0, guidance_scale=guidance)
        images = sample_images(pipe, captions[split], seeds[split], settings, batch_size=64)  # (P*K, 3, H, W)
        return images, [p for p in captions[split] for _ in seeds[split]]

    # 1. toy-alignment of the base model: training against held-out captions, guidance 1 and 3.
    base_alignment, heldout = {}, {}
    for guidance in (1.0, 3.0):
        for split in captions:
            images, prompts = draw(split, guidance)
            base_alignment[f"{split}, guidance {guidance:g}"] = mean_and_error(alignment(images, prompts))
            if split == "heldout":
                heldout[guidance] = images, prompts
    # 2. jpeg-compressibility: fixed transforms of the held-out samples at the quick start's guidance 3.
    images, prompts = heldout[3.0]
    base_jpeg, base_align = jpeg(images, prompts), alignment(images, prompts)

    def change(other: torch.Tensor) -> dict:
        """JPEG gain and toy-alignment change of ``other`` against the guidance-3 samples, paired by image."""
        return {
            "jpeg_gain_kb": mean_and_error(jpeg(other, prompts) - base_jpeg),
            "alignment_change": mean_and_error(alignment(other, prompts) - base_align),
        }

    transforms = {name: change(fn(images).clamp(0, 1)) for name, fn in TRANSFORMS.items()}
    # 3. The quick start's guidance 3 against lower scales, on the same captions and seeds: a policy
    # that weakens the guidance saves kB too, and up to a point keeps (or improves) toy-alignment.
    by_guidance = {}
    for guidance in GUIDANCE_SCALES:
        g_images = heldout[guidance][0] if guidance in heldout else draw("heldout", guidance)[0]
        by_guidance[f"guidance {guidance:g}"] = change(g_images)  # the same captions and seeds
    result = {
        "benchmark": "toy_headroom",
        "command": "python -m benchmarks.toy_headroom " + " ".join(argv or []),
        "env": env.record("cpu"),
        "settings": {**vars(args), "sampler": "ddim", "ddim_eta": 1.0, "model": "toy"},
        "seconds": time.perf_counter() - t0,
        "base_alignment": base_alignment,
        "heldout_guidance3": {
            "jpeg_compressibility": mean_and_error(base_jpeg),
            "alignment": mean_and_error(base_align),
        },
        "transforms": transforms,
        "heldout_by_guidance": by_guidance,
    }
    out = args.out or env.default_out("toy_headroom", torch.device("cpu"))
    env.write_json(out, result)
    for key, v in base_alignment.items():
        print(f"base toy-alignment, {key}: {v['mean']:.3f} +- {v['stderr']:.3f} (n={v['n']})")
    for name, v in {**transforms, **{f"{k} (against 3)": v for k, v in by_guidance.items()}}.items():
        print(
            f"{name}: JPEG {v['jpeg_gain_kb']['mean']:+.4f} kB, "
            f"toy-alignment {v['alignment_change']['mean']:+.4f} +- {v['alignment_change']['stderr']:.4f}"
        )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
