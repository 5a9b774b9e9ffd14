"""Nothing a user wrote is lost: --overwrite, --resume, bad numbers, broken rewards, OS faults and
signals each end in one line, a documented exit code, and the run folder as it was (or a checkpoint)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rebel_diffusion.cli import main
from rebel_diffusion.outputs import run_folder

SMALL = [
    "--model", "tiny", "--reward", "jpeg-compressibility", "--num-steps", "3", "--prompts-per-batch", "2",
    "--batches-per-epoch", "1", "--train-batch-size", "1", "--gradient-accumulation-steps", "2",
    "--grid-num-images", "2", "--guidance-scale", "2.0", "--learning-rate", "1e-3",
]  # fmt: skip


def train(out, *args):
    return main(["train", *SMALL, "--output-dir", str(out), *args])


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch run, copied fresh for each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out, "--epochs", "1") == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


# --- --overwrite ---------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    (out / "notes.txt").write_text("n")
    assert train(out, "--epochs", "1", "--overwrite") == 2
    assert "not a rebel-diffusion run" in one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "n" and sorted(os.listdir(out)) == ["notes.txt"]


def test_overwrite_never_deletes_the_current_folder(run_copy, monkeypatch, capsys):
    before = snapshot(run_copy)
    monkeypatch.chdir(run_copy)
    assert main(["train", *SMALL, "--epochs", "1", "--overwrite", "--output-dir", "."]) == 2
    assert "current, home or root" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_overwrite_deletes_nothing_when_a_later_check_fails(run_copy, capsys):
    before = snapshot(run_copy)
    assert train(run_copy, "--epochs", "1", "--overwrite", "--resolution", "33") == 2
    one_line_error(capsys)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flags", [["--num-steps", "1"], ["--min-step-std", "10"]], ids=["one-step", "min-std"])
def test_overwrite_keeps_the_old_run_when_no_step_is_left_to_train(run_copy, tmp_path, capsys, flags):
    """Known from the scheduler before anything is written: the old run stays, a new folder is not made."""
    before = snapshot(run_copy)
    assert train(run_copy, "--epochs", "1", "--overwrite", *flags) == 2
    assert "no step left to train" in one_line_error(capsys)
    assert snapshot(run_copy) == before
    assert train(tmp_path / "new", "--epochs", "1", *flags) == 2
    one_line_error(capsys)
    assert not (tmp_path / "new").exists()


def test_overwrite_keeps_the_old_run_when_the_reward_server_fails(run_copy, capsys):
    """The reward's first answer comes before any write: a server answering 500 deletes nothing."""
    from test_reward_server import scripted_server

    before = snapshot(run_copy)
    with scripted_server(500, b'{"error": "the judge model crashed"}') as (server, url):
        code = main(["train", *SMALL, "--reward", url, "--epochs", "1", "--overwrite", "--output-dir", str(run_copy)])
    assert code == 1 and "HTTP 500" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_a_stop_before_the_first_checkpoint_is_no_dead_end(tmp_path, capsys):
    """A run that stopped before its first checkpoint says so, --resume points to the command that
    works, and that command (no --overwrite needed) starts the run again."""
    out = tmp_path / "run"
    assert train(out, "--reward", "plugin_reward:nan_reward", "--epochs", "1") == 1
    err = one_line_error(capsys)
    assert "no checkpoint was written yet: run the same command again" in err and "intact" not in err
    assert run_folder.is_run_folder(out) and run_folder.latest_checkpoint(out) is None
    assert main(["train", "--resume", "--output-dir", str(out)]) == 2
    assert "run the same command without --resume" in one_line_error(capsys)
    assert train(out, "--epochs", "1") == 0  # started again in the same folder, no --overwrite
    assert run_folder.latest_checkpoint(out) is not None
    assert yaml.safe_load((out / "config.yaml").read_text())["reward"] == "jpeg-compressibility"
    # with a checkpoint the folder is a run again: the same command is refused, --resume continues it
    assert train(out, "--epochs", "1") == 2
    assert "already exists" in one_line_error(capsys)


