"""The run folder's files: checkpoints written in phases and read back, the newest complete one,
the fine-tune a path holds, and applying it to a pipeline as the inference commands do."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from rebel_diffusion.config import TrainConfig
from rebel_diffusion.errors import UsageError
from rebel_diffusion.models import LORA_FILE, add_lora, build_tiny_pipeline, lora_state_dict, save_lora
from rebel_diffusion.outputs import run_folder
from rebel_diffusion.outputs.run_folder import apply_weights, find_weights


def one_line_usage_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, 32, generator=g))


@torch.no_grad()
def unet_out(unet, inputs):
    x, t, emb = inputs
    return unet(x, t, encoder_hidden_states=emb).sample


@pytest.fixture(scope="module")
def lora_unet(tiny_pipe):
    """A copy of tiny's UNet with rank-4 LoRA adapters whose up-projections are perturbed."""
    unet = copy.deepcopy(tiny_pipe.unet)
    add_lora(unet, rank=4, alpha=2.0, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return unet


@pytest.fixture(scope="module")
def lora_folder(lora_unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "lora"
    save_lora(lora_unet, folder)
    return folder


def trainable(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def write(out, epoch, weights, keep=2):
    state = {
        "weights": weights,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "lr_scheduler": {"last_epoch": epoch},
        "tracker": {"stats": {}},
        "global_step": 3 * epoch,
    }
    run_folder.begin_checkpoint(out, epoch)
    run_folder.write_process_state(out, epoch, 0, {"torch": torch.arange(epoch + 4)})
    run_folder.write_shared_state(out, epoch, state)
    return run_folder.commit_checkpoint(out, epoch, keep=keep)


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_and_pruning(tmp_path, lora_unet):
    weights = trainable(lora_unet)
    for epoch in (1, 2, 3):
        folder = write(tmp_path, epoch, weights)
    assert folder == run_folder.checkpoint_dir(tmp_path, 3) == tmp_path / "checkpoints" / "epoch_0003"
    # keep=2: the oldest went; no temporary folder is left
    assert [p.name for p in run_folder.complete_checkpoints(tmp_path)] == ["epoch_0002", "epoch_0003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    back = run_folder.read_checkpoint(folder, process_index=0)
    assert back["epoch"] == 3 and back["global_step"] == 9
    assert back["weights"].keys() == weights.keys()
    assert all(torch.equal(back["weights"][k], weights[k]) for k in weights)
    assert back["optimizer"]["param_groups"][0]["lr"] == 0.1 and back["tracker"] == {"stats": {}}
    assert torch.equal(back["rng"]["torch"], torch.arange(7))  # this process's own RNG state
    assert run_folder.read_checkpoint(folder, process_index=1)["rng"] is None  # no file for process 1


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path, lora_unet):
    assert run_folder.latest_checkpoint(tmp_path) is None
    write(tmp_path, 9, trainable(lora_unet), keep=5)
    write(tmp_path, 10, trainable(lora_unet), keep=5)
    assert run_folder.latest_checkpoint(tmp_path).name == "epoch_0010"  # 10 after 9 (numeric, not text)
    (tmp_path / "checkpoints" / "epoch_0011").mkdir()  # a crash before state.json: incomplete
    run_folder.begin_checkpoint(tmp_path, 12)  # and a temporary folder
    assert run_folder.latest_checkpoint(tmp_path).name == "epoch_0010"
    assert find_weights(tmp_path).name == "epoch_0010"  # the same definition for the inference commands
    run_folder.abort_checkpoint(tmp_path, 12)
    assert not (tmp_path / "checkpoints" / ".tmp-epoch_0012").exists()


def test_checkpoint_applies_with_the_runs_lora_layout(tmp_path, lora_unet, unet_inputs):
    """A checkpoint (no lora/ export yet) loads into a fresh pipeline with rank, alpha and targets
    from the run's config.yaml, and then computes what the trained UNet computes."""
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": "tiny", "finetune": "lora", "lora_rank": 4, "lora_alpha": 2.0, "lora_targets": "to_q,to_v"}
        )
    )
    folder = write(tmp_path, 1, trainable(lora_unet))
    pipe = build_tiny_pipeline()
    assert apply_weights(pipe, find_weights(tmp_path)) == "checkpoint"
    assert_close(unet_out(pipe.unet, unet_inputs), unet_out(lora_unet, unet_inputs), rtol=1e-5, atol=1e-5)
    # another layout in the config: one line, nothing loaded half-way
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"finetune": "lora", "lora_rank": 8, "lora_alpha": 8.0, "lora_targets": "to_q,to_v"})
    )
    with pytest.raises(UsageError, match="does not fit the model") as info:
        apply_weights(build_tiny_pipeline(), folder)
    one_line_usage_error(info)


