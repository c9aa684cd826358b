"""legacy-api-example: a Flower ClientApp (legacy API: NumPyClient and client_fn)."""

from flwr.app import Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.clientapp.typing import ClientAppCallable

from strategies.paillier_legacy import legacy_paillier_mod
from strategies.secagg_legacy import legacy_secagg_mod
from strategies.threshold_legacy import legacy_threshold_paillier_mod

from legacy_api_example.task import load_data, loss, train


class FlowerClient(NumPyClient):
    def __init__(self, train_data, test_data, local_epochs: int, lr: float):
        self.train_data, self.test_data = train_data, test_data
        self.local_epochs, self.lr = local_epochs, lr

    def fit(self, parameters, config):
        x, y = self.train_data
        weights, train_loss = train(parameters, x, y, self.local_epochs, self.lr)
        return weights, len(y), {"train-loss": train_loss}

    def evaluate(self, parameters, config):
        x, y = self.test_data
        return loss(parameters, x, y), len(y), {}


def client_fn(context: Context):
    train_data, test_data = load_data(context.node_config["partition-id"],
                                      context.node_config["num-partitions"])
    return FlowerClient(train_data, test_data, context.run_config["local-epochs"],
                        context.run_config["lr"]).to_client()


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    # A ClientApp is built when this module is imported, before the run config is
    # known, so this example switches with a tiny mod. A project that always runs
    # with Paillier just writes:
    #     app = ClientApp(client_fn=client_fn, mods=[legacy_paillier_mod])
    mod = {"paillier": legacy_paillier_mod,
           "paillier-threshold": legacy_threshold_paillier_mod,
           "secagg": legacy_secagg_mod}.get(context.run_config["secure"])
    return mod(msg, context, call_next) if mod else call_next(msg, context)


# Flower ClientApp
app = ClientApp(client_fn=client_fn, mods=[secure_mod])
