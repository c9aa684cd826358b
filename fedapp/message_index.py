"""An index of a simulation's undelivered messages by destination node.

Flower 1.42's simulation engine asks its in-memory state for every node's next message
every 0.1 s (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``), and
each ask scans every stored message (``InMemoryLinkState.get_message_ins``): one pass
costs nodes x messages. With 100 messages a round among 10,000 simulated nodes a
pass takes seconds of CPU, and a plaintext spam round took 2x as long as with 1,000
nodes (docs/scaling.md). The ServerApp runs in the same process as that state (its
grid is an ``InMemoryGrid`` holding it), so :func:`index_messages_by_node` gives the
state an index kept by ``store_message_ins``: an ask looks only at its node's
messages, with Flower's own checks (expiry, federation, run, not yet delivered).

The index may hold ids the state has since deleted; an ask drops them. Nothing else
of the state changes, and real nodes (whose grid talks to a SuperLink) are untouched.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now
from flwr.superlink.grid import InMemoryGrid


def index_messages_by_node(grid: object) -> bool:
    """Index the undelivered messages of a simulation's state by destination node.

    Parameters
    ----------
    grid : object
        The grid Flower gave the ServerApp.

    Returns
    -------
    bool
        True if the grid's state is (now) indexed; False for any grid but a
        simulation's, which is left as it is.
    """
    state = getattr(grid, "state", None)
    if not isinstance(grid, InMemoryGrid) or not isinstance(state, InMemoryLinkState):
        return False
    if "get_message_ins" in vars(state):  # indexed already
        return True
    by_node: dict[int, dict[str, None]] = {}  # node id -> message ids, in store order
    store_message_ins = state.store_message_ins

    def add(message_id: str, message: Message) -> None:
        by_node.setdefault(message.metadata.dst_node_id, {})[message_id] = None

    def store_indexed(message: Message) -> str | None:
        with state.lock:
            message_id = store_message_ins(message)
            if message_id is not None:
                add(message_id, message)
        return message_id

    def get_message_ins(node_id: int, limit: int | None, *,
                        run_id: int | None = None) -> list[Message]:
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with state.lock:
            ids = by_node.get(node_id, {})
            for message_id in list(ids):
                state._check_stored_messages({message_id})  # Flower's expiry check
                message = state.message_ins_store.get(message_id)
                if message is None:  # expired, or answered and deleted
                    del ids[message_id]
                    continue
                if ((run_id is None or message.metadata.run_id == run_id)
                        and message.metadata.delivered_at == ""):
                    found.append(message)
                    if limit and len(found) == limit:
                        break
            if not ids:
                by_node.pop(node_id, None)
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
        return found

    with state.lock:
        for message_id, message in state.message_ins_store.items():
            add(message_id, message)
        state.store_message_ins = store_indexed
        state.get_message_ins = get_message_ins
    return True