def test_a_failed_start_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "new"
    assert train(out, "--epochs", "1", "--resolution", "33") == 2
    one_line_error(capsys)
    assert not out.exists()
    assert train(out, "--epochs", "1", "--lora-targets", "to_q,bogus") == 2
    assert "bogus" in one_line_error(capsys)
    assert not out.exists()
    assert train(out, "--epochs", "1") == 0  # the corrected rerun is not blocked


# --- config.yaml and --resume --------------------------------------------------------------------


def test_actions_are_not_stored_and_not_taken_from_files(run_copy, tmp_path, capsys):
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert "overwrite" not in saved and "resume" not in saved
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**saved, "overwrite": True}))
    before = snapshot(run_copy)
    assert main(["train", "--config", str(bad), "--seed", "1"]) == 2
    assert "action" in one_line_error(capsys)
    assert snapshot(run_copy) == before
    # the saved config of a run starts a new run elsewhere
    assert main(["train", "--config", str(run_copy / "config.yaml"), "--output-dir", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize(
    "flags, name",
    [(["--lora-rank", "4"], "--lora-rank"), (["--model", "tiny-v"], "--model"), (["--seed", "3"], "--seed"),
     (["--eta", "3"], "--eta"), (["--prompts-per-batch", "1"], "--prompts-per-batch")],
)  # fmt: skip
def test_resume_refuses_a_change_of_what_the_run_is(run_copy, capsys, flags, name):
    before = snapshot(run_copy)
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "2", *flags]) == 2
    line = one_line_error(capsys)
    assert name in line and "differs from the run's" in line
    assert "--stop-grace" in line and "--progress" in line  # every flag that may change is named
    assert snapshot(run_copy) == before
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "2"]) == 0  # still resumes


def test_resume_changes_config_only_when_the_run_starts(run_copy, capsys):
    checkpoint = run_folder.latest_checkpoint(run_copy)
    weights = checkpoint / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    before = snapshot(run_copy)
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "3"]) == 2
    assert "damaged" in one_line_error(capsys)
    assert snapshot(run_copy) == before  # epochs not rewritten


def test_resume_with_no_epoch_left_is_refused_and_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)  # the run has done 1 epoch
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "1"]) == 2
    assert "has done 1 epoch(s) already; pass --epochs above 1" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_resume_with_another_process_count_is_refused(run_copy, capsys):
    (run_copy / run_folder.MARKER).write_text('{"format": 2, "num_processes": 2}\n')
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "2"]) == 2
    assert "2 process(es), not 1" in one_line_error(capsys)


def test_resume_of_an_earlier_format_says_how_to_go_on(run_copy, capsys):
    (run_copy / run_folder.MARKER).unlink()  # a run from before the marker (config.yaml + checkpoints/)
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "2"]) == 2
    assert "earlier rebel-diffusion" in one_line_error(capsys)


# --- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [["--learning-rate", "inf"], ["--ddim-eta", "inf"], ["--eta", "inf"], ["--guidance-scale", "nan"],
     ["--kl-coef", "-1"], ["--adam-beta2", "1"], ["--stop-grace", "0"], ["--timestep-fraction", "nan"]],
)  # fmt: skip
def test_every_number_is_checked(tmp_path, capsys, flags):
    out = tmp_path / "run"
    assert train(out, "--epochs", "1", *flags) == 2
    assert flags[0] in one_line_error(capsys)
    assert not out.exists()


