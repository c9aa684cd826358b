"""Every strategy ends the run after ``max_empty_rounds`` rounds in a row without a
usable update (the first one in the secure modes), naming what the nodes said; node
failures are logged once per round and cause (strategies.screening)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from flwr.serverapp.strategy import FedAvg as MessageFedAvg

from fedapp.config import RunSettings
from fedapp.legacy import StandardizingFedAvg
from fedapp.strategy import build_strategy
from strategies.dp_legacy import LegacyCentralDP
from strategies.dp_message import CentralDP
from strategies.fedavg import WeightedFedAvg
from strategies.keyfiles import write_keypair
from strategies.paillier_legacy import LegacyPaillierFedAvg
from strategies.paillier_message import PaillierFedAvg
from strategies.screening import NoUsableUpdate, RoundWatch
from strategies.secagg_legacy import LegacySecAggFedAvg
from tests.helpers import metadata
from tests.helpers.fakes import FakeProxy


def failed(node: int, reason: str = "no key here") -> Message:
    return Message(Error(code=2, reason=reason), metadata=metadata(node))


def good(node: int) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                               "metrics": MetricRecord({"num-examples": 5})}),
                   metadata=metadata(node))


@pytest.fixture(scope="module")
def public_key_file(tmp_path_factory) -> Path:
    public, _, _ = write_keypair(tmp_path_factory.mktemp("keys"))
    return public


@pytest.fixture(scope="module")
def public_key(public_key_file):
    from strategies.keyfiles import load_public_key

    return load_public_key(public_key_file)


def test_round_watch_counts_rounds_in_a_row_and_names_the_causes(flwr_caplog):
    watch = RoundWatch(2)
    watch.node_failed(1, "no key here")
    watch.node_failed(2, "no key here")
    watch.end_round(1, False)
    assert "nodes 1, 2 failed the train stage: no key here" in flwr_caplog.text
    watch.end_round(2, True)  # a good round resets the count
    watch.node_failed(3, "boom", "share")
    watch.end_round(3, False)
    watch.node_failed(4, "slow", "evaluate")  # evaluation failures do not empty a round
    watch.flush()
    with pytest.raises(NoUsableUpdate, match=r"2 round\(s\) in a row.*round 4.*"
                                             r"node 5 failed the train stage: gone$"):
        watch.node_failed(5, "gone")
        watch.end_round(4, False)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_empty_rounds"):
            RoundWatch(bad)


@pytest.mark.parametrize("make, limit", [
    (lambda pk: WeightedFedAvg(), 3),
    (lambda pk: PaillierFedAvg(pk, clip=1.0), 1),
    (lambda pk: CentralDP(WeightedFedAvg(max_empty_rounds=2), noise_multiplier=1.0,
                          clip=1.0), 2),
    (lambda pk: CentralDP(MessageFedAvg(), noise_multiplier=1.0, clip=1.0), 3),
    (lambda pk: CentralDP(PaillierFedAvg(pk, clip=1.0), noise_multiplier=1.0, clip=1.0), 1),
])
def test_message_api_strategies_stop_after_their_limit(public_key, make, limit, task_identity):
    """(Masking: tests/strategies/test_secagg_message.py, where its key stages run.)"""
    strategy = make(public_key)
    replies = [failed(11), failed(12)]
    for rnd in range(1, limit):
        assert strategy.aggregate_train(rnd, replies) == (None, None)
    with pytest.raises(NoUsableUpdate, match="nodes 11, 12 failed the train stage: no key"):
        strategy.aggregate_train(limit, replies)


def test_a_usable_round_resets_the_count(task_identity):
    strategy = WeightedFedAvg(max_empty_rounds=2)
    strategy.aggregate_train(1, [failed(11)])
    arrays, _ = strategy.aggregate_train(2, [good(12)])
    assert arrays is not None
    strategy.aggregate_train(3, [failed(11)])
    with pytest.raises(NoUsableUpdate):
        strategy.aggregate_train(4, [failed(11)])


def fit_failure(node: int) -> tuple[FakeProxy, FitRes]:
    res = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no key here"), Parameters([], ""), 0, {})
    return FakeProxy(node), res


@pytest.mark.parametrize("make, limit", [
    (lambda pk: StandardizingFedAvg(needs_stats=False), 3),
    (lambda pk: LegacyPaillierFedAvg(pk, clip=1.0), 1),
    (lambda pk: LegacyCentralDP(FedAvg(), noise_multiplier=1.0, clip=1.0), 3),
])
def test_legacy_strategies_stop_after_their_limit(public_key, make, limit):
    strategy = make(public_key)
    if isinstance(strategy, StandardizingFedAvg):
        strategy._sent = [np.ones(3, np.float32)]
    failures = [fit_failure(11), fit_failure(12)]
    for rnd in range(1, limit):
        assert strategy.aggregate_fit(rnd, [], failures)[0] is None
    with pytest.raises(NoUsableUpdate, match="nodes 11, 12 failed the train stage: no key"):
        strategy.aggregate_fit(limit, [], failures)


def test_legacy_masking_counts_a_round_its_key_stages_lost(flwr_caplog):
    """Flower's legacy loop calls no aggregate_fit for a round without clients: the
    aborted key stages count there."""
    from flwr.server.client_manager import SimpleClientManager

    class Refusing(FakeProxy):
        def get_properties(self, ins, timeout, group_id):
            raise RuntimeError("no authentication key on this node")

    strategy = LegacySecAggFedAvg(clip=1.0, min_fit_clients=3, min_available_clients=3)
    manager = SimpleClientManager()
    for u in (11, 12, 13):
        manager.register(Refusing(u))
    with pytest.raises(NoUsableUpdate, match="nodes 11, 12, 13 failed the advertise stage: "
                                             "no authentication key on this node"):
        strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(3, np.float32)]), manager)


def test_the_run_setting_reaches_every_strategy(public_key_file):
    public = public_key_file
    for aggregation in ("fedavg", "paillier", "secagg"):
        for dp in (0.0, 1.0):
            settings = RunSettings.from_run_config({
                "aggregation": aggregation, "paillier-public-key": str(public),
                "dp-noise-multiplier": dp, "max-empty-rounds": 4})
            assert build_strategy(settings).watch.max_empty_rounds == 4
    default = {"fedavg": 3, "paillier": 1, "secagg": 1}
    for aggregation, limit in default.items():
        settings = RunSettings.from_run_config({"aggregation": aggregation,
                                                "paillier-public-key": str(public)})
        assert build_strategy(settings).watch.max_empty_rounds == limit
    with pytest.raises(ValueError, match="max-empty-rounds"):
        RunSettings.from_run_config({"max-empty-rounds": 0})
