"""How the secure client mods fail: with one clear line to the server, nothing more.

Flower turns an exception in a ClientApp into an error reply whose text is the
exception's message (in simulation, with the whole traceback), and that text goes
to the server. In a secure mode it could hold values derived from the decrypted
model or a key. :func:`reports_errors` wraps a mod so that

- a :class:`NodeError` (or another error type the mod names as safe: a missing key
  file, a server that sent no Paillier parameters, a malformed masking request)
  becomes an error reply with its own message, which names the cause and the fix
  and nothing secret; the node logs the same line, without a traceback;
- any other exception becomes an error reply that names only its type; the
  details, traceback included, stay in the node's own log.

The strategies group these replies by cause and log them once per round
(:mod:`strategies.screening`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from .keyfiles import KeyNotFound

Mod = Callable[[Message, Context, ClientAppCallable], Message]


class NodeError(ValueError):
    """A client node cannot answer, for a reason it may tell the server: the message
    names the cause and the fix and holds nothing derived from a key, the model or
    the data."""


def error_reply(msg: Message, reason: str) -> Message:
    """The error reply to ``msg`` that carries ``reason`` to the server."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)


def reports_errors(*safe: type[BaseException]) -> Callable[[Mod], Mod]:
    """Decorate a secure client mod so that its failures reach the server as one safe
    line (see the module); ``safe`` names error types, beside :class:`NodeError` and
    :class:`strategies.keyfiles.KeyNotFound`, whose messages may go to the server."""
    passed = (NodeError, KeyNotFound, *safe)

    def decorate(mod: Mod) -> Mod:
        @functools.wraps(mod)
        def wrapped(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
            try:
                return mod(msg, context, call_next)
            except passed as err:
                log(ERROR, "%s: %s", mod.__name__, err)
                return error_reply(msg, str(err))
            except Exception as err:  # noqa: BLE001 - its text stays on this node
                log(ERROR, "%s failed on this node", mod.__name__, exc_info=err)
                return error_reply(msg, f"{type(err).__name__} in the ClientApp; in a secure "
                                        "mode its details stay in the node's own log")
        return wrapped
    return decorate
