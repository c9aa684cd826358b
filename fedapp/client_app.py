"""The Message-API ClientApp: the task NumPyClients behind the adapter.

With ``aggregation = "paillier"`` every message passes through
:func:`strategies.paillier_flower.paillier_mod` (decrypt in, encrypt out); with
``"secagg"`` through :func:`strategies.secagg_flower.secagg_mod` (key stages,
masked updates out).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from strategies.paillier_flower import paillier_mod
from strategies.secagg_flower import secagg_mod

from .adapter import serve_numpy_client
from .nodes import make_client


def aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the secure aggregation's client mod that the run asks for."""
    mod = MODS.get(str(context.run_config.get("aggregation")))
    return mod(msg, context, call_next) if mod else call_next(msg, context)


MODS = {"paillier": paillier_mod, "secagg": secagg_mod}


app = serve_numpy_client(ClientApp(mods=[aggregation_mod]), make_client)
