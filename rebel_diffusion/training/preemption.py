"""Stopping a run on a signal with a checkpoint, every process at the same point.

SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and torch elastic send before they kill) ask
the run to stop. The epoch in progress is finished when it is expected to end within the grace
period (``--stop-grace`` seconds, from the previous epoch's duration); otherwise every process
cuts it short at the next ``point`` (``StopEpoch``) and the state the epoch started from is the
checkpoint. A second Ctrl-C stops at once (``KeyboardInterrupt``).

Every process decides the same way: the decision reduces (max) over processes whether any was
signalled, how long ago, and how long the epoch has left.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .distributed import reduce_max

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_SECONDS = 5.0  # kept free within the grace period for writing the checkpoint
ELASTIC_ECHO_SECONDS = 1.0  # torch elastic's echo of a terminal's Ctrl-C comes within this


class StopEpoch(Exception):
    """A stop was requested and the epoch in progress cannot finish within the grace period."""


@dataclass
class Preemption:
    """Which signal asked the run to stop and when, and what the grace-period decision needs."""

    grace: float  # --stop-grace, seconds
    announce: bool = True  # this process prints the stop message (the local main process)
    signal: int | None = None
    time: float = 0.0  # time.monotonic() of the first signal
    epoch_started: float = 0.0
    last_epoch_seconds: float | None = None

    def request(self, signum: int) -> None:
        """The signal handler: the first signal asks for a stop; a second Ctrl-C stops at once.

        Under torch elastic (accelerate's multi-process launch) the agent follows a terminal's SIGINT
        with its own at once: there a second Ctrl-C counts from a second after the first.
        """
        now = time.monotonic()
        if self.signal is not None:
            window = ELASTIC_ECHO_SECONDS if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
            if signum == signal.SIGINT == self.signal and now - self.time >= window:
                raise KeyboardInterrupt
            return
        self.signal, self.time = signum, now
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: stopping with a checkpoint within --stop-grace "
                f"{self.grace:g} s (Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    @contextmanager
    def handlers(self):
        """SIGINT and SIGTERM call ``request`` inside the block; the previous handlers come back after."""
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, lambda signum, _frame: self.request(signum))
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def start_epoch(self) -> None:
        self.epoch_started = time.monotonic()

    def end_epoch(self) -> None:
        self.last_epoch_seconds = time.monotonic() - self.epoch_started

    def point(self, accelerator) -> None:
        """A point every process reaches in step (after a sampling batch, after an optimizer step).

        If any process was asked to stop and the epoch is not expected to end within the grace
        period, every process raises ``StopEpoch`` here.
        """
        now = time.monotonic()
        asked = self.signal is not None
        waited = now - self.time if asked else 0.0
        remaining = (
            math.inf if self.last_epoch_seconds is None else self.last_epoch_seconds - (now - self.epoch_started)
        )
        local = [1.0 if asked else 0.0, waited, min(max(remaining, 0.0), 1e9)]
        flag, waited, remaining = reduce_max(accelerator, local)
        if flag > 0 and waited + remaining + CHECKPOINT_SECONDS > self.grace:
            if self.signal is None:  # another process was signalled: stop with its signal's exit code
                self.signal, self.time = signal.SIGTERM, now
            raise StopEpoch

    def agree(self, accelerator) -> bool:
        """True on every process when any was signalled; each then records the same signal."""
        (signum,) = reduce_max(accelerator, [float(self.signal or 0)])
        if signum:
            self.signal = self.signal or int(signum)
        return bool(signum)
