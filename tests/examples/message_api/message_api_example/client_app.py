"""message-api-example: a Flower ClientApp (Message API)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from strategies.paillier_message import paillier_mod
from strategies.secagg_message import secagg_mod

from message_api_example.task import load_data, loss
from message_api_example.task import train as train_fn


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    # A ClientApp is built when this module is imported, before the run config is
    # known, so this example switches with a tiny mod. A project that always runs
    # with Paillier just writes: app = ClientApp(mods=[paillier_mod])
    mod = {"paillier": paillier_mod, "secagg": secagg_mod}.get(context.run_config["secure"])
    return mod(msg, context, call_next) if mod else call_next(msg, context)


# Flower ClientApp
app = ClientApp(mods=[secure_mod])


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    weights = msg.content["arrays"].to_numpy_ndarrays()
    (x, y), _ = load_data(context.node_config["partition-id"],
                          context.node_config["num-partitions"])
    weights, train_loss = train_fn(weights, x, y, context.run_config["local-epochs"],
                                   msg.content["config"]["lr"])
    metrics = MetricRecord({"train-loss": train_loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the global model on local data."""
    weights = msg.content["arrays"].to_numpy_ndarrays()
    _, (x, y) = load_data(context.node_config["partition-id"],
                          context.node_config["num-partitions"])
    metrics = MetricRecord({"eval-loss": loss(weights, x, y), "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
