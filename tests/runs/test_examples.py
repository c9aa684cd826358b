"""Real Flower simulations of the two example projects in tests/examples, each in
plaintext, with Paillier (``secure="paillier"``) and with masking (``secure="secagg"``),
and the legacy one under a threshold key (``secure="paillier-threshold"``, 3 nodes): all
finish, and the secure runs learn the same model as the plaintext one (for the 3-node
threshold run, the example's FedAvg run in-process), within the quantization error.

The examples train a linear model with full-batch gradient descent on fixed synthetic
data, so a run is deterministic up to Paillier's stochastic rounding: each round's
decoded average is less than ``max_error`` (masking: ``error_bound``) per value from
the exact one (on
``D`` values, less than ``sqrt(D) * max_error`` in L2), and gradient descent on a
least-squares loss with a small step, like the averaging itself, does not increase
an L2 distance. After ``R`` rounds the models differ by less than
``R * sqrt(D) * max_error`` per value.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedapp import cli, launch
from strategies.aggregation import weighted_average
from strategies.keyfiles import (GROUP_KEY_NAME, KEY_DIR_ENV, THRESHOLD_PUBLIC_NAME,
                                 load_private_key, load_threshold_public_key,
                                 write_simulation_identities)
from strategies.node_settings import NODE_CONFIG_ENV
from strategies.paillier_node import encoding_for
from strategies.paillier_protocol import EncryptedModel, decrypt_model
from strategies.secagg_rounds import secagg_params
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real Flower runs

EXAMPLES = ROOT / "tests" / "examples"
ROUNDS = 2  # num-server-rounds in both examples' pyproject.toml
# Paillier shifts the federated losses by less than 0.2% here (checked by simulating
# the examples' FedAvg with the worst-case error added each round); weighting the
# clients equally instead of by examples shifts them by 2% and 14%.
LOSS_RTOL = 1e-2


@pytest.fixture(scope="module")
def keys(node_keys) -> tuple[Path, Path]:
    return node_keys


def run(example: str, workdir: Path, keys: tuple[Path, Path], secure: str = "",
        nodes: int = 2):
    """``keys``: the server's public key file, and a file in the nodes' key directory."""
    overrides = {"secure": secure, "paillier-public-key": str(keys[0])}
    status, run_dir, logs = launch.simulate(
        EXAMPLES / example, workdir / (secure or "plain"), nodes, overrides,
        timeout=300, progress=False,
        # the examples evaluate on the clients: their nodes allow plaintext metrics
        env={KEY_DIR_ENV: str(keys[1].parent), NODE_CONFIG_ENV: "plaintext-metrics=true"})
    assert status == launch.FINISHED_OK, logs[-3000:]
    return run_dir, logs


def distributed_losses(logs: str) -> list[float]:
    """The legacy server's "History (loss, distributed)" as printed at the end of a run."""
    section = logs.split("History (loss, distributed):", 1)[1].splitlines()[1:]
    losses = []
    for line in section:
        found = re.search(r"round (\d+): (\S+)\s*$", line)
        if not found:
            break
        assert int(found[1]) == len(losses) + 1
        losses.append(float(found[2]))
    return losses


