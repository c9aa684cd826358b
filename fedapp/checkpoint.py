"""The server's state after each finished round, in the run directory, to resume from.

One file, ``checkpoint.npz``: the global arrays (ciphertexts under Paillier), the
config entries every round sends (housing's federated standardization, so a
resumed run scales features as before) and a JSON entry with the round number and
the strategy's state (central DP's accountant and clipping norm). It is written to a temporary file and renamed, so a
crash mid-write leaves the previous round's checkpoint whole. Read back with
``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedapp.config import MUST_MATCH  # the settings a resumed run must keep

FILE = "checkpoint.npz"
_STATE = "__state__"  # the JSON entry; model array names never start with "__"
_CONFIG = "__config__/"  # prefix of the config entries (bytes)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


@dataclass
class Checkpoint:
    """The server's state after round ``round``."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any] = field(default_factory=dict)
    config: dict[str, bytes] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write atomically to ``directory / checkpoint.npz``."""
        path = directory / FILE
        tmp = directory / f".{FILE}.tmp"
        state = json.dumps({"round": self.round, "strategy": self.strategy}).encode()
        with open(tmp, "wb") as f:
            np.savez(f, **self.arrays, **{_STATE: np.frombuffer(state, dtype=np.uint8)},
                     **{_CONFIG + k: np.frombuffer(v, dtype=np.uint8)
                        for k, v in self.config.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(directory: Path) -> Checkpoint:
        """Read ``directory / checkpoint.npz``.

        Raises
        ------
        CheckpointError
            If there is none or it cannot be read.
        """
        path = directory / FILE
        if not path.is_file():
            raise CheckpointError(f"no {FILE} in {directory}: resume-from must name the run "
                                  "directory of a run that finished at least one round")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            state = json.loads(arrays.pop(_STATE).tobytes())
            config = {k[len(_CONFIG):]: arrays.pop(k).tobytes()
                      for k in list(arrays) if k.startswith(_CONFIG)}
            return Checkpoint(int(state["round"]), arrays, dict(state["strategy"]), config)
        except (OSError, EOFError, ValueError, KeyError, TypeError,
                zipfile.BadZipFile) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err


def check_compatible(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """:class:`CheckpointError` unless the settings in :data:`fedapp.config.MUST_MATCH` agree."""
    differ = [f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now"
              for k in MUST_MATCH if saved.get(k) != current.get(k)]
    if differ:
        raise CheckpointError(f"cannot resume {directory} with different settings ("
                              + "; ".join(differ) + "): use the settings of that run")
