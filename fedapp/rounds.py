"""The round loop: a Message-API strategy, driven one round at a time.

Flower's ``Strategy.start`` runs the same steps; driving them here lets the app
record seconds and bytes per round and write its outputs as each round ends.
Any ``flwr.serverapp.strategy.Strategy`` plugs in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

RoundHook = Callable[[int, ArrayRecord, dict], None]


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of array payload in ``messages`` (what dominates the wire)."""
    total = 0
    for msg in messages:
        if msg.has_content():
            total += sum(r.count_bytes() for r in msg.content.array_records.values())
    return total


def _prefixed(prefix: str, record: MetricRecord | None) -> dict:
    return {f"{prefix}{k}": v for k, v in (record or {}).items()}


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
    central_eval: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    on_round: RoundHook,
    first_round: int = 1,
) -> ArrayRecord:
    """Run rounds ``first_round`` .. ``num_rounds``; call ``on_round(round, arrays,
    row)`` after each (``first_round`` > 1 goes on from a checkpoint).

    ``row`` holds seconds, bytes each way, the number of valid and failed train
    replies, aggregated client metrics (``train-*``, ``fed-*``) and centralized
    ones (``central-*``). Returns the final global arrays.

    Raises
    ------
    RuntimeError
        If rounds ran but none produced a usable update (every client failed or was
        left out): such a run must not end as a success.
    """
    if central_eval is not None and first_round == 1:
        on_round(0, arrays, _prefixed("central-", central_eval(0, arrays)))
    ran, updated = 0, 0
    for rnd in range(first_round, num_rounds + 1):
        start = time.monotonic()
        log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
        sent = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)), grid))
        if getattr(strategy, "budget_exhausted", False):  # central DP's privacy budget
            log(WARNING, "Training stopped before round %d: the privacy budget is spent", rnd)
            break
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        ran += 1
        if new_arrays is None:
            log(WARNING, "Round %d: no usable update, the global model stays as it was", rnd)
        else:
            arrays, updated = new_arrays, updated + 1
        failures = sum(1 for m in replies if m.has_error()) + len(sent) - len(replies)
        eval_sent = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(evaluate_config)), grid))
        eval_replies = list(grid.send_and_receive(eval_sent, timeout=timeout))
        fed_metrics = strategy.aggregate_evaluate(rnd, eval_replies)
        row = {
            "bytes-down": payload_bytes(sent) + payload_bytes(eval_sent),
            "bytes-up": payload_bytes(replies) + payload_bytes(eval_replies),
            "train-clients": len(replies) - sum(1 for m in replies if m.has_error()),
            "train-failures": failures,
            **_prefixed("train-", train_metrics),
            **_prefixed("fed-", fed_metrics),
        }
        row = {k.replace("train-train-", "train-"): v for k, v in row.items()}
        if central_eval is not None:
            row.update(_prefixed("central-", central_eval(rnd, arrays)))
        row["seconds"] = round(time.monotonic() - start, 3)
        on_round(rnd, arrays, row)
    if ran and not updated:
        raise RuntimeError(f"none of the {ran} rounds run produced a usable update: every "
                           "client failed or was left out (see the warnings above)")
    return arrays
