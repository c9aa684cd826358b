"""Stand-ins for Flower's pieces in strategy tests: legacy client proxies, and a Grid
whose nodes run a client mod in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message
from flwr.server.client_proxy import ClientProxy


class FakeProxy(ClientProxy):
    """A legacy-API client the strategy can sample but never calls."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class ModGrid:
    """A Message-API Grid whose ``nodes`` run ``mod`` around ``app`` in-process, each
    with its own context (:func:`tests.helpers.new_context`, plus ``node_config``), and
    answer every message."""

    def __init__(self, mod, app: Callable[[Message, Context], Message], nodes: Iterable[int],
                 node_config: dict | None = None) -> None:
        from tests.helpers import new_context

        self.mod, self.app = mod, app
        self.contexts = {u: new_context(u) for u in nodes}
        for context in self.contexts.values():
            context.node_config.update(node_config or {})

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = self.mod(msg, self.contexts[node], self.app)
            reply.metadata.__dict__["_src_node_id"] = node  # as Flower routes the reply
            out.append(reply)
        return out
