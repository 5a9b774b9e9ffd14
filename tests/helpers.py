"""Small helpers several test files share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def smooth_images(b: int = 3, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Photo-like test images: upsampled noise plus grain.  # (B, 3, H, W) in [0, 1]"""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    return (x + 0.05 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)


def one_line(e: pytest.ExceptionInfo) -> str:
    """The message of a raised error, checked to be one line without a traceback."""
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg
