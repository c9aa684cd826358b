"""A run's directory: resolved config, per-round metrics (JSON, CSV, PNG), its status,
an HTML report, the final model."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

STATUS_NAME = "status.json"
FIRST_COLUMNS = ["round", "seconds", "bytes-down", "bytes-up", "train-clients", "train-failures"]


#: Housing's standardization beside its model (features then target).
STANDARDIZATION_FILE = "standardization.npz"


class RunRecorder:
    """Writes everything a run leaves behind into one directory.

    Files are rewritten after every round, so a run stopped half-way still
    leaves its metrics up to the last finished round.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.config: dict[str, Any] | None = None
        if not (directory / STATUS_NAME).is_file():
            self.set_status("running", publish=False)

    @staticmethod
    def create(base: Path, task: str, run_id: int | str) -> RunRecorder:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return RunRecorder(base / f"{stamp}-{task}-{run_id}")

    @staticmethod
    def reopen(directory: Path, last_round: int | None = None) -> RunRecorder:
        """Go on writing into ``directory`` (a resumed run): keep its metrics up to
        ``last_round`` (all if None), drop any row of a round the checkpoint does not
        hold."""
        rec = RunRecorder(directory)
        metrics = directory / "metrics.json"
        if metrics.is_file():
            rec.rows = [r for r in json.loads(metrics.read_text())
                        if last_round is None or r["round"] <= last_round]
        return rec

    def status(self) -> dict[str, Any]:
        """``status.json``: ``status`` (running, completed, failed), ``detail``, ``time``."""
        return json.loads((self.directory / STATUS_NAME).read_text())

    def set_status(self, status: str, detail: str = "", publish: bool = True) -> None:
        """Say how the run stands in ``status.json`` (and, with ``publish``, in the
        plot and report). A resumed run says ``running`` again."""
        record = {"status": status, "detail": detail,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        (self.directory / STATUS_NAME).write_text(json.dumps(record, indent=2))
        if publish:
            self.publish()

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
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

    def save_standardization(self, config: dict) -> None:
        """Housing's federated mean and std (``norm-mean``/``norm-std`` config bytes) as
        ``standardization.npz``: part of the model for anyone who predicts with it."""
        if "norm-mean" in config:
            self.save_arrays(STANDARDIZATION_FILE, {
                k: np.frombuffer(config[f"norm-{k}"], dtype="<f8") for k in ("mean", "std")})

    def _config(self) -> dict[str, Any]:
        if self.config is None and (self.directory / "config.json").is_file():
            self.config = json.loads((self.directory / "config.json").read_text())
        return self.config or {}

    def title(self) -> str:
        """What the run was: task, aggregation, central DP, and its directory (run id)."""
        config = self._config()
        z = config.get("dp-noise-multiplier") or 0
        kind = config.get("dp-mode") or "central"
        return " | ".join([str(config.get("task", "?")), str(config.get("aggregation", "?")),
                           f"{kind} DP z = {z:g}" if z else "no central DP",
                           f"run {self.directory.name}"])

    def figure(self):
        """One panel per metric family (losses, accuracy/MSE, epsilon, clients, seconds,
        megabytes), three a row, rounds as integers, a log scale for a loss that
        explodes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        keys = sorted({k for r in self.rows for k in r} - {"round"})
        families = {
            "loss": [k for k in keys if k.endswith("loss")],
            "accuracy": [k for k in keys if k.endswith("accuracy")],
            "MSE": [k for k in keys if k.endswith("mse")],
            "privacy spent (epsilon)": [k for k in keys if k.endswith("epsilon")],
            "clients per round": ["train-clients", "train-failures"],
            "seconds per round": ["seconds"],
            "MB per round": ["bytes-down", "bytes-up"],
        }
        scale = {"MB per round": 1e-6}
        series = {t: {k: [(r["round"], r[k] * scale.get(t, 1)) for r in self.rows
                          if isinstance(r.get(k), (int, float))] for k in ks}
                  for t, ks in families.items()}
        series = {t: {k: pts for k, pts in s.items() if pts} for t, s in series.items()}
        series = {t: s for t, s in series.items() if s}
        panels = max(len(series), 1)
        cols = min(panels, 3)  # three a row: readable on a page and in the report
        rows = -(-panels // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.4),
                                 squeeze=False)
        for ax in axes.flat[panels:]:
            fig.delaxes(ax)
        for ax, (name, lines) in zip(axes.flat, series.items()):
            for k, pts in lines.items():
                ax.plot(*zip(*pts), marker="o", label=k)
            values = [v for pts in lines.values() for _, v in pts]
            if name == "loss" and min(values) > 0 and max(values) > 1e3 * min(values):
                ax.set_yscale("log")  # a loss that explodes would flatten the others
            ax.set_title(name)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if name == "clients per round":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
        fig.suptitle(self.title(), fontsize=9)
        fig.tight_layout()
        return fig

    def publish(self) -> Path:
        """Write the figure (``metrics.png``) and the HTML report (``report.html``,
        self-contained: the figure is embedded); returns the report's path."""
        from .modes import MODES
        from .report import render

        png = None
        if self.rows:
            import matplotlib.pyplot as plt

            fig = self.figure()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            plt.close(fig)
            png = buffer.getvalue()
            (self.directory / "metrics.png").write_bytes(png)
        config = self._config()
        mode = MODES.get(str(config.get("aggregation")))
        files = sorted(p.name for p in self.directory.iterdir()
                       if p.is_file() and p.name != "report.html")
        path = self.directory / "report.html"
        path.write_text(render(self.title(), config, self.rows, self.status(), png, files,
                               mode.server_sees if mode else None))
        return path
