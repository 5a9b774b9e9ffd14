"""Speed and peak memory of one REBEL optimizer step against its trajectory length T.

For each T, ``rebel_accumulate`` (off-policy: the no-graph re-scoring pass, then one step's graph
at a time) at each ``--steps-per-pass`` value, and the naive full-graph step (every step's graph
held, one backward per micro-batch; the same gradient, checked on a T=2 trajectory by
``gradient_check``) whose peak grows with T. Peak memory is the growth of the first step over the
memory just before it: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, in one process; on a CPU the peak RSS (VmHWM, reset through
``/proc/self/clear_refs``) minus the RSS before the step, each (T, method) in a fresh process
(``measure_in_fresh_process``: a ``multiprocessing`` spawn context runs ``measure``), since a
process's RSS does not shrink back after an earlier, larger step.

Run as the ``training`` section of ``benchmarks.speed``::

    python -m benchmarks.speed --sections training --train-steps 10,20,50
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import time
import traceback
from pathlib import Path

import torch

from benchmarks import env
from benchmarks.common import (
    MIB,
    apply_attention,
    attention_processors,
    autocast_for,
    build_pipeline,
    dynamo_graphs,
    empty_cache,
    graph_delta,
    prepare_unet,
    switches,
    sync,
)
from benchmarks.flops import training_flops
from benchmarks.sampler import load_prompts


def ours_mode(steps_per_pass: int) -> str:
    """Result key of rebel_accumulate at a --steps-per-pass value: ours (1), ours_spp10, ..."""
    return "ours" if steps_per_pass == 1 else f"ours_spp{steps_per_pass}"


def mode_steps_per_pass(mode: str) -> int:
    return int(mode.removeprefix("ours_spp")) if mode.startswith("ours_spp") else 1


def naive_accumulate(unet, scheduler, traj, pairs, targets, *, eta, train_batch_size, steps, autocast):
    """The textbook REBEL step: every trained step's graph held, one backward per micro-batch.

    loss = sum_p rho_p^2 / P with rho = (1/eta)(D(y) - D(y')) - target and D the whole-trajectory
    log-ratio; the same gradient as ``rebel_accumulate`` (steps = all stochastic ones, scale 1).
    """
    from rebel_diffusion.algorithms.rebel import rebel_residual
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
            self.method = (
                "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS before the step"
                if self.hwm_reset
                else "peak RSS (VmHWM, NOT reset: includes earlier peaks) - RSS before the step"
            )
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
    """A LoRA UNet, ready to time REBEL steps on trajectories of any length T.

    ``spec`` (see ``worker_spec``) is a plain dict, so that a spawned process can rebuild it.
    """

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
        settings = SamplingSettings(
            num_steps=T,
            ddim_eta=s["eta"],
            guidance_scale=s["guidance"],
            height=s["resolution"],
            width=s["resolution"],
        ).resolve(self.pipe)
        self.unet.eval()
        with self.autocast():
            traj = sample_trajectories(
                self.pipe,
                load_prompts(s["pairs"]),
                images_per_prompt=2,
                seed=s["seed"],
                settings=settings,
                unet=self.unet,
                batch_size=s["sample_batch"],
                record=True,
            )
        self.unet.train()
        return traj

    def run(self, T: int, mode: str) -> dict:
        from rebel_diffusion.algorithms.rebel import pair_indices
        from rebel_diffusion.algorithms.updates import StepModel, rebel_accumulate
        from rebel_diffusion.sampling import make_scheduler

        s, device = self.spec, self.device
        g0 = dynamo_graphs()
        t0 = time.perf_counter()
        traj = self.trajectories(T)
        sync(device)
        sample_seconds = time.perf_counter() - t0
        pairs = pair_indices(traj.group)
        targets = torch.randn(len(pairs), generator=torch.Generator().manual_seed(s["seed"]))
        scheduler = make_scheduler(self.pipe, traj.settings, device=device)
        steps = traj.stochastic_steps()
        optimizer = torch.optim.AdamW(self.params, lr=1e-4)

        def one_step():
            if mode.startswith("ours"):
                stats = rebel_accumulate(
                    StepModel(
                        self.unet, scheduler, traj, steps_per_pass=mode_steps_per_pass(mode), autocast=self.autocast
                    ),
                    pairs,
                    targets,
                    eta=1.0,
                    train_batch_size=2 * s["micro_batch"],
                    steps=steps,
                    on_policy=False,
                )
            else:
                stats = naive_accumulate(
                    self.unet,
                    scheduler,
                    traj,
                    pairs,
                    targets,
                    eta=1.0,
                    train_batch_size=s["micro_batch"],
                    steps=steps,
                    autocast=self.autocast,
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            return stats

        out = {
            "T": T,
            "method": mode,
            "pairs": len(pairs),
            "micro_batch_pairs": s["micro_batch"],
            "trained_steps": len(steps),
            "trajectory_mib": round(traj.latents.numel() * 4 / MIB, 2),
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
    """What ``TrainBench`` needs from the command line, as a plain (picklable) dict."""
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "resolution": args.resolution,
        "guidance": args.guidance,
        "eta": args.eta,
        "seed": args.seed,
        "threads": args.threads,
        "pairs": args.train_pairs,
        "micro_batch": args.train_micro_batch,
        "sample_batch": args.batch,
        "repeats": args.train_repeats,
        "lora_rank": args.lora_rank,
        "attention": args.attention,
        "channels_last": bool(args.channels_last),
        "compile": bool(args.compile),
        "compile_mode": args.compile_mode,
    }


def measure(spec: dict, T: int, mode: str) -> dict:
    """One (T, method) measurement in this process: a fresh LoRA UNet, one timed REBEL step."""
    result = TrainBench(spec).run(T, mode)
    result["load_average"] = env.load_average()
    return result


def _measure_and_send(spec: dict, T: int, mode: str, conn) -> None:
    """The spawned process's body: ``measure``, its result (or the error) sent back through ``conn``."""
    try:
        conn.send({"result": measure(spec, T, mode)})
    except BaseException as e:  # report every failure, then exit non-zero
        oom = isinstance(e, MemoryError | torch.cuda.OutOfMemoryError)
        conn.send(
            {
                "error": f"{type(e).__name__}: {e}"[:500],
                "oom": oom,
                "traceback": traceback.format_exc()[-2000:],
            }
        )
        raise SystemExit(1) from None
    finally:
        conn.close()


def measure_in_fresh_process(spec: dict, T: int, mode: str) -> dict:
    """``measure(spec, T, mode)`` in a new interpreter (``multiprocessing`` spawn context).

    Peak RSS is per process and never falls back, so each configuration gets its own process: its
    figure is not hidden under an earlier, larger peak. A process killed by the kernel's
    out-of-memory killer (SIGKILL) is reported as ``oom``.
    """
    ctx = multiprocessing.get_context("spawn")  # not fork: a clean process, no copied parent memory
    receiver, sender = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_measure_and_send, args=(spec, T, mode, sender), name=f"train-memory-{mode}-T{T}")
    proc.start()
    sender.close()  # the child now holds the only writer: recv() ends when it exits
    try:
        message = receiver.recv()
    except EOFError:  # died without a word (killed)
        message = {}
    finally:
        receiver.close()
    proc.join()
    if "result" in message:
        return {**message["result"], "process_seconds": round(time.perf_counter() - t0, 2)}
    code = proc.exitcode
    return {
        "T": T,
        "method": mode,
        "error": message.get("error", f"worker exited {code}"),
        "oom": bool(message.get("oom")) or code in (-9, 137),
        "stderr_tail": message.get("traceback", ""),
    }


def gradient_check(args, device: torch.device) -> dict:
    """ours vs naive gradient on one T=2 trajectory (same weights, same step)."""
    from rebel_diffusion.algorithms.rebel import pair_indices
    from rebel_diffusion.algorithms.updates import StepModel, rebel_accumulate
    from rebel_diffusion.sampling import make_scheduler

    spec = {**worker_spec(args), "compile": False, "pairs": 2, "micro_batch": 1, "sample_batch": 4}
    bench = TrainBench(spec)
    traj = bench.trajectories(2)
    pairs = pair_indices(traj.group)
    targets = torch.tensor([0.7, -0.4])[: len(pairs)]
    scheduler = make_scheduler(bench.pipe, traj.settings, device=device)
    steps = traj.stochastic_steps()
    with torch.no_grad():  # move off-policy so the residual has a log-ratio part
        for p in bench.params:
            p.add_(1e-3 * torch.randn_like(p))
    grads = []
    for ours in (True, False):
        if ours:  # one pair's images a micro-batch
            model = StepModel(bench.unet, scheduler, traj, autocast=bench.autocast)
            rebel_accumulate(model, pairs, targets, eta=1.0, train_batch_size=2, steps=steps, on_policy=False)
        else:  # one pair a micro-batch
            naive_accumulate(
                bench.unet, scheduler, traj, pairs, targets, eta=1.0, train_batch_size=1, steps=steps,
                autocast=bench.autocast,
            )  # fmt: skip
        grads.append(torch.cat([p.grad.flatten().float() for p in bench.params]))
        for p in bench.params:
            p.grad = None
    ours, naive = grads
    rel = float((ours - naive).norm() / naive.norm().clamp_min(1e-30))
    return {
        "T": 2,
        "pairs": len(pairs),
        "relative_l2_difference": rel,
        "naive_grad_norm": float(naive.norm()),
    }


def _slope(points: dict) -> float | None:
    """Least-squares slope of {T: MiB}."""
    xs, ys = [int(T) for T in points], list(points.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 3) if var else None


def bench_training(args, device: torch.device, flops: dict | None) -> dict:
    """Every (method, T) of the command line; the section's JSON."""
    isolation = args.train_isolation
    if isolation == "auto":
        isolation = "inprocess" if device.type == "cuda" else "subprocess"
    spec = worker_spec(args)
    load_start = env.load_average()
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
        r = bench.run(T, mode) if bench is not None else measure_in_fresh_process(spec, T, mode)
        gc.collect()
        empty_cache(device)
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
        print(
            f"  {mode:10s} T={T:3d}: "
            + (f"{r['pairs_per_s']:.3f} pairs/s, " if "pairs_per_s" in r else "")
            + (f"peak +{mem} MiB" if mem is not None else "")
            + (" OOM" if r.get("oom") else "")
            + (f" {r['error']}" if r.get("error") and not r.get("oom") else ""),
            flush=True,
        )
    compile_info = None
    if bench is not None and args.compile:
        compile_info = {
            "graphs_after_first_step": bench.graphs_first_step,
            "graphs_at_end": dynamo_graphs(),
            "recompiles_after_first_step": graph_delta(bench.graphs_first_step or {}, dynamo_graphs()),
        }
    del bench
    gc.collect()
    empty_cache(device)

    def growth(mode):
        return {
            T: r["memory"]["peak_growth_mib"] for T, r in results[mode].items() if "memory" in r and not r.get("oom")
        }

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
            summary[f"{name}_peak_slope_mib_per_step"] = _slope(g)
    return {
        "switches": switches(args),
        "settings": {
            "model": args.model,
            "pairs_per_step": args.train_pairs,
            "micro_batch_pairs": args.train_micro_batch,
            "unet_batch_per_micro_batch": (2 if args.guidance > 1 else 1) * 2 * args.train_micro_batch,
            "images_per_pair_group": 2,
            "lora_rank": args.lora_rank,
            "lora_alpha": float(args.lora_rank),
            "optimizer": "AdamW lr 1e-4",
            "eta": 1.0,
            "guidance_scale": args.guidance,
            "resolution": args.resolution,
            "timed_repeats_after_first": args.train_repeats,
            "isolation": isolation,
            "ours": (
                "rebel_accumulate(on_policy=False): no-graph re-scoring of all 2P images x T steps, "
                "then one backward per micro-batch and step; + optimizer.step"
            ),
            "ours_sppM": (
                "the same with M steps per UNet pass (the trainer's --steps-per-pass M): M times fewer, "
                "M times larger UNet calls, in the re-scoring pass too"
            ),
            "steps_per_pass": args.steps_per_pass,
            "naive": ("all T steps' graphs of a micro-batch held, one backward per micro-batch; + optimizer.step"),
            "memory": "peak growth of the FIRST step (includes AdamW state) over the memory just before it; "
            "pairs/s from the median of the timed steps after it",
        },
        "results": results,
        "summary": summary,
        "compile": compile_info,
        "load_average": {"start": load_start, "end": env.load_average()},
    }
