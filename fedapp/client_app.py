"""The Message-API ClientApp: the task NumPyClients behind the adapter.

With ``aggregation = "paillier"`` every message passes through
:func:`strategies.paillier_flower.paillier_mod` (decrypt in, encrypt out).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from strategies.paillier_flower import paillier_mod

from .adapter import serve_numpy_client
from .nodes import make_client


def aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the secure aggregation's client mod that the run asks for."""
    if context.run_config.get("aggregation") == "paillier":
        return paillier_mod(msg, context, call_next)
    return call_next(msg, context)


app = serve_numpy_client(ClientApp(mods=[aggregation_mod]), make_client)
