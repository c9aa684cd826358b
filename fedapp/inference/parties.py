"""Each role's part of a secure prediction session, over :mod:`channel` links.

- ``p0`` and ``p1``, the computing parties, listen; ``p1`` also connects to ``p0``.
- The dealer, the model owner and the data owner connect to both.
- The model owner sends ``p0`` a PRG seed and ``p1`` the weights minus what that seed
  draws; the data owner does the same with its queries, batch by batch, and alone adds
  the two output shares. The plan (architecture, precision, batch sizes) is public:
  ``p0`` sends it to ``p1``, which refuses a session whose plan differs from what the
  owners sent it, and to the dealer.

Any failure aborts every link with the reason, so every party stops with an error
naming who stopped and why, and the data owner writes nothing.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .channel import InferenceError, Link, accept, connect, listen, tls_context
from .correlations import DEALER, Correlations
from .engine import Engine
from .program import (check_plan, decode_output, encode_weights, evaluate, input_words, load_weights,
                      weight_shapes)
from .ring import SEED_BYTES, WORD, Prg

ROLES = ("p0", "p1", "dealer", "model-owner", "data-owner")
MAX_QUERIES = 1_000_000
Log = Callable[[str], None]


def _seed(message: dict, peer: str) -> bytes:
    try:
        seed = bytes.fromhex(message["seed"])
    except (KeyError, TypeError, ValueError):
        seed = b""
    if len(seed) != SEED_BYTES:
        raise InferenceError(f"{peer} sent no valid {SEED_BYTES}-byte seed")
    return seed


def _checked_plan(message: dict) -> tuple[dict, int]:
    plan, bits = message.get("plan"), message.get("fraction_bits")
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list) \
            or not isinstance(bits, int) or not 8 <= bits <= 24:
        raise InferenceError("the model owner sent no valid plan and precision")
    try:
        check_plan(plan)
    except ValueError as err:
        raise InferenceError(f"the model owner's plan is unusable: {err}") from None
    return plan, bits


def _checked_batches(message: dict) -> list[int]:
    batches = message.get("batches")
    if not isinstance(batches, list) or not batches or any(
            not isinstance(b, int) or b < 1 for b in batches) or sum(batches) > MAX_QUERIES:
        raise InferenceError(f"the data owner asked for no valid batches (1 to {MAX_QUERIES} "
                             "queries in positive batch sizes)")
    return batches


def _abort_all(links: dict[str, Link], exc: BaseException) -> None:
    # only our own messages travel: another exception's text may hold secret-derived values
    reason = str(exc) if isinstance(exc, InferenceError) else f"{type(exc).__name__} (see its log)"
    for link in links.values():
        link.abort(reason)


def _run(role: str, links: dict[str, Link], body: Callable[[], object]):
    try:
        return body()
    except BaseException as exc:
        _abort_all(links, exc)
        raise
    finally:
        for link in links.values():
            link.close()


def computing_party(party: int, address: str, certs: Path, p0: str | None = None,
                    timeout: float = 120.0, log: Log = print) -> dict:
    """Serve one session as ``p0`` or ``p1``; return traffic figures."""
    role = f"p{party}"
    deadline = time.monotonic() + timeout
    links: dict[str, Link] = {}

    def body() -> dict:
        server = listen(address)
        try:
            if party == 1:
                links["p0"] = connect(p0, tls_context(certs, role, False), "p0", deadline,
                                      timeout)
            expected = {"dealer", "model-owner", "data-owner"} | ({"p1"} if party == 0 else set())
            links.update(accept(server, tls_context(certs, role, True), expected, deadline,
                                timeout))
        finally:
            server.close()
        log(f"{role}: all parties connected")
        owner = links["model-owner"].receive_json()
        plan, bits = _checked_plan(owner)
        shapes = weight_shapes(plan)
        if party == 0:
            prg = Prg(_seed(owner, "the model owner"))
            shares = [prg.words(s) for s in shapes]
            links["data-owner"].send_json({"plan": plan, "fraction_bits": bits})
        else:
            shares = links["model-owner"].receive_arrays()
            if [s.shape for s in shares] != shapes:
                raise InferenceError("the model owner's weight shares do not fit its plan")
        dealer_seed = _seed(links["dealer"].receive_json(), "the dealer")
        request = links["data-owner"].receive_json()
        session = {"plan": plan, "fraction_bits": bits, "batches": _checked_batches(request)}
        if party == 0:
            links["p1"].send_json(session)
            links["dealer"].send_json(session)
            corr = Correlations(0, prg0=Prg(dealer_seed))
            queries = Prg(_seed(request, "the data owner"))
        else:
            if links["p0"].receive_json() != session:
                raise InferenceError("p0 holds another plan than the owners sent p1: the "
                                     "model owner or the data owner sent the two parties "
                                     "different things")
            corr = Correlations(1, prg1=Prg(dealer_seed),
                                receive=lambda: links["dealer"].receive_arrays()[0])
        peer = links["p1" if party == 0 else "p0"]

        def exchange(arrays: list[np.ndarray]) -> list[np.ndarray]:
            if party == 0:  # one sends first: no thread shares the TLS socket
                peer.send_arrays(arrays)
                return peer.receive_arrays()
            theirs = peer.receive_arrays()
            peer.send_arrays(arrays)
            return theirs

        engine = Engine(party, corr, exchange)
        load_weights(engine, plan, shares)
        log(f"{role}: model loaded ({sum(int(np.prod(s)) for s in shapes):,} weights)")
        answering = time.monotonic()
        for i, size in enumerate(session["batches"]):
            shape = (size, *plan["input_shape"])
            if party == 0:
                x = queries.words(shape)
            else:
                (x,) = links["data-owner"].receive_arrays()
                if x.shape != shape:
                    raise InferenceError(f"the data owner sent a batch of shape {x.shape}, "
                                         f"the plan says {shape}")
            links["data-owner"].send_arrays([evaluate(engine, plan, x, bits)])
            log(f"{role}: batch {i + 1}/{len(session['batches'])} ({size} queries) answered")
        for name in ("dealer", "model-owner"):
            links[name].send_json({"done": True})
        return {"answer-seconds": round(time.monotonic() - answering, 3),
                "bytes-to-peer": peer.bytes_sent, "bytes-from-peer": peer.bytes_received,
                "bytes-from-dealer": links["dealer"].bytes_received}

    return _run(role, links, body)


def _connect_both(certs: Path, role: str, p0: str, p1: str, timeout: float
                  ) -> dict[str, Link]:
    ctx, deadline = tls_context(certs, role, False), time.monotonic() + timeout
    return {name: connect(addr, ctx, name, deadline, timeout)
            for name, addr in (("p0", p0), ("p1", p1))}


def _await_done(links: dict[str, Link]) -> None:
    """Wait for the computing parties to finish answering: however long that takes (a
    party that dies closes its link, which ends the wait with the cause)."""
    for link in links.values():
        link.sock.settimeout(None)
        if link.receive_json().get("done") is not True:
            raise InferenceError(f"{link.peer} ended the session without saying it was done")


def dealer(certs: Path, p0: str, p1: str, timeout: float = 120.0, log: Log = print) -> dict:
    """Deal the session's correlated randomness; return how many bytes went to ``p1``."""
    links: dict[str, Link] = {}

    def body() -> dict:
        links.update(_connect_both(certs, DEALER, p0, p1, timeout))
        seeds = [secrets.token_bytes(SEED_BYTES) for _ in range(2)]
        for name, seed in zip(("p0", "p1"), seeds):
            links[name].send_json({"seed": seed.hex()})
        session = links["p0"].receive_json()
        plan, bits = _checked_plan(session)
        batches = _checked_batches(session)
        corr = Correlations(DEALER, Prg(seeds[0]), Prg(seeds[1]),
                            send=lambda c: links["p1"].send_arrays([c]))
        engine = Engine(DEALER, corr)
        load_weights(engine, plan, [None] * len(weight_shapes(plan)))
        for size in batches:
            evaluate(engine, plan, np.zeros((size, *plan["input_shape"]), dtype=WORD), bits)
        log(f"dealer: dealt for {len(batches)} batches")
        _await_done(links)
        return {"bytes-to-p1": links["p1"].bytes_sent}

    return _run(DEALER, links, body)