def load_model(run_dir: Path, name: str = "final_model.npz") -> dict[str, np.ndarray]:
    with np.load(run_dir / name, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def legacy_fedavg(nodes: int) -> tuple[list[np.ndarray], list[float]]:
    """The legacy example's plaintext FedAvg on ``nodes`` partitions, run in-process
    (its training is deterministic): the final model and each round's distributed loss
    (the clients' test losses, example-weighted, as Flower's FedAvg reports them)."""
    app = EXAMPLES / "legacy_api"
    spec = importlib.util.spec_from_file_location("legacy_api_task",
                                                  app / "legacy_api_example" / "task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    data = [task.load_data(i, nodes) for i in range(nodes)]
    model, losses = task.initial_weights(config["seed"]), []
    for _ in range(ROUNDS):
        model = weighted_average(
            [task.train(model, x, y, config["local-epochs"], config["lr"])[0]
             for (x, y), _ in data], [len(y) for (_, y), _ in data])
        losses.append(sum(len(y) * task.loss(model, x, y) for _, (x, y) in data)
                      / sum(len(y) for _, (_, y) in data))
    return model, losses


def eval_losses(run_dir: Path) -> list[float]:
    rows = json.loads((run_dir / "metrics.json").read_text())
    return [m["eval-loss"] for _, m in sorted(rows.items())]


def assert_close_models(got: list[np.ndarray], exp: list[np.ndarray], error: float) -> None:
    tolerance = ROUNDS * math.sqrt(sum(a.size for a in exp)) * error + 1e-6  # + float32
    for g, e in zip(got, exp, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def message_api_plain(tmp_path_factory, keys):
    run_dir, _ = run("message_api", tmp_path_factory.mktemp("message-api"), keys)
    return run_dir


@pytest.fixture(scope="module")
def legacy_api_plain(tmp_path_factory, keys):
    return run("legacy_api", tmp_path_factory.mktemp("legacy-api"), keys)[1]


def test_message_api_example_with_and_without_paillier(tmp_path, keys, message_api_plain):
    plain_dir = message_api_plain
    secure_dir, logs = run("message_api", tmp_path, keys, secure="paillier")
    assert logs.count("aggregate_train: 2 valid encrypted replies of 2") == ROUNDS

    plain = list(load_model(plain_dir).values())
    saved = load_model(secure_dir, "final_model.encrypted.npz")  # save_encrypted_model
    # the server only ever had the encrypted model: decrypt it with the private key
    assert EncryptedModel.is_encrypted(saved) and len(saved) == 2
    key = load_private_key(keys[1])
    model = EncryptedModel.from_arrays(saved, key.public_key)
    assert_close_models(decrypt_model(key, model)[0], plain, model.params.max_error())

    plain_loss, secure_loss = eval_losses(plain_dir), eval_losses(secure_dir)
    assert len(plain_loss) == ROUNDS and plain_loss[-1] < plain_loss[0]
    assert secure_loss == pytest.approx(plain_loss, rel=LOSS_RTOL)


def test_message_api_example_with_masking(tmp_path, keys, message_api_plain):
    secure_dir, logs = run("message_api", tmp_path, keys, secure="secagg")
    assert logs.count("Secure aggregation: 2 of 2 sampled nodes in the sum") == ROUNDS
    assert "Left out" not in logs
    params = secagg_params(2.0, 65536, 16, 0, 0.5)  # the example's clip, the defaults
    assert_close_models(list(load_model(secure_dir).values()),
                        list(load_model(message_api_plain).values()), params.error_bound)
    plain_loss, secure_loss = eval_losses(message_api_plain), eval_losses(secure_dir)
    assert secure_loss == pytest.approx(plain_loss, rel=LOSS_RTOL)


def test_a_plugged_in_strategy_fails_the_run_when_no_node_can_decrypt(tmp_path, keys):
    """Flower's own round loop (``strategy.start``) with PaillierFedAvg, and client nodes
    that lack the private key: the run ends failed at round 1, naming the cause, instead
    of saving an untouched model as a success."""
    status, _, logs = launch.simulate(
        EXAMPLES / "message_api", tmp_path, 2,
        {"secure": "paillier", "paillier-public-key": str(keys[0])}, timeout=300,
        progress=False, env={KEY_DIR_ENV: str(tmp_path)})  # no key there
    assert status == "finished:failed", logs[-3000:]
    assert "nodes" in logs and "failed the train stage: no paillier.key.json on this node" \
        in logs
    assert "1 round(s) in a row without a usable update" in logs


@pytest.mark.parametrize("secure", ["paillier", "paillier-threshold", "secagg"])
def test_legacy_api_example_with_and_without_secure_aggregation(tmp_path, keys, secure,
                                                                request):
    nodes = 2
    if secure == "paillier-threshold":  # T + 1 = 3 contributors: 3 nodes, 2-of-3 key
        nodes, keydir = 3, tmp_path / "keys"  # partition i finds share i + 1 there
        shutil.copytree(request.getfixturevalue("threshold_key_dir"), keydir)
        write_simulation_identities(keydir, nodes)
        keys = (keydir / THRESHOLD_PUBLIC_NAME, keydir / GROUP_KEY_NAME)
    secure_dir, secure_logs = run("legacy_api", tmp_path, keys, secure=secure, nodes=nodes)
    expected = {"paillier": "aggregate_fit: 2 valid encrypted replies of 2",
                "paillier-threshold": "aggregate_fit: 3 valid encrypted replies of 3",
                "secagg": "Secure aggregation: 2 of 2 sampled nodes in the sum"}[secure]
    assert secure_logs.count(expected) == ROUNDS
    assert "Left out" not in secure_logs
    assert json.loads((secure_dir / "run-config.json").read_text())["secure"] == secure
    if secure == "paillier":  # save_to: the last round's encrypted model, for a key holder
        key = load_private_key(keys[1])
        model = EncryptedModel.from_arrays(
            load_model(secure_dir, "final_model.encrypted.npz"), key.public_key)
        assert model.server_round == ROUNDS
        # the example's weights: 8 features and a bias
        assert [a.shape for a in decrypt_model(key, model)[0]] == [(8,), (1,)]
    if secure == "paillier-threshold":
        for stage, answered in (("view", "3 of 3"), ("decrypt", "3 of 3"),
                                ("combine", "1 of 1")):
            assert secure_logs.count(f"Threshold Paillier: {stage} stage, {answered} nodes") \
                == ROUNDS, stage
        # save_to: the last round's model, sealed; the clients' group key opens it
        out = tmp_path / "model.npz"
        assert cli.main(["decrypt", "--key", str(keys[1]), "--model",
                         str(secure_dir / "final_model.sealed.npz"), "--out", str(out)]) == 0
        plain_model, plain_loss = legacy_fedavg(nodes)
        params = encoding_for(load_threshold_public_key(keys[0]), clip=2.0,
                              max_total_weight=65536, weight_unit=1, value_bits=16)
        assert_close_models(list(load_model(out.parent, out.name).values()), plain_model,
                            params.max_error())
        secrets = [json.loads((keydir / GROUP_KEY_NAME).read_text())["key"].encode()] + [
            json.loads(p.read_text())["share"].encode() for p in keydir.glob("*share*")]
        for path in (tmp_path / secure).rglob("*"):  # run directory, SuperLink's files
            if path.is_file():
                assert not any(s in path.read_bytes() for s in secrets), path
    else:
        plain_loss = distributed_losses(request.getfixturevalue("legacy_api_plain"))
    secure_loss = distributed_losses(secure_logs)
    assert len(plain_loss) == ROUNDS and plain_loss[-1] < plain_loss[0]
    assert secure_loss == pytest.approx(plain_loss, rel=LOSS_RTOL)
