"""``fedapp predict`` and ``fedapp infer ...``: plaintext and secure prediction.

``fedapp predict --secure`` starts the five parties as separate processes on
loopback with a fresh CA; ``fedapp infer ROLE`` starts one party, for parties on
separate machines.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .channel import InferenceError
from .ring import DEFAULT_FRACTION_BITS

ADDRESS_HELP = "HOST:PORT the computing party {} listens on"


def write_predictions(path: Path, predictions: np.ndarray) -> None:
    """One prediction per line, written whole or not at all."""
    tmp = path.with_name(path.name + ".part")
    values = predictions if predictions.dtype.kind == "f" else predictions.astype(np.int64)
    tmp.write_text("".join(f"{v}\n" for v in values.tolist()))
    tmp.replace(path)


def _model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", required=True, help="model.npz of a run directory (its "
                    "config.json says the task; housing also needs standardization.npz)")
    sp.add_argument("--task", choices=["mnist", "spam", "housing"],
                    help="the model's task when no config.json is beside it")
    sp.add_argument("--mnist-model", choices=["cnn", "small-cnn"], help="with --task mnist")
    sp.add_argument("--spam-buckets", type=int, help="with --task spam")


def _query_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--inputs", required=True, help="queries: mnist .npy or IDX images, "
                    "housing CSV rows, spam .txt (one email per line) or a directory of .txt")
    sp.add_argument("--out", required=True, help="file to write, one prediction per line")


def _timing(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the "
                    "other parties to connect, then for each message (the owners and the "
                    "dealer wait for the end of the answers without a limit)")


def _load_model(args: argparse.Namespace):
    from .program import compile_model
    from .queries import load_trained

    task, model, standardization = load_trained(Path(args.model), args.task,
                                                args.mnist_model, args.spam_buckets)
    plan, weights = compile_model(model, task, standardization)
    return task, model, standardization, plan, weights


def cmd_predict(args: argparse.Namespace) -> int:
    from .queries import predict_plain, read_queries

    if args.secure:
        return run_local_session(args)
    task, model, standardization, plan, _ = _load_model(args)
    buckets = plan["input_shape"][0] if task == "spam" else 0
    queries = read_queries(task, Path(args.inputs), buckets)
    write_predictions(Path(args.out), predict_plain(task, model, standardization, queries))
    print(f"wrote {len(queries)} predictions to {args.out}")
    return 0


def run_local_session(args: argparse.Namespace) -> int:
    """All five parties as processes on loopback, each its own program; the data
    owner writes ``--out``. Prints every party's lines and a JSON summary last."""
    from fedapp.certificates import make_party_certificates
    from fedapp.launch import free_port

    addresses = {"p0": f"127.0.0.1:{free_port()}", "p1": f"127.0.0.1:{free_port()}"}
    with tempfile.TemporaryDirectory(prefix="fedapp-infer-") as tmp:
        certs = Path(tmp)
        make_party_certificates(certs, {"p0": ["127.0.0.1"], "p1": ["127.0.0.1"], "dealer": [],
                                        "model-owner": [], "data-owner": []})
        common = ["--certs", str(certs), "--timeout", str(args.timeout)]
        both = ["--p0", addresses["p0"], "--p1", addresses["p1"]]
        model = ["--model", args.model] + sum(([f"--{k}", str(v)] for k, v in (
            ("task", args.task), ("mnist-model", args.mnist_model),
            ("spam-buckets", args.spam_buckets)) if v), [])
        commands = {
            "p0": ["p0", "--listen", addresses["p0"]],
            "p1": ["p1", "--listen", addresses["p1"], "--p0", addresses["p0"]],
            "dealer": ["dealer", *both],
            "model-owner": ["model-owner", *both, *model,
                            "--fraction-bits", str(args.fraction_bits)],
            "data-owner": ["data-owner", *both, "--inputs", args.inputs, "--out", args.out,
                           "--batch-size", str(args.batch_size)]
                          + (["--task", args.task] if args.task else ["--model", args.model]),
        }
        start = time.monotonic()
        procs, summaries = {}, {}
        for role, cmd in commands.items():
            procs[role] = subprocess.Popen(
                [sys.executable, "-m", "fedapp.cli", "infer", *cmd, *common],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)

        def relay(role: str, stream) -> None:
            for line in stream:
                if line.startswith("{"):
                    try:
                        summaries[role] = json.loads(line)
                        continue
                    except ValueError:
                        pass
                print(f"[{role}] {line}", end="", flush=True)

        relays = [threading.Thread(target=relay, args=(r, p.stdout), daemon=True)
                  for r, p in procs.items()]
        for t in relays:
            t.start()
        try:
            codes = {}  # each party ends itself on its own timeout
            while len(codes) < len(procs):
                for role, proc in procs.items():
                    if role not in codes and proc.poll() is not None:
                        codes[role] = proc.returncode
                if any(codes.values()):
                    break
                time.sleep(0.05)
        finally:
            for role, proc in procs.items():  # a party that failed ends the others
                if proc.poll() is None:
                    time.sleep(1.0)  # let aborts arrive before stopping what is left
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            for t in relays:
                t.join(timeout=5)
        seconds = time.monotonic() - start
    failed = {r: p.returncode for r, p in procs.items() if p.returncode}
    summary = {"seconds": round(seconds, 3), "ok": not failed, "failed": failed, **summaries}
    print(json.dumps(summary))
    return 1 if failed else 0