def test_yaml_numbers_as_users_write_them(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("weight_decay: 1e-2\nepochs: 1\n")  # PyYAML reads 1e-2 as a string
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--config", str(good), "--output-dir", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["weight_decay"] == 1e-2
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: true\n")
    assert main(["train", *SMALL, "--config", str(bad), "--output-dir", str(tmp_path / "r2")]) == 2
    assert "epochs must be int" in one_line_error(capsys)


# --- rewards and LoRA targets -------------------------------------------------------------------


def test_a_reward_that_is_nan_everywhere_stops_the_run(run_copy, capsys):
    """The resumed run's epoch 2 has no finite reward: exit 1, one line, epoch 1's checkpoint intact."""
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    before = snapshot(run_copy / "checkpoints")
    out = run_copy.parent / "nan"
    assert main(["train", *SMALL, "--reward", "plugin_reward:nan_reward", "--epochs", "2", "--output-dir",
                 str(out)]) == 1  # fmt: skip
    err = one_line_error(capsys)
    assert "no image had a finite reward" in err and "run the same command again" in err
    assert run_folder.latest_checkpoint(out) is None  # nothing trained, nothing claimed
    assert snapshot(run_copy / "checkpoints") == before and config["epochs"] == 1


def test_lora_targets_each_bind_and_are_reported(tmp_path, capsys):
    assert train(tmp_path / "run", "--epochs", "1", "--lora-targets", "to_q, to_k") == 0
    out = capsys.readouterr().out
    assert "to_q (8 modules)" in out and "to_k (8 modules)" in out
    for targets in ("foo,bar", "to_q,bogus"):
        assert train(tmp_path / targets.replace(",", "_"), "--epochs", "1", "--lora-targets", targets) == 2
        assert "match(es) no linear or conv module" in one_line_error(capsys)


# --- OS faults -----------------------------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert train(f, "--epochs", "1") == 2
    assert "is a file" in one_line_error(capsys)
    assert f.read_text() == "mine"


def test_read_only_output_dir_fails_before_any_write(tmp_path, monkeypatch, capsys):
    # root ignores permission bits, so the write probe is made to fail as on a read-only mount
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "run"
    assert train(out, "--epochs", "1") == 2
    assert "Read-only file system" in one_line_error(capsys)
    assert not out.exists()


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(run_copy, monkeypatch, capsys):
    import rebel_diffusion.training.recipe as train_module

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if "optimizer" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: basic_ios::clear")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", full)
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "2"]) == 1
    line = one_line_error(capsys)
    assert "cannot write checkpoint epoch_0002" in line and "epoch_0001" in line
    assert run_folder.latest_checkpoint(run_copy).name == "epoch_0001"
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(run_copy), "--resume", "--epochs", "2"]) == 0


def test_cpu_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    import rebel_diffusion.training.recipe as train_module

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_module, "train_epoch", oom)
    assert train(tmp_path / "run", "--epochs", "1") == 1
    line = one_line_error(capsys)
    assert "out of memory" in line and "--train-batch-size" in line


