"""The encrypted final model an app gets from a Paillier strategy
(strategies.encrypted_result): it cannot pass for weights (an app's plaintext save code
fails with what to do instead), it saves to a file ``fedapp decrypt`` turns into the
weighted average on a key holder, and the strategies refuse a server-side evaluate_fn.
The example apps switched to Paillier save it so: tests/runs/test_examples.py."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedapp import cli
from strategies.encrypted_result import (EncryptedArrayRecord, EncryptedModelError,
                                         encrypted_record, save_encrypted_model)
from strategies.paillier_legacy import LegacyPaillierFedAvg
from strategies.paillier_message import PaillierFedAvg
from tests.helpers import CLIP, SHAPES, metadata
from tests.helpers.paillier import encrypted_arrays, expected_average, model


def rec(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class FakeGrid:
    def get_node_ids(self):
        return [1, 2]


@pytest.fixture
def aggregate(keypair, task_identity) -> tuple[ArrayRecord, list[dict], PaillierFedAvg]:
    """The encrypted aggregate of two nodes' updates (weights 10 and 30)."""
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, min_available_nodes=1, min_train_nodes=1)
    names = list(SHAPES)
    good = [model(0.5, seed=1), model(-0.25, seed=2)]
    replies = [Message(content=RecordDict({
        "arrays": rec(encrypted_arrays(keypair, list(m.values()), names, n, strategy, node)),
        "metrics": MetricRecord({"num-examples": n})}), metadata=metadata(node))
        for node, (m, n) in enumerate(zip(good, (10, 30)), start=1)]
    list(strategy.configure_train(1, rec(model(0.0)), ConfigRecord(), FakeGrid()))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, good, strategy


def test_the_encrypted_model_cannot_pass_for_weights(aggregate):
    arrays, _, _ = aggregate
    final = encrypted_record(arrays)
    assert isinstance(final, EncryptedArrayRecord) and dict(final) == dict(arrays)
    for read in (final.to_numpy_ndarrays, final.to_torch_state_dict):
        with pytest.raises(EncryptedModelError, match="save_encrypted_model.*fedapp decrypt"):
            read()
    plain = rec(model(0.5))
    assert encrypted_record(plain) is plain  # plaintext results stay as they are
    with pytest.raises(ValueError, match="not a Paillier-encrypted model"):
        save_encrypted_model(plain, "x.npz")


def test_a_saved_model_decrypts_to_the_average_on_a_key_holder(aggregate, node_keys, tmp_path,
                                                               capsys):
    arrays, good, strategy = aggregate
    path = encrypted_record(arrays).save(tmp_path / "runs" / "model.encrypted.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.encrypted.npz"]
    out = tmp_path / "model.npz"
    assert cli.main(["decrypt", "--key", str(node_keys[1]), "--model", str(path),
                     "--out", str(out)]) == 0, capsys.readouterr().err
    with np.load(out, allow_pickle=False) as f:
        got = [f[k] for k in f.files]
    for g, e in zip(got, expected_average(good, [10, 30]), strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=strategy.params.max_error())


def test_server_side_evaluation_is_refused_up_front(keypair):
    strategy = PaillierFedAvg(keypair[0], clip=CLIP)
    with pytest.raises(ValueError, match="cannot take an evaluate_fn.*fedapp decrypt"):
        strategy.start(grid=None, initial_arrays=rec(model(0.0)),
                       evaluate_fn=lambda rnd, arrays: None)
    with pytest.raises(ValueError, match="save_to=PATH"):
        LegacyPaillierFedAvg(keypair[0], clip=CLIP, evaluate_fn=lambda *a: None)
