"""Shorter waits on real nodes than the ones Flower 1.42 hard-codes.

A deployed message stage waits on three polls: the ServerApp's ``Grid`` pulls the
replies every 3 s (``HttpGrid.send_and_receive``), an idle SuperNode asks the
SuperLink for a message every 3 s, and a SuperNode that has handed a message to its
ClientApp looks for the reply every 0.5 s (``flwr.supernode.start_client_internal``).
And a process that pulls a message's objects before their sender has stored them all
(the SuperNode lists a message to its ClientApp before it has downloaded its
objects, and sends a reply before its objects) retries after 1 s, doubling.
A round of masking has three message stages (five in its first round), so these
waits, not the model, set a deployed round's time (housing: 0.4 s a round in simulation).

- :class:`PollingGrid` wraps the ServerApp's grid and waits for replies with Flower's
  public ``push_messages``/``pull_messages``, polling every 0.03 s for 2 s after it
  sent the messages, then every 0.1 s. The error the
  SuperLink sends for a node that stopped reporting comes back from that node's id
  (Flower sends it from the SuperLink's), so the strategies' warnings name the node.
- Flower offers no setting for the SuperNode's waits, so ``fedapp client`` starts the
  SuperNode through this module (``python -m fedapp.polling SUPERNODE-ARGS``), which
  caps the sleeps of ``start_client_internal`` between asks to the SuperLink at
  ``FEDAPP_NODE_FAST_POLL_SECONDS`` (default 0.05) for 2 s after a message, at
  ``FEDAPP_NODE_POLL_SECONDS`` (default 0.25) during the rest of a run, and at 1 s
  once a node has had no message for a minute (:class:`Cadence`), and its looks for
  the ClientApp's reply (in its own memory) at 0.02 s, before running Flower's own
  ``flower-supernode`` entry point.
  Only that module's ``time.sleep`` changes.
- :func:`fast_object_pulls` makes the first retry of an object pull wait 0.01 s
  instead of 1 s, doubling to 0.05 s instead of 10 s (Flower's default arguments), in
  the ServerApp (through :class:`PollingGrid`), the SuperNode and the ClientApp worker:
  objects that arrive 0.3 s late cost 0.3 s, not 0.6 s.
- The SuperNode promises a heartbeat every ``FEDAPP_NODE_HEARTBEAT_SECONDS`` (default
  10, the least the SuperLink accepts; Flower's is 30). The SuperLink gives up on a node
  after two missed intervals, so a node that died holds up the round's stage for 20 s
  instead of 60 s. It then sends one every 4 s instead of every 20 s.
"""

from __future__ import annotations

import math
import os
import time
import types
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.app.message.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedapp.message_index import index_messages_by_node
from fedapp.packing import PackingError, pack_messages, unpack_message

GRID_POLL_SECONDS = 0.1
GRID_FAST_POLL_SECONDS = 0.03  # for FAST_SECONDS after sending: small models answer soon
NODE_FAST_POLL_SECONDS = 0.05  # for FAST_SECONDS after a message: the next stage's is near
FAST_SECONDS = 2.0
NODE_POLL_SECONDS = 0.25  # during a run
NODE_IDLE_POLL_SECONDS = 1.0  # after BURST_SECONDS without a message (Flower: 3 s always)
BURST_SECONDS = 60.0
NODE_POLL_ENV = "FEDAPP_NODE_POLL_SECONDS"
NODE_FAST_POLL_ENV = "FEDAPP_NODE_FAST_POLL_SECONDS"
NODE_HEARTBEAT_SECONDS = 10.0
NODE_HEARTBEAT_ENV = "FEDAPP_NODE_HEARTBEAT_SECONDS"
LOCAL_WAIT_SECONDS = 0.02  # between looks for the ClientApp's reply (Flower: 0.5 s)
PULL_FIRST_RETRY_SECONDS = 0.01
PULL_BACKOFF_CAP_SECONDS = 0.05


def fast_object_pulls() -> None:
    """Make this process's object pulls retry after 0.01 s, doubling to at most 0.05 s
    (Flower: 1 s, doubling to 10 s), for as long as Flower's time limit allows."""
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree):
        pull.__kwdefaults__["initial_backoff"] = PULL_FIRST_RETRY_SECONDS
        pull.__kwdefaults__["backoff_cap"] = PULL_BACKOFF_CAP_SECONDS
        # Flower's 500 tries last over an hour at its backoff, 25 s at ours: a node under
        # load (30 on 2 cores) stores a message's objects later than that. Keep Flower's
        # patience, its time limit (PULL_MAX_TIME, 2 h), not the count.
        pull.__kwdefaults__["max_tries_per_object"] = None


