"""Reporting: captioned image grids, atomic PNG writes, the metrics log and the reward curve.

Used by the trainer (per-epoch grids, ``metrics.jsonl``, ``reward_curve.png``) and by ``sample``,
``eval`` and ``preview``. Everything works offline and headless (Pillow's bundled font,
matplotlib's Agg canvas without pyplot's global state).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..files import readable_as_umask

MIN_TILE = 128  # tiles are upscaled (nearest) to at least this many pixels so captions fit
FONT_SIZE = 11
MAX_CAPTION_LINES = 4
PAD = 4
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


# ----------------------------------------------------------------------------------------------
# Grids


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image. NaN becomes 0; values are clamped."""
    x = torch.nan_to_num(image.detach().float().cpu(), nan=0.0).clamp(0, 1)
    arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    # Pillow >= 10.1 bundles a scalable font; older ones fall back to the fixed bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to ``width`` pixels; long words are cut; at most MAX_CAPTION_LINES lines."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # A single word wider than the tile: cut it into pieces that fit.
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > MAX_CAPTION_LINES:
        lines = lines[:MAX_CAPTION_LINES]
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def make_grid(images: torch.Tensor, captions: list[str] | None = None, ncols: int | None = None) -> Image.Image:
    """Tile images into one RGB picture, with a wrapped caption under each tile.

    Args:
        images: (N, 3, H, W) float in [0, 1] (clamped; NaN shows as black).
        captions: N strings, or None for no caption rows.
        ncols: tiles per row (default ceil(sqrt(N))).

    Tiles smaller than ``MIN_TILE`` pixels are upscaled by an integer factor with nearest
    neighbour, so 32x32 samples stay crisp and captions have room.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    ncols = max(1, min(ncols or math.ceil(math.sqrt(n)), n))
    nrows = math.ceil(n / ncols)
    scale = max(1, math.ceil(MIN_TILE / min(h, w)))
    tw, th = w * scale, h * scale

    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(c, font, tw - 2 * PAD, measure) for c in captions] if captions else None
    line_h = _line_height(font)
    cap_h = (max(len(x) for x in wrapped) * line_h + 2 * PAD) if wrapped else 0

    grid = Image.new("RGB", (ncols * (tw + PAD) + PAD, nrows * (th + cap_h + PAD) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncols)
        x0, y0 = PAD + c * (tw + PAD), PAD + r * (th + cap_h + PAD)
        tile = to_pil(images[i])
        if scale > 1:
            tile = tile.resize((tw, th), Image.Resampling.NEAREST)
        grid.paste(tile, (x0, y0))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x0 + PAD, y0 + th + PAD + j * line_h), line, fill=TEXT, font=font)
    return grid


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom - min(top, 0)) + 2


# ----------------------------------------------------------------------------------------------
# Files


def _write_atomically(path: str | os.PathLike, write) -> Path:
    """``write(temp file beside path)``, then os.replace it onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    readable_as_umask(tmp)  # mkstemp makes 0600: teammates on a shared disk could not read it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_png(image: Image.Image | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``image`` (PIL, or a (3, H, W) tensor in [0, 1]) as PNG atomically: readers never see half a file."""
    if isinstance(image, torch.Tensor):
        image = to_pil(image)
    return _write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def _jsonable(value):
    """Tensors and numpy scalars -> plain Python numbers, recursively; NaN and inf -> None (null)."""
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (created with its folder when missing).

    Strict JSON: a non-finite float is written as null (``read_metrics`` gives it back as NaN). The
    line is written with a single write call and flushed to disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(record), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# Keys of runs written before the grid and the held-out evaluation got their own names.
RENAMED_KEYS = {"eval_reward_mean": "grid_reward_mean", "eval_reward_std": "grid_reward_std"}
RENAMED_PREFIX = ("eval/", "heldout/")


