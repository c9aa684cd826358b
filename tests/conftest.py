"""Shared fixtures. The real data sets come from $FEDAPP_TEST_DATA (CI points it at
../shared/data); without them the data tests fail loudly rather than skip.

Plain helper functions, fakes and the fuzzing toolkit live in ``tests/helpers/``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import settings

from strategies.aggregation import Layout
from strategies.encoding import EncodingParams
from strategies.paillier import Encryptor, PrivateKey, PublicKey, generate_keypair
from strategies.paillier_protocol import encrypt_update
from strategies.paillier_tags import TagKey
from tests.helpers import CLIP, ROOT, RUN, load_script
from tests.helpers.fuzzing import SHAPES, WEIGHTS, plain_model

# Shared 2-core machines: timing is noise, so no per-example deadlines.
settings.register_profile("fedapp", deadline=None)
settings.load_profile("fedapp")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("FEDAPP_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
    assert (path / "mnist").is_dir(), (
        f"test data not found at {path}: set FEDAPP_TEST_DATA to the shared data directory")
    return path


SIMULATED_NODES = 16  # identity keys for the partitions of the tests' simulations


@pytest.fixture(scope="session", autouse=True)
def node_key_dir(tmp_path_factory) -> Path:
    """The client nodes' key directory for every test (never the user's ~/.fedapp/keys):
    ``$FEDAPP_KEY_DIR``, holding masking identity keys for partitions 0-15 and their
    roster, so simulated nodes (they inherit the environment) sign their keys
    (in-process nodes get their own through ``tests.helpers.new_context``). A test of a
    node without keys points ``$FEDAPP_KEY_DIR`` at an empty directory."""
    from strategies.keyfiles import KEY_DIR_ENV, write_simulation_identities

    directory = tmp_path_factory.mktemp("node-keys")
    write_simulation_identities(directory, SIMULATED_NODES)
    old = os.environ.get(KEY_DIR_ENV)
    os.environ[KEY_DIR_ENV] = str(directory)
    yield directory
    if old is None:
        os.environ.pop(KEY_DIR_ENV, None)
    else:
        os.environ[KEY_DIR_ENV] = old


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a Flower process need the run and node ids set."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


@pytest.fixture
def flwr_caplog(caplog):
    """caplog that also sees Flower's logger, whether or not it propagates."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def caplog_flwr(flwr_caplog):
    """The fuzz tests' name for ``flwr_caplog``."""
    return flwr_caplog


# -------------------------------------- Paillier keys (one real 2048-bit key pair for the session)
@pytest.fixture(scope="session")
def keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(2048)


@pytest.fixture(scope="session")
def node_keys(keypair, tmp_path_factory) -> tuple[Path, Path]:
    """A key directory as ``fedapp keygen`` and ``fedapp keygen --secagg --simulation
    16`` fill it (the session's key pair, masking identity keys and their roster): the
    public and private key files. Simulated nodes find it through ``$FEDAPP_KEY_DIR``."""
    import json

    from strategies.keyfiles import (PRIVATE_NAME, PUBLIC_NAME, write_secret,
                                     write_simulation_identities)

    directory = tmp_path_factory.mktemp("keys")
    write_secret(directory / PRIVATE_NAME, json.dumps(keypair[1].to_dict()))
    (directory / PUBLIC_NAME).write_text(json.dumps(keypair[0].to_dict()))
    write_simulation_identities(directory, SIMULATED_NODES)
    return directory / PUBLIC_NAME, directory / PRIVATE_NAME


@pytest.fixture(scope="session")
def keys(keypair):
    """The fuzz tests' name for ``keypair``."""
    return keypair


@pytest.fixture(scope="session")
def encryptor(keypair) -> Encryptor:
    """The clients' fast path: subgroup randomizer with CRT (the private key is known)."""
    return Encryptor(*keypair)


@pytest.fixture(scope="module")
def paillier(keys, encryptor) -> dict:
    """A round's encoding and layout, and two clients' encrypted updates."""
    params = EncodingParams.for_key(keys[0].n_bits, 1000, clip=CLIP)
    models = [plain_model(seed) for seed in (1, 2)]
    layout = Layout.of(list(SHAPES), list(models[0].values()))
    tag_key = TagKey.from_private_key(keys[1])

    def updates_for(layout):  # nodes 1, 2 of run RUN, round 1
        return [encrypt_update(list(m.values()), layout, w, params, encryptor, tag_key,
                               run=RUN, server_round=1, node=node)
                for node, (m, w) in enumerate(zip(models, WEIGHTS, strict=True), 1)]

    updates = updates_for(layout)
    legacy_updates = updates_for(Layout.of(["0", "1"], list(models[0].values())))  # as compat
    return {"params": params, "layout": layout, "models": models, "updates": updates,
            "legacy_updates": legacy_updates}


@pytest.fixture(scope="session")
def other_public_key():
    """A second federation's key, for replies encrypted under the wrong key."""
    return generate_keypair(2048)[0]


# ------------------------------------------------------------------ TLS certificates
@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tls") / 'my "certs"'  # a quote must not break TOML
    load_script("make_certificates").make_certificates(out, ["127.0.0.1", "localhost"])
    return out


@pytest.fixture(scope="session")
def threshold_key_dir(tmp_path_factory) -> Path:
    """A real 2048-bit 2-of-3 threshold key dealt by ``fedapp keygen --threshold 2
    --shares 3`` (once: safe primes take seconds)."""
    from fedapp import cli

    directory = tmp_path_factory.mktemp("threshold-key")
    assert cli.main(["keygen", "--threshold", "2", "--shares", "3", "--out",
                     str(directory)]) == 0
    return directory
