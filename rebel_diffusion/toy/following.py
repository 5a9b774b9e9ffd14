"""Prompt following on the toy testbed, read two independent ways from a sample's pixels.

A toy caption names three attributes: a shape, its colour and the background colour. A sample
follows its caption when all three are right. Two readers decide that:

- ``classifier``: the ``toy-alignment`` reward's CNN, its most likely value of each attribute;
- ``pixels``: no learned weights. The background is the palette colour nearest to most pixels of the
  one-pixel border (every toy shape keeps a pixel of margin); the shape's colour is the palette colour
  most pixels inside the border take, other than the background; the shape is the one whose rendered
  mask (any centre and size the data generator draws) overlaps the pixels of that colour best (IoU).

The two disagree on a blurry, half-formed or two-coloured sample; a rate both agree on is a
measurement, and where they differ the grids say which is right. ``follow_rates`` gives, for each
caption set, the fraction of samples all right under each reader.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .data import IMAGE_SIZE, SHAPES, _coverage, palette, parse_caption


@lru_cache(maxsize=1)
def _templates(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks of every shape at every whole-pixel centre and radius the generator can draw.

    Returns masks (N, size*size) float32 and their shape ids (N,) long.
    """
    masks, ids = [], []
    for s in range(len(SHAPES)):
        for r in torch.arange(5.0, 12.5, 1.0):
            lo, hi = int(torch.ceil(r + 1)), int(size - r - 1)
            centres = torch.arange(lo, hi + 1, dtype=torch.float32)
            cy, cx = torch.meshgrid(centres, centres, indexing="ij")
            cx, cy = cx.flatten(), cy.flatten()
            shape = torch.full((len(cx),), s)
            cover = _coverage(shape, cx, cy, torch.full_like(cx, float(r)), size)  # (n, size, size)
            masks.append((cover > 0.5).float().flatten(1))
            ids.append(shape)
    return torch.cat(masks), torch.cat(ids)


def read_pixels(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The shape, colour and background ids a toy image shows. (B, 3, 32, 32) in [0, 1] -> {(B,) long}.

    ``colour`` and ``shape`` are -1 where no pixel inside the border differs from the background.
    """
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"toy images are {IMAGE_SIZE}x{IMAGE_SIZE}, got {tuple(images.shape[-2:])}")
    pal = palette()  # (K, 3)
    x = images.float().cpu().clamp(0, 1)
    labels = torch.cdist(x.permute(0, 2, 3, 1).reshape(len(x), -1, 3), pal.expand(len(x), -1, -1)).argmin(-1)
    labels = labels.view(len(x), IMAGE_SIZE, IMAGE_SIZE)  # (B, S, S) nearest palette colour per pixel
    border = torch.cat([labels[:, 0], labels[:, -1], labels[:, 1:-1, 0], labels[:, 1:-1, -1]], dim=1)
    background = border.mode(dim=1).values  # (B,)
    inner = labels[:, 1:-1, 1:-1].flatten(1)  # (B, (S-2)^2)
    counts = torch.stack([(inner == k).sum(1) for k in range(len(pal))], dim=1)  # (B, K)
    counts[torch.arange(len(x)), background] = -1
    colour = counts.argmax(1)
    found = counts.max(1).values > 0
    masks, ids = _templates()
    fg = (labels == colour.view(-1, 1, 1)).float().flatten(1)  # (B, S*S)
    inter = fg @ masks.T  # (B, N)
    iou = inter / (fg.sum(1, keepdim=True) + masks.sum(1) - inter).clamp(min=1)
    shape = ids[iou.argmax(1)]
    minus = torch.full_like(colour, -1)
    return {
        "shape": torch.where(found, shape, minus),
        "colour": torch.where(found, colour, minus),
        "background": background,
    }


def read_classifier(classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The toy classifier's most likely shape, colour and background. (B, 3, 32, 32) -> {(B,) long}."""
    with torch.no_grad():
        logits = classifier(images.float().to(next(classifier.parameters()).device))
    return {k: v.argmax(-1).cpu() for k, v in logits.items()}


def all_right(read: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """1.0 where the shape, its colour and the background are the prompted ones. -> (B,) float32.

    Every prompt must name all three (toy captions do); ``ValueError`` otherwise.
    """
    wanted = []
    for p in prompts:
        ids = parse_caption(p)
        if None in ids:
            raise ValueError(f"prompt following needs a caption naming a shape, its colour and a background: {p!r}")
        wanted.append(ids)
    want = torch.tensor(wanted)  # (B, 3)
    got = torch.stack([read["shape"], read["colour"], read["background"]], dim=1)
    return (got == want).all(dim=1).float()


def follow_rates(images: torch.Tensor, prompts: list[str], classifier) -> dict[str, float]:
    """Fraction of ``images`` whose three attributes are right, per reader: {'classifier', 'pixels'}."""
    return {reader: float(right.mean()) for reader, right in _right(images, prompts, classifier).items()}


def follow_rates_by_caption(images: torch.Tensor, prompts: list[str], classifier) -> dict[str, dict[str, float]]:
    """``follow_rates`` of each caption's images: {caption: {'classifier', 'pixels'}}, in first-seen order."""
    right = _right(images, prompts, classifier)
    out = {}
    for text in dict.fromkeys(prompts):
        mine = torch.tensor([p == text for p in prompts])
        out[text] = {reader: float(r[mine].mean()) for reader, r in right.items()}
    return out


def _right(images: torch.Tensor, prompts: list[str], classifier) -> dict[str, torch.Tensor]:
    """{reader: (B,) 1.0 where all three attributes are right}."""
    return {
        "classifier": all_right(read_classifier(classifier, images), prompts),
        "pixels": all_right(read_pixels(images), prompts),
    }
