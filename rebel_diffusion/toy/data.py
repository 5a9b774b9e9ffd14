"""Seeded synthetic shapes: one coloured shape on a background of another colour, with its caption.

The training data of the built-in ``toy`` model and of its attribute classifier (the
``toy-alignment`` reward). Everything here is a pure function of its arguments and seed::

    images, labels, captions = make_batch(64, seed=0)    # (64, 3, 32, 32) in [0, 1]
    captions[0]                                           # 'a red circle on a blue background'
    labels["shape"][0], labels["colour"][0], labels["background"][0]   # ids into SHAPES / COLOURS

Shapes are rendered analytically with 4x4 supersampling (anti-aliased edges, no PIL drawing), so a
batch of thousands takes milliseconds. Captions follow one template, ``CAPTION_TEMPLATE``.

The (shape, colour, background) combinations are split once, deterministically: ``heldout_combos()``
holds one background per (shape, colour) pair (32 of 224), never shown to the diffusion model in
training, so prompt following is measured on captions it has not seen. Every single attribute and
every (shape, colour) and (colour, background) pair still occurs in ``train_combos()``.
"""

from __future__ import annotations

import re

import torch

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
# Named colours far apart in RGB (0-255), so each name is unambiguous even in a blurry sample.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
CAPTION_TEMPLATE = "{a} {colour} {shape} on {a_bg} {background} background"
# Shape half-extent (radius) in pixels of a 32x32 image: 12 to 22 px across, always fully inside.
SIZE_RANGE = (6.0, 11.0)
_SUPERSAMPLE = 4
# Words that mean the same attribute in free-form prompts (parse_caption).
_SHAPE_SYNONYMS = {
    "circle": "circle",
    "circles": "circle",
    "disc": "circle",
    "disk": "circle",
    "square": "square",
    "squares": "square",
    "box": "square",
    "triangle": "triangle",
    "triangles": "triangle",
    "cross": "cross",
    "crosses": "cross",
    "plus": "cross",
}
_COLOUR_SYNONYMS = {**{c: c for c in COLOUR_NAMES}, "violet": "purple"}
_BACKGROUND_WORDS = ("background", "backdrop", "ground")


# ----------------------------------------------------------------------------------------------
# Combinations and captions


def all_combos() -> list[tuple[int, int, int]]:
    """Every (shape, colour, background) id triple with background != colour: 4 * 8 * 7 = 224."""
    n_col = len(COLOUR_NAMES)
    return [(s, c, b) for s in range(len(SHAPES)) for c in range(n_col) for b in range(n_col) if b != c]


def _heldout_background(shape: int, colour: int) -> int:
    # One background per (shape, colour) pair, cycling so every background is held out about
    # equally often; the offset 1..7 never equals the shape's own colour.
    n_col = len(COLOUR_NAMES)
    return (colour + 1 + (2 * shape + colour) % (n_col - 1)) % n_col


def heldout_combos() -> list[tuple[int, int, int]]:
    """The 32 combinations kept out of the diffusion model's training data (for evaluation)."""
    return [(s, c, _heldout_background(s, c)) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))]


def train_combos() -> list[tuple[int, int, int]]:
    """The 192 combinations the diffusion model is trained on: ``all_combos()`` minus held-out."""
    held = set(heldout_combos())
    return [t for t in all_combos() if t not in held]


def caption(shape: int, colour: int, background: int) -> str:
    """``'a red circle on a blue background'`` (``'an orange ...'``) for attribute ids."""
    col, bg = COLOUR_NAMES[colour], COLOUR_NAMES[background]
    return CAPTION_TEMPLATE.format(a=_article(col), colour=col, shape=SHAPES[shape], a_bg=_article(bg), background=bg)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_caption(text: str) -> tuple[int | None, int | None, int | None]:
    """(shape, colour, background) ids named by a free-form prompt; ``None`` where not named.

    The shape's colour is the colour word nearest before the shape word (else the first colour
    word not used for the background); the background colour is the one followed by
    "background"/"backdrop", or introduced by "on a"/"on" after the shape. Case, punctuation
    and plurals are ignored: ``"A RED circle, on blue background."`` -> (circle, red, blue).
    """
    words = re.findall(r"[a-z]+", text.lower())
    shape_pos = next((i for i, w in enumerate(words) if w in _SHAPE_SYNONYMS), None)
    shape = SHAPES.index(_SHAPE_SYNONYMS[words[shape_pos]]) if shape_pos is not None else None
    colour_pos = [i for i, w in enumerate(words) if _COLOUR_SYNONYMS.get(w)]

    background = bg_pos = None
    for i in colour_pos:
        after = words[i + 1 : i + 3]
        follows_on = i >= 1 and "on" in words[max(0, i - 2) : i] and (shape_pos is None or i > shape_pos)
        if any(w in _BACKGROUND_WORDS for w in after) or follows_on:
            bg_pos = i
            break
    if bg_pos is not None:
        background = COLOUR_NAMES.index(_COLOUR_SYNONYMS[words[bg_pos]])

    rest = [i for i in colour_pos if i != bg_pos]
    before = [i for i in rest if shape_pos is not None and i < shape_pos]
    pick = before[-1] if before else (rest[0] if rest else None)
    colour = COLOUR_NAMES.index(_COLOUR_SYNONYMS[words[pick]]) if pick is not None else None
    return shape, colour, background


