"""Masking (secagg) strategy tests of both Flower APIs: the nodes' models and weights,
and legacy client proxies that run the mods and a NumPyClient in-process."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy

from strategies.aggregation import weighted_average
from strategies.secagg_legacy import legacy_secagg_mod
from strategies.secagg_protocol import PAYLOAD_KEY
from tests.helpers import SHAPES, new_context


NODES = [101, 202, 303, 404, 505, 606]  # threshold: more than half of 6, i.e. 4


def local_model(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-1.5, 1.5, s).astype(np.float32) for k, s in SHAPES.items()}


def weight(node: int) -> int:
    return node // 10  # 10, 20, ..., 60 examples


def expected(nodes: list[int]) -> list[np.ndarray]:
    return weighted_average([list(local_model(u).values()) for u in nodes],
                            [weight(u) for u in nodes])


class LegacyClient(NumPyClient):
    def __init__(self, node: int) -> None:
        self.node = node

    def fit(self, parameters, config):
        return list(local_model(self.node).values()), weight(self.node), {"train-loss": 1.0}


class LegacyProxy(ClientProxy):
    """A client proxy that runs the legacy mod and NumPyClient in-process."""

    def __init__(self, node: int, silent: str = "", mods: tuple = (legacy_secagg_mod,)) -> None:
        super().__init__(str(node))
        self.node_id, self.silent, self.mods = node, silent, mods
        self.context = new_context(node)

    def _call(self, content: RecordDict, message_type: str) -> RecordDict:
        msg = Message(content, dst_node_id=self.node_id, message_type=message_type)

        def app(m: Message, c: Context) -> Message:
            return handle_legacy_message_from_msgtype(
                lambda context: LegacyClient(self.node_id).to_client(), m, c)
        for mod in reversed(self.mods):  # the first mod is the outermost, as in Flower
            app = (lambda mod, inner: lambda m, c: mod(m, c, inner))(mod, app)
        return app(msg, self.context).content

    def get_properties(self, ins, timeout, group_id):
        if json.loads(ins.config[PAYLOAD_KEY])["stage"] == self.silent:
            raise TimeoutError(f"node {self.node_id} did not answer")
        return compat.recorddict_to_getpropertiesres(
            self._call(compat.getpropertiesins_to_recorddict(ins), "get_properties"))

    def fit(self, ins, timeout, group_id):
        return compat.recorddict_to_fitres(
            self._call(compat.fitins_to_recorddict(ins, True), "train"), False)

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError
