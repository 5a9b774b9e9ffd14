"""Stopping on a signal: who decides, when, and that every process decides the same."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from rebel_diffusion.training.preemption import CHECKPOINT_SECONDS, ELASTIC_ECHO_SECONDS, Preemption, StopEpoch

ONE_PROCESS = SimpleNamespace(num_processes=1)


def test_a_second_ctrl_c_stops_at_once(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    stop = Preemption(grace=20, announce=False)
    stop.request(signal.SIGINT)  # the first: stop with a checkpoint
    assert stop.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # the second, however soon: at once
        stop.request(signal.SIGINT)
    stop = Preemption(grace=20, announce=False)
    stop.request(signal.SIGTERM)
    stop.request(signal.SIGINT)  # a SIGTERM'd run finishes its checkpoint
    assert stop.signal == signal.SIGTERM


def test_under_torch_elastic_its_echo_does_not_escalate(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    stop = Preemption(grace=20, announce=False)
    stop.request(signal.SIGINT)
    stop.request(signal.SIGINT)  # the agent's echo of the terminal's Ctrl-C, at once
    stop.time -= ELASTIC_ECHO_SECONDS
    with pytest.raises(KeyboardInterrupt):
        stop.request(signal.SIGINT)


def test_the_epoch_is_finished_only_when_it_ends_within_the_grace():
    stop = Preemption(grace=20, announce=False)
    stop.point(ONE_PROCESS)  # nobody asked: nothing happens
    stop.request(signal.SIGTERM)
    stop.start_epoch()
    with pytest.raises(StopEpoch):  # the first epoch: its length is unknown, so it is cut short
        stop.point(ONE_PROCESS)
    # An epoch of 10 s just started, 20 s of grace: it ends in time (with room for the checkpoint).
    stop.last_epoch_seconds = 10.0
    stop.start_epoch()
    stop.time = stop.epoch_started
    stop.point(ONE_PROCESS)
    # An epoch of 20 - CHECKPOINT_SECONDS + 1 s: no room to write the checkpoint after it.
    stop.last_epoch_seconds = 20.0 - CHECKPOINT_SECONDS + 1.0
    with pytest.raises(StopEpoch):
        stop.point(ONE_PROCESS)
    assert stop.agree(ONE_PROCESS)


def test_a_signal_of_another_process_stops_this_one_with_its_code():
    class Peers:  # two processes: the other one was sent SIGINT; reduce takes the max
        num_processes, device = 2, "cpu"

        @staticmethod
        def reduce(t, reduction):
            assert reduction == "max"
            other = t.clone()
            other[0] = float(signal.SIGINT) if len(t) == 1 else 1.0
            return other.maximum(t)

    stop = Preemption(grace=20, announce=False)
    assert stop.agree(Peers()) and stop.signal == signal.SIGINT
    stop = Preemption(grace=20, announce=False)
    with pytest.raises(StopEpoch):
        stop.point(Peers())
    assert stop.signal == signal.SIGTERM  # this process was not signalled: it exits as if sent SIGTERM


def test_handlers_are_installed_and_put_back():
    stop = Preemption(grace=20, announce=False)
    before = signal.getsignal(signal.SIGTERM)
    with stop.handlers():
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