# ----------------------------------------------------------------------------------------------
# Sampling attributes and rendering


def sample_attributes(
    n: int, seed: int, combos: list[tuple[int, int, int]] | None = None, *, size: int = IMAGE_SIZE
) -> dict[str, torch.Tensor]:
    """Draw ``n`` shapes: ids uniformly from ``combos`` (default all), size and position uniformly.

    Returns ``shape``, ``colour``, ``background`` (n,) int64 ids, ``combo`` (n,) index into
    ``combos``, and ``cx``, ``cy``, ``radius`` (n,) float32 in pixels (x right, y down).
    """
    combos = all_combos() if combos is None else combos
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(len(combos), (n,), generator=g)
    triples = torch.tensor(combos, dtype=torch.int64)[idx]  # (n, 3)
    scale = size / IMAGE_SIZE
    lo, hi = SIZE_RANGE[0] * scale, SIZE_RANGE[1] * scale
    radius = lo + (hi - lo) * torch.rand(n, generator=g)
    margin = radius + 1.0 * scale  # keep the whole shape (and a pixel of border) inside
    cx = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    return {
        "shape": triples[:, 0],
        "colour": triples[:, 1],
        "background": triples[:, 2],
        "combo": idx,
        "cx": cx,
        "cy": cy,
        "radius": radius,
    }


def _inside(shape: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the points (dx, dy) from the centre inside shape ``shape`` of radius ``r``."""
    name = SHAPES[shape]
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "square":  # side 1.7 r: about the circle's area
        return (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    if name == "triangle":  # upright: apex at -r, base at +0.8 r, base half-width 1.05 r
        t = (dy + r) / (1.8 * r)
        return (t >= 0) & (t <= 1) & (dx.abs() <= 1.05 * r * t)
    arm = 0.35 * r  # cross ("plus"): arms of width 0.7 r
    return ((dx.abs() <= r) & (dy.abs() <= arm)) | ((dx.abs() <= arm) & (dy.abs() <= r))


def _coverage(shape: torch.Tensor, cx, cy, r, size: int) -> torch.Tensor:
    """Fraction of each pixel inside the shape, by supersampling. Returns (B, size, size)."""
    k = _SUPERSAMPLE
    sub = (torch.arange(size * k, dtype=torch.float32) + 0.5) / k  # sub-pixel centres, in pixels
    y, x = sub.view(1, -1, 1), sub.view(1, 1, -1)
    inside = torch.zeros(len(shape), size * k, size * k)
    for s in range(len(SHAPES)):  # one shape at a time: only its own mask is computed
        sel = (shape == s).nonzero().squeeze(1)
        if len(sel):
            dx, dy = x - cx[sel].view(-1, 1, 1), y - cy[sel].view(-1, 1, 1)  # (b, S, S)
            inside[sel] = _inside(s, dx, dy, r[sel].view(-1, 1, 1)).float()
    return torch.nn.functional.avg_pool2d(inside.unsqueeze(1), k).squeeze(1)


def palette() -> torch.Tensor:
    """The named colours as a (len(COLOURS), 3) float tensor in [0, 1]."""
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0


def render(attrs: dict[str, torch.Tensor], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images of ``attrs`` (from ``sample_attributes``). Returns (B, 3, size, size) in [0, 1]."""
    alpha = _coverage(attrs["shape"], attrs["cx"], attrs["cy"], attrs["radius"], size).unsqueeze(1)
    pal = palette()
    fg = pal[attrs["colour"]].view(-1, 3, 1, 1)
    bg = pal[attrs["background"]].view(-1, 3, 1, 1)
    return alpha * fg + (1 - alpha) * bg  # (B, 3, size, size)


def make_batch(
    n: int, seed: int, combos: list[tuple[int, int, int]] | None = None, *, size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """``n`` seeded images with their labels and captions.

    Returns images (n, 3, size, size) in [0, 1], the labels of ``sample_attributes`` and captions.
    """
    attrs = sample_attributes(n, seed, combos, size=size)
    caps = [
        caption(s, c, b)
        for s, c, b in zip(attrs["shape"].tolist(), attrs["colour"].tolist(), attrs["background"].tolist())
    ]
    return render(attrs, size), attrs, caps


def to_pil(images: torch.Tensor) -> list:
    """PIL images of a (B, 3, H, W) [0, 1] batch."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def prompt_lines(split: str) -> list[str]:
    """Captions of a split, ``'train'`` or ``'heldout'``: the lines of the two toy prompt files."""
    combos = {"train": train_combos, "heldout": heldout_combos}[split]()
    return [caption(*t) for t in combos]
