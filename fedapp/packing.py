"""All of a message's arrays as one array on the wire.

Flower 1.42 sends a message as a tree of objects, each its own HTTP request between
ServerApp, SuperLink, SuperNode and ClientApp (and a pull of an object its sender has
not stored yet is retried): a ``Message``, its ``RecordDict``, each record, and each
``Array`` with its chunks. The housing model's 8 arrays make a train message 20
objects; on 2 shared cores those requests, not the model, set a deployed round's time
(docs/deployment.md, How fast). :func:`pack` puts every array of a message's array
records, byte for byte, into one ``Array`` (with its layout in a ``ConfigRecord``):
7 objects. :func:`unpack` restores the records exactly (same names, order, arrays and
object id), so strategies and ClientApps never see the packed form:

- the ServerApp's grid (:class:`fedapp.polling.PollingGrid` with ``pack=True``) packs
  what it pushes and unpacks the replies it pulls;
- the ClientApp's outermost mod (:func:`packed_arrays_mod`) unpacks what it receives
  and packs its reply, only when what it received was packed, so fedapp's ClientApp
  still answers any other ServerApp as before.

fedapp's ServerApp and ClientApp go together: a ClientApp of your own behind fedapp's
ServerApp needs ``packed_arrays_mod`` as its first mod. The strategies alone (the
plug-in path) never pack.

The layout is JSON, checked field by field against the packed bytes; nothing is
unpickled or evaluated. An array's bytes are Flower's own serialization
(``Array.data``), so any dtype or serialization (``stype``) travels unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.clientapp.typing import ClientAppCallable

ARRAYS = "fedapp.packed.arrays"
LAYOUT = "fedapp.packed.layout"
_BLOB = "bytes"
_STYPE = "fedapp.packed"
_VERSION = 1


class PackingError(ValueError):
    """A packed message whose layout does not fit its bytes."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` carries packed arrays (either part of them)."""
    return ARRAYS in content or LAYOUT in content


def pack(content: RecordDict) -> RecordDict:
    """``content`` with the arrays of all its array records in one ``Array``.

    Content with fewer than two arrays, or packed already, is returned as it is.
    ``content`` itself is not changed.

    Parameters
    ----------
    content : RecordDict
        A message's content.

    Returns
    -------
    RecordDict
        The other records as they were, then the packed array record and its layout.
    """
    if is_packed(content):
        return content
    arrays = content.array_records
    if sum(len(record) for record in arrays.values()) < 2:
        return content
    order = list(content.keys())
    layout: dict[str, list[list[Any]]] = {}
    blobs: list[bytes] = []
    packed = RecordDict()
    for name, record in content.items():
        if name not in arrays:
            packed[name] = record
            continue
        layout[name] = []
        for key, array in record.items():
            layout[name].append([key, array.dtype, list(array.shape), array.stype,
                                 len(array.data)])
            blobs.append(array.data)
    data = b"".join(blobs)
    packed[ARRAYS] = ArrayRecord({_BLOB: Array(dtype="uint8", shape=(len(data),),
                                               stype=_STYPE, data=data)})
    packed[LAYOUT] = ConfigRecord({"layout": json.dumps(
        {"version": _VERSION, "order": order, "records": layout}, separators=(",", ":"))})
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """The content :func:`pack` was given, from what it returned.

    Content that is not packed is returned as it is.

    Raises
    ------
    PackingError
        If the packed array or its layout is missing, malformed, or does not account
        for the packed bytes exactly.
    """
    if not is_packed(content):
        return content
    data, layout = _packed_parts(content)
    order, records = layout["order"], layout["records"]
    others = [name for name in content.keys() if name not in (ARRAYS, LAYOUT)]
    if sorted(others + list(records)) != sorted(order) or len(set(order)) != len(order):
        raise PackingError("packed layout: the record names do not match the message's")
    rebuilt: dict[str, ArrayRecord] = {}
    offset = 0
    for name, entries in records.items():
        record = ArrayRecord()
        for key, dtype, shape, stype, size in entries:
            if key in record:
                raise PackingError(f"packed layout: array {key!r} twice in {name!r}")
            record[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                data=data[offset:offset + size])
            offset += size
        rebuilt[name] = record
    if offset != len(data):
        raise PackingError(f"packed layout accounts for {offset} bytes of {len(data)}")
    out = RecordDict()
    for name in order:
        out[name] = rebuilt[name] if name in rebuilt else content[name]
    return out


def _packed_parts(content: RecordDict) -> tuple[bytes, dict[str, Any]]:
    """The packed bytes and the checked layout."""
    record, config = content.get(ARRAYS), content.get(LAYOUT)
    if not isinstance(record, ArrayRecord) or not isinstance(config, ConfigRecord) \
            or list(record.keys()) != [_BLOB] or list(config.keys()) != ["layout"]:
        raise PackingError(f"a packed message needs the array record {ARRAYS!r} holding "
                           f"{_BLOB!r} and the config record {LAYOUT!r} holding 'layout'")
    blob = record[_BLOB]
    if blob.stype != _STYPE or not isinstance(config["layout"], str):
        raise PackingError("packed arrays of an unknown kind")
    try:
        layout = json.loads(config["layout"])
    except ValueError:
        raise PackingError("packed layout is not JSON") from None
    if not _layout_ok(layout):
        raise PackingError("packed layout is malformed: it needs version, order (record "
                           "names) and records (name -> [key, dtype, shape, stype, size]...)")
    return blob.data, layout


def _layout_ok(layout: Any) -> bool:
    def entry_ok(e: Any) -> bool:
        return (isinstance(e, list) and len(e) == 5 and isinstance(e[0], str)
                and isinstance(e[1], str) and isinstance(e[3], str)
                and isinstance(e[2], list)
                and all(type(d) is int and d >= 0 for d in e[2])
                and type(e[4]) is int and e[4] >= 0)

    return (isinstance(layout, dict) and layout.get("version") == _VERSION
            and isinstance(layout.get("order"), list)
            and all(isinstance(n, str) for n in layout["order"])
            and isinstance(layout.get("records"), dict)
            and all(isinstance(v, list) and all(entry_ok(e) for e in v)
                    for v in layout["records"].values()))


def pack_message(message: Message) -> Message:
    """``message`` with its content packed (sharing its metadata), or itself."""
    return _with_content(message, pack)


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


def packed_arrays_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: unpack a packed message before the app sees it and pack the
    app's reply; messages that were not packed pass through, and so do their replies."""
    if not (msg.has_content() and is_packed(msg.content)):
        return call_next(msg, context)
    reply = call_next(unpack_message(msg), context)
    return pack_message(reply)
