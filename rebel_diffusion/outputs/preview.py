"""The preview page: a Gradio app to see what training did (``rebel-diffusion preview --run DIR``).

- Before/after: a prompt and a first seed give several seeds of the base model in one row and of
  the fine-tuned model in the row below (seed for seed the same starting noise), with the run's
  reward of each, its units and direction ("higher is better"), and the means.
- History: the run's per-epoch grids as a gallery to step through, and the reward curves
  (re-read from disk on each page load and on "Refresh", so a live run can be watched).

Gradio is an optional extra (``pip install 'rebel-diffusion[preview]'``) imported only here, inside
functions. Models load once, when the app is built. The server binds 127.0.0.1 unless ``--host``
or ``--share`` says otherwise.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import RunError, UsageError
from ..prompts_io import load_prompts
from ..sampling import settings_from_config
from . import run_folder
from .generation import Source, load_models, resolve_source, sample_images

DEFAULT_PROMPT = "a photo of an otter"
DISPLAY_MIN = 256  # small samples (32px tiny models) are upscaled, nearest, for the page
GAP = 8  # white pixels between the seeds of a strip
DEFAULT_NUM_SEEDS, MAX_NUM_SEEDS = 4, 8
INSTALL_HINT = "pip install 'rebel-diffusion[preview]'"


def import_gradio():
    """The gradio module, or a UsageError that says how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    try:
        import gradio
    except ImportError as e:
        raise UsageError(f"preview needs Gradio, which is not installed: {INSTALL_HINT}") from e
    return gradio


# ----------------------------------------------------------------------------------------------
# The before/after comparer (no Gradio in here: testable on its own)


class Comparer:
    """Base and fine-tuned pipelines, built once, and the reward that scores their images.

    ``compare(prompt, seed, num_seeds)`` samples the seeds ``seed, seed + 1, ...`` from each model
    (the same seed gives both the same starting noise): (base strip, fine-tuned strip, Markdown table
    of the rewards). Calls are serialised: a pipeline is not thread-safe.
    """

    def __init__(self, base_pipe, tuned_pipe, settings, reward=None):
        self.base_pipe, self.tuned_pipe = base_pipe, tuned_pipe
        self.settings = settings.resolve(tuned_pipe)
        self.reward = reward  # a Reward or None
        self._lock = threading.Lock()

    @property
    def reward_label(self) -> str | None:
        """The reward's name with its units and direction (``Reward.label``), or None."""
        return self.reward.label() if self.reward is not None else None

    @torch.no_grad()
    def images(self, prompt: str, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, tuned): (n, 3, H, W) images in [0, 1], image i drawn from ``seeds[i]`` by both."""
        with self._lock:
            base = sample_images(self.base_pipe, [prompt], seeds, self.settings)  # (n, 3, H, W)
            tuned = (
                base
                if self.tuned_pipe is self.base_pipe
                else sample_images(self.tuned_pipe, [prompt], seeds, self.settings)
            )
        return base, tuned

    def scores(self, prompt: str, base: torch.Tensor, tuned: torch.Tensor) -> tuple[list, list] | None:
        """(base scores, tuned scores), n each, or None without a reward."""
        if self.reward is None:
            return None
        n = len(base)
        with self._lock:
            s = self.reward(torch.cat([base, tuned]), [prompt] * (2 * n)).float().cpu()
        return s[:n].tolist(), s[n:].tolist()

    def compare(self, prompt: str, seed, num_seeds=DEFAULT_NUM_SEEDS):
        """(base strip, fine-tuned strip, Markdown): PIL strips of the seeds left to right, each
        image upscaled for display when small; the table gives each seed's rewards and their mean."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("type a prompt")
        seed = _as_seed(seed)
        n = _as_count(num_seeds)
        seeds = list(range(seed, seed + n))
        base, tuned = self.images(prompt, seeds)
        text = reward_table(prompt, seeds, self.scores(prompt, base, tuned), self.reward_label)
        return strip(base), strip(tuned), text


