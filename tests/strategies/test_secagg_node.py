"""A node's answer to a key-stage message (strategies.secagg_node).

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from strategies.secagg_masks import SecAggError
from strategies.secagg_node import answer_stage
from tests.helpers.fuzzing import BAD, must_refuse


# ------------------------------------------------------------------ fuzzing
def test_a_stage_message_without_payload_is_refused():
    context = Context(run_id=1, node_id=BAD, node_config={}, state=RecordDict(), run_config={})
    for payload in (None, 5, b"{}", ["x"]):
        must_refuse(lambda: answer_stage(payload, context, BAD), SecAggError)


def test_metric_sums_weigh_numbers_clamp_and_skip_the_rest(flwr_caplog):
    from strategies.secagg_node import metric_sums
    from strategies.secure_sums import LIMIT

    sums = metric_sums({"loss": 0.5, "correct": 3, "ok": True, "curve": [1.0, 2.0],
                        "name": "x", "huge": float(LIMIT), "nan": float("nan")}, 4)
    assert sums == {"loss": 2.0, "correct": 12.0, "huge": LIMIT - 1.0, "nan": 0.0}
    assert "Metric huge is outside" in flwr_caplog.text and "Metric nan" in flwr_caplog.text