def _current_keys(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if k.startswith(RENAMED_PREFIX[0]):
            k = RENAMED_PREFIX[1] + k[len(RENAMED_PREFIX[0]) :]
        out[RENAMED_KEYS.get(k, k)] = v
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file in order; [] when it does not exist.

    A line that does not parse (a crash mid-write leaves a partial last line) is skipped with a
    warning rather than making the whole log unreadable. Keys of older runs read as today's
    (``eval/<name>`` as ``heldout/<name>``, ``eval_reward_mean`` as ``grid_reward_mean``).
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{n}: skipping a line that is not JSON", stacklevel=2)
            continue
        if isinstance(record, dict):  # null is a figure that was not finite (older runs wrote NaN)
            record = {k: float("nan") if v is None else v for k, v in record.items()}
            records.append(_current_keys(record))
    return records


def truncate_metrics(path: str | os.PathLike, last_epoch: int) -> None:
    """Drop the records with ``epoch > last_epoch`` (atomically), so a resumed run does not log twice.

    Records without an ``epoch`` key are kept. A missing file is left missing.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = [
        r for r in read_metrics(path) if not (isinstance(r.get("epoch"), (int, float)) and r["epoch"] > last_epoch)
    ]
    text = "".join(json.dumps(_jsonable(r), allow_nan=False) + "\n" for r in kept)  # NaN as null again
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Reward curve


def _series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that hold a finite number under ``key``."""
    xs, ys = [], []
    for r in metrics:
        v, e = r.get(key), r.get("epoch")
        if isinstance(v, (int, float)) and isinstance(e, (int, float)) and math.isfinite(v):
            xs.append(e)
            ys.append(float(v))
    return xs, ys


def component_keys(metrics: list[dict]) -> list[str]:
    """The ``reward/<name>`` keys (one per component of several rewards), in first-seen order."""
    return list(dict.fromkeys(k for r in metrics for k in r if k.startswith("reward/")))


def heldout_keys(metrics: list[dict]) -> list[str]:
    """The ``heldout/<name>`` keys present in ``metrics``, in first-seen order."""
    return list(dict.fromkeys(k for r in metrics for k in r if k.startswith("heldout/")))


def plot_reward_curve(metrics: list[dict], path: str | os.PathLike) -> Path:
    """Plot the training reward against the epoch and save a PNG atomically.

    Top panel: each epoch's batch ``reward_mean`` (its own prompts, so it moves with the prompt
    draw) with a band of +-2 standard errors (``reward_std / sqrt(images)``), and its trailing mean
    over ``TREND_EPOCHS`` epochs, which shows the trend through that noise. Below it
    ``grid_reward_mean`` on its own scale: the same prompts and seeds every epoch, so its change is
    the model's. One more panel per ``reward/<name>`` key (a component of several rewards) and per
    ``heldout/<name>`` key (held-out rewards and diversity live on different scales), with a band of
    +-2 standard errors where ``heldout_se/<name>`` is logged, so reward hacking (training reward
    up, the others down) is visible at a glance, and so is how far a few images a prompt move.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid = ["grid_reward_mean"] if _series(metrics, "grid_reward_mean")[0] else []
    extra = grid + component_keys(metrics) + heldout_keys(metrics)
    fig = Figure(figsize=(6.4, 3.2 + 1.8 * len(extra)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + len(extra), 1, sharex=True, squeeze=False)[:, 0]
    _plot_training(axes[0], metrics)
    for ax, key in zip(axes[1:], extra):
        xs, ys = _series(metrics, key)
        ax.plot(xs, ys, marker="o", ms=3, color="tab:orange" if key in grid else "tab:green")
        se = dict(zip(*_series(metrics, key.replace("heldout/", "heldout_se/", 1))))
        band = [(x, y, 2 * se[x]) for x, y in zip(xs, ys) if key.startswith("heldout/") and x in se]
        if band:  # +-2 standard errors of the held-out images' mean
            xb, yb, eb = zip(*band)
            lower, upper = [y - e for y, e in zip(yb, eb)], [y + e for y, e in zip(yb, eb)]
            ax.fill_between(xb, lower, upper, alpha=0.15, color="tab:green", label="+-2 standard errors")
            ax.legend(fontsize=8)
        ax.set_ylabel(key.replace("grid_reward_mean", "grid reward\n(fixed prompts, seeds)"), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


# Epochs in the top panel's trailing mean: a batch mean moves with its prompt draw (about +-0.04 on
# the toy quick start) as much as the model gains in 10 epochs; 5 epochs' mean halves that.
TREND_EPOCHS = 5


def _plot_training(ax, metrics: list[dict]) -> None:
    xs, mean = _series(metrics, "reward_mean")
    if xs:
        ax.plot(xs, mean, marker="o", ms=3, lw=0.8, alpha=0.5, label="batch mean", color="tab:blue")
        std, images = (dict(zip(*_series(metrics, key))) for key in ("reward_std", "images"))
        band = [(e, m, 2 * std[e] / math.sqrt(images[e])) for e, m in zip(xs, mean) if e in std and images.get(e)]
        if band:
            ax.fill_between(
                [b[0] for b in band],
                [b[1] - b[2] for b in band],
                [b[1] + b[2] for b in band],
                alpha=0.15,
                color="tab:blue",
                label="+-2 standard errors",
            )
        if len(xs) > 2:
            ax.plot(
                xs, trailing_mean(mean, TREND_EPOCHS), lw=2.2, color="navy", label=f"mean of {TREND_EPOCHS} epochs"
            )
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no reward logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
