"""`rebel-diffusion sample` and `eval` on the tiny model, prompt sets, and their bad-input errors.

A fake-but-real run folder is built once: tiny + a LoRA whose lora_B weights are random (so the
fine-tune changes the images), config.yaml, metrics and grids as the trainer writes them.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rebel_diffusion import cli
from rebel_diffusion.errors import UsageError
from rebel_diffusion.outputs.generation import default_num_threads as _real_default_threads  # before conftest's patch

STEPS = 2


def make_fake_run(run, *, lora: bool = True, checkpoint: bool = False):
    """A run folder as the trainer leaves it: config.yaml, metrics.jsonl, grids/, lora/ (and/or a checkpoint)."""
    from safetensors.torch import save_file

    from rebel_diffusion.models import add_lora, load_pipeline, save_lora
    from rebel_diffusion.outputs.report import append_metrics, make_grid, save_png

    run.mkdir(parents=True)
    pipe = load_pipeline("tiny")
    with torch.random.fork_rng(devices=[]):  # the same LoRA every call, global RNG untouched
        torch.manual_seed(0)
        add_lora(pipe.unet)
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # initialised to 0: make the LoRA actually change the model
                p.data = torch.randn(p.shape) * 0.5
    if lora:
        save_lora(pipe.unet, run / "lora")
    if checkpoint:  # the trainer's checkpoints/epoch_NNNN: raw trainable weights
        ckpt = run / "checkpoints" / "epoch_0001"
        ckpt.mkdir(parents=True)
        state = {n: p.detach().contiguous() for n, p in pipe.unet.named_parameters() if p.requires_grad}
        save_file(state, str(ckpt / "trainable.safetensors"))
        (ckpt / "state.json").write_text('{"epoch": 1, "global_step": 1}')
    config = dict(
        model="tiny",
        reward="jpeg-compressibility",
        prompts="simple_animals",
        sampler="ddim",
        num_steps=STEPS,
        eta=1.0,
        ddim_eta=1.0,
        guidance_scale=5.0,
        resolution=32,
        seed=0,
        eval_prompts="heldout_animals",
        finetune="lora",
        lora_rank=8,
        lora_alpha=8.0,
        lora_targets="to_q,to_k,to_v,to_out.0",
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for e in range(2):
        append_metrics(
            run / "metrics.jsonl",
            {"epoch": e, "reward_mean": -2.0 + e, "reward_std": 0.1, "eval_reward_mean": -2.1 + e, "loss": 0.5},
        )
        save_png(make_grid(torch.rand(4, 3, 32, 32), [f"epoch {e}"] * 4), run / "grids" / f"epoch_{e:04d}.png")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("sample_eval") / "run")


@pytest.fixture(scope="module")
def two_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "two.txt"
    path.write_text("# held out\notter\n\npenguin\n")
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def error_line(capsys, command: str) -> str:
    """The CLI's one error line (other stderr lines may be progress or library chatter)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rebel-diffusion {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# prompt sets


def test_prompt_sets_by_name_and_path(tmp_path, two_prompts):
    from rebel_diffusion.prompts_io import list_prompt_sets, load_prompts

    assert {"simple_animals", "heldout_animals"} <= set(list_prompt_sets())
    assert load_prompts(two_prompts) == ["otter", "penguin"]  # comments and blank lines skipped
    assert load_prompts("simple_animals")[:2] == load_prompts("simple_animals.txt")[:2] == ["cat", "dog"]
    with pytest.raises(UsageError, match="no packaged prompt set.*heldout_animals"):
        load_prompts("no_such_set")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UsageError, match="empty"):
        load_prompts(empty)
    bom = tmp_path / "bom.txt"  # as Windows editors save UTF-8
    bom.write_bytes("\ufeffa red circle\nan otter\n".encode())
    assert load_prompts(bom) == ["a red circle", "an otter"]


def test_heldout_animals_do_not_overlap_the_training_animals():
    from rebel_diffusion.prompts_io import load_prompts

    heldout, train = load_prompts("heldout_animals"), load_prompts("simple_animals")
    assert 20 <= len(heldout) <= 30 and len(set(heldout)) == len(heldout)
    assert not set(heldout) & set(train)


# ----------------------------------------------------------------------------------------------
# sample


