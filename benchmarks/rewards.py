"""Reward throughput: score batches of 512x512 images with each reward and report images/second.

Run from the repository root::

    # CPU (small; random weights: timing does not depend on weight values)
    python -m benchmarks.rewards --device cpu --batch-size 2 --repeats 2 --random-weights
    # GPU (each reward's full-size architecture with random weights, bf16)
    python -m benchmarks.rewards --device cuda --batch-size 64 --repeats 10 --dtype bf16 --random-weights
    # the human-preference models too (CLIP ViT-H/14 twice, BLIP ViT-L)
    python -m benchmarks.rewards --random-weights --rewards pickscore,hpsv2,imagereward

Writes JSON (device, versions, settings, one entry per reward) to ``--out``, by default
``benchmarks/results/rewards_<device>.json``. Images are photo-like (smooth colour fields plus
grain), since JPEG cost depends on content; ``clip`` gets distinct prompts (the worst case for its
text encoder). With ``--random-weights`` every reward is its real architecture at full size with
seeded random weights (``'random'`` for its weights option), so nothing is downloaded. ``load_s`` is
the time to build the model (ViT-L/14 is shared by ``aesthetic`` and ``clip``, so the second one is
~0). ``photo_like`` and ``bench_one`` also serve the rewards section of ``benchmarks.speed``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import env
from rebel_diffusion.errors import UsageError
from rebel_diffusion.rewards import REWARDS, load_reward, reward_options

BENCH_REWARDS = ("aesthetic", "clip", "jpeg-incompressibility", "jpeg-compressibility")
# The weights options that take "random": the architecture with seeded random weights.
RANDOM_OPTIONS = ("clip_pretrained", "aesthetic_head", "pickscore_model", "hpsv2_checkpoint", "imagereward_checkpoint")


def photo_like(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields plus grain.  # (B, 3, size, size) in [0, 1]"""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.03 * torch.randn(b, 3, size, size, generator=g)).clamp(0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, options: dict, images: torch.Tensor, prompts: list[str], repeats: int) -> dict:
    """Load, warm up once, then time ``repeats`` calls on the same batch."""
    device = images.device
    t0 = time.perf_counter()
    reward = load_reward(name, **options).load()
    sync(device)
    load_s = time.perf_counter() - t0
    # Warm-up: first kernels, allocator, thread pool. A GPU tunes per shape, so it gets the full
    # batch; on a CPU one image is enough and keeps the run short.
    warm = images if device.type == "cuda" else images[:1]
    reward(warm, prompts[: warm.shape[0]])
    times, cpu0 = [], time.process_time()
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        scores = reward(images, prompts)
        sync(device)
        times.append(time.perf_counter() - t0)
    b = images.shape[0]
    return {
        "images_per_s": round(b * repeats / sum(times), 3),
        "seconds_per_batch_mean": round(sum(times) / repeats, 4),
        "seconds_per_batch_best": round(min(times), 4),
        # CPU seconds this process got per wall second while timed: below the thread count
        # means the cores were shared with other work and the figure is pessimistic.
        "cpu_per_wall": round((time.process_time() - cpu0) / sum(times), 2),
        "load_s": round(load_s, 2),
        "score_mean": round(float(scores.mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rewards", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 64 on GPU")
    p.add_argument("--repeats", type=int, default=None, help="timed batches per reward; default 2 CPU, 10 GPU")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 CPU, bf16 GPU")
    p.add_argument(
        "--random-weights", action="store_true", help="each reward's architecture, random weights (offline)"
    )
    p.add_argument("--rewards", default=",".join(BENCH_REWARDS), help=f"comma-separated, from {', '.join(REWARDS)}")
    p.add_argument("--out", default=None, help="default: benchmarks/results/rewards_<device>.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size or (64 if gpu else 2)
    repeats = args.repeats or (10 if gpu else 2)
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    out = Path(args.out) if args.out else env.RESULTS / f"rewards_{env.device_tag(device)}.json"

    images = photo_like(batch, args.size).to(device)
    prompts = [f"a photo of animal number {i}" for i in range(batch)]
    random = dict.fromkeys(RANDOM_OPTIONS, "random") if args.random_weights else {}
    results = {}
    for name in names:
        options = dict(device=device, dtype=dtype, **reward_options(name, random))
        try:
            results[name] = bench_one(name, options, images, prompts, repeats)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{name:24s} {results[name]['images_per_s']:9.2f} images/s  (load {results[name]['load_s']} s)")

    environment = env.record(device)
    report = {
        "benchmark": "rewards",
        "device": env.device_name(device),
        "device_type": device.type,
        "torch": environment["versions"]["torch"],
        "open_clip": environment["versions"]["open_clip"],
        "pillow": environment["versions"]["pillow"],
        "python": environment["versions"]["python"],
        "torch_threads": environment["torch_threads"],
        "cpu_count": environment["cpu_count"],
        "batch_size": batch,
        "image_size": args.size,
        "repeats": repeats,
        "dtype": dtype,
        "clip_model": "ViT-L-14 (aesthetic, clip); ViT-H-14 (pickscore, hpsv2); BLIP ViT-L (imagereward)",
        "random_weights": args.random_weights,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "env": environment,
        "rewards": results,
    }
    env.write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
