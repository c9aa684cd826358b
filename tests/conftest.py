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
