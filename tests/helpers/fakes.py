"""Stand-ins for Flower's legacy client proxies in strategy tests."""

from __future__ import annotations

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
