"""Helpers shared by several test modules (plain functions and constants; the fixtures
are in tests/conftest.py). Topic modules: ``fakes`` (stand-ins for Flower's client
proxies), ``fuzzing`` (the fuzz tests' generators and checks), ``dp`` (central DP and
DP-SGD), ``masking`` and ``paillier`` (the secure strategies' in-process rounds)."""

from __future__ import annotations

import importlib.util
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from flwr.app import Context, Metadata, RecordDict


ROOT = Path(__file__).resolve().parents[2]  # the project (tests/helpers/..)


def load_script(name: str):
    """A module from scripts/ (not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_checkout(dest: Path) -> Path:
    """The project's files as a clone has them (tracked and new, not ignored ones)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    app = dest / "fedprivacy"
    for name in names:
        if (ROOT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            (app / name).write_bytes((ROOT / name).read_bytes())
    return app


TLS_FILES = ("ca.crt", "server.pem", "server.key")


# ---------------------------------------------------------------- Flower messages built in-process
@contextmanager
def flower_task_identity():
    """The run and node ids that messages built outside a Flower process need, for the
    ``with`` block (the ``task_identity`` fixture does the same for a whole test)."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        for name in ("_run_id", "_node_id", "_task_id"):
            patch.setattr(TaskIdentity, name, 1, raising=False)
        yield


def metadata(node: int, kind: str = "train") -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
                    message_type=kind)


def new_context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


# ------------------------------------------------------------------ shared constants
AUTH = bytes(range(32))  # the federation's masking authentication key

CLIP = 2.0  # the secure strategies' clip

RUN = 1  # the run id of new_context and of the tests' Paillier updates

SHAPES = {"w": (40, 3), "b": (3,)}  # 123 values: 2 ciphertexts of 63 slots

# A fit config of the NumPy clients.
TRAIN = {"local-epochs": 1, "batch-size": 32, "learning-rate": 0.01, "optimizer": "adam",
         "server-round": 1}
