"""Secure aggregation end to end in real simulations: with Paillier and with masking,
each task reaches the plaintext result in the same rounds. With Paillier the server
never holds a private key and the encrypted final model decrypts with ``fedapp
decrypt``; with masking the nodes authenticate their keys with a shared key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedapp import cli, launch
from strategies.keyfiles import KEY_DIR_ENV
from strategies.node_settings import NODE_CONFIG_ENV
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real Flower runs


CASES = {  # task: (supernodes, settings, metric, tolerance)
    "spam": (3, {"num-server-rounds": 1, "min-available-nodes": 3}, "accuracy", 0.005),
    "housing": (2, {"num-server-rounds": 3}, "mse", 0.05),  # relative, MSE is unbounded
}
# Under a secure mode the nodes answer federated evaluation only when both sides allow
# plaintext metrics: the Paillier runs (whose server cannot evaluate) opt in.
PLAINTEXT_METRICS = "plaintext-metrics=true"


# Each mode on housing, Paillier also on spam's model (3 IID partitions; the natural
# partitions are tested in tests/clients/test_partition.py) (CI time: masking
# on spam's 65,537 values runs in scripts/bench_scale.py, the MNIST CNN in
# scripts/bench_paillier.py and scripts/bench_secagg.py; both cores are tested on every
# shape in tests/strategies).
TASKS = ["housing", "spam"]


@pytest.fixture(scope="module")
def keys(node_keys):
    return node_keys


def node_env(keys) -> dict[str, str]:
    """What the simulated nodes need to find their keys."""
    return {KEY_DIR_ENV: str(keys[1].parent)}


def final_rows(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())[-1]


def settings_for(task: str, data_dir: Path) -> dict:
    return {**CASES[task][1], "task": task, "data-dir": str(data_dir)}


@pytest.fixture(scope="module")
def plaintext(data_dir, tmp_path_factory):
    """The plaintext run of each task (once per module)."""
    done: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in done:
            status, run_dir, logs = launch.simulate(
                ROOT, tmp_path_factory.mktemp(f"plain-{task}"), CASES[task][0],
                settings_for(task, data_dir), timeout=900, progress=False)
            assert status == launch.FINISHED_OK, logs[-3000:]
            done[task] = run_dir
        return done[task]
    return get


def assert_same_result(task: str, plain: dict, secure: dict, evaluation: str) -> None:
    """``evaluation``: ``fed`` (the clients') or ``central`` (the server's)."""
    supernodes, settings, metric, tolerance = CASES[task]
    metric = f"{evaluation}-{metric}"
    assert secure["round"] == plain["round"] == settings["num-server-rounds"]
    if metric.endswith("mse"):
        assert abs(secure[metric] / plain[metric] - 1) <= tolerance, (plain, secure)
    else:
        assert abs(secure[metric] - plain[metric]) <= tolerance, (plain, secure)
    assert secure["train-clients"] == supernodes


@pytest.mark.parametrize("task", ["housing"])
def test_masking_reaches_the_plaintext_result(task, keys, plaintext, data_dir, tmp_path):
    status, run_dir, logs = launch.simulate(
        ROOT, tmp_path / "secagg", CASES[task][0],
        {**settings_for(task, data_dir), "aggregation": "secagg"}, timeout=900,
        progress=False, env=node_env(keys))
    assert status == launch.FINISHED_OK, logs[-3000:]
    plain, secure = final_rows(plaintext(task)), final_rows(run_dir)
    assert_same_result(task, plain, secure, "central")
    # no evaluation requests by default; the train metrics arrive as sums only
    assert not any(k.startswith("fed-") for k in secure) and "Federated evaluation is off" in logs
    assert secure["train-loss"] == pytest.approx(plain["train-loss"], rel=0.05)
    rounds = CASES[task][1]["num-server-rounds"]
    assert logs.count(f"Secure aggregation: {CASES[task][0]} of {CASES[task][0]} sampled "
                      "nodes in the sum") == rounds
    assert "without identity keys" not in logs and "Left out" not in logs


@pytest.mark.parametrize("task", TASKS)
def test_paillier_reaches_the_plaintext_result(task, keys, plaintext, data_dir, tmp_path):
    supernodes = CASES[task][0]
    plain_dir = plaintext(task)
    status, run_dir, logs = launch.simulate(
        ROOT, tmp_path / "paillier", supernodes,
        {**settings_for(task, data_dir), "aggregation": "paillier",
         "paillier-public-key": str(keys[0]), "plaintext-metrics": True},
        timeout=900, progress=False, env={**node_env(keys), NODE_CONFIG_ENV: PLAINTEXT_METRICS})
    assert status == launch.FINISHED_OK, logs[-3000:]
    secure = final_rows(run_dir)
    assert_same_result(task, final_rows(plain_dir), secure, "fed")
    assert "central-accuracy" not in secure and "central-mse" not in secure
    assert (run_dir / "model.encrypted.npz").is_file() and not (run_dir / "model.npz").exists()
    assert "valid encrypted replies" in logs

    # a key holder turns the encrypted final model into a plaintext checkpoint
    out = tmp_path / "model.npz"
    assert cli.main(["decrypt", "--key", str(keys[1]), "--model",
                     str(run_dir / "model.encrypted.npz"), "--out", str(out),
                     "--task", task]) == 0
    with np.load(out, allow_pickle=False) as decrypted, \
            np.load(plain_dir / "model.npz", allow_pickle=False) as plaintext:
        assert decrypted.files == plaintext.files
        # same seeds: the models differ by the rounding only, which AdamW's normalized
        # steps can amplify over 30 local epochs; a wrong key or decoding gives noise
        distance = np.sqrt(sum(np.sum((decrypted[k] - plaintext[k]) ** 2)
                               for k in plaintext.files))
        size = np.sqrt(sum(np.sum(plaintext[k] ** 2) for k in plaintext.files))
        assert distance < 0.05 * size


@pytest.mark.parametrize("payload", ["masked", "paillier"])
def test_threshold_paillier_runs_with_no_single_key_holder(threshold_key_dir, data_dir,
                                                          tmp_path, payload):
    """A real simulation under a 2-of-3 key, with each payload: 4 nodes, 3 of them
    holding a share (found by partition id), every round's view, decrypt and combine
    stages over Flower's own message routing and node state; the final model is sealed,
    opens with the group key (``fedapp decrypt``), and no share or group key reaches the
    run directory or the SuperLink's files."""
    import shutil

    from strategies.keyfiles import (GROUP_KEY_NAME, THRESHOLD_PUBLIC_NAME,
                                     write_simulation_identities)

    keydir = tmp_path / "keys"
    shutil.copytree(threshold_key_dir, keydir)
    write_simulation_identities(keydir, 4)
    secrets = [json.loads((keydir / GROUP_KEY_NAME).read_text())["key"].encode()] + [
        json.loads(p.read_text())["share"].encode() for p in keydir.glob("*share*")]
    work = tmp_path / "work"
    status, run_dir, logs = launch.simulate(
        ROOT, work, 4, {**settings_for("housing", data_dir), "num-server-rounds": 2,
                        "aggregation": "paillier-threshold", "plaintext-metrics": True,
                        "paillier-threshold-payload": payload,
                        "paillier-public-key": str(keydir / THRESHOLD_PUBLIC_NAME)},
        timeout=900, progress=False, env={KEY_DIR_ENV: str(keydir),
                                          NODE_CONFIG_ENV: PLAINTEXT_METRICS})
    assert status == launch.FINISHED_OK, logs[-3000:]
    assert logs.count(f"aggregates 4 contributions, "
                      f"{'masked' if payload == 'masked' else 'packed'} payload") == 2
    for stage, answered in (("view", "4 of 4"), ("decrypt", "3 of 3"), ("combine", "1 of 1")):
        assert logs.count(f"Threshold Paillier: {stage} stage, {answered} nodes") == 2, stage
    rows = [r for r in json.loads((run_dir / "metrics.json").read_text()) if r["round"] > 0]
    assert [r["train-clients"] for r in rows] == [4, 4]
    assert rows[1]["fed-mse"] < rows[0]["fed-mse"]  # the clients trained on the opened model
    assert (run_dir / "model.sealed.npz").is_file() and not (run_dir / "model.npz").exists()
    assert (run_dir / "standardization.npz").is_file()  # part of the model for prediction
    out = tmp_path / "model.npz"
    assert cli.main(["decrypt", "--key", str(keydir / GROUP_KEY_NAME), "--model",
                     str(run_dir / "model.sealed.npz"), "--out", str(out),
                     "--task", "housing"]) == 0
    with np.load(out, allow_pickle=False) as model:
        assert all(np.isfinite(model[k]).all() for k in model.files)
    for path in work.rglob("*"):  # the run directory and the SuperLink's FLWR_HOME
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path


