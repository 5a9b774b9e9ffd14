"""Time our trajectory sampler against a plain diffusers ``StableDiffusionPipeline`` call.

Same model, prompts, step count, batch, eta and guidance, side by side in one process: one warm-up
call of each variant, then ``--repeats`` interleaved rounds (the order rotates every round so that
drift in a shared machine's load hits every variant alike). Reports the median images/s of each,
the overhead of our sampler over plain sampling, peak GPU memory on CUDA, and writes one JSON
(default ``benchmarks/results/sampler_<device>_<date>.json``).

Variants:
  ours                   sample_trajectories(record=True): latents and log-probs of every step,
                         per-image generators, decoded images.
  ours_no_record         sample_trajectories(record=False): the same without storing latents.
  diffusers              pipe(...) with one torch.Generator: the plain call.
  diffusers_per_image    pipe(...) with a list of per-image generators (the same noise as ours:
                         its images must equal ours up to numerics; ``image_max_abs_diff``).

Run from the repository root:
  python -m benchmarks.sampler --model tiny --steps 20 --batch 8 --repeats 3 --threads 1
  python -m benchmarks.sampler --model sd15-random --device cuda --dtype bfloat16 --steps 50 --batch 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import env

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = ("ours", "ours_no_record", "diffusers", "diffusers_per_image")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="built-in name (tiny, sd15-random, ...), folder, file or hub id")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="images per call (one per prompt)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, else float32")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sampler_<device>_<date>.json)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def load_prompts(n: int) -> list[str]:
    """``n`` prompts 'a photo of a <animal>' from the packaged simple_animals set, cycled."""
    from rebel_diffusion.prompts_io import load_prompts as load_set

    names = load_set("simple_animals")
    return [f"a photo of a {names[i % len(names)]}" for i in range(n)]


def make_variants(pipe, prompts, settings, device, *, seed: int = 0, variants=VARIANTS) -> dict:
    """The sampling calls to time, by name: each returns the (B, 3, H, W) images."""
    from rebel_diffusion.sampling import sample_trajectories

    seeds = [seed + i for i in range(len(prompts))]
    plain_kwargs = dict(
        num_inference_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale,
        eta=settings.ddim_eta,
        height=settings.height,
        width=settings.width,
        output_type="pt",
    )

    def ours(record):
        def run():
            return sample_trajectories(pipe, prompts, seeds=seeds, settings=settings, record=record).images

        return run

    def plain():
        return pipe(prompts, generator=torch.Generator(device).manual_seed(seed), **plain_kwargs).images

    def plain_per_image():
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        return pipe(prompts, generator=gens, **plain_kwargs).images

    table = {
        "ours": ours(True),
        "ours_no_record": ours(False),
        "diffusers": plain,
        "diffusers_per_image": plain_per_image,
    }
    wanted = [v.strip() for v in variants.split(",") if v.strip()] if isinstance(variants, str) else list(variants)
    unknown = [v for v in wanted if v not in table]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {list(table)}")
    return {name: table[name] for name in wanted}


def timed(fn, device: torch.device):
    """(wall seconds, process CPU seconds, peak CUDA bytes or None, output) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()  # each variant runs under its own torch.no_grad(), as in use
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, cpu_seconds, peak, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )

    from rebel_diffusion.models import load_pipeline
    from rebel_diffusion.sampling import SamplingSettings

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    build_s = time.perf_counter() - t0
    settings = SamplingSettings(
        num_steps=args.steps,
        ddim_eta=args.eta,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
    ).resolve(pipe)
    prompts = load_prompts(args.batch)
    variants = make_variants(pipe, prompts, settings, device, seed=args.seed, variants=args.variants)
    print(
        f"{args.model} on {env.device_name(device)} ({device}, {str(dtype).removeprefix('torch.')}), "
        f"{settings.sampler} {settings.num_steps} steps, batch {args.batch}, "
        f"{settings.height}x{settings.width}, "
        f"guidance {settings.guidance_scale}, eta {settings.ddim_eta}, threads {torch.get_num_threads()}",
        flush=True,
    )
    environment = env.record(device)

    # Warm-up (also the image check: per-image generators give ours and diffusers the same noise).
    images, warmup = {}, {}
    for name, fn in variants.items():
        warmup[name], _, _, images[name] = timed(fn, device)
    check = {}
    if "ours" in images and "diffusers_per_image" in images:
        check["image_max_abs_diff_ours_vs_diffusers_per_image"] = float(
            (images["ours"].float().cpu() - images["diffusers_per_image"].float().cpu()).abs().max()
        )
    if "ours" in images and "ours_no_record" in images:
        check["image_max_abs_diff_record_vs_no_record"] = float(
            (images["ours"].float().cpu() - images["ours_no_record"].float().cpu()).abs().max()
        )
    del images

    # Interleaved timed rounds; the order rotates each round.
    names = list(variants)
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}
    peaks = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            seconds, cpu_seconds, peak, _ = timed(variants[n], device)
            times[n].append(seconds)
            cpu_times[n].append(cpu_seconds)
            if peak is not None:
                peaks[n].append(peak)
        print(
            f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
            flush=True,
        )

    results = {}
    for n in names:
        med = statistics.median(times[n])
        results[n] = {
            "seconds": times[n],
            "warmup_seconds": warmup[n],
            "median_seconds": med,
            "process_cpu_seconds": cpu_times[n],
            "median_process_cpu_seconds": statistics.median(cpu_times[n]),
            "images_per_s": args.batch / med,
            "peak_gpu_memory_gib": max(peaks[n]) / 2**30 if peaks[n] else None,
        }
    # Overhead = median time ratio - 1 (wall clock). On a shared CPU the process CPU time is the
    # steadier figure (other processes' load shows in wall time, far less in our CPU time).
    overhead, overhead_cpu = {}, {}
    for base in ("diffusers", "diffusers_per_image"):
        for ours in ("ours", "ours_no_record"):
            if base in results and ours in results:
                key = f"{ours}_vs_{base}"
                overhead[key] = results[ours]["median_seconds"] / results[base]["median_seconds"] - 1
                overhead_cpu[key] = (
                    results[ours]["median_process_cpu_seconds"] / results[base]["median_process_cpu_seconds"] - 1
                )

    report = {
        "benchmark": "sampler",
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.sampler", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": environment["git"]["commit"],
        "git_dirty": environment["git"]["dirty"],
        "device": {
            "type": device.type,
            "name": env.device_name(device),
            "cpu_count": environment["cpu_count"],
            "cpu_affinity": environment["cpu_affinity"],
            "torch_threads": torch.get_num_threads(),
            "load_average": environment["load_average"],
        },
        "versions": environment["versions"],
        "env": environment,
        "settings": {
            "model": args.model,
            "dtype": str(dtype).removeprefix("torch."),
            "sampler": settings.sampler,
            "steps": settings.num_steps,
            "batch": args.batch,
            "height": settings.height,
            "width": settings.width,
            "eta": settings.ddim_eta,
            "guidance_scale": settings.guidance_scale,
            "repeats": args.repeats,
            "seed": args.seed,
            "prompts": prompts,
            "pipeline_build_seconds": build_s,
        },
        "results": results,
        "overhead": overhead,
        "overhead_process_cpu_time": overhead_cpu,
        "checks": check,
    }
    out = Path(args.out) if args.out else env.default_out("sampler", device)
    env.write_json(out, report)

    for n in names:
        r = results[n]
        mem = f", peak {r['peak_gpu_memory_gib']:.2f} GiB" if r["peak_gpu_memory_gib"] is not None else ""
        print(
            f"{n:20s} median {r['median_seconds']:.3f}s ({r['median_process_cpu_seconds']:.3f}s CPU)  "
            f"{r['images_per_s']:.2f} images/s{mem}"
        )
    for k, v in overhead.items():
        print(f"overhead {k}: {100 * v:+.1f}% wall, {100 * overhead_cpu[k]:+.1f}% process CPU time")
    for k, v in check.items():
        print(f"{k}: {v:.2e}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
