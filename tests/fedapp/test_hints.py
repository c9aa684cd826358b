"""Hints for a node that cannot connect (fedapp.hints), on the lines Flower 1.42's
SuperNode printed here in each case (a server certificate from another CA, a TLS node
against a plaintext server, an unregistered SuperNode key, a port nothing listens on):
each gets its cause, once; retries alone get the unreachable hint only after a few."""

from __future__ import annotations

from fedapp.hints import RETRIES_BEFORE_HINT, HintReader

RETRY = "WARNING :   Connection attempt failed, retrying in 0.72 seconds"
SEEN = {
    "another CA": [RETRY, "ERROR :     SSL/TLS handshake error detected.",
                   "Failed to initialize the connection to the SuperLink.",
                   "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate "
                   "signature failure (_ssl.c:1006)"],
    "plaintext server": [RETRY, "[SSL: WRONG_VERSION_NUMBER] wrong version number "
                                "(_ssl.c:1006)"],
    "unregistered": [RETRY, RETRY, "[code: 2004] Failed to activate SuperNode."],
    "wrong name": ["[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address "
                   "mismatch, certificate is not valid for '10.0.0.9'. (_ssl.c:1006)"],
    "nothing listens": [RETRY] * 8,
}
EXPECTED = {"another CA": "not signed by this node's CA certificate",
            "plaintext server": "the server does not (started with --insecure)",
            "unregistered": "does not know this node's SuperNode key",
            "wrong name": "does not name the host in --superlink",
            "nothing listens": "nothing answers at --superlink"}


def test_each_failure_gets_its_cause_once():
    for case, lines in SEEN.items():
        reader = HintReader()
        hints = [h for line in lines * 2 if (h := reader.hint(line)) is not None]
        assert len(hints) == 1 and EXPECTED[case] in hints[0], (case, hints)


def test_a_few_retries_alone_say_nothing_yet():
    reader = HintReader()
    assert [reader.hint(RETRY) for _ in range(RETRIES_BEFORE_HINT - 1)] == \
        [None] * (RETRIES_BEFORE_HINT - 1)
    assert reader.hint("INFO :      SuperNode ID: 123") is None
