"""The aggregate tags (strategies.paillier_tags): honest sums check, and every affine
change a server can make to ciphertexts (shift a plaintext, drop, repeat, re-label or
re-weight a contribution, mix rounds) fails, whatever the plaintexts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies.paillier_tags import TagKey, round_context
from tests.helpers.fuzzing import fuzz

N = (1 << 2047) + 9  # any modulus serves the MAC's algebra; plaintexts live below it
CONTEXT = round_context(1, 3, "fp", {"value-bits": 16}, [["w", "float32", [4]]])
plaintext = st.integers(0, 2**1800)
contribution = st.tuples(st.lists(plaintext, min_size=3, max_size=3), st.integers(1, 2**20))


@pytest.fixture(scope="module")
def key() -> TagKey:
    return TagKey(bytes(range(32)), N)


def summed(key: TagKey, parts: dict[int, tuple[list[int], int]], context: bytes = CONTEXT):
    """What the server's product of ciphertexts decrypts to: the sums of plaintexts and
    tags of ``parts`` (node -> (plaintexts, weight))."""
    sums = [sum(col) % N for col in zip(*(p for p, _ in parts.values()))]
    tag = sum(key.tag(p, context, u, w) for u, (p, w) in parts.items()) % N
    return sums, tag


@fuzz(40)
@given(parts=st.dictionaries(st.integers(0, 2**64 - 1), contribution, min_size=1, max_size=4))
def test_an_honest_sum_checks(key, parts):
    sums, tag = summed(key, parts)
    assert key.verify(sums, tag, CONTEXT, {u: w for u, (_, w) in parts.items()})


@fuzz(40)
@given(parts=st.dictionaries(st.integers(1, 50), contribution, min_size=2, max_size=4),
       change=st.sampled_from(["shift", "drop", "repeat", "relabel", "reweight", "context",
                               "tag"]),
       delta=st.integers(1, 2**1800), data=st.data())
def test_every_change_the_server_can_make_fails(key, parts, change, delta, data):
    claimed = {u: w for u, (_, w) in parts.items()}
    sums, tag = summed(key, parts)
    u = data.draw(st.sampled_from(sorted(parts)))
    context = CONTEXT
    if change == "shift":  # Enc(delta) multiplied into one plaintext
        sums[data.draw(st.integers(0, 2))] += delta
    elif change == "drop":  # a contribution left out of the product, still claimed
        sums, tag = summed(key, {v: p for v, p in parts.items() if v != u})
    elif change == "repeat":  # one contribution multiplied in twice
        sums = [(s + x) % N for s, x in zip(sums, parts[u][0])]
        tag = (tag + key.tag(parts[u][0], CONTEXT, u, parts[u][1])) % N
    elif change == "relabel":
        claimed[u + 100] = claimed.pop(u)
    elif change == "reweight":
        claimed[u] += 1
    elif change == "context":  # replayed into another round
        context = round_context(1, 4, "fp", {"value-bits": 16}, [["w", "float32", [4]]])
    else:
        tag += delta
    assert not key.verify(sums, tag, context, claimed)


def test_the_key_comes_from_the_private_key_only(keypair):
    private = keypair[1]
    a, b = TagKey.from_private_key(private), TagKey.from_private_key(private)
    assert a.tag([5, 6], CONTEXT, 1, 1) == b.tag([5, 6], CONTEXT, 1, 1)
    assert a.modulus == private.public_key.n
    assert str(int(private.p)) not in repr(a) and "secret" not in repr(a)
    with pytest.raises(ValueError, match="32 bytes"):
        TagKey(b"short", N)
