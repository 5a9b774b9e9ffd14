"""The denoising steps of the samplers, each with the log-prob of its output: one algorithm a file.

A denoising step x_t -> x_prev of a stochastic sampler is a Gaussian policy
pi(x_prev | x_t, c) = N(mean_theta(x_t, t, c), std_t^2 I); RL fine-tuning needs its log-density.

Log-prob convention (used by every loss in this package): the elementwise Gaussian
log-density of x_prev, MEAN over the latent dims (C*h*w), one number per image and step. A
trajectory's log-prob is the SUM of that over its stochastic steps (as the DDPO and RLCM code). The
mean keeps the per-step figures O(1) whatever the resolution; the trainer converts REBEL's eta,
which is defined against the summed log-likelihood, by dividing it by C*h*w.

Steps whose variance is zero are deterministic: they carry no log-prob. The step functions return
``None`` for them and the sampler marks them in ``Trajectories.stochastic``; they are never trained.

- ``ddim``: DDIM (Song et al. 2021) with eta > 0;
- ``lcm``: multistep LCM (Luo et al. 2023);
- ``gaussian``: the Gaussian log-density and KL, and helpers the steps share.
"""

from .ddim import ddim_step_with_logprob
from .gaussian import gaussian_kl, gaussian_log_prob
from .lcm import lcm_step_with_logprob

__all__ = ["ddim_step_with_logprob", "gaussian_kl", "gaussian_log_prob", "lcm_step_with_logprob"]