def reward_table(prompt: str, seeds: list[int], scores, label: str | None) -> str:
    """Markdown: the prompt, then one row per seed (base, fine-tuned, change) and the mean."""
    head = (
        f"prompt {prompt!r}, seeds {seeds[0]}-{seeds[-1]} (left to right)"
        if len(seeds) > 1
        else (f"prompt {prompt!r}, seed {seeds[0]}")
    )
    if scores is None:
        return f"{head}\n\n(no reward loaded)"
    base, tuned = scores
    rows = [f"| {s} | {b:.4f} | {t:.4f} | {t - b:+.4f} |" for s, b, t in zip(seeds, base, tuned)]
    mb, mt = sum(base) / len(base), sum(tuned) / len(tuned)
    rows.append(f"| **mean** | **{mb:.4f}** | **{mt:.4f}** | **{mt - mb:+.4f}** |")
    return "\n".join(
        [f"{head}\n", f"**{label}**\n", "| seed | base | fine-tuned | change |", "|---|---|---|---|", *rows]
    )


def strip(images: torch.Tensor):
    """(n, 3, H, W) in [0, 1] -> one PIL image: the n images left to right, upscaled (nearest) when
    small, GAP white pixels apart."""
    from PIL import Image

    from .report import to_pil

    tiles = [_display(to_pil(image)) for image in images]
    w, h = tiles[0].size
    out = Image.new("RGB", (len(tiles) * w + (len(tiles) - 1) * GAP, h), (255, 255, 255))
    for i, tile in enumerate(tiles):
        out.paste(tile, (i * (w + GAP), 0))
    return out


def _whole(value, what: str, lo: int, hi: float = math.inf) -> int:
    """``value`` (a page field: number or text) as an int in [lo, hi], else a ValueError for the page."""
    bounds = f">= {lo}" if hi == math.inf else f"from {lo} to {hi}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or not lo <= number <= hi:
        raise ValueError(f"{what} must be a whole number {bounds}, got {value!r}")
    return int(number)


def _as_seed(seed) -> int:
    return _whole(seed, "the seed", 0)


def _as_count(num_seeds) -> int:
    return _whole(num_seeds, "the number of seeds", 1, MAX_NUM_SEEDS)


