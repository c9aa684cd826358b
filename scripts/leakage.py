"""The leakage demonstration of *Grokking Deep Learning* ch. 15, on the app's real code paths.

One client holds one email and trains the spam model (a sum of one-dimensional
word embeddings over hashed tokens, all zero at the start) for one local epoch,
as the ClientApp does. Under plaintext FedAvg the server receives the updated
arrays: the embedding rows that changed are the buckets of the email's words, and
a dictionary of candidate words hashed the same way (the vocabulary of the public
Enron corpus) turns them back into words. Under Paillier the server receives
ciphertexts, under masking a masked vector, and the same attacks find nothing.

What the server receives comes from :func:`run_round`: the run's strategy
(:func:`fedapp.strategy.aggregation_strategy`), the app's client mods
(:func:`fedapp.client_app.aggregation_mod`), the Message-API adapter and the
``SpamClient``, with the nodes served in this process by :class:`LocalGrid`.

The attacker scores every embedding row (:func:`bucket_scores`) by how far the
view is from its own encoding of the unchanged global model, in the view's form:
the change of the weight (plaintext), the bytes that differ in the ciphertext
holding the row from the server's own encryption of the global model under the
public key (Paillier), the circular distance of the masked value from the unmasked
encoding (masking). Then (:func:`attack`):

* **changed rows**: the rows scoring above the rounding tolerance, decoded to every
  dictionary word of those rows (``candidates``) or to the most frequent one of
  each (``ranked``). Recall and precision are against the email's distinct words;
  the base rate is the precision of flagging every row, i.e. of a guess that
  uses no information (``|email words| / |dictionary|`` for ``candidates``).
* **top-k**: the ``k`` highest-scoring rows, ``k`` being the true number of the
  email's rows (an oracle the server does not have), ties broken at random.
* **distinguishing** (:func:`guess_email`): the server knows the client held email
  A or email B and picks the one whose own rows (not shared with the other) score
  higher. Its accuracy over many trials is 1 when the update leaks and 1/2 when
  it does not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from clients.examples import BagExamples
from clients.loaders import DataNotFoundError, TokenHasher, find_file, missing_data_message, \
    read_lines
from clients.models import get_weights
from clients.numpy_clients import SpamClient
from clients.tasks import build_model
from strategies.keyfiles import (PRIVATE_NAME, PUBLIC_NAME, ROSTER_NAME, load_public_key,
                                 write_keypair, write_simulation_identities)
from strategies.secagg_masks import encode_weighted
from strategies.paillier import Encryptor
from strategies.paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, EncryptedModel, Layout,
                                          encrypt_update)
from strategies.paillier_tags import TagKey
from strategies.records import record_arrays
from strategies.secagg_protocol import MASKED_KEY

from fedapp.adapter import serve_numpy_client
from fedapp.client_app import aggregation_mod
from fedapp.config import RunSettings
from fedapp.strategy import aggregation_strategy

MODES = ("fedavg", "paillier", "secagg")
#: Emails drawn for the trials have at least MIN_WORDS and at most MAX_WORDS distinct words.
MIN_WORDS, MAX_WORDS = 5, 300
#: Nodes in a masked round (pairwise masks need at least 3 for the demonstration).
SECAGG_NODES = 3
TARGET = 1  # node id of the client under attack


# ------------------------------------------------------------------ data and dictionary
@dataclass(frozen=True)
class Corpus:
    """Every Enron-Spam email (ham, then spam) as the loaders read it, with its label."""

    texts: list[str]
    labels: np.ndarray  # 1.0 = spam

    @staticmethod
    def load(data_dir: Path) -> Corpus:
        """``ham.txt`` and ``spam.txt`` (or ``.gz``) under ``data_dir/enron-spam`` or ``data_dir``.

        Raises
        ------
        clients.loaders.DataNotFoundError
            If either file is missing.
        """
        ham = find_file(data_dir, "enron-spam", "ham.txt", "ham.txt.gz")
        spam = find_file(data_dir, "enron-spam", "spam.txt", "spam.txt.gz")
        if ham is None or spam is None:
            raise DataNotFoundError(missing_data_message("spam", data_dir))
        ham_lines, spam_lines = read_lines(ham), read_lines(spam)
        return Corpus(ham_lines + spam_lines,
                      np.r_[np.zeros(len(ham_lines)), np.ones(len(spam_lines))])

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Distinct words of every email."""
        return np.fromiter((len(email_words(t)) for t in self.texts), np.int64, len(self.texts))

    def pool(self, low: int = MIN_WORDS, high: int = MAX_WORDS) -> np.ndarray:
        """Indices of the emails with ``low`` to ``high`` distinct words (the trials draw
        from the default range)."""
        return np.flatnonzero((self.sizes >= low) & (self.sizes <= high))


