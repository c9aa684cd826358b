"""Framed, pickle-free messages between the parties over mutually authenticated TLS.

A frame is a kind byte, an 8-byte length and the payload: a JSON object (control), a
list of uint64 arrays (a JSON header of shapes, then the raw little-endian words), or
an abort carrying the reason a party stopped. Every party has a certificate from the
session's CA whose common name is its role; a listener accepts only the roles it
expects, once each, and a connecting party checks it reached the role it asked for.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from pathlib import Path

import numpy as np

JSON, ARRAYS, ABORT = 1, 2, 3
_HEADER = struct.Struct("!BQ")
#: The largest frame a party accepts (a batch of 100 spam queries is 52 MB).
MAX_FRAME = 4 << 30


class InferenceError(RuntimeError):
    """The secure computation stopped: a party left, aborted or sent something wrong."""


def tls_context(certs: Path, role: str, server: bool) -> ssl.SSLContext:
    """A context that presents ``role``'s certificate and requires the peer's.

    Raises
    ------
    InferenceError
        If ``certs`` lacks ``ca.crt``, ``<role>.pem`` or ``<role>.key``.
    """
    files = [certs / "ca.crt", certs / f"{role}.pem", certs / f"{role}.key"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InferenceError(f"missing {', '.join(missing)}: make the session's certificates "
                             "with `fedapp infer certs` and give each party its own")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(files[0])
    ctx.load_cert_chain(files[1], files[2])
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_role(sock: ssl.SSLSocket) -> str:
    subject = dict(item[0] for item in sock.getpeercert()["subject"])
    return subject.get("commonName", "")


class Link:
    """One party's end of a connection to ``peer``."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float) -> None:
        self.sock, self.peer = sock, peer
        sock.settimeout(timeout)
        # a round trip per protocol step: Nagle's algorithm would hold each back ~40 ms
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.bytes_sent = self.bytes_received = 0

    def _send(self, kind: int, payload: bytes | list) -> None:
        parts = payload if isinstance(payload, list) else [payload]
        size = sum(memoryview(p).nbytes for p in parts)
        small = [_HEADER.pack(kind, size)]
        while len(parts) and memoryview(parts[0]).nbytes < 65536:  # one write for the head
            small.append(bytes(parts[0]))
            parts = parts[1:]
        try:
            self.sock.sendall(b"".join(small))
            for part in parts:
                self.sock.sendall(part)
        except OSError as err:
            raise InferenceError(f"lost the connection to {self.peer} ({err.__class__.__name__})"
                                 ) from None
        self.bytes_sent += size + _HEADER.size

    def _read(self, size: int) -> bytearray:
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:], min(size - got, 1 << 24))
            except (TimeoutError, socket.timeout):
                raise InferenceError(f"{self.peer} sent nothing for {self.timeout:.0f} s"
                                     ) from None
            except OSError as err:
                raise InferenceError(f"lost the connection to {self.peer} "
                                     f"({err.__class__.__name__})") from None
            if n == 0:
                raise InferenceError(f"{self.peer} closed the connection")
            got += n
        self.bytes_received += size
        return data

    def _receive(self, want: int) -> bytearray:
        kind, size = _HEADER.unpack(self._read(_HEADER.size))
        if size > MAX_FRAME:
            raise InferenceError(f"{self.peer} announced a frame of {size} bytes, over the "
                                 f"{MAX_FRAME}-byte limit")
        payload = self._read(size)
        if kind == ABORT:
            reason = payload.decode("utf-8", "replace")[:500]
            raise InferenceError(f"{self.peer} stopped: {reason}")
        if kind != want:
            raise InferenceError(f"{self.peer} sent a frame of kind {kind}, expected {want}")
        return payload

    def send_json(self, obj: dict) -> None:
        self._send(JSON, json.dumps(obj).encode())

    def receive_json(self) -> dict:
        try:
            obj = json.loads(bytes(self._receive(JSON)))
        except ValueError:
            raise InferenceError(f"{self.peer} sent a control message that is no JSON") from None
        if not isinstance(obj, dict):
            raise InferenceError(f"{self.peer} sent a control message that is no object")
        return obj

    def send_arrays(self, arrays: list[np.ndarray]) -> None:
        words = [np.ascontiguousarray(a, dtype="<u8") for a in arrays]
        head = json.dumps([list(w.shape) for w in words]).encode()
        self._send(ARRAYS, [struct.pack("!I", len(head)), head, *[w.reshape(-1).data for w in words]])

    def receive_arrays(self) -> list[np.ndarray]:
        payload = self._receive(ARRAYS)
        try:
            (head_len,) = struct.unpack_from("!I", payload)
            shapes = json.loads(bytes(payload[4:4 + head_len]))
            sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
            if any(not isinstance(d, int) or d < 0 for s in shapes for d in s):
                raise ValueError
        except (struct.error, ValueError, TypeError):
            raise InferenceError(f"{self.peer} sent a malformed array header") from None
        offset = 4 + head_len
        if offset + 8 * sum(sizes) != len(payload):
            raise InferenceError(f"{self.peer} sent {len(payload) - offset} bytes of words for "
                                 f"shapes {shapes}")
        arrays = []
        for shape, size in zip(shapes, sizes):
            arrays.append(np.frombuffer(payload, dtype="<u8", count=size, offset=offset)
                          .astype(np.uint64).reshape(shape))
            offset += 8 * size
        return arrays

    def abort(self, reason: str) -> None:
        """Tell the peer why this party stops (best effort), then close."""
        try:
            self.sock.settimeout(5)
            self._send(ABORT, reason.encode()[:500])
            # Closing with unread bytes (a TLS session ticket, say) makes the kernel
            # send a reset, which can throw away the abort before the peer reads it:
            # half-close, then drain what is left for a moment.
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(0.5)
            while self.sock.recv(1 << 16):
                pass
        except (InferenceError, OSError, ValueError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InferenceError(f"an address is HOST:PORT, got '{address}'")
    return host.strip("[]"), int(port)


def listen(address: str) -> socket.socket:
    server = socket.create_server(parse_address(address))
    server.settimeout(1.0)
    return server


def accept(server: socket.socket, ctx: ssl.SSLContext, roles: set[str], deadline: float,
           timeout: float) -> dict[str, Link]:
    """Links to each of ``roles``, accepted on ``server`` before ``deadline``."""
    links: dict[str, Link] = {}
    while set(links) != roles:
        if time.monotonic() > deadline:
            waiting = ", ".join(sorted(roles - set(links)))
            raise InferenceError(f"waited for {waiting} to connect; none came in time: "
                                 "check their addresses and that they are started")
        try:
            raw, _ = server.accept()
        except (TimeoutError, socket.timeout):
            continue
        try:
            raw.settimeout(timeout)
            sock = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # not one of the session's parties: keep waiting for them
            continue
        role = peer_role(sock)
        if role not in roles or role in links:
            sock.close()
            continue
        links[role] = Link(sock, role, timeout)
    return links


def connect(address: str, ctx: ssl.SSLContext, role: str, deadline: float,
            timeout: float) -> Link:
    """A link to the party ``role`` at ``address``, retried until ``deadline``."""
    host, port = parse_address(address)
    while True:
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
            sock = ctx.wrap_socket(raw, server_hostname=role)
            return Link(sock, role, timeout)
        except ssl.SSLCertVerificationError as err:
            raise InferenceError(f"{address} is not {role} of this session: {err.verify_message}"
                                 ) from None
        except OSError:
            if time.monotonic() > deadline:
                raise InferenceError(f"could not reach {role} at {address}: is it started and "
                                     "listening there?") from None
            time.sleep(0.2)
