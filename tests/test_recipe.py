"""The training recipe end to end on the tiny model: outputs, resume, refusals, multi-process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rebel_diffusion.cli import main
from rebel_diffusion.config import TrainConfig
from rebel_diffusion.rewards import reward_function
from rebel_diffusion.training.recipe import TIME_KEYS, epoch_prompts, setup, shuffled_passes, train_epoch

# A run of seconds: 2 prompts x 2 images, 3 steps, 32x32.
SMALL = [
    "--model", "tiny", "--reward", "jpeg-compressibility", "--num-steps", "3", "--prompts-per-batch", "2",
    "--batches-per-epoch", "1", "--train-batch-size", "1", "--gradient-accumulation-steps", "2",
    "--grid-num-images", "2", "--guidance-scale", "2.0", "--learning-rate", "1e-3",
]  # fmt: skip


def small_config(out: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        model="tiny", reward="jpeg-compressibility", num_steps=3, prompts_per_batch=2, batches_per_epoch=1,
        train_batch_size=1, gradient_accumulation_steps=2, grid_num_images=2, guidance_scale=2.0,
        learning_rate=1e-3, output_dir=str(out),
    )  # fmt: skip
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    assert main(["train", *SMALL, "--epochs", "2", "--output-dir", str(out)]) == 0
    return out


def test_run_writes_every_output(finished_run):
    out = finished_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "tiny" and cfg["epochs"] == 2 and cfg["algorithm"] == "rebel"
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        for key in ("reward_mean", "reward_std", "grid_reward_mean", "loss", "images_per_second", "rescore_drift"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert r["rescore_drift"] <= 1e-5  # fp32: re-scoring reproduces the recorded log-probs
    assert records[0]["grid_reward_mean"] == records[0]["grid_reward_mean"]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_loads_into_plain_diffusers_pipeline(finished_run):
    from rebel_diffusion.models import build_tiny_pipeline

    base = build_tiny_pipeline()
    tuned = build_tiny_pipeline()
    tuned.load_lora_weights(str(finished_run / "lora"))
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, height=32, width=32, output_type="pt")
    a = base(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = tuned(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (a - b).abs().max() > 1e-6  # the trained LoRA changes the images


def test_update_changes_lora_and_not_base_weights(tmp_path):
    run = setup(small_config(tmp_path / "run"))
    unet = run.accelerator.unwrap_model(run.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    metrics = train_epoch(run, 1)
    assert metrics["optimizer_steps"] == 2 and metrics["loss"] > 0  # 2 prompts, 1 a step
    lora_changed = base_changed = 0
    for n, p in unet.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if "lora_" in n:
            lora_changed += changed
        else:
            base_changed += changed
    assert lora_changed > 0 and base_changed == 0


@pytest.mark.parametrize("algorithm", ["rebel", "ddpo"])
def test_startup_line_states_the_step_size_in_both_units_and_the_batches(tmp_path, algorithm):
    from rebel_diffusion.training.reporting import describe_plan

    run = setup(small_config(tmp_path / "run", algorithm=algorithm))  # tiny: D = 4 x 8 x 8 = 256
    text = describe_plan(run)
    if algorithm == "rebel":
        assert "eta 2 nats of trajectory log-likelihood per unit advantage (= 0.00781 per latent dim, D = 256)" in text
        assert "per epoch: 4 images, 2 pairs, 2 optimizer steps of 2 micro-batch(es) x 1 images (1 prompts" in text
    else:
        assert "PPO clip range 0.00625 of the per-dim mean log-prob ratio (= 1.6 nats per step, D = 256)" in text
        assert "per epoch: 4 images, 2 optimizer steps of 2 micro-batch(es) x 1 images, " in text
    assert "std floor 1 x batch std" in text and "KL to the base model x 0.1" in text
    assert "weighted per step" not in text  # uniform: nothing to say
    weighted = setup(small_config(tmp_path / "w", algorithm=algorithm, policy_step_weights="linear:2,0"))
    assert "policy term weighted per step linear:2,0" in describe_plan(weighted)


@pytest.mark.parametrize("sampling", ["replacement", "shuffle"])
def test_resume_repeats_an_uninterrupted_run(tmp_path, sampling):
    full, split = tmp_path / "full", tmp_path / "split"
    flags = [*SMALL, "--prompt-sampling", sampling, "--prompts", str(_prompt_file(tmp_path, 3))]
    assert main(["train", *flags, "--epochs", "4", "--output-dir", str(full)]) == 0
    assert main(["train", *flags, "--epochs", "2", "--output-dir", str(split)]) == 0
    assert main(["train", "--resume", "--epochs", "4", "--output-dir", str(split)]) == 0
    a, b = without_time(read_metrics(full)), without_time(read_metrics(split))
    assert [r["epoch"] for r in b] == [0, 1, 2, 3, 4]
    assert a == b


def _prompt_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a photo of thing {i}\n" for i in range(count)))
    return path


def test_shuffled_passes_show_every_prompt_once_a_pass():
    stream = shuffled_passes(7, seed=3, start=0, count=35)  # (35,): five passes
    passes = stream.reshape(5, 7)
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # each pass its own order
    for start, count in ((0, 3), (5, 9), (14, 7), (20, 15)):  # any window: the same stream, across passes
        assert shuffled_passes(7, seed=3, start=start, count=count).tolist() == stream[start : start + count].tolist()
    assert shuffled_passes(7, seed=4, start=0, count=35).tolist() != stream.tolist()


@pytest.mark.parametrize("processes", [1, 2])
def test_shuffled_prompt_sampling_draws_every_prompt_equally_often(processes):
    from collections import Counter
    from types import SimpleNamespace

    prompts = [f"prompt {i}" for i in range(10)]
    cfg = TrainConfig(prompts_per_batch=3, batches_per_epoch=2, prompt_sampling="shuffle", seed=5)
    counts, batches = Counter(), []
    for epoch in range(1, 6):  # 5 epochs x 2 batches x 3 prompts x processes
        for batch in range(cfg.batches_per_epoch):
            drawn = []
            for rank in range(processes):
                run = SimpleNamespace(
                    cfg=cfg, prompts=prompts, accelerator=SimpleNamespace(num_processes=processes, process_index=rank)
                )
                drawn += epoch_prompts(run, epoch, batch)
            batches.append(drawn)
            counts.update(drawn)
    assert sum(counts.values()) == 30 * processes
    assert set(counts.values()) == {3 * processes}  # 3 or 6 whole passes: each prompt as often
    # The processes split one stream: their batches together are its consecutive slices.
    stream = shuffled_passes(10, seed=5, start=0, count=30 * processes)
    assert [p for drawn in batches for p in drawn] == [prompts[i] for i in stream]


def test_refuses_existing_output_dir_and_touches_nothing(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    assert main(["train", *SMALL, "--output-dir", str(finished_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--resume" in err and len(err.splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before


def test_overwrite_replaces_a_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--output-dir", str(out)]) == 0
    (out / "old.txt").write_text("x")
    assert main(["train", *SMALL, "--epochs", "1", "--seed", "1", "--overwrite", "--output-dir", str(out)]) == 0
    assert not (out / "old.txt").exists() and (out / "lora").is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward", "no-such-reward"], "no-such-reward"),
        (["--prompts", "/nonexistent/prompts.txt"], "prompts"),
        (["--epochs", "0"], "--epochs"),
        (["--images-per-prompt", "1"], "pairs"),
        (["--train-batch-size", "3"], "do not divide"),
        (["--gradient-accumulation-steps", "1"], "whole prompts"),  # 1 image a step; k = 2
        (["--ddim-eta", "0"], "eta"),
        (["--timestep-fraction", "1.5"], "timestep-fraction"),
        (["--steps-per-pass", "0"], "--steps-per-pass"),
        (["--resume"], "config.yaml"),
        (["--resume", "--overwrite"], "exclude"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_out_of_memory_is_one_line_that_says_what_to_lower(tmp_path, capsys, monkeypatch):
    import rebel_diffusion.training.recipe as train_module

    def oom(run, epoch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(train_module, "train_epoch", oom)
    assert main(["train", *SMALL, "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 1
    # Besides the progress bar (carriage-return updates), the error is one line, the last.
    lines = [line for line in capsys.readouterr().err.strip().split("\n") if "\r" not in line and line]
    err = lines[-1]
    assert [line for line in lines if "error" in line] == [err] and "out of memory" in err, lines
    assert "--steps-per-pass" in err and "--train-batch-size" in err
    assert "no checkpoint was written yet: run the same command again" in err  # epoch 1: nothing to resume


def test_unknown_algorithm_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--algorithm", "ppo2"])
    assert e.value.code == 2


def test_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["train", *SMALL, "--prompts", str(empty), "--output-dir", str(tmp_path / "run")]) == 2
    assert "empty" in capsys.readouterr().err


def test_resume_without_checkpoint_and_corrupt_checkpoint(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    # a corrupt checkpoint: truncated weights
    weights = copy / "checkpoints" / "epoch_0002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and len(err.splitlines()) == 1
    assert "the one before it, epoch_0001, is complete: move epoch_0002 out of checkpoints/" in err
    shutil.move(copy / "checkpoints" / "epoch_0002", tmp_path / "damaged")  # as the message says
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(copy)]) == 0
    # no checkpoint at all
    shutil.rmtree(copy / "checkpoints")
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(copy)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@reward_function
def nan_reward(images, prompts):
    """A plug-in reward whose first image scores NaN (tests the non-finite guard)."""
    r = images.mean(dim=(1, 2, 3)).float()
    r[0] = float("nan")
    return r


def test_nonfinite_rewards_are_dropped_and_counted(tmp_path):
    out = tmp_path / "run"
    assert (
        main(["train", *SMALL, "--epochs", "1", "--reward", "test_recipe:nan_reward", "--output-dir", str(out)]) == 0
    )
    record = read_metrics(out)[-1]
    assert record["reward_nonfinite"] >= 1
    assert record["loss"] == record["loss"] and record["reward_mean"] == record["reward_mean"]  # finite


@pytest.mark.parametrize(
    "extra",
    [
        ["--algorithm", "ddpo", "--train-batch-size", "2"],
        ["--preference", "bradley-terry", "--timestep-fraction", "0.5", "--images-per-prompt", "3",
         "--train-batch-size", "3"],
        ["--finetune", "full", "--normalization", "batch", "--inner-epochs", "2"],
        ["--heldout-every", "1", "--heldout-diversity", "pixels", "--heldout-rewards", "jpeg-incompressibility"],
        ["--mixed-precision", "bf16", "--gradient-checkpointing", "--log-with", "tensorboard"],
    ],
)  # fmt: skip
def test_variants_run(tmp_path, extra):
    from helpers import diffusers_log

    out = tmp_path / "run"
    argv = ["train", *SMALL, "--epochs", "1", "--output-dir", str(out), *extra]
    if "--mixed-precision" in extra:  # accelerate fixes the precision once per process: a fresh one
        result = subprocess.run(
            [sys.executable, "-m", "rebel_diffusion", *argv], env=_env(), capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        with diffusers_log() as log:
            assert main(argv) == 0
        assert not [m for m in log if "should be kept in float32" in m]  # diffusers' warning on .to(dtype)
    records = read_metrics(out)
    record = records[-1]
    assert record["loss"] == record["loss"]
    if "--heldout-every" in extra:  # held-out figures before training and after each epoch
        for r in records:
            assert "heldout/jpeg-incompressibility" in r and "heldout/diversity" in r
    if "bf16" in extra:  # bf16 sampling vs bf16 re-scoring: the drift is measured, finite
        assert record["rescore_drift"] == record["rescore_drift"]
    if "tensorboard" in extra:  # scalars and the grid went to TensorBoard
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
        events.Reload()
        assert "reward_mean" in events.Tags()["scalars"] and "grid" in events.Tags()["images"]
    if "full" in extra:
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel.from_pretrained(str(out / "unet"))  # diffusers itself reloads it


FP16_CHECK = """
import sys, torch
from pathlib import Path
from test_recipe import small_config
from rebel_diffusion.training.recipe import setup, train_epoch
run = setup(small_config(Path(sys.argv[1]), mixed_precision="fp16"))
unet = run.accelerator.unwrap_model(run.unet)
before = {n: p.detach().clone() for n, p in unet.named_parameters()}
trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
assert trainable and all(unet.get_parameter(n).dtype == torch.float32 for n in trainable)
assert all(p.dtype == torch.float16 for n, p in unet.named_parameters() if n not in trainable)
m = train_epoch(run, 1)
assert m["loss"] == m["loss"] and m["grad_norm"] == m["grad_norm"], m
after = dict(unet.named_parameters())
assert all(not torch.equal(after[n], before[n]) for n in trainable)  # every LoRA tensor moved
assert all(torch.equal(after[n], before[n]) for n in before if n not in trainable)  # the base did not
print("fp16 ok")
"""


@pytest.mark.slow
def test_fp16_trains_fp32_lora_on_a_frozen_fp16_unet(tmp_path):
    """--mixed-precision fp16 (a fresh process: accelerate fixes the precision once per process).

    On a CPU accelerate runs fp16 without a GradScaler; on a GPU it adds one (not testable here).
    """
    result = subprocess.run(
        [sys.executable, "-c", FP16_CHECK, str(tmp_path / "run")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "fp16 ok" in result.stdout, result.stderr[-3000:]


def test_config_file_and_flags(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"epochs": 1, "num_steps": 2, "eta": 0.5, "inner_epochs": 2}))
    assert main(["train", *SMALL, "--config", str(config), "--eta", "0.25", "--output-dir", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["inner_epochs"] == 2  # from the file
    assert saved["num_steps"] == 3 and saved["eta"] == 0.25  # flags beat the file


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_two_processes_one_set_of_outputs(tmp_path):
    """A 2-process run (gloo on the CPU) writes one set of outputs, and it resumes as 2 processes."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        "-m", "rebel_diffusion", "train", *SMALL, "--output-dir", str(out),
    ]  # fmt: skip
    first = subprocess.run([*cmd, "--epochs", "1"], env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es)" in first.stdout
    checkpoint = out / "checkpoints" / "epoch_0001"
    assert (checkpoint / "rng_0.pt").is_file() and (checkpoint / "rng_1.pt").is_file()
    resumed = subprocess.run(
        [*cmd, "--epochs", "2", "--resume"], env=_env(), capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(from epoch 2)" in resumed.stdout, resumed.stdout[-3000:]
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]  # one writer
    assert records[1]["images"] == 8 and records[1]["pairs"] == 4  # both processes' samples
    assert (out / "checkpoints" / "epoch_0002" / "rng_1.pt").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_model_cards_code_runs_as_written(finished_run, monkeypatch):
    """The card's own Python, run from the run folder, loads the built-in base and the LoRA; the card
    names the sampler that ran (not 'auto') and mentions no held-out figures when there are none."""
    card = (finished_run / "lora" / "README.md").read_text()
    assert " ddim steps" in card and " auto steps" not in card
    assert "Held-out" not in card and "moving average" not in card
    code = card.split("```python\n")[1].split("```")[0]
    assert "DiffusionPipeline.from_pretrained" not in code  # a built-in base is not a hub id
    monkeypatch.chdir(finished_run)
    namespace = {}
    exec(code, namespace)
    pipe = namespace["pipe"]
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().max() > 0 for p in lora.values())  # the trained LoRA, applied


