"""One value on the wire (fedapp.packing): unpacking gives back exactly what was packed
(names, order, arrays, values and their types, object id), the packed form is fewer
objects, bytes that are not a record dict are refused, a malformed packed reply
becomes that node's error reply instead of crashing the ServerApp, and the ClientApp's
mod is transparent both to fedapp's ServerApp and to any other."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, Metadata,
                      MetricRecord, RecordDict)
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp import packing
from fedapp.polling import PollingGrid

DTYPES = ["float32", "float64", "int64", "uint8", "bool"]

arrays = st.builds(
    lambda dtype, shape, seed: Array(np.random.default_rng(seed).normal(size=shape)
                                     .astype(dtype)),
    st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 2**32 - 1))
names = st.text("abcdefgh.-_", min_size=1, max_size=6)
array_records = st.dictionaries(names, arrays, max_size=4).map(ArrayRecord)
other_records = st.one_of(
    st.dictionaries(names, st.integers(-5, 5), max_size=2).map(ConfigRecord),
    st.dictionaries(names, st.floats(-1, 1), max_size=2).map(MetricRecord))
contents = st.dictionaries(names, st.one_of(array_records, other_records), max_size=5
                           ).map(RecordDict)


def sent_to(node: int, content: RecordDict) -> Message:
    """A train message from the ServerApp, as its grid makes one."""
    return Message(content, metadata=Metadata(
        run_id=1, message_id="", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train"))


def n_arrays(content: RecordDict) -> int:
    return sum(len(r) for r in content.array_records.values())


@settings(max_examples=150, deadline=None)
@given(contents)
def test_unpacking_gives_back_exactly_what_was_packed(content):
    before = content.object_id
    packed = packing.pack(content)
    assert content.object_id == before  # the input is left alone
    restored = packing.unpack(packed)
    assert list(restored.keys()) == list(content.keys())
    assert restored.object_id == content.object_id  # every record, array, value and byte
    if len(content) + n_arrays(content) <= 1:
        assert packed is content
    else:
        assert list(packed.keys()) == [packing.PACKED] and packing.is_packed(packed)
        assert packing.pack(packed) is packed  # never packed twice
        # the record dict and its one record (equal records are one object already)
        assert len(get_all_nested_objects(packed)) == 2 <= len(get_all_nested_objects(content))


def housing_train_content() -> RecordDict:
    rng = np.random.default_rng(0)
    shapes = [(64, 13), (64,), (32, 64), (32,), (16, 32), (16,), (1, 16), (1,)]
    return RecordDict({"arrays": ArrayRecord({f"p{i}": Array(rng.normal(size=s).astype(
        np.float32)) for i, s in enumerate(shapes)}), "config": ConfigRecord(
        {"lr": 0.01, "round": 3, "name": "housing", "blob": b"\x00\xff",
         "flags": [True, False], "nan": float("nan")})})


def test_a_housing_train_message_is_3_objects_instead_of_20():
    content = housing_train_content()
    message = sent_to(5, content)
    assert len(get_all_nested_objects(message)) == 20
    assert len(get_all_nested_objects(packing.pack_message(message))) == 3


def test_config_and_metric_values_keep_their_types():
    content = housing_train_content()
    content["metrics"] = MetricRecord({"loss": 0.5, "n": 7, "per-class": [1.0, 2.5]})
    restored = packing.unpack(packing.pack(content))
    for name in ("config", "metrics"):
        for key, value in content[name].items():
            got = restored[name][key]
            assert type(got) is type(value)
            assert got == value or (value != value and got != got)  # nan


def with_blob(data) -> RecordDict:
    return RecordDict({packing.PACKED: ConfigRecord({packing._BLOB: data})})


def packed_bytes() -> bytes:
    return packing.pack(housing_train_content())[packing.PACKED][packing._BLOB]


@pytest.mark.parametrize("data", [
    b"\xff" * 40,  # not protobuf
    packed_bytes()[:-3],  # cut short
    packed_bytes()[:1] + b"\x7f" + packed_bytes()[2:],  # a length that lies
    recorddict_to_proto(with_blob(b"x")).SerializeToString(),  # packed twice
], ids=["garbage", "truncated", "bad length", "nested"])
def test_bytes_that_are_not_a_record_dict_are_refused(data):
    with pytest.raises(packing.PackingError, match="packed bytes"):
        packing.unpack(with_blob(data))


def test_a_packed_message_with_anything_beside_its_bytes_is_refused():
    packed = packing.pack(housing_train_content())
    packed["extra"] = ConfigRecord({"a": 1})
    with pytest.raises(packing.PackingError, match="holds only"):
        packing.unpack(packed)
    packed = packing.pack(housing_train_content())
    packed[packing.PACKED]["second"] = b"x"
    with pytest.raises(packing.PackingError, match="holds only"):
        packing.unpack(packed)
    for other in ("text", [packed_bytes()], 7):  # the one value, not bytes
        with pytest.raises(packing.PackingError, match="holds only"):
            packing.unpack(with_blob(other))
    arrays = RecordDict({packing.PACKED: ArrayRecord({packing._BLOB: Array(
        np.frombuffer(packed_bytes(), np.uint8).copy())})})
    with pytest.raises(packing.PackingError, match="holds only"):
        packing.unpack(arrays)


def tampered() -> RecordDict:
    """A packed reply whose bytes are cut short."""
    return with_blob(packed_bytes()[:-5])


def reply(to: str, node: int, content: RecordDict) -> Message:
    return Message(content, metadata=Metadata(
        run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id=to,
        group_id="", created_at=0.0, ttl=60.0, message_type="train"))


class EchoGrid:
    """Answers each message from its destination node with the message's own content,
    as sent (packed); node 13 answers with a packed reply whose bytes are cut short."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
        self.pushed.extend(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        out = []
        for m in self.pushed:
            content = m.content
            if m.metadata.dst_node_id == 13:
                content = tampered()
            out.append(reply(m.metadata.message_id, m.metadata.dst_node_id, content))
        return out


def test_the_grid_packs_what_it_sends_and_unpacks_the_replies():
    inner = EchoGrid()
    grid = PollingGrid(inner, poll_seconds=0.001, pack=True)
    content = housing_train_content()
    sent = [sent_to(n, content) for n in (12, 13)]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(sent, timeout=5)}
    assert all(packing.is_packed(m.content) for m in inner.pushed)  # on the wire
    assert [m.metadata.message_id for m in sent] == [m.metadata.message_id
                                                     for m in inner.pushed]
    assert replies[12].content.object_id == content.object_id  # the strategy's view
    bad = replies[13]  # one malformed reply: that node's error, the round goes on
    assert bad.has_error() and bad.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "malformed reply" in bad.error.reason


