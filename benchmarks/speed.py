"""One benchmark command: sampling, REBEL training speed and memory, rewards, a whole epoch, FLOPs.

Measures on the device it runs on, for one model, and writes ONE JSON (device, versions, load
average, every setting and figure; each section records the switches it ran with), by default
``benchmarks/results/bench_<device>_<date>.json``:

  sampling  images/s of the plain diffusers pipeline's ``__call__`` (SD or SDXL; one generator, and
            per-image generators) vs our ``sample_trajectories(record=True)`` with log-probs: same
            steps, batch, eta and guidance; one warm-up call each, then interleaved rounds (the
            order rotates). Overhead = median time of ours / diffusers - 1.
  flops     UNet FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (``benchmarks.flops``):
            one sampling forward (CFG doubles the batch), one LoRA forward and one LoRA
            forward+backward at the training micro-batch, and a VAE decode. Used for achieved
            TFLOP/s (and MFU on a GPU, against ``--peak-tflops``, dense bf16).
  training  one REBEL optimizer step per T in ``--train-steps``, ours vs the naive full-graph step:
            pairs/s and peak memory growth (``benchmarks.training_memory``; on a CPU each (T,
            method) runs in a fresh spawned process, so its peak RSS is its own).
  rewards   images/s of each weight-free reward (jpeg-*); with ``--all-rewards`` also aesthetic and
            clip with a random-weight ViT-L/14 (``benchmarks.rewards``' helpers).
  epoch     ``rebel_diffusion.training.recipe.setup`` + ``train_epoch`` (sample, score, train) with a
            TrainConfig (reward jpeg-compressibility, output in a temporary folder): images/s
            per epoch; the first epoch includes warm-up (and compilation).

``--model`` is any ``load_pipeline`` name: ``tiny`` (default) or the built-in ``sd15-random`` (the
SD-1.5 architecture with random weights, 512x512) among them. Switches: ``--dtype bf16|fp32``,
``--channels-last``, ``--compile`` (torch.compile of the UNet; compile time and dynamo graph counts
per phase are recorded), ``--sdpa`` / ``--xformers``.

Run from the repository root:
  # CPU, tiny model (a few minutes on two busy cores)
  python -m benchmarks.speed
  # GPU, SD-1.5 architecture with random weights at 512x512 (see benchmarks/README.md)
  python -m benchmarks.speed --model sd15-random --device cuda --dtype bf16 --all-rewards --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import env, rewards, sampler
from benchmarks.common import (
    DTYPES,
    apply_attention,
    attention_processors,
    build_pipeline,
    dynamo_graphs,
    empty_cache,
    graph_delta,
    prepare_unet,
    switches,
    sync,
)
from benchmarks.flops import bench_flops, sampling_flops
from benchmarks.training_memory import bench_training, gradient_check

SECTIONS = ("sampling", "flops", "training", "rewards", "epoch")
# Options that must be >= 1.
POSITIVE = "steps batch repeats train_micro_batch train_pairs lora_rank reward_batch reward_repeats".split()
POSITIVE += ["epoch_images", "epochs"]


# ----------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument(
        "--naive-steps",
        default=None,
        help="T of the naive full-graph step (default: --train-steps on CPU, 1,2,4,10 on CUDA; "
        "stops at the first out-of-memory); 'none' to skip",
    )
    p.add_argument("--train-micro-batch", type=int, default=2, help="pairs per forward/backward")
    p.add_argument(
        "--steps-per-pass",
        default=None,
        help="the trainer's --steps-per-pass values to time (default: 1,10 on CPU, 1,5 on CUDA)",
    )
    p.add_argument("--train-pairs", type=int, default=None, help="pairs per optimizer step (default 2 micro-batches)")
    p.add_argument(
        "--train-repeats", type=int, default=None, help="timed steps after the first (default 1 CPU, 2 GPU)"
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--train-isolation",
        default="auto",
        choices=["auto", "subprocess", "inprocess"],
        help="auto: a fresh (spawned) process per (T, method) on CPU (honest peak RSS), in-process on CUDA",
    )
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
    args = p.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    defaults = dict(
        steps=(50, 10),
        batch=(8, 4),
        repeats=(3, 3),
        train_repeats=(2, 1),
        reward_batch=(64, 8),
        reward_repeats=(10, 2),
        epoch_images=(32, 8),
    )
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
    for name in POSITIVE:
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
            p.error(
                f"--epoch-images {args.epoch_images} gives {args.epoch_images // 2} pairs, not a multiple of "
                f"--train-pairs {args.train_pairs}"
            )
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


# ----------------------------------------------------------------------------------------------
# Sampling


def bench_sampling(args, device: torch.device, pipe) -> dict:
    from rebel_diffusion.sampling import SamplingSettings

    settings = SamplingSettings(
        num_steps=args.steps,
        ddim_eta=args.eta,
        guidance_scale=args.guidance,
        height=args.resolution,
        width=args.resolution,
    ).resolve(pipe)
    prompts = sampler.load_prompts(args.batch)
    variants = sampler.make_variants(
        pipe, prompts, settings, device, seed=args.seed, variants=("ours", "diffusers", "diffusers_per_image")
    )
    load_start = env.load_average()

    warmup, images, graphs_warmup = {}, {}, {}
    for name, fn in variants.items():
        g0 = dynamo_graphs()
        warmup[name], _, _, images[name] = sampler.timed(fn, device)
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
        for n in names[r % len(names) :] + names[: r % len(names)]:
            seconds, cpu_seconds, peak, _ = sampler.timed(variants[n], device)
            times[n].append(seconds)
            cpu_times[n].append(cpu_seconds)
            if peak is not None:
                peaks[n].append(peak)
        print(
            f"  sampling round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
            flush=True,
        )
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
            "model": args.model,
            "sampler": settings.sampler,
            "steps": settings.num_steps,
            "batch": args.batch,
            "height": settings.height,
            "width": settings.width,
            "eta": settings.ddim_eta,
            "guidance_scale": settings.guidance_scale,
            "cfg_unet_batch": 2 * args.batch if settings.guidance_scale > 1 else args.batch,
            "repeats": args.repeats,
            "prompts": prompts,
            "variants": {
                "ours": (
                    "sample_trajectories(record=True): latents and log-probs of every step, per-image generators"
                ),
                "diffusers": f"{type(pipe).__name__}.__call__, one torch.Generator, output_type='pt'",
                "diffusers_per_image": f"{type(pipe).__name__}.__call__ with per-image generators (ours' noise)",
            },
        },
        "attention_processors": attention_processors(pipe.unet),
        "results": results,
        "overhead": overhead,
        "checks": checks,
        "compile": compile_info,
        "load_average": {"start": load_start, "end": env.load_average()},
    }


# ----------------------------------------------------------------------------------------------
# Rewards


def bench_reward_section(args, device: torch.device, model_size: int) -> dict:
    names = ["jpeg-compressibility", "jpeg-incompressibility"] + (["aesthetic", "clip"] if args.all_rewards else [])
    sizes = args.reward_sizes or sorted({512, model_size})
    load_start = env.load_average()
    results = {}
    for size in sizes:
        images = rewards.photo_like(args.reward_batch, size).to(device)
        prompts = [f"a photo of animal number {i}" for i in range(args.reward_batch)]
        for name in names:
            if name in ("aesthetic", "clip") and size != max(sizes):
                continue  # resized to 224 inside: one size is enough
            options = {"device": device, "dtype": args.dtype}
            if name in ("aesthetic", "clip"):
                options["clip_pretrained"] = "random"
            if name == "aesthetic":
                options["aesthetic_head"] = "random"
            r = rewards.bench_one(name, options, images, prompts, args.reward_repeats)
            results[f"{name}@{size}"] = {"reward": name, "image_size": size, **r}
            print(f"  {name:24s} @{size}: {r['images_per_s']:.2f} images/s", flush=True)
    return {
        "switches": {"dtype": args.dtype},
        "settings": {
            "batch": args.reward_batch,
            "repeats": args.reward_repeats,
            "sizes": sizes,
            "images": "benchmarks.rewards.photo_like (smooth colour fields + grain)",
            "clip_weights": "random ViT-L-14 and head" if args.all_rewards else None,
        },
        "results": results,
        "load_average": {"start": load_start, "end": env.load_average()},
    }


# ----------------------------------------------------------------------------------------------
# A whole epoch through the recipe


def bench_epoch(args, device: torch.device) -> dict:
    from rebel_diffusion.config import TrainConfig
    from rebel_diffusion.training.recipe import cleanup, setup, train_epoch

    load_start = env.load_average()
    with tempfile.TemporaryDirectory(prefix="rebel-bench-") as tmp:
        cfg = TrainConfig(
            model=args.model,
            num_steps=args.steps,
            ddim_eta=args.eta,
            guidance_scale=args.guidance,
            resolution=args.resolution,
            reward="jpeg-compressibility",
            prompts="simple_animals",
            images_per_prompt=2,
            prompts_per_batch=args.batch // 2,
            batches_per_epoch=args.epoch_images // args.batch,
            train_batch_size=2 * args.train_micro_batch,  # images of the micro-batch's pairs (k = 2)
            gradient_accumulation_steps=args.train_pairs // args.train_micro_batch,
            lora_rank=args.lora_rank,
            lora_alpha=float(args.lora_rank),
            epochs=args.epochs,
            mixed_precision="bf16" if args.dtype == "bf16" else "no",
            xformers=args.attention == "xformers",
            timestep_fraction=args.timestep_fraction,
            seed=args.seed,
            output_dir=str(Path(tmp) / "run"),
        )
        cfg.validate()
        t0 = time.perf_counter()
        run = setup(cfg)  # any load_pipeline model, the built-in sd15-random included
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
            row = {
                k: m[k]
                for k in (
                    "images",
                    "images_per_second",
                    "sample_seconds",
                    "train_seconds",
                    "optimizer_steps",
                    "pairs",
                    "reward_mean",
                    "rescore_drift",
                )
                if k in m
            }
            row.update(
                epoch=epoch,
                wall_seconds=round(wall, 3),
                process_cpu_seconds=round(cpu, 3),
                load_average=env.load_average(),
            )
            if args.compile:
                row["graphs_compiled"] = graph_delta(g0, dynamo_graphs())
            epochs.append(row)
            print(
                f"  epoch {epoch}: {m['images_per_second']:.3f} images/s (sample {m['sample_seconds']:.1f}s, "
                f"train {m['train_seconds']:.1f}s)",
                flush=True,
            )
        cleanup(run)
        del run
    gc.collect()
    empty_cache(device)
    steady = epochs[-1]
    return {
        "switches": switches(args),
        "settings": {
            k: getattr(cfg, k)
            for k in (
                "model",
                "num_steps",
                "ddim_eta",
                "guidance_scale",
                "resolution",
                "reward",
                "prompts",
                "images_per_prompt",
                "prompts_per_batch",
                "batches_per_epoch",
                "train_batch_size",
                "gradient_accumulation_steps",
                "lora_rank",
                "mixed_precision",
                "timestep_fraction",
                "rescore_check",
            )
        },
        "steps_per_pass": steps_per_pass,  # the trainer's default on this device
        "images_per_epoch": cfg.images_per_epoch(),
        "optimizer_steps_per_epoch": cfg.optimizer_steps_per_epoch(),
        "setup_seconds": round(setup_seconds, 2),
        "epochs": epochs,
        "images_per_s": steady["images_per_second"],
        "images_per_s_note": (
            "the last epoch (the first includes warm-up); train_epoch's images / "
            "(sample + score + normalise + re-score check + update) seconds"
        ),
        "load_average": {"start": load_start, "end": env.load_average()},
    }


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else env.default_out("bench", device, args.out_dir)
    t_start = time.perf_counter()
    environment = env.record(device)
    report = {
        "benchmark": "bench",
        "schema": 1,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.speed", *(sys.argv[1:] if argv is None else argv)]),
        "git": environment["git"],
        "device": env.device_info(device),
        "versions": environment["versions"],
        "env": environment,
        "switches": switches(args),
        "settings": dict(vars(args)),
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "peak_tflops_note": "dense bf16 peak (H100/H200 ~790 TFLOP/s on a large matmul); MFU only on CUDA"
        if device.type == "cuda"
        else "CPU: achieved TFLOP/s only, no MFU",
    }
    print(
        f"bench: {args.model} on {report['device']['name']} ({device}, {args.dtype}), sections "
        f"{','.join(args.sections)}, load {report['device']['load_average_start']}",
        flush=True,
    )

    def save():  # after every section: a run cut short still leaves what it measured
        report["device"]["load_average_end"] = env.load_average()
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        env.write_json(out, report)

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
        empty_cache(device)
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
    empty_cache(device)
    if "training" in args.sections:
        print("training ...", flush=True)
        if flops is None and device.type == "cuda":
            print("  (no flops section: no MFU)", flush=True)
        report["training"] = bench_training(args, device, flops)
        report["training"]["gradient_check"] = gradient_check(args, device)
        print(
            f"  gradient check ours vs naive: relative L2 difference "
            f"{report['training']['gradient_check']['relative_l2_difference']:.2e}",
            flush=True,
        )
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
        print(
            f"sampling: ours {r['ours']['images_per_s']:.3f} images/s, "
            f"diffusers {r['diffusers']['images_per_s']:.3f}, "
            f"diffusers per-image {r['diffusers_per_image']['images_per_s']:.3f}; ours/diffusers time ratio "
            f"{s['overhead']['ours_vs_diffusers_time_ratio']:.3f} (process CPU "
            f"{s['overhead']['ours_vs_diffusers_process_cpu_ratio']:.3f})"
        )
    if "training" in report:
        sm = report["training"]["summary"]
        for m in report["training"]["results"]:
            speed, peak = sm[f"{m}_pairs_per_s"], sm[f"{m}_peak_growth_mib"]
            print(f"training {m}: pairs/s {speed}, peak growth MiB {peak}")
    if "rewards" in report:
        print(
            "rewards: " + ", ".join(f"{k} {v['images_per_s']:.2f}/s" for k, v in report["rewards"]["results"].items())
        )
    if "epoch" in report:
        print(f"epoch: {report['epoch']['images_per_s']:.3f} images/s")


if __name__ == "__main__":
    main()
