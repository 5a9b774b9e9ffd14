"""report: grids, atomic PNG writes, the metrics log and the reward curve (no model needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rebel_diffusion.outputs import report


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------------------
# make_grid


def test_grid_upscales_small_tiles_with_nearest_and_lays_out_rows():
    images = torch.rand(5, 3, 32, 32)
    grid = report.make_grid(images, ncols=3)
    # 32px tiles are upscaled x4 to 128px; 3 columns, 2 rows, PAD between and around.
    pad = report.PAD
    assert grid.size == (3 * (128 + pad) + pad, 2 * (128 + pad) + pad)
    tile = _pixels(grid)[pad : pad + 128, pad : pad + 128]
    expected = np.asarray(report.to_pil(images[0]).resize((128, 128), Image.Resampling.NEAREST))
    assert np.array_equal(tile, expected)  # nearest upscale: exact pixels, no blur


def test_grid_captions_are_drawn_and_wrapped_under_each_tile():
    images = torch.zeros(2, 3, 32, 32)  # black tiles
    short = report.make_grid(images, ["cat", "dog"])
    long = report.make_grid(images, ["a very long prompt about a hippopotamus wearing sunglasses on a beach"] * 2)
    assert long.size[1] > short.size[1] > report.make_grid(images).size[1]  # wrapped lines add height
    pad = report.PAD
    caption_band = _pixels(short)[pad + 128 :, pad : pad + 128]
    assert (caption_band < 128).any(), "no dark text pixels under the tile"
    assert (caption_band == 255).mean() > 0.5  # mostly white background


def test_grid_default_columns_nan_and_bad_input():
    grid = report.make_grid(torch.full((4, 3, 8, 8), float("nan")))  # NaN shows as black, no crash
    assert grid.size[0] == grid.size[1]  # 4 images -> 2x2
    assert _pixels(grid)[report.PAD + 1, report.PAD + 1].tolist() == [0, 0, 0]
    big = report.make_grid(torch.rand(1, 3, 200, 300))
    assert big.size == (300 + 2 * report.PAD, 200 + 2 * report.PAD)  # >= 128 px: not rescaled
    with pytest.raises(ValueError, match="captions"):
        report.make_grid(torch.rand(2, 3, 8, 8), ["only one"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        report.make_grid(torch.rand(3, 8, 8))


# ----------------------------------------------------------------------------------------------
# save_png


def test_save_png_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "grid.png"
    report.save_png(torch.ones(3, 4, 4), path)  # a tensor works too; folders are created
    assert _pixels(Image.open(path)).min() == 255
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        report.save_png(Image.new("RGB", (4, 4)), path)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_round_trip_with_tensors_and_nan(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    assert report.read_metrics(path) == []
    report.append_metrics(path, {"epoch": 0, "reward_mean": torch.tensor(1.5), "loss": float("nan")})
    report.append_metrics(path, {"epoch": 1, "reward_mean": np.float32(2.0), "heldout/clip": 0.3})
    records = report.read_metrics(path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["reward_mean"] == 1.5 and math.isnan(records[0]["loss"])
    assert records[1] == {"epoch": 1, "reward_mean": 2.0, "heldout/clip": 0.3}
    assert len(path.read_text().splitlines()) == 2  # one JSON object a line
    # Strict JSON, which every reader takes: the NaN is a null on disk.
    assert json.loads(path.read_text().splitlines()[0], parse_constant=_strict)["loss"] is None
    with open(path, "a") as f:  # a line of an older run, with a bare NaN, still reads
        f.write('{"epoch": 2, "loss": NaN}\n')
    assert math.isnan(report.read_metrics(path)[2]["loss"])


def _strict(name):
    raise ValueError(f"not strict JSON: {name}")


def test_read_metrics_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 0}) + "\n" + '{"epoch": 1, "rew')  # a crash mid-write
    with pytest.warns(UserWarning, match="not JSON"):
        assert report.read_metrics(path) == [{"epoch": 0}]


def test_truncate_metrics_for_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for e in range(5):
        report.append_metrics(path, {"epoch": e, "reward_mean": e})
    report.append_metrics(path, {"note": "no epoch key"})
    report.truncate_metrics(path, 2)
    assert [r.get("epoch") for r in report.read_metrics(path)] == [0, 1, 2, None]
    report.truncate_metrics(path, -1)
    assert report.read_metrics(path) == [{"note": "no epoch key"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # written via a temp file
    report.truncate_metrics(tmp_path / "missing.jsonl", 3)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# reward curve


def test_reward_curve_has_a_panel_per_heldout_key(tmp_path):
    metrics = [
        {"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05, "grid_reward_mean": 0.08 * e, "loss": 1.0}
        for e in range(4)
    ]
    plain = report.plot_reward_curve(metrics, tmp_path / "plain.png")
    no_grid = report.plot_reward_curve(
        [{k: v for k, v in r.items() if k != "grid_reward_mean"} for r in metrics], tmp_path / "no_grid.png"
    )
    assert Image.open(plain).size[1] > Image.open(no_grid).size[1]  # the grid reward has its own panel
    for r in metrics:
        r.update(
            {"heldout/aesthetic": 5.0 + r["epoch"], "heldout/diversity": float("nan") if r["epoch"] == 1 else 0.3}
        )
    assert report.heldout_keys(metrics) == ["heldout/aesthetic", "heldout/diversity"]
    richer = report.plot_reward_curve(metrics, tmp_path / "sub" / "curve.png")
    h_plain, h_rich = Image.open(plain).size[1], Image.open(richer).size[1]
    assert h_rich > h_plain  # two more panels
    assert _pixels(Image.open(richer)).std() > 10  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_grid.png", "plain.png", "sub"]


def test_trailing_mean_against_a_direct_sum():
    values = [0.8, 0.9, 0.7, 1.0, 0.6, 0.95]
    assert report.trailing_mean(values, 3) == pytest.approx(
        [
            0.8,
            (0.8 + 0.9) / 2,
            (0.8 + 0.9 + 0.7) / 3,
            (0.9 + 0.7 + 1.0) / 3,
            (0.7 + 1.0 + 0.6) / 3,
            (1.0 + 0.6 + 0.95) / 3,
        ]
    )
    assert report.trailing_mean(values, 1) == values
    assert report.trailing_mean([], 5) == []


def test_reward_curve_draws_the_trend_and_standard_error_band(tmp_path):
    # A noisy batch mean around a rising trend: the panel draws the band and the trend line
    # (more ink than the points alone), and still draws without the image counts (older runs).
    metrics = [
        {"epoch": e, "reward_mean": 0.8 + 0.005 * e + (0.04 if e % 2 else -0.04), "reward_std": 0.3, "images": 128}
        for e in range(21)
    ]
    full = _pixels(Image.open(report.plot_reward_curve(metrics, tmp_path / "full.png")))
    few = _pixels(Image.open(report.plot_reward_curve(metrics[:2], tmp_path / "few.png")))
    old = [{k: v for k, v in r.items() if k != "images"} for r in metrics]
    without = _pixels(Image.open(report.plot_reward_curve(old, tmp_path / "old.png")))

    def light_blue(px):  # the band: tab:blue at alpha 0.15 over white
        r, b = px[..., 0].astype(int), px[..., 2].astype(int)
        return ((r > 200) & (b - r > 12)).sum()

    assert light_blue(full) > 20 * max(light_blue(without), 1)

    def navy(px):  # the trend line, drawn from 3 epochs on
        r, g, b = (px[..., i].astype(int) for i in range(3))
        return ((r < 40) & (g < 40) & (b > 100)).sum()

    assert navy(full) > 100 and navy(few) < navy(full) / 10


def test_heldout_panel_draws_its_standard_error_band(tmp_path):
    # The held-out panel's band where heldout_se/<name> is logged; none without it (older runs).
    metrics = [{"epoch": e, "heldout/toy-alignment-full": 0.8 + 0.01 * e} for e in range(0, 21, 5)]
    with_se = [{**r, "heldout_se/toy-alignment-full": 0.03} for r in metrics]
    band = _pixels(Image.open(report.plot_reward_curve(with_se, tmp_path / "se.png")))
    plain = _pixels(Image.open(report.plot_reward_curve(metrics, tmp_path / "plain.png")))

    def light_green(px):  # tab:green at alpha 0.15 over white
        r, g, b = (px[..., i].astype(int) for i in range(3))
        return ((r > 190) & (g - r > 10) & (g - b > 10)).sum()

    assert light_green(band) > 20 * max(light_green(plain), 1)


def test_reward_curve_with_no_metrics_yet(tmp_path):
    path = report.plot_reward_curve([], tmp_path / "empty.png")
    assert Image.open(path).size[0] > 100


def test_truncating_keeps_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for epoch in range(3):
        report.append_metrics(path, {"epoch": epoch, "loss": float("nan") if epoch == 1 else 0.5})
    report.truncate_metrics(path, last_epoch=1)  # a resume from epoch 1's checkpoint
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1], parse_constant=_strict)["loss"] is None
    assert math.isnan(report.read_metrics(path)[1]["loss"])