def model_owner(certs: Path, p0: str, p1: str, plan: dict, weights: list[np.ndarray],
                fraction_bits: int, timeout: float = 120.0, log: Log = print) -> None:
    """Share the model between the computing parties and wait for the session's end."""
    links: dict[str, Link] = {}

    def body() -> None:
        words = encode_weights(plan, weights, fraction_bits)
        links.update(_connect_both(certs, "model-owner", p0, p1, timeout))
        seed = secrets.token_bytes(SEED_BYTES)
        prg = Prg(seed)
        second = [w - prg.words(w.shape) for w in words]
        links["p0"].send_json({"plan": plan, "fraction_bits": fraction_bits, "seed": seed.hex()})
        links["p1"].send_json({"plan": plan, "fraction_bits": fraction_bits})
        links["p1"].send_arrays(second)
        log("model-owner: model shared")
        _await_done(links)
        log("model-owner: the session ended")

    _run("model-owner", links, body)


def data_owner(certs: Path, p0: str, p1: str, task: str,
               queries: np.ndarray | Callable[[dict], np.ndarray], batch_size: int = 100,
               timeout: float = 120.0, log: Log = print) -> np.ndarray:
    """Share the queries, batch by batch, and return the predictions (only here).

    ``queries`` may be a function of the public plan (spam hashes emails into the
    model's number of buckets, which the plan says)."""
    links: dict[str, Link] = {}
    if batch_size < 1:
        raise InferenceError(f"the batch size must be at least 1, got {batch_size}")

    def body() -> np.ndarray:
        links.update(_connect_both(certs, "data-owner", p0, p1, timeout))
        public = links["p0"].receive_json()
        plan, bits = _checked_plan(public)
        if plan.get("task") != task:
            raise InferenceError(f"the model answers {plan.get('task')} queries, these inputs "
                                 f"are {task} queries")
        rows = queries(plan) if callable(queries) else queries
        if tuple(rows.shape[1:]) != tuple(plan["input_shape"]):
            raise InferenceError(f"the queries have shape {tuple(rows.shape[1:])} per row, the "
                                 f"model takes {tuple(plan['input_shape'])}")
        words = input_words(plan, rows, bits)
        sizes = [min(batch_size, len(words) - i) for i in range(0, len(words), batch_size)]
        seed = secrets.token_bytes(SEED_BYTES)
        prg = Prg(seed)
        links["p0"].send_json({"batches": sizes, "seed": seed.hex()})
        links["p1"].send_json({"batches": sizes})
        outputs, start = [], 0
        for i, size in enumerate(sizes):
            x = words[start:start + size]
            links["p1"].send_arrays([x - prg.words(x.shape)])
            (a,), (b,) = links["p0"].receive_arrays(), links["p1"].receive_arrays()
            if a.shape != b.shape or a.shape[:1] != (size,):
                raise InferenceError("a computing party answered with the wrong shape")
            outputs.append(decode_output(plan, a + b, bits))
            start += size
            log(f"data-owner: {start}/{len(words)} predictions")
        return np.concatenate(outputs)

    return _run("data-owner", links, body)
