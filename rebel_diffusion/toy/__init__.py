"""The toy testbed: a small text-to-image model on which RL fine-tuning shows within CPU minutes.

- ``data``: the seeded synthetic dataset (one coloured shape on a coloured background, 32x32,
  captioned "a red circle on a blue background"), its train / held-out caption split and a
  caption parser;
- ``model/``: the built-in ``toy`` pipeline (``load_pipeline("toy")``), written by
  ``scripts/train_toy.py``: a diffusers ``StableDiffusionPipeline`` folder (4x8x8 latents, SD 1.x
  DDIM scheduler, real CLIP tokenizer), and ``model/classifier/``, the attribute classifier of the
  ``toy-alignment`` reward (``rebel_diffusion.rewards.toy_alignment``).

Its measured quality (how often samples match their prompt) is in
``benchmarks/results/toy_model.json``.
"""
