"""Private inference in one process: the three computing roles in threads linked by
queues (the protocols exactly as the parties run them, without sockets), and the five
real party functions in threads over real TLS sockets."""

from __future__ import annotations

import queue
import secrets
import threading

import numpy as np

from fedapp.inference.correlations import DEALER, Correlations
from fedapp.inference.engine import Engine
from fedapp.inference.program import evaluate, load_weights
from fedapp.inference.ring import Prg, split


def make_engines(seed0: bytes | None = None, seed1: bytes | None = None):
    seed0, seed1 = seed0 or secrets.token_bytes(32), seed1 or secrets.token_bytes(32)
    to_p1: queue.Queue = queue.Queue()
    links = [queue.Queue(), queue.Queue()]

    def exchange(me: int):
        def run(arrays):
            links[1 - me].put([a.copy() for a in arrays])
            return links[me].get(timeout=60)
        return run

    dealer = Engine(DEALER, Correlations(DEALER, Prg(seed0), Prg(seed1), send=to_p1.put))
    p0 = Engine(0, Correlations(0, prg0=Prg(seed0)), exchange(0))
    p1 = Engine(1, Correlations(1, prg1=Prg(seed1), receive=lambda: to_p1.get(timeout=60)),
                exchange(1))
    return dealer, p0, p1


def run_parties(dealer, p0, p1, job):
    """Run ``job(engine)`` for the dealer first, then both parties concurrently."""
    job(dealer)
    results, errors = {}, []

    def work(engine, i):
        try:
            results[i] = job(engine)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e, i)) for i, e in enumerate((p0, p1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results[0], results[1]


def secure_predict(plan: dict, weight_words: list[np.ndarray], input_words: np.ndarray,
                   fraction_bits: int) -> np.ndarray:
    """Reconstructed output words of ``plan`` on the inputs, through the real protocols."""
    dealer, p0, p1 = make_engines()
    prg = Prg(secrets.token_bytes(32))
    w_shares = [split(w, prg) for w in weight_words]
    x0, x1 = split(input_words, prg)

    def job(engine):
        if engine.dealer:
            load_weights(engine, plan, [None] * len(w_shares))
            return evaluate(engine, plan, np.zeros_like(input_words), fraction_bits)
        load_weights(engine, plan, [s[engine.party] for s in w_shares])
        return evaluate(engine, plan, (x0, x1)[engine.party], fraction_bits)

    out0, out1 = run_parties(dealer, p0, p1, job)
    return out0 + out1


ROLES_HOSTS = {"p0": ["127.0.0.1"], "p1": ["127.0.0.1"], "dealer": [], "model-owner": [],
               "data-owner": []}


def networked_session(certs, plan: dict, weights: list[np.ndarray], task: str,
                      queries: np.ndarray, fraction_bits: int, batch_size: int = 100,
                      timeout: float = 30.0, spy=None):
    """The five real party functions in threads of this process, over real TLS sockets
    on loopback. Returns ``(predictions or None, {role: exception})``."""
    from fedapp.inference import parties
    from fedapp.launch import free_port

    a0, a1 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    quiet = lambda line: None  # noqa: E731
    jobs = {
        "p0": lambda: parties.computing_party(0, a0, certs, None, timeout, quiet),
        "p1": lambda: parties.computing_party(1, a1, certs, a0, timeout, quiet),
        "dealer": lambda: parties.dealer(certs, a0, a1, timeout, quiet),
        "model-owner": lambda: parties.model_owner(certs, a0, a1, plan, weights, fraction_bits,
                                                   timeout, quiet),
        "data-owner": lambda: parties.data_owner(certs, a0, a1, task, queries, batch_size,
                                                 timeout, quiet),
    }
    if spy is not None:
        jobs.update(spy(a0, a1, jobs))
    results, errors = {}, {}

    def work(role):
        try:
            results[role] = jobs[role]()
        except BaseException as exc:  # collected for the test
            errors[role] = exc

    threads = {r: threading.Thread(target=work, args=(r,), name=r, daemon=True) for r in jobs}
    for t in threads.values():
        t.start()
    for t in threads.values():
        t.join(timeout * 3)
    return results.get("data-owner"), errors
