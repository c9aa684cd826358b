"""What a run writes (fedapp.outputs): metrics as JSON, CSV and a plot, the config,
its status and report; a recorder reopened at a checkpoint."""

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
    assert rec.status()["status"] == "running"  # from the start: a killed run says so
    report = rec.publish()
    png = rec.directory / "metrics.png"
    assert report.name == "report.html" and "<img" in report.read_text()
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


def test_the_plot_says_what_the_run_was_and_reads_at_a_glance(tmp_path):
    rec = RunRecorder.create(tmp_path, "spam", 42)
    rec.write_config({"task": "spam", "aggregation": "secagg", "dp-noise-multiplier": 1.5})
    rec.add_round({"round": 0, "central-accuracy": 0.5})
    for rnd, loss in [(1, 0.7), (2, 0.5), (3, 9000.0)]:  # the loss explodes in round 3
        rec.add_round({"round": rnd, "seconds": 2.0, "bytes-up": 3_000_000,
                       "bytes-down": 6_000_000, "train-clients": 4, "train-failures": rnd - 1,
                       "fed-loss": loss, "central-accuracy": 0.8,
                       "train-dp-epsilon": 0.5 * rnd})
    fig = rec.figure()
    assert fig._suptitle.get_text() == f"spam | secagg | central DP z = 1.5 | run " \
                                       f"{rec.directory.name}"
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss", "accuracy", "privacy spent (epsilon)", "clients per round",
                          "seconds per round", "MB per round"]
    assert axes["loss"].get_yscale() == "log"
    assert axes["accuracy"].get_yscale() == "linear"
    mb = {line.get_label(): list(line.get_ydata()) for line in axes["MB per round"].lines}
    assert mb == {"bytes-down": [6.0, 6.0, 6.0], "bytes-up": [3.0, 3.0, 3.0]}
    assert [line.get_label() for line in axes["clients per round"].lines] == \
        ["train-clients", "train-failures"]
    for ax in fig.axes:  # whole rounds only
        assert all(float(t).is_integer() for t in ax.get_xticks())
    # a run without a written config (an old directory) still gets a title
    assert RunRecorder(tmp_path / "old").title().startswith("? | ? | no central DP")


def test_status_says_how_the_run_ended_and_the_report_follows(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.write_config({"task": "housing", "aggregation": "fedavg"})
    rec.set_status("failed", "RuntimeError: no update arrived")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and status["detail"] == "RuntimeError: no update arrived"
    page = (tmp_path / "report.html").read_text()
    assert "RuntimeError: no update arrived" in page and "No round finished yet" in page
    assert not (tmp_path / "metrics.png").exists()  # nothing to plot
    # reopening (a resumed run) keeps the status until the run says otherwise
    assert RunRecorder.reopen(tmp_path).status()["status"] == "failed"
