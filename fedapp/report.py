"""A run's report: one self-contained HTML page (``report.html``) in its directory.

It needs no network to open: the curves are the run's plot embedded as a PNG data URI,
and there is no script and no external style sheet. It says what the run was and how it
ended, what the server could see of the clients' updates in its mode (a short form of
docs/threat-model.md), the privacy budget spent, the curves, every round's figures and
every setting.
"""

from __future__ import annotations

import base64
import html
from typing import Any

# A short form of docs/threat-model.md, by what the server sees (``Mode.server_sees``).
WHO_SEES: dict[str, list[tuple[str, str]]] = {
    "plain": [
        ("the server", "every client's update, in plaintext"),
        ("a client", "the global model"),
        ("the server with one client", "every update (as the server alone)"),
        ("keys", "none"),
    ],
    "encrypted": [
        ("the server", "Paillier ciphertexts, each client's weight, the encrypted aggregate; "
                       "no model value (the final model is saved encrypted)"),
        ("a client", "the global model (decrypted with the shared private key)"),
        ("the server with one client", "every client's update: the client's key decrypts "
                                       "every ciphertext"),
        ("keys", "the private key on client nodes only; the server holds the public key"),
    ],
    "sealed": [
        ("the server", "threshold-Paillier ciphertexts and each client's weight; partials and "
                       "the model sealed under the clients' group key: no model value"),
        ("a client", "the global model (opened with the group key)"),
        ("the server with T - 1 clients", "no single update: decryptors decrypt only "
                                         "aggregates of at least T + 1 contributions, one "
                                         "per contributor and round"),
        ("keys", "key shares on T-of-N decryptor nodes, the group key on client nodes, an "
                 "identity key per node; the server holds the public key"),
    ],
    "masked": [
        ("the server", "masked updates (random to it) and the sum of the survivors' updates, "
                       "which is the global model"),
        ("a client", "the global model"),
        ("the server with one client", "only the sum: one client's shares unmask no one"),
        ("keys", "fresh pairwise keys per round on each node; an identity key per node"),
    ],
}
CENTRAL_DP_SEES = ("with central DP", "the released model is noised, (epsilon, delta)-DP for "
                   "each client's whole update; the server draws the noise and must be "
                   "trusted to add it")
DISTRIBUTED_DP_SEES = ("with distributed DP", "the released model is noised, (epsilon, delta)-DP "
                       "for each client's whole update; each client adds its share of the "
                       "noise before masking or encrypting, so every sum anyone can unmask "
                       "or decrypt is a noised one")