def test_a_content_sent_to_every_node_is_serialized_once(monkeypatch):
    calls = []
    real = packing.recorddict_to_proto
    monkeypatch.setattr(packing, "recorddict_to_proto", lambda c: calls.append(1) or real(c))
    shared, own = housing_train_content(), housing_train_content()
    packed = packing.pack_messages([sent_to(n, shared) for n in (1, 2, 3)] + [sent_to(4, own)])
    assert len(calls) == 2
    assert [packing.unpack(m.content).object_id for m in packed] == [shared.object_id] * 4


def test_the_grid_sends_as_it_is_unless_asked_to_pack():
    inner = EchoGrid()
    grid = PollingGrid(inner, poll_seconds=0.001)
    content = housing_train_content()
    grid.push_messages([sent_to(12, content)])
    assert inner.pushed[0].content is content


def run_mod(message: Message) -> tuple[RecordDict, Message]:
    """The content the app saw and the reply that left the mod."""
    seen = {}

    def app(msg: Message, context: Context) -> Message:
        seen["content"] = msg.content
        return Message(msg.content, reply_to=msg)  # answers with what it got

    context = Context(run_id=1, node_id=12, node_config={}, state=RecordDict(),
                      run_config={})
    answer = packing.packed_content_mod(message, context, app)
    return seen["content"], answer


def test_the_client_mod_unpacks_for_the_app_and_packs_its_reply():
    content = housing_train_content()
    message = packing.pack_message(sent_to(12, content))
    message.metadata.__dict__["_message_id"] = message.object_id
    seen, answer = run_mod(message)
    assert seen.object_id == content.object_id and not packing.is_packed(seen)
    assert packing.is_packed(answer.content)
    assert answer.metadata.reply_to_message_id == message.metadata.message_id


def test_the_client_mod_leaves_other_servers_messages_alone():
    content = housing_train_content()
    message = sent_to(12, content)
    message.metadata.__dict__["_message_id"] = message.object_id
    seen, answer = run_mod(message)
    assert seen is content and answer.content is content