def test_missing_tracker_package_fails_at_startup(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    assert train(out, "--epochs", "1", "--log-with", "wandb") == 2
    assert "pip install wandb" in one_line_error(capsys)
    assert not out.exists()


def test_outputs_are_readable_as_the_umask_says(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert train(out, "--epochs", "1") == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), [
        (str(p), oct(p.stat().st_mode & 0o777)) for p in files if p.stat().st_mode & 0o777 != 0o644
    ]


# --- signals -------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.2)
    assert path.exists(), f"{path} did not appear in {timeout} s"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_exits_with_its_code(tmp_path, signum, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rebel_diffusion", "train", *SMALL, "--epochs", "50", "--output-dir", str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    _wait_for(out / "checkpoints" / "epoch_0001", 240)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert signal.Signals(signum).name in output and "--resume" in output
    last = run_folder.latest_checkpoint(out)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert last.name == f"epoch_{epochs[-1]:04d}" and epochs[-1] < 50  # the checkpoint is the last epoch logged


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_stops_within_the_grace(tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C) of a 2-process run 31 s into an epoch
    that is still running (longer than torch elastic's 30 s grace): the epoch is cut short, the
    workers exit 130 before elastic kills them, and each says why. (A resumed 2-process run:
    ``test_recipe.test_two_processes_one_set_of_outputs``; a stop before the first checkpoint:
    ``test_a_stop_before_the_first_checkpoint_is_no_dead_end``.)"""
    out = tmp_path / "run"
    # Epochs of about 55 s on an idle 2-core machine (90 s on a slower one).
    slow = ["--num-steps", "30", "--batches-per-epoch", "7", "--steps-per-pass", "1"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
        "-m", "rebel_diffusion", "train", *SMALL, *slow, "--epochs", "5", "--output-dir", str(out),
    ]  # fmt: skip
    # Its own process group, as a terminal's job.
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    _wait_for(out / "grids" / "epoch_0000.png", 400)  # the base's grid: epoch 1 starts now
    time.sleep(31)
    epochs_done = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs_done == [0], "epoch 1 took under 31 s: this test needs a longer epoch"
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    assert elapsed < 30, (elapsed, output[-3000:])
    assert "SIGKILL" not in output and "cut short" in output, output[-3000:]
    # torch elastic reports the signal itself (its own exit status); each worker said why it stopped.
    assert proc.returncode != 0 and output.count("epoch 1 cut short") == 1, output[-3000:]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]


def test_prompts_over_77_tokens_are_said_to_be_cut(tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a cat\n" + "a very long prompt " * 20 + "\n")
    assert train(tmp_path / "run", "--epochs", "1", "--prompts", str(prompts)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --prompts")]
    assert len(warnings) == 1 and "1 prompt(s) over 77 tokens are cut" in warnings[0], warnings


def test_a_second_ctrl_c_exits_130_and_names_what_continues(monkeypatch, tmp_path, capsys):
    from rebel_diffusion.cli import train as train_cli

    def interrupted(cfg):
        raise KeyboardInterrupt  # what the signal handler raises on a second Ctrl-C (test_preemption)

    monkeypatch.setattr(train_cli, "train", interrupted)
    assert main(["train", *SMALL, "--output-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "stopped at once (second Ctrl-C)" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_usage_error_under_accelerate_launch_is_one_line(tmp_path):
    """accelerate's launcher exits 1 for any failed worker (it cannot pass 2 on); with its -q the
    worker's one line is all that is printed."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rebel_diffusion", "train", *SMALL,
        "--epochs", "-1", "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rebel-diffusion train: error: --epochs"), done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_epoch_cut_short_checkpoints_the_state_it_started_from(tmp_path, monkeypatch):
    """A stop inside an epoch (after an optimizer step has changed the weights) writes the state the
    epoch started from, and resuming it repeats the uninterrupted run exactly."""
    from safetensors.torch import load_file

    from rebel_diffusion.training import preemption

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *SMALL, "--epochs", "2", "--checkpoint-every", "1", "--output-dir", str(full)]) == 0
    calls = {"n": 0}
    point = preemption.Preemption.point

    def stop_in_epoch_2(self, accelerator):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2: after its sampling batch and its first optimizer step
            self.signal = signal.SIGTERM
            raise preemption.StopEpoch
        return point(self, accelerator)

    monkeypatch.setattr(preemption.Preemption, "point", stop_in_epoch_2)
    args = ["train", *SMALL, "--epochs", "2", "--checkpoint-every", "2", "--output-dir", str(cut)]
    assert main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(preemption.Preemption, "point", point)
    assert run_folder.latest_checkpoint(cut).name == "epoch_0001"
    ours = load_file(str(cut / "checkpoints" / "epoch_0001" / "trainable.safetensors"))
    theirs = load_file(str(full / "checkpoints" / "epoch_0001" / "trainable.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(cut)]) == 0
    drop = ("images_per_second", "sample_seconds", "train_seconds")
    records = [
        [{k: v for k, v in json.loads(line).items() if k not in drop} for line in (out / "metrics.jsonl").open()]
        for out in (full, cut)
    ]
    assert records[0] == records[1]
