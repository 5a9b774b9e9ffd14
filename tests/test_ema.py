"""The exponential moving average of the trainable weights."""

from __future__ import annotations

import torch

from rebel_diffusion.training.ema import ema_init, ema_swapped_in, ema_update


def test_ema_update_closed_form():
    ema = {"w": torch.tensor([1.0, 2.0])}
    for value in (3.0, 5.0):
        ema_update(ema, {"w": torch.tensor([value, value])}, decay=0.75)
    # 0.75 * (0.75 * x0 + 0.25 * 3) + 0.25 * 5
    expected = 0.75 * (0.75 * torch.tensor([1.0, 2.0]) + 0.25 * 3.0) + 0.25 * 5.0
    assert torch.allclose(ema["w"], expected)


def test_the_average_is_swapped_in_and_the_weights_come_back():
    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    params = dict(layer.named_parameters())
    ema = ema_init(params)
    assert all(v.dtype == torch.float32 and v is not params[n] for n, v in ema.items())
    trained = {n: p.detach().clone() for n, p in params.items()}
    for v in ema.values():
        v.fill_(0.5)
    with ema_swapped_in(params, ema):
        assert all(torch.all(p == 0.5) for p in params.values())
    assert all(torch.equal(p.detach(), trained[n]) for n, p in params.items())
    with ema_swapped_in(params, None):  # no EMA: the weights themselves
        assert all(torch.equal(p.detach(), trained[n]) for n, p in params.items())
