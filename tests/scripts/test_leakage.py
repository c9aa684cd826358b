"""The leakage demonstration (scripts/leakage.py; Grokking Deep Learning ch. 15) at a
small scale, on the app's real code paths (strategy, client mods, adapter,
SpamClient; 2048-bit Paillier, a 3-node masked round): one client's one-email update
names the email's words under plaintext FedAvg, and under Paillier and masking the
server's guesses are at chance."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from strategies.paillier_protocol import CIPHERTEXTS_KEY
from strategies.paillier_protocol import HEADER_KEY as PAILLIER_HEADER
from strategies.secagg_protocol import MASKED_KEY
from strategies.secagg_protocol import HEADER_KEY as SECAGG_HEADER
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from leakage import (Corpus, Dictionary, Lab, attack, chance_band, email_words,  # noqa: E402
                     flower_identity, run_trials)


BUCKETS = 4096  # the spam-buckets setting, small: 66 ciphertexts per update
TRIALS = 80
Z = 3.89  # chance band of the distinguishing accuracy: 99.99%


@pytest.fixture(scope="module")
def corpus(data_dir) -> Corpus:
    return Corpus.load(data_dir)


@pytest.fixture(scope="module")
def dictionary(corpus) -> Dictionary:
    return Dictionary(corpus.texts, BUCKETS)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("leakage-keys")


@pytest.fixture(scope="module")
def trials(corpus, dictionary, key_dir) -> dict[str, dict]:
    """The distinguishing experiment (with the word attacks) for every mode."""
    with flower_identity():
        return {mode: run_trials(Lab(mode, BUCKETS, key_dir), corpus, dictionary, TRIALS,
                                 np.random.default_rng(7))
                for mode in ("fedavg", "paillier", "secagg")}


def example(corpus: Corpus) -> tuple[str, float]:
    index = int(corpus.pool(20, 60)[0])
    return corpus.texts[index], float(corpus.labels[index])


def test_plaintext_update_changes_exactly_the_rows_of_the_email(corpus, dictionary, key_dir):
    text, label = example(corpus)
    with flower_identity():
        lab = Lab("fedavg", BUCKETS, key_dir)
        view = lab.view((text, label), [])
    outcome = attack(dictionary, text, lab.scores(view), lab.tolerance, np.random.default_rng(0))
    np.testing.assert_array_equal(outcome.flagged, dictionary.hasher(text))
    assert outcome.recall == 1.0 and set(dictionary.decode(outcome.flagged)) >= email_words(text)
    assert outcome.precision > 10 * outcome.base_rate


@pytest.mark.parametrize("mode, keys, width", [
    ("paillier", {CIPHERTEXTS_KEY, PAILLIER_HEADER}, 512),
    ("secagg", {MASKED_KEY, SECAGG_HEADER}, None),
])
def test_secure_views_hold_no_plaintext_and_every_row_looks_changed(mode, keys, width, corpus,
                                                                   dictionary, key_dir):
    text, label = example(corpus)
    others = [(corpus.texts[i], float(corpus.labels[i])) for i in corpus.pool()[:2]]
    with flower_identity():
        lab = Lab(mode, BUCKETS, key_dir)
        view = lab.view((text, label), others)
    assert set(view) == keys
    if width:  # 2048-bit key: ciphertexts modulo n^2 take 512 bytes
        assert view[CIPHERTEXTS_KEY].shape[1] == width
    outcome = attack(dictionary, text, lab.scores(view), lab.tolerance, np.random.default_rng(0))
    assert outcome.rows_flagged == 1.0
    assert outcome.precision == pytest.approx(outcome.base_rate)


def test_plaintext_fedavg_leaks_the_email(trials):
    result = trials["fedavg"]
    assert result["recall"] >= 0.9
    assert result["precision"] > 10 * result["base_rate"]
    assert result["ranked_precision"] > 10 * result["ranked_base_rate"]
    assert result["topk_precision"] > 10 * result["base_rate"]
    assert result["distinguishing_accuracy"] >= 0.97


@pytest.mark.parametrize("mode", ["paillier", "secagg"])
def test_secure_aggregation_reveals_nothing(mode, trials):
    result = trials[mode]
    low, high = chance_band(TRIALS, Z)
    assert low <= result["distinguishing_accuracy"] <= high, result
    assert result["rows_flagged"] == 1.0
    assert result["precision"] <= result["base_rate"] * 1.001
    # the top-k rows are random rows: the base rate in expectation; 1.5x the base
    # rate is about 6 standard errors of a mean over 80 trials
    assert result["topk_precision"] <= 1.5 * result["base_rate"], result
    assert result["topk_precision"] < trials["fedavg"]["precision"] / 10