def test_ema_is_checkpointed_exported_and_resumes_exactly(tmp_path):
    """--ema-decay: the checkpoint keeps the EMA beside the raw weights, the exported LoRA is the
    EMA (not the last weights), and a resumed run ends with the same EMA as an uninterrupted one."""
    from safetensors.torch import load_file

    from rebel_diffusion.models import build_tiny_pipeline, lora_state_dict
    from rebel_diffusion.outputs import run_folder
    from rebel_diffusion.outputs.run_folder import apply_checkpoint

    ema = ["--ema-decay", "0.5"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", *SMALL, *ema, "--epochs", "3", "--output-dir", str(full)]) == 0
    assert main(["train", *SMALL, *ema, "--epochs", "2", "--output-dir", str(split)]) == 0
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(split)]) == 0
    last_full, last_split = run_folder.latest_checkpoint(full), run_folder.latest_checkpoint(split)
    ema_full, raw = load_file(str(last_full / "ema.safetensors")), load_file(str(last_full / "trainable.safetensors"))
    ema_split = load_file(str(last_split / "ema.safetensors"))
    assert ema_full.keys() == raw.keys() and all(torch.equal(ema_full[k], ema_split[k]) for k in ema_full)
    assert any(not torch.equal(ema_full[k], raw[k]) for k in raw)  # an average, not the last weights
    assert without_time(read_metrics(full)) == without_time(read_metrics(split))
    # The exported LoRA and a checkpoint applied for sampling both hold the EMA.
    pipe = build_tiny_pipeline()
    apply_checkpoint(pipe, last_full)
    applied = {n: p for n, p in pipe.unet.named_parameters() if n in ema_full}
    assert all(torch.equal(applied[n].detach(), ema_full[n]) for n in ema_full)
    assert "exponential moving average (decay 0.5)" in (full / "lora" / "README.md").read_text()
    exported = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    expected = lora_state_dict(pipe.unet)
    assert all(torch.allclose(exported["unet." + k], v) for k, v in expected.items())


