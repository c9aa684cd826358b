"""The Message-API ServerApp: weighted FedAvg with outputs in a run directory."""

from __future__ import annotations

import json
import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from clients.models import HOUSING_FEATURES, get_weights, set_weights
from clients.numpy_clients import CLIENTS
from clients.standardize import combine_stats, encode_floats, read_stats
from clients.tasks import build_model, load_central_test
from strategies.paillier_protocol import EncryptedModel
from strategies.threshold_protocol import is_sealed, sealed_run
from strategies.records import array_record, record_arrays
from strategies.screening import RoundWatch

from .checkpoint import Checkpoint, CheckpointError, check_compatible
from .config import RunSettings
from .modes import mode_of
from .outputs import RunRecorder
from .polling import PollingGrid
from .rounds import run_rounds
from .strategy import build_strategy

app = ServerApp()


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Node ids once at least ``minimum`` are connected (or raise after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    said = None
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {minimum} nodes connected in {timeout:.0f} s")
        if said != len(nodes):  # each time the count changes
            log(INFO, "Waiting for %d nodes, %d connected", minimum, len(nodes))
            said = len(nodes)
        time.sleep(1)
    return nodes


def federated_normalization(grid: Grid, settings: RunSettings) -> dict[str, bytes]:
    """Ask every node for its row count, sums and sums of squares; return the
    population mean and std as config entries (``norm-mean``, ``norm-std``)."""
    nodes = wait_for_nodes(grid, max(1, settings.min_available_nodes), settings.round_timeout)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="query")
                for n in nodes]
    reports, watch = [], RoundWatch(1)
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            watch.node_failed(node, reply.error.reason, "statistics")
            continue
        if "properties" not in reply.content.config_records:
            watch.node_failed(node, "no statistics in the reply", "statistics")
            continue
        report = dict(reply.content.config_records["properties"])
        try:
            read_stats(report, HOUSING_FEATURES + 1)
        except ValueError as err:
            watch.node_failed(node, f"statistics left out: {err}", "statistics")
            continue
        reports.append(report)
    failures = watch.flush()
    if not reports:
        raise RuntimeError("no node sent the statistics for the federated standardization: "
                           + ("; ".join(failures) or "no node answered"))
    mean, std = combine_stats(reports, HOUSING_FEATURES + 1)
    log(INFO, "Federated standardization from %d nodes: %d rows", len(reports),
        sum(int(r["stats-n"]) for r in reports))
    return {"norm-mean": encode_floats(mean), "norm-std": encode_floats(std)}


def make_central_eval(settings: RunSettings, extra_config: dict):
    """Evaluate the global model on the held-out test set, on the server."""
    spec = settings.data_spec(1)
    evaluator = CLIENTS[settings.task](spec, None, load_central_test(spec))

    def central_eval(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        loss, n, metrics = evaluator.evaluate(arrays.to_numpy_ndarrays(), extra_config)
        return MetricRecord({**metrics, "num-examples": n})

    return central_eval


def open_run(settings: RunSettings, run_id: int) -> tuple[RunRecorder, Checkpoint | None]:
    """A new run directory, or with ``resume-from`` the old one and its checkpoint."""
    directory = settings.resolved_resume_dir()
    if directory is None:
        return RunRecorder.create(settings.resolved_run_dir(), settings.task, run_id), None
    checkpoint = Checkpoint.load(directory)
    saved = directory / "config.json"
    if not saved.is_file():
        raise CheckpointError(f"no config.json in {directory}: not a run directory")
    check_compatible(json.loads(saved.read_text()), settings.as_dict(), directory)
    log(INFO, "Resuming %s after round %d", directory, checkpoint.round)
    recorder = RunRecorder.reopen(directory, checkpoint.round)
    recorder.set_status("running", "resumed", publish=False)
    return recorder, checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = PollingGrid(grid, pack=True)  # our ClientApp unpacks (fedapp.packing)
    settings = RunSettings.from_run_config(dict(context.run_config))
    recorder, checkpoint = open_run(settings, context.run_id)
    recorder.write_config(settings.as_dict())
    log(INFO, "Run directory: %s", recorder.directory)
    try:
        train(grid, settings, recorder, checkpoint)
    except BaseException as exc:  # the directory says the run failed, and why
        recorder.set_status("failed", f"{type(exc).__name__}: {exc}")
        log(INFO, "The run failed; its status.json and report.html say why")
        log(INFO, "Run directory: %s", recorder.directory)
        raise
    recorder.set_status("completed")
    log(INFO, "Saved the final model, metrics, plot and report.html")
    log(INFO, "Run directory: %s", recorder.directory)


def train(grid: Grid, settings: RunSettings, recorder: RunRecorder,
          checkpoint: Checkpoint | None) -> None:
    """The rounds, with outputs into ``recorder``, from round 1, or after ``checkpoint``."""
    torch.manual_seed(settings.seed)
    model = build_model(settings.data_spec(1))
    if checkpoint is not None:  # scale features as the rounds before did
        extra = checkpoint.config
    else:
        extra = federated_normalization(grid, settings) if settings.task == "housing" else {}
    recorder.save_standardization(extra)
    hidden = mode_of(settings.aggregation).server_sees in ("encrypted", "sealed")  # masked: public
    if hidden and settings.central_eval:
        log(INFO, "Centralized evaluation is off: with Paillier aggregation the server cannot "
            "see the model")
    central_eval = make_central_eval(settings, extra) if settings.central_eval and not hidden \
        else None
    metric = "mse" if settings.task == "housing" else "accuracy"
    strategy = build_strategy(settings)
    arrays = ArrayRecord(get_weights(model))
    if checkpoint is not None:
        arrays = array_record(checkpoint.arrays)
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(checkpoint.strategy)
        if is_sealed(checkpoint.arrays):  # threshold mode: the clients open it in round 1
            inner = getattr(strategy, "strategy", strategy)  # under a DP wrapper
            inner.resumed_run = sealed_run(checkpoint.arrays)

    def on_round(rnd: int, arrays: ArrayRecord, row: dict) -> None:
        recorder.add_round({"round": rnd, **row})
        if rnd > 0:
            state = strategy.state_dict() if hasattr(strategy, "state_dict") else {}
            Checkpoint(rnd, record_arrays(arrays), state, extra).save(recorder.directory)
        shown = {k: row.get(k) for k in ("fed-loss", f"fed-{metric}", f"central-{metric}", "seconds")}
        log(INFO, "Round %d done: %s", rnd, {k: round(v, 4) for k, v in shown.items() if v is not None})

    first = checkpoint.round + 1 if checkpoint else 1
    if first > settings.num_server_rounds:
        log(INFO, "All %d rounds were finished before: nothing to run", settings.num_server_rounds)
    final = run_rounds(
        strategy, grid, arrays, settings.num_server_rounds,
        train_config=ConfigRecord({**settings.train_config(), **extra}),
        evaluate_config=ConfigRecord(extra),
        timeout=settings.round_timeout,
        central_eval=central_eval,
        on_round=on_round,
        first_round=first,
    )
    arrays = record_arrays(final)
    if EncryptedModel.is_encrypted(arrays):  # only key holders can read it: fedapp decrypt
        recorder.save_arrays("model.encrypted.npz", arrays)
    elif is_sealed(arrays):  # only clients (the group key) can read it: fedapp decrypt
        recorder.save_arrays("model.sealed.npz", arrays)
    else:
        set_weights(model, final.to_numpy_ndarrays())
        recorder.save_arrays("model.npz", {k: v.numpy() for k, v in model.state_dict().items()})
