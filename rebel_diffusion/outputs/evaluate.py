"""Evaluation: base vs fine-tuned on held-out prompts, with several rewards and diversity.

Reward hacking shows first in the rewards a run was NOT trained on and in diversity: the
training reward goes up while the others, and the spread of images per prompt, go down.

- ``evaluate_pipelines``: sample both models with the same prompts and seeds, score every reward,
  and measure diversity; the trainer calls it every N epochs (``heldout_metrics`` gives the
  ``heldout/<name>`` keys for ``metrics.jsonl``).
- Diversity: for each prompt, the mean pairwise cosine distance 1 - cos(e_i, e_j) of the image
  embeddings of its K images, averaged over prompts. The embedding is chosen with
  ``--diversity-model`` (``load_diversity_model``) and always named in the outputs.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import UsageError

JPEG_REWARDS = ("jpeg-compressibility", "jpeg-incompressibility")
# The table papers report for a fine-tune (aesthetic, CLIP and the human-preference models).
FIELD_REWARDS = ("aesthetic", "clip", "pickscore", "hpsv2", "imagereward")
FIELD_LABELS = {
    "aesthetic": "LAION aesthetic",
    "clip": "CLIP score",
    "pickscore": "PickScore",
    "hpsv2": "HPSv2.1",
    "imagereward": "ImageReward",
    "diversity": "diversity",
}
DEFAULT_CLIP = ("ViT-L-14", "openai")  # the backbone of the aesthetic and clip rewards
DIVERSITY_CHOICES = "auto, none, pixels, tiny-random-clip, clip, clip:MODEL:PRETRAINED"


# ----------------------------------------------------------------------------------------------
# Diversity embeddings


class PixelEmbedder:
    """Weight-free fallback: the image downscaled to 32x32, mean-centred, as a 3072-d vector.

    Cosine distance of these is 1 - the pixel correlation: it sees layout and colour changes,
    not semantics. Use a CLIP model for the real figure.
    """

    name = "pixels (32x32 RGB, mean-centred; no CLIP)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3072) float32."""
        x = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True)
        x = x.flatten(1)
        return x - x.mean(dim=1, keepdim=True)


