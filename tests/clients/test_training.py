"""The training config a client receives from the server (clients.training,
clients.dp_sgd_config).

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.fuzzing import attempt, fuzz, mutated_json, refused


# ------------------------------------------------------------------ fuzzing
TRAIN_CONFIG = {"local-epochs": 1, "batch-size": 32, "learning-rate": 0.05, "optimizer": "sgd",
                "momentum": 0.0, "weight-decay": 0.0, "server-round": 1,
                "dp-sgd-noise-multiplier": 1.0, "dp-sgd-max-grad-norm": 1.0, "dp-delta": 1e-5}


@fuzz(100)
@given(data=st.data())
def test_train_config_sent_by_the_server(data):
    from clients.dp_sgd_config import DPSGDConfig
    from clients.training import TrainConfig

    config = data.draw(mutated_json(TRAIN_CONFIG).filter(lambda c: isinstance(c, dict)))
    tc = attempt(lambda: TrainConfig.from_config(config), ValueError)
    if not refused(tc):
        assert tc.local_epochs >= 1 and tc.batch_size >= 1 and tc.optimizer in ("sgd", "adam")
        for value in (tc.learning_rate, tc.momentum, tc.weight_decay):
            assert math.isfinite(value) and value >= 0
    dp = attempt(lambda: DPSGDConfig.from_config(config), ValueError)
    if not refused(dp) and dp is not None:
        assert all(math.isfinite(v) and v > 0 for v in
                   (dp.noise_multiplier, dp.max_grad_norm, dp.delta))
