"""The Message-API ClientApp: the task NumPyClients behind the adapter.

With ``aggregation = "paillier"`` every message passes through
:func:`strategies.paillier_flower.paillier_mod` (decrypt in, encrypt out); with
``"secagg"`` through :func:`strategies.secagg_flower.secagg_mod` (key stages,
masked updates out).
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from strategies.dp_flower import dp_clip_mod
from strategies.paillier_flower import paillier_mod
from strategies.secagg_flower import secagg_mod

from .adapter import serve_numpy_client
from .nodes import make_client


def aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the secure aggregation's client mod that the run asks for."""
    aggregation = str(context.run_config.get("aggregation"))
    inner = call_next
    if float(context.run_config.get("dp-noise-multiplier", 0)) > 0 and aggregation != "fedavg":
        def inner(m: Message, c: Context) -> Message:  # clip where the server cannot
            return dp_clip_mod(m, c, call_next)
    mod = MODS.get(aggregation)
    return mod(msg, context, inner) if mod else inner(msg, context)


MODS = {"paillier": paillier_mod, "secagg": secagg_mod}


app = serve_numpy_client(ClientApp(mods=[aggregation_mod]), make_client)
