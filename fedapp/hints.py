"""Hints for a client node that cannot reach its server: Flower's SuperNode reports the
symptom (an SSL error, a refused connection, an unknown key); ``fedapp client`` reads
its output as it goes and adds, once each, the likely cause and the fix."""

from __future__ import annotations

import re

UNREACHABLE = ("nothing answers at --superlink: check the host and port, that fedapp server "
               "runs there, and that no firewall blocks the port (the node keeps retrying)")

# (pattern in the SuperNode's output, hint); the first that matches a line wins
_HINTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"CERTIFICATE_VERIFY_FAILED.*(?:[Hh]ostname mismatch|not valid for)"),
     "the server's certificate does not name the host in --superlink: connect with a name "
     "the certificate was made for (fedapp provision --server-address, or "
     "scripts/make_certificates.py --host NAME)"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|unable to get local issuer certificate|"
                r"self[- ]signed certificate"),
     "the server's certificate is not signed by this node's CA certificate (ca.crt in "
     "--certificates, or certs/ in the kit): give the ca.crt made with the server's "
     "certificate"),
    (re.compile(r"WRONG_VERSION_NUMBER|wrong version number|record layer failure"),
     "this node speaks TLS but the server does not (started with --insecure), or "
     "--superlink names another service's port"),
    (re.compile(r"No SuperNode found with the given public key|"
                r"Failed to activate SuperNode|public key.*not registered", re.IGNORECASE),
     "the server does not know this node's SuperNode key: register its public key "
     "(fedapp register supernode.pub --superlink HOST:PORT --certificates DIR), or put "
     "it in the server kit's supernodes/ folder and restart fedapp server --kit"),
    (re.compile(r"Connection refused|All connection attempts failed|"
                r"Name or service not known|nodename nor servname|Temporary failure in "
                r"name resolution"), UNREACHABLE),
]
# Flower's SuperNode says only this while it retries; a certificate or key problem shows
# after one or two of them, so the hint waits for a few
RETRY = re.compile(r"Connection attempt failed, retrying")
RETRIES_BEFORE_HINT = 5


class HintReader:
    """Gives each hint once for a node's output lines."""

    def __init__(self) -> None:
        self.given: set[str] = set()
        self.retries = 0

    def _once(self, text: str) -> str | None:
        if text in self.given:
            return None
        self.given.add(text)
        return text

    def hint(self, line: str) -> str | None:
        """The hint ``line`` calls for, if it has not been given yet."""
        for pattern, text in _HINTS:
            if pattern.search(line):
                return self._once(text)
        if RETRY.search(line):
            self.retries += 1
            if self.retries >= RETRIES_BEFORE_HINT and not self.given:
                return self._once(UNREACHABLE)
        return None