def cmd_infer(args: argparse.Namespace) -> int:
    from . import parties
    from fedapp.certificates import make_party_certificates

    if args.role == "certs":
        hosts = {"p0": args.p0_host, "p1": args.p1_host, "dealer": [], "model-owner": [],
                 "data-owner": []}
        make_party_certificates(Path(args.out), hosts, args.days)
        print(f"wrote the session's CA and party certificates to {args.out}: give each party "
              "ca.crt and its own ROLE.pem and ROLE.key, then delete the directory")
        return 0
    certs, start = Path(args.certs), time.monotonic()
    log = lambda line: print(line, flush=True)  # noqa: E731
    figures: dict = {}
    try:
        if args.role in ("p0", "p1"):
            figures = parties.computing_party(int(args.role[1]), args.listen, certs,
                                              getattr(args, "p0", None), args.timeout, log)
        elif args.role == "dealer":
            figures = parties.dealer(certs, args.p0, args.p1, args.timeout, log)
        elif args.role == "model-owner":
            _, _, _, plan, weights = _load_model(args)
            parties.model_owner(certs, args.p0, args.p1, plan, weights, args.fraction_bits,
                                args.timeout, log)
        else:
            from .queries import read_queries

            task = args.task
            if task is None:  # the data owner may read the task from a run's config
                task = _load_model(args)[0]
            read_queries(task, Path(args.inputs), 2)  # a malformed file stops us here

            def queries(plan: dict) -> np.ndarray:  # spam: the model's buckets, from the plan
                return read_queries(task, Path(args.inputs), plan["input_shape"][0])

            predictions = parties.data_owner(certs, args.p0, args.p1, task, queries,
                                             args.batch_size, args.timeout, log)
            write_predictions(Path(args.out), predictions)
            log(f"data-owner: wrote {len(predictions)} predictions to {args.out}")
            figures = {"queries": len(predictions)}
    except InferenceError as err:
        print(f"fedapp infer {args.role}: {err}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({**figures, "seconds": round(time.monotonic() - start, 3)}), flush=True)
    return 0


def add_commands(command) -> None:  # noqa: ANN001 - cli.build_parser's factory
    """Add ``predict`` and ``infer`` to fedapp's parser."""
    s = command("predict", "predictions from a trained model, in plaintext or on secret "
                "shares (--secure)",
                "Answer queries with a trained model. With --secure the model owner, the "
                "data owner, two computing parties and a dealer run as five processes on "
                "loopback over mutual TLS: the computing parties see only secret shares of "
                "the model and the queries, and only the data owner learns the predictions. "
                "See docs/inference.md.",
                "  fedapp predict --model runs/RUN/model.npz --inputs digits.npy --out p.txt\n"
                "  fedapp predict --secure --model runs/RUN/model.npz --inputs digits.npy "
                "--out p.txt")
    _model_args(s)
    _query_args(s)
    s.add_argument("--secure", action="store_true", help="on secret shares, five processes")
    s.add_argument("--fraction-bits", type=int, default=DEFAULT_FRACTION_BITS,
                   help="with --secure: fixed-point fraction bits")
    s.add_argument("--batch-size", type=int, default=100, help="with --secure: queries per "
                   "batch")
    _timing(s)
    s.set_defaults(func=cmd_predict)

    s = command("infer", "one party of a secure prediction session (separate machines)",
                "Run one party of a secure prediction: the computing parties p0 and p1 "
                "listen; the dealer, the model owner and the data owner connect to both. "
                "First make the certificates (fedapp infer certs) and give each party ca.crt "
                "and its own ROLE.pem and ROLE.key.",
                "  fedapp infer certs --out certs --p0-host 10.0.0.1 --p1-host 10.0.0.2\n"
                "  fedapp infer p0 --listen 0.0.0.0:7000 --certs certs\n"
                "  fedapp infer p1 --listen 0.0.0.0:7001 --p0 10.0.0.1:7000 --certs certs\n"
                "  fedapp infer dealer --p0 10.0.0.1:7000 --p1 10.0.0.2:7001 --certs certs\n"
                "  fedapp infer model-owner --p0 10.0.0.1:7000 --p1 10.0.0.2:7001 "
                "--certs certs --model runs/RUN/model.npz\n"
                "  fedapp infer data-owner --p0 10.0.0.1:7000 --p1 10.0.0.2:7001 "
                "--certs certs --task mnist --inputs digits.npy --out predictions.txt")
    roles = s.add_subparsers(dest="role", required=True, help="the party to run (or certs)")
    r = roles.add_parser("certs", help="the session's CA and a certificate per party",
                         formatter_class=s.formatter_class)
    r.add_argument("--out", required=True, help="new directory for the files")
    r.add_argument("--p0-host", action="append", default=["127.0.0.1"],
                   help="a host name or IP p0 is reached at (repeatable)")
    r.add_argument("--p1-host", action="append", default=["127.0.0.1"],
                   help="a host name or IP p1 is reached at (repeatable)")
    r.add_argument("--days", type=int, default=30, help="validity of the certificates")
    for role in ("p0", "p1", "dealer", "model-owner", "data-owner"):
        r = roles.add_parser(role, help=f"run the {role}", formatter_class=s.formatter_class)
        r.add_argument("--certs", required=True, help="directory with ca.crt and this "
                       f"party's {role}.pem and {role}.key")
        if role in ("p0", "p1"):
            r.add_argument("--listen", required=True, help=ADDRESS_HELP.format(role))
        if role != "p0":
            r.add_argument("--p0", required=True, help=ADDRESS_HELP.format("p0"))
        if role not in ("p0", "p1"):
            r.add_argument("--p1", required=True, help=ADDRESS_HELP.format("p1"))
        if role == "model-owner":
            _model_args(r)
            r.add_argument("--fraction-bits", type=int, default=DEFAULT_FRACTION_BITS,
                           help="fixed-point fraction bits")
        if role == "data-owner":
            r.add_argument("--task", choices=["mnist", "spam", "housing"],
                           help="what the queries are (or --model to read it from a run)")
            r.add_argument("--model", help="a run's model.npz: only its config.json is read")
            r.add_argument("--mnist-model", help=argparse.SUPPRESS)
            r.add_argument("--spam-buckets", type=int, help=argparse.SUPPRESS)
            _query_args(r)
            r.add_argument("--batch-size", type=int, default=100, help="queries per batch")
        _timing(r)
    s.set_defaults(func=cmd_infer)
