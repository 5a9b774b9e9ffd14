"""`rebel-diffusion preview`: the Gradio app on a localhost port, a real client, and a headless browser.

The app is built on a fake-but-real run (tiny + a LoRA with random lora_B weights) and on the base
model against a second, separate load of itself.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rebel_diffusion import cli

pytest.importorskip("gradio", reason="the preview extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")

# Gradio's own pandas deprecation chatter; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

STEPS = 2
PROMPT, SEED = "a photo of an otter", 0


def make_fake_run(run):
    """tiny + a LoRA that changes the images, config.yaml (reward jpeg-compressibility, the grid's
    prompts under their previous name), metrics, grids."""
    from rebel_diffusion.models import add_lora, load_pipeline, save_lora
    from rebel_diffusion.outputs.report import append_metrics, make_grid, save_png

    run.mkdir(parents=True)
    pipe = load_pipeline("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(pipe.unet)
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape) * 0.5
    save_lora(pipe.unet, run / "lora")
    config = dict(
        model="tiny",
        reward="jpeg-compressibility",
        sampler="ddim",
        num_steps=STEPS,
        ddim_eta=1.0,
        eta=1.0,
        guidance_scale=5.0,
        resolution=32,
        seed=0,
        eval_prompts="toy_heldout",  # grid_prompts, as runs of the previous release stored it
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for e in range(3):
        append_metrics(
            run / "metrics.jsonl",
            {
                "epoch": e,
                "reward_mean": -2.0 + e,
                "reward_std": 0.2,
                "eval_reward_mean": -2.1 + e,
                "eval/jpeg-incompressibility": 2.0 - e,
            },
        )
        save_png(make_grid(torch.rand(4, 3, 32, 32), [f"epoch {e}"] * 4), run / "grids" / f"epoch_{e:04d}.png")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app):
    """Launch ``app`` on a free localhost port without blocking; (url, client)."""
    from rebel_diffusion.outputs.preview import launch

    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    return url, gradio_client.Client(url, verbose=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("preview") / "run")


@pytest.fixture(scope="module")
def tuned_server(run_dir):
    from rebel_diffusion.outputs.preview import build_app

    app = build_app(run_dir, default_prompt=PROMPT, default_seed=SEED)
    url, client = serve(app)
    yield app, url, client
    app.close()


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tiles(strip: np.ndarray, n: int) -> list[np.ndarray]:
    """The n images of a strip (left to right, GAP white columns apart)."""
    from rebel_diffusion.outputs.preview import GAP

    width = (strip.shape[1] - (n - 1) * GAP) // n
    assert strip.shape[1] == n * width + (n - 1) * GAP
    return [strip[:, i * (width + GAP) : i * (width + GAP) + width] for i in range(n)]


def test_compare_shows_several_seeds_before_and_after(tuned_server):
    from rebel_diffusion.outputs.report import to_pil
    from rebel_diffusion.rewards import load_reward

    app, url, client = tuned_server
    assert url.startswith("http://127.0.0.1:")
    n = 3
    base, tuned, text = client.predict(PROMPT, SEED, n, api_name="/compare")
    a, b = rgb(base), rgb(tuned)
    assert a.shape == b.shape
    base_tiles, tuned_tiles = tiles(a, n), tiles(b, n)
    assert all(t.shape == (256, 256, 3) for t in base_tiles)  # 32px samples shown upscaled x8
    assert not np.array_equal(base_tiles[0], base_tiles[1])  # different seeds indeed
    assert not any(np.array_equal(x, y) for x, y in zip(base_tiles, tuned_tiles))  # the LoRA changes each
    # The tiles are the sampler's images for seeds SEED, SEED+1, ..., upscaled with nearest.
    raw_base, raw_tuned = app.comparer.images(PROMPT, list(range(SEED, SEED + n)))
    for i in range(n):
        assert np.array_equal(np.asarray(to_pil(raw_base[i])), base_tiles[i][::8, ::8])
        assert np.array_equal(np.asarray(to_pil(raw_tuned[i])), tuned_tiles[i][::8, ::8])
    # The same request gives the same pictures again.
    again = client.predict(PROMPT, SEED, n, api_name="/compare")
    assert np.array_equal(rgb(again[0]), a) and np.array_equal(rgb(again[1]), b)
    # The rewards: the label says units and direction; one row per seed with the reward's own scores.
    assert "**jpeg-compressibility (minus kB of JPEG at quality 95: smaller files; higher is better)**" in text
    reward = load_reward("jpeg-compressibility")
    want_base, want_tuned = reward(raw_base, [PROMPT] * n).tolist(), reward(raw_tuned, [PROMPT] * n).tolist()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == n
    for seed, row, wb, wt in zip(range(SEED, SEED + n), rows, want_base, want_tuned):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(seed)
        assert float(cells[1]) == pytest.approx(wb, abs=1e-4) and float(cells[2]) == pytest.approx(wt, abs=1e-4)
    mean = next(line for line in text.splitlines() if line.startswith("| **mean**"))
    assert f"{sum(want_tuned) / n - sum(want_base) / n:+.4f}" in mean


def test_compare_refuses_bad_seed_counts(tuned_server):
    app, _, _ = tuned_server
    for bad in (0, 9, 2.5, "x"):
        with pytest.raises(ValueError, match="number of seeds"):
            app.comparer.compare(PROMPT, SEED, bad)


def test_history_lists_epoch_grids(tuned_server):
    _, _, client = tuned_server
    gallery, curve = client.predict(api_name="/history")
    assert [item["caption"] for item in gallery] == [
        "epoch 0: grid reward -2.1",
        "epoch 1: grid reward -1.1",
        "epoch 2: grid reward -0.1",
    ]  # older keys read as today's
    assert rgb(curve).shape[0] > 300  # reward panel + one heldout/ panel


def test_the_first_prompt_of_an_old_run(tmp_path):
    """The page opens on the run's first grid prompt, whichever name its release stored them under;
    a prompts file that has moved since is passed over."""
    from rebel_diffusion.outputs.preview import first_run_prompt
    from rebel_diffusion.outputs.run_folder import read_run_config
    from rebel_diffusion.prompts_io import load_prompts

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "eval_prompts": "toy_heldout"}))
    assert first_run_prompt(read_run_config(tmp_path)) == load_prompts("toy_heldout")[0]
    config.write_text(yaml.safe_dump({"model": "tiny", "prompts": str(tmp_path / "moved.txt")}))
    assert first_run_prompt(read_run_config(tmp_path)) == load_prompts("heldout_animals")[0]  # held-out set
    assert first_run_prompt(None) is None


def test_base_model_against_itself_is_identical():
    from rebel_diffusion.models import load_pipeline
    from rebel_diffusion.outputs.preview import build_app
    from rebel_diffusion.rewards import load_reward
    from rebel_diffusion.sampling import SamplingSettings

    app = build_app(
        base_pipe=load_pipeline("tiny"),
        tuned_pipe=load_pipeline("tiny"),  # two separate loads
        reward=load_reward("jpeg-compressibility"),
        settings=SamplingSettings(num_steps=STEPS),
    )
    try:
        _, client = serve(app)
        base, tuned, text = client.predict("a koala", 7, 2, api_name="/compare")
        assert np.array_equal(rgb(base), rgb(tuned))
        assert text.count("+0.0000") == 3  # two seeds and the mean, unchanged
    finally:
        app.close()


def test_headless_browser_shows_the_images(tuned_server, tmp_path_factory):
    from rebel_diffusion.outputs.preview import DEFAULT_NUM_SEEDS

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    _, url, client = tuned_server
    out = tmp_path_factory.mktemp("screenshot")
    shot = out / "preview.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={out / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,1400",
        "--virtual-time-budget=10000",
        "--hide-scrollbars",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    print(f"screenshot: {shot}", file=sys.stderr)
    page = rgb(shot).reshape(-1, 3)
    assert page.std() > 20, "blank page"
    # The page opens with the default prompt and seeds compared: every colour of both sample strips
    # (32x32 noise-like pictures from the tiny model) must be on screen.
    on_screen = {tuple(c) for c in np.unique(page, axis=0).tolist()}
    for image in client.predict(PROMPT, SEED, DEFAULT_NUM_SEEDS, api_name="/compare")[:2]:
        colours = {tuple(c) for c in np.unique(rgb(image).reshape(-1, 3), axis=0).tolist()}
        shown = sum(c in on_screen for c in colours) / len(colours)
        assert shown > 0.9, f"only {shown:.0%} of an image's colours are on the page ({shot})"


# ----------------------------------------------------------------------------------------------
# CLI: safe defaults and bad input


def test_cli_defaults_bind_localhost_without_share():
    args = cli.build_parser().parse_args(["preview", "--run", "somewhere"])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860


def test_port_in_use(run_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["preview", "--run", str(run_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rebel-diffusion preview: error: --port {port}: cannot listen on 127.0.0.1")


def test_without_gradio_says_how_to_install(run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert cli.main(["preview", "--run", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "rebel-diffusion preview: error: preview needs Gradio, which is not installed: "
        "pip install 'rebel-diffusion[preview]'"
    )


def test_run_without_weights(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: tiny\n")
    assert cli.main(["preview", "--run", str(tmp_path), "--port", "0"]) == 2
    assert "no fine-tuned weights" in capsys.readouterr().err.strip().splitlines()[-1]
