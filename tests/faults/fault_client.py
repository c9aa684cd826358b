"""The project's ClientApp with injected faults, for the fault-tolerance tests.

``$FEDAPP_FAULTS`` lists ``kind:partition:round`` items (comma-separated): in that
server round the node of that partition ``crash``es (raises while training) or
``hang``s (sleeps ``$FEDAPP_HANG_SECONDS`` before training, past the round
timeout). The fault sits inside the secure-aggregation mod, where the real
training happens, so with masking the node drops out after sharing its keys. Like the
project's ClientApp, it unpacks what fedapp's ServerApp packs (fedapp.packing).
"""

import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedapp.adapter import serve_numpy_client
from fedapp.client_app import aggregation_mod
from fedapp.nodes import make_client
from fedapp.packing import packed_content_mod


def faults() -> dict[tuple[int, int], str]:
    out = {}
    for item in filter(None, os.environ.get("FEDAPP_FAULTS", "").split(",")):
        kind, partition, rnd = item.split(":")
        out[int(partition), int(rnd)] = kind
    return out


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type.startswith("train"):
        rnd = next(int(c["server-round"]) for c in msg.content.config_records.values()
                   if "server-round" in c)
        kind = faults().get((int(context.node_config["partition-id"]), rnd))
        if kind == "crash":
            raise RuntimeError(f"injected crash in round {rnd}")
        if kind == "hang":
            time.sleep(float(os.environ.get("FEDAPP_HANG_SECONDS", "60")))
    return call_next(msg, context)


app = serve_numpy_client(ClientApp(mods=[packed_content_mod, aggregation_mod, fault_mod]),
                         make_client)