def email_words(text: str) -> set[str]:
    """The distinct tokens of an email, as :class:`clients.loaders.TokenHasher` sees them."""
    return set(text.split())


class Dictionary:
    """The attacker's dictionary: candidate words hashed into buckets as the clients do.

    Parameters
    ----------
    texts : iterable of str
        Public text the words come from; each word is ranked by the number of
        texts it occurs in (the most frequent first within its bucket).
    num_buckets : int
        Rows of the spam model's embedding.
    """

    def __init__(self, texts: Iterable[str], num_buckets: int) -> None:
        frequency: Counter[str] = Counter()
        for text in texts:
            frequency.update(email_words(text))
        self.hasher = TokenHasher(num_buckets)
        self.bucket_of = {w: self.hasher.bucket(w) for w in frequency}
        words_of: dict[int, list[str]] = {}
        for word in sorted(frequency, key=lambda w: (-frequency[w], w)):
            words_of.setdefault(self.bucket_of[word], []).append(word)
        self.words_of = words_of
        self.sizes = np.bincount(np.fromiter(self.bucket_of.values(), np.int64),
                                 minlength=num_buckets)

    def __len__(self) -> int:
        return len(self.bucket_of)

    def decode(self, buckets: np.ndarray, ranked: bool = False) -> list[str]:
        """The words of ``buckets``: all of each bucket's, or only its most frequent one."""
        words = [self.words_of.get(int(b), []) for b in buckets]
        return [w[0] for w in words if w] if ranked else [x for w in words for x in w]

    def recovery(self, words: set[str], buckets: np.ndarray, ranked: bool = False
                 ) -> tuple[float, float]:
        """Recall and precision of ``decode(buckets, ranked)`` against the email's ``words``
        (precision 0 if nothing is decoded)."""
        flagged = np.zeros(len(self.sizes), bool)
        flagged[buckets] = True
        guesses = int(np.count_nonzero(flagged & (self.sizes > 0))) if ranked \
            else int(self.sizes[flagged].sum())
        hits = sum(1 for w in words if w in self.bucket_of and flagged[self.bucket_of[w]]
                   and (not ranked or self.words_of[self.bucket_of[w]][0] == w))
        return hits / len(words), (hits / guesses if guesses else 0.0)

    def base_rate(self, words: set[str], ranked: bool = False) -> float:
        """Precision of flagging every row: what a guess without information gets."""
        return self.recovery(words, np.arange(len(self.sizes)), ranked)[1]


# ------------------------------------------------------------------ the attacks
def bucket_scores(view: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  rows: slice) -> np.ndarray:
    """How far the server's view of an update is from its own encoding of the unchanged
    model, for each embedding row (float64).

    ``view`` and ``reference`` have the same form: plaintext arrays (the absolute
    change of each value), a Paillier update (the bytes that differ in the ciphertext
    that holds the value) or a masked update (the distance of the masked value from
    the reference in ``Z_{2^bits}``). ``rows`` is where the embedding's rows lie in
    the flattened model (:func:`embedding_rows`).
    """
    if EncryptedModel.is_encrypted(view):
        differ = np.count_nonzero(view[CIPHERTEXTS_KEY] != reference[CIPHERTEXTS_KEY], axis=1)
        slots = json.loads(view[HEADER_KEY].tobytes())["encoding"]["slots-per-plaintext"]
        # value j is in plaintext j // slots
        return np.repeat(differ, int(slots))[rows].astype(np.float64)
    if MASKED_KEY in view:
        diff = view[MASKED_KEY] - reference[MASKED_KEY]  # wraps in the modulus
        return np.minimum(diff, -diff)[rows].astype(np.float64)
    flat = [np.concatenate([np.ravel(a) for a in arrays.values()]).astype(np.float64)
            for arrays in (view, reference)]
    return np.abs(flat[0] - flat[1])[rows]


