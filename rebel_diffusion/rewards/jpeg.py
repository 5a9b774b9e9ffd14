"""``jpeg-incompressibility`` and ``jpeg-compressibility``: the JPEG size of each image (DDPO's tasks).

size = len(JPEG(uint8(image), quality=95)) / 1000, in kB; ``jpeg-compressibility`` is its negative.
The image is rounded to uint8 first, ``(x * 255).round().clamp(0, 255)``, as saving it would. No
weights. PIL releases the GIL while encoding, so a thread pool encodes the batch in parallel.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .base import Reward

JPEG_QUALITY = 95


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images as saved to a file.  # (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on the CPU"""
    x = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def jpeg_size(image: np.ndarray, quality: int = JPEG_QUALITY) -> int:
    """Bytes of one ``(H, W, 3)`` uint8 image encoded as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell()


class JpegIncompressibility(Reward):
    """JPEG size in kB (larger = more detail).  # (B, 3, H, W) -> (B,)"""

    name = "jpeg-incompressibility"
    units = "kB of JPEG at quality 95: more detail"
    sign = 1.0

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None):
        # The rounding to uint8 runs on `device` (a 4x smaller copy to the CPU); dtype is unused.
        super().__init__(device, dtype)
        self._pool: ThreadPoolExecutor | None = None

    def _load(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="jpeg")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sizes = list(self._pool.map(jpeg_size, to_uint8(images)))
        return self.sign * torch.tensor(sizes, dtype=torch.float32) / 1000.0


class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG size in kB (larger = simpler image).  # (B, 3, H, W) -> (B,)"""

    name = "jpeg-compressibility"
    units = "minus kB of JPEG at quality 95: smaller files"
    sign = -1.0
