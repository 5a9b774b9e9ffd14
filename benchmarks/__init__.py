"""Benchmarks of rebel_diffusion: speed, memory, rewards, the demo's wall time, and learning.

Run each from the repository root as a module; each writes one JSON (by default under
``benchmarks/results/``) that records the machine and the versions (``benchmarks.env``)::

    python -m benchmarks.speed       # sampling, REBEL step speed and memory, FLOPs, rewards, an epoch
    python -m benchmarks.sampler     # our sampler vs a plain diffusers call, side by side
    python -m benchmarks.rewards     # each reward's images/s
    python -m benchmarks.demo        # wall time of the offline demo command
    python -m benchmarks.learning    # REBEL vs DDPO at equal reward queries on the toy model
    python -m benchmarks.env         # the environment record of this machine

``common``, ``flops`` and ``training_memory`` hold the sections that ``benchmarks.speed`` runs.
``benchmarks/README.md`` lists the measured figures and the machines they came from.
"""