def embedding_rows(arrays: Iterable[np.ndarray], num_buckets: int) -> slice:
    """Where the ``(num_buckets, 1)`` embedding lies in the flattened model arrays (the
    layout every mode flattens, in ``state_dict`` order)."""
    start = 0
    for array in arrays:
        if array.shape == (num_buckets, 1):
            return slice(start, start + num_buckets)
        start += array.size
    raise ValueError(f"no ({num_buckets}, 1) embedding among the model's arrays")


def top_k_buckets(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The ``k`` highest-scoring rows, ties broken at random."""
    return np.lexsort((rng.random(len(scores)), -scores))[:k]


def guess_email(scores: np.ndarray, buckets_a: np.ndarray, buckets_b: np.ndarray,
                rng: np.random.Generator) -> int:
    """0 if email A's own rows score higher than email B's, 1 if lower, a coin on a tie."""
    a = scores[np.setdiff1d(buckets_a, buckets_b)].mean()
    b = scores[np.setdiff1d(buckets_b, buckets_a)].mean()
    return 0 if a > b else 1 if b > a else int(rng.integers(2))


@dataclass(frozen=True)
class Outcome:
    """The attacks on one view of one email (fractions in [0, 1]).

    ``recall`` / ``precision``: the changed rows decoded to every dictionary word
    hashed there; ``ranked_*``: to the most frequent one of each row; ``*base_rate``:
    the precision of flagging every row; ``rows_flagged``: the fraction of rows that
    looked changed; ``topk_*``: the top-k rows decoded to every word; ``flagged``:
    the rows that looked changed.
    """

    recall: float
    precision: float
    base_rate: float
    ranked_recall: float
    ranked_precision: float
    ranked_base_rate: float
    rows_flagged: float
    topk_recall: float
    topk_precision: float
    flagged: np.ndarray = field(repr=False)


def attack(dictionary: Dictionary, text: str, scores: np.ndarray, tolerance: float,
           rng: np.random.Generator) -> Outcome:
    """Read the words of ``text`` (the email the client held) out of the row scores.

    Rows scoring above ``tolerance`` count as changed. The email's text only
    serves to grade the attack (and to give the top-k attack its ``k``).
    """
    words = email_words(text)
    flagged = np.flatnonzero(scores > tolerance)
    top = top_k_buckets(scores, len(dictionary.hasher(text)), rng)
    return Outcome(*dictionary.recovery(words, flagged), dictionary.base_rate(words),
                   *dictionary.recovery(words, flagged, ranked=True),
                   dictionary.base_rate(words, ranked=True), len(flagged) / len(scores),
                   *dictionary.recovery(words, top), flagged)


def chance_band(trials: int, z: float = 2.576) -> tuple[float, float]:
    """Where the accuracy of coin flips falls with the normal approximation to the
    binomial: ``0.5 +- z * 0.5 / sqrt(trials)`` (z = 2.576: 99%)."""
    half = z * 0.5 / math.sqrt(trials)
    return 0.5 - half, 0.5 + half


# ------------------------------------------------------------------ the federation
class LocalGrid:
    """Delivers a strategy's messages to a ClientApp in this process, one context per
    node: the part of Flower's ``Grid`` the strategies use."""

    def __init__(self, app: ClientApp, contexts: Mapping[int, Context]) -> None:
        self.app, self.contexts = app, contexts

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


@contextlib.contextmanager
def flower_identity() -> Iterator[None]:
    """Flower builds messages only inside a run: give this process run, node and task
    ids for the duration (the previous values come back afterwards)."""
    names = ("_run_id", "_node_id", "_task_id")
    saved = {n: getattr(TaskIdentity, n, None) for n in names}
    for name, value in saved.items():
        setattr(TaskIdentity, name, 1 if value is None else value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def one_email_client(settings: RunSettings, text: str, label: float,
                     context: Context) -> SpamClient:
    """The app's spam NumPyClient whose training set is one email."""
    spec = settings.data_spec(1)
    data = BagExamples.from_bags([TokenHasher(spec.spam_buckets)(text)], np.array([label]))
    return SpamClient(spec, data, data, seed=settings.seed, state=context.state)


def run_round(settings: RunSettings, node_config: dict, emails: Mapping[int, tuple[str, float]],
              arrays: ArrayRecord) -> dict[int, dict[str, np.ndarray]]:
    """Round 1 of ``settings.aggregation`` from global model ``arrays``, node ``u``
    holding the one email ``emails[u]`` (text, label); returns each node's train
    reply arrays as the server receives them. The round is completed (masking:
    the unmask stage), as the app would.

    Raises
    ------
    RuntimeError
        If the strategy produced no aggregate (a node failed or was left out).
    """
    app = serve_numpy_client(ClientApp(mods=[aggregation_mod]), lambda ctx: one_email_client(
        settings, *emails[ctx.node_id], ctx))
    run_config = settings.as_dict()
    # each node's partition id picks its identity key (masking) in a shared key directory
    grid = LocalGrid(app, {u: Context(run_id=1, node_id=u,
                                      node_config={**node_config, "partition-id": i},
                                      state=RecordDict(), run_config=run_config)
                           for i, u in enumerate(emails)})
    strategy = aggregation_strategy(settings)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(settings.train_config()), grid))
    replies = grid.send_and_receive(sent)
    if strategy.aggregate_train(1, replies)[0] is None:
        raise RuntimeError(f"the {settings.aggregation} round produced no aggregate (see the log)")
    return {m.metadata.src_node_id: record_arrays(m.content["arrays"]) for m in replies}