def test_export_weights_lora_matches_the_unet(tmp_path, lora_unet, unet_inputs):
    path = run_folder.export_weights(tmp_path, lora_unet, "lora")
    assert path == tmp_path / "lora" / LORA_FILE
    saved = load_file(str(path))
    assert {k.removeprefix("unet.") for k in saved} == set(lora_state_dict(lora_unet))  # diffusers' prefix
    plain = build_tiny_pipeline()
    plain.load_lora_weights(str(tmp_path / "lora"))  # diffusers itself
    assert_close(unet_out(plain.unet, unet_inputs), unet_out(lora_unet, unet_inputs), rtol=1e-5, atol=1e-5)


def test_exported_kohya_lora_loads_back_through_diffusers(tmp_path, lora_unet, unet_inputs):
    """lora_kohya.safetensors (ComfyUI, A1111/Forge): kohya's key names, the run's own alpha (2 at
    rank 4, so a wrong alpha would double the LoRA's effect), and diffusers' kohya loader reproduces
    the trained UNet's outputs from it."""
    from rebel_diffusion.models import KOHYA_FILE

    run_folder.export_weights(tmp_path, lora_unet, "lora")
    kohya = load_file(str(tmp_path / "lora" / KOHYA_FILE))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert {k.rsplit(".", 1)[-1] for k in kohya} == {"weight", "alpha"}
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 2.0 for a in alphas)
    plain = build_tiny_pipeline()
    base = unet_out(plain.unet, unet_inputs)
    plain.load_lora_weights(str(tmp_path / "lora"), weight_name=KOHYA_FILE)
    with_lora = unet_out(plain.unet, unet_inputs)
    assert (with_lora - base).abs().max() > 1e-4
    assert_close(with_lora, unet_out(lora_unet, unet_inputs), rtol=1e-5, atol=1e-5)


def test_exported_lora_loads_with_peft_itself(tmp_path, tiny_pipe, lora_unet, unet_inputs):
    """adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained on a plain UNet
    gives the trained outputs; the base UNet's own weights are left as they were."""
    from peft import PeftModel

    run_folder.export_weights(tmp_path, lora_unet, "lora")
    plain = copy.deepcopy(tiny_pipe.unet)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    model = PeftModel.from_pretrained(plain, str(tmp_path / "lora"))
    assert_close(unet_out(model, unet_inputs), unet_out(lora_unet, unet_inputs), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 2.0, ["to_q", "to_v"])
    base_after = {k.replace("base_layer.", ""): v for k, v in plain.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_after[k], before[k]) for k in before)


def test_model_card(tmp_path, lora_unet):
    from rebel_diffusion.outputs.report import make_grid, save_png

    run_folder.export_weights(tmp_path, lora_unet, "lora")
    save_png(make_grid(torch.rand(2, 3, 32, 32), ["a", "b"]), tmp_path / "grids" / "epoch_0002.png")
    metrics = [
        {"epoch": 0, "reward_mean": -1.5, "grid_reward_mean": -1.4, "heldout/toy-alignment": 0.8},
        {"epoch": 2, "reward_mean": -1.2, "grid_reward_mean": -1.1, "heldout/toy-alignment": 0.85},
    ]
    cfg = TrainConfig(model="toy", reward="jpeg-compressibility", num_steps=10, sampler="ddim", guidance_scale=3.0)
    card = run_folder.write_model_card(tmp_path, cfg, metrics).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "toy" and front["library_name"] == "diffusers" and "lora" in front["tags"]
    assert "| heldout/toy-alignment | 0.8 | 0.85 |" in card and "jpeg-compressibility" in card
    assert "![the last epoch's grid](grid.png)" in card and (tmp_path / "lora" / "grid.png").is_file()
    # which file is for which tool
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "lora_kohya.safetensors"):
        assert f"| `{name}`" in card and (tmp_path / "lora" / name).is_file()
    assert "ComfyUI" in card


