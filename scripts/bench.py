#!/usr/bin/env python
"""One benchmark command: sampling, REBEL training speed and memory, rewards, a whole epoch, FLOPs.

Measures on the device it runs on, for one model, and writes ONE JSON (device, versions, load
average, every setting and figure; each section records the switches it ran with):

  sampling  images/s of plain diffusers ``StableDiffusionPipeline.__call__`` (one generator, and
            per-image generators) vs our ``sample_trajectories(record=True)`` with log-probs: same
            steps, batch, eta and guidance; one warm-up call each, then interleaved rounds (the
            order rotates). Overhead = median time of ours / diffusers - 1.
  flops     UNet FLOPs from ``torch.utils.flop_counter.FlopCounterMode``: one sampling forward
            (CFG doubles the batch), one LoRA forward and one LoRA forward+backward at the training
            micro-batch, and a VAE decode. Used for achieved TFLOP/s (and MFU on a GPU, against
            ``--peak-tflops``, dense bf16).
  training  one REBEL optimizer step (``rebel_accumulate`` + ``optimizer.step`` on a LoRA UNet),
            off-policy (with the no-graph re-scoring pass), for each T in ``--train-steps``:
            pairs/s and peak memory growth over the memory just before the step. Also the naive
            full-graph step (every step's graph held, one backward per micro-batch; the same
            gradient, checked on a T=2 trajectory) whose peak grows with T. CUDA: in one process,
            ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: each (T,
            method) in a fresh subprocess; peak RSS (VmHWM, reset through /proc/self/clear_refs
            just before the step) minus the RSS just before it.
  rewards   images/s of each weight-free reward (jpeg-*); with ``--all-rewards`` also aesthetic and
            clip with a random-weight ViT-L/14 (``scripts/bench_rewards.py``'s helpers).
  epoch     ``rebel_diffusion.train.setup`` + ``train_epoch`` (sample, score, train) with a
            TrainConfig (reward jpeg-compressibility, output in a temporary folder): images/s
            per epoch; the first epoch includes warm-up (and compilation).

Switches: ``--dtype bf16|fp32``, ``--channels-last``, ``--compile`` (torch.compile of the UNet;
compile time and dynamo graph counts per phase are recorded), ``--sdpa`` / ``--xformers``.

Examples:
  # CPU, tiny model (a few minutes on two busy cores)
  python scripts/bench.py
  # GPU, SD-1.5 architecture with random weights at 512x512 (see benchmarks/README.md)
  python scripts/bench.py --model sd15-random --device cuda --dtype bf16 --all-rewards --out $OUT/bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "scripts")):  # the package from this checkout, and the sibling benches
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_sampler  # noqa: E402

SECTIONS = ("sampling", "flops", "training", "rewards", "epoch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKER_TAG = "BENCH_TRAIN_WORKER_RESULT "
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (default), sd15-random, or any load_pipeline name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 CPU, 50 GPU)")
    p.add_argument("--batch", type=int, default=None, help="images per sampling call (default 4 CPU, 8 GPU)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--repeats", type=int, default=None, help="timed sampling rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    # training
    p.add_argument("--train-steps", default="10,20,50", help="trained steps T of one REBEL step")
    p.add_argument("--naive-steps", default=None,
                   help="T of the naive full-graph step (default: --train-steps on CPU, 1,2,4,10 on CUDA; "
                        "stops at the first out-of-memory); 'none' to skip")
    p.add_argument("--train-micro-batch", type=int, default=2, help="pairs per forward/backward")
    p.add_argument("--steps-per-pass", default=None,
                   help="the trainer's --steps-per-pass values to time (default: 1,10 on CPU, 1,5 on CUDA)")
    p.add_argument("--train-pairs", type=int, default=None, help="pairs per optimizer step (default 2 micro-batches)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed steps after the first (default 1 CPU, 2 GPU)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--train-isolation", default="auto", choices=["auto", "subprocess", "inprocess"],
                   help="auto: a fresh subprocess per (T, method) on CPU (honest peak RSS), in-process on CUDA")
    # rewards
    p.add_argument("--all-rewards", action="store_true", help="also aesthetic and clip (random-weight ViT-L/14)")
    p.add_argument("--reward-batch", type=int, default=None, help="images per reward call (default 8 CPU, 64 GPU)")
    p.add_argument("--reward-sizes", default=None, help="image sides (default: 512 and the model's own size)")
    p.add_argument("--reward-repeats", type=int, default=None, help="default 2 CPU, 10 GPU")
    # epoch
    p.add_argument("--epoch-images", type=int, default=None, help="images per epoch (default 8 CPU, 32 GPU)")
    p.add_argument("--epochs", type=int, default=2, help="epochs run (the first includes warm-up)")
    p.add_argument("--timestep-fraction", type=float, default=1.0, help="epoch: fraction of steps trained")
    # FLOPs and switches
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H100/H200: ~790)")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    att = p.add_mutually_exclusive_group()
    att.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    att.add_argument("--sdpa", dest="attention", action="store_const", const="sdpa", help="torch SDPA (default)")
    att.add_argument("--xformers", dest="attention", action="store_const", const="xformers")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_<device>_<date>.json)")
    p.add_argument("--out-dir", default=None, help="folder for the default file name (e.g. $OUT on the GPU machine)")
    p.add_argument("--_train-worker", dest="train_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_worker:
        return args

    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    defaults = dict(steps=(50, 10), batch=(8, 4), repeats=(3, 3), train_repeats=(2, 1), reward_batch=(64, 8),
                    reward_repeats=(10, 2), epoch_images=(32, 8))
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.threads is None and not cuda:
        args.threads = 1  # on a shared CPU two OpenMP threads per process run far slower than one
    if args.train_pairs is None:
        args.train_pairs = 2 * args.train_micro_batch
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown --sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.train_steps = _int_list(p, "--train-steps", args.train_steps)
    args.steps_per_pass = _int_list(p, "--steps-per-pass", args.steps_per_pass or ("1,5" if cuda else "1,10"))
    if args.naive_steps is None:
        args.naive_steps = list(args.train_steps) if not cuda else [1, 2, 4, 10]
    elif args.naive_steps.strip().lower() == "none":
        args.naive_steps = []
    else:
        args.naive_steps = _int_list(p, "--naive-steps", args.naive_steps)
    for name in ("steps", "batch", "repeats", "train_micro_batch", "train_pairs", "lora_rank", "reward_batch",
                 "reward_repeats", "epoch_images", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_repeats < 0:
        p.error("--train-repeats must be >= 0")
    if args.train_pairs % args.train_micro_batch:
        p.error("--train-pairs must be a multiple of --train-micro-batch")
    if "epoch" in args.sections:
        if args.batch % 2 or args.epoch_images % args.batch:
            p.error("the epoch samples prompts x 2 images per call: --batch must be even and divide --epoch-images")
        if (args.epoch_images // 2) % args.train_pairs:
            p.error(f"--epoch-images {args.epoch_images} gives {args.epoch_images // 2} pairs, not a multiple of "
                    f"--train-pairs {args.train_pairs}")
    args.reward_sizes = _int_list(p, "--reward-sizes", args.reward_sizes) if args.reward_sizes else None
    return args


def _int_list(p, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} takes comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"{flag} takes integers >= 1, got {text!r}")
    return values


def switches(args) -> dict:
    """The speed switches a figure was measured with."""
    return {
        "dtype": args.dtype,
        "channels_last": bool(args.channels_last),
        "compile": bool(args.compile),
        "compile_mode": args.compile_mode if args.compile else None,
        "attention": args.attention,
    }


# ----------------------------------------------------------------------------------------------
# Environment


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def device_info(device: torch.device) -> dict:
    info = {
        "type": device.type,
        "name": bench_sampler.device_name(device),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "memory_total_gib": _mem_total_gib(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 2), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count)
    return info


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def versions(device: torch.device) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    dists = {"diffusers": "diffusers", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
             "open_clip": "open_clip_torch", "xformers": "xformers", "pillow": "pillow"}
    for name, dist in dists.items():  # installed metadata: no import (open_clip and xformers are slow to import)
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda if device.type == "cuda" else None
    out["cudnn"] = torch.backends.cudnn.version() if device.type == "cuda" else None
    return out


def git_state() -> dict:
    def git(*cmd):
        try:
            r = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def default_out(device: torch.device, folder: str | None = None) -> Path:
    tag = "cpu" if device.type == "cpu" else bench_sampler.slug(bench_sampler.device_name(device))
    folder = Path(folder) if folder else REPO / "benchmarks" / "results"
    base = folder / f"bench_{tag}_{dt.date.today().isoformat()}"
    out, i = base.with_suffix(".json"), 2
    while out.exists():  # never overwrite an earlier run
        out, i = Path(f"{base}_{i}.json"), i + 1
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, dtype: str):
    """The training autocast: bf16 with fp32 LoRA weights and fp32 log-prob math, or none."""
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def dynamo_graphs() -> dict:
    """Graphs compiled so far by torch.compile (dynamo counters)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return {}
    # A recompile (new shape, grad mode or call signature) shows as one more unique graph.
    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_ok": int(counters["frames"].get("ok", 0)),
    }