class Lab:
    """Rounds of one aggregation mode against one client, and the server's view.

    Parameters
    ----------
    mode : str
        ``fedavg``, ``paillier`` or ``secagg``.
    num_buckets : int
        The ``spam-buckets`` setting.
    key_dir : Path
        Where the Paillier key pair and the masking identity keys are written
        (the client nodes get the private keys through their node config).
    """

    def __init__(self, mode: str, num_buckets: int, key_dir: Path) -> None:
        run_config = {"task": "spam", "aggregation": mode, "spam-buckets": num_buckets,
                      "fraction-train": 1.0, "min-available-nodes": 1, "min-train-nodes": 1}
        node_config: dict[str, str] = {}
        self.public_key = None
        if mode == "paillier":
            public, private = key_dir / PUBLIC_NAME, key_dir / PRIVATE_NAME
            if not public.exists():
                write_keypair(key_dir)
            run_config["paillier-public-key"] = str(public)
            node_config["paillier-private-key"] = str(private)
            self.public_key = load_public_key(public)
        if mode == "secagg":  # an identity key per node and their roster
            if not (key_dir / ROSTER_NAME).exists():
                write_simulation_identities(key_dir, SECAGG_NODES)
            node_config["key-dir"] = str(key_dir)
        self.mode, self.num_buckets = mode, num_buckets
        # a secure sum needs company: key holders decrypt no sum of one update
        self.nodes = [TARGET + i for i in range({"fedavg": 1, "paillier": 2}.get(mode,
                                                                                 SECAGG_NODES))]
        self.settings = RunSettings.from_run_config(run_config)
        self.node_config = node_config
        model = build_model(self.settings.data_spec(1))  # all zero: the app's initial model
        self.arrays = ArrayRecord(get_weights(model))
        self._reference: dict[str, np.ndarray] | None = None

    def view(self, email: tuple[str, float], others: list[tuple[str, float]]
             ) -> dict[str, np.ndarray]:
        """What the server receives from the target node holding ``email`` (text,
        label); the other nodes of a secure round hold ``others`` (masking needs
        ``SECAGG_NODES - 1`` of them, Paillier one, plaintext FedAvg none)."""
        if len(others) < len(self.nodes) - 1:
            raise ValueError(f"{self.mode} needs {len(self.nodes) - 1} other emails, got "
                             f"{len(others)}")
        emails = dict(zip(self.nodes, [email, *others[:len(self.nodes) - 1]], strict=True))
        return run_round(self.settings, self.node_config, emails, self.arrays)[TARGET]

    def reference(self, view: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The server's own encoding of the unchanged global model in the form of
        ``view``: the model itself, its encryption under the public key (with the
        view's encoding and weight), or its unmasked weighted encoding."""
        if self._reference is None:
            plain = {k: np.asarray(v) for k, v in record_arrays(self.arrays).items()}
            if self.mode == "paillier":
                update = EncryptedModel.from_arrays(view, self.public_key)
                (node, weight), = update.contributors.items()
                made_up = TagKey(secrets.token_bytes(32), self.public_key.n)  # no tag key here
                self._reference = encrypt_update(  # with the view's metric rows (as zeros)
                    list(plain.values()), update.layout, weight, update.params,
                    Encryptor(self.public_key), made_up, run=update.run,
                    server_round=update.server_round, node=node,
                    sums=dict.fromkeys(update.sums, 0.0)).to_arrays()
            elif self.mode == "secagg":
                layout = Layout.of(list(plain), list(plain.values()))
                params = aggregation_strategy(self.settings).params
                encoded = encode_weighted(  # one email: weight 1
                    layout.flatten(list(plain.values())), 1, params, np.random.default_rng())
                tail = view[MASKED_KEY].size - encoded.size  # the masked weight and metrics
                self._reference = {MASKED_KEY: np.concatenate(
                    [encoded, np.zeros(tail, encoded.dtype)])}
            else:
                self._reference = plain
        return self._reference

    @property
    def tolerance(self) -> float:
        """Largest score of an unchanged row: masking rounds each value stochastically,
        so an unchanged weighted value may move by the weight (one email: 1)."""
        return 1.0 if self.mode == "secagg" else 0.0

    def scores(self, view: Mapping[str, np.ndarray]) -> np.ndarray:
        """The server's score of every embedding row (:func:`bucket_scores`)."""
        rows = embedding_rows(self.arrays.to_numpy_ndarrays(), self.num_buckets)
        return bucket_scores(view, self.reference(view), rows)


def run_trials(lab: Lab, corpus: Corpus, dictionary: Dictionary, trials: int,
               rng: np.random.Generator, progress: Callable[[str], None] = lambda _: None
               ) -> dict:
    """The distinguishing experiment, with the word attacks on every view.

    Each trial draws two emails A and B (from :meth:`Corpus.pool`, with different
    buckets) and a fair coin; the client holds the one the coin picks (the other
    nodes of a masked round hold random emails) and the server guesses which.
    Returns the mean of each :class:`Outcome` figure over the trials, the
    distinguishing accuracy, the trials and the 99% chance band.
    """
    pool = corpus.pool()
    outcomes, correct = [], 0
    start = time.monotonic()
    for trial in range(trials):
        while True:
            a, b = rng.choice(pool, 2, replace=False)
            bags = [dictionary.hasher(corpus.texts[i]) for i in (a, b)]
            if len(np.setdiff1d(*bags)) and len(np.setdiff1d(bags[1], bags[0])):
                break
        coin = int(rng.integers(2))
        held = (a, b)[coin]
        others = [(corpus.texts[i], corpus.labels[i]) for i in rng.choice(pool, 2)]
        view = lab.view((corpus.texts[held], corpus.labels[held]), others)
        scores = lab.scores(view)
        correct += guess_email(scores, bags[0], bags[1], rng) == coin
        outcomes.append(attack(dictionary, corpus.texts[held], scores, lab.tolerance, rng))
        if (trial + 1) % max(1, trials // 5) == 0:
            progress(f"{lab.mode}: {trial + 1}/{trials} trials, {correct} guessed right, "
                     f"{time.monotonic() - start:.1f} s")
    summary = {name: float(np.mean([getattr(o, name) for o in outcomes]))
               for name in Outcome.__dataclass_fields__ if name != "flagged"}
    return {**summary, "distinguishing_accuracy": correct / trials, "trials": trials,
            "chance_band_99": [round(x, 4) for x in chance_band(trials)]}
