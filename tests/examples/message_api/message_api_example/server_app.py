"""message-api-example: a Flower ServerApp (Message API)."""

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from strategies.encrypted_result import save_encrypted_model
from strategies.keyfiles import load_public_key
from strategies.paillier_message import PaillierFedAvg
from strategies.secagg_message import SecAggFedAvg

from message_api_example.task import initial_weights

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    config = context.run_config
    arrays = ArrayRecord(initial_weights(config["seed"]))

    # Initialize FedAvg strategy; secure="paillier": Paillier-encrypted FedAvg,
    # secure="secagg": masked secure aggregation
    if config["secure"] == "paillier":
        strategy = PaillierFedAvg(load_public_key(Path(config["paillier-public-key"])),
                                  clip=config["clip"], fraction_train=config["fraction-train"])
    elif config["secure"] == "secagg":
        strategy = SecAggFedAvg(clip=config["clip"], fraction_train=config["fraction-train"])
    else:
        strategy = FedAvg(fraction_train=config["fraction-train"])

    # Start strategy, run FedAvg for `num-server-rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": config["lr"]}),
        num_rounds=config["num-server-rounds"],
    )

    # Save the final model (with secure="paillier" it is encrypted: decrypt it on a key
    # holder, `fedapp decrypt`) and the federated evaluation metrics
    out = Path(config["run-dir"]).expanduser().resolve() / f"run-{context.run_id}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nSaving final model to {out}")
    if config["secure"] == "paillier":
        save_encrypted_model(result.arrays, out / "final_model.encrypted.npz")
    else:
        names = list(result.arrays)
        np.savez(out / "final_model.npz",
                 **dict(zip(names, result.arrays.to_numpy_ndarrays(), strict=True)))
    metrics = {rnd: dict(m) for rnd, m in result.evaluate_metrics_clientapp.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
