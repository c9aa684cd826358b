"""The Message-API ClientApp: the task NumPyClients behind the adapter.

Every message passes through the client mod of the run's aggregation mode
(:data:`fedapp.modes.MODES`: Paillier decrypts in and encrypts out, masking answers
the key stages and masks the update), with central DP's clip mod inside it when the
server cannot clip (the server does not see the updates in plaintext).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from strategies.dp_message import dp_clip_mod

from .adapter import serve_numpy_client
from .modes import mode_of
from .nodes import make_client
from .packing import packed_content_mod


def aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the client mod of the aggregation mode the run asks for."""
    mode = mode_of(str(context.run_config.get("aggregation", "fedavg")))
    clips = float(context.run_config.get("dp-noise-multiplier", 0)) > 0 \
        and mode.server_sees != "plain"  # clip where the server cannot

    def inner(m: Message, c: Context) -> Message:
        return dp_clip_mod(m, c, call_next) if clips else call_next(m, c)
    mod = mode.mod()
    return mod(msg, context, inner) if mod else inner(msg, context)


app = serve_numpy_client(ClientApp(mods=[packed_content_mod, aggregation_mod]), make_client)