@pytest.mark.parametrize("aggregation", ["secagg", "secagg-distributed",
                                         "paillier-distributed",
                                         "paillier-threshold-distributed",
                                         "paillier-threshold"])
def test_central_dp_composes_with_secure_aggregation(aggregation, keys, data_dir, tmp_path,
                                                     request):
    """DP-FedAvg over masking (adaptive clipping, the bit in the masked sum), and
    distributed DP over masking, over Paillier and over threshold Paillier (the nodes add
    the noise; under Paillier the key holders then decrypt an authentic aggregate, with
    no consent to server noise; under a threshold key the decryptors check it before
    their partials), and central DP over threshold Paillier (the server's noise with its
    proof, added by decryptors that accept it): real runs, epsilon reported and growing
    every round, the budget stopping training before it is exceeded. Central DP's
    encrypted server noise under the single key is tested in-process
    (tests/strategies/test_dp_message.py)."""
    aggregation, _, mode = aggregation.rpartition("-") if aggregation.endswith(
        "-distributed") else (aggregation, "", "")
    env = node_env(keys)
    settings = {**settings_for("housing", data_dir), "num-server-rounds": 4,
                "min-available-nodes": 4, "aggregation": aggregation,
                "dp-noise-multiplier": 1.0, "dp-clip": 1.0, "dp-max-epsilon": 8.0,
                "paillier-public-key": str(keys[0]), "dp-mode": mode or "central"}
    if aggregation == "secagg" and not mode:  # adaptive: count noise leaving room for the rest
        settings.update({"dp-adaptive-clip": True, "dp-clipped-count-stddev": 1.0})
    elif aggregation.startswith("paillier"):  # fixed-size sampling, replace-one: z = 2
        settings["dp-noise-multiplier"] = 2.0  # costs what z = 1 does under Poisson
    if aggregation == "paillier-threshold":  # the 2-of-3 key, identities for 4 nodes
        import shutil

        from strategies.keyfiles import THRESHOLD_PUBLIC_NAME, write_simulation_identities

        keydir = tmp_path / "keys"
        shutil.copytree(request.getfixturevalue("threshold_key_dir"), keydir)
        write_simulation_identities(keydir, 4)
        settings["paillier-public-key"] = str(keydir / THRESHOLD_PUBLIC_NAME)
        env = {KEY_DIR_ENV: str(keydir)}
        if not mode:  # central: the decryptors accept the server's noise
            env[NODE_CONFIG_ENV] = "paillier-accept-server-noise=true"
    status, run_dir, logs = launch.simulate(ROOT, tmp_path, 4, settings, timeout=900,
                                            progress=False, env=env)
    assert status == launch.FINISHED_OK, logs[-3000:]
    rows = [r for r in json.loads((run_dir / "metrics.json").read_text()) if r["round"] > 0]
    epsilon = [r["train-dp-epsilon"] for r in rows]
    # q = 1, z = 1 (Poisson) or 2 (fixed): 4.73, 7.08, 9.01 after rounds 1-3: the budget
    # of 8 allows two rounds
    assert len(rows) == 2 and epsilon == sorted(epsilon) and epsilon[-1] <= 8.0
    assert epsilon[0] == pytest.approx(4.7285, abs=1e-3)
    assert "Training stopped before round 3: the privacy budget is spent" in logs
    assert all(r["train-clients"] == 4 for r in rows)
    if mode:  # the server adds nothing; the nodes were told how much to add
        assert "Distributed DP: the nodes add noise of std" in logs
        assert f"accounted at multiplier {settings['dp-noise-multiplier']:g}\n" in logs
    if aggregation == "secagg":
        assert logs.count("Secure aggregation: 4 of 4 sampled nodes in the sum") == 2
    if aggregation == "secagg" and not mode:  # adaptive clipping: round 2's clip is round 1's
        # moved by its noised fraction of unclipped updates (which may be exactly the target
        # 1/2: the noised count of 4 is a multiple of 1/2, so the clip need not move)
        fraction = rows[0]["train-dp-unclipped-fraction"]
        assert (8 * fraction).is_integer()
        assert rows[1]["train-dp-clip"] == pytest.approx(
            rows[0]["train-dp-clip"] * math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
        assert rows[0]["train-dp-next-clip"] == rows[1]["train-dp-clip"]
    if aggregation == "paillier-threshold":  # decrypted by T of the share holders
        for stage, answered in (("view", "4 of 4"), ("decrypt", "3 of 3"),
                                ("combine", "1 of 1")):
            assert logs.count(f"Threshold Paillier: {stage} stage, {answered} nodes") == 2
        assert (run_dir / "model.sealed.npz").is_file()
    if aggregation.startswith("paillier") and mode:
        assert logs.count("the clients' noise in the encrypted average of 4 updates") == 2
        assert "a quorum of 4 of the 4 sampled" in logs
    if aggregation.startswith("paillier") and not mode:  # proven, added by the decryptors
        assert logs.count("noise added to the encrypted average of 4 updates") == 2
        assert logs.count("central DP noise encrypted with its proof") == 2
    if aggregation.startswith("paillier"):
        # round 1's train metrics, as sums in the updates, released by the key holders
        assert rows[1]["train-released-round"] == 1 and "train-released-train-loss" in rows[1]
        assert "train-loss" not in rows[0] and "train-loss" not in rows[1]
