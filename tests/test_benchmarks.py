"""Smoke tests of the ``benchmarks`` package, imported as modules from the repository root.

``benchmarks.speed``: the training-memory worker and the FLOP count on the tiny model, T = 2 and 4,
in-process, and one (T, method) in a fresh spawned process; checks the JSON's structure.
``benchmarks.env``: the environment record. ``benchmarks.learning``: its statistics. No timing
assertions: speed figures live in benchmarks/results, never in tests.
"""

from __future__ import annotations

import json
import platform
import shlex
from importlib import metadata

import pytest
import torch

from benchmarks import demo, env, learning, speed, training_memory


def test_training_worker_and_flops_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "bench.json"
    report = speed.main([
        "--model", "tiny", "--device", "cpu", "--sections", "flops,training", "--train-steps", "2,4",
        "--naive-steps", "2", "--steps-per-pass", "1,3", "--train-repeats", "0",
        "--train-isolation", "inprocess", "--threads", "1", "--out", str(out),
    ])  # fmt: skip
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report, default=str))

    # Environment: what a reader needs to judge the figures.
    assert data["device"]["type"] == "cpu" and data["device"]["cpu_count"] >= 1
    assert len(data["device"]["load_average_start"]) == 3
    for name in ("torch", "diffusers", "transformers", "peft"):
        assert data["versions"][name]
    assert data["env"]["versions"] == data["versions"] and data["env"]["cuda"] is None
    assert data["command"].startswith("python -m benchmarks.speed")
    assert set(data["switches"]) >= {"dtype", "channels_last", "compile", "attention"}
    assert data["peak_tflops"] is None  # no MFU on a CPU

    flops = data["flops"]
    assert flops["sampling_unet_call_flops"] > 0
    assert flops["train_lora_forward_backward_flops"] > flops["train_lora_forward_flops"] > 0

    training = data["training"]
    assert training["switches"]["dtype"] == "fp32"
    assert set(training["results"]["ours"]) == {"2", "4"} and set(training["results"]["naive"]) == {"2"}
    assert set(training["results"]["ours_spp3"]) == {"2", "4"}  # 3 steps per UNet pass
    for method, T in (("ours", 2), ("ours", 4), ("ours_spp3", 4), ("naive", 2)):
        r = training["results"][method][str(T)]
        assert r["T"] == T and r["trained_steps"] == T and r["oom"] is False
        assert r["unet_graphs_held_at_once"] == (T if method == "naive" else 1)
        assert r["steps_per_pass"] == {"ours": 1, "ours_spp3": 3, "naive": None}[method]
        assert set(r["memory"]) >= {"method", "baseline_mib", "peak_mib", "peak_growth_mib"}
        assert r["pairs_per_s"] > 0
        assert r["flops"]["executed_tflops"] > 0 and r["flops"]["executed_mfu"] is None
    assert training["results"]["ours"]["2"]["flops"]["rescore_flops"] > 0
    assert training["results"]["naive"]["2"]["flops"]["rescore_flops"] == 0
    summary = training["summary"]
    assert set(summary["ours_peak_growth_mib"]) == {"2", "4"}
    assert set(summary["naive_peak_growth_mib"]) == {"2"}
    assert set(summary["ours_spp3_speedup_over_ours"]) == {"2", "4"}
    # The naive full-graph step computes the same gradient as ours (fp32).
    assert training["gradient_check"]["relative_l2_difference"] < 1e-4


