"""Sampling: trajectories with the log-prob of every step (``sampler``), one step rule per file
(``steps``: DDIM, LCM, and the Gaussian log-density and KL they share). A new sampler adds its step
here and its branch in ``sampler``.
"""

from .sampler import (
    SamplingSettings,
    Trajectories,
    image_seeds,
    make_scheduler,
    planned_step_std,
    rescore_drift,
    rescore_log_probs,
    sample_trajectories,
    scheduler_step,
    sdxl_conditioning,
    settings_from_config,
    step_groups,
    step_log_prob,
    steps_log_prob,
)

__all__ = [
    "SamplingSettings",
    "Trajectories",
    "image_seeds",
    "make_scheduler",
    "planned_step_std",
    "rescore_drift",
    "rescore_log_probs",
    "sample_trajectories",
    "scheduler_step",
    "sdxl_conditioning",
    "settings_from_config",
    "step_groups",
    "step_log_prob",
    "steps_log_prob",
]
