"""The config dataclass: every field documented and a flag; presets, files and flags resolve in order."""

import argparse
import dataclasses

import pytest
import torch
import yaml

from rebel_diffusion.cli.train import add_arguments, config_from_args
from rebel_diffusion.config import PRESETS, TrainConfig
from rebel_diffusion.errors import UsageError
from rebel_diffusion.models import add_lora, build_tiny_pipeline, save_lora


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_field_has_help_and_a_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"].strip(), f.name
        assert f.name in flags, f.name


def _config_reads(tree) -> set[str]:
    """Attribute names read (not written) as ``cfg.X`` or ``<anything>.cfg.X`` in a module's AST."""
    import ast

    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "cfg") or (
                isinstance(base, ast.Attribute) and base.attr == "cfg"
            ):
                out.add(node.attr)
    return out


def test_every_field_is_used_by_the_recipe():
    """Airtight config: each field is read (``cfg.<field>``, exactly that name, in a Load) by the
    package outside config.py, or by one of TrainConfig's own derived quantities."""
    import ast
    from pathlib import Path

    import rebel_diffusion

    root = Path(rebel_diffusion.__file__).parent
    reads = set()
    for path in root.rglob("*.py"):
        if path.name != "config.py":
            reads |= _config_reads(ast.parse(path.read_text()))
    derived = set()  # self.X read by the methods that compute batch sizes from the fields
    config_tree = ast.parse((root / "config.py").read_text())
    for node in ast.walk(config_tree):
        if isinstance(node, ast.FunctionDef) and node.name in (
            "images_per_epoch",
            "pairs_per_epoch",
            "images_per_step",
            "optimizer_steps_per_epoch",
        ):
            derived |= {
                n.attr
                for n in ast.walk(node)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
            }
    unused = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in reads | derived]
    assert not unused, f"config fields never read by the recipe: {unused}"


def test_the_field_check_sees_through_prefixes_and_writes():
    """The check above cannot be fooled: a longer name or a write does not count as a read."""
    import ast

    assert _config_reads(ast.parse("cfg.seed_offset\ncfg.seed = 1\nrun.cfg.eta")) == {"seed_offset", "eta"}


def test_defaults_are_the_papers():
    cfg = TrainConfig()
    assert cfg.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.reward == "aesthetic"
    assert (cfg.num_steps, cfg.ddim_eta, cfg.guidance_scale) == (50, 1.0, 5.0)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.images_per_prompt) == (8, 8.0, 2)
    assert (cfg.tracker_buffer_size, cfg.tracker_min_count) == (32, 16)
    cfg.validate()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = parse(["--preset", name])
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"num_steps": 12, "learning_rate": 0.01}))
    cfg = parse(["--preset", "toy", "--config", str(f), "--learning-rate", "0.002"])
    assert cfg.model == "toy"  # preset
    assert cfg.num_steps == 12  # file over preset
    assert cfg.learning_rate == 0.002  # flag over file


def test_config_file_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"num_stepz": 3}))
    with pytest.raises(UsageError, match="unknown config field"):
        parse(["--config", str(f)])
    f.write_text(yaml.safe_dump({"num_steps": "many"}))
    with pytest.raises(UsageError, match="num_steps must be int"):
        parse(["--config", str(f)])
    with pytest.raises(UsageError, match="no such file"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_saved_config_round_trips(tmp_path):
    cfg = parse(["--preset", "toy", "--eta", "0.3"])
    f = tmp_path / "config.yaml"
    f.write_text(cfg.to_yaml())
    assert parse(["--config", str(f)]) == cfg


def test_derived_counts():
    cfg = TrainConfig(
        prompts_per_batch=8,
        batches_per_epoch=4,
        images_per_prompt=4,
        train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    assert cfg.images_per_epoch(2) == 8 * 4 * 4 * 2
    assert cfg.pairs_per_epoch() == 32 * 6  # 6 pairs per prompt of 4 images
    assert cfg.optimizer_steps_per_epoch() == 128 // 8  # steps of 8 images (2 prompts), for both algorithms
    cfg.validate()


def test_lora_alpha_survives_save_and_reload(tmp_path):
    """alpha != rank: diffusers must reload the same LoRA scale (it would assume alpha = rank)."""
    pipe = build_tiny_pipeline()
    torch.manual_seed(0)
    add_lora(pipe.unet, rank=4, alpha=16)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_lora(pipe.unet, tmp_path / "lora")
    reloaded = build_tiny_pipeline()
    reloaded.load_lora_weights(str(tmp_path / "lora"))
    kwargs = dict(num_inference_steps=3, height=32, width=32, output_type="pt")
    a = pipe(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = reloaded(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    base = build_tiny_pipeline()(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (a - base).abs().max() > 1e-3  # the LoRA matters...
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # ...and reloads at the same strength


def test_renamed_flags_and_keys_still_work_and_warn(tmp_path, capsys):
    cfg = parse(["--model", "tiny", "--eval-every", "3", "--eval-num-images", "4"])
    assert (cfg.heldout_every, cfg.grid_num_images) == (3, 4)
    err = capsys.readouterr().err
    assert "--eval-every is deprecated" in err and "use --heldout-every" in err
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "eval_prompts": "toy_heldout", "eval_rewards": "clip"}))
    with pytest.warns(FutureWarning, match="eval_prompts is deprecated.*grid_prompts"):
        cfg = parse(["--config", str(path)])
    assert (cfg.grid_prompts, cfg.heldout_rewards) == ("toy_heldout", "clip")
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"eval_every": 1, "heldout_every": 2}))
    with pytest.raises(UsageError, match="both eval_every and its new name heldout_every"):
        parse(["--config", str(both)])


