"""What a run writes (fedapp.outputs): metrics as JSON, CSV and a plot, and the
config; a recorder reopened at a checkpoint."""

from __future__ import annotations

import csv
import json

from fedapp.outputs import RunRecorder


def test_recorder_writes_json_csv_png_and_config(tmp_path):
    rec = RunRecorder.create(tmp_path, "mnist", 7)
    rec.write_config({"task": "mnist"})
    rec.add_round({"round": 0, "central-accuracy": 0.1})
    rec.add_round({"round": 1, "seconds": 2.0, "bytes-down": 10, "bytes-up": 5,
                   "fed-loss": 0.5, "fed-accuracy": 0.8, "central-accuracy": 0.7})
    png = rec.plot()
    assert rec.directory.name.endswith("-mnist-7")
    assert json.loads((rec.directory / "metrics.json").read_text())[1]["fed-loss"] == 0.5
    rows = list(csv.DictReader(open(rec.directory / "metrics.csv")))
    assert rows[1]["bytes-up"] == "5" and rows[0]["seconds"] == ""
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((rec.directory / "config.json").read_text()) == {"task": "mnist"}


def test_reopened_recorder_drops_rounds_past_the_checkpoint(tmp_path):
    rec = RunRecorder(tmp_path)
    for rnd in range(4):
        rec.add_round({"round": rnd, "seconds": 1.0})
    again = RunRecorder.reopen(tmp_path, 2)
    assert [r["round"] for r in again.rows] == [0, 1, 2]
    again.add_round({"round": 3, "seconds": 2.0})
    assert [r["round"] for r in json.loads((tmp_path / "metrics.json").read_text())] == \
        [0, 1, 2, 3]