STATUS_TEXT = {
    "running": "running, or stopped before it could say how it ended",
    "completed": "completed",
    "failed": "failed",
}

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { padding: 0.5em 0.8em; border-radius: 4px; display: inline-block; }
.completed { background: #dff3df; } .failed { background: #f8d7d7; }
.running { background: #fff3cd; }
.warning { background: #fff3cd; padding: 0.5em 0.8em; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return _e("" if value is None else value)


def _table(header: list[str], rows: list[list[Any]], numeric: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cell = '<td class="num">{}</td>' if numeric else "<td>{}</td>"
    body = "".join("<tr>" + "".join(cell.format(_number(v)) for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def privacy_budget(config: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Sentences on the differential privacy of the run: the epsilon spent (central DP,
    client-side DP-SGD), or that the run had none."""
    lines = []
    z = config.get("dp-noise-multiplier") or 0
    delta = config.get("dp-delta")
    if z:
        spent = [r["train-dp-epsilon"] for r in rows if "train-dp-epsilon" in r]
        budget = config.get("dp-max-epsilon") or 0
        lines.append(
            f"{'Distributed' if config.get('dp-mode') == 'distributed' else 'Central'} DP "
            f"(noise multiplier {z:g}, clip {config.get('dp-clip')}, "
            f"{config.get('dp-sampling')} sampling): epsilon "
            + (f"{spent[-1]:.4g}" if spent else "not yet spent")
            + f" at delta {delta:g} after {len(spent)} round(s)"
            + (f", of a budget of {budget:g}" if budget else ", no budget set") + ".")
    if config.get("dp-sgd"):
        spent = [r["train-dp-sgd-epsilon"] for r in rows if "train-dp-sgd-epsilon" in r]
        lines.append(
            "Client-side DP-SGD (noise multiplier "
            f"{config.get('dp-sgd-noise-multiplier')}, max grad norm "
            f"{config.get('dp-sgd-max-grad-norm')}): each client's own epsilon at delta "
            f"{delta:g}, as the clients report it (mean over the last round's clients): "
            + (f"{spent[-1]:.4g}" if spent else "none reported") + ".")
    if not lines:
        lines.append("No differential privacy: the model and metrics carry no formal "
                     "privacy guarantee.")
    else:
        lines.append("Epsilon covers the released model, not the metrics in this report.")
    return lines


def render(title: str, config: dict[str, Any], rows: list[dict[str, Any]],
           status: dict[str, Any], plot_png: bytes | None, files: list[str],
           server_sees: str | None) -> str:
    """The report's HTML.

    Parameters
    ----------
    title : str
        What the run was (task, aggregation, DP, run directory).
    config : dict[str, Any]
        The run's resolved settings (``config.json``).
    rows : list[dict[str, Any]]
        One row per round (``metrics.json``).
    status : dict[str, Any]
        ``status`` (``running``, ``completed`` or ``failed``), optionally ``detail``
        and ``time``.
    plot_png : bytes, optional
        The curves, as PNG bytes; embedded.
    files : list[str]
        The files of the run directory, linked by relative path.
    server_sees : str, optional
        What the server sees in the run's mode (``plain``, ``masked``, ``encrypted``);
        None for a mode this app does not know.

    Returns
    -------
    str
        A complete HTML document.
    """
    state = status.get("status", "running")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p class=\"status {_e(state)}\" id=\"status\"><b>Status:</b> "
             f"{_e(STATUS_TEXT.get(state, state))}"
             + (f": {_e(status['detail'])}" if status.get("detail") else "")
             + (f" ({_e(status['time'])})" if status.get("time") else "") + "</p>"]
    planned = config.get("num-server-rounds")
    done = max((r["round"] for r in rows), default=0)
    parts.append(f"<p>Rounds finished: {done}" + (f" of {_e(planned)}" if planned else "")
                 + "</p>")

    parts.append("<h2>Who sees what</h2>")
    aggregation = config.get("aggregation", "?")
    if server_sees in WHO_SEES:
        who = list(WHO_SEES[server_sees])
        if config.get("dp-noise-multiplier"):
            who.append(DISTRIBUTED_DP_SEES if config.get("dp-mode") == "distributed"
                       else CENTRAL_DP_SEES)
        parts.append(f"<p>Aggregation <b>{_e(aggregation)}</b> (details: "
                     "docs/threat-model.md).</p>" + _table(["who", "sees"], who))
    else:
        parts.append(f"<p>Aggregation {_e(aggregation)}: not a mode this report knows.</p>")

    parts.append("<h2>Privacy budget</h2>" + "".join(
        f"<p>{_e(line)}</p>" for line in privacy_budget(config, rows)))
    z, sampled = config.get("dp-noise-multiplier") or 0, _clients_per_round(rows)
    if z and sampled and z > sampled:
        parts.append(f"<p class=\"warning\">The noise std on the average, z C / m = "
                     f"{z / sampled:.3g} C with about {sampled} clients per round, is larger "
                     "than a clipped update's norm C: the noise swamps the updates. Sample "
                     "more clients per round.</p>")

    parts.append("<h2>Curves</h2>")
    if plot_png:
        data = base64.b64encode(plot_png).decode("ascii")
        parts.append(f"<img id=\"curves\" alt=\"the run's metrics per round\" "
                     f"src=\"data:image/png;base64,{data}\">")
    else:
        parts.append("<p>No round finished yet.</p>")

    parts.append("<h2>Rounds</h2>")
    columns = ["round"] + sorted({k for r in rows for k in r} - {"round"})
    parts.append(_table(columns, [[r.get(c) for c in columns] for r in rows], numeric=True)
                 if rows else "<p>None yet.</p>")

    parts.append("<h2>Settings</h2>" + _table(["setting", "value"],
                                              [[k, config[k]] for k in sorted(config)]))
    parts.append("<h2>Files</h2><ul>" + "".join(
        f"<li><a href=\"{_e(name)}\">{_e(name)}</a></li>" for name in files) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _clients_per_round(rows: list[dict[str, Any]]) -> int:
    counts = [r["train-clients"] for r in rows if r.get("train-clients")]
    return round(sum(counts) / len(counts)) if counts else 0