def test_a_run_saved_with_the_old_names_resumes_silently(tmp_path, recwarn):
    out = tmp_path / "run"
    out.mkdir()
    saved = {**dataclasses.asdict(TrainConfig(model="tiny", output_dir=str(out)))}
    for old, new in (("eval_prompts", "grid_prompts"), ("eval_every", "heldout_every")):
        saved[old] = saved.pop(new)
    saved.pop("num_threads")  # a field the older release did not have: its default
    for action in ("resume", "overwrite"):
        saved.pop(action)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = parse(["--resume", "--output-dir", str(out)])
    assert cfg.resume and cfg.model == "tiny" and cfg.heldout_every == 0
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_help_shows_each_default_once():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        text = action.help or ""
        assert text.count("(default") <= 1, text
        assert "(default: None)" not in text, text


def test_several_rewards_as_a_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "reward": {"jpeg-compressibility": 1, "toy-alignment": 0.5}}))
    cfg = parse(["--config", str(path)])
    assert cfg.reward == "jpeg-compressibility=1,toy-alignment=0.5" and cfg.reward_combine == "sum"


def test_the_base_anchor_is_rebels_and_its_default():
    assert parse(["--anchor", "base"]).anchor == "base"
    with pytest.raises(UsageError, match="--anchor base is REBEL's"):
        parse(["--anchor", "base", "--algorithm", "ddpo"])
    with pytest.raises(UsageError, match="--anchor must be one of auto, policy, base"):
        TrainConfig(anchor="pretrained").validate()
    # auto: REBEL regresses against the base, DDPO keeps PPO's ratio to the sampler; resolved once
    assert parse([]).anchor == "base" and parse(["--algorithm", "ddpo"]).anchor == "policy"
    assert parse(["--anchor", "policy"]).anchor == "policy"
    # the toy presets and the paper's LCM setup keep the anchor their figures were measured with
    assert parse(["--preset", "toy-jpeg"]).anchor == "policy" and parse(["--preset", "lcm"]).anchor == "policy"
    assert parse(["--preset", "toy"]).anchor == "base" and parse(["--preset", "sdxl"]).anchor == "base"


def test_a_run_from_before_the_anchor_resumes_against_the_policy(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = dataclasses.asdict(TrainConfig(model="tiny", output_dir=str(out)))
    for name in ("anchor", "resume", "overwrite", "vae"):  # fields a run of that release did not write
        saved.pop(name)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = parse(["--resume", "--output-dir", str(out)])
    assert cfg.resume and cfg.anchor == "policy" and cfg.vae is None


def test_kl_prompts_need_the_kl_term():
    cfg = parse(["--preset", "toy"])  # the quick start preserves the known captions of its mix
    assert (cfg.kl_prompts, cfg.kl_coef) == ("toy_shapes", 1.0)
    assert parse(["--kl-coef", "0.1", "--kl-prompts", "simple_animals"]).kl_prompts == "simple_animals"
    with pytest.raises(UsageError, match="--kl-prompts toy_shapes: the KL term is off"):
        parse(["--preset", "toy", "--kl-coef", "0"])
