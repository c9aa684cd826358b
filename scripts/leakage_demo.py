"""Demonstration: one email leaks from a spam-model update under plaintext FedAvg, and
nothing leaks under Paillier or masking (the attack of *Grokking Deep Learning* ch. 15).

    python scripts/leakage_demo.py [--data-dir ../shared/data] [--buckets 65536]
        [--trials 200] [--email INDEX] [--seed 0] [--modes fedavg,paillier,secagg]

One client holds ONE real Enron email and trains the spam model for one local epoch
with the app's own code: the run's strategy, the client mods, the Message-API
adapter and the ``SpamClient``, in round 1 from the app's initial (all-zero) model,
served in this process (``scripts/leakage.py``). Paillier uses a fresh 2048-bit key
pair; the masked round has 3 nodes (the other two hold random emails). The server
hashes the vocabulary of the whole public Enron corpus with the clients' hash and
maps the embedding rows that changed back to words.

For every mode:

* the example email (``--email``, an index into ham then spam lines; by default a
  seeded pick among ham emails of 20 to 60 distinct words): the server's view, and
  the words the attack recovers from it, printed next to the email;
* ``--trials`` distinguishing trials: two random emails A and B, a coin picks the one
  the client holds, the server guesses which from its view; the word attacks are
  graded on every trial's view.

Recall is the fraction of the email's distinct words recovered, precision the
fraction of recovered words that are in the email, the base rate the precision of
flagging every row (a guess without information). ``candidates`` decodes a changed
row to every dictionary word hashed there, ``ranked`` to the most frequent one.

The example and a JSON summary go to stdout (the JSON is the last line); progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedapp.config import DEFAULTS  # noqa: E402
from leakage import (MODES, Corpus, Dictionary, Lab, Outcome, attack,  # noqa: E402
                     email_words, flower_identity, run_trials)
from strategies.paillier_protocol import CIPHERTEXTS_KEY  # noqa: E402
from strategies.secagg_protocol import MASKED_KEY  # noqa: E402

VIEWS = {"fedavg": "the updated arrays", "paillier": "ciphertexts", "secagg": "a masked vector"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe_view(view: dict[str, np.ndarray]) -> str:
    """What the server holds, in a few words."""
    if CIPHERTEXTS_KEY in view:
        rows, width = view[CIPHERTEXTS_KEY].shape
        return f"{rows:,} ciphertexts of {width} bytes and a JSON header"
    if MASKED_KEY in view:
        vector = view[MASKED_KEY]
        return f"a masked {vector.dtype} vector of {vector.size:,} values and a JSON header"
    return ", ".join(f"{a.dtype} array {a.shape}" for a in view.values())


def outcome_figures(outcome: Outcome) -> dict[str, float]:
    return {k: round(getattr(outcome, k), 6) for k in Outcome.__dataclass_fields__
            if k != "flagged"}


def show_example(mode: str, text: str, view: dict[str, np.ndarray], outcome: Outcome,
                 dictionary: Dictionary) -> None:
    """Print the server's view, the email and what the attack reads from the view."""
    words = email_words(text)
    rows = len(dictionary.hasher(text))
    print(f"\n== {mode}: the server receives {VIEWS[mode]}: {describe_view(view)}")
    print(f"rows that differ from the server's own encoding of the unchanged model: "
          f"{len(outcome.flagged):,} of {len(dictionary.sizes):,} (the email's words hash "
          f"to {rows})")
    if len(outcome.flagged) < len(dictionary.sizes):
        guessed = dictionary.decode(outcome.flagged, ranked=True)
        right = [w for w in dict.fromkeys(text.split()) if w in set(guessed)]
        print(f"recovered words (most frequent dictionary word of each changed row): "
              f"{len(right)} of the email's {len(words)} right, "
              f"{len(guessed) - len(right)} wrong")
        print(textwrap.fill(" ".join(right), 100, initial_indent="  ",
                            subsequent_indent="  "))
        print("  not in the email:", " ".join(sorted(set(guessed) - words)) or "-")
        print("  missed:", " ".join(sorted(words - set(guessed))) or "-")
    else:
        print(f"every row looks changed: the attack returns the whole dictionary "
              f"({len(dictionary):,} words)")
    print(f"every dictionary word of the flagged rows: recall {outcome.recall:.3f}, "
          f"precision {outcome.precision:.5f} (base rate {outcome.base_rate:.5f}); "
          f"ranked: recall {outcome.ranked_recall:.3f}, precision "
          f"{outcome.ranked_precision:.5f} (base rate {outcome.ranked_base_rate:.5f})")
    print(f"top-{rows} rows by score (told how many rows the email has): recall "
          f"{outcome.topk_recall:.3f}, precision {outcome.topk_precision:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--buckets", type=int, default=DEFAULTS["spam-buckets"],
                        help="the spam-buckets setting (embedding rows)")
    parser.add_argument("--trials", type=int, default=200,
                        help="distinguishing trials per mode")
    parser.add_argument("--email", type=int, default=None,
                        help="index of the example email (ham lines, then spam lines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES),
                        type=lambda t: [m for m in t.split(",") if m])
    args = parser.parse_args()
    if any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one round per trial: keep it quiet
    start = time.monotonic()
    rng = np.random.default_rng(args.seed)

    log(f"reading the Enron corpus from {args.data_dir}")
    corpus = Corpus.load(Path(args.data_dir).resolve())
    dictionary = Dictionary(corpus.texts, args.buckets)
    log(f"dictionary: {len(dictionary):,} words of {len(corpus.texts):,} emails hashed into "
        f"{args.buckets:,} buckets ({np.count_nonzero(dictionary.sizes):,} used)")
    index = args.email
    if index is not None and not 0 <= index < len(corpus.texts):
        parser.error(f"--email must be in 0..{len(corpus.texts) - 1}")
    if index is None:
        short_ham = corpus.pool(20, 60)
        index = int(rng.choice(short_ham[corpus.labels[short_ham] == 0]))
    text, label = corpus.texts[index], float(corpus.labels[index])
    print(f"example email #{index} ({'spam' if label else 'ham'}, "
          f"{len(email_words(text))} distinct words):")
    print(textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="  "))

    summary: dict[str, Any] = {
        "demo": "leakage", "buckets": args.buckets, "dictionary_words": len(dictionary),
        "emails": len(corpus.texts), "seed": args.seed,
        "email": {"index": index, "label": "spam" if label else "ham",
                  "distinct_words": len(email_words(text)),
                  "rows": len(dictionary.hasher(text))},
        "example": {}, "modes": {}}
    pool = corpus.pool()
    with tempfile.TemporaryDirectory(prefix="leakage-") as keys, flower_identity():
        for mode in args.modes:
            mode_start = time.monotonic()
            log(f"{mode}: setting up{' (2048-bit key pair)' if mode == 'paillier' else ''}")
            lab = Lab(mode, args.buckets, Path(keys))
            others = [(corpus.texts[i], corpus.labels[i]) for i in rng.choice(pool, 2)]
            view = lab.view((text, label), others)
            outcome = attack(dictionary, text, lab.scores(view), lab.tolerance, rng)
            show_example(mode, text, view, outcome, dictionary)
            summary["example"][mode] = outcome_figures(outcome)
            result = run_trials(lab, corpus, dictionary, args.trials, rng, log)
            result["seconds"] = round(time.monotonic() - mode_start, 1)
            summary["modes"][mode] = {k: round(v, 6) if isinstance(v, float) else v
                                      for k, v in result.items()}
            low, high = result["chance_band_99"]
            print(f"{mode}: told A from B in {result['distinguishing_accuracy']:.3f} of "
                  f"{args.trials} trials (coin flips: {low:.3f}-{high:.3f} at 99%); mean "
                  f"precision {result['precision']:.5f}, top-k {result['topk_precision']:.5f}, "
                  f"base rate {result['base_rate']:.5f}")
    summary["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
