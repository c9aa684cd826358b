"""A message's whole content as one value on the wire.

Flower 1.42 sends a message as a tree of objects, each its own HTTP request between
ServerApp, SuperLink, SuperNode and ClientApp (and a pull of an object its sender has
not stored yet is retried): a ``Message``, its ``RecordDict``, each record, and each
``Array`` with its chunks. The housing model's 8 arrays and a config record make a
train message 20 objects; on 2 shared cores those requests, not the model, set a
deployed round's time (docs/deployment.md, How fast). :func:`pack` serializes the
whole content (every record, array, config and metric) with Flower's own protobuf
encoding of a ``RecordDict`` into bytes, held as the one value of one
``ConfigRecord``: 3 objects (``Message``, ``RecordDict``, ``ConfigRecord``), whatever
the model's size (an ``ArrayRecord`` of one byte array would add the array and its
chunks: 5 objects, about 10% slower a deployed housing round). :func:`unpack`
restores the content exactly (same names, order, values and object id), so
strategies and ClientApps never see the packed form:

- the ServerApp's grid (:class:`fedapp.polling.PollingGrid` with ``pack=True``) packs
  what it pushes and unpacks the replies it pulls;
- the ClientApp's outermost mod (:func:`packed_content_mod`) unpacks what it receives
  and packs its reply, only when what it received was packed, so fedapp's ClientApp
  still answers any other ServerApp as before.

fedapp's ServerApp and ClientApp go together: a ClientApp of your own behind fedapp's
ServerApp needs ``packed_content_mod`` as its first mod. The strategies alone (the
plug-in path) never pack.

The packed bytes are parsed as the protobuf message Flower's own wire parses for a
record dict (``flwr.proto.recorddict_pb2.RecordDict``) and rebuilt by Flower's own
constructors, which check every type; nothing is unpickled or evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

PACKED = "fedapp.packed"
_BLOB = "recorddict"


class PackingError(ValueError):
    """A packed message whose bytes are not a record dict."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` is packed."""
    return PACKED in content


def _objects_saved(content: RecordDict) -> bool:
    """Whether packing makes fewer objects: the packed form is one record."""
    arrays = sum(len(record) for record in content.array_records.values())
    return len(content) + arrays > 1


def pack(content: RecordDict) -> RecordDict:
    """``content`` as bytes in one config record.

    Content that packing would not make fewer objects (one record and no arrays), or
    that is packed already, is returned as it is. ``content`` itself is not changed.

    Parameters
    ----------
    content : RecordDict
        A message's content.

    Returns
    -------
    RecordDict
        ``{PACKED: ConfigRecord({"recorddict": bytes})}``.
    """
    if is_packed(content) or not _objects_saved(content):
        return content
    data = recorddict_to_proto(content).SerializeToString(deterministic=True)
    return RecordDict({PACKED: ConfigRecord({_BLOB: data})})


def unpack(content: RecordDict) -> RecordDict:
    """The content :func:`pack` was given, from what it returned.

    Content that is not packed is returned as it is.

    Raises
    ------
    PackingError
        If the packed content has anything beside its one bytes value, or its bytes
        are not a record dict, or hold a packed one again.
    """
    if not is_packed(content):
        return content
    record = content[PACKED]
    if len(content) != 1 or not isinstance(record, ConfigRecord) \
            or list(record.keys()) != [_BLOB] or not isinstance(record[_BLOB], bytes):
        raise PackingError(f"a packed message holds only the config record {PACKED!r} "
                           f"with the bytes {_BLOB!r}")
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(record[_BLOB])
        unpacked = recorddict_from_proto(proto)
    except Exception as exc:  # noqa: BLE001 - any failure on a peer's bytes is its error
        raise PackingError(f"packed bytes are not a record dict ({type(exc).__name__})"
                           ) from None
    if is_packed(unpacked):
        raise PackingError("packed bytes hold a packed message again")
    return unpacked


def pack_message(message: Message) -> Message:
    """``message`` with its content packed (sharing its metadata), or itself."""
    return _with_content(message, pack)


def pack_messages(messages: Iterable[Message]) -> list[Message]:
    """Each message as :func:`pack_message` makes it; a content several messages share
    (a round's model, sent to every node) is serialized once."""
    packed: dict[int, RecordDict] = {}

    def pack_once(content: RecordDict) -> RecordDict:
        if id(content) not in packed:  # the messages keep every content alive meanwhile
            packed[id(content)] = pack(content)
        return packed[id(content)]

    return [_with_content(m, pack_once) for m in messages]


def unpack_message(message: Message) -> Message:
    """``message`` with its content unpacked (sharing its metadata), or itself.

    Raises
    ------
    PackingError
        As :func:`unpack`.
    """
    return _with_content(message, unpack)


def _with_content(message: Message, change: Callable[[RecordDict], RecordDict]) -> Message:
    if not message.has_content():
        return message
    content = change(message.content)
    return message if content is message.content else make_message(message.metadata, content)


def packed_content_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: unpack a packed message before the app sees it and pack the
    app's reply; messages that were not packed pass through, and so do their replies."""
    if not (msg.has_content() and is_packed(msg.content)):
        return call_next(msg, context)
    reply = call_next(unpack_message(msg), context)
    return pack_message(reply)
