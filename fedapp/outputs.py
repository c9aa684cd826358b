"""A run's directory: resolved config, per-round metrics (JSON, CSV, PNG), final model."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

FIRST_COLUMNS = ["round", "seconds", "bytes-down", "bytes-up", "train-clients", "train-failures"]


class RunRecorder:
    """Writes everything a run leaves behind into one directory.

    Files are rewritten after every round, so a run stopped half-way still
    leaves its metrics up to the last finished round.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def create(base: Path, task: str, run_id: int | str) -> RunRecorder:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return RunRecorder(base / f"{stamp}-{task}-{run_id}")

    @staticmethod
    def reopen(directory: Path, last_round: int) -> RunRecorder:
        """Go on writing into ``directory`` (a resumed run): keep its metrics up to
        ``last_round``, drop any row of a round the checkpoint does not hold."""
        rec = RunRecorder(directory)
        metrics = directory / "metrics.json"
        if metrics.is_file():
            rec.rows = [r for r in json.loads(metrics.read_text()) if r["round"] <= last_round]
        return rec

    def write_config(self, config: dict[str, Any]) -> None:
        (self.directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    def add_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        (self.directory / "metrics.json").write_text(json.dumps(self.rows, indent=2))
        columns = FIRST_COLUMNS + sorted({k for r in self.rows for k in r} - set(FIRST_COLUMNS))
        with open(self.directory / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.directory / name
        np.savez(path, **arrays)
        return path

    def plot(self) -> Path:
        """One panel per metric family (losses, accuracy/MSE, seconds, bytes)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({k for r in self.rows for k in r} - {"round", "train-clients", "train-failures"})
        families = {
            "loss": [k for k in keys if k.endswith("loss")],
            "accuracy": [k for k in keys if k.endswith("accuracy")],
            "MSE": [k for k in keys if k.endswith("mse")],
            "seconds per round": ["seconds"],
            "bytes per round": ["bytes-down", "bytes-up"],
        }
        families = {t: ks for t, ks in families.items() if ks}
        fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4))
        for ax, (title, ks) in zip(np.atleast_1d(axes), families.items()):
            for k in ks:
                pts = [(r["round"], r[k]) for r in self.rows if r.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=k)
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = self.directory / "metrics.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
