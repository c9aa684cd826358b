"""The run report (fedapp.report): what it says per mode and DP setting, checked in the
HTML, and what a reader sees, checked by rendering it in headless Chromium (Debian's
``chromium`` package, installed by .ci/run) with every network name unresolvable."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedapp.outputs import RunRecorder
from fedapp.report import WHO_SEES

C0_BLUE = np.array([31, 119, 180])  # matplotlib's first line colour: the curves drew
COMPLETED_GREEN = np.array([0xDF, 0xF3, 0xDF])
FAILED_RED = np.array([0xF8, 0xD7, 0xD7])


def dp_run(directory: Path, status: str = "completed", detail: str = "") -> RunRecorder:
    rec = RunRecorder(directory)
    rec.write_config({"task": "mnist", "aggregation": "secagg", "num-server-rounds": 3,
                      "dp-noise-multiplier": 1.0, "dp-clip": 0.5, "dp-delta": 1e-5,
                      "dp-sampling": "poisson", "dp-max-epsilon": 8.0, "dp-sgd": False})
    rec.add_round({"round": 0, "central-accuracy": 0.1})
    for rnd in (1, 2, 3):
        rec.add_round({"round": rnd, "seconds": 3.0, "bytes-up": 2e6, "bytes-down": 4e6,
                       "train-clients": 20, "train-failures": 0, "fed-loss": 1.0 / rnd,
                       "central-accuracy": 0.5 + 0.1 * rnd, "train-dp-epsilon": 0.7 * rnd})
    rec.set_status(status, detail)
    return rec


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("src", "href") and v]


def test_report_says_what_the_server_saw_and_the_budget_spent(tmp_path):
    page = dp_run(tmp_path).publish().read_text()
    assert "mnist | secagg | central DP z = 1 | run" in page
    assert "Rounds finished: 3 of 3" in page
    for who, sees in WHO_SEES["masked"]:
        assert sees.replace("'", "&#x27;") in page
    assert "the server draws the noise" in page  # central DP's row
    assert "epsilon 2.1 at delta 1e-05 after 3 round(s), of a budget of 8" in page
    assert "swamps" not in page  # z = 1 with 20 clients a round
    links = Links()
    links.feed(page)
    assert links.targets and all(not re.match(r"[a-z]+://|//", t) for t in links.targets)
    assert any(t.startswith("data:image/png;base64,") for t in links.targets)
    assert "config.json" in links.targets and "metrics.json" in links.targets


@pytest.mark.parametrize("aggregation,sees", [("fedavg", "plain"), ("paillier", "encrypted")])
def test_each_mode_gets_its_own_table_and_no_dp_says_so(tmp_path, aggregation, sees):
    rec = RunRecorder(tmp_path)
    rec.write_config({"task": "housing", "aggregation": aggregation, "dp-noise-multiplier": 0})
    rec.add_round({"round": 1, "seconds": 1.0, "train-clients": 3})
    page = rec.publish().read_text()
    assert WHO_SEES[sees][0][1].replace("'", "&#x27;") in page
    assert "No differential privacy" in page and "the server draws the noise" not in page


def test_distributed_dp_says_the_clients_add_the_noise(tmp_path):
    rec = dp_run(tmp_path)
    rec.write_config({**rec._config(), "dp-mode": "distributed"})
    page = rec.publish().read_text()
    assert "mnist | secagg | distributed DP z = 1 | run" in page
    assert "so every sum anyone can unmask" in page
    assert "the server draws the noise" not in page
    assert "Distributed DP (noise multiplier 1" in page


def test_noise_that_swamps_the_updates_is_flagged(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.write_config({"task": "housing", "aggregation": "fedavg", "dp-noise-multiplier": 3.0,
                      "dp-clip": 1.0, "dp-delta": 1e-5, "dp-sampling": "poisson"})
    rec.add_round({"round": 1, "seconds": 1.0, "train-clients": 2, "train-dp-epsilon": 0.4})
    page = rec.publish().read_text()
    assert "1.5 C with about 2 clients per round" in page and "swamps" in page


def test_dp_sgd_reports_the_clients_epsilon(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.write_config({"task": "mnist", "aggregation": "fedavg", "dp-sgd": True,
                      "dp-sgd-noise-multiplier": 1.1, "dp-sgd-max-grad-norm": 1.0,
                      "dp-delta": 1e-5})
    rec.add_round({"round": 1, "train-dp-sgd-epsilon": 3.25})
    page = rec.publish().read_text()
    assert "Client-side DP-SGD" in page and "3.25" in page


def test_settings_and_metrics_are_escaped(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.write_config({"task": "<script>alert(1)</script>", "aggregation": "fedavg"})
    rec.set_status("failed", "ValueError: bad <b>value</b>")
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>value</b>" not in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, ("the report test renders report.html in headless Chromium: install "
                   "Debian's package (apt-get install chromium), as .ci/run does")
    return found


def render(page: Path, out: Path) -> tuple[np.ndarray, str]:
    """A screenshot (RGB pixels) and the rendered DOM, offline."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={out / 'profile'}",
            "--window-size=1400,2600"]
    shot = out / "shot.png"
    done = subprocess.run([*base, f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(int), dom.stdout


def pixels_like(image: np.ndarray, colour: np.ndarray, tolerance: int = 6) -> int:
    return int((np.abs(image - colour).max(axis=2) <= tolerance).sum())


def test_a_reader_sees_the_status_the_privacy_and_the_curves_offline(tmp_path):
    runs = {"completed": dp_run(tmp_path / "done"),
            "failed": dp_run(tmp_path / "failed", "failed", "RuntimeError: round 3 timed out")}
    seen = {}
    for name, rec in runs.items():
        image, dom = render(rec.directory / "report.html", tmp_path / f"chrome-{name}")
        seen[name] = image
        text = re.sub(r"<[^>]+>", " ", dom)
        text = re.sub(r"\s+", " ", text)
        assert "Who sees what" in text and "Privacy budget" in text
        assert "epsilon 2.1 at delta 1e-05" in text
        assert pixels_like(image, C0_BLUE) > 200, "the curves did not render"
    assert "RuntimeError: round 3 timed out" in render(
        runs["failed"].directory / "report.html", tmp_path / "chrome-again")[1]
    # the status box: green for the finished run, red for the failed one
    assert pixels_like(seen["completed"], COMPLETED_GREEN, 2) > 1000
    assert pixels_like(seen["completed"], FAILED_RED, 2) == 0
    assert pixels_like(seen["failed"], FAILED_RED, 2) > 1000
