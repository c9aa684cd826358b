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