@pytest.mark.parametrize("combine", ["sum", "normalized"])
def test_several_rewards_are_logged_and_combined(tmp_path, combine):
    """--reward a=w,b=w: each component's mean is logged; with 'sum' the reward is their weighted sum."""
    out = tmp_path / "run"
    reward = "jpeg-compressibility=1,jpeg-incompressibility=0.25"
    assert (
        main(
            [
                "train",
                *SMALL,
                "--reward",
                reward,
                "--reward-combine",
                combine,
                "--epochs",
                "1",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    record = read_metrics(out)[-1]
    a, b = record["reward/jpeg-compressibility"], record["reward/jpeg-incompressibility"]
    assert abs(a + b) < 1e-5  # the two are each other's negatives
    assert record["reward_mean"] == pytest.approx(a + 0.25 * b, abs=1e-5)
    assert yaml.safe_load((out / "config.yaml").read_text())["reward"] == reward


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_base_anchor_stays_the_base_after_a_resume(tmp_path, finetune):
    """--anchor base: the log-probs it regresses against are the untrained model's, resumed or not; and
    a resumed run repeats an uninterrupted one."""
    from rebel_diffusion.models import load_pipeline
    from rebel_diffusion.sampling import rescore_log_probs
    from rebel_diffusion.training.plans import run_trained_steps
    from rebel_diffusion.training.recipe import sample_epoch
    from rebel_diffusion.training.reference import base_log_probs, base_unet

    extra = ["--anchor", "base", "--kl-coef", "0", "--finetune", finetune]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", *SMALL, *extra, "--epochs", "3", "--output-dir", str(full)]) == 0
    assert main(["train", *SMALL, *extra, "--epochs", "2", "--output-dir", str(split)]) == 0
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(split)]) == 0
    a, b = without_time(read_metrics(full)), without_time(read_metrics(split))
    assert a == b and all(r["log_ratio_to_base"] == r["log_ratio_to_base"] for r in a[1:])

    cfg = small_config(split, anchor="base", kl_coef=0.0, finetune=finetune, resume=True, epochs=4)
    run = setup(cfg)  # the trained weights of epoch 3 are loaded
    traj = sample_epoch(run, 4)
    steps = run_trained_steps(run, traj)
    pristine = load_pipeline("tiny").unet
    expected = rescore_log_probs(pristine, run.scheduler, traj, steps)
    torch.testing.assert_close(base_log_probs(run, traj, steps)[:, steps], expected, rtol=0, atol=1e-5)
    trained = rescore_log_probs(run.accelerator.unwrap_model(run.unet), run.scheduler, traj, steps)
    assert (trained - expected).abs().max() > 1e-4  # the policy itself has moved
    with base_unet(run) as unet:  # full fine-tune: a frozen copy; LoRA: the trained UNet, adapters off
        assert (unet is run.ref_unet) == (finetune == "full")


def test_logs_read_well_in_a_file(tmp_path, capsys):
    """Not on a terminal (pytest's capture, nohup, SLURM): no progress bars or cursor codes, one line
    an epoch with the held-out figures when there are some, every line ended; --quiet leaves only
    warnings and errors; --progress bar brings the bars back."""
    heldout = ["--heldout-every", "1", "--heldout-rewards", "jpeg-compressibility", "--heldout-images", "1",
               "--heldout-diversity", "none", "--heldout-prompts", "simple_animals"]  # fmt: skip
    assert main(["train", *SMALL, *heldout, "--epochs", "1", "--output-dir", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "\x1b[" not in out + err, (out + err)[-500:]
    assert out.endswith("\n") and (not err or err.endswith("\n"))
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and epochs[0].startswith("epoch 0 (base): grid ")
    assert all("held-out: jpeg-compressibility " in line for line in epochs), epochs
    assert main(["train", *SMALL, "--epochs", "1", "--quiet", "--output-dir", str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err, (out, err)
    assert main(["train", *SMALL, "--epochs", "1", "--progress", "bar", "--output-dir", str(tmp_path / "b")]) == 0
    assert "\r" in capsys.readouterr().err  # the bars, asked for


def test_kl_prompts_price_only_their_images(tmp_path):
    """--kl-prompts: every training prompt listed is the plain KL term, bit for bit; half of them
    listed change the run (the others' images are free) and still pay some KL. (Which images the
    term covers, and its exact gradient: ``test_updates``.)"""
    kl = ["--epochs", "2", "--kl-coef", "0.5", "--anchor", "policy"]
    prompts = (Path(__file__).parents[1] / "prompts" / "simple_animals.txt").read_text().split("\n")
    every, some = tmp_path / "every.txt", tmp_path / "some.txt"
    every.write_text("\n".join(prompts))
    some.write_text("\n".join(p for p in prompts if p and p[0] in "abcdefghijklm"))
    runs = {}
    for name, extra in (("plain", []), ("every", ["--kl-prompts", str(every)]), ("some", ["--kl-prompts", str(some)])):
        assert main(["train", *SMALL, *kl, "--output-dir", str(tmp_path / name), *extra]) == 0
        runs[name] = read_metrics(tmp_path / name)[-1]
    assert without_time([runs["every"]]) == without_time([runs["plain"]])
    assert runs["some"]["kl"] > 0 and runs["some"]["kl"] != runs["plain"]["kl"]


def test_the_kl_term_reuses_the_base_anchors_step_means(tmp_path):
    """--anchor base with a KL term: the base's step means kept from the anchor's pass are the ones a
    base forward gives at the recorded x_t, for any images and steps; a step the anchor did not score
    takes the forward."""
    from rebel_diffusion.sampling import steps_log_prob
    from rebel_diffusion.training.plans import run_trained_steps
    from rebel_diffusion.training.recipe import sample_epoch
    from rebel_diffusion.training.reference import base_log_probs, base_unet, cached_reference_mean, reference_mean

    run = setup(small_config(tmp_path / "run", anchor="base", kl_coef=0.1, num_steps=5, min_step_std=0.0))
    traj = sample_epoch(run, 0)
    with torch.no_grad():  # move the LoRA weights off zero, so that "the base" is not the policy
        for p in run.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = run_trained_steps(run, traj)
    assert len(trained) >= 4
    logp, means = base_log_probs(run, traj, trained[1:], with_mean=True)  # (B, T), (B, S, C, h, w)
    assert means.shape == (len(traj), len(trained) - 1, *traj.latents.shape[2:])
    torch.testing.assert_close(logp, base_log_probs(run, traj, trained[1:]), rtol=0, atol=0)
    calls = []

    def forward(group, index):
        calls.append(group)
        return reference_mean(run, traj)(group, index)

    cached = cached_reference_mean(means, trained[1:], forward)
    index = torch.tensor([len(traj) - 1, 0])
    for group in ([trained[-1]], trained[1:3], [trained[0], trained[1]]):
        with torch.no_grad(), base_unet(run) as unet:
            expected = steps_log_prob(unet, run.scheduler, traj, group, index=index, with_mean=True)[1]
        with torch.no_grad():
            policy = steps_log_prob(run.unet, run.scheduler, traj, group, index=index, with_mean=True)[1]
            got = cached(group, index)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert (policy - expected).abs().max() > 1e-4  # the cache holds the base, not the policy
    assert calls == [[trained[0], trained[1]]]  # the one group with a step the anchor did not score


@pytest.mark.parametrize("flags", [["--anchor", "policy"], ["--algorithm", "ddpo"]], ids=["policy anchor", "ddpo"])
def test_a_guided_sampler_needs_the_base_anchor(tmp_path, capsys, flags):
    """--sample-guidance-scale: REBEL with --anchor base only (the other losses' optima depend on who
    drew the samples); one line, exit 2, nothing written."""
    out = tmp_path / "run"
    assert main(["train", *SMALL, *flags, "--sample-guidance-scale", "3", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sample-guidance-scale 3 needs REBEL with --anchor base" in err[0]
    assert not out.exists()


@torch.no_grad()
def test_a_guided_samplers_images_are_scored_by_the_policy(tmp_path):
    """--sample-guidance-scale 3 --guidance-scale 1: the epoch's images are the guidance-3 sampler's,
    and the log-probs the update sees are the policy's at guidance 1 (an independent closed-form DDIM
    Gaussian of the plain conditional UNet), not the sampler's; a run with it trains."""
    from step_references import ddim_reference, normal_log_prob

    from rebel_diffusion.sampling import sample_trajectories
    from rebel_diffusion.training.recipe import epoch_prompts, epoch_seeds, policy_scored, sample_epoch

    cfg = small_config(tmp_path / "run", anchor="base", guidance_scale=1.0, sample_guidance_scale=3.0)
    run = setup(cfg)
    drawn = sample_epoch(run, 1)
    n = cfg.prompts_per_batch * cfg.images_per_prompt
    expected = sample_trajectories(
        run.pipe, epoch_prompts(run, 1, 0), images_per_prompt=cfg.images_per_prompt,
        seeds=epoch_seeds(run, 1, 0, n), settings=run.settings.__class__(**{
            **run.settings.__dict__, "guidance_scale": 3.0}),
    )  # fmt: skip
    torch.testing.assert_close(drawn.latents, expected.latents)
    assert drawn.settings.guidance_scale == 3.0 and drawn.negative_embeds is not None

    scored = policy_scored(run, drawn)
    assert scored.settings == run.settings and scored.settings.guidance_scale == 1.0
    assert scored.negative_embeds is None  # guidance 1 has no unconditional pass to pay for
    torch.testing.assert_close(scored.latents, drawn.latents, rtol=0, atol=0)
    unet, steps = run.accelerator.unwrap_model(run.unet), drawn.stochastic_steps()
    gap = 0.0
    for i in range(len(drawn)):
        for j in steps:
            x, t = drawn.latents[i : i + 1, j], int(drawn.timesteps[j])
            out = unet(x, t, encoder_hidden_states=drawn.prompt_embeds[i : i + 1]).sample  # guidance 1: no CFG
            mean, std, _ = ddim_reference(run.scheduler, out, t, x, cfg.ddim_eta)
            ref = normal_log_prob(drawn.latents[i : i + 1, j + 1].double(), mean, std)
            torch.testing.assert_close(scored.log_probs[i, j : j + 1].double(), ref, rtol=1e-5, atol=1e-5)
            gap = max(gap, abs(float(scored.log_probs[i, j] - drawn.log_probs[i, j])))
    assert gap > 1e-3  # the sampler's log-probs are not the policy's

    out = tmp_path / "trained"
    flags = ["--anchor", "base", "--guidance-scale", "1", "--sample-guidance-scale", "3", "--epochs", "2"]
    with torch.enable_grad():
        assert main(["train", *SMALL, *flags, "--output-dir", str(out)]) == 0
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(r["loss"] == r["loss"] and r["rescore_drift"] < 1e-4 for r in records[1:])
    assert yaml.safe_load((out / "config.yaml").read_text())["sample_guidance_scale"] == 3.0