def _display(image):
    """Upscale (nearest, integer factor) images smaller than DISPLAY_MIN so the page shows pixels."""
    from PIL import Image

    factor = math.ceil(DISPLAY_MIN / min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# ----------------------------------------------------------------------------------------------
# Run history: grids and curve


def epoch_grids(run_dir: Path | None) -> list[tuple[Path, str]]:
    """[(grids/epoch_NNNN.png, 'epoch N: reward ...')] in epoch order."""
    from .report import read_metrics

    grids = run_folder.epoch_grids(run_dir) if run_dir is not None else []
    if not grids:
        return []
    by_epoch = {r.get("epoch"): r for r in read_metrics(run_dir / run_folder.METRICS)}
    out = []
    for epoch, path in grids:
        caption = f"epoch {epoch}"
        record = by_epoch.get(epoch, {})
        if isinstance(record.get("grid_reward_mean"), (int, float)):
            caption += f": grid reward {record['grid_reward_mean']:.4g}"
        out.append((path, caption))
    return out


def reward_curve(run_dir: Path | None, scratch: Path) -> Path | None:
    """A fresh plot of metrics.jsonl (in ``scratch``), else the run's reward_curve.png, else None."""
    from .report import plot_reward_curve, read_metrics

    if run_dir is None:
        return None
    metrics = read_metrics(run_dir / run_folder.METRICS)
    if metrics:
        return plot_reward_curve(metrics, scratch / run_folder.REWARD_CURVE)
    png = run_dir / run_folder.REWARD_CURVE
    return png if png.is_file() else None


def load_history(run_dir: Path | None, scratch: Path):
    """(gallery items [(PIL, caption)], curve PIL or None), read from disk now."""
    from PIL import Image

    def read(path: Path):
        with Image.open(path) as im:
            return im.convert("RGB")

    items = []
    for path, caption in epoch_grids(run_dir):
        try:
            items.append((read(path), caption))
        except OSError:  # a grid being written right now: shown on the next refresh
            continue
    curve = reward_curve(run_dir, scratch)
    return items, (read(curve) if curve else None)


# ----------------------------------------------------------------------------------------------
# The app


def _event_options(listener, hidden: bool) -> dict:
    """Keep an event out of the API page: ``api_visibility`` (Gradio 6) or ``show_api`` (4, 5)."""
    params = inspect.signature(listener).parameters
    if not hidden:
        return {}
    if "api_visibility" in params:
        return {"api_visibility": "undocumented"}
    return {"show_api": False} if "show_api" in params else {}


def build_app(
    run_dir=None,
    *,
    model: str | None = None,
    finetune=None,
    source: Source | None = None,
    base_pipe=None,
    tuned_pipe=None,
    reward=None,
    settings=None,
    device="cpu",
    dtype=None,
    weights: dict | None = None,
    default_prompt: str | None = None,
    default_seed: int = 0,
    num_seeds: int = DEFAULT_NUM_SEEDS,
):
    """The preview page as a ``gr.Blocks`` (not launched).

    Models: ``base_pipe``/``tuned_pipe`` when given, else loaded here, once, from ``source`` (what
    ``generation.resolve_source`` names), else from ``run_dir`` (its config.yaml and lora/, unet/ or
    newest checkpoint), ``model`` and ``finetune``.
    ``reward``: a callable, a reward name, or None for the run's reward (a run reward that cannot be
    loaded is a warning: the images still show); ``weights``: local copies of reward weights
    (``rewards.WEIGHT_OPTIONS``, default the run's). ``settings``: ``SamplingSettings`` (default the run's).

    API: ``/compare`` (prompt, first seed, number of seeds) -> (base strip, fine-tuned strip,
    Markdown of the rewards); ``/history`` () -> (gallery, reward curve). The page opens with the
    default prompt and seeds already compared.
    """
    gr = import_gradio()
    pipes_given = base_pipe is not None and tuned_pipe is not None
    if source is None and pipes_given:
        source = Source(model=model or "", finetune=finetune)
        if run_dir is not None:  # the run's history, reward and settings beside the given models
            source.run_dir = run_folder.find_run(run_dir)
            source.config = run_folder.read_run_config(source.run_dir)
    elif source is None:
        source = resolve_source(run=run_dir, model=model, finetune=finetune)
    if not pipes_given:
        base_pipe, tuned_pipe = load_models(
            source, device=torch.device(device), dtype=dtype or torch.float32, with_base=True
        )
    run_dir = source.run_dir
    if settings is None:
        settings = settings_from_config(source.config)
    comparer = Comparer(base_pipe, tuned_pipe, settings, _resolve_reward(reward, source.config, device, weights))
    scratch = Path(tempfile.mkdtemp(prefix="rebel_preview_"))
    prompt0 = default_prompt or first_run_prompt(source.config) or DEFAULT_PROMPT

    # Startup renders a first comparison and the history into the page itself, so it shows images
    # as soon as it loads (and the first click does not pay for warm-up).
    first = comparer.compare(prompt0, default_seed, num_seeds)
    grids0, curve0 = load_history(run_dir, scratch)

    title = f"rebel-diffusion preview: {run_dir.name if run_dir else source.model}"
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\n" + _summary(source, run_dir, comparer))
        with gr.Row():
            prompt = gr.Textbox(value=prompt0, label="prompt", scale=4)
            seed = gr.Number(value=default_seed, precision=0, minimum=0, label="first seed", scale=1)
            count = gr.Slider(1, MAX_NUM_SEEDS, value=num_seeds, step=1, label="seeds", scale=1)
            button = gr.Button("Compare", variant="primary", scale=1)
        # One row per model, seed for seed in the same column: the eye compares straight down.
        options = dict(type="pil", format="png", interactive=False, show_label=True)
        base_img = gr.Image(first[0], label="base model (seeds left to right)", **options)
        tuned_img = gr.Image(first[1], label="fine-tuned (the same seeds)", **options)
        info = gr.Markdown(first[2], label="rewards")
        gr.Markdown("### Training history")
        with gr.Row():
            gallery = gr.Gallery(
                grids0,
                label="grid per epoch (click one, then step with the arrows)",
                columns=4,
                format="png",
                allow_preview=True,
                object_fit="contain",
                scale=3,
            )
            curve = gr.Image(
                curve0, label="reward curve", type="pil", format="png", interactive=False, height=420, scale=2
            )
        refresh = gr.Button("Refresh history")

        def history():
            return load_history(run_dir, scratch)

        inputs, outputs = [prompt, seed, count], [base_img, tuned_img, info]
        button.click(comparer.compare, inputs, outputs, api_name="compare")
        prompt.submit(comparer.compare, inputs, outputs, **_event_options(prompt.submit, hidden=True))
        refresh.click(history, None, [gallery, curve], api_name="history")
        # A page (re)load re-reads the history quietly: a live run's new epochs show up.
        app.load(history, None, [gallery, curve], show_progress="hidden", **_event_options(app.load, hidden=True))
    app.comparer = comparer  # for tests and callers that want the models without the page
    return app


def first_run_prompt(cfg: TrainConfig | None) -> str | None:
    """The first of a run's own prompts (its grid's, which are its training prompts unless it set
    others, else its held-out ones) that can still be read, or None."""
    if cfg is None:
        return None
    for name in dict.fromkeys((cfg.grid_prompts or cfg.prompts, cfg.prompts, cfg.heldout_prompts)):
        try:
            prompts = load_prompts(name)
        except UsageError:  # a prompts file that has moved since the run
            continue
        if prompts:
            return prompts[0]
    return None


def _resolve_reward(reward, cfg: TrainConfig | None, device, weights: dict | None):
    """A ``Reward`` (or None) from a Reward, a scoring function, a name, or the run's config (if any)."""
    from ..rewards import CallableReward, Reward, weight_options
    from .evaluate import load_rewards

    if isinstance(reward, Reward):
        return reward
    if reward is not None and not isinstance(reward, str):
        return CallableReward(reward, "reward")
    name = reward or (cfg.reward if cfg is not None else None)
    if not name:
        return None
    try:
        return load_rewards([name], device=device, dtype=torch.float32, weights=weight_options(cfg, weights))[name]
    except (UsageError, RunError) as e:  # RunError: a reward server that is down
        if reward:  # asked for explicitly: the user must hear it
            raise
        warnings.warn(f"preview shows no rewards: the run's reward {name!r} cannot be loaded ({e})", stacklevel=2)
        return None


def _summary(source, run_dir, comparer) -> str:
    s = comparer.settings
    lines = [f"- base model: `{source.model or 'given pipeline'}`"]
    if source.finetune:
        lines.append(f"- fine-tune: `{source.finetune}`")
    elif comparer.base_pipe is comparer.tuned_pipe:
        lines.append("- no fine-tune: both sides show the base model")
    if run_dir:
        lines.append(f"- run: `{run_dir}`")
    lines.append(
        f"- sampling: {s.sampler}, {s.num_steps} steps, DDIM eta {s.ddim_eta}, guidance {s.guidance_scale}, "
        f"{s.width}x{s.height}"
    )
    lines.append(f"- reward: {comparer.reward_label or 'none'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Serving


def check_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (0: pick a free one); else a one-line UsageError."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be between 0 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); is another preview running? "
                "pick another --port, or --port 0 for any free one"
            ) from e
        return s.getsockname()[1]


def launch(app, *, host: str = "127.0.0.1", port: int, share: bool = False, block: bool = True):
    """Start the server (no server-side rendering, no Node needed); ``block=False`` returns at once."""
    options = dict(
        server_name=host,
        server_port=port,
        share=share,
        show_error=True,
        quiet=not block,
        prevent_thread_lock=not block,
        ssr_mode=False,
    )
    params = inspect.signature(app.launch).parameters
    return app.launch(**{k: v for k, v in options.items() if k in params})