class ClipEmbedder:
    """Image embeddings of an open_clip backbone (``rewards.clip_score.ClipBackbone``): preprocessing
    on tensors on the backbone's device, L2-normalised float32 output. The backbone cache is the
    rewards', so ``aesthetic``, ``clip`` and diversity on ViT-L/14 load it once."""

    def __init__(self, backbone, name: str):
        self.backbone, self.name = backbone, name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32."""
        return self.backbone.embed_images(images)


def tiny_random_clip(device="cpu") -> ClipEmbedder:
    """A seeded random open_clip model (32px input, 64-d): for offline plumbing tests only."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from ..rewards.clip_score import ClipBackbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        )
    preprocess = {"size": 32, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    backbone = ClipBackbone(model.eval().to(device), None, preprocess, torch.float32, 64)
    return ClipEmbedder(backbone, "tiny-random-clip (random weights: a plumbing test, not a real diversity figure)")


def open_clip_embedder(model_name: str, pretrained: str, device="cpu", dtype=torch.float32) -> ClipEmbedder:
    """open_clip ``model_name`` with weights ``pretrained`` (a tag such as ``openai``, or a local file)."""
    from ..rewards.clip_score import load_clip_backbone

    backbone = load_clip_backbone(model_name, pretrained, device=device, dtype=dtype)
    return ClipEmbedder(backbone, f"CLIP {model_name} ({pretrained}) image embeddings")


def _cached_weights(model_name: str, pretrained: str) -> str | None:
    """The local hub-cache file of an open_clip pretrained tag, or None (no network used)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    repo = (open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub") or "").strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the model hub be opened within ``timeout`` seconds (DNS included)?"""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(ok)


def _auto_clip(device, dtype) -> ClipEmbedder:
    """CLIP ViT-L-14/openai from the local hub cache, else downloaded; a UsageError when neither
    can be done (offline, the hub client would otherwise retry for about a minute)."""
    import open_clip

    model_name, tag = DEFAULT_CLIP
    cached = _cached_weights(model_name, tag)
    if cached:
        # From the file: no network call. OpenAI's weights need QuickGELU (the tag would set it).
        quick = open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu")
        embedder = open_clip_embedder(f"{model_name}-quickgelu" if quick else model_name, cached, device, dtype)
        embedder.name = f"CLIP {model_name} ({tag}) image embeddings"
        return embedder
    if not _hub_reachable():
        raise UsageError(f"CLIP {model_name}/{tag} is not in the local hub cache and the model hub is unreachable")
    return open_clip_embedder(model_name, tag, device, dtype)


def load_diversity_model(spec: str, device="cpu", dtype=torch.float32):
    """The image embedder for the diversity figure, or None for ``none``.

    ``spec``: ``auto`` (CLIP ViT-L-14/openai when its weights are cached or downloadable, else a
    warning and ``pixels``), ``clip`` (the same, or a UsageError), ``clip:MODEL:PRETRAINED`` (any
    open_clip model; PRETRAINED may be a local file), ``pixels``, ``tiny-random-clip`` (tests),
    ``none``. The embedder's ``.name`` says which one is used; reports print it.
    """
    if spec == "none":
        return None
    if spec == "pixels":
        return PixelEmbedder()
    if spec == "tiny-random-clip":
        return tiny_random_clip(device)
    if spec == "auto":
        try:
            return _auto_clip(device, dtype)
        except UsageError as e:
            print(
                f"warning: diversity uses pixel embeddings, not CLIP: {e}; pass --diversity-model "
                "clip:ViT-L-14-quickgelu:/path/to/open_clip_model.safetensors for the CLIP figure",
                file=sys.stderr,
            )
            return PixelEmbedder()
    if spec == "clip":
        return open_clip_embedder(*DEFAULT_CLIP, device, dtype)
    parts = spec.split(":", 2)
    if len(parts) == 3 and parts[0] == "clip" and all(parts[1:]):
        return open_clip_embedder(parts[1], parts[2], device, dtype)
    raise UsageError(f"--diversity-model {spec}: use one of {DIVERSITY_CHOICES}")


def pairwise_diversity(embeddings: torch.Tensor) -> float:
    """Mean over prompts of the mean pairwise cosine distance among each prompt's images.

    embeddings: (P, K, D), K >= 2 images per prompt. Returns a float in [0, 2]; 0 when all K
    images of every prompt have the same direction.
    """
    p, k, _ = embeddings.shape
    if k < 2:
        raise ValueError("diversity needs at least 2 images per prompt")
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cos = e @ e.transpose(1, 2)  # (P, K, K)
    off = ~torch.eye(k, dtype=torch.bool, device=cos.device)
    return float((1 - cos[:, off]).mean())


# ----------------------------------------------------------------------------------------------
# Scoring


def score_images(reward, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """reward over (B, 3, H, W) images in chunks -> (B,) float32 on the CPU."""
    out = [
        reward(images[i : i + batch_size], prompts[i : i + batch_size]).detach().float().cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out)


def summarize(scores: torch.Tensor) -> dict:
    """mean/std over the finite scores, and how many were not finite."""
    finite = scores[torch.isfinite(scores)]
    return {
        "mean": float(finite.mean()) if len(finite) else float("nan"),
        "std": float(finite.std(unbiased=False)) if len(finite) else float("nan"),
        "n": int(len(finite)),
        "nonfinite": int(len(scores) - len(finite)),
    }


def _embed(embedder, images: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(P*K, 3, H, W) -> (P, K, D)."""
    emb = torch.cat([embedder(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
    return emb.view(-1, k, emb.shape[-1])


def evaluate_images(
    images: torch.Tensor, prompts: list[str], k: int, rewards: dict, *, diversity=None, batch_size: int = 32
) -> dict:
    """Scores of one model's (P*K, 3, H, W) prompt-major images: {reward: summary, 'diversity': float|None}."""
    image_prompts = [p for p in prompts for _ in range(k)]
    out = {
        "rewards": {name: summarize(score_images(r, images, image_prompts, batch_size)) for name, r in rewards.items()}
    }
    out["diversity"] = pairwise_diversity(_embed(diversity, images, k, batch_size)) if diversity and k > 1 else None
    return out


def evaluate_pipelines(
    base_pipe,
    tuned_pipe,
    prompts: list[str],
    rewards: dict,
    seeds: list[int],
    settings,
    *,
    diversity=None,
    batch_size: int | None = 8,
    progress: bool = False,
    tuned_unet=None,
    keep_images: bool = False,
) -> dict:
    """Score base and fine-tuned samples of the same prompts and seeds with several rewards.

    Args:
        base_pipe: the base model's pipeline, or None to evaluate ``tuned_pipe`` alone (the trainer
            can evaluate its base once and reuse it).
        tuned_pipe: the fine-tuned pipeline (``tuned_unet`` overrides its UNet: a wrapped one).
        prompts: P held-out prompts.  seeds: K seeds; every prompt is drawn with each of them.
        rewards: {name: reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)}.
        settings: ``SamplingSettings`` for both models.
        diversity: an image embedder ((B, 3, H, W) -> (B, D), with ``.name``) or None.
        keep_images: also return the (P*K, 3, H, W) images under ``'images'`` (not JSON).

    Returns a JSON-ready dict: ``rewards[name]`` = {base, tuned, delta, base_std, tuned_std, ...},
    ``diversity`` = {base, tuned, delta, model} or None, and the prompts, seeds and settings used.
    """
    from .generation import sample_images

    settings = settings.resolve(tuned_pipe)
    k = len(seeds)
    result = {
        "num_prompts": len(prompts),
        "prompts": list(prompts),
        "seeds": list(seeds),
        "settings": asdict(settings),
    }
    sides, images = {}, {}
    for side, pipe, unet in (("base", base_pipe, None), ("tuned", tuned_pipe, tuned_unet)):
        if pipe is None:
            continue
        images[side] = sample_images(
            pipe, prompts, seeds, settings, batch_size=batch_size, progress=progress, unet=unet
        )
        sides[side] = evaluate_images(
            images[side], prompts, k, rewards, diversity=diversity, batch_size=batch_size or 32
        )
    result["rewards"] = {name: _compare({s: v["rewards"][name] for s, v in sides.items()}) for name in rewards}
    from ..rewards.base import Reward

    for name, reward in rewards.items():
        result["rewards"][name]["units"] = reward.units if isinstance(reward, Reward) else ""
    if diversity is not None and k > 1:
        result["diversity"] = {
            **_compare({s: {"mean": v["diversity"]} for s, v in sides.items()}),
            "model": diversity.name,
        }
    else:
        result["diversity"] = None
    if keep_images:
        result["images"] = images
    return result


def _compare(by_side: dict) -> dict:
    base, tuned = by_side.get("base"), by_side.get("tuned")
    out = {"base": base["mean"] if base else None, "tuned": tuned["mean"] if tuned else None}
    out["delta"] = out["tuned"] - out["base"] if base and tuned else None
    for side, summary in by_side.items():
        for key in ("std", "n", "nonfinite"):
            if key in summary:
                out[f"{side}_{key}"] = summary[key]
    return out


def heldout_metrics(result: dict) -> dict:
    """The fine-tuned model's figures as ``heldout/<name>`` keys for ``metrics.jsonl`` (and the curve),
    and each reward's standard error over the images, ``std / sqrt(n)``, as ``heldout_se/<name>``
    (the curve's band: a few images a prompt move the mean with their seeds)."""
    out = {f"heldout/{name}": v["tuned"] for name, v in result["rewards"].items()}
    for name, v in result["rewards"].items():
        if v.get("tuned_n"):
            out[f"heldout_se/{name}"] = v["tuned_std"] / math.sqrt(v["tuned_n"])
    if result.get("diversity"):
        out["heldout/diversity"] = result["diversity"]["tuned"]
    return out


# ----------------------------------------------------------------------------------------------
# Rewards by name


def parse_reward_names(text: str | None, trained: str | None) -> list[str]:
    """--rewards 'a,b,c' as a list; default: the run's trained reward, then the weight-free jpeg ones."""
    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise UsageError("--rewards is empty: give names separated by commas, e.g. aesthetic,clip")
    else:
        from ..rewards import parse_reward_weights

        weights = parse_reward_weights(trained) if trained else None  # several rewards: each of them
        names = (list(weights) if weights else [trained] if trained else []) + list(JPEG_REWARDS)
    return list(dict.fromkeys(names))


def load_rewards(names: list[str], *, device, dtype, weights: dict | None = None) -> dict:
    """{name: reward} through ``rewards.load_reward``; an unknown name is a UsageError (one line).

    ``weights``: local copies of weights (``rewards.WEIGHT_OPTIONS``); each reward gets those it reads.
    Weights load now (``reward.load()`` where offered), so a missing file fails before sampling.
    """
    from ..rewards import load_reward, reward_options

    rewards = {}
    for name in names:
        reward = load_reward(name, device=device, dtype=dtype, **reward_options(name, weights or {}))
        if hasattr(reward, "load"):
            reward.load()
        rewards[name] = reward
    return rewards


def load_field_rewards(*, device, dtype, weights: dict | None = None) -> tuple[dict, dict]:
    """The ``FIELD_REWARDS`` whose weights load: ({name: reward}, {name: why it was left out}).

    A reward is left out when its weights are neither local nor downloadable; a local copy that was
    named (``weights``) and fails is an error, not a silent omission.
    """
    from ..rewards import load_reward, reward_options

    weights = weights or {}
    rewards, left_out = {}, {}
    for name in FIELD_REWARDS:
        options = reward_options(name, weights)
        try:
            rewards[name] = load_reward(name, device=device, dtype=dtype, **options).load()
        except UsageError as e:
            if set(options) - {"device", "dtype"}:
                raise
            left_out[name] = str(e)
    return rewards, left_out


# ----------------------------------------------------------------------------------------------
# Reports


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}"


def _fmt_delta(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.4g}"


def markdown_report(result: dict, header: dict) -> str:
    """The result as markdown: a short header, then a table metric x {base, fine-tuned, delta}."""
    lines = ["# rebel-diffusion eval", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    s = result["settings"]
    lines += [
        f"- prompts: {result['num_prompts']} x {len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))})",
        f"- sampling: {s['sampler']} {s['num_steps']} steps, DDIM eta {s['ddim_eta']}, "
        f"guidance {s['guidance_scale']}, {s['width']}x{s['height']}",
        "",
        "| metric | base | fine-tuned | delta | units |",
        "|---|---:|---:|---:|---|",
    ]
    for name, v in result["rewards"].items():
        units = v.get("units") or "as the reward gives them"
        lines.append(f"| {name} | {_fmt(v['base'])} | {_fmt(v['tuned'])} | {_fmt_delta(v['delta'])} | {units} |")
    div = result.get("diversity")
    if div:
        figures = f"{_fmt(div['base'])} | {_fmt(div['tuned'])} | {_fmt_delta(div['delta'])}"
        lines.append(f"| diversity | {figures} | cosine distance |")
        lines += [
            "",
            f"Diversity: mean pairwise cosine distance among the images of each prompt, averaged over "
            f"prompts, on {div['model']}.",
        ]
    lines += ["", "Rewards: mean over all images (higher is better for each)."]
    return "\n".join(lines) + "\n"


def field_report(results: dict, header: dict, left_out: dict) -> str:
    """The field's table as markdown: a row per metric, base / fine-tuned / delta per prompt set.

    results: {prompt set label: ``evaluate_pipelines`` result}, e.g. training and held-out prompts.
    """
    labels = list(results)
    first = results[labels[0]]
    s = first["settings"]
    lines = ["# rebel-diffusion eval: the field's table", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    for label, r in results.items():
        lines.append(f"- {label} prompts: {r['num_prompts']} x {len(r['seeds'])} seeds")
    lines += [
        f"- sampling: {s['sampler']} {s['num_steps']} steps, DDIM eta {s['ddim_eta']}, "
        f"guidance {s['guidance_scale']}, {s['width']}x{s['height']}",
        "",
        "| metric | " + " | ".join(f"{lab}: base | fine-tuned | delta" for lab in labels) + " | units |",
        "|---|" + "---:|---:|---:|" * len(labels) + "---|",
    ]
    for name, v in first["rewards"].items():
        cells = []
        for r in results.values():
            x = r["rewards"][name]
            cells.append(f"{_fmt(x['base'])} | {_fmt(x['tuned'])} | {_fmt_delta(x['delta'])}")
        units = (v.get("units") or "as the reward gives them") + "; higher is better"
        lines.append(f"| {FIELD_LABELS.get(name, name)} | {' | '.join(cells)} | {units} |")
    if all(r.get("diversity") for r in results.values()):
        cells = [
            f"{_fmt(d['base'])} | {_fmt(d['tuned'])} | {_fmt_delta(d['delta'])}"
            for d in (r["diversity"] for r in results.values())
        ]
        lines.append(
            f"| diversity | {' | '.join(cells)} | cosine distance among a prompt's images; higher is more varied |"
        )
        lines += ["", f"Diversity is measured on {first['diversity']['model']}."]
    lines += ["", "Rewards: mean over all images. Papers report CLIP score and HPSv2.1 x100."]
    if left_out:
        lines += ["", f"Left out for want of weights: {', '.join(FIELD_LABELS.get(n, n) for n in left_out)}."]
        lines += [f"- {FIELD_LABELS.get(n, n)}: {why}" for n, why in left_out.items()]
    return "\n".join(lines) + "\n"


def write_field_reports(out: Path, results: dict, header: dict, left_out: dict) -> None:
    """eval.json (every set's result), eval.md (``field_report``) and the held-out eval_grid.png."""
    from .report import save_png

    out.mkdir(parents=True, exist_ok=True)
    images = {label: r.pop("images", None) for label, r in results.items()}
    doc = {**header, "table": "field", "prompt_sets": results, "left_out": left_out}
    (out / "eval.json").write_text(
        json.dumps(_finite_or_none(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out / "eval.md").write_text(field_report(results, header, left_out), encoding="utf-8")
    label = list(results)[-1]
    shown = images[label]
    if shown and "base" in shown and "tuned" in shown:
        r = results[label]
        save_png(comparison_grid(shown["base"], shown["tuned"], r["prompts"], r["seeds"]), out / "eval_grid.png")


def _finite_or_none(value):
    """NaN/inf -> None, recursively: eval.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def write_reports(out: Path, result: dict, header: dict) -> None:
    """eval.json, eval.md and, when the images were kept, eval_grid.png (``comparison_grid``)."""
    from .report import save_png

    out.mkdir(parents=True, exist_ok=True)
    images = result.pop("images", None)
    text = json.dumps(_finite_or_none({**header, **result}), indent=2, allow_nan=False)
    (out / "eval.json").write_text(text + "\n", encoding="utf-8")
    (out / "eval.md").write_text(markdown_report(result, header), encoding="utf-8")
    if images and "base" in images and "tuned" in images:
        save_png(
            comparison_grid(images["base"], images["tuned"], result["prompts"], result["seeds"]), out / "eval_grid.png"
        )


def comparison_grid(
    base: torch.Tensor,
    tuned: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    max_prompts: int = 8,
    max_seeds: int = 4,
):
    """A row per prompt: its base images, then its fine-tuned ones (same seeds), as one PIL image.

    base, tuned: (P*K, 3, H, W) prompt-major images; the first ``max_prompts`` prompts and
    ``max_seeds`` seeds are shown.
    """
    from .generation import grid_tiles
    from .report import make_grid

    k = len(seeds)
    p_n, k_n = min(len(prompts), max_prompts), min(k, max_seeds)
    tiles, captions = [], []
    for p in range(p_n):
        for side, images in (("base", base), ("tuned", tuned)):
            for j in range(k_n):
                tiles.append(images[p * k + j].cpu())
                captions.append(f"{side}: {prompts[p]} (seed {seeds[j]})")
    return make_grid(grid_tiles(torch.stack(tiles)), captions, ncols=2 * k_n)
