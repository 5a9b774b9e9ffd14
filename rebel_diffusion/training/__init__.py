"""Training: the recipe (``recipe``: setup -> train -> save_checkpoint -> cleanup) and its support.

- ``builders``: the parts setup assembles and the checks it runs before any write;
- ``reference``: the frozen base policy (KL term, ``--anchor base``);
- ``reporting``: the startup lines, grids, held-out figures, metrics, curves, console lines;
- ``checkpoint``: the training state, captured, saved, loaded back exactly;
- ``preemption``: stopping on SIGINT/SIGTERM with a checkpoint, every process alike;
- ``ema``: the moving average of the trainable weights;
- ``distributed``: reductions across processes.
"""
