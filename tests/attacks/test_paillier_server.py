"""A malicious server against Paillier key holders (issue 14, items 4 and 5).

The server holds only the public key. It builds ciphertexts from what clients sent
and asks a key holder, through the real client mod (``paillier_mod``), to decrypt
them as "the global model"; all it sees back is the reply: an encrypted update, or
an error and its text.

- **Decryption oracle**: the server adds ``delta`` to one slot of a victim's update
  and watches whether the key holder's decoding overflows. A binary search over
  ``delta`` reads the victim's weighted quantized value exactly, one message per
  bit. With the aggregate tags off (the defence switched off in the test), the
  attack works; with them on, every crafted model gets the same refusal, whatever
  the victim's value.
- **Replay and re-labelling**: an update made for one round, or by one node, passed
  off as another round's or another node's contribution, is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from strategies import paillier_tags
from strategies.encoding import EncodingParams, pack, unpack
from strategies.keyfiles import write_secret
from strategies.paillier import Encryptor, aggregate_arrays
from strategies.paillier_message import paillier_mod
from strategies.paillier_node import round_config
from strategies.paillier_protocol import (EncryptedModel, Layout, add_noise, aggregate,
                                          encrypt_update)
from strategies.paillier_tags import TagKey
from tests.helpers import CLIP, RUN

pytestmark = pytest.mark.usefixtures("task_identity")  # Messages made outside a Flower run

VICTIM, HELPER, KEY_HOLDER = 11, 12, 13
WEIGHTS = {VICTIM: 3, HELPER: 5}
SHAPES = {"w": (20,)}


@pytest.fixture(scope="module")
def setup(keypair, tmp_path_factory):
    """Two clients' round-1 updates, and a key holder's node config."""
    pk, sk = keypair
    key_file = tmp_path_factory.mktemp("holder") / "paillier.key.json"
    write_secret(key_file, json.dumps(sk.to_dict()))
    params = EncodingParams.for_key(pk.n_bits, 64, clip=CLIP)
    rng = np.random.default_rng(5)
    plain = {u: rng.uniform(-1, 1, 20).astype(np.float32) for u in WEIGHTS}
    layout = Layout.of(["w"], [plain[VICTIM].reshape(20)])
    encryptor, tag_key = Encryptor(pk, sk), TagKey.from_private_key(sk)
    updates = {(u, r): encrypt_update([plain[u]], layout, WEIGHTS[u], params, encryptor,
                                      tag_key, run=RUN, server_round=r, node=u, rng=rng)
               for u in WEIGHTS for r in (1, 2)}
    return {"pk": pk, "sk": sk, "params": params, "layout": layout, "updates": updates,
            "node_config": {"paillier-private-key": str(key_file)}, "plain": plain}


def ask_key_holder(setup, model: EncryptedModel, node_config: dict | None = None) -> str:
    """Send ``model`` to the key holder as round 2's global model; ``"trained"`` or
    the error text the server gets back."""
    config = round_config(setup["params"], setup["pk"].fingerprint, 1, 2)
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                     model.to_arrays().items()}),
                              "config": ConfigRecord(config)}),
                  dst_node_id=KEY_HOLDER, message_type="train")
    context = Context(run_id=RUN, node_id=KEY_HOLDER, state=RecordDict(), run_config={},
                      node_config={**setup["node_config"], **(node_config or {})})

    def train(m: Message, _: Context) -> Message:
        return Message(RecordDict({"arrays": m.content["arrays"],
                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=m)

    reply = paillier_mod(msg, context, train)
    return reply.error.reason if reply.has_error() else "trained"


def shifted(setup, model: EncryptedModel, slot: int, delta: int, **header) -> EncryptedModel:
    """``model`` with ``delta`` added to value ``slot``, homomorphically, as the server
    can with the public key; the header as ``header`` says."""
    values = np.zeros(setup["layout"].size, np.uint64)
    values[slot] = delta
    shift = Encryptor(setup["pk"]).encrypt_to_array(pack(values, setup["params"]) + [0])
    cts = aggregate_arrays(setup["pk"], [model.ciphertexts, shift])
    return EncryptedModel(cts, model.fingerprint, model.params, model.layout,
                          header.get("run", model.run),
                          header.get("server_round", model.server_round),
                          header.get("contributors", model.contributors))


def read_value(setup, slot: int, node_config: dict | None = None,
               claim_helper: bool = False) -> tuple[int | None, set[str]]:
    """The binary search: the victim's weighted level of ``slot`` as the overflow
    oracle tells it (None if the answers are not an oracle), and the error texts seen."""
    victim = setup["updates"][(VICTIM, 1)]
    base = victim
    if claim_helper:  # claim a sum of two, as the node's minimum asks
        base = aggregate(setup["pk"], [victim, setup["updates"][(HELPER, 1)]])
    limit = setup["params"].fixed_point.max_sum(base.total_weight)
    low, high, texts = 0, limit + 1, set()  # smallest delta that overflows is in (low, high]
    answers = []
    while high - low > 1:
        mid = (low + high) // 2
        answer = ask_key_holder(setup, shifted(setup, base, slot, mid), node_config)
        texts.add(answer)
        answers.append(answer)
        if answer == "trained":
            low = mid
        else:
            high = mid
    if len(set(answers)) == 1:
        return None, texts
    return limit - high + 1, texts


def weighted_level(setup, slot: int) -> int:
    """What the oracle would reveal: the victim's ``w * q`` of ``slot`` (for the check;
    the server does not have it)."""
    plaintexts = setup["sk"].decrypt_array(setup["updates"][(VICTIM, 1)].ciphertexts)[:-1]
    return int(unpack(plaintexts, setup["params"], setup["layout"].size, WEIGHTS[VICTIM])[slot])


def test_with_the_tags_off_the_overflow_oracle_reads_a_victims_value(setup, monkeypatch):
    """The attack as it worked before the tags: a single update passes as the model
    (minimum 1) and no tag is checked: the binary search finds the exact value."""
    monkeypatch.setattr(paillier_tags.TagKey, "verify", lambda *a, **k: True)
    for slot in (0, 7):
        found, _ = read_value(setup, slot, {"paillier-min-contributors": 1})
        assert found == weighted_level(setup, slot)


@pytest.mark.parametrize("claim_helper", [False, True])
def test_with_the_tags_on_every_crafted_model_gets_one_refusal(setup, claim_helper):
    """Alone (refused for too few contributors) or claimed as a sum with another
    node's real update (refused for the tag): one answer for every delta, one text
    that names no value."""
    found, texts = read_value(setup, 7, claim_helper=claim_helper)
    assert found is None
    assert len(texts) == 1
    (text,) = texts
    assert text.startswith("decryption refused") and not any(c.isdigit() for c in text)


def test_an_honest_sum_is_decrypted_and_trained_on(setup):
    honest = aggregate(setup["pk"], [setup["updates"][(u, 1)] for u in WEIGHTS])
    assert ask_key_holder(setup, honest) == "trained"


@pytest.mark.parametrize("forgery", ["replayed round", "other round", "relabelled node",
                                     "changed weight", "counted twice", "one left out",
                                     "other run"])
def test_replayed_or_relabelled_contributions_are_refused(setup, forgery, monkeypatch):
    """Each forgery is the product of real ciphertexts with a header the server made
    up; with the tags off the key holder would decrypt it."""
    ups, pk = setup["updates"], setup["pk"]
    victim, helper = ups[(VICTIM, 1)], ups[(HELPER, 1)]
    cts = {  # the ciphertexts the server multiplies, and the contributors it claims
        "replayed round": ([ups[(VICTIM, 1)], ups[(HELPER, 2)]], {VICTIM: 3, HELPER: 5}, 2),
        "other round": ([victim, helper], {VICTIM: 3, HELPER: 5}, 2),
        "relabelled node": ([victim, helper], {VICTIM: 3, 99: 5}, 1),
        "changed weight": ([victim, helper], {VICTIM: 3, HELPER: 6}, 1),
        "counted twice": ([victim, victim, helper], {VICTIM: 6, HELPER: 5}, 1),
        "one left out": ([victim], {VICTIM: 3, HELPER: 5}, 1),
        "other run": ([victim, helper], {VICTIM: 3, HELPER: 5}, 1),
    }[forgery]
    parts, contributors, server_round = cts
    model = EncryptedModel(aggregate_arrays(pk, [p.ciphertexts for p in parts]),
                           victim.fingerprint, victim.params, victim.layout,
                           RUN + 1 if forgery == "other run" else RUN, server_round,
                           contributors)
    assert ask_key_holder(setup, model).startswith("decryption refused")
    monkeypatch.setattr(paillier_tags.TagKey, "verify", lambda *a, **k: True)
    assert ask_key_holder(setup, model) == "trained"  # the tags were the only defence


def test_noise_the_server_adds_needs_the_nodes_consent(setup):
    """Central DP in Paillier mode: noise no key holder can check. Refused unless the
    node's own setting accepts it; the run config cannot say so."""
    honest = aggregate(setup["pk"], [setup["updates"][(u, 1)] for u in WEIGHTS])
    noisy = add_noise(honest, np.zeros(setup["layout"].size, np.int64), 100, Encryptor(setup["pk"]))
    text = ask_key_holder(setup, noisy)
    assert "paillier-accept-server-noise=true" in text
    assert ask_key_holder(setup, noisy, {"paillier-accept-server-noise": True}) == "trained"
