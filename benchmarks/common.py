"""Helpers shared by the speed benchmark's sections: dtypes, switches, autocast, torch.compile counters.

Not a benchmark itself: ``benchmarks.speed``, ``benchmarks.flops`` and ``benchmarks.training_memory``
import it.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


def switches(args) -> dict:
    """The speed switches a figure was measured with."""
    return {
        "dtype": args.dtype,
        "channels_last": bool(args.channels_last),
        "compile": bool(args.compile),
        "compile_mode": args.compile_mode if args.compile else None,
        "attention": args.attention,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast_for(device: torch.device, dtype: str):
    """The training autocast: bf16 with fp32 LoRA weights and fp32 log-prob math, or none."""
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_pipeline(model: str, dtype: str, device: torch.device):
    """``load_pipeline(model)`` in ``dtype`` ('fp32' or 'bf16'): a built-in (tiny, sd15-random...) or any."""
    from rebel_diffusion.models import load_pipeline

    return load_pipeline(model, dtype=DTYPES[dtype], device=device)


def apply_attention(pipe, attention: str) -> None:
    """torch SDPA (``sdpa``) or xformers attention in the UNet; stops with one line if xformers is missing."""
    if attention == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise SystemExit(f"--xformers: not available ({str(e).strip().splitlines()[0][:200]})") from e
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())


def attention_processors(unet) -> list[str]:
    from rebel_diffusion.models.components import unwrap

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
