"""Serve any Flower NumPyClient from a Message-API ClientApp.

``train`` -> ``NumPyClient.fit``, ``evaluate`` -> ``NumPyClient.evaluate`` and
``query`` -> ``NumPyClient.get_properties``. Replies carry one ArrayRecord
(``arrays``) and one MetricRecord (``metrics``, with ``num-examples``), the
layout Flower's Message-API strategies expect.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

ClientFactory = Callable[[Context], NumPyClient]


def _config(msg: Message) -> dict:
    records = msg.content.config_records
    return dict(next(iter(records.values()))) if records else {}


def _arrays(msg: Message) -> list:
    records = msg.content.array_records
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord from the server, got {len(records)}")
    return next(iter(records.values())).to_numpy_ndarrays()


def serve_numpy_client(app: ClientApp, client_factory: ClientFactory) -> ClientApp:
    """Register train, evaluate and query handlers on ``app`` that call the
    NumPyClient built by ``client_factory(context)``; returns ``app``."""

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        weights, num_examples, metrics = client_factory(context).fit(_arrays(msg), _config(msg))
        return Message(RecordDict({
            "arrays": ArrayRecord(weights),
            "metrics": MetricRecord({**metrics, "num-examples": num_examples}),
        }), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        loss, num_examples, metrics = client_factory(context).evaluate(_arrays(msg), _config(msg))
        return Message(RecordDict({
            "metrics": MetricRecord({"loss": loss, **metrics, "num-examples": num_examples}),
        }), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        properties = client_factory(context).get_properties(_config(msg))
        return Message(RecordDict({"properties": ConfigRecord(properties)}), reply_to=msg)

    return app
