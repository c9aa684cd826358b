"""Masked secure aggregation, Flower-free: the stages of one round.

Bonawitz et al. (CCS 2017) with SecAgg+'s sparse neighbor graph (Bell et al.,
CCS 2020), for weighted FedAvg, with a consistency check against a server that
lies. For the round the server samples nodes ``U0`` and:

1. **advertise**: each node makes two fresh X25519 key pairs (``c`` to seal
   shares, ``s`` to agree masks) and a random coin, and sends the public halves and
   a commitment to the coin, signed with its Ed25519 identity key
   (:mod:`strategies.secagg_identity`). The nodes whose keys the server accepts are
   the round's members ``U1``.
1b. **coin** (sparse graphs only): every member gets the list of members (their
   signed keys and coin commitments), checks it (each signed under a distinct key
   of the federation's roster, its own keys as it made them) and reveals its coin,
   once per round.
2. **share**: each node gets the round's settings (encoding, degree, threshold
   fraction) and the members' keys, or in a sparse round every member's coin,
   which it checks against the commitments. From these alone it computes the
   round's **session** (a hash of the context, every member's keys and commitment,
   and the coins) and, as the server does, the graph (SecAgg+'s ring over ``U1`` in
   an order drawn from the session), its share point, its threshold ``t`` (more
   than the fraction of the smallest share group) and the round's quorum (more than
   the fraction of ``U1``). It draws a self-mask seed ``b``, Shamir-shares ``b`` and
   its ``s`` private key among itself and its neighbors, seals each neighbor's
   shares with AES-GCM under a key agreed with that neighbor, and sends them with a
   commitment to ``b`` → ``U2``.
3. **mask** (the train message): the server relays each node the sealed shares
   addressed to it; the node trains and sends
   ``y_u = w_u q_u + PRG(b_u) + sum_v ±PRG(s_uv)  (mod 2^bits)`` over the neighbors
   ``v`` whose shares it got (``+`` if ``u < v``) → ``U3``.
4. **check** (Bonawitz et al.'s ConsistencyCheck round): the server sends every
   survivor the round's view, who survived (``U3``) and who dropped (``U2 \\ U3``).
   A node refuses a view that leaves out a neighbor it masked with or lists one it
   did not (Bonawitz et al.'s ``U3`` within ``U2``), or names non-members; else it
   signs the view with the digest of the global model and round settings it trained
   from (Ed25519 under its identity key, bound to the session and its node id),
   once per round.
5. **unmask**: each survivor gets the same view and every survivor's signature.
   It reveals only if every survivor signed exactly that view and model, the
   survivors reach the quorum, and at least ``t`` of its own group survived; then
   the ``b`` shares of survivors and the ``s`` shares of the dropped, never both for
   one node, and only once per round. The server rebuilds each seed, checks it
   against the commitment or the advertised public key, removes the masks and
   decodes the weighted average.

Why the check stops a server that lies about dropouts (tests/attacks): to unmask
one node ``u`` it needs ``u``'s ``b`` from holders that believe ``u`` survived and
the ``s`` keys of ``u``'s mask partners from holders that believe those dropped.
An honest node signs one view per round and reveals only under a view every
survivor signed, whose survivors are more than the fraction (at least a half) of
the members: two views acted on share a survivor, who would have signed both. So
all honest holders act on one view, and under one view no node's ``b`` and ``s``
both come out; a view in which ``u`` masked with dropped nodes only is one ``u``
refuses (it lists neighbors ``u`` did not mask with, or leaves ``u``'s group below
``t``). This holds for sparse graphs too, since each node checks every survivor's
signature, not only its group's (the unmask request carries one signature per
survivor: 64 bytes each). It also stops a server that sends nodes different global
models (Pasquini et al., CCS 2022): nodes trained from another model sign another
digest, so no one reveals. Each signature is checked under the identity key that
signed the node's advertisement, so neither the server nor a client can sign for
another node; nodes shown different members or coins have different sessions, so
they cannot open each other's shares nor count each other's signatures. With ``k``
colluding clients, which sign whatever the server asks, two views of survivor sets
``S1``, ``S2`` (each at least the quorum ``q`` of the ``n`` members) can both be
acted on only if ``S1 & S2`` (at least ``2q - n`` nodes) are all colluders: the
check holds for ``k < 2q - n`` (one at the default fraction 0.5 with ten nodes; a
fraction of 2/3 gives about ``n / 3``, as in Bonawitz et al.). A survivor that does
not sign aborts the round (its input could not be unmasked): dropout recovery
covers nodes lost before the mask stage ends, as long as the quorum survives.

Each node also keeps its own minimums (:class:`NodePolicy`: share group size,
threshold fraction of at least a half) whatever the server sends, and remembers
the contexts it made keys for, refusing a replayed one.

Who chooses what. The server chooses the sample and the round's context (fresh:
nodes refuse a context they made keys for, and every key of a round is a fresh
X25519 pair, so masks, seals and signatures of two rounds never coincide). It
does not choose the graph: in a sparse graph the order on the ring comes from the
session, which holds every member's coin, committed to before any coin is
revealed and revealed only once the members are fixed. No party can choose it
alone: the server and colluding clients know their own coins, not an honest
node's, when the members are fixed. Leaving out a member whose coin it dislikes
would let the server choose, so a missing coin aborts the round; what remains is
aborting and trying again (a visible round each, with new keys everywhere), and
the sample. In a complete graph (the default up to eleven nodes per round, or
``secagg-neighbors >= n - 1``) the order does not matter and the coin stage is
skipped; the session still binds every member's keys.

From the second round on, in complete graphs, stages 1 and 2 disappear: each round
prepares the next one. **Pre-advertising**: the check request names the context of
the server's next round, and each survivor answers it with fresh keys and coin
commitment for that context, signed, beside its signature: exactly an advertise
reply, made early. **Sharing early**: the unmask request carries, for each node that
pre-advertised, the next round's share request (the round's settings and every
pre-advertised node's keys), and the node answers it beside its shares of this
round: exactly a share reply, made early. The next round then starts with the train
message. Why this keeps every property of stages 1 and 2:

- the keys are fresh, made only for that context, and leave the node only as
  public keys; a node uses them for at most one share request (then they are gone
  from its state), and new ones (a newer pre-advertisement, or an advertise
  request for the same context) replace them;
- the signature, the session and every HKDF info bind them to the context, so they
  are worthless in any other round (a replay fails authentication at the other
  nodes, the server refuses public keys it has seen before, as for stage 1, and a
  node refuses a mask request of another context than its shares were made for);
- the early share request is checked exactly as stage 2's (:func:`_share`: the
  members' signatures, this node's own keys, the settings against the node's
  policy), and refusing it costs the node only those shares: it still unmasks
  the round it is in;
- nothing of the round being unmasked goes into the next round's shares, and the
  node reveals this round's shares before it makes them: the server learns
  nothing earlier, and nothing else, than from stages 1 and 2.

The next round uses what was prepared only if it samples exactly the nodes that
made shares for it, with the same settings (the shares were made for those members:
a node left out would count as a dropout). With keys but no shares (the round
aborted before its unmask stage), the nodes sampled use their keys in an ordinary
share stage, and the others advertise. Otherwise (another sample, a node that
missed the unmask stage or lost its state) the round starts afresh, on a new
context. A sparse round does not use them: its coin stage needs every member, and
a node that pre-advertised a round ago may be gone; it advertises afresh, right
before the coin stage.

Pairwise masks cancel in the sum; a dropped node's masks are rebuilt from its
``s`` key, so the survivors' sum comes out; a node whose masked input arrives
after it was declared dropped can never be unmasked, since its ``b`` stays
secret. Everything on the wire is JSON with base64 bytes and a uint32/uint64
vector; nothing is pickled.

The server side is :class:`ServerRound`; the client side is :func:`client_step`
(stages 1, 1b, 2, 4 and 5, with the next round's 1 and 2 in 4 and 5) and
:func:`client_mask` (stage 3), which keep the node's
secrets in a dict the Flower adapters store in the node's own context state.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np

from .checks import is_int
from .aggregation import InvalidUpdate
from .secagg_identity import KEY_BYTES, SIGNATURE_BYTES, NodeIdentity, verify
from .discrete_gaussian import discrete_gaussian
from .secagg_masks import (SEED_BYTES, SHARE_BYTES, KeyPair, SecAggError, SecAggParams,
                      agree, centred_sum, check_public_key, commitment, decode_sum,
                      default_degree, encode_weighted, neighbor_graph, prg, public_of,
                      reconstruct_secret, seal, share_secret, threshold_for, unseal)
from .secure_sums import (MAX_SUM_NAME, MAX_SUMS, WEIGHT, check_names, decode_sums, encode_sums,
                          from_fixed, sum_slots, to_fixed)

# Flower's logger by name: its lines show where Flower's do, without importing Flower
log = logging.getLogger("flwr").log

VERSION = 3  # 2: coin stage, session-bound keys, consistency check; 3: keys pre-advertised
# at the check, the next round's shares made at the unmask
MASKED_KEY = "secagg-masked"
HEADER_KEY = "secagg-header"
MAX_HEADER_BYTES = 4096  # the header beside a masked vector: ids, weight, layout digest
PAYLOAD_KEY = "secagg-payload"
MAX_PAYLOAD_BYTES = 16 << 20
SEALED_BYTES = 12 + 2 * SHARE_BYTES + 16  # GCM nonce, b and s shares, tag
USED_CONTEXTS = 1024  # contexts a node remembers having made keys for (44 bytes each)


class RoundAborted(RuntimeError):
    """Too few nodes are left to finish the round securely; the model stays as it was."""


# ------------------------------------------------------------------ wire helpers
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, size: int | None = None, what: str = "field") -> bytes:
    if not isinstance(text, str):
        raise SecAggError(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise SecAggError(f"{what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise SecAggError(f"{what} must have {size} bytes, got {len(data)}")
    return data


def dumps(payload: dict) -> str:
    return json.dumps({"version": VERSION, **payload}, separators=(",", ":"))


def loads(text: object, stage: str) -> dict:
    """A stage payload, checked for size, JSON, version and stage name."""
    if not isinstance(text, str):
        raise SecAggError(f"the {stage} payload must be a JSON string")
    if len(text) > MAX_PAYLOAD_BYTES:
        raise SecAggError(f"the {stage} payload is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested too deep
        raise SecAggError(f"the {stage} payload is not JSON: {err}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise SecAggError(f"the {stage} payload must be an object of version {VERSION}")
    if data.get("stage") != stage:
        raise SecAggError(f"expected a '{stage}' payload, got stage {data.get('stage')!r}")
    return data


def node_id(value: object, what: str = "node id") -> int:
    if not is_int(value) or not 0 <= value < 2**64:
        raise SecAggError(f"{what} must be an unsigned 64-bit int, got {value!r}")
    return value


def node_map(value: object, what: str) -> dict[int, Any]:
    """A JSON object keyed by decimal node ids."""
    if not isinstance(value, dict):
        raise SecAggError(f"{what} must be an object keyed by node id")
    try:
        return {node_id(int(k), what): v for k, v in value.items()}
    except ValueError:
        raise SecAggError(f"{what} has a key that is not a node id") from None


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def mask_info(session: bytes, u: int, v: int) -> bytes:
    """HKDF info of the pairwise mask of ``u`` and ``v`` (the same from both ends)."""
    return b"fedapp-secagg mask" + session + _u64(min(u, v)) + _u64(max(u, v))


def share_info(session: bytes, u: int, v: int) -> bytes:
    return b"fedapp-secagg seal" + session + _u64(min(u, v)) + _u64(max(u, v))


def advert_bytes(context: bytes, node: int, c_pk: bytes, s_pk: bytes, coin: bytes) -> bytes:
    """What a node signs of its advertisement: its keys and coin commitment for the round."""
    return b"fedapp-secagg advert" + context + _u64(node) + c_pk + s_pk + coin


def coin_commitment(context: bytes, node: int, coin: bytes) -> bytes:
    return hashlib.sha256(b"fedapp-secagg coin" + context + _u64(node) + coin).digest()


def session_of(context: bytes, adverts: Mapping[int, Mapping[str, str]],
               coins: Mapping[int, bytes]) -> bytes:
    """The round's session: its context, every advertised node's keys and coin
    commitment (``U1``), and in a sparse round every node's revealed coin. Every key,
    mask, seal and signature of the round is bound to it, so nodes that were shown
    different members or coins cannot work together."""
    members = [[v, *(adverts[v][k] for k in ("c_pk", "s_pk", "id_pk", "coin"))]
               for v in sorted(adverts)]
    return hashlib.sha256(json.dumps([b64(context), members, {str(v): b64(coins[v])
                                                            for v in sorted(coins)}]
                                     ).encode()).digest()


def effective_degree(num_nodes: int, degree: int) -> int:
    """The neighbors per node of a round of ``num_nodes`` (0: SecAgg+'s default)."""
    return min(num_nodes - 1, degree or default_degree(num_nodes))


@dataclass(frozen=True)
class RoundGraph:
    """Who shares with whom in a round, computed alike by the server and every node
    from the members ``U1``, the degree, the threshold fraction and the session.

    Attributes: ``graph`` (node -> its neighbors), ``points`` (node -> its Shamir
    share point: its 1-based rank in ``U1``), ``threshold`` (shares that rebuild a
    secret: more than ``fraction`` of the smallest share group) and ``quorum``
    (survivors a round needs: more than ``fraction`` of ``U1``, so that two sets of
    survivors always share a node; in a complete graph it is the threshold).
    """

    graph: dict[int, list[int]]
    points: dict[int, int]
    threshold: int
    quorum: int

    @staticmethod
    def draw(members: list[int], degree: int, fraction: float, session: bytes) -> RoundGraph:
        members = sorted(members)
        graph = neighbor_graph(members, effective_degree(len(members), degree), session)
        return RoundGraph(graph, {u: i + 1 for i, u in enumerate(members)},
                          threshold_for(1 + min(len(v) for v in graph.values()), fraction),
                          threshold_for(len(members), fraction))


def is_sparse(num_nodes: int, degree: int) -> bool:
    """Whether a round's graph leaves some pairs out (and so is drawn from the coins)."""
    return effective_degree(num_nodes, degree) < num_nodes - 1


def self_mask_seed(b: bytes, session: bytes) -> bytes:
    return hashlib.sha256(b"fedapp-secagg self" + session + b).digest()


def pair_mask(length: int, dtype: type, session: bytes, u: int, v: int, private: bytes,
              peer_public: bytes) -> np.ndarray:
    """The mask ``u`` adds for neighbor ``v``: ``+PRG`` if ``u < v``, else ``-PRG``.

    ``private`` is the ``s`` private key of either end and ``peer_public`` the other
    end's ``s`` public key (the node uses its own; the server a dropped node's).
    """
    mask = prg(agree(private, peer_public, mask_info(session, u, v)), length, dtype)
    return mask if u < v else np.negative(mask)


# ------------------------------------------------------------------ client side
@dataclass(frozen=True)
class NodePolicy:
    """What a node requires of a round, whatever the server says (the node's own
    settings, :mod:`strategies.node_settings`).

    Parameters
    ----------
    min_group : int
        Smallest share group (the node and its neighbors) it takes part in.
    min_threshold_fraction : float
        The round's threshold fraction must be at least this: at 0.5 or more, two
        sets of ``t`` nodes of a group always share one, which the consistency check
        needs.
    """

    min_group: int = 2
    min_threshold_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not is_int(self.min_group) or self.min_group < 2:
            raise SecAggError(f"the smallest share group must be an int >= 2 (a sum of one "
                              f"is that node's input), got {self.min_group!r}")
        if not 0.5 <= self.min_threshold_fraction < 1:
            raise SecAggError("the smallest threshold fraction must be in [0.5, 1), got "
                              f"{self.min_threshold_fraction!r}")


def client_step(request: str, state: dict, node: int, identity: NodeIdentity | None,
                policy: NodePolicy = NodePolicy()) -> tuple[str, dict]:
    """Answer an advertise, coin, share, check or unmask request; return the reply
    payload and the new state.

    ``state`` is the node's private round state (empty before the first round);
    it holds private keys and must stay on the node.

    Raises
    ------
    SecAggError
        If the request is malformed, out of order, or asks for something an honest
        node must refuse (both shares of one node, a second unmasking, key material
        that fails its authentication).
    """
    try:
        data = json.loads(request) if isinstance(request, str) else None
    except (ValueError, RecursionError):
        data = None
    stage = data.get("stage") if isinstance(data, dict) else None
    if stage == "advertise":
        return _advertise(loads(request, stage), state, node, identity)
    if stage == "coin":
        return _coin(loads(request, stage), state, node, identity)
    if stage == "share":
        return _share(loads(request, stage), state, node, identity, policy)
    if stage == "check":
        return _check(loads(request, stage), state, node, identity)
    if stage == "unmask":
        return _unmask(loads(request, stage), state, node, identity, policy)
    raise SecAggError(f"unknown secure-aggregation stage {stage!r}")


def _advertise(req: dict, state: dict, node: int, identity: NodeIdentity | None
               ) -> tuple[str, dict]:
    if node_id(req.get("node")) != node:
        raise SecAggError(f"the advertise request is addressed to node {req.get('node')}, "
                          f"this is node {node}")
    advert, state = _new_keys(state, req.get("context"), node, identity)
    return dumps({"stage": "advertise", "node": node, **advert}), {**state,
                                                                    "stage": "advertised"}


def _new_keys(state: dict, context: object, node: int, identity: NodeIdentity | None
              ) -> tuple[dict[str, str], dict]:
    """Fresh keys and coin for the round of ``context`` (kept as the state's
    ``pending`` keys, replacing any earlier ones); their signed advertisement."""
    used = _fresh(state, context)
    context = unb64(context, 32, "context")
    c, s, coin = KeyPair.generate(), KeyPair.generate(), secrets.token_bytes(32)
    fields = {"c_pk": b64(c.public), "s_pk": b64(s.public),
              "coin": b64(coin_commitment(context, node, coin)), "id_pk": "", "sig": ""}
    if identity is not None:
        fields["id_pk"] = b64(identity.key.public)
        fields["sig"] = b64(identity.key.sign(advert_bytes(
            context, node, c.public, s.public, unb64(fields["coin"]))))
    pending = {"context": b64(context), "c_sk": b64(c.private), "s_sk": b64(s.private),
               "coin": b64(coin)}
    return fields, {**state, "used": used, "pending": pending}


def _fresh(state: dict, context: object) -> list[str]:
    """The node's used contexts with ``context`` added; :class:`SecAggError` if it was
    used before (a replayed round), unless it is the one the node has pending keys
    for (the server did not get them: new keys replace them). The last
    :data:`USED_CONTEXTS` are kept."""
    text = b64(unb64(context, 32, "context"))
    used = list(state.get("used", []))
    if text in used and text != (state.get("pending") or {}).get("context"):
        raise SecAggError("this node has made keys for this round's context before: a "
                          "replayed round")
    return [*(u for u in used if u != text), text][-USED_CONTEXTS:]


def _pending(req: dict, state: dict, stage: str) -> tuple[bytes, dict]:
    """The context of a coin or share request and the keys this node made for it."""
    context = unb64(req.get("context"), 32, "context")
    pending = state.get("pending")
    if not isinstance(pending, dict) or pending.get("context") != b64(context):
        raise SecAggError(f"the {stage} request names a round this node has no keys for "
                          "(used already, replaced, or never made)")
    return context, pending


def _members(adverts: object, context: bytes, node: int, pending: dict,
             identity: NodeIdentity | None) -> dict[str, dict[str, str]]:
    """Every advertised node of the round (``U1``), checked: this node's own keys as
    it made them, each other node's signed by a distinct key of the roster."""
    adverts = node_map(adverts, "adverts")
    members: dict[str, dict[str, str]] = {}
    for v, ad in adverts.items():
        if not isinstance(ad, dict):
            raise SecAggError(f"the advertisement of node {v} is not an object")
        c_pk, s_pk = unb64(ad.get("c_pk"), 32, "c_pk"), unb64(ad.get("s_pk"), 32, "s_pk")
        coin = unb64(ad.get("coin"), 32, "coin commitment")
        id_pk = b""
        if identity is not None:
            id_pk = unb64(ad.get("id_pk"), KEY_BYTES, f"identity key of node {v}")
            if id_pk not in identity.roster or (id_pk == identity.key.public) != (v == node):
                raise SecAggError(f"node {v} advertised keys under an identity key that is not "
                                  "its own in this federation's roster")
            if not verify(id_pk, advert_bytes(context, v, c_pk, s_pk, coin),
                          unb64(ad.get("sig"), None, f"signature of node {v}")):
                raise SecAggError(f"the keys of node {v} fail authentication: substituted, "
                                  "or replayed from another round")
        members[str(v)] = {"c_pk": b64(c_pk), "s_pk": b64(s_pk), "id_pk": b64(id_pk),
                           "coin": b64(coin)}
    own = members.get(str(node))
    if own is None or own["c_pk"] != b64(public_of(unb64(pending["c_sk"]))) \
            or own["s_pk"] != b64(public_of(unb64(pending["s_sk"]))) \
            or own["coin"] != b64(coin_commitment(context, node, unb64(pending["coin"]))):
        raise SecAggError("the round's members do not list this node's keys as it made them")
    if len({m[k] for m in members.values() for k in ("c_pk", "s_pk")}) != 2 * len(members):
        raise SecAggError("two nodes advertised the same public key (replayed keys)")
    if identity is not None and len({m["id_pk"] for m in members.values()}) != len(members):
        raise SecAggError("two nodes advertised under one identity key: a node may take part "
                          "once per round")
    return members


def _coin(req: dict, state: dict, node: int, identity: NodeIdentity | None
          ) -> tuple[str, dict]:
    """A sparse round's coin toss: check the round's members, then reveal the coin
    committed to in this node's advertisement, once."""
    context, pending = _pending(req, state, "coin")
    if "members" in pending:
        raise SecAggError("a second coin request for this round: a node reveals its coin "
                          "once, to one list of members")
    members = _members(req.get("adverts"), context, node, pending, identity)
    return (dumps({"stage": "coin", "node": node, "coin": pending["coin"]}),
            {**state, "pending": {**pending, "members": members}})


def _setup(setup: object, policy: NodePolicy) -> tuple[SecAggParams, int, float]:
    """The round's encoding, degree and threshold fraction as the server sent them,
    checked against this node's policy."""
    if not isinstance(setup, dict):
        raise SecAggError("the round's settings must be an object")
    params = SecAggParams.from_dict(setup.get("params", {}))
    degree, fraction = setup.get("degree"), setup.get("fraction")
    if not is_int(degree) or not 0 <= degree < 2**32:
        raise SecAggError(f"the round's degree must be an int >= 0, got {degree!r}")
    if not isinstance(fraction, float) or not fraction < 1:
        raise SecAggError(f"the round's threshold fraction must be a float below 1, got "
                          f"{fraction!r}")
    if fraction < policy.min_threshold_fraction:
        raise SecAggError(f"threshold fraction {fraction:g}: this node needs at least "
                          f"{policy.min_threshold_fraction:g} (node setting "
                          "secagg-min-threshold-fraction)")
    return params, degree, fraction


def _share(req: dict, state: dict, node: int, identity: NodeIdentity | None, policy: NodePolicy
           ) -> tuple[str, dict]:
    context, pending = _pending(req, state, "share")
    params, degree, fraction = _setup(req.get("setup"), policy)
    members = pending.get("members")
    if members is None:
        members = _members(req.get("adverts"), context, node, pending, identity)
    ids = sorted(map(int, members))
    coins: dict[int, bytes] = {}
    if is_sparse(len(ids), degree):
        if "members" not in pending:
            raise SecAggError("a sparse round's graph is drawn from every member's coin: this "
                              "node was not asked for its coin")
        revealed = node_map(req.get("coins"), "coins")
        if set(revealed) != set(ids):
            raise SecAggError("the share request must reveal the coin of every member")
        for v in ids:
            coins[v] = unb64(revealed[v], 32, f"coin of node {v}")
            if coin_commitment(context, v, coins[v]) != unb64(members[str(v)]["coin"]):
                raise SecAggError(f"the coin of node {v} does not match its commitment")
    session = session_of(context, {int(v): m for v, m in members.items()}, coins)
    drawn = RoundGraph.draw(ids, degree, fraction, session)
    neighbors, threshold = drawn.graph[node], drawn.threshold
    if 1 + len(neighbors) < policy.min_group:
        raise SecAggError(f"a share group of {1 + len(neighbors)} nodes, this node takes part "
                          f"in groups of at least {policy.min_group} (node setting "
                          "secagg-min-group)")
    group = [node, *neighbors]
    b = secrets.token_bytes(SEED_BYTES)
    s_sk, c_sk = unb64(pending["s_sk"]), unb64(pending["c_sk"])
    xs = [drawn.points[v] for v in group]
    b_shares = share_secret(b, xs, threshold)
    s_shares = share_secret(s_sk, xs, threshold)
    sealed = {}
    for v in neighbors:
        key = agree(c_sk, unb64(members[str(v)]["c_pk"]), share_info(session, node, v))
        x = drawn.points[v]
        sealed[str(v)] = b64(seal(key, b_shares[x] + s_shares[x],
                                  _u64(node) + _u64(v) + session))
    x = drawn.points[node]
    state = {"stage": "shared", "used": state.get("used", []), "context": b64(context),
             "session": b64(session), "node": node, "params": params.to_dict(),
             "threshold": threshold, "quorum": drawn.quorum, "neighbors": neighbors,
             "members": {v: [m["c_pk"], m["s_pk"], m["id_pk"]] for v, m in members.items()},
             "c_sk": pending["c_sk"], "s_sk": pending["s_sk"], "b": b64(b),
             "own": b64(b_shares[x] + s_shares[x])}
    return dumps({"stage": "share", "node": node, "commit": b64(commitment(b)),
                  "shares": sealed}), state


def _expect(state: dict, stage: str, now: str, req: dict) -> tuple[bytes, bytes]:
    """The context and session of the round this node is at ``stage`` of; refuses a
    request of another round or out of order."""
    if state.get("stage") != stage:
        raise SecAggError(f"a '{now}' request arrived when this node was at stage "
                          f"{state.get('stage')!r}, not {stage!r}: out of order")
    context = unb64(state["context"], 32, "context")
    if unb64(req.get("context"), 32, "context") != context:
        raise SecAggError(f"the {now} request belongs to another round")
    return context, unb64(state["session"], 32, "session")


def noise_quorum(quorum: int, members: int, fraction: float) -> int:
    """Distributed DP: the survivors a noised round needs, the round's ``quorum`` or
    ``ceil(fraction members)`` if more; each node's noise is shared among that many."""
    return max(quorum, math.ceil(fraction * members))


def client_mask(request: str, state: dict, node: int, flat: np.ndarray, weight: int,
                rng: np.random.Generator | None = None, model_digest: str = "",
                sums: Mapping[str, float] | None = None, noise_levels: float = 0.0,
                noise_fraction: float = 0.0) -> tuple[np.ndarray, dict, dict]:
    """Stage 3: the masked, weighted, quantized model followed by the masked sums;
    returns the vector, its header (for the server's checks) and the new state.

    ``model_digest`` names the global model and round settings this node trained from
    (:func:`strategies.secagg_node.model_digest`); the consistency check makes every
    survivor sign it, so nodes sent different models reveal nothing. ``sums`` are
    the values (metrics) the server may learn only summed over the round, already
    within :func:`strategies.secure_sums.clamp`; the weight is always one of them
    (:data:`strategies.secure_sums.WEIGHT`), so the server learns no node's weight.

    ``noise_levels`` (distributed DP): the std, in levels, of the noise the unmasked
    sum must carry. The node adds discrete Gaussian noise of std ``noise_levels /
    sqrt(k)`` to its levels, ``k`` the :func:`noise_quorum` for ``noise_fraction`` of
    the round's members, and from then on refuses to unmask a sum of fewer than ``k``
    survivors: every sum the server can unmask carries at least ``noise_levels``
    (Kairouz, Liu and Steinke, ICML 2021: a sum of discrete Gaussians is nearly one).

    Raises
    ------
    SecAggError
        Out of order, malformed, too few neighbors left, or a weight the encoding
        cannot hold.
    """
    req = loads(request, "mask")
    context, session = _expect(state, "shared", "mask", req)
    received = node_map(req.get("shares"), "shares")
    if not received.keys() <= set(state["neighbors"]):
        raise SecAggError(f"shares from nodes {sorted(received.keys() - set(state['neighbors']))} "
                          "that are not this node's neighbors")
    if len(received) + 1 < state["threshold"]:
        raise SecAggError(f"only {len(received)} neighbors left, "
                           f"{state['threshold'] - 1} needed")
    params = SecAggParams.from_dict(state["params"])
    sums = dict(sums or {})
    try:
        if WEIGHT in sums:
            raise ValueError(f"{WEIGHT!r} is always summed")
        check_names(sorted([*sums, WEIGHT]))
    except (ValueError, TypeError):  # TypeError: names that do not sort
        raise SecAggError(f"at most {MAX_SUMS - 1} sums, named by strings of 1 to "
                          f"{MAX_SUM_NAME} characters other than {WEIGHT!r}") from None
    encoded = encode_weighted(flat, weight, params, rng or np.random.default_rng())
    needed = state["quorum"]
    if noise_levels:  # wraps in the modulus as a negative value must
        needed = noise_quorum(needed, len(state["members"]), noise_fraction)
        encoded += discrete_gaussian(noise_levels / math.sqrt(needed),
                                     encoded.size).astype(params.dtype)
    names, limbs = encode_sums({**{k: to_fixed(v) for k, v in sums.items()}, WEIGHT: weight},
                               params.dtype)
    masked = np.concatenate([encoded, limbs])
    masked += prg(self_mask_seed(unb64(state["b"]), session), masked.size, params.dtype)
    s_sk = unb64(state["s_sk"])
    for v in received:  # pair_mask's sign, applied by the add (no negated copy)
        mask = prg(agree(s_sk, unb64(state["members"][str(v)][1]), mask_info(session, node, v)),
                   masked.size, params.dtype)
        if node < v:
            masked += mask
        else:
            masked -= mask
    for v, sealed in received.items():
        unb64(sealed, SEALED_BYTES, f"sealed shares from node {v}")
    state = {**state, "stage": "masked", "received": {str(v): ct for v, ct in received.items()},
             "model": str(model_digest), "quorum": needed}
    header = {"version": VERSION, "context": b64(context), "node": node,
              "mod-bits": params.mod_bits, "length": int(flat.size), "sums": names}
    return masked, header, state


def view_digest(session: bytes, survivors: list[int], dropped: list[int], model: str) -> bytes:
    """What a consistency signature covers: the round's session, who survived and
    who dropped (all of them, sorted), and the model and settings the signer trained
    from."""
    return hashlib.sha256(json.dumps([b64(session), survivors, dropped, model]).encode()
                          ).digest()


def check_bytes(view: bytes, node: int) -> bytes:
    return b"fedapp-secagg check" + view + _u64(node)


def signers(view: bytes, sigs: Mapping[int, object], keys: Mapping[int, bytes]) -> set[int]:
    """The nodes of ``keys`` (node -> identity key) whose signature in ``sigs`` on
    ``view`` is valid."""
    return {v for v, sig in sigs.items() if v in keys
            and verify(keys[v], check_bytes(view, v), unb64(sig, None, "signature"))}


def _view(req: dict, state: dict, node: int, stage: str, now: str
          ) -> tuple[bytes, list[int], list[int], bytes]:
    """The session, survivors, dropped nodes and view digest of a check or unmask
    request (the node at ``stage``), checked against what this node knows: its
    round, itself a survivor, no node both, only members of the round, and every
    node it masked with listed (a node the server hides could be unmasked)."""
    _, session = _expect(state, stage, now, req)
    survivors, dropped = (req.get(k) for k in ("survivors", "dropped"))
    if not isinstance(survivors, list) or not isinstance(dropped, list):
        raise SecAggError("the request needs lists of survivors and dropped nodes")
    survivors = sorted({node_id(v) for v in survivors})
    dropped = sorted({node_id(v) for v in dropped})
    if set(survivors) & set(dropped):
        raise SecAggError(f"nodes {sorted(set(survivors) & set(dropped))} are listed both as "
                          "survivors and as dropped: refusing to reveal both shares of a node")
    if node not in survivors:
        raise SecAggError("this node is not listed among the survivors")
    strangers = set(survivors + dropped) - set(map(int, state["members"]))
    if strangers:
        raise SecAggError(f"nodes {sorted(strangers)[:10]} are not members of this round")
    missing, unmasked = listed_partners(state, survivors, dropped)
    if missing:
        raise SecAggError(f"nodes {sorted(missing)} this node masked with are neither survivors "
                          "nor dropped")
    if unmasked:
        raise SecAggError(f"neighbors {sorted(unmasked)[:10]} are listed as taking part, but "
                          "this node got no shares from them and did not mask with them (its "
                          "input would not be hidden by their masks)")
    return session, survivors, dropped, view_digest(session, survivors, dropped,
                                                    state.get("model", ""))


def listed_partners(state: dict, survivors: list[int], dropped: list[int]
                    ) -> tuple[set[int], set[int]]:
    """What a view gets wrong about this node's mask partners: the partners it does
    not list, and the neighbors it lists that are not partners. Both must be empty:
    the neighbors a view lists are exactly those this node masked with (in an honest
    round, those that finished the share stage). Otherwise a server that relays a
    node only some neighbors' shares, then declares just those dropped, unmasks it
    with their keys while its other neighbors' masks, which it never added, cancel
    nothing (Bonawitz et al. check ``U3`` within ``U2`` for this)."""
    partners = {int(k) for k in state["received"]}
    listed = set(survivors) | set(dropped)
    return partners - listed, (listed & set(state["neighbors"])) - partners


def _check(req: dict, state: dict, node: int, identity: NodeIdentity | None) -> tuple[str, dict]:
    """The consistency check: sign the round's view, once per round; and, if asked,
    make keys for the server's next round (pre-advertising)."""
    _, _, _, view = _view(req, state, node, "masked", "check")
    sig = identity.key.sign(check_bytes(view, node)) if identity else b""
    state = {**state, "stage": "checked", "view": b64(view)}
    reply = {"stage": "check", "node": node, "sig": b64(sig)}
    if req.get("next") is not None:
        reply["next_advert"], state = _new_keys(state, req["next"], node, identity)
    return dumps(reply), state


def _unmask(req: dict, state: dict, node: int, identity: NodeIdentity | None,
            policy: NodePolicy) -> tuple[str, dict]:
    """Reveal the shares the view calls for, once per round; and answer the next
    round's share request if the server sent it along (sharing early). Refusing it
    costs only those shares: the reply says why, and this round's shares still go out."""
    session, survivors, dropped, view = _view(req, state, node, "checked", "unmask")
    if b64(view) != state["view"]:
        raise SecAggError("the unmask request names other survivors or dropped nodes than this "
                          "node signed: refusing to unmask")
    if len(survivors) < state["quorum"]:
        raise SecAggError(f"only {len(survivors)} of the round's {len(state['members'])} "
                          f"members survived, {state['quorum']} needed: refusing to unmask")
    received = {int(k): v for k, v in state["received"].items()}
    group = received.keys() | {node}
    threshold = state["threshold"]
    if len(set(survivors) & group) < threshold:
        raise SecAggError(f"only {len(set(survivors) & group)} survivors in this node's share "
                          f"group, {threshold} needed: refusing to unmask")
    if identity:  # without it, the run was allowed to trust the server (secagg_node)
        ids = {v: unb64(state["members"][str(v)][2]) for v in survivors}
        signed = signers(view, node_map(req.get("sigs"), "sigs"), ids)
        if signed != set(survivors):
            raise SecAggError(f"{len(survivors) - len(signed)} of the {len(survivors)} "
                              "survivors did not sign the same survivors, dropped nodes and "
                              "model: refusing to unmask (the server may be telling nodes "
                              "different stories, or sending them different models)")
    c_sk = unb64(state["c_sk"])
    b_out, s_out = {}, {}
    for v in (set(survivors) | set(dropped)) & received.keys():
        key = agree(c_sk, unb64(state["members"][str(v)][0]), share_info(session, node, v))
        opened = unseal(key, unb64(received[v]), _u64(v) + _u64(node) + session)
        if len(opened) != 2 * SHARE_BYTES:
            raise SecAggError(f"the shares from node {v} have the wrong length")
        if v in survivors:
            b_out[str(v)] = b64(opened[:SHARE_BYTES])
        else:
            s_out[str(v)] = b64(opened[SHARE_BYTES:])
    b_out[str(node)] = b64(unb64(state["own"])[:SHARE_BYTES])
    reply = {"stage": "unmask", "node": node, "b_shares": b_out, "s_shares": s_out}
    state = {**state, "stage": "done"}
    if req.get("next_share") is not None:
        try:
            reply["next_share"], state = _share(loads(req["next_share"], "share"), state, node,
                                                identity, policy)
        except SecAggError as err:
            reply["next_refused"] = str(err)
    return dumps(reply), state


# ------------------------------------------------------------------ server side
@dataclass(frozen=True)
class Prepared:
    """What a round's survivors prepared for the server's next round: its context, the
    keys they pre-advertised for it (check replies), and their share replies for it,
    made early (unmask replies; none if that round's graph is sparse)."""

    context: bytes
    setup: dict
    adverts: Mapping[int, dict]
    shares: Mapping[int, str]


@dataclass
class ServerRound:
    """The server's side of one round: builds requests, checks replies, unmasks.

    Every ``receive_*`` method takes ``{node: payload}`` for the nodes that
    answered, logs and leaves out the replies that fail a check (naming the node),
    and raises :class:`RoundAborted` when too few nodes are left to go on.

    Parameters
    ----------
    params : SecAggParams
        The encoding every client uses this round.
    nodes : list[int]
        The sampled nodes ``U0``.
    length : int
        Values in a model.
    degree : int
        Neighbors per node, rounded down to even (a ring with ``degree // 2`` on
        each side); 0: SecAgg+'s ``2 ceil(log2 n) + 2``; at most all other nodes.
    threshold_fraction : float
        A secret needs more than this fraction of its share group.
    seen_keys : set[bytes]
        Public keys of earlier rounds (replays are refused); updated in place.
    prepared : Prepared | None
        What the last round's survivors prepared for this one (:meth:`prepared_next`).
        With their shares, used only if exactly they were sampled (then the advertise
        and share stages are skipped, :attr:`preshared`); with keys only, the keys of
        those sampled. Never in a sparse round (its members must all be present for
        its coin stage). None, or unusable: a fresh context, every node advertises.
    preadvertise : bool
        Ask the survivors for keys for the next round in the check requests, and for
        their shares for it in the unmask requests.
    """

    params: SecAggParams
    nodes: list[int]
    length: int
    degree: int = 0
    threshold_fraction: float = 0.5
    seen_keys: set[bytes] = field(default_factory=set)
    prepared: Prepared | None = None
    preadvertise: bool = True

    def __post_init__(self) -> None:
        self.nodes = sorted(set(self.nodes))
        if len(self.nodes) < 2:
            raise RoundAborted(f"secure aggregation needs at least 2 nodes, {len(self.nodes)} "
                               "sampled: a sum of one is that node's update")
        prepared = self.prepared if self._usable(self.prepared) else None
        self.context = prepared.context if prepared else secrets.token_bytes(32)
        if len(self.context) != 32:
            raise ValueError("a round's context has 32 bytes")
        # keys checked (and added to seen_keys) when they arrived; only the sampled
        self.adverts: dict[int, dict] = {u: dict(prepared.adverts[u]) for u in self.nodes
                                         if prepared and u in prepared.adverts}
        self.preadvertised_nodes = set(self.adverts)
        self.preshared: dict[int, str] = dict(prepared.shares) if prepared else {}
        self.next_context = secrets.token_bytes(32)
        self.next_adverts: dict[int, dict] = {}
        self.next_shares: dict[int, str] = {}
        self.coins: dict[int, bytes] = {}
        self.drawn: RoundGraph | None = None  # once the members (and coins) are known
        self.commits: dict[int, bytes] = {}
        self.sealed: dict[int, dict[int, str]] = {}  # receiver -> sender -> sealed shares
        self.masked: set[int] = set()
        self.sigs: dict[int, str] = {}  # node -> its consistency signature (base64)
        self.sum_names: list[str] | None = None  # set by the first masked update
        self.total: np.ndarray | None = None
        self.sums: dict[str, float] = {}  # the round's sums, once unmasked
        self.level_sum: np.ndarray | None = None  # the unmasked sum of the levels
        # distributed DP: the std (in levels) of the noise the nodes add to the sum, and
        # the fraction of the members it is shared among (noise_quorum)
        self.noise_levels = 0.0
        self.noise_fraction = 0.0
        self.stats = {"sampled": len(self.nodes)}

    def _usable(self, prepared: Prepared | None) -> bool:
        """Whether this round can go on from ``prepared``: a complete graph, the same
        settings, and with shares made early, exactly their makers sampled (the others'
        keys are spent: their nodes made shares for members that are not all here)."""
        if prepared is None or is_sparse(len(self.nodes), self.degree) \
                or prepared.setup != self._setup():
            return False
        return not prepared.shares or set(prepared.shares) == set(prepared.adverts) \
            == set(self.nodes)

    def prepared_next(self) -> Prepared | None:
        """What the survivors prepared for the next round (None: nothing)."""
        if not self.next_adverts:
            return None
        return Prepared(self.next_context, self._setup(), dict(self.next_adverts),
                        dict(self.next_shares))

    @property
    def graph(self) -> dict[int, list[int]]:
        return self._drawn().graph

    @property
    def points(self) -> dict[int, int]:
        return self._drawn().points

    @property
    def threshold(self) -> int:
        return self._drawn().threshold

    @property
    def quorum(self) -> int:
        """The survivors the round needs (with distributed DP, :func:`noise_quorum`)."""
        drawn = self._drawn()
        if not self.noise_levels:
            return drawn.quorum
        return noise_quorum(drawn.quorum, len(drawn.points), self.noise_fraction)

    @property
    def members(self) -> list[int]:
        """``U1``: the nodes whose keys the round uses."""
        return sorted(self.adverts)

    @property
    def sparse(self) -> bool:
        return is_sparse(len(self.adverts), self.degree)

    def _drawn(self) -> RoundGraph:
        if self.drawn is None:
            raise RuntimeError("the round's graph is drawn once its members (and, in a sparse "
                               "round, their coins) are known")
        return self.drawn

    def _draw(self) -> None:
        self.session = session_of(self.context, self.adverts, self.coins)
        self.drawn = RoundGraph.draw(self.members, self.degree, self.threshold_fraction,
                                     self.session)

    # stage 1
    def advertise_requests(self) -> dict[int, str]:
        """The advertise requests, for the nodes without pre-advertised keys (none
        at all when every sampled node pre-advertised: skip the stage)."""
        return {u: dumps({"stage": "advertise", "context": b64(self.context), "node": u})
                for u in self.nodes if u not in self.preadvertised_nodes}

    def receive_adverts(self, replies: Mapping[int, object]) -> None:
        """Keep the checked keys; they fix the round's members. In a complete graph the
        graph is drawn now; a sparse one waits for the coin stage."""
        for u, text in replies.items():
            self._try(u, "advertise", lambda: self._advert(u, text))
        self._enough(self.adverts, "advertise", 2)
        if not self.sparse:
            self._draw()

    def _advert(self, u: int, text: object) -> None:
        rep = self._reply(u, text, "advertise", self.adverts)
        self.adverts[u] = self._checked_keys(rep)

    def _checked_keys(self, rep: dict) -> dict:
        """A node's advertised keys, checked and remembered (replays are refused)."""
        c_pk, s_pk = unb64(rep.get("c_pk"), 32, "c_pk"), unb64(rep.get("s_pk"), 32, "s_pk")
        check_public_key(c_pk)
        check_public_key(s_pk)
        coin = unb64(rep.get("coin"), 32, "coin commitment")
        id_pk, sig = unb64(rep.get("id_pk"), None, "id_pk"), unb64(rep.get("sig"), None, "sig")
        if (len(id_pk), len(sig)) not in ((0, 0), (KEY_BYTES, SIGNATURE_BYTES)):
            raise InvalidUpdate("an identity key and signature must be both empty or "
                                f"{KEY_BYTES} and {SIGNATURE_BYTES} bytes")
        if c_pk == s_pk or {c_pk, s_pk} & self.seen_keys:
            raise InvalidUpdate("replayed public keys (seen before)")
        self.seen_keys.update((c_pk, s_pk))
        return {"c_pk": b64(c_pk), "s_pk": b64(s_pk), "coin": b64(coin), "id_pk": b64(id_pk),
                "sig": b64(sig)}

    # stage 1b: a sparse round's coin toss
    def coin_requests(self) -> dict[int, str]:
        """In a sparse round, every member gets the list of members (their signed keys
        and coin commitments) and reveals its coin; none in a complete round."""
        if not self.sparse:
            return {}
        adverts = {str(v): self.adverts[v] for v in self.members}
        return {u: dumps({"stage": "coin", "context": b64(self.context), "node": u,
                          "adverts": adverts}) for u in self.members}

    def receive_coins(self, replies: Mapping[int, object]) -> None:
        """Keep the coins that match their commitments, then draw the graph.

        Raises
        ------
        RoundAborted
            If a member's coin is missing: the graph is drawn from all of them (leaving
            one out would let whoever chooses whom to leave out choose the graph).
        """
        for u, text in replies.items():
            self._try(u, "coin", lambda: self._coin(u, text))
        missing = set(self.adverts) - set(self.coins)
        self.stats["coin"] = len(self.coins)
        if missing:
            raise RoundAborted(f"{len(missing)} of the round's {len(self.adverts)} members did "
                               f"not reveal their coin (nodes {sorted(missing)[:10]}): a sparse "
                               "round's graph is drawn from every member's coin")
        self._draw()

    def _coin(self, u: int, text: object) -> None:
        if u not in self.adverts:
            raise InvalidUpdate("a coin from a node that is not a member of the round")
        rep = self._reply(u, text, "coin", self.coins)
        coin = unb64(rep.get("coin"), 32, "coin")
        if coin_commitment(self.context, u, coin) != unb64(self.adverts[u]["coin"]):
            raise InvalidUpdate("the coin does not match the node's commitment")
        self.coins[u] = coin

    # stage 2
    def _setup(self) -> dict:
        return {"params": self.params.to_dict(), "degree": self.degree,
                "fraction": float(self.threshold_fraction)}

    def share_requests(self) -> dict[int, str]:
        """The round's settings, and the members' keys (complete graph) or coins
        (sparse: the members came in the coin stage). Empty if the members sent their
        shares with the last round's unmask replies (:attr:`preshared`)."""
        if self.preshared:
            return {}
        if self.sparse:
            members = {"coins": {str(v): b64(c) for v, c in sorted(self.coins.items())}}
        else:
            members = {"adverts": {str(v): self.adverts[v] for v in self.members}}
        self._drawn()
        return {u: self._share_request(self.context, u, members) for u in self.members}

    def _share_request(self, context: bytes, u: int, members: dict) -> str:
        return dumps({"stage": "share", "context": b64(context), "node": u,
                      "setup": self._setup(), **members})

    def receive_shares(self, replies: Mapping[int, object]) -> None:
        drawn = self._drawn()
        done: dict[int, dict] = {}
        for u, text in replies.items():
            self._try(u, "share", lambda: self._shares(u, text, done))
        for u, shares in done.items():
            for v, sealed in shares.items():
                self.sealed.setdefault(v, {})[u] = sealed
        self._enough(self.commits, "share", drawn.quorum)

    def _shares(self, u: int, text: object, done: dict) -> None:
        if u not in self.adverts:
            raise InvalidUpdate("no advertised keys from this node")
        if u in self.commits:
            raise InvalidUpdate("a second share reply")
        rep = self._reply(u, text, "share", done)
        shares = node_map(rep.get("shares"), "shares")
        if shares.keys() != set(self.graph[u]):
            raise InvalidUpdate(f"shares for nodes {sorted(shares)}, expected "
                                f"{sorted(self.graph[u])}")
        for sealed in shares.values():
            unb64(sealed, SEALED_BYTES, "sealed shares")
        commit = unb64(rep.get("commit"), 32, "commit")
        done[u] = {v: s for v, s in shares.items()}
        self.commits[u] = commit

    # stage 3
    def mask_payloads(self) -> dict[int, str]:
        """The payload of each train message (only for the nodes in ``U2``)."""
        return {u: dumps({"stage": "mask", "context": b64(self.context),
                          "shares": {str(v): s for v, s in self.sealed.get(u, {}).items()
                                     if v in self.commits}})
                for u in self.commits}

    def receive_masked(self, u: int, vector: object, header: object) -> None:
        """Add one node's masked vector (model, then sums); :class:`InvalidUpdate` if it
        fails a check. The first one accepted fixes the names of the round's sums."""
        if u not in self.commits:
            raise InvalidUpdate("this node took no part in the share stage of this round")
        if u in self.masked:
            raise InvalidUpdate("a second masked update from this node")
        if not isinstance(header, dict) or header.get("context") != b64(self.context):
            raise InvalidUpdate("the masked update belongs to another round")
        if header.get("node") != u:
            raise InvalidUpdate(f"the masked update is from node {header.get('node')!r}, sent "
                                f"by node {u}: a node may only answer for itself")
        if header.get("mod-bits") != self.params.mod_bits:
            raise InvalidUpdate(f"masked in a {header.get('mod-bits')}-bit modulus, expected "
                                f"{self.params.mod_bits}")
        try:
            names = check_names(header.get("sums"))
        except ValueError as err:
            raise InvalidUpdate(f"the masked update's {err}") from None
        if WEIGHT not in names:
            raise InvalidUpdate(f"the masked update's sums must include {WEIGHT!r}")
        if self.sum_names is not None and names != self.sum_names:
            raise InvalidUpdate(f"sums {names[:10]} differ from the round's {self.sum_names[:10]}")
        width = self.length + sum_slots(names)
        if not isinstance(vector, np.ndarray) or vector.dtype != self.params.dtype \
                or vector.shape != (width,):
            raise InvalidUpdate(f"a masked vector must be {np.dtype(self.params.dtype).name} of "
                                f"shape ({width},), got "
                                f"{getattr(vector, 'dtype', type(vector).__name__)} of shape "
                                f"{getattr(vector, 'shape', None)}")
        if self.total is None:
            self.sum_names, self.total = names, np.zeros(width, dtype=self.params.dtype)
        self.total += vector
        self.masked.add(u)

    # stage 4: the consistency check
    def _view(self) -> tuple[list[int], list[int]]:
        survivors = sorted(self.masked)
        return survivors, sorted(set(self.commits) - set(self.masked))

    def check_requests(self) -> dict[int, str]:
        """Ask every survivor to sign who survived and who dropped (Bonawitz et al.'s
        ConsistencyCheck round)."""
        survivors, dropped = self._view()
        needed = max(2, self.quorum)
        if len(survivors) < needed:
            raise RoundAborted(f"only {len(survivors)} masked updates arrived, {needed} needed")
        self.stats.update(survivors=len(survivors), dropped=len(dropped))
        request = {"stage": "check", "context": b64(self.context), "survivors": survivors,
                   "dropped": dropped,
                   **({"next": b64(self.next_context)} if self.preadvertise else {})}
        return {u: dumps(request) for u in survivors}

    def receive_checks(self, replies: Mapping[int, object]) -> None:
        """Keep the survivors' signatures; :class:`RoundAborted` unless every survivor
        signed (a node reveals a survivor's self-mask seed only against its signature,
        so an unsigned survivor's input could never be unmasked)."""
        answered: dict[int, dict] = {}
        for u, text in replies.items():
            self._try(u, "check", lambda: self._check_reply(u, text, answered))
            if u in answered and self.preadvertise and "next_advert" in answered[u]:
                self._try(u, "pre-advertise", lambda: self._next_advert(u, answered[u]))
        self.stats["check"] = len(self.sigs)
        unsigned = set(self.masked) - set(self.sigs)
        if unsigned:
            raise RoundAborted(f"{len(unsigned)} of {len(self.masked)} nodes that sent a masked "
                               "update did not sign the round's view in the consistency "
                               f"check (nodes {sorted(unsigned)[:10]}): their updates cannot be "
                               "unmasked")

    def _check_reply(self, u: int, text: object, answered: dict) -> None:
        if u not in self.masked:
            raise InvalidUpdate("a signature from a node that is not a survivor")
        rep = self._reply(u, text, "check", self.sigs)
        self.sigs[u] = b64(unb64(rep.get("sig"), None, "signature"))
        answered[u] = rep

    # stage 5
    def unmask_requests(self) -> dict[int, str]:
        """For the survivors that signed: the same view, and every survivor's signature
        (each node checks them all before revealing anything)."""
        survivors, dropped = self._view()
        request = {"stage": "unmask", "context": b64(self.context), "survivors": survivors,
                   "dropped": dropped, "sigs": {str(v): self.sigs[v] for v in sorted(self.sigs)}}
        early = self._next_share_requests()
        return {u: dumps({**request, **({"next_share": early[u]} if u in early else {})})
                for u in self.sigs}

    def _shares_early(self) -> bool:
        """Whether the nodes that pre-advertised are asked for their next round's shares
        now: unless too few, or the next round's graph would be sparse."""
        return len(self.next_adverts) >= 2 and not is_sparse(len(self.next_adverts),
                                                              self.degree)

    def _next_share_requests(self) -> dict[int, str]:
        """The next round's share requests, made now, for the nodes that pre-advertised
        keys for it; none if its graph would be sparse (its coin stage comes first)."""
        if not self._shares_early():
            return {}
        members = sorted(self.next_adverts)
        adverts = {"adverts": {str(v): self.next_adverts[v] for v in members}}
        return {u: self._share_request(self.next_context, u, adverts) for u in members}

    def receive_unmask(self, replies: Mapping[int, object]) -> tuple[np.ndarray, int]:
        """Rebuild the secrets, remove the masks; the weighted average and total weight
        (the round's other sums in :attr:`sums`).

        Raises
        ------
        RoundAborted
            If a secret cannot be rebuilt from the shares that arrived, or the
            unmasked sum is out of range.
        """
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        answered: dict[int, dict] = {}
        for u, text in replies.items():
            self._try(u, "unmask", lambda: self._unmask_reply(u, text, answered,
                                                              b_shares, s_shares))
            if u in answered:
                self._next_share(u, answered[u])
        survivors, dropped = set(self.masked), set(self.commits) - set(self.masked)
        total = self.total.copy()
        for u in sorted(survivors):
            b = self._rebuild(u, b_shares.get(u, {}), "self-mask seed")
            if commitment(b) != self.commits[u]:
                raise RoundAborted(f"the rebuilt self-mask seed of node {u} does not match its "
                                   "commitment: a node sent a wrong share")
            total -= prg(self_mask_seed(b, self.session), total.size, self.params.dtype)
        for v in sorted(dropped):
            s_sk = self._rebuild(v, s_shares.get(v, {}), "mask key")
            if public_of(s_sk) != unb64(self.adverts[v]["s_pk"]):
                raise RoundAborted(f"the rebuilt mask key of dropped node {v} does not match "
                                   "its public key: a node sent a wrong share")
            for u in self.graph[v]:
                if u in survivors and v in self.sealed.get(u, {}):
                    total -= pair_mask(total.size, self.params.dtype, self.session, u, v,
                                       s_sk, unb64(self.adverts[u]["s_pk"]))
        try:
            sums = decode_sums(self.sum_names, total[self.length:], len(survivors))
        except ValueError as err:
            raise RoundAborted(str(err)) from None
        weight = sums.pop(WEIGHT)
        if not 1 <= weight <= self.params.max_total_weight:
            raise RoundAborted(f"total weight {weight} outside [1, "
                               f"{self.params.max_total_weight}]: a node sent a wrong weight")
        self.sums = {k: from_fixed(v) for k, v in sums.items()}
        self.level_sum = total[:self.length].copy()  # central DP adds its noise to these
        try:
            if self.noise_levels:  # each survivor added noise_levels / sqrt(quorum)
                std = self.noise_levels * math.sqrt(len(survivors) / self.quorum)
                self.level_sum = centred_sum(total[:self.length], weight, self.params, std)
                average = self.params.fixed_point.dequantize(self.level_sum, weight)
            else:
                average = decode_sum(total[:self.length], weight, self.params)
        except SecAggError as err:
            raise RoundAborted(str(err)) from None
        log(INFO, "Secure aggregation: %d of %d sampled nodes in the sum, %d dropped and "
            "recovered, total weight %d", len(survivors), len(self.nodes), len(dropped), weight)
        return average, weight

    def _unmask_reply(self, u: int, text: object, answered: dict, b_shares: dict,
                      s_shares: dict) -> None:
        if u not in self.sigs:
            raise InvalidUpdate("shares from a node that did not sign the round's view")
        rep = self._reply(u, text, "unmask", answered)
        b_part = node_map(rep.get("b_shares"), "b_shares")
        s_part = node_map(rep.get("s_shares"), "s_shares")
        if b_part.keys() & s_part.keys():
            raise InvalidUpdate("both shares of one node")
        # decode all before keeping any: a reply that fails a check leaves nothing behind
        parsed = [(b_shares, v, unb64(share, SHARE_BYTES, "share"))
                  for v, share in b_part.items()]
        parsed += [(s_shares, v, unb64(share, SHARE_BYTES, "share"))
                   for v, share in s_part.items()]
        for shares, v, share in parsed:
            shares.setdefault(v, {})[self.points[u]] = share
        answered[u] = rep

    def _next_advert(self, u: int, rep: dict) -> None:
        """Keep the keys ``u`` pre-advertised for :attr:`next_context` (a bad one
        costs the node only the pre-advertisement: it advertises again)."""
        advert = rep["next_advert"]
        if not isinstance(advert, dict):
            raise InvalidUpdate("the pre-advertised keys are not an object")
        try:
            self.next_adverts[u] = self._checked_keys(advert)
        except (InvalidUpdate, SecAggError) as err:
            raise InvalidUpdate(f"pre-advertised keys refused: {err}") from None

    def _next_share(self, u: int, rep: dict) -> None:
        """Keep the share reply ``u`` made early for the next round (checked there, as
        any share reply), or log why it refused to make one."""
        if u not in self.next_adverts or not self._shares_early():
            return
        if isinstance(rep.get("next_share"), str):
            self.next_shares[u] = rep["next_share"]
        else:
            log(WARNING, "Secure aggregation: node %s made no shares for the next round: %s",
                u, str(rep.get("next_refused", "none sent"))[:300])

    def _rebuild(self, u: int, shares: dict[int, bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise RoundAborted(f"too many dropouts: {len(shares)} shares of the {what} of node "
                               f"{u} arrived, {self.threshold} needed")
        try:
            return reconstruct_secret(shares, self.threshold)
        except SecAggError as err:
            raise RoundAborted(f"the {what} of node {u} cannot be rebuilt ({err}): a node "
                               "sent a wrong share") from None

    # checks
    def _reply(self, u: int, text: object, stage: str, seen: Mapping[int, object]) -> dict:
        if u not in self.nodes:
            raise InvalidUpdate("this node was not sampled for the round")
        if u in seen:
            raise InvalidUpdate(f"a second {stage} reply")
        rep = loads(text, stage)
        if rep.get("node") != u:
            raise InvalidUpdate(f"the reply claims to be from node {rep.get('node')!r}: a node "
                                "may only answer for itself")
        return rep

    def _try(self, u: int, stage: str, step) -> None:
        try:
            step()
        except (InvalidUpdate, SecAggError) as err:
            log(WARNING, "Secure aggregation: left out node %s at the %s stage: %s", u, stage, err)

    def _enough(self, done: Mapping[int, object], stage: str, needed: int) -> None:
        self.stats[stage] = len(done)
        needed = max(2, needed)
        if len(done) < needed:
            raise RoundAborted(f"too many dropouts: {len(done)} of {len(self.nodes)} nodes "
                               f"finished the {stage} stage, {needed} needed")
