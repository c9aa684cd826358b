"""Secure against plaintext prediction, side by side in one run, with real processes.

    python scripts/bench_inference.py [--models small-cnn cnn spam housing]
        [--model-dir NAME=DIR ...] [--images 1000] [--batch1-images small-cnn=100 cnn=20]
        [--batch-size 100] [--data-dir ../shared/data] [--workdir DIR] [--seed 0] [--quick]

For each model (``small-cnn`` and ``cnn`` are the two MNIST models):

1. **The model.** A run directory given with ``--model-dir NAME=DIR`` (``model.npz``,
   ``config.json`` and, for housing, ``standardization.npz``), or else one trained here
   centrally on the task's whole training split, as a stand-in for a federated run's model:
   the same architecture and the same file layout, so ``fedapp predict`` reads it as it
   reads a run's. MNIST: 1 epoch of SGD, learning rate 0.05, batch 32; spam: 1 epoch of
   Adam(W), learning rate 0.01, batch 32, ``--spam-buckets`` hashed buckets; housing: Adam(W),
   learning rate 0.003, weight decay 0.1, batch 16, ``--housing-epochs`` epochs on features
   and target standardized with the training rows' population mean and std (what the
   federated statistics pass computes), saved as ``standardization.npz``. Everything is
   seeded with ``--seed``; spam's held-out split uses it too (a run directory's own
   ``seed`` for a given model).
2. **The queries**, from the held-out test split, with their labels or targets kept here
   and never given to the prediction commands. MNIST: the first ``--images`` test digits
   as a uint8 ``.npy`` (N, 28, 28); spam: every test email, its raw text one per line
   (checked: the bucket sets ``read_queries`` makes of the file must equal the test
   split's, or the benchmark stops); housing: every test row's 13 raw features as CSV.
3. **Plaintext and secure prediction** as subprocesses, ``python -m fedapp.cli predict``
   and ``... predict --secure`` (five party processes on loopback over mutual TLS), with
   ``--batch-size`` queries per batch; for MNIST also batch size 1 on the first
   ``--batch1-images`` digits.

Reported per model and batch size: queries; the fraction of identical predictions
(labels equal; housing: within 0.01 of the plaintext price, and the largest absolute
difference, in $1000s); plaintext and secure accuracy (MNIST, spam) or RMSE (housing);
latency per query (p0's answering seconds / queries); throughput (queries / p0's
answering seconds); the whole session's seconds (process start, TLS connections, model
sharing, answering); bytes exchanged per query (p0 to p1 + p1 to p0 + dealer to p1,
over queries).

One line per result as it comes, then a JSON summary as the last line of output. The
parties share this machine's cores: compare figures measured on the same machine.
``--quick`` is a smoke run (50 digits, small-cnn and housing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from clients import loaders  # noqa: E402
from clients.examples import ArrayExamples, BagExamples  # noqa: E402
from clients.models import save_npz  # noqa: E402
from clients.partition import PartitionSpec  # noqa: E402
from clients.standardize import combine_stats, local_stats  # noqa: E402
from clients.tasks import DataSpec, _pool, build_model, load_central_test  # noqa: E402
from clients.training import TrainConfig, train  # noqa: E402
from fedapp.inference.queries import load_trained, read_queries  # noqa: E402
from fedapp.outputs import STANDARDIZATION_FILE  # noqa: E402

#: Benchmark name -> (task, mnist-model).
MODELS = {"small-cnn": ("mnist", "small-cnn"), "cnn": ("mnist", "cnn"),
          "spam": ("spam", "cnn"), "housing": ("housing", "cnn")}
DEFAULT_BATCH1 = {"small-cnn": 100, "cnn": 20}
HOUSING_COLUMNS = ["CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX",
                   "PTRATIO", "B", "LSTAT"]
HOUSING_TOLERANCE = 0.01  # $1000s: a secure price this close to the plaintext one counts
GOAL = 0.999


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


@dataclass
class Queries:
    """One query file and what the benchmark keeps to score the answers."""

    path: Path
    truth: np.ndarray  # labels (mnist, spam) or prices (housing)


# ------------------------------------------------------------------------ models
def train_model(name: str, spec: DataSpec, out: Path, seed: int, housing_epochs: int
                ) -> Path:
    """Train ``name`` centrally on its task's training split and save a run-like directory.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    spec : DataSpec
        The task, data directory, architecture and buckets; ``spec.partition.seed``
        chooses spam's held-out split.
    out : Path
        Directory to create: ``model.npz``, ``config.json`` and, for housing,
        ``standardization.npz``.
    seed : int
        Seeds the initial weights and the minibatch order.
    housing_epochs : int
        Epochs for housing (the other tasks train for one).

    Returns
    -------
    Path
        The saved ``model.npz``.
    """
    task = spec.task
    train_set, _, _ = _pool(task, spec.resolved_source, spec.data_dir, spec.spam_buckets,
                            spec.partition.seed)
    torch.manual_seed(seed)
    model = build_model(spec)
    config: dict[str, Any] = {"task": task, "mnist-model": spec.mnist_model,
                              "spam-buckets": spec.spam_buckets, "seed": seed,
                              "trained-by": "scripts/bench_inference.py (central stand-in)"}
    out.mkdir(parents=True, exist_ok=True)
    if task == "mnist":
        tc, loss_fn = TrainConfig(1, 32, 0.05, "sgd"), nn.CrossEntropyLoss()
    elif task == "spam":
        tc, loss_fn = TrainConfig(1, 32, 0.01, "adam"), nn.BCEWithLogitsLoss()
    else:
        mean, std = combine_stats([local_stats(np.c_[train_set.x, train_set.y])],
                                  train_set.x.shape[1] + 1)
        np.savez(out / STANDARDIZATION_FILE, mean=mean, std=std)
        train_set = ArrayExamples(((train_set.x - mean[:-1]) / std[:-1]).astype(np.float32),
                                  ((train_set.y - mean[-1]) / std[-1]).astype(np.float32))
        tc = TrainConfig(housing_epochs, 16, 0.003, "adam", weight_decay=0.1)
        loss_fn = nn.MSELoss()
    config.update({"local-epochs": tc.local_epochs, "batch-size": tc.batch_size,
                   "learning-rate": tc.learning_rate, "optimizer": tc.optimizer,
                   "weight-decay": tc.weight_decay})
    start = time.monotonic()
    loss = train(model, train_set, loss_fn, tc, torch.device("cpu"), seed)
    save_npz(model, out / "model.npz")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    log(f"{name}: trained on {len(train_set)} rows in {time.monotonic() - start:.1f} s "
        f"(mean training loss {loss:.4f})")
    return out / "model.npz"


def given_model(name: str, directory: Path) -> tuple[Path, dict]:
    """A run directory's ``model.npz`` and ``config.json``, checked against ``name``.

    Raises
    ------
    SystemExit
        If the directory's model is for another task or architecture, or unreadable.
    """
    model_path = directory / "model.npz"
    task, mnist_model = MODELS[name]
    try:
        found, _, _ = load_trained(model_path)
    except Exception as err:  # noqa: BLE001 - InferenceError and a malformed config alike
        raise SystemExit(f"--model-dir {name}={directory}: {err}") from None
    config = json.loads((directory / "config.json").read_text())
    if found != task or (task == "mnist" and config.get("mnist-model", "cnn") != mnist_model):
        raise SystemExit(f"--model-dir {name}={directory} holds a {found} "
                         f"{config.get('mnist-model', '')} model, not {name}")
    return model_path, config


# ----------------------------------------------------------------------- queries
def mnist_queries(spec: DataSpec, work: Path, count: int) -> Queries:
    """The first ``count`` held-out test digits as a uint8 ``.npy`` (N, 28, 28)."""
    path = loaders.find_file(Path(spec.data_dir), "mnist", "t10k-images-idx3-ubyte.gz",
                             "t10k-images-idx3-ubyte")
    if path is None:
        raise SystemExit(loaders.missing_data_message("mnist", spec.data_dir))
    images = loaders.read_idx(path)[:count]
    test = load_central_test(spec).subset(np.arange(len(images)))
    if not np.array_equal(loaders.mnist_examples(images, test.y).x, test.x):
        raise SystemExit(f"{path}: the images differ from the held-out test split")
    out = work / f"mnist-{count}.npy"
    np.save(out, np.ascontiguousarray(images, dtype=np.uint8))
    return Queries(out, test.y.astype(np.int64))


def spam_queries(spec: DataSpec, work: Path) -> Queries:
    """Every held-out test email's raw text, one per line, checked against the split.

    The emails and the split are those of ``loaders.load_spam_files`` (ham then spam,
    ``spec.partition.seed``'s permutation, the first tenth held out); the file must give
    ``read_queries`` exactly the test split's bucket sets.

    Raises
    ------
    SystemExit
        If the file's bucket sets (or their count) differ from the test split's.
    """
    data_dir = Path(spec.data_dir)
    files = [loaders.find_file(data_dir, "enron-spam", f"{k}.txt", f"{k}.txt.gz")
             for k in ("ham", "spam")]
    if None in files:
        raise SystemExit(loaders.missing_data_message("spam", spec.data_dir))
    lines = [line for f in files for line in loaders.read_lines(f)]  # type: ignore[arg-type]
    held_out = np.sort(np.random.default_rng(spec.partition.seed).permutation(len(lines))
                       [: int(len(lines) * 0.1)])
    out = work / f"spam-test-seed{spec.partition.seed}.txt"
    out.write_text("".join(lines[i] + "\n" for i in held_out), encoding="utf-8")
    test = load_central_test(spec)
    assert isinstance(test, BagExamples)
    rows = read_queries("spam", out, spec.spam_buckets)
    if len(rows) != len(test):
        raise SystemExit(f"{out}: read_queries finds {len(rows)} emails, the test split "
                         f"has {len(test)}")
    differ = [i for i in range(len(test)) if not np.array_equal(np.flatnonzero(rows[i]),
                                                                test.bag(i))]
    if differ:
        raise SystemExit(f"{out}: {len(differ)} emails (the first is line {differ[0] + 1}) "
                         "hash to other bucket sets than the test split's")
    log(f"spam: {len(test)} test emails written; their bucket sets match the split's")
    return Queries(out, test.y.astype(np.int64))


def housing_queries(spec: DataSpec, work: Path) -> Queries:
    """Every held-out test row's 13 raw features as a CSV with a header line."""
    test = load_central_test(spec)
    out = work / "housing-test.csv"
    rows = [",".join(str(v) for v in row) for row in test.x]  # float32's shortest repr
    out.write_text(",".join(HOUSING_COLUMNS) + "\n" + "\n".join(rows) + "\n")
    return Queries(out, test.y.astype(np.float64))


# ------------------------------------------------------------------- prediction
def run_cli(args: list[str], log_path: Path, timeout: float) -> tuple[int, str, float]:
    """``python -m fedapp.cli ARGS``: return code, its output and wall-clock seconds.

    The output also goes to ``log_path``. A stopped benchmark stops the command (which
    stops the parties it started).
    """
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    start = time.monotonic()
    with subprocess.Popen([sys.executable, "-m", "fedapp.cli", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            output, _ = proc.communicate()
            output += f"\n(bench_inference: stopped after {timeout:.0f} s)\n"
        finally:
            if proc.poll() is None:  # SystemExit from SIGTERM, or Ctrl-C
                proc.terminate()
                proc.wait()
    log_path.write_text(output)
    return proc.returncode, output, time.monotonic() - start


def read_predictions(path: Path, task: str) -> np.ndarray:
    """The predictions ``fedapp predict`` wrote, one per line."""
    values = path.read_text().split()
    return np.array(values, dtype=np.float64 if task == "housing" else np.int64)


def score(task: str, predictions: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy (mnist, spam) or RMSE in $1000s (housing)."""
    if task == "housing":
        return float(np.sqrt(np.mean((predictions - truth) ** 2)))
    return float(np.mean(predictions == truth))


def last_json(output: str) -> dict | None:
    """The JSON object on the output's last non-empty line, if there is one."""
    lines = [line for line in output.splitlines() if line.strip()]
    try:
        report = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None


def secure_result(name: str, task: str, model: Path, queries: Queries, count: int,
                  batch: int, plain: np.ndarray, work: Path, timeout: float
                  ) -> dict[str, Any]:
    """Run ``fedapp predict --secure`` on ``queries`` and compare it with ``plain``.

    Parameters
    ----------
    name, task : str
        The benchmark's model name and its task.
    model : Path
        The ``model.npz`` to serve.
    queries : Queries
        The query file (``count`` rows) and its labels or targets.
    count : int
        Number of queries in the file.
    batch : int
        Queries per batch.
    plain : np.ndarray
        The plaintext predictions of the same rows.
    work : Path
        Where the predictions and the session's log go.
    timeout : float
        ``--timeout`` of the session: seconds per message, but the model owner's wait
        for the end spans the whole answering phase, and ``fedapp predict`` stops a
        session after four times this (as does this script, with two minutes more).

    Returns
    -------
    dict
        One result row of the summary.
    """
    out = work / f"{name}-secure-b{batch}.txt"
    code, output, wall = run_cli(
        ["predict", "--secure", "--model", str(model), "--inputs", str(queries.path),
         "--out", str(out), "--batch-size", str(batch), "--timeout", str(timeout)],
        work / f"{name}-secure-b{batch}.log", 4 * timeout + 120)
    report = last_json(output) or {}
    result: dict[str, Any] = {"model": name, "task": task, "batch-size": batch,
                              "queries": count, "ok": bool(code == 0 and report.get("ok"))}
    if not result["ok"] or not out.is_file():
        result.update(ok=False, error=f"exit code {code}", **{"log-tail": output[-1500:]})
        return result
    secure = read_predictions(out, task)
    p0, p1, dealer = report["p0"], report["p1"], report["dealer"]
    answer = float(p0["answer-seconds"])
    if task == "housing":
        error = np.abs(secure - plain)
        result["identical"] = float(np.mean(error <= HOUSING_TOLERANCE))
        result["max-abs-error"] = float(error.max())
        result["plaintext-rmse"] = score(task, plain, queries.truth)
        result["secure-rmse"] = score(task, secure, queries.truth)
    else:
        result["identical"] = float(np.mean(secure == plain))
        result["plaintext-accuracy"] = score(task, plain, queries.truth)
        result["secure-accuracy"] = score(task, secure, queries.truth)
    exchanged = p0["bytes-to-peer"] + p1["bytes-to-peer"] + dealer["bytes-to-p1"]
    result.update({
        "seconds-per-query": round(answer / count, 6),
        "queries-per-second": round(count / answer, 3) if answer > 0 else None,
        "answer-seconds": answer,
        "session-seconds": report["seconds"],
        "bytes-per-query": round(exchanged / count),
        "bytes-total": exchanged,
    })
    return result


def describe(r: dict[str, Any]) -> str:
    """One readable line for a result row."""
    head = f"{r['model']:>9} batch {r['batch-size']:>3}, {r['queries']:>5} queries:"
    if not r["ok"]:
        return f"{head} FAILED ({r.get('error')})"
    if r["task"] == "housing":
        quality = (f"RMSE plain {r['plaintext-rmse']:.3f} / secure {r['secure-rmse']:.3f}, "
                   f"max |diff| {r['max-abs-error']:.4f}")
    else:
        quality = (f"accuracy plain {r['plaintext-accuracy']:.4f} / secure "
                   f"{r['secure-accuracy']:.4f}")
    return (f"{head} identical {r['identical']:.4f}; {quality}; "
            f"{1000 * r['seconds-per-query']:.1f} ms/query, {r['queries-per-second']:.1f} "
            f"queries/s, session {r['session-seconds']:.1f} s, "
            f"{r['bytes-per-query'] / 1e6:.3f} MB/query")


# -------------------------------------------------------------------------- main
def prepare_model(name: str, directory: Path | None, args: argparse.Namespace,
                  data_dir: str, work: Path) -> tuple[Path, DataSpec]:
    """The ``model.npz`` to benchmark as ``name`` (given, or trained here) and its data.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    directory : Path or None
        A run directory given with ``--model-dir``, or None to train a model.
    args : argparse.Namespace
        The command line (``seed``, ``spam_buckets``, ``housing_epochs``).
    data_dir : str
        The data sets' directory.
    work : Path
        The benchmark's work directory (trained models go to ``models/NAME``).

    Returns
    -------
    tuple
        The model file, and the data spec whose held-out split the queries come from
        (spam's split follows a given run's ``seed``, else ``--seed``).
    """
    task, mnist_model = MODELS[name]
    buckets, split_seed = args.spam_buckets, args.seed
    if directory is not None:
        model, config = given_model(name, directory)
        split_seed = int(config.get("seed", 42))  # the run's held-out split
        buckets = int(config.get("spam-buckets", 65536))  # as load_trained reads it
        log(f"{name}: using {model}")
    spec = DataSpec(task=task, source="files", data_dir=data_dir, mnist_model=mnist_model,
                    spam_buckets=buckets, partition=PartitionSpec(seed=split_seed))
    if directory is None:
        model = train_model(name, spec, work / "models" / name, args.seed, args.housing_epochs)
    return model, spec


def plain_predictions(name: str, task: str, model: Path, queries: Queries, work: Path,
                      timeout: float) -> np.ndarray:
    """``fedapp predict`` (plaintext) on ``queries``.

    Raises
    ------
    SystemExit
        If the command fails: without plaintext predictions nothing can be compared.
    """
    out = work / f"{name}-plain-{queries.path.stem}.txt"
    code, output, wall = run_cli(["predict", "--model", str(model), "--inputs",
                                  str(queries.path), "--out", str(out)],
                                 work / f"{name}-plain-{queries.path.stem}.log", timeout)
    if code != 0:
        raise SystemExit(f"{name}: plaintext prediction failed ({code}):\n{output[-1500:]}")
    predictions = read_predictions(out, task)
    log(f"{name}: plaintext predictions of {len(predictions)} queries in {wall:.1f} s "
        "(one process, start included)")
    return predictions


def parse_pairs(values: list[str], what: str, kind: type = str) -> dict[str, Any]:
    """``NAME=VALUE`` arguments as a dict (a bare integer for ``--batch1-images`` means
    every MNIST model)."""
    pairs: dict[str, Any] = {}
    for value in values:
        if "=" not in value and kind is int and value.isdigit():
            pairs.update({k: int(value) for k in DEFAULT_BATCH1})
            continue
        key, sep, rest = value.partition("=")
        if not sep or key not in MODELS:
            raise SystemExit(f"{what}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(MODELS)}, got '{value}'")
        pairs[key] = kind(rest)
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS),
                   help="default: small-cnn cnn spam housing (--quick: small-cnn housing)")
    p.add_argument("--model-dir", action="append", default=[], metavar="NAME=DIR",
                   help="use this run directory's model.npz instead of training one")
    p.add_argument("--images", type=int, help="MNIST test digits to ask (default 1000, "
                   "--quick 50)")
    p.add_argument("--batch1-images", nargs="+", default=[], metavar="NAME=N",
                   help="digits for the batch-size-1 runs (default small-cnn=100 cnn=20; "
                   "--quick 10; 0 skips them)")
    p.add_argument("--batch-size", type=int, default=100, help="queries per secure batch")
    p.add_argument("--spam-buckets", type=int, default=65536)
    p.add_argument("--housing-epochs", type=int, default=200)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--workdir", help="models, queries, predictions and logs (default: a "
                   "temporary directory, kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads for training here")
    p.add_argument("--timeout", type=float, default=900.0, help="the secure sessions' "
                   "--timeout: seconds per message, but the model owner waits for the whole "
                   "answering phase within it, and a session is stopped after 4x this")
    p.add_argument("--quick", action="store_true", help="smoke run: 50 digits, small-cnn "
                   "and housing")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    names = args.models or (["small-cnn", "housing"] if args.quick
                            else ["small-cnn", "cnn", "spam", "housing"])
    images = args.images or (50 if args.quick else 1000)
    batch1 = {k: 10 if args.quick else v for k, v in DEFAULT_BATCH1.items()}
    batch1.update(parse_pairs(args.batch1_images, "--batch1-images", int))
    given = {k: Path(v).resolve() for k, v in parse_pairs(args.model_dir, "--model-dir").items()}
    data_dir = str(Path(args.data_dir).resolve())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-inference-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    np.random.seed(args.seed)
    log(f"work directory {work}")

    began, results = time.monotonic(), []
    mnist_cache: dict[int, Queries] = {}
    for name in names:
        model, spec = prepare_model(name, given.get(name), args, data_dir, work)
        if spec.task == "mnist":
            runs = []
            for count, batch in ((images, args.batch_size),
                                 (min(batch1.get(name, 0), images), 1)):
                if count:
                    if count not in mnist_cache:
                        mnist_cache[count] = mnist_queries(spec, work, count)
                    runs.append((batch, mnist_cache[count], count))
        else:
            queries = (spam_queries if spec.task == "spam" else housing_queries)(spec, work)
            runs = [(args.batch_size, queries, len(queries.truth))]
        plain: dict[Path, np.ndarray] = {}
        for batch, queries, count in runs:
            if queries.path not in plain:
                plain[queries.path] = plain_predictions(name, spec.task, model, queries,
                                                        work, args.timeout)
            log(f"{name}: secure prediction of {count} queries, batch size {batch} ...")
            result = secure_result(name, spec.task, model, queries, count, batch,
                                   plain[queries.path], work, args.timeout)
            results.append(result)
            log(describe(result))

    goal = {name: all(r["ok"] and r["identical"] >= GOAL for r in results if r["model"] == name)
            for name in names}
    print(json.dumps({"benchmark": "inference", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "machine": {"cores": os.cpu_count()}, "seed": args.seed,
                      "seconds": round(time.monotonic() - began, 1), "workdir": str(work),
                      "results": results, "goal": {f"identical >= {GOAL}": goal}}))
    return 0 if all(goal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