def test_sample_writes_pngs_grid_and_manifest(run_dir, tmp_path):
    out = tmp_path / "tuned"
    rc = cli.main(
        [
            "sample",
            "--run",
            str(run_dir),
            "--prompt",
            "a cat",
            "--prompt",
            "a dog",
            "--seeds",
            "0",
            "1",
            "--output-dir",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    names = {"p000_seed0.png", "p000_seed1.png", "p001_seed0.png", "p001_seed1.png"}
    assert names | {"grid.png", "samples.json"} == {p.name for p in out.iterdir()}
    assert pixels(out / "p000_seed0.png").shape == (32, 32, 3)
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["settings"]["num_steps"] == STEPS  # from the run's config.yaml
    assert manifest["finetune"].endswith("run") and manifest["model"] == "tiny"
    assert {e["file"]: (e["prompt"], e["seed"]) for e in manifest["images"]}["p001_seed1.png"] == ("a dog", 1)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 2 * 128 and grid.size[1] > 2 * 128  # 2x2 upscaled tiles with captions


def test_same_seed_same_image_whichever_batch_and_model(run_dir, tmp_path):
    common = ["--model", "tiny", "--num-steps", str(STEPS), "--resolution", "32", "--quiet", "--prompt", "a cat"]
    assert cli.main(["sample", *common, "--seeds", "0", "1", "--output-dir", str(tmp_path / "a")]) == 0
    assert cli.main(["sample", *common, "--num-images", "1", "--seed", "1", "--output-dir", str(tmp_path / "b")]) == 0
    assert (
        cli.main(
            [
                "sample",
                *common,
                "--finetune",
                str(run_dir / "lora"),
                "--seeds",
                "0",
                "--output-dir",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    # Seed 1 alone gives the picture it gave beside seed 0.
    assert np.array_equal(pixels(tmp_path / "a" / "p000_seed1.png"), pixels(tmp_path / "b" / "p000_seed1.png"))
    # The fine-tune changes the image drawn from the same seed (same starting noise).
    assert not np.array_equal(pixels(tmp_path / "a" / "p000_seed0.png"), pixels(tmp_path / "c" / "p000_seed0.png"))


def test_sample_from_a_trainer_checkpoint_matches_its_lora(run_dir, tmp_path):
    ckpt_run = make_fake_run(tmp_path / "ckpt_run", lora=False, checkpoint=True)
    from rebel_diffusion.outputs.run_folder import find_weights

    assert find_weights(ckpt_run) == ckpt_run / "checkpoints" / "epoch_0001"  # no lora/: newest checkpoint
    args = ["--prompt", "a cat", "--seeds", "3", "--quiet"]
    assert cli.main(["sample", "--run", str(ckpt_run), *args, "--output-dir", str(tmp_path / "ck")]) == 0
    assert cli.main(["sample", "--run", str(run_dir), *args, "--output-dir", str(tmp_path / "lo")]) == 0
    a, b = pixels(tmp_path / "ck" / "p000_seed3.png"), pixels(tmp_path / "lo" / "p000_seed3.png")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same weights, two load paths


# ----------------------------------------------------------------------------------------------
# eval


def test_eval_writes_json_markdown_and_grid(run_dir, two_prompts, tmp_path):
    out = tmp_path / "eval"
    rc = cli.main(
        [
            "eval",
            "--run",
            str(run_dir),
            "--prompts",
            str(two_prompts),
            "--num-images",
            "2",
            "--rewards",
            "jpeg-compressibility,jpeg-incompressibility",
            "--diversity-model",
            "tiny-random-clip",
            "--output-dir",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == ["otter", "penguin"] and result["seeds"] == [0, 1]
    comp, incomp = result["rewards"]["jpeg-compressibility"], result["rewards"]["jpeg-incompressibility"]
    for r in (comp, incomp):
        assert math.isclose(r["delta"], r["tuned"] - r["base"], abs_tol=1e-9)
        assert r["base_n"] == r["tuned_n"] == 4
    assert math.isclose(comp["base"], -incomp["base"])
    assert comp["delta"] != 0  # the LoRA changed the images
    div = result["diversity"]
    assert div["model"].startswith("tiny-random-clip") and 0 < div["base"] < 2
    md = (out / "eval.md").read_text()
    assert "| metric | base | fine-tuned | delta | units |" in md
    assert comp["units"] == "minus kB of JPEG at quality 95: smaller files"  # each reward says its units
    assert f"| {comp['units']} |" in md and f"| {incomp['units']} |" in md
    assert md.count("| jpeg-") == 2 and "| diversity |" in md and "tiny-random-clip" in md
    # eval_grid: a row per prompt, 2 base + 2 tuned tiles of 128 px.
    assert Image.open(out / "eval_grid.png").size[0] >= 4 * 128


def test_eval_field_table_on_training_and_heldout_prompts(run_dir, two_prompts, tmp_path, hub_offline, capsys):
    import shutil

    from field_rewards import tiny_pickscore

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    trained = tmp_path / "trained.txt"
    trained.write_text("a red fox\n")
    cfg["prompts"] = str(trained)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pickscore = tiny_pickscore(tmp_path / "PickScore_v1")
    args = ["eval", "--run", str(run), "--field", "--prompts", str(two_prompts), "--num-images", "2"]
    args += ["--diversity-model", "tiny-random-clip", "--pickscore-model", str(pickscore), "--quiet"]
    assert cli.main([*args, "--rewards", "jpeg-compressibility"]) == 0
    err = capsys.readouterr().err
    # Offline, only PickScore's weights are here: the others are named, with what was looked for.
    for name in ("aesthetic", "clip", "hpsv2", "imagereward"):
        assert f"eval: {name} left out for want of weights" in err
    doc = json.loads((run / "eval" / "eval.json").read_text())
    assert doc["table"] == "field" and list(doc["prompt_sets"]) == ["training", "held-out"]
    assert set(doc["left_out"]) == {"aesthetic", "clip", "hpsv2", "imagereward"}
    assert "xswu/HPSv2" in doc["left_out"]["hpsv2"] and "THUDM/ImageReward" in doc["left_out"]["imagereward"]
    training, heldout = doc["prompt_sets"]["training"], doc["prompt_sets"]["held-out"]
    assert training["prompts"] == ["a red fox"] and heldout["prompts"] == ["otter", "penguin"]
    for result in (training, heldout):
        assert set(result["rewards"]) == {"pickscore", "jpeg-compressibility"}
        ps = result["rewards"]["pickscore"]
        assert math.isclose(ps["delta"], ps["tuned"] - ps["base"], abs_tol=1e-9) and ps["delta"] != 0
        assert result["diversity"]["base"] > 0
    md = (run / "eval" / "eval.md").read_text()
    header = "| metric | training: base | fine-tuned | delta | held-out: base | fine-tuned | delta | units |"
    assert header in md and "| PickScore |" in md and "higher is better" in md and "| diversity |" in md
    assert "Left out for want of weights: LAION aesthetic, CLIP score, HPSv2.1, ImageReward." in md

    # A local copy that was named and fails is an error, not a quiet omission.
    bad = [*args[:-3], "--pickscore-model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "e2")]
    assert cli.main(bad) == 2
    assert not (tmp_path / "e2").exists()


def test_evaluate_pipelines_base_against_itself_and_metrics_keys():
    from rebel_diffusion.models import load_pipeline
    from rebel_diffusion.outputs.evaluate import PixelEmbedder, evaluate_pipelines, heldout_metrics
    from rebel_diffusion.rewards import load_reward
    from rebel_diffusion.sampling import SamplingSettings

    rewards = {"jpeg-compressibility": load_reward("jpeg-compressibility")}
    settings = SamplingSettings(num_steps=STEPS)
    a, b = load_pipeline("tiny"), load_pipeline("tiny")  # two separate loads of one model
    result = evaluate_pipelines(a, b, ["otter"], rewards, [0, 1], settings, diversity=PixelEmbedder())
    r = result["rewards"]["jpeg-compressibility"]
    assert r["delta"] == 0.0 and result["diversity"]["delta"] == 0.0
    alone = evaluate_pipelines(None, b, ["otter"], rewards, [0, 1], settings, diversity=PixelEmbedder())
    assert alone["rewards"]["jpeg-compressibility"]["base"] is None
    assert heldout_metrics(alone) == {
        "heldout/jpeg-compressibility": r["tuned"],
        "heldout_se/jpeg-compressibility": pytest.approx(r["tuned_std"] / math.sqrt(2)),  # 2 images
        "heldout/diversity": result["diversity"]["tuned"],
    }
    assert r["tuned_n"] == 2 and r["tuned_std"] > 0


def test_diversity_figure(monkeypatch, capsys):
    from rebel_diffusion.outputs import evaluate
    from rebel_diffusion.outputs.evaluate import load_diversity_model, pairwise_diversity, parse_reward_names

    same = torch.ones(3, 4, 8)
    assert pairwise_diversity(same) == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.eye(4)[None]  # one prompt, 4 orthogonal embeddings: distance 1 each
    assert pairwise_diversity(orthogonal) == pytest.approx(1.0)
    assert pairwise_diversity(torch.stack([same[0], torch.eye(4, 8)])) == pytest.approx(0.5)
    assert load_diversity_model("none") is None
    assert "pixels" in load_diversity_model("pixels").name
    with pytest.raises(UsageError, match="--diversity-model"):
        load_diversity_model("resnet")
    # auto, offline and with nothing cached: pixels at once, and a warning that says so.
    monkeypatch.setattr(evaluate, "_cached_weights", lambda *a: None)
    monkeypatch.setattr(evaluate, "_hub_reachable", lambda *a: False)
    assert load_diversity_model("auto").name.startswith("pixels")
    assert "diversity uses pixel embeddings, not CLIP" in capsys.readouterr().err
    assert parse_reward_names(None, "aesthetic") == ["aesthetic", "jpeg-compressibility", "jpeg-incompressibility"]
    assert parse_reward_names("clip, clip,aesthetic", None) == ["clip", "aesthetic"]


def test_an_old_run_samples_and_evaluates_as_configured(run_dir, two_prompts, tmp_path):
    """config.yaml with the field names of the previous release (eval_prompts, eval_rewards): sample
    draws its grid prompts and eval scores its held-out rewards, as a run of today would."""
    import shutil

    run = tmp_path / "old_run"
    shutil.copytree(run_dir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["eval_prompts"] == "heldout_animals" and "grid_prompts" not in cfg
    cfg["eval_rewards"] = "jpeg-incompressibility"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    assert cli.main(["sample", "--run", str(run), "--quiet"]) == 0
    manifest = json.loads((run / "samples" / "samples.json").read_text())
    assert manifest["prompts"] == "heldout_animals" and manifest["settings"]["num_steps"] == STEPS
    args = ["--prompts", str(two_prompts), "--num-images", "1", "--diversity-model", "none", "--quiet"]
    assert cli.main(["eval", "--run", str(run), *args]) == 0
    assert set(json.loads((run / "eval" / "eval.json").read_text())["rewards"]) == {"jpeg-incompressibility"}


def test_a_bad_run_config_is_one_line_naming_it(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "no_such_field: 2\n")
    for command in ("sample", "eval"):
        assert cli.main([command, "--run", str(run), "--prompts", "simple_animals"]) == 2
        line = error_line(capsys, command)
        assert str(run / "config.yaml") in line and "unknown config field(s) no_such_field" in line


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2


def test_run_folder_without_weights(tmp_path, capsys):
    empty = make_fake_run(tmp_path / "empty_run", lora=False)
    assert cli.main(["sample", "--run", str(empty), "--prompt", "a cat", "--quiet"]) == 2
    assert "no fine-tuned weights" in error_line(capsys, "sample")
    assert cli.main(["sample", "--run", str(tmp_path / "nope"), "--prompt", "a cat"]) == 2
    assert "no such folder" in error_line(capsys, "sample")
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2
    assert "not a training run folder" in error_line(capsys, "eval")


def test_lora_that_does_not_fit_the_model(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    bad = {
        k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora.down" in k or "lora_A" in k else v
        for k, v in weights.items()
    }
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"))
    rc = cli.main(
        [
            "sample",
            "--model",
            "tiny",
            "--finetune",
            str(tmp_path / "bad"),
            "--prompt",
            "a cat",
            "--num-steps",
            "1",
            "--quiet",
        ]
    )
    assert rc == 2
    line = error_line(capsys, "sample")
    assert "does not fit the model tiny" in line and "size" in line.lower()


def test_unknown_reward_in_eval(run_dir, capsys, tmp_path):
    rc = cli.main(
        [
            "eval",
            "--run",
            str(run_dir),
            "--rewards",
            "jpeg-compressibility,beauty",
            "--output-dir",
            str(tmp_path / "e"),
        ]
    )
    assert rc == 2
    assert "unknown reward 'beauty'" in error_line(capsys, "eval")
    assert not (tmp_path / "e").exists()  # failed before sampling anything


def test_other_bad_input(run_dir, capsys):
    assert cli.main(["sample", "--run", str(run_dir), "--prompts", "no_such_set"]) == 2
    assert "no packaged prompt set" in error_line(capsys, "sample")
    assert cli.main(["sample", "--run", str(run_dir), "--prompt", "x", "--seeds", "1", "1"]) == 2
    assert "repeats" in error_line(capsys, "sample")
    assert cli.main(["eval", "--model", "tiny"]) == 2
    assert "--finetune" in error_line(capsys, "eval")
    assert cli.main(["eval", "--run", str(run_dir), "--diversity-model", "resnet"]) == 2
    assert "--diversity-model resnet" in error_line(capsys, "eval")


def test_sample_old_eta_flag_is_ddim_eta_with_a_warning(tmp_path, capsys):
    out = tmp_path / "s"
    rc = cli.main(
        [
            "sample",
            "--model",
            "tiny",
            "--num-steps",
            str(STEPS),
            "--resolution",
            "32",
            "--quiet",
            "--prompt",
            "a cat",
            "--eta",
            "0.5",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    assert "--eta is deprecated" in capsys.readouterr().err
    assert json.loads((out / "samples.json").read_text())["settings"]["ddim_eta"] == 0.5


def test_sample_and_eval_check_their_folder_before_drawing(run_dir, tmp_path, capsys):
    """A used --output-dir is refused in one line (the earlier PNGs stay as they were); the default
    folder moves on to samples_2; a file on the way fails before any image is drawn."""
    args = ["--prompt", "a cat", "--seeds", "0", "--quiet"]
    out = tmp_path / "s"
    assert cli.main(["sample", "--run", str(run_dir), *args, "--output-dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["sample", "--run", str(run_dir), "--prompt", "a dog", "--seeds", "5", "--quiet",
                     "--output-dir", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "already holds samples of an earlier call" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the default folder: RUN/samples, then RUN/samples_2
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for folder in ("samples", "samples_2"):
        assert cli.main(["sample", "--run", str(run), *args]) == 0
        assert (run / folder / "samples.json").is_file()
    capsys.readouterr()
    # a file where a folder should be: one line, before any image is drawn
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for command in ("sample", "eval"):
        extra = ["--diversity-model", "pixels", "--num-images", "2"] if command == "eval" else args
        code = cli.main([command, "--run", str(run_dir), *extra, "--output-dir", str(blocker / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "is a file, not a folder" in err and "sampling" not in err, err


# --- CPU threads --------------------------------------------------------------------------------


def test_default_threads_are_the_idle_cpus(monkeypatch):
    """The default thread count is what /proc/stat shows idle over its window, shared among the
    local processes; without /proc/stat, the CPUs less the load average."""
    from rebel_diffusion.outputs import generation

    assert 0 <= generation.idle_cpus(0.01) <= (generation.os.cpu_count() or 1)  # a real reading
    monkeypatch.setattr(generation.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(generation.time, "sleep", lambda s: None)
    default = _real_default_threads

    def ticks(*readings):  # each window reads them in turn
        it = itertools.cycle(readings)
        monkeypatch.setattr(generation, "_cpu_times", lambda cpus: next(it))

    ticks((100, 200), (300, 400))  # both CPUs idle over the window
    assert generation.idle_cpus() == 2.0 and default() == 2 and default(2) == 1
    ticks((100, 200), (200, 400))  # one CPU busy with other work
    assert generation.idle_cpus() == 1.0 and default() == 1
    ticks((100, 200), (110, 400))  # both busy: still one thread
    assert default() == 1
    ticks(None)  # no /proc/stat: the load average
    monkeypatch.setattr(generation.os, "getloadavg", lambda: (0.3, 0.0, 0.0))
    assert generation.idle_cpus() == pytest.approx(1.7) and default() == 2


def test_cpu_times_sum_the_affine_cpus(tmp_path, monkeypatch):
    """Only the per-CPU lines of the CPUs this process may run on count; idle includes iowait."""
    from rebel_diffusion.outputs import generation

    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 1 2 3 40 5 0 0 0 0 0\ncpu1 10 0 0 100 0 0 0 0 0 0\ncpu2 7 0 0 1 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    real_path = generation.Path
    monkeypatch.setattr(generation, "Path", lambda p: stat if p == "/proc/stat" else real_path(p))
    assert generation._cpu_times({0, 1}) == (145, 161)
    assert generation._cpu_times({2}) == (1, 8)
    assert generation._cpu_times({5}) is None
