"""What every strategy does with the nodes that failed a round, and with rounds that
produced nothing.

Flower-free: the Message-API and legacy strategies both report here. A node's
failure is logged once per round and cause (``nodes 3, 7 failed the train stage:
no Paillier private key ...``), not once per message, and a run whose rounds in a
row produced no usable update ends with :class:`NoUsableUpdate` naming the causes,
instead of finishing "completed" with an untouched model: in a secure mode a silent
empty run usually hides a key problem on the nodes.
"""

from __future__ import annotations

import logging
from logging import WARNING
from .checks import is_int

log = logging.getLogger("flwr").log  # Flower's logger by name, without importing Flower

#: Rounds in a row without a usable update before a run fails, by default.
SECURE_EMPTY_ROUNDS = 1
PLAINTEXT_EMPTY_ROUNDS = 3


class NoUsableUpdate(RuntimeError):
    """Too many rounds in a row produced no usable update: the run must end as failed."""


def check_empty_rounds(value: int) -> int:
    """``max_empty_rounds`` of a strategy, checked."""
    if not is_int(value) or value < 1:
        raise ValueError(f"max_empty_rounds must be an int >= 1 (rounds in a row without a "
                         f"usable update before the run fails), got {value!r}")
    return value


def _nodes(nodes: list[object]) -> str:
    return ("node " if len(nodes) == 1 else "nodes ") + ", ".join(map(str, nodes))


class RoundWatch:
    """Failures of one strategy's rounds: grouped by cause, logged once per round, and
    counted towards the limit of empty rounds in a row.

    Parameters
    ----------
    max_empty_rounds : int
        Rounds in a row without a usable update after which :meth:`end_round` raises
        :class:`NoUsableUpdate`.
    """

    def __init__(self, max_empty_rounds: int) -> None:
        self.max_empty_rounds = check_empty_rounds(max_empty_rounds)
        self.empty_in_a_row = 0
        self._causes: dict[tuple[str, str], list[object]] = {}
        self._last: list[str] = []

    def node_failed(self, node: object, cause: str, stage: str = "train") -> None:
        """``node`` answered ``stage`` with an error (or not at all) because of ``cause``."""
        self._causes.setdefault((stage, cause.strip() or "no reason given"), []).append(node)

    def flush(self) -> list[str]:
        """Log the failures gathered so far, one line per stage and cause; returns them."""
        lines = []
        for (stage, cause), nodes in self._causes.items():
            lines.append(f"{_nodes(nodes)} failed the {stage} stage: {cause}")
            log(WARNING, "%s", lines[-1])
            if stage != "evaluate":  # what made the round empty, for end_round's message
                self._last.append(lines[-1])
        self._causes.clear()
        return lines

    def end_round(self, server_round: int, usable: bool) -> None:
        """Close ``server_round``: log its failures; count it if it produced no usable
        update.

        Raises
        ------
        NoUsableUpdate
            If this makes ``max_empty_rounds`` rounds in a row without a usable update;
            the message names the nodes' failures of this round.
        """
        self.flush()
        causes, self._last = self._last, []
        if usable:
            self.empty_in_a_row = 0
            return
        self.empty_in_a_row += 1
        if self.empty_in_a_row >= self.max_empty_rounds:
            why = "; ".join(causes) or "no node sent a valid reply (see the warnings above)"
            raise NoUsableUpdate(
                f"{self.empty_in_a_row} round(s) in a row without a usable update, the last "
                f"round {server_round} (max_empty_rounds = {self.max_empty_rounds}): the run "
                f"stops as failed. {why}")


def report_failures(watch: RoundWatch, failures: list) -> None:
    """Legacy API: hand Flower's ``failures`` of a round (exceptions, or ``(client,
    result)`` pairs whose status is an error) to ``watch``."""
    for failure in failures:
        if isinstance(failure, BaseException):
            watch.node_failed("(unknown)", f"{type(failure).__name__}: {failure}")
        else:
            proxy, res = failure
            watch.node_failed(proxy.cid, res.status.message)