def graph_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


# ----------------------------------------------------------------------------------------------
# Model and switches


def build_pipeline(model: str, dtype: str, device: torch.device):
    return bench_sampler.build_pipeline(model, DTYPES[dtype], device)


def apply_attention(pipe, attention: str) -> None:
    if attention == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise SystemExit(f"--xformers: not available ({str(e).strip().splitlines()[0][:200]})") from e
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())


def attention_processors(unet) -> list[str]:
    from rebel_diffusion.sampling import unwrap

    return sorted({type(p).__name__ for p in unwrap(unet).attn_processors.values()})


def prepare_unet(unet, args_or_spec):
    """channels-last and torch.compile, as switched on; returns the module to call."""
    get = args_or_spec.get if isinstance(args_or_spec, dict) else lambda k: getattr(args_or_spec, k)
    if get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    if get("compile"):
        kwargs = {"mode": get("compile_mode")} if get("compile_mode") else {}
        return torch.compile(unet, **kwargs)
    return unet


def prompt_list(n: int) -> list[str]:
    return bench_sampler.load_prompts(n)


# ----------------------------------------------------------------------------------------------
# Sampling


def bench_sampling(args, device: torch.device, pipe) -> dict:
    from rebel_diffusion.sampling import SamplingSettings

    settings = SamplingSettings(num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance,
                                height=args.resolution, width=args.resolution).resolve(pipe)
    prompts = prompt_list(args.batch)
    ns = SimpleNamespace(seed=args.seed, variants="ours,diffusers,diffusers_per_image")
    variants = bench_sampler.make_variants(pipe, ns, prompts, settings, device)
    load_start = load_average()

    warmup, images, graphs_warmup = {}, {}, {}
    for name, fn in variants.items():
        g0 = dynamo_graphs()
        warmup[name], _, _, images[name] = bench_sampler.timed(fn, device)
        graphs_warmup[name] = graph_delta(g0, dynamo_graphs())
    checks = {
        "image_max_abs_diff_ours_vs_diffusers_per_image": float(
            (images["ours"].float().cpu() - images["diffusers_per_image"].float().cpu()).abs().max()
        )
    }
    del images

    names = list(variants)
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    peaks = {n: [] for n in names}
    g0 = dynamo_graphs()
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            seconds, cpu_seconds, peak, _ = bench_sampler.timed(variants[n], device)
            times[n].append(seconds)
            cpu_times[n].append(cpu_seconds)
            if peak is not None:
                peaks[n].append(peak)
        print(f"  sampling round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
              flush=True)
    graphs_timed = graph_delta(g0, dynamo_graphs())

    results = {}
    for n in names:
        med = statistics.median(times[n])
        results[n] = {
            "seconds": [round(t, 4) for t in times[n]],
            "warmup_seconds": round(warmup[n], 4),
            "median_seconds": round(med, 4),
            "median_process_cpu_seconds": round(statistics.median(cpu_times[n]), 4),
            "images_per_s": round(args.batch / med, 4),
            "peak_gpu_memory_gib": round(max(peaks[n]) / 2**30, 3) if peaks[n] else None,
        }

    def ratio(a, b, key="median_seconds"):
        return round(results[a][key] / results[b][key], 4)

    overhead = {
        "ours_vs_diffusers_time_ratio": ratio("ours", "diffusers"),
        "ours_vs_diffusers_overhead": round(ratio("ours", "diffusers") - 1, 4),
        "ours_vs_diffusers_per_image_time_ratio": ratio("ours", "diffusers_per_image"),
        "ours_vs_diffusers_per_image_overhead": round(ratio("ours", "diffusers_per_image") - 1, 4),
        # On a shared CPU this process's CPU time is steadier than wall time (others' load shows less).
        "ours_vs_diffusers_process_cpu_ratio": ratio("ours", "diffusers", "median_process_cpu_seconds"),
    }
    compile_info = None
    if args.compile:
        compile_info = {
            "graphs_compiled_in_warmup": graphs_warmup,
            "graphs_compiled_in_timed_rounds": graphs_timed,
            "warmup_minus_median_seconds": {n: round(warmup[n] - results[n]["median_seconds"], 3) for n in names},
        }
    return {
        "switches": switches(args),
        "settings": {
            "model": args.model, "sampler": settings.sampler, "steps": settings.num_steps, "batch": args.batch,
            "height": settings.height, "width": settings.width, "eta": settings.eta,
            "guidance_scale": settings.guidance_scale, "cfg_unet_batch": 2 * args.batch if settings.guidance_scale > 1
            else args.batch, "repeats": args.repeats, "prompts": prompts,
            "variants": {
                "ours": "sample_trajectories(record=True): latents and log-probs of every step, per-image generators",
                "diffusers": "StableDiffusionPipeline.__call__, one torch.Generator, output_type='pt'",
                "diffusers_per_image": "StableDiffusionPipeline.__call__ with per-image generators (ours' noise)",
            },
        },
        "attention_processors": attention_processors(pipe.unet),
        "results": results,
        "overhead": overhead,
        "checks": checks,
        "compile": compile_info,
        "load_average": {"start": load_start, "end": load_average()},
    }