def test_export_weights_full_unet(tmp_path, tiny_pipe, unet_inputs):
    from diffusers import UNet2DConditionModel

    unet = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.25)
    run_folder.export_weights(tmp_path, unet, "full")
    back = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    assert_close(unet_out(back, unet_inputs), unet_out(unet, unet_inputs))
    assert not list(tmp_path.glob(".*tmp"))


def test_grid_names():
    assert run_folder.grid_path("run", 7) == Path("run/grids/epoch_0007.png")


def test_epoch_grids_in_epoch_order(tmp_path):
    assert run_folder.epoch_grids(tmp_path) == []
    for epoch in (10, 2, 10000):
        run_folder.grid_path(tmp_path, epoch).parent.mkdir(exist_ok=True)
        run_folder.grid_path(tmp_path, epoch).write_bytes(b"")
    (tmp_path / "grids" / "epoch_3.png.tmp").write_bytes(b"")  # not a grid
    assert run_folder.epoch_grids(tmp_path) == [(e, run_folder.grid_path(tmp_path, e)) for e in (2, 10, 10000)]


def test_find_run_and_read_run_config_errors(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        run_folder.find_run(tmp_path / "missing")
    with pytest.raises(UsageError, match="not a training run folder") as info:
        run_folder.find_run(tmp_path)
    one_line_usage_error(info)
    with pytest.raises(UsageError, match="not a training run folder"):
        run_folder.read_run_config(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text("- a\n- list\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        run_folder.read_run_config(tmp_path / ".")
    config.write_text(json.dumps({"model": "tiny"}))
    ckpt = tmp_path / "checkpoints" / "epoch_0001"
    ckpt.mkdir(parents=True)
    assert run_folder.find_run(ckpt) == tmp_path  # found two levels up
    assert run_folder.read_run_config(tmp_path).model == "tiny"
    config.write_text(yaml.safe_dump({"model": "tiny", "skip_final_steps": 2}))  # a field since removed
    assert run_folder.read_run_config(tmp_path).min_step_std == 0.1
    # Unknown fields, values of the wrong type or out of range, and nulls: one line that names the file.
    for bad, what in (
        ({"model": "tiny", "no_such_field": 2}, "unknown config field"),
        ({"num_steps": "fifty"}, "num_steps must be int"),
        ({"num_steps": 0}, "--num-steps must be >= 1"),
        ({"sampler": "euler"}, "--sampler must be one of"),
        ({"model": None}, "model is null"),
        ({"eval_every": 1, "heldout_every": 2}, "both eval_every and its new name heldout_every"),
        ({"images_per_prompt": 1}, "pairs"),  # what TrainConfig.validate refuses
    ):
        config.write_text(yaml.safe_dump(bad))
        with pytest.raises(UsageError, match=what) as info:
            run_folder.read_run_config(tmp_path)
        assert str(config) in one_line_usage_error(info)


def resumed(out):
    """The configuration ``train --resume --output-dir out`` would continue with."""
    import argparse

    from rebel_diffusion.cli.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--resume", "--output-dir", str(out)]))


def test_read_run_config_reads_an_old_run_as_resume_does(tmp_path, recwarn):
    """A config.yaml of an earlier release: old field names, the actions stored (false), no anchor
    (those runs regressed against the sampling policy) nor prompt sampling (with replacement), fields
    added since missing, and a prompts file that has moved since. It reads silently as the
    TrainConfig --resume would continue."""
    out = tmp_path / "run"
    out.mkdir()
    saved = dataclasses.asdict(TrainConfig(model="tiny", prompts=str(tmp_path / "gone.txt"), output_dir="elsewhere"))
    added_since = (
        "grid_prompts",
        "heldout_every",
        "heldout_rewards",
        "anchor",
        "vae",
        "num_threads",
        "prompt_sampling",
    )
    for name in added_since:
        saved.pop(name)
    saved.update(eval_prompts="toy_heldout", eval_every=0, eval_rewards="clip", resume=False, overwrite=False)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))

    cfg = run_folder.read_run_config(out)
    assert (cfg.grid_prompts, cfg.heldout_rewards, cfg.heldout_every) == ("toy_heldout", "clip", 0)
    assert cfg.anchor == "policy" and cfg.vae is None and cfg.num_threads is None
    assert cfg.prompt_sampling == "replacement"  # those runs drew prompts with replacement
    assert cfg.prompts == str(tmp_path / "gone.txt") and cfg.output_dir == str(out)
    assert cfg == dataclasses.replace(resumed(out), resume=False)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    # A run written since: its anchor as stored; 'auto' (never stored by train) resolves as train does.
    for anchor, algorithm, read in (("base", "rebel", "base"), ("auto", "rebel", "base"), ("auto", "ddpo", "policy")):
        (out / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "anchor": anchor, "algorithm": algorithm}))
        assert run_folder.read_run_config(out).anchor == read