def test_training_memory_in_a_fresh_process():
    """The CPU default: one (T, method) measured in a spawned interpreter, its result sent back."""
    args = speed.parse_args(["--model", "tiny", "--device", "cpu", "--train-repeats", "0", "--batch", "4"])
    r = training_memory.measure_in_fresh_process(training_memory.worker_spec(args), 2, "ours")
    assert "error" not in r, r.get("stderr_tail")
    assert r["T"] == 2 and r["method"] == "ours" and r["oom"] is False and r["trained_steps"] == 2
    assert r["memory"]["peak_mib"] >= r["memory"]["baseline_mib"] > 0
    assert r["process_seconds"] > 0 and len(r["load_average"]) == 3


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        speed.parse_args(["--train-steps", "0"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--train-pairs", "3", "--train-micro-batch", "2"])
    args = speed.parse_args(["--device", "cpu", "--naive-steps", "none"])
    assert args.naive_steps == [] and args.dtype == "fp32" and args.threads == 1


def test_env_record_has_the_machine_and_the_installed_versions():
    import accelerate
    import diffusers
    import peft
    import transformers

    rec = env.record("cpu")
    assert set(rec) >= {
        "date",
        "platform",
        "processor",
        "cpu_count",
        "load_average",
        "versions",
        "cuda",
        "git",
    }
    assert rec["cpu_count"] >= 1 and len(rec["load_average"]) == 3
    assert rec["platform"] == platform.platform() and rec["cuda"] is None  # measured on the CPU
    assert set(rec["git"]) == {"commit", "dirty"}
    versions = rec["versions"]
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    for module, dist in ((diffusers, "diffusers"), (transformers, "transformers"), (peft, "peft"),
                         (accelerate, "accelerate")):  # fmt: skip
        assert versions[dist] == metadata.version(dist) == module.__version__
    assert json.loads(json.dumps(rec)) == rec  # plain JSON
    if torch.cuda.is_available():
        gpu = env.record("cuda")["cuda"]
        assert gpu["name"] == torch.cuda.get_device_name() and gpu["capability"].count(".") == 1


def test_sd15_random_is_a_builtin_model(monkeypatch):
    """``load_pipeline('sd15-random')`` builds the random-weight SD-1.5 (stubbed here by the tiny one)."""
    from rebel_diffusion import models
    from rebel_diffusion.config import TrainConfig

    assert "sd15-random" in models.BUILTIN_MODELS
    calls = []

    def fake_build(dtype, device):
        calls.append((dtype, torch.device(device).type))
        return models.build_tiny_pipeline()

    monkeypatch.setattr(models.loading, "build_sd15_random_pipeline", fake_build)
    pipe = models.load_pipeline("sd15-random", dtype=torch.bfloat16, device="cpu")
    assert calls == [(torch.bfloat16, "cpu")] and pipe.unet.dtype == torch.bfloat16
    TrainConfig(model="sd15-random").validate()  # the trainer takes it like any model name


def test_learning_benchmark_statistics():
    """95% t-interval over seeds, queries-to-reach, and the per-task summary of REBEL vs DDPO."""
    ci = learning.interval([1.0, 2.0, 3.0])
    assert ci["mean"] == pytest.approx(2.0) and ci["ci95"] == pytest.approx(4.303 * 1.0 / 3**0.5)
    run = {"reward_queries": [0, 64, 128], "heldout_reward": [0.5, 0.7, 0.9]}
    assert learning.queries_to_reach(run, 0.7, 1.0) == 64
    assert learning.queries_to_reach(run, 1.0, 1.0) is None

    def fake(algorithm, seed, curve):
        return {"task": "toy", "reward": "r", "algorithm": algorithm, "seed": seed, "learning_rate": 1e-3,
                "reward_queries": [0, 64, 128], "heldout_reward": curve,
                "heldout_alignment": [0.9, 0.9, 0.8]}  # fmt: skip

    runs = [fake("rebel", s, [0.0, 0.2 + s / 10, 0.4]) for s in range(2)] + [
        fake("ddpo", s, [0.0, 0.1, 0.2 + s / 10]) for s in range(2)
    ]
    summary = learning.summarize(runs)["toy"]
    assert summary["rebel"]["heldout_reward_gain"]["mean"] == pytest.approx(0.4)
    assert summary["ddpo"]["heldout_reward_final"]["mean"] == pytest.approx(0.25)
    assert summary["rebel_queries_to_ddpo_final"] == [128, 64]  # first evaluation at or above 0.25
    assert summary["rebel"]["heldout_alignment_change"]["mean"] == pytest.approx(-0.1)


def test_learning_config_uses_the_trainer_fields(tmp_path):
    """The held-out evaluation every ``--eval-every`` epochs, on the trained reward and toy-alignment."""
    args = learning.parse_args(["--epochs", "4", "--eval-every", "2", "--heldout-images", "3"])
    cfg = learning.run_config("toy-jpeg", "ddpo", 1, 3e-4, args, tmp_path / "run")
    assert (cfg.heldout_every, cfg.heldout_images, cfg.epochs, cfg.seed) == (2, 3, 4, 1)
    assert cfg.heldout_rewards == "jpeg-compressibility,toy-alignment" and cfg.learning_rate == 3e-4
    args = learning.parse_args(["--algorithms", "ddpo", "--ddpo-lr", "3e-3"])
    assert args.algorithms == ["ddpo"] and args.ddpo_lr == 3e-3
    assert learning.parse_args([]).algorithms == ["rebel", "ddpo"]


def test_busy_processes_spin_until_terminated():
    import time

    procs = demo.busy_processes(1)
    try:
        time.sleep(0.5)
        assert all(p.is_alive() for p in procs)
    finally:
        for p in procs:
            p.terminate()
            p.join(timeout=10)
    assert not any(p.is_alive() for p in procs)


def test_rebel_step_benchmark_same_gradient_with_k_times_fewer_image_passes(tmp_path):
    from benchmarks import rebel_step

    out = tmp_path / "step.json"
    args = ["--model", "tiny", "--prompts", "2", "--images-per-prompt", "3", "--num-steps", "3", "--repeats", "1"]
    r = rebel_step.main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["image_passes"] == r["image_passes"]
    steps = r["settings"]["trained_steps"]
    assert r["image_passes"] == {"per_image": 6 * steps, "per_pair": 2 * 6 * steps}  # each image in k - 1 = 2 pairs
    assert r["gradient_relative_difference"] < 1e-5
    assert len(r["seconds"]["per_image"]) == len(r["seconds"]["per_pair"]) == 1


def test_toy_headroom_transforms_against_closed_forms():
    from benchmarks.toy_headroom import binomial_blur, border_colour, flatten_background, shrink

    g = torch.Generator().manual_seed(0)
    flat = torch.rand(2, 3, 1, 1, generator=g).expand(2, 3, 8, 8).contiguous()
    assert torch.allclose(binomial_blur(flat), flat)  # a constant image is left as it is
    delta = torch.zeros(1, 3, 8, 8)
    delta[:, :, 4, 4] = 16.0
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    assert torch.allclose(binomial_blur(delta)[0, :, 3:6, 3:6], expected.expand(3, 3, 3))
    assert torch.allclose(border_colour(flat), flat[:, :, 0, 0])

    # Background within the threshold of the border colour becomes it exactly; the shape is kept.
    image = flat.clone() + 0.03 * (torch.rand(2, 3, 8, 8, generator=g) - 0.5)
    image[:, :, 3:5, 3:5] = 1.0 - flat[:, :, 3:5, 3:5]
    out = flatten_background(image, 0.05)
    background = torch.ones(8, 8, dtype=torch.bool)
    background[3:5, 3:5] = False
    assert torch.equal(out[:, :, background], border_colour(image)[:, :, None].expand(2, 3, 60))
    assert torch.equal(out[:, :, 3:5, 3:5], image[:, :, 3:5, 3:5])

    assert torch.allclose(shrink(image, 1.0), image, atol=1e-6)  # scale 1: the same image
    small = shrink(image, 0.5)
    assert torch.equal(small[:, :, :2], border_colour(image)[:, :, None, None].expand(2, 3, 2, 8))


def test_toy_headroom_benchmark_json(tmp_path, monkeypatch):
    from benchmarks import toy_headroom

    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "headroom.json"
    args = ["--train-seeds", "1", "--heldout-seeds", "1", "--max-train-prompts", "8", "--num-steps", "2"]
    r = toy_headroom.main([*args, "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["base_alignment"] == r["base_alignment"]
    splits = ("train", "heldout", "colour and shape only")
    assert set(r["base_alignment"]) == {f"{s}, guidance {g}" for s in splits for g in (1, 3)}
    assert r["base_alignment"]["train, guidance 1"]["n"] == 8 and r["base_alignment"]["heldout, guidance 3"]["n"] == 32
    assert r["base_alignment"]["colour and shape only, guidance 1"]["n"] == 32  # 8 colours x 4 shapes
    assert set(r["transforms"]) == set(toy_headroom.TRANSFORMS)
    for v in r["transforms"].values():
        assert v["jpeg_gain_kb"]["n"] == 32 and v["alignment_change"]["mean"] == v["alignment_change"]["mean"]
    by_guidance = r["heldout_by_guidance"]
    assert set(by_guidance) == {f"guidance {g:g}" for g in toy_headroom.GUIDANCE_SCALES}
    # guidance 3 against itself: the same images, so no change at all
    assert by_guidance["guidance 3"]["jpeg_gain_kb"]["mean"] == 0.0
    assert by_guidance["guidance 3"]["alignment_change"]["mean"] == 0.0
    assert by_guidance["guidance 1.5"]["jpeg_gain_kb"]["n"] == 32


def test_sweep_variants_are_train_flags_and_the_summary_spans_seeds(tmp_path):
    from benchmarks import sweep

    assert sweep.parse_variant("kl 0.1=--kl-coef 0.1 --eta 4") == ("kl 0.1", ["--kl-coef", "0.1", "--eta", "4"])
    assert sweep.parse_variant("preset=") == ("preset", [])
    with pytest.raises(Exception, match="NAME=FLAGS"):
        sweep.parse_variant("--kl-coef 0.1")
    cfg = sweep.run_config(["--preset", "toy-jpeg"], ["--kl-coef", "0.1", "--epochs", "4"], 2, tmp_path / "r")
    assert (cfg.kl_coef, cfg.seed, cfg.heldout_every, cfg.model) == (0.1, 2, 4, "toy")  # held out before and after
    assert cfg.output_dir == str(tmp_path / "r")

    base = (
        "--model tiny --reward jpeg-compressibility --num-steps 3 --min-step-std 0 --epochs 1 --prompts-per-batch 2 "
    )
    base += "--batches-per-epoch 1 --images-per-prompt 2 --train-batch-size 4 --gradient-accumulation-steps 1 "
    base += "--grid-num-images 2 "
    base += "--heldout-prompts toy_novel --heldout-images 1 --heldout-diversity none"
    out = tmp_path / "sweep.json"
    sweep.main(["--name", "t", "--base", base, "--variant", "a=", "--variant", "b=--kl-coef 0", "--seeds", "0", "1",
                "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["complete"] and [r["variant"] for r in result["runs"]] == ["a", "a", "b", "b"]
    assert result["settings"]["variants"] == {"a": [], "b": ["--kl-coef", "0"]}
    row = result["summary"]["b"]
    change = row["heldout/jpeg-compressibility/change"]
    runs = [r for r in result["runs"] if r["variant"] == "b"]
    expected = [r["heldout"][-1]["heldout/jpeg-compressibility"] - r["heldout"][0]["heldout/jpeg-compressibility"]
                for r in runs]  # fmt: skip
    assert row["seeds"] == 2 and change["values"] == pytest.approx(expected)
    assert "kl" in result["runs"][0]["curves"] and "kl" not in runs[0]["curves"]  # the flag took effect
    table = sweep.show(result, ["heldout/jpeg-compressibility/change"]).splitlines()
    assert len(table) == 4 and table[3].startswith(f"| b | 2 | {change['mean']:+.3f} ± {change['ci95']:.3f} |")


def test_frontier_picks_the_best_gain_within_each_budget():
    from benchmarks import frontier

    def run(variant, seed, gain, loss, curve=None):
        curve = curve or [0.0, gain / 2, gain]
        return {"variant": variant, "seed": seed, "train_seconds": 1.0, "images_per_epoch": 64,
                "heldout": [{"epoch": e, frontier.REWARD: c, frontier.ALIGNMENT: 0.9 - loss * e / 4}
                            for e, c in zip((0, 2, 4), curve)]}  # fmt: skip

    runs = [run("r-safe", s, 0.03, 0.01) for s in (0, 1)] + [run("r-far", s, 0.06, 0.07) for s in (0, 1)]
    runs += [run("d-safe", s, 0.01, 0.015) for s in (0, 1)] + [run("d-far", s, 0.09, 0.3) for s in (0, 1)]
    algorithms = {"r-safe": "rebel", "r-far": "rebel", "d-safe": "ddpo", "d-far": "ddpo"}
    result = frontier.analyse(runs, algorithms)
    assert result["points"]["r-far"]["alignment_loss"]["mean"] == pytest.approx(0.07)
    assert result["points"]["d-far"]["jpeg_gain_kb"]["mean"] == pytest.approx(0.09)
    f = result["frontier"]
    assert f["0.02"]["rebel"]["variant"] == "r-safe" and f["0.02"]["ddpo"]["variant"] == "d-safe"
    assert f["0.02"]["more_gain"] == "rebel"
    assert f["0.1"]["rebel"]["variant"] == "r-far" and f["0.1"]["ddpo"]["variant"] == "d-safe"  # d-far is outside
    q = result["queries"]
    assert q["ddpo_variant"] == "d-safe" and q["ddpo_queries"] == 256
    assert q["rebel_queries_to_reach"] == {"r-safe": 128, "r-far": 128} and q["rebel_fewer_queries"]


def test_frontier_extend_keeps_unchanged_variants_and_reruns_changed_ones():
    from benchmarks import frontier

    def run(variant, seed):
        heldout = [{"epoch": 0, frontier.REWARD: -1.0, frontier.ALIGNMENT: 0.9}]
        return {"variant": variant, "seed": seed, "train_seconds": 1.0, "heldout": heldout}

    base = frontier.BASE
    earlier = {
        "command": "python -m benchmarks.frontier",
        "machine": {"cpu": "x"},
        "settings": {"base": base, "seeds": [0, 1], "threads": 1,
                     "variants": {"same": ["--kl-coef", "0.1"], "changed": ["--eta", "8"], "gone": []}},
        "runs": [run(v, s) for v in ("same", "changed", "gone") for s in (0, 1)],
    }  # fmt: skip
    variants = [("rebel", "same", "--kl-coef 0.1"), ("rebel", "changed", "--eta 6"), ("ddpo", "new", "")]
    kept = frontier.reusable(earlier, base, [0, 1], variants)
    assert [(r["variant"], r["seed"]) for r in kept] == [("same", 0), ("same", 1)]
    ran = {"settings": {"base": base, "seeds": [0, 1], "variants": {"changed": ["--eta", "6"], "new": []}},
           "runs": [run(v, s) for v in ("changed", "new") for s in (0, 1)]}  # fmt: skip
    merged = frontier.merge(ran, earlier, kept, "old.json")
    assert merged["extends"]["variants"] == ["same"] and merged["extends"]["threads"] == 1
    assert merged["settings"]["variants"] == {"same": ["--kl-coef", "0.1"], "changed": ["--eta", "6"], "new": []}
    assert sorted(merged["summary"]) == ["changed", "new", "same"] and len(merged["runs"]) == 6
    with pytest.raises(ValueError, match="seeds"):
        frontier.reusable(earlier, base, [0, 1, 2], variants)
    with pytest.raises(ValueError, match="base"):
        frontier.reusable(earlier, base + " --epochs 5", [0, 1], variants)
    earlier["runs"] = earlier["runs"][1:]  # "same" lost seed 0
    with pytest.raises(ValueError, match="lacks"):
        frontier.reusable(earlier, base, [0, 1], variants)


def test_frontier_extend_refuses_before_training(tmp_path, capsys):
    """Usage errors (exit 2, one line) and no file written: a missing file, another base, nothing to run."""
    from benchmarks import frontier

    out = tmp_path / "new.json"
    complete = {
        "settings": {"base": frontier.BASE, "seeds": [0, 1, 2],
                     "variants": {name: shlex.split(flags) for _, name, flags in frontier.VARIANTS}},
        "runs": [{"variant": name, "seed": s} for _, name, _ in frontier.VARIANTS for s in (0, 1, 2)],
    }  # fmt: skip
    (tmp_path / "complete.json").write_text(json.dumps(complete))
    (tmp_path / "other.json").write_text(json.dumps({**complete, "settings": {**complete["settings"], "base": "x"}}))
    cases = (("missing.json", "no such file"), ("other.json", "differ"), ("complete.json", "nothing to run"))
    for name, says in cases:
        with pytest.raises(SystemExit) as e:
            frontier.main(["--extend", str(tmp_path / name), "--out", str(out)])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()


def test_log_alignment_plugin_is_the_log_of_toy_alignment_full():
    """The sweep plug-in loads by name as a user's would, and scores log(toy-alignment-full), floored."""
    from rebel_diffusion.rewards import load_reward
    from rebel_diffusion.toy.data import make_batch

    images, _, prompts = make_batch(4, seed=0)  # (4, 3, 32, 32) drawn as captioned
    images = torch.cat([images, torch.zeros(1, 3, 32, 32)])  # a black image: no caption's shape
    prompts = [*prompts, "a white cross on a green background"]
    log_reward = load_reward("benchmarks.toy_rewards:LogAlignmentFull")
    probability = load_reward("toy-alignment-full")(images, prompts)
    expected = probability.clamp(min=1e-3).log()
    assert torch.allclose(log_reward(images, prompts), expected)
    assert expected[:4].exp().min() > 0.5 and expected[4] < expected[:4].min()


@pytest.mark.parametrize("attribute", ["SoftAlignmentFull", "SoftAlignmentFullT2"])
def test_soft_alignment_plugin_is_the_classifier_at_its_temperature_and_prefers_true_colours(attribute):
    """Independent reference: the classifier's three heads, each softmax at T (3, 2), multiplied. And
    the point of it: a square between orange and yellow, which the classifier at T = 1 already calls
    yellow with near certainty, scores less than the palette's yellow."""
    from benchmarks import toy_rewards
    from rebel_diffusion.rewards import load_reward
    from rebel_diffusion.rewards.toy_alignment import load_classifier
    from rebel_diffusion.toy.data import COLOUR_NAMES, _coverage, make_batch, palette, sample_attributes

    images, attrs, prompts = make_batch(4, seed=0)  # (4, 3, 32, 32) drawn as captioned
    soft = load_reward(f"benchmarks.toy_rewards:{attribute}")
    temperature = getattr(toy_rewards, attribute).TEMPERATURE
    assert temperature > 1
    with torch.no_grad():
        logits = load_classifier()(images)
    expected = torch.ones(4)
    for head in ("shape", "colour", "background"):
        p = (logits[head] / temperature).softmax(-1)  # (4, n)
        expected = expected * p[torch.arange(4), attrs[head]]
    assert torch.allclose(soft(images, prompts), expected, atol=1e-5)

    orange, yellow, black = (COLOUR_NAMES.index(c) for c in ("orange", "yellow", "black"))
    square = sample_attributes(8, 1, [(1, orange, black)])
    alpha = _coverage(square["shape"], square["cx"], square["cy"], square["radius"], 32).unsqueeze(1)
    pal = palette()

    def squares(t):  # (8, 3, 32, 32): squares a fraction t of the way from orange to yellow, on black
        colour = ((1 - t) * pal[orange] + t * pal[yellow]).view(1, 3, 1, 1)
        return alpha * colour + (1 - alpha) * pal[black].view(1, 3, 1, 1)

    caption = ["a yellow square on a black background"] * 8
    hard = load_reward("toy-alignment-full")
    assert hard(squares(0.6), caption).mean() > 0.95  # T = 1: amber already counts as yellow
    assert soft(squares(0.6), caption).mean() < soft(squares(1.0), caption).mean() - 0.03  # T = 1: 0.01