# ----------------------------------------------------------------------------------------------
# FLOPs


def _flop_context(device: torch.device):
    """FlopCounterMode has formulas for the CUDA attention kernels, not for the CPU flash kernel:
    on CPU count through SDPA's math path (the same matmuls)."""
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def unet_inputs(unet, batch: int, h: int, w: int, device, dtype):
    from rebel_diffusion.sampling import unwrap

    cfg = unwrap(unet).config
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    return x, t, ctx


def count_flops(fn, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with _flop_context(device), FlopCounterMode(display=False) as counter:
        fn()
    sync(device)
    return int(counter.get_total_flops())


def bench_flops(args, device: torch.device, pipe, settings_hw: tuple[int, int]) -> dict:
    """FLOPs of the UNet calls the sampler and the REBEL step make, at the measured shapes."""
    from rebel_diffusion.models import add_lora
    from rebel_diffusion.sampling import unwrap

    h, w = settings_hw
    lh, lw = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
    cfg_mult = 2 if args.guidance > 1 else 1
    unet = unwrap(pipe.unet)
    wdtype = DTYPES[args.dtype]
    sample_batch = cfg_mult * args.batch
    x, t, ctx = unet_inputs(unet, sample_batch, lh, lw, device, wdtype)
    with torch.no_grad():
        sample_call = count_flops(lambda: unet(x, t, encoder_hidden_states=ctx, return_dict=False), device)
    lat = torch.randn(1, unet.config.in_channels, lh, lw, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        vae_decode = count_flops(lambda: pipe.vae.decode(lat, return_dict=False), device)

    # The LoRA UNet as trained: micro-batch of p pairs = 2p images, doubled by CFG.
    lora_unet = copy.deepcopy(unet)
    add_lora(lora_unet, rank=args.lora_rank, alpha=float(args.lora_rank))
    lora_unet.train()
    train_batch = cfg_mult * 2 * args.train_micro_batch
    x, t, ctx = unet_inputs(lora_unet, train_batch, lh, lw, device, wdtype)
    autocast = autocast_for(device, args.dtype)

    def fwd():
        with torch.no_grad(), autocast():
            lora_unet(x, t, encoder_hidden_states=ctx, return_dict=False)

    def fwd_bwd():
        with autocast():
            out = lora_unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    train_fwd = count_flops(fwd, device)
    train_fwd_bwd = count_flops(fwd_bwd, device)
    return {
        "switches": switches(args),
        "method": "torch.utils.flop_counter.FlopCounterMode, one call at the measured shape "
                  + ("(CPU: SDPA counted through its math path)" if device.type == "cpu" else ""),
        "latent": [unet.config.in_channels, lh, lw],
        "sampling_unet_batch": sample_batch,
        "sampling_unet_call_flops": sample_call,
        "unet_forward_flops_per_image": sample_call // sample_batch,
        "vae_decode_flops_per_image": vae_decode,
        "train_unet_batch": train_batch,
        "train_lora_forward_flops": train_fwd,
        "train_lora_forward_backward_flops": train_fwd_bwd,
        "backward_to_forward_ratio": round((train_fwd_bwd - train_fwd) / train_fwd, 3),
        "notes": "sampling FLOPs/image = steps x sampling_unet_call_flops / batch (UNet only; the VAE decode and text "
                 "encoder are left out of MFU). A REBEL step off-policy = T x (2P images' no-graph forward "
                 "+ P/p micro-batch forward+backward); the naive step = T x P/p forward+backward.",
    }


def sampling_flops(flops: dict, args, results: dict, device: torch.device) -> dict:
    per_image = args.steps * flops["sampling_unet_call_flops"] / args.batch
    out = {"unet_flops_per_image": per_image, "per_variant": {}}
    for name, r in results.items():
        achieved = per_image * r["images_per_s"]
        out["per_variant"][name] = {
            "achieved_tflops": round(achieved / 1e12, 4),
            "mfu": round(achieved / (args.peak_tflops * 1e12), 4) if device.type == "cuda" else None,
        }
    return out


def ours_mode(steps_per_pass: int) -> str:
    """Result key of rebel_accumulate at a --steps-per-pass value: ours (1), ours_spp10, ..."""
    return "ours" if steps_per_pass == 1 else f"ours_spp{steps_per_pass}"


def mode_steps_per_pass(mode: str) -> int:
    return int(mode.removeprefix("ours_spp")) if mode.startswith("ours_spp") else 1


def training_flops(flops: dict, args, T: int, mode: str) -> dict:
    micro = args.train_micro_batch
    n_micro = args.train_pairs // micro
    fwd_bwd = T * n_micro * flops["train_lora_forward_backward_flops"]
    rescore = T * n_micro * flops["train_lora_forward_flops"] if mode.startswith("ours") else 0  # no graph
    return {"gradient_flops": fwd_bwd, "rescore_flops": rescore, "executed_flops": fwd_bwd + rescore}


# ----------------------------------------------------------------------------------------------
# Training: one REBEL optimizer step, ours vs naive


def naive_accumulate(unet, scheduler, traj, pairs, targets, *, eta, train_batch_size, steps, autocast):
    """The textbook REBEL step: every trained step's graph held, one backward per micro-batch.

    loss = sum_p rho_p^2 / P with rho = (1/eta)(D(y) - D(y')) - target and D the whole-trajectory
    log-ratio; the same gradient as ``rebel_accumulate`` (steps = all stochastic ones, scale 1).
    """
    from rebel_diffusion.rebel import rebel_residual
    from rebel_diffusion.sampling import step_log_prob

    num_pairs = len(pairs)
    device = traj.latents.device
    losses = []
    for chunk in torch.arange(num_pairs).split(train_batch_size):
        index = torch.cat([pairs[chunk, 0], pairs[chunk, 1]])
        total = None
        for j in steps:
            with autocast():
                logp = step_log_prob(unet, scheduler, traj, j, index=index).float()
            total = logp if total is None else total + logp
        old = traj.log_probs[index.to(traj.log_probs.device)][:, steps].sum(dim=1).to(total.device)
        ratio_a, ratio_b = (total - old).split(len(chunk))
        rho = rebel_residual(ratio_a, ratio_b, targets[chunk].to(device).float(), eta)
        loss = rho.pow(2).sum() / num_pairs
        loss.backward()
        losses.append(float(loss.detach()))
    return {"loss": sum(losses)}


class MemoryMeter:
    """Peak memory of one region over the memory just before it (CUDA allocator, or process RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None

    @staticmethod
    def _status_kib(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
            return
        try:  # Linux: writing 5 resets the peak-RSS mark (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        rss = self._status_kib("VmRSS")
        if rss is not None:
            self.base = rss * 1024
            self.method = ("peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS before the step" if self.hwm_reset
                           else "peak RSS (VmHWM, NOT reset: includes earlier peaks) - RSS before the step")
        else:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.hwm_reset = False
            self.method = "ru_maxrss growth (earlier peaks hide growth below them)"

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            extra = {"peak_reserved_mib": round(torch.cuda.max_memory_reserved(self.device) / MIB, 1)}
        else:
            hwm = self._status_kib("VmHWM")
            if hwm is not None and self.method and self.method.startswith("peak RSS"):
                peak = hwm * 1024
            else:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            extra = {"hwm_reset": self.hwm_reset}
        return {
            "method": self.method,
            "baseline_mib": round(self.base / MIB, 1),
            "peak_mib": round(peak / MIB, 1),
            "peak_growth_mib": round(max(peak - self.base, 0) / MIB, 1),
            **extra,
        }


class TrainBench:
    """A LoRA UNet, ready to time REBEL steps on trajectories of any length T."""

    def __init__(self, spec: dict):
        from rebel_diffusion.models import add_lora

        self.spec = spec
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.device = torch.device(spec["device"])
        self.pipe = build_pipeline(spec["model"], spec["dtype"], self.device)
        apply_attention(self.pipe, spec["attention"])
        add_lora(self.pipe.unet, rank=spec["lora_rank"], alpha=float(spec["lora_rank"]))
        self.params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        self.unet = prepare_unet(self.pipe.unet, spec)
        self.autocast = autocast_for(self.device, spec["dtype"])
        self.graphs_first_step = None  # dynamo graphs after the first step of the first run

    def trajectories(self, T: int):
        from rebel_diffusion.sampling import SamplingSettings, sample_trajectories

        s = self.spec
        settings = SamplingSettings(num_steps=T, eta=s["eta"], guidance_scale=s["guidance"],
                                    height=s["resolution"], width=s["resolution"]).resolve(self.pipe)
        self.unet.eval()
        with self.autocast():
            traj = sample_trajectories(self.pipe, prompt_list(s["pairs"]), images_per_prompt=2, seed=s["seed"],
                                       settings=settings, unet=self.unet, batch_size=s["sample_batch"], record=True)
        self.unet.train()
        return traj

    def run(self, T: int, mode: str) -> dict:
        from rebel_diffusion.rebel import pair_indices
        from rebel_diffusion.sampling import make_scheduler
        from rebel_diffusion.updates import rebel_accumulate

        s, device = self.spec, self.device
        g0 = dynamo_graphs()
        t0 = time.perf_counter()
        traj = self.trajectories(T)
        sync(device)
        sample_seconds = time.perf_counter() - t0
        pairs = pair_indices(traj.group)
        targets = torch.randn(len(pairs), generator=torch.Generator().manual_seed(s["seed"]))
        scheduler = make_scheduler(self.pipe, traj.settings, device=device)
        steps = [j for j in range(len(traj.timesteps)) if traj.stochastic[j]]
        optimizer = torch.optim.AdamW(self.params, lr=1e-4)

        def one_step():
            if mode.startswith("ours"):
                stats = rebel_accumulate(self.unet, scheduler, traj, pairs, targets, eta=1.0,
                                         train_batch_size=s["micro_batch"], steps=steps, on_policy=False,
                                         steps_per_pass=mode_steps_per_pass(mode), autocast=self.autocast)
            else:
                stats = naive_accumulate(self.unet, scheduler, traj, pairs, targets, eta=1.0,
                                         train_batch_size=s["micro_batch"], steps=steps, autocast=self.autocast)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            return stats

        out = {
            "T": T, "method": mode, "pairs": len(pairs), "micro_batch_pairs": s["micro_batch"],
            "trained_steps": len(steps), "trajectory_mib": round(traj.latents.numel() * 4 / MIB, 2),
            "trajectory_sample_seconds": round(sample_seconds, 3),
            "steps_per_pass": mode_steps_per_pass(mode) if mode.startswith("ours") else None,
            "unet_graphs_held_at_once": 1 if mode.startswith("ours") else len(steps),
            "on_policy": False if mode.startswith("ours") else None,
        }
        meter = MemoryMeter(device)
        try:
            meter.start()
            t0 = time.perf_counter()
            stats = one_step()
            first = time.perf_counter() - t0
            out["memory"] = meter.stop()
            if self.graphs_first_step is None:
                self.graphs_first_step = dynamo_graphs()
            times, cpu_times = [], []
            for _ in range(s["repeats"]):
                t0, c0 = time.perf_counter(), time.process_time()
                one_step()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        except torch.cuda.OutOfMemoryError:
            out["memory"] = meter.stop()
            out.update(oom=True, error="CUDA out of memory")
            optimizer.zero_grad(set_to_none=True)
            return out  # the caller collects and empties the cache
        med = statistics.median(times) if times else first
        out.update(
            oom=False,
            first_step_seconds=round(first, 4),
            step_seconds=[round(t, 4) for t in times],
            median_step_seconds=round(med, 4),
            pairs_per_s=round(len(pairs) / med, 4),
            # This process's CPU seconds per step: steadier than wall time on a shared CPU.
            median_step_process_cpu_seconds=round(statistics.median(cpu_times), 4) if cpu_times else None,
            loss=float(stats["loss"]),
            graphs_compiled=graph_delta(g0, dynamo_graphs()) if s.get("compile") else None,
        )
        return out


def worker_spec(args) -> dict:
    return {
        "model": args.model, "device": args.device, "dtype": args.dtype, "resolution": args.resolution,
        "guidance": args.guidance, "eta": args.eta, "seed": args.seed, "threads": args.threads,
        "pairs": args.train_pairs, "micro_batch": args.train_micro_batch, "sample_batch": args.batch,
        "repeats": args.train_repeats, "lora_rank": args.lora_rank, "attention": args.attention,
        "channels_last": bool(args.channels_last), "compile": bool(args.compile), "compile_mode": args.compile_mode,
    }


def run_worker_subprocess(spec: dict, T: int, mode: str) -> dict:
    job = json.dumps({**spec, "T": T, "mode": mode})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_train-worker", job],
                       capture_output=True, text=True, cwd=REPO)
    for line in r.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            result = json.loads(line[len(WORKER_TAG):])
            result["process_seconds"] = round(time.perf_counter() - t0, 2)
            return result
    tail = (r.stderr or r.stdout)[-2000:]
    oom = r.returncode in (-9, 137)
    return {"T": T, "method": mode, "error": f"worker exited {r.returncode}", "oom": oom, "stderr_tail": tail}


def train_worker_main(job_json: str) -> int:
    job = json.loads(job_json)
    result = TrainBench(job).run(job["T"], job["mode"])
    result["load_average"] = load_average()
    print(WORKER_TAG + json.dumps(result), flush=True)
    return 0


def gradient_check(args, device: torch.device) -> dict:
    """ours vs naive gradient on one T=2 trajectory (same weights, same step)."""
    from rebel_diffusion.rebel import pair_indices
    from rebel_diffusion.sampling import make_scheduler
    from rebel_diffusion.updates import rebel_accumulate

    spec = {**worker_spec(args), "compile": False, "pairs": 2, "micro_batch": 1, "sample_batch": 4}
    bench = TrainBench(spec)
    traj = bench.trajectories(2)
    pairs = pair_indices(traj.group)
    targets = torch.tensor([0.7, -0.4])[: len(pairs)]
    scheduler = make_scheduler(bench.pipe, traj.settings, device=device)
    steps = [j for j in range(len(traj.timesteps)) if traj.stochastic[j]]
    with torch.no_grad():  # move off-policy so the residual has a log-ratio part
        for p in bench.params:
            p.add_(1e-3 * torch.randn_like(p))
    grads = []
    for fn in (rebel_accumulate, naive_accumulate):
        kwargs = {"on_policy": False} if fn is rebel_accumulate else {}
        fn(bench.unet, scheduler, traj, pairs, targets, eta=1.0, train_batch_size=1, steps=steps,
           autocast=bench.autocast, **kwargs)
        grads.append(torch.cat([p.grad.flatten().float() for p in bench.params]))
        for p in bench.params:
            p.grad = None
    ours, naive = grads
    rel = float((ours - naive).norm() / naive.norm().clamp_min(1e-30))
    return {"T": 2, "pairs": len(pairs), "relative_l2_difference": rel, "naive_grad_norm": float(naive.norm())}


def bench_training(args, device: torch.device, flops: dict | None) -> dict:
    isolation = args.train_isolation
    if isolation == "auto":
        isolation = "inprocess" if device.type == "cuda" else "subprocess"
    spec = worker_spec(args)
    load_start = load_average()
    ours_modes = [ours_mode(m) for m in args.steps_per_pass]
    results = {**{m: {} for m in ours_modes}, "naive": {}}
    bench = TrainBench(spec) if isolation == "inprocess" else None
    if bench is not None:
        print(f"  attention processors: {attention_processors(bench.unet)}", flush=True)
    jobs = [(m, T) for m in ours_modes for T in args.train_steps] + [("naive", T) for T in args.naive_steps]
    naive_oom = False
    for mode, T in jobs:
        if mode == "naive" and naive_oom:
            results[mode][str(T)] = {"T": T, "method": mode, "skipped": "a smaller T ran out of memory"}
            continue
        r = bench.run(T, mode) if bench is not None else run_worker_subprocess(spec, T, mode)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if flops and not r.get("oom") and "median_step_seconds" in r:
            f = training_flops(flops, args, T, mode)
            for key in ("executed", "gradient"):
                achieved = f[f"{key}_flops"] / r["median_step_seconds"]
                f[f"{key}_tflops"] = round(achieved / 1e12, 4)
                f[f"{key}_mfu"] = round(achieved / (args.peak_tflops * 1e12), 4) if device.type == "cuda" else None
            r["flops"] = f
        results[mode][str(T)] = r
        naive_oom = naive_oom or (mode == "naive" and bool(r.get("oom")))
        mem = r.get("memory", {}).get("peak_growth_mib")
        print(f"  {mode:10s} T={T:3d}: " + (f"{r['pairs_per_s']:.3f} pairs/s, " if "pairs_per_s" in r else "")
              + (f"peak +{mem} MiB" if mem is not None else "") + (" OOM" if r.get("oom") else "")
              + (f" {r['error']}" if r.get("error") and not r.get("oom") else ""), flush=True)
    compile_info = None
    if bench is not None and args.compile:
        compile_info = {"graphs_after_first_step": bench.graphs_first_step, "graphs_at_end": dynamo_graphs(),
                        "recompiles_after_first_step": graph_delta(bench.graphs_first_step or {}, dynamo_graphs())}
    del bench
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def growth(mode):
        return {T: r["memory"]["peak_growth_mib"] for T, r in results[mode].items() if "memory" in r and not r.get("oom")}

    growths = {m: growth(m) for m in [*ours_modes, "naive"]}
    summary = {
        **{f"{m}_peak_growth_mib": g for m, g in growths.items()},
        **{f"{m}_pairs_per_s": {T: r.get("pairs_per_s") for T, r in results[m].items()} for m in results},
        "naive_oom_at_T": [int(T) for T, r in results["naive"].items() if r.get("oom")],
    }
    for m in ours_modes:
        g = growths[m]
        if len(g) >= 2:
            summary[f"{m}_peak_max_over_min"] = round(max(g.values()) / max(min(g.values()), 1e-9), 3)
        if m != "ours":  # speed-up of m steps per UNet pass over one, per T
            summary[f"{m}_speedup_over_ours"] = {
                T: round(r["pairs_per_s"] / results["ours"][T]["pairs_per_s"], 3)
                for T, r in results[m].items()
                if r.get("pairs_per_s") and results.get("ours", {}).get(T, {}).get("pairs_per_s")
            }
    for name, g in growths.items():
        if len(g) >= 2:
            xs = [int(T) for T in g]
            ys = list(g.values())
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mx) ** 2 for x in xs)
            summary[f"{name}_peak_slope_mib_per_step"] = round(
                sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 3) if var else None
    return {
        "switches": switches(args),
        "settings": {
            "model": args.model, "pairs_per_step": args.train_pairs, "micro_batch_pairs": args.train_micro_batch,
            "unet_batch_per_micro_batch": (2 if args.guidance > 1 else 1) * 2 * args.train_micro_batch,
            "images_per_pair_group": 2, "lora_rank": args.lora_rank, "lora_alpha": float(args.lora_rank),
            "optimizer": "AdamW lr 1e-4", "eta": 1.0, "guidance_scale": args.guidance,
            "resolution": args.resolution, "timed_repeats_after_first": args.train_repeats,
            "isolation": isolation,
            "ours": "rebel_accumulate(on_policy=False): no-graph re-scoring of all 2P images x T steps, then one "
                    "backward per micro-batch and step; + optimizer.step",
            "ours_sppM": "the same with M steps per UNet pass (the trainer's --steps-per-pass M): M times fewer, "
                         "M times larger UNet calls, in the re-scoring pass too",
            "steps_per_pass": args.steps_per_pass,
            "naive": "all T steps' graphs of a micro-batch held, one backward per micro-batch; + optimizer.step",
            "memory": "peak growth of the FIRST step (includes AdamW state) over the memory just before it; "
                      "pairs/s from the median of the timed steps after it",
        },
        "results": results,
        "summary": summary,
        "compile": compile_info,
        "load_average": {"start": load_start, "end": load_average()},
    }


# ----------------------------------------------------------------------------------------------
# Rewards


def bench_reward_section(args, device: torch.device, model_size: int) -> dict:
    import bench_rewards

    names = ["jpeg-compressibility", "jpeg-incompressibility"] + (["aesthetic", "clip"] if args.all_rewards else [])
    sizes = args.reward_sizes or sorted({512, model_size})
    load_start = load_average()
    results = {}
    for size in sizes:
        images = bench_rewards.photo_like(args.reward_batch, size).to(device)
        prompts = [f"a photo of animal number {i}" for i in range(args.reward_batch)]
        for name in names:
            if name in ("aesthetic", "clip") and size != max(sizes):
                continue  # resized to 224 inside: one size is enough
            options = {"device": device, "dtype": args.dtype}
            if name in ("aesthetic", "clip"):
                options["clip_pretrained"] = "random"
            if name == "aesthetic":
                options["aesthetic_head"] = "random"
            r = bench_rewards.bench_one(name, options, images, prompts, args.reward_repeats)
            results[f"{name}@{size}"] = {"reward": name, "image_size": size, **r}
            print(f"  {name:24s} @{size}: {r['images_per_s']:.2f} images/s", flush=True)
    return {
        "switches": {"dtype": args.dtype},
        "settings": {"batch": args.reward_batch, "repeats": args.reward_repeats, "sizes": sizes,
                     "images": "bench_rewards.photo_like (smooth colour fields + grain)",
                     "clip_weights": "random ViT-L-14 and head" if args.all_rewards else None},
        "results": results,
        "load_average": {"start": load_start, "end": load_average()},
    }


# ----------------------------------------------------------------------------------------------
# A whole epoch through the recipe


@contextlib.contextmanager
def _builtin_sd15_random():
    """Let ``train.setup`` load 'sd15-random' (the benchmark's random-weight SD-1.5)."""
    from rebel_diffusion import train

    original = train.load_pipeline

    def load(model, *, dtype=torch.float32, device="cpu"):
        if model == "sd15-random":
            return build_pipeline("sd15-random", "bf16" if dtype == torch.bfloat16 else "fp32", torch.device(device))
        return original(model, dtype=dtype, device=device)

    train.load_pipeline = load
    try:
        yield
    finally:
        train.load_pipeline = original


def bench_epoch(args, device: torch.device) -> dict:
    from rebel_diffusion.config import TrainConfig
    from rebel_diffusion.train import setup, train_epoch

    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="rebel-bench-") as tmp:
        cfg = TrainConfig(
            model=args.model, num_steps=args.steps, ddim_eta=args.eta, guidance_scale=args.guidance,
            resolution=args.resolution, reward="jpeg-compressibility", prompts="simple_animals",
            images_per_prompt=2, prompts_per_batch=args.batch // 2, batches_per_epoch=args.epoch_images // args.batch,
            train_batch_size=args.train_micro_batch, gradient_accumulation_steps=args.train_pairs // args.train_micro_batch,
            lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank), epochs=args.epochs,
            mixed_precision="bf16" if args.dtype == "bf16" else "no", xformers=args.attention == "xformers",
            timestep_fraction=args.timestep_fraction, seed=args.seed, output_dir=str(Path(tmp) / "run"),
        )
        cfg.validate()
        t0 = time.perf_counter()
        with _builtin_sd15_random():
            run = setup(cfg)
        setup_seconds = time.perf_counter() - t0
        if args.attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            run.accelerator.unwrap_model(run.unet).set_attn_processor(AttnProcessor2_0())
        run.unet = prepare_unet(run.unet, args)
        steps_per_pass = run.steps_per_pass
        epochs = []
        for epoch in range(1, args.epochs + 1):
            g0 = dynamo_graphs()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            m = train_epoch(run, epoch)
            sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            row = {k: m[k] for k in ("images", "images_per_second", "sample_seconds", "train_seconds",
                                     "optimizer_steps", "pairs", "reward_mean", "rescore_drift") if k in m}
            row.update(epoch=epoch, wall_seconds=round(wall, 3), process_cpu_seconds=round(cpu, 3),
                       load_average=load_average())
            if args.compile:
                row["graphs_compiled"] = graph_delta(g0, dynamo_graphs())
            epochs.append(row)
            print(f"  epoch {epoch}: {m['images_per_second']:.3f} images/s (sample {m['sample_seconds']:.1f}s, "
                  f"train {m['train_seconds']:.1f}s)", flush=True)
        del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steady = epochs[-1]
    return {
        "switches": switches(args),
        "settings": {k: getattr(cfg, k) for k in (
            "model", "num_steps", "ddim_eta", "guidance_scale", "resolution", "reward", "prompts",
            "images_per_prompt", "prompts_per_batch", "batches_per_epoch", "train_batch_size",
            "gradient_accumulation_steps", "lora_rank", "mixed_precision", "timestep_fraction", "rescore_check")},
        "steps_per_pass": steps_per_pass,  # the trainer's default on this device
        "images_per_epoch": cfg.images_per_epoch(),
        "optimizer_steps_per_epoch": cfg.optimizer_steps_per_epoch(),
        "setup_seconds": round(setup_seconds, 2),
        "epochs": epochs,
        "images_per_s": steady["images_per_second"],
        "images_per_s_note": "the last epoch (the first includes warm-up); train_epoch's images / (sample + score "
                             "+ normalise + re-score check + update) seconds",
        "load_average": {"start": load_start, "end": load_average()},
    }


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = parse_args(argv)
    if args.train_worker:
        sys.exit(train_worker_main(args.train_worker))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else default_out(device, args.out_dir)
    t_start = time.perf_counter()
    report = {
        "benchmark": "bench",
        "schema": 1,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "git": git_state(),
        "device": device_info(device),
        "versions": versions(device),
        "switches": switches(args),
        "settings": {k: v for k, v in vars(args).items() if k != "train_worker"},
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "peak_tflops_note": "dense bf16 peak (H100/H200 ~790 TFLOP/s on a large matmul); "
                            "MFU only on CUDA" if device.type == "cuda" else "CPU: achieved TFLOP/s only, no MFU",
    }
    print(f"bench: {args.model} on {report['device']['name']} ({device}, {args.dtype}), sections "
          f"{','.join(args.sections)}, load {report['device']['load_average_start']}", flush=True)

    def save():
        report["device"]["load_average_end"] = load_average()
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, out)

    pipe = None
    size = None
    if {"sampling", "flops"} & set(args.sections) or "rewards" in args.sections:
        t0 = time.perf_counter()
        pipe = build_pipeline(args.model, args.dtype, device)
        apply_attention(pipe, args.attention)
        report["settings"]["pipeline_build_seconds"] = round(time.perf_counter() - t0, 2)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        size = args.resolution or native
        report["settings"]["resolution_resolved"] = size
    flops = None
    if "flops" in args.sections:
        print("flops ...", flush=True)
        flops = bench_flops(args, device, pipe, (size, size))
        report["flops"] = flops
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if "sampling" in args.sections:
        print("sampling ...", flush=True)
        pipe.unet = prepare_unet(pipe.unet, args)
        report["sampling"] = bench_sampling(args, device, pipe)
        if flops:
            report["sampling"]["flops"] = sampling_flops(flops, args, report["sampling"]["results"], device)
        save()
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "training" in args.sections:
        print("training ...", flush=True)
        if flops is None and device.type == "cuda":
            print("  (no flops section: no MFU)", flush=True)
        report["training"] = bench_training(args, device, flops)
        report["training"]["gradient_check"] = gradient_check(args, device)
        print(f"  gradient check ours vs naive: relative L2 difference "
              f"{report['training']['gradient_check']['relative_l2_difference']:.2e}", flush=True)
        save()
    if "rewards" in args.sections:
        print("rewards ...", flush=True)
        report["rewards"] = bench_reward_section(args, device, size)
        save()
    if "epoch" in args.sections:
        print("epoch ...", flush=True)
        report["epoch"] = bench_epoch(args, device)
        save()
    save()
    print_summary(report)
    print(f"wrote {out}")
    return report


def print_summary(report: dict) -> None:
    if "sampling" in report:
        s = report["sampling"]
        r = s["results"]
        print(f"sampling: ours {r['ours']['images_per_s']:.3f} images/s, diffusers {r['diffusers']['images_per_s']:.3f}, "
              f"diffusers per-image {r['diffusers_per_image']['images_per_s']:.3f}; ours/diffusers time ratio "
              f"{s['overhead']['ours_vs_diffusers_time_ratio']:.3f} (process CPU "
              f"{s['overhead']['ours_vs_diffusers_process_cpu_ratio']:.3f})")
    if "training" in report:
        sm = report["training"]["summary"]
        for m in report["training"]["results"]:
            print(f"training {m}: pairs/s {sm[f'{m}_pairs_per_s']}, peak growth MiB {sm[f'{m}_peak_growth_mib']}")
    if "rewards" in report:
        print("rewards: " + ", ".join(f"{k} {v['images_per_s']:.2f}/s" for k, v in report["rewards"]["results"].items()))
    if "epoch" in report:
        print(f"epoch: {report['epoch']['images_per_s']:.3f} images/s")


if __name__ == "__main__":
    main()
