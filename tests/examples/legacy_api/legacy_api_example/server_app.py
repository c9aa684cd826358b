"""legacy-api-example: a Flower ServerApp (legacy API: server_fn and a strategy)."""

import json
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from strategies.keyfiles import load_public_key, load_threshold_public_key
from strategies.paillier_legacy import LegacyPaillierFedAvg
from strategies.secagg_legacy import LegacySecAggFedAvg
from strategies.threshold_legacy import LegacyThresholdPaillierFedAvg

from legacy_api_example.task import initial_weights


def server_fn(context: Context):
    config = context.run_config
    parameters = ndarrays_to_parameters(initial_weights(config["seed"]))
    out = Path(config["run-dir"]).expanduser().resolve() / f"run-{context.run_id}"

    # Define the strategy; secure="paillier": Paillier-encrypted FedAvg (it saves the
    # encrypted model each round: decrypt it on a key holder, `fedapp decrypt`),
    # secure="paillier-threshold": the same under a threshold key, T of N share holders
    # decrypt together (it saves the model sealed for the clients: `fedapp decrypt --key
    # paillier-group.key`), secure="secagg": masked secure aggregation
    if config["secure"] == "paillier":
        strategy = LegacyPaillierFedAvg(load_public_key(Path(config["paillier-public-key"])),
                                        clip=config["clip"],
                                        fraction_fit=config["fraction-fit"],
                                        initial_parameters=parameters,
                                        save_to=out / "final_model.encrypted.npz")
    elif config["secure"] == "paillier-threshold":
        key = load_threshold_public_key(Path(config["paillier-public-key"]))
        # each round needs T + 1 contributions: wait for that many clients
        strategy = LegacyThresholdPaillierFedAvg(key, clip=config["clip"],
                                                 fraction_fit=config["fraction-fit"],
                                                 min_fit_clients=key.threshold + 1,
                                                 min_available_clients=key.threshold + 1,
                                                 initial_parameters=parameters,
                                                 save_to=out / "final_model.sealed.npz")
    elif config["secure"] == "secagg":
        strategy = LegacySecAggFedAvg(clip=config["clip"], fraction_fit=config["fraction-fit"],
                                      initial_parameters=parameters)
    else:
        strategy = FedAvg(fraction_fit=config["fraction-fit"], initial_parameters=parameters)

    # Note the run's settings beside its outputs
    out.mkdir(parents=True, exist_ok=True)
    (out / "run-config.json").write_text(json.dumps(dict(config), indent=2))

    return ServerAppComponents(strategy=strategy,
                               config=ServerConfig(num_rounds=config["num-server-rounds"]))


# Create ServerApp
app = ServerApp(server_fn=server_fn)
