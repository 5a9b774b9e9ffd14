"""An exponential moving average of the trainable weights (``--ema-decay``).

Kept in float32 beside the weights, updated after every optimizer step that was taken; the
checkpoints hold it, and the exported LoRA, the grids and the held-out figures use it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def ema_init(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The average's start: a float32 copy of each trainable tensor, on its device."""
    return {n: p.detach().float().clone() for n, p in params.items()}


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place, per tensor."""
    for name, value in params.items():
        ema[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)


@contextmanager
def ema_swapped_in(params: dict[str, torch.nn.Parameter], ema: dict[str, torch.Tensor] | None):
    """The EMA weights in place of ``params`` inside the block, the trained ones back after (None: no-op)."""
    if ema is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
