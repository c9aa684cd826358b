"""The server's per-round checkpoint and resuming (fedapp.checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedapp.checkpoint import FILE, Checkpoint, CheckpointError, check_compatible
from fedapp.config import RunSettings
from strategies.dp_message import CentralDP
from strategies.fedavg import WeightedFedAvg


def test_round_trip_keeps_arrays_dtypes_and_state(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
              "ciphertexts": np.random.default_rng(0).integers(0, 256, (4, 512), dtype=np.uint8),
              "header": np.frombuffer(b'{"k": 1}', dtype=np.uint8)}
    config = {"norm-mean": b"\x00\x01\xff", "empty": b""}
    Checkpoint(3, arrays, {"clip": 0.5, "history": [[1.0, 0.1, 3]]}, config).save(tmp_path)
    back = Checkpoint.load(tmp_path)
    assert back.round == 3 and back.strategy == {"clip": 0.5, "history": [[1.0, 0.1, 3]]}
    assert back.config == config
    assert list(back.arrays) == list(arrays)
    for k, v in arrays.items():
        assert back.arrays[k].dtype == v.dtype and np.array_equal(back.arrays[k], v)
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary file left


def test_a_later_round_replaces_the_earlier(tmp_path):
    for rnd in (1, 2):
        Checkpoint(rnd, {"w": np.full(3, rnd, np.float32)}).save(tmp_path)
    back = Checkpoint.load(tmp_path)
    assert back.round == 2 and back.arrays["w"].tolist() == [2, 2, 2]


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_missing_or_damaged_checkpoints_are_named(tmp_path, content):
    with pytest.raises(CheckpointError, match="no checkpoint.npz"):
        Checkpoint.load(tmp_path)
    (tmp_path / FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        Checkpoint.load(tmp_path)


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / FILE, w=np.array([{"a": 1}], dtype=object),
             __state__=np.frombuffer(b'{"round": 1, "strategy": {}}', np.uint8))
    with pytest.raises(CheckpointError, match="cannot read"):
        Checkpoint.load(tmp_path)


def test_settings_that_must_match_are_listed():
    saved = RunSettings.from_run_config({}).as_dict()
    check_compatible(saved, {**saved, "num-server-rounds": 10, "round-timeout": 5.0}, None)
    with pytest.raises(CheckpointError, match="task: 'mnist' then, 'spam' now"):
        check_compatible(saved, RunSettings.from_run_config({"task": "spam"}).as_dict(), None)


def central_dp() -> CentralDP:
    return CentralDP(WeightedFedAvg(), noise_multiplier=0.8, clip=1.0, adaptive=True,
                     clipped_count_stddev=2.0)


def test_central_dp_state_goes_on_where_it_stopped():
    first = central_dp()
    first._start_dp(100, 10)
    for _ in range(3):
        first.ledger.step()
        first.clipper.update(4, 10)
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint holds
    second = central_dp()
    second.load_state_dict(state)
    assert second.clipper.clip == first.clipper.clip
    assert second.config.sample_rate == first.config.sample_rate == 0.1
    assert second.ledger.epsilon() == first.ledger.epsilon() > 0
    assert second.ledger.step() == first.ledger.step()
    assert central_dp().state_dict() == {}  # before round 1 there is nothing to keep


def test_the_server_app_resumes_only_with_the_runs_settings(tmp_path):
    """What a ServerApp started with ``resume-from`` opens (the refusal used to be
    tested with a whole Flower run; the rounds after a resume still are, in
    tests/runs/test_faults.py)."""
    from fedapp.outputs import RunRecorder
    from fedapp.server_app import open_run

    base = {"task": "housing", "dp-noise-multiplier": 1.0, "dp-clip": 5.0,
            "run-dir": str(tmp_path)}
    first = RunRecorder.create(tmp_path, "housing", 7)
    first.write_config(RunSettings.from_run_config(base).as_dict())
    Checkpoint(2, {"w": np.zeros(3, np.float32)}).save(first.directory)
    resume = {**base, "resume-from": str(first.directory), "num-server-rounds": 4}
    with pytest.raises(CheckpointError, match=r"cannot resume .*dp-clip: 5.0 then, 1.0 now"):
        open_run(RunSettings.from_run_config({**resume, "dp-clip": 1.0}), 8)
    recorder, checkpoint = open_run(RunSettings.from_run_config(resume), 8)
    assert recorder.directory == first.directory and checkpoint.round == 2
    assert recorder.status()["status"] == "running"