# ----------------------------------------------------------------------------------------------
# exported LoRA and UNet folders, as sample/eval/preview apply them


@pytest.mark.parametrize("where", ["lora folder", "run folder", "file"])
def test_apply_lora(where, lora_unet, lora_folder, unet_inputs):
    path = {"lora folder": lora_folder, "run folder": lora_folder.parent, "file": lora_folder / LORA_FILE}[where]
    pipe = build_tiny_pipeline()
    assert apply_weights(pipe, find_weights(path)) == "lora"
    assert_close(unet_out(pipe.unet, unet_inputs), unet_out(lora_unet, unet_inputs), rtol=1e-5, atol=1e-5)


def test_apply_unet_folder(tiny_pipe, tmp_path, unet_inputs):
    unet = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "unet")
    pipe = build_tiny_pipeline()
    assert apply_weights(pipe, find_weights(tmp_path)) == "unet"
    assert_close(unet_out(pipe.unet, unet_inputs), unet_out(unet, unet_inputs))


def test_apply_without_weights(tmp_path):
    (tmp_path / "samples").mkdir()
    with pytest.raises(UsageError, match="holds no LoRA") as info:
        apply_weights(build_tiny_pipeline(), tmp_path)
    one_line_usage_error(info)


def test_lora_with_keys_that_match_nothing(tmp_path):
    save_file(
        {
            "unet.no_such_block.attn.to_q.lora.down.weight": torch.zeros(8, 32),
            "unet.no_such_block.attn.to_q.lora.up.weight": torch.zeros(32, 8),
        },
        str(tmp_path / LORA_FILE),
    )
    with pytest.raises(UsageError, match="does not fit the model") as info:
        apply_weights(build_tiny_pipeline(), tmp_path)
    one_line_usage_error(info)


def test_lora_from_another_architecture(lora_folder, tmp_path):
    """Same layer names, other widths (as a LoRA trained on a wider UNet): refused, not loaded half-way."""
    wider = {
        k: torch.randn(v.shape[0], v.shape[1] + 16) if ".lora.down." in k else torch.randn(v.shape[0] + 16, v.shape[1])
        for k, v in load_file(str(lora_folder / LORA_FILE)).items()
    }
    save_file(wider, str(tmp_path / LORA_FILE))
    with pytest.raises(UsageError, match="does not fit the model") as info:
        apply_weights(build_tiny_pipeline(), tmp_path)
    one_line_usage_error(info)


@pytest.mark.parametrize("command", [["upload", "--help"], ["auth", "login", "--help"]])
def test_the_readmes_hub_commands_exist_in_the_installed_huggingface_hub(command):
    """The README publishes a LoRA with `hf auth login` and `hf upload`: the CLI of the installed
    huggingface_hub (its `huggingface-cli` is gone)."""
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"`hf {' '.join(command[:-1])}" in readme and "huggingface-cli" not in readme
    code = "import sys; from huggingface_hub.cli.hf import main; sys.argv = ['hf', *sys.argv[1:]]; main()"
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Usage: hf" in result.stdout, result.stderr[-500:]


def test_exported_lora_lists_its_targets_in_a_fixed_order(tmp_path, lora_unet):
    """A set's order changes from one Python process to the next: the files list the LoRA's targets
    sorted, so identical runs write identical files."""
    from safetensors import safe_open

    run_folder.export_weights(tmp_path, lora_unet, "lora")
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    peft = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert meta["unet.target_modules"] == peft["target_modules"] == ["to_q", "to_v"]
