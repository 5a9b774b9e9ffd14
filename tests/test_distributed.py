"""Reductions across processes: one process is a no-op; several reduce as documented."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rebel_diffusion.training.distributed import check_in_sync, mean_across, reduce_max, sum_across

ONE = SimpleNamespace(num_processes=1, device="cpu")


class TwoProcesses:
    """A stand-in for accelerate with two processes: the other one holds ``other`` (same shape)."""

    num_processes, device = 2, "cpu"

    def __init__(self, other):
        self.other = other

    def reduce(self, t, reduction):
        both = torch.stack([t, torch.as_tensor(self.other, dtype=t.dtype)])
        return {"max": both.max(0).values, "sum": both.sum(0), "mean": both.mean(0)}[reduction]

    def gather(self, t):
        return torch.cat([t, torch.as_tensor(self.other, dtype=t.dtype)])


def test_one_process_is_a_no_op():
    assert reduce_max(ONE, [1.0, 2.0]) == [1.0, 2.0]
    assert sum_across(ONE, 3) == 3.0
    assert mean_across(ONE, {"loss": [1.0, 3.0], "empty": []}) == {"loss": 2.0, "empty": 0.0}
    check_in_sync(ONE, {"w": torch.ones(2)})


def test_two_processes_reduce_as_documented():
    assert reduce_max(TwoProcesses([5.0, 0.0]), [1.0, 2.0]) == [5.0, 2.0]
    assert sum_across(TwoProcesses([4.0]), 3) == 7.0
    # each process's mean over its steps, then the mean over processes (sorted names)
    assert mean_across(TwoProcesses([4.0, 6.0]), {"b": [1.0, 3.0], "a": [2.0]}) == {"a": 3.0, "b": 4.0}


def test_weights_out_of_sync_fail_loudly():
    weights = {"w": torch.ones(3, dtype=torch.float64)}
    check_in_sync(TwoProcesses([[3.0, 0.0]]), weights)  # the other process's digest: the same sum
    with pytest.raises(RuntimeError, match="differ across processes"):
        check_in_sync(TwoProcesses([[2.0, 0.0]]), weights)
