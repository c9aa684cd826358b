"""Helpers shared by several test modules (plain functions and constants; the fixtures
are in tests/conftest.py). Topic modules: ``fakes`` (stand-ins for Flower's client
proxies), ``fuzzing`` (the fuzz tests' generators and checks), ``dp`` (central DP and
DP-SGD), ``masking`` and ``paillier`` (the secure strategies' in-process rounds)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from flwr.app import Context, Metadata, RecordDict

from strategies.secagg_identity import Identity, NodeIdentity, Roster


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
    """A node's context, with its own masking identity key and the roster."""
    return Context(run_id=1, node_id=node, node_config=IDENTITY.node_config(node),
                   state=RecordDict(), run_config={})


# ------------------------------------------------------------------ shared constants
class TestIdentities:
    """Masking identity keys for test nodes: each node's own Ed25519 key (derived from
    its id, so tests are reproducible) and a roster of every node given one so far.
    ``IDENTITY(u)`` is node ``u``'s :class:`NodeIdentity`; register a round's nodes
    first (:meth:`register`) so that the roster lists its neighbors."""

    def __init__(self) -> None:
        self.keys: dict[int, Identity] = {}
        self._roster: Roster | None = None
        self._dir: Path | None = None

    def register(self, nodes) -> None:
        for u in nodes:
            if u not in self.keys:
                self.keys[u] = Identity(hashlib.sha256(b"test identity %d" % u).digest())
                self._roster = None

    def __call__(self, node: int) -> NodeIdentity:
        self.register([node])
        if self._roster is None:
            self._roster = Roster.of(k.public for k in self.keys.values())
        return NodeIdentity(self.keys[node], self._roster)


    def node_config(self, node: int) -> dict[str, str]:
        """Node config naming ``node``'s identity key file and the roster file, in a
        directory of this session (the roster is rewritten as nodes are added: nodes
        read it at every stage)."""
        from strategies.keyfiles import write_identity_key, write_roster

        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="test-identities-"))
        self.register([node])
        key = self._dir / f"{node}.key"
        if not key.exists():
            write_identity_key(key, self.keys[node])
            write_roster(self._dir / "roster.json", [k.public for k in self.keys.values()])
        return {"secagg-identity-key": str(key), "secagg-roster": str(self._dir / "roster.json")}


IDENTITY = TestIdentities()

CLIP = 2.0  # the secure strategies' clip

RUN = 1  # the run id of new_context and of the tests' Paillier updates

SHAPES = {"w": (40, 3), "b": (3,)}  # 123 values: 2 ciphertexts of 63 slots

# A fit config of the NumPy clients.
TRAIN = {"local-epochs": 1, "batch-size": 32, "learning-rate": 0.01, "optimizer": "adam",
         "server-round": 1}
