"""The server's round loop (fedapp.rounds) and its failure rule."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedapp.rounds import run_rounds


class NoUpdates:
    """A strategy whose rounds never produce an update (every client failed)."""

    def configure_train(self, rnd, arrays, config, grid):
        return []

    def aggregate_train(self, rnd, replies):
        return None, None

    def configure_evaluate(self, rnd, arrays, config, grid):
        return []

    def aggregate_evaluate(self, rnd, replies):
        return None


class Grid:
    def send_and_receive(self, messages, timeout=None):
        return []


def rounds(first_round: int, num_rounds: int, seen: list) -> ArrayRecord:
    return run_rounds(NoUpdates(), Grid(), ArrayRecord([np.zeros(2)]), num_rounds,
                      ConfigRecord(), ConfigRecord(), 1.0, None,
                      lambda rnd, arrays, row: seen.append(rnd), first_round=first_round)


def test_a_run_without_any_update_fails_and_resumed_rounds_start_later():
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="none of the 2 rounds run produced a usable update"):
        rounds(3, 4, seen)
    assert seen == [3, 4]
    rounds(5, 4, seen)  # nothing left to run: not a failure
    assert seen == [3, 4]
