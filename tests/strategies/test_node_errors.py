"""Secure client mods send the server one safe line, never an exception's text that
could hold a decrypted value (strategies.node_errors)."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from strategies.node_errors import NodeError, reports_errors


def test_secure_mods_send_the_server_one_safe_line(task_identity, flwr_caplog):
    """A NodeError's message goes to the server; any other exception's text stays on the
    node (it could hold a decrypted value), only its type is sent."""
    @reports_errors()
    def mod(msg, context, call_next):
        return call_next(msg, context)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")

    def refuse(m, c):
        raise NodeError("no key on this node: run fedapp keygen")

    def leak(m, c):
        raise ValueError("slot value 123456789 of the decrypted model is out of range")

    reply = mod(msg, context, refuse)
    assert reply.error.reason == "no key on this node: run fedapp keygen"
    reply = mod(msg, context, leak)
    assert "123456789" not in reply.error.reason and "ValueError" in reply.error.reason
    assert "123456789" in flwr_caplog.text  # the node's own log keeps the details
