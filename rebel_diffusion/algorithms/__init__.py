"""The algorithms: how rewards become advantages and pairs, and how a step's gradient is formed.

- ``advantages``: rewards -> advantages (per group, prompt or batch statistics);
- ``rebel``: REBEL's regression (pairs, residuals, the base anchor) and its units (``eta_per_dim``);
- ``ddpo``: DDPO's PPO-clip loss, the baseline, and its units (``ddpo_clip_range``, ``ddpo_kl_coef``);
- ``updates``: the gradient of one optimizer step for either, one group of timesteps at a time.

Each is pure math on tensors; the recipe (``training.recipe``) feeds them.
"""
