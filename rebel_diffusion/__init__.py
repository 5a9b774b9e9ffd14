"""rebel-diffusion: REBEL (and DDPO) reinforcement-learning fine-tuning of Stable Diffusion.

The flow, one module a stage: ``sampling`` (trajectories with per-step log-probs) ->
``rewards`` (score images) -> ``rebel`` / ``ddpo`` (pair, normalise, loss) -> ``train`` (the recipe)
-> ``report`` (grids, plots, metrics).
"""

__version__ = "0.1.0"
