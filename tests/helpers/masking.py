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
from strategies.secagg_masks import SecAggError, SecAggParams
from strategies.secagg_protocol import ServerRound, client_mask, client_step
from strategies.secagg_legacy import legacy_secagg_mod
from strategies.secagg_protocol import PAYLOAD_KEY
from tests.helpers import IDENTITY, SHAPES, new_context


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


# ------------------------------------------------------------------ protocol rounds
def node_ids(n: int, seed: int = 0) -> list[int]:
    """Flower-like 63-bit node ids, distinct."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < n:
        u = int(rng.integers(1, 2**63))
        if u not in ids:
            ids.append(u)
    return ids


class Round:
    """One round with honest in-process nodes; every stage can be tampered with
    between the calls."""

    def __init__(self, n=10, length=50, degree=0, params=None, identity=True, seed=0,
                 seen_keys=None, nodes=None, fraction=0.5, after=None):
        """``after``: the previous Round; this one goes on with its nodes' states, its
        seen keys and what its survivors prepared (keys, and shares made early)."""
        self.params = params or SecAggParams.derive(1.0)
        self.nodes = sorted(nodes or (after.nodes if after else node_ids(n, seed)))
        self.length = length
        self.identity = identity  # False: the nodes run without identity keys
        IDENTITY.register(self.nodes)
        if after is not None and seen_keys is None:
            seen_keys = after.sr.seen_keys
        self.sr = ServerRound(self.params, self.nodes, length, degree=degree,
                              threshold_fraction=fraction,
                              seen_keys=set() if seen_keys is None else seen_keys,
                              prepared=after.sr.prepared_next() if after else None)
        self.state = {u: dict(after.state.get(u, {})) if after else {} for u in self.nodes}
        self.rng = np.random.default_rng(seed + 1)
        self.xs, self.ws, self.ys, self.headers, self.seeds = {}, {}, {}, {}, {}

    def key(self, u):
        return IDENTITY(u) if self.identity else None

    def step(self, requests, skip=(), tolerate=False):
        """The nodes' replies; with ``tolerate``, a node that refuses does not answer
        (as a Flower node whose mod raises)."""
        replies, self.refused = {}, {}
        for u, req in requests.items():
            if u in skip:
                continue
            try:
                replies[u], self.state[u] = client_step(req, self.state[u], u, self.key(u))
            except SecAggError as err:
                if not tolerate:
                    raise
                self.refused[u] = str(err)
        return replies

    def advertise(self, skip=()):
        replies = self.step(self.sr.advertise_requests(), skip)
        self.sr.receive_adverts(replies)
        return replies

    def coin(self, skip=()):
        """The coin stage (sparse rounds only; nothing to do in a complete one)."""
        requests = self.sr.coin_requests()
        if requests:
            self.sr.receive_coins(self.step(requests, skip))

    def share(self, skip=()):
        """The share stage (after the coin stage, run here if the round needs one and
        the test did not run it); the shares made early in the last round, if any."""
        if self.sr.drawn is None:
            self.coin()
        replies = self.sr.preshared or self.step(self.sr.share_requests(), skip)
        self.sr.receive_shares(replies)
        return replies

    def mask(self, drop=(), xs=None, ws=None, sums=None, noise=0.0, fraction=0.0):
        """Every node in U2 masks (with ``sums[u]``, if given; with distributed DP's
        ``noise`` std in levels, shared among ``fraction`` of the members or the
        quorum); the vectors of ``drop`` never reach the server."""
        for u, payload in self.sr.mask_payloads().items():
            x = xs[u] if xs else self.rng.uniform(-self.params.clip, self.params.clip,
                                                  self.length)
            w = ws[u] if ws else int(self.rng.integers(1, 600))
            self.seeds[u] = int(self.rng.integers(2**32))
            y, h, self.state[u] = client_mask(payload, self.state[u], u, x, w,
                                              np.random.default_rng(self.seeds[u]),
                                              sums=sums[u] if sums else None,
                                              noise_levels=noise, noise_fraction=fraction)
            self.xs[u], self.ws[u], self.ys[u], self.headers[u] = x, w, y, h
            if u not in drop:
                self.sr.receive_masked(u, y, h)

    def check(self, skip=(), tolerate=False):
        self.check_replies = self.step(self.sr.check_requests(), skip, tolerate)
        self.sr.receive_checks(self.check_replies)
        return self.check_replies

    def unmask_requests(self):
        """The server's unmask requests, after the consistency check (run here unless
        the test ran it)."""
        if not self.sr.sigs:
            self.check()
        return self.sr.unmask_requests()

    def unmask(self, skip=(), tolerate=False):
        self.unmask_replies = self.step(self.unmask_requests(), skip, tolerate)
        return self.sr.receive_unmask(self.unmask_replies)

    def run(self, drop=(), xs=None, ws=None, sums=None):
        self.advertise()
        self.share()
        self.mask(drop, xs, ws, sums)
        return self.unmask()

    def expected(self):
        survivors = sorted(self.sr.masked)
        return weighted_average([[self.xs[u]] for u in survivors],
                                [self.ws[u] for u in survivors])[0]
