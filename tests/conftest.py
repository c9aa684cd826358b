"""Shared fixtures. The real data sets come from $FEDAPP_TEST_DATA (CI points it at
../shared/data); without them the data tests fail loudly rather than skip."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import settings

# Shared 2-core machines: timing is noise, so no per-example deadlines.
settings.register_profile("fedapp", deadline=None)
settings.load_profile("fedapp")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("FEDAPP_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
    assert (path / "mnist").is_dir(), (
        f"test data not found at {path}: set FEDAPP_TEST_DATA to the shared data directory")
    return path


@pytest.fixture(scope="session", autouse=True)
def node_key_dir(tmp_path_factory) -> Path:
    """The client nodes' key directory for every test (never the user's ~/.fedapp/keys):
    ``$FEDAPP_KEY_DIR``, holding the masking authentication key, so in-process nodes
    and simulated ones (they inherit the environment) authenticate their keys. A test
    of a node without keys points ``$FEDAPP_KEY_DIR`` at an empty directory."""
    from strategies.keyfiles import KEY_DIR_ENV, write_auth_key

    directory = tmp_path_factory.mktemp("node-keys")
    write_auth_key(directory)
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
