"""Secure prediction sessions over real TLS sockets: the five party functions in
threads (fast), and the parties as real processes for a disconnect. The CLI as five
processes on a federated model: tests/runs/test_flower_runs.py (legacy housing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from clients.models import HousingMLP, SmallCNN, save_npz
from fedapp.certificates import make_party_certificates
from fedapp.inference.channel import InferenceError, Link, connect, tls_context
from fedapp.inference.program import compile_model
from fedapp.inference.queries import load_trained, read_queries
from fedapp.inference.ring import DEFAULT_FRACTION_BITS
from tests.helpers import ROOT
from fedapp.launch import free_port
from tests.helpers.inference import ROLES_HOSTS, networked_session

F = DEFAULT_FRACTION_BITS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    make_party_certificates(directory, ROLES_HOSTS)
    return directory


@pytest.fixture(scope="module")
def housing_run(tmp_path_factory):
    """A housing model directory as a run leaves it: model, config, standardization."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_npz(HousingMLP(), run / "model.npz")
    (run / "config.json").write_text(json.dumps({"task": "housing"}))
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(1, 50, 14), rng.uniform(0.5, 20, 14)
    np.savez(run / "standardization.npz", mean=mean, std=std)
    return run


def _plain_logits(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def test_a_session_over_tls_returns_the_plaintext_answers(certs):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    plan, weights = compile_model(model, "mnist")
    plan["output"] = "logits"
    x = np.random.default_rng(0).uniform(-0.42, 2.8, size=(7, 1, 28, 28))
    got, errors = networked_session(certs, plan, weights, "mnist", x, F, batch_size=3)
    assert not errors, errors
    assert got.shape == (7, 10) and np.abs(got - _plain_logits(model, x)).max() < 2e-3


def test_what_a_computing_party_receives_is_uniform_whatever_the_query(certs):
    """The adversary is p1 (or p0): it records every word it receives, from the model
    owner, the data owner, the other party and the dealer, for all-black images and
    for bright ones. Each of the 64 bit positions is 1 half the time within 5 standard
    deviations in both sessions: the shares and opened masked values carry no trace
    of the queries. The data owner's reconstruction still gives the answer."""
    torch.manual_seed(0)
    plan, weights = compile_model(SmallCNN().eval(), "mnist")
    seen: dict[str, list[np.ndarray]] = {}
    original = Link.receive_arrays

    def recording(self):
        arrays = original(self)
        role = threading.current_thread().name
        if role in ("p0", "p1"):
            seen.setdefault(role, []).extend(a.ravel() for a in arrays)
        return arrays

    for pixel in (-0.4242, 2.8215):  # black and white after normalization
        seen.clear()
        Link.receive_arrays = recording
        try:
            got, errors = networked_session(certs, plan, weights, "mnist",
                                            np.full((4, 1, 28, 28), pixel), F, batch_size=4)
        finally:
            Link.receive_arrays = original
        assert not errors and got.shape == (4,)
        for role in ("p0", "p1"):
            words = np.concatenate(seen[role])
            # opened bits of the b2a step are single bits: keep full words only
            words = words[words > np.uint64(1)]
            assert words.size > 100_000
            bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
            freq = bits.mean(axis=0)
            assert np.abs(freq - 0.5).max() < 5 * 0.5 / np.sqrt(words.size), role


def test_inputs_for_another_task_stop_every_party_with_the_reason(certs):
    plan, weights = compile_model(SmallCNN(), "mnist")
    got, errors = networked_session(certs, plan, weights, "housing", np.zeros((2, 13)), F,
                                    timeout=10)
    assert got is None and set(errors) == {"p0", "p1", "dealer", "model-owner", "data-owner"}
    assert "the model answers mnist queries, these inputs are housing queries" in \
        str(errors["data-owner"])
    for role in ("p0", "p1", "dealer", "model-owner"):
        assert "these inputs are housing queries" in str(errors[role]), (role, errors[role])


def test_a_model_owner_that_sends_the_parties_different_plans_is_refused(certs):
    from fedapp.inference import parties

    torch.manual_seed(0)
    plan, weights = compile_model(SmallCNN().eval(), "mnist")

    def lying_owner(a0, a1, jobs):
        def run():  # p0 gets the plan with logits out, p1 the argmax plan
            real_send = Link.send_json

            def send(self, obj):
                if self.peer == "p0" and "plan" in obj:
                    obj = {**obj, "plan": {**obj["plan"], "output": "logits"}}
                return real_send(self, obj)
            Link.send_json = send
            try:
                return parties.model_owner(certs, a0, a1, plan, weights, F, 10, lambda s: None)
            finally:
                Link.send_json = real_send
        return {"model-owner": run}

    got, errors = networked_session(certs, plan, weights, "mnist", np.zeros((2, 1, 28, 28)),
                                    F, timeout=10, spy=lying_owner)
    assert got is None
    assert "p0 holds another plan than the owners sent p1" in str(errors["p1"])


def test_a_party_from_another_ca_is_not_let_in(certs, tmp_path):
    other = tmp_path / "other"
    make_party_certificates(other, ROLES_HOSTS)
    address = f"127.0.0.1:{free_port()}"
    from fedapp.inference import parties

    errors = {}

    def p0():
        try:
            parties.computing_party(0, address, certs, None, 4, lambda s: None)
        except InferenceError as err:
            errors["p0"] = err
    thread = threading.Thread(target=p0)
    thread.start()
    time.sleep(0.3)
    with pytest.raises(InferenceError, match="is not p0 of this session"):
        connect(address, tls_context(other, "dealer", False), "p0", time.monotonic() + 3, 3)
    thread.join()
    assert "waited for data-owner, dealer, model-owner, p1 to connect" in str(errors["p0"])


def test_model_files_are_checked(housing_run, tmp_path):
    task, model, standardization = load_trained(housing_run / "model.npz")
    assert task == "housing" and standardization["mean"].shape == (14,)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_npz(SmallCNN(), wrong / "model.npz")
    (wrong / "config.json").write_text(json.dumps({"task": "mnist", "mnist-model": "cnn"}))
    with pytest.raises(InferenceError, match="does not hold a mnist McMahanCNN"):
        load_trained(wrong / "model.npz")
    with pytest.raises(InferenceError, match="encrypted: a key holder"):
        (wrong / "model.encrypted.npz").write_bytes(b"x")
        load_trained(wrong / "model.encrypted.npz")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_npz(HousingMLP(), bare / "model.npz")
    with pytest.raises(InferenceError, match="say which task"):
        load_trained(bare / "model.npz")
    with pytest.raises(InferenceError, match="standardization.npz"):
        load_trained(bare / "model.npz", task="housing")


def test_malformed_queries_are_named(tmp_path):
    bad_csv = tmp_path / "q.csv"
    bad_csv.write_text("1,2,3\n")
    with pytest.raises(InferenceError, match="rows of 13 numbers; row 1 is not"):
        read_queries("housing", bad_csv)
    images = tmp_path / "d.npy"
    np.save(images, np.zeros((2, 20, 20)))
    with pytest.raises(InferenceError, match="28x28 images"):
        read_queries("mnist", images)
    np.save(images, np.full((2, 28, 28), 300.0))
    with pytest.raises(InferenceError, match="0..255"):
        read_queries("mnist", images)
    with pytest.raises(InferenceError, match="no input file"):
        read_queries("spam", tmp_path / "none.txt")
    emails = tmp_path / "mail.txt"
    emails.write_text("cheap pills now\nmeeting at noon\n")
    rows = read_queries("spam", emails, 32)
    assert rows.shape == (2, 32) and set(np.unique(rows)) == {0.0, 1.0}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_party_that_dies_stops_every_other_with_the_cause_and_no_output(tmp_path):
    """p1 is killed (SIGKILL: no goodbye) while it answers: every other party exits
    with an error naming what happened, and the data owner writes nothing."""
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_npz(SmallCNN(), run / "model.npz")
    (run / "config.json").write_text(json.dumps({"task": "mnist", "mnist-model": "small-cnn"}))
    np.save(tmp_path / "digits.npy", np.zeros((400, 28, 28), dtype=np.uint8))
    certs = tmp_path / "certs"
    make_party_certificates(certs, ROLES_HOSTS)
    a0, a1 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    both = ["--p0", a0, "--p1", a1]
    out = tmp_path / "predictions.txt"
    commands = {
        "p0": ["p0", "--listen", a0], "p1": ["p1", "--listen", a1, "--p0", a0],
        "dealer": ["dealer", *both], "model-owner": ["model-owner", *both, "--model",
                                                     str(run / "model.npz")],
        "data-owner": ["data-owner", *both, "--task", "mnist", "--inputs",
                       str(tmp_path / "digits.npy"), "--out", str(out), "--batch-size", "10"],
    }
    procs = {r: subprocess.Popen([sys.executable, "-m", "fedapp.cli", "infer", *c, "--certs",
                                  str(certs), "--timeout", "60"], env=_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True) for r, c in commands.items()}
    try:
        for line in procs["p1"].stdout:  # wait until it is answering
            if "batch 2/40" in line:
                break
        os.killpg(procs["p1"].pid, signal.SIGKILL)
        results = {r: (p.wait(timeout=60), p.stderr.read()) for r, p in procs.items()
                   if r != "p1"}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for role, (code, err) in results.items():
        assert code == 1, (role, err)
        assert "p1" in err and ("closed the connection" in err or "lost the connection" in err
                                or "stopped" in err), (role, err)
    assert not out.exists() and not (tmp_path / "predictions.txt.part").exists()


def test_the_data_owner_hashes_emails_into_the_models_buckets(certs, tmp_path):
    """The number of buckets is public in the plan: the data owner needs no setting."""
    from clients.models import SpamModel
    from fedapp.inference.queries import predict_plain

    model = SpamModel(48)
    with torch.no_grad():
        model.embedding.weight.normal_()
    emails = tmp_path / "mail.txt"
    emails.write_text("cheap pills buy now\nthe meeting moved to noon\nwin money now now\n")
    plan, weights = compile_model(model, "spam")
    got, errors = networked_session(
        certs, plan, weights, "spam",
        lambda public: read_queries("spam", emails, public["input_shape"][0]), F)
    assert not errors, errors
    assert (got == predict_plain("spam", model, None, read_queries("spam", emails, 48))).all()