class PollingGrid(Grid):
    """A ``Grid`` whose ``send_and_receive`` polls for replies every
    :data:`GRID_FAST_POLL_SECONDS` for :data:`FAST_SECONDS` after sending (small models
    answer within that), then every ``poll_seconds``; everything else is the wrapped
    grid's.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp.
    poll_seconds : float
        Seconds between pulls while replies are outstanding.
    pack : bool
        Send each message's whole content as one array (:mod:`fedapp.packing`) and unpack the
        replies; only for ClientApps that run :func:`fedapp.packing.packed_content_mod`.
        A reply that cannot be unpacked becomes an error reply from its node.
    """

    def __init__(self, grid: Grid, poll_seconds: float = GRID_POLL_SECONDS,
                 pack: bool = False) -> None:
        self.grid = grid
        self.poll_seconds = poll_seconds
        self.fast_poll_seconds = min(poll_seconds, GRID_FAST_POLL_SECONDS)
        self.pack = pack
        fast_object_pulls()
        index_messages_by_node(grid)

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - Flower's Run
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201 - Flower's NodeInfo records
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        if self.pack:  # the originals share the packed messages' metadata, so get the ids
            messages = pack_messages(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = self.grid.pull_messages(message_ids)
        return [_unpacked(m) for m in replies] if self.pack else replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrive within ``timeout`` s."""
        messages = list(messages)
        sent = {i: m for i, m in zip(self.push_messages(messages), messages) if i}
        pending = set(sent)
        deadline = None if timeout is None else time.monotonic() + timeout
        cadence = Cadence(self.poll_seconds, self.poll_seconds, fast=self.fast_poll_seconds)
        cadence.busy()
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(_from_its_node(m, sent) for m in got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            cadence.sleep()
        return replies


def _unpacked(reply: Message) -> Message:
    try:
        return unpack_message(reply)
    except PackingError as exc:
        return make_message(reply.metadata, error=Error(
            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"malformed reply: {exc}"))


def _from_its_node(reply: Message, sent: dict[str, Message]) -> Message:
    """The SuperLink answers for a node that stopped reporting with an error from node
    ``SUPERLINK_NODE_ID`` (1), so a warning would name "node 1". Such a reply is made
    again as the error reply of the message it answers, from the node that message
    went to, so the strategies name the node that was lost."""
    original = sent.get(reply.metadata.reply_to_message_id)
    if original is None or not reply.has_error() \
            or reply.metadata.src_node_id != SUPERLINK_NODE_ID:
        return reply
    return Message(reply.error, reply_to=original)


class Cadence:
    """How long to wait before asking again: ``fast`` seconds for ``fast_window``
    seconds after the last sign of work, ``active`` seconds until ``burst`` seconds
    after it, ``idle`` seconds after that. A run's messages come in bursts: a stage's
    message follows the node's reply to the last one within a fraction of a second
    when the model is small (a masking round is three stages), the rounds follow each
    other within seconds to a minute. So a node answers the next stage at once, as
    fast as before during a run, and costs a fraction of the CPU between runs.

    Parameters
    ----------
    active, idle : float
        Seconds between asks during a burst and when idle.
    burst : float
        Seconds a burst lasts after :meth:`busy` was last called.
    fast : float | None
        Seconds between asks right after work (None, or more than ``active``: ``active``).
    fast_window : float
        Seconds after :meth:`busy` that asks come every ``fast`` seconds.
    """

    def __init__(self, active: float, idle: float, burst: float = BURST_SECONDS,
                 fast: float | None = None, fast_window: float = FAST_SECONDS) -> None:
        self.active, self.idle, self.burst = active, max(idle, active), burst
        self.fast = active if fast is None else min(fast, active)
        self.fast_window = fast_window
        self._last_busy = -math.inf

    def busy(self) -> None:
        """There was work just now."""
        self._last_busy = time.monotonic()

    def interval(self) -> float:
        """Seconds to wait before the next ask."""
        since = time.monotonic() - self._last_busy
        if since < self.fast_window:
            return self.fast
        return self.active if since < self.burst else self.idle

    def sleep(self, at_most: float = math.inf) -> None:
        time.sleep(min(at_most, self.interval()))


def _node_time(active: float, fast: float | None = None) -> types.ModuleType:
    """A stand-in for the ``time`` module of Flower's SuperNode loop, whose sleeps are of
    two kinds: 3 s between asks for a message when none came, and 0.5 s between looks
    for the ClientApp's reply (or its objects). A reply wait is work: it starts a burst,
    in which asks come every ``fast`` seconds (``FEDAPP_NODE_FAST_POLL_SECONDS``) for
    :data:`FAST_SECONDS`, then every ``active`` seconds (``FEDAPP_NODE_POLL_SECONDS``);
    after :data:`BURST_SECONDS` without work they come every :data:`NODE_IDLE_POLL_SECONDS`.
    A reply wait looks in the SuperNode's own memory, not over the network, so it is
    capped at :data:`LOCAL_WAIT_SECONDS`."""
    cadence = Cadence(active, max(active, NODE_IDLE_POLL_SECONDS), fast=fast)

    def sleep(seconds: float) -> None:
        if seconds < 1.0:  # waiting for the local reply: a look in this process's memory
            cadence.busy()
            time.sleep(min(seconds, LOCAL_WAIT_SECONDS))
        else:
            cadence.sleep(seconds)

    proxy = types.ModuleType("time")
    proxy.__dict__.update(vars(time))
    proxy.sleep = sleep
    return proxy


def _env_seconds(name: str, default: float, low: float, high: float, why: str = "") -> float:
    """Seconds from the environment variable ``name`` (``default`` if unset), checked to
    lie in ``[low, high]``."""
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not low <= value <= high:
        raise ValueError(f"{name}={raw!r}: give seconds between {low:g} and {high:g}{why}")
    return value


def node_poll_seconds() -> float:
    """``FEDAPP_NODE_POLL_SECONDS``, checked (default 0.25; Flower's own wait is 3)."""
    return _env_seconds(NODE_POLL_ENV, NODE_POLL_SECONDS, 0.01, 3.0)


def node_fast_poll_seconds() -> float:
    """``FEDAPP_NODE_FAST_POLL_SECONDS``, checked (default 0.05): the asks right after a
    message."""
    return _env_seconds(NODE_FAST_POLL_ENV, NODE_FAST_POLL_SECONDS, 0.01, 3.0)


def node_heartbeat_seconds() -> float:
    """``FEDAPP_NODE_HEARTBEAT_SECONDS``, checked against the range the SuperLink accepts."""
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    return _env_seconds(NODE_HEARTBEAT_ENV, NODE_HEARTBEAT_SECONDS, HEARTBEAT_MIN_INTERVAL,
                        HEARTBEAT_MAX_INTERVAL, " (the SuperLink refuses others)")


def node_settings() -> tuple[float, float, float]:
    """The node's poll intervals (during a run, right after a message) and heartbeat
    interval from the environment, checked: a bad one is a ValueError naming it."""
    return node_poll_seconds(), node_fast_poll_seconds(), node_heartbeat_seconds()


def heartbeat_every(seconds: float) -> None:
    """Make this process's SuperNode promise (and send) heartbeats for ``seconds``
    intervals: Flower reads its constant in these two modules at each heartbeat."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = seconds
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = seconds


def run_supernode() -> None:
    """Flower's ``flower-supernode`` with its waits capped (arguments from sys.argv) and,
    in ``--isolation process``, fedapp's ClientApp worker in its process
    (:func:`fedapp.node_worker.serve_in_process`)."""
    import importlib

    from flwr.common.constant import ISOLATION_MODE_PROCESS
    from flwr.supernode import start_client_internal

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")

    active, fast, heartbeat_seconds = node_settings()
    start_client_internal.time = _node_time(active, fast)
    heartbeat_every(heartbeat_seconds)
    fast_object_pulls()
    start = cli.start_client_internal

    def start_with_worker(**kwargs):  # noqa: ANN003, ANN202 - Flower's arguments
        if kwargs.get("isolation") == ISOLATION_MODE_PROCESS:
            from fedapp.node_worker import serve_in_process

            serve_in_process(kwargs["state_factory"].state())
        return start(**kwargs)

    cli.start_client_internal = start_with_worker
    cli.flower_supernode()


if __name__ == "__main__":
    run_supernode()
