"""FLOP counts of the UNet calls that sampling and a REBEL step make, for achieved TFLOP/s and MFU.

``torch.utils.flop_counter.FlopCounterMode`` counts one call at the measured shape: a sampling
forward (CFG doubles the batch), a LoRA forward and a LoRA forward+backward at the training
micro-batch, and a VAE decode. Run as the ``flops`` section of ``benchmarks.speed``::

    python -m benchmarks.speed --sections flops,sampling,training
"""

from __future__ import annotations

import contextlib
import copy

import torch

from benchmarks.common import DTYPES, autocast_for, switches, sync


def _flop_context(device: torch.device):
    """FlopCounterMode has formulas for the CUDA attention kernels, not for the CPU flash kernel:
    on CPU count through SDPA's math path (the same matmuls)."""
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def unet_inputs(unet, batch: int, h: int, w: int, device, dtype):
    """Seeded random (latents, timesteps, conditioning kwargs) for one UNet call: the text
    embeddings, and for SDXL the pooled text and the six size numbers of an (8h x 8w) image."""
    from rebel_diffusion.models.components import is_sdxl, sdxl_time_ids, unwrap

    cfg = unwrap(unet).config
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    kwargs = {"encoder_hidden_states": ctx}
    if is_sdxl(unet):
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled_dim, generator=g).to(device, dtype),
            "time_ids": sdxl_time_ids(8 * h, 8 * w).expand(batch, 6).to(device, dtype),
        }
    return x, t, kwargs


def count_flops(fn, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with _flop_context(device), FlopCounterMode(display=False) as counter:
        fn()
    sync(device)
    return int(counter.get_total_flops())


def bench_flops(args, device: torch.device, pipe, settings_hw: tuple[int, int]) -> dict:
    """FLOPs of the UNet calls the sampler and the REBEL step make, at the measured shapes."""
    from rebel_diffusion.models import add_lora
    from rebel_diffusion.models.components import unwrap

    h, w = settings_hw
    lh, lw = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
    cfg_mult = 2 if args.guidance > 1 else 1
    unet = unwrap(pipe.unet)
    wdtype = DTYPES[args.dtype]
    sample_batch = cfg_mult * args.batch
    x, t, cond = unet_inputs(unet, sample_batch, lh, lw, device, wdtype)
    with torch.no_grad():
        sample_call = count_flops(lambda: unet(x, t, **cond, return_dict=False), device)
    lat = torch.randn(1, unet.config.in_channels, lh, lw, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        vae_decode = count_flops(lambda: pipe.vae.decode(lat, return_dict=False), device)

    # The LoRA UNet as trained: micro-batch of p pairs = 2p images, doubled by CFG.
    lora_unet = copy.deepcopy(unet)
    add_lora(lora_unet, rank=args.lora_rank, alpha=float(args.lora_rank))
    lora_unet.train()
    train_batch = cfg_mult * 2 * args.train_micro_batch
    x, t, cond = unet_inputs(lora_unet, train_batch, lh, lw, device, wdtype)
    autocast = autocast_for(device, args.dtype)

    def fwd():
        with torch.no_grad(), autocast():
            lora_unet(x, t, **cond, return_dict=False)

    def fwd_bwd():
        with autocast():
            out = lora_unet(x, t, **cond, return_dict=False)[0]
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
        "notes": (
            "sampling FLOPs/image = steps x sampling_unet_call_flops / batch (UNet only; the VAE decode "
            "and text encoder are left out of MFU). A REBEL step off-policy = T x (2P images' no-graph "
            "forward + P/p micro-batch forward+backward); the naive step = T x P/p forward+backward."
        ),
    }


def sampling_flops(flops: dict, args, results: dict, device: torch.device) -> dict:
    """UNet FLOPs per image and each sampling variant's achieved TFLOP/s (and MFU on CUDA)."""
    per_image = args.steps * flops["sampling_unet_call_flops"] / args.batch
    out = {"unet_flops_per_image": per_image, "per_variant": {}}
    for name, r in results.items():
        achieved = per_image * r["images_per_s"]
        out["per_variant"][name] = {
            "achieved_tflops": round(achieved / 1e12, 4),
            "mfu": round(achieved / (args.peak_tflops * 1e12), 4) if device.type == "cuda" else None,
        }
    return out


def training_flops(flops: dict, args, T: int, mode: str) -> dict:
    """FLOPs one REBEL optimizer step executes at T steps: gradient passes, plus the no-graph re-scoring."""
    micro = args.train_micro_batch
    n_micro = args.train_pairs // micro
    fwd_bwd = T * n_micro * flops["train_lora_forward_backward_flops"]
    rescore = T * n_micro * flops["train_lora_forward_flops"] if mode.startswith("ours") else 0  # no graph
    return {"gradient_flops": fwd_bwd, "rescore_flops": rescore, "executed_flops": fwd_bwd + rescore}
