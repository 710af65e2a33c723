"""Control-plane framing: one JSON object per frame. No torch, no model.

A frame is ``MAGIC | version (u8) | length (u32, big endian) | JSON object``.
The version travels in every header so that a peer speaking another version is
refused with a readable message instead of misparsed. The length is capped before
anything is allocated, and every read runs under the socket's own timeout.
"""

import contextlib
import json
import socket
import struct
import time
from typing import Any

MAGIC = b"NLDR"
PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct("!4sBI")
# How long, and how much, a last message waits for the peer to stop sending.
_LINGER_S = 1.0
_LINGER_BYTES = 1 << 20

# Message types. A connection opens with the seed's CHALLENGE (its nonce, and
# whether it requires the shared secret); the client then sends HELLO (to receive
# weights) or INFO (to ask what the seed serves).
CHALLENGE = "challenge"
HELLO = "hello"
ACCEPT = "accept"
REFUSE = "refuse"
DONE = "done"
INFO = "info"


class ProtocolError(Exception):
    """The peer sent something this side cannot accept, or went away."""


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    payload = json.dumps(msg, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    sock.sendall(_HEADER.pack(MAGIC, PROTOCOL_VERSION, len(payload)) + payload)


def send_last(sock: socket.socket, msg: dict[str, Any]) -> None:
    """Send ``msg`` as the last frame of a connection whose peer may have sent more.

    Closing a socket with unread input makes the kernel answer with a reset, and a
    reset can destroy the message before the peer reads it: a client that sent
    garbage would see "connection reset" instead of the refusal. So this side stops
    writing, then discards what still arrives until the peer closes, for at most
    ``_LINGER_S`` and ``_LINGER_BYTES``; a peer that keeps sending gets the reset.
    """
    send_msg(sock, msg)
    deadline = time.monotonic() + _LINGER_S
    left = _LINGER_BYTES
    with contextlib.suppress(OSError):  # the peer may be gone already; nothing to save
        sock.shutdown(socket.SHUT_WR)
        while left > 0 and (wait := deadline - time.monotonic()) > 0:
            sock.settimeout(wait)
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)


def recv_msg(sock: socket.socket, expect: str | None = None) -> dict[str, Any]:
    """Read one frame; if ``expect`` is given, the message must be of that type."""
    magic, version, length = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if magic != MAGIC:
        raise ProtocolError(f"not a Netloader peer (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES} cap")
    try:
        msg = json.loads(_recv_exact(sock, length))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; deep nesting
        # exhausts the parser's recursion.
        raise ProtocolError(f"frame is not acceptable JSON: {str(e)[:200]}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    if expect is not None and msg["type"] != expect:
        detail = f": {msg.get('reason')}" if msg["type"] == REFUSE else ""
        raise ProtocolError(f"expected '{expect}', got '{msg['type']}'{detail}")
    return msg


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``msg[name]`` checked against ``kind``; a missing or mistyped field is a ProtocolError."""
    value = msg.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"'{msg.get('type')}' message field '{name}' is missing or mistyped")
    return value


def optional_field(msg: dict[str, Any], name: str, kind: type) -> Any:
    """``msg[name]`` checked against ``kind`` if present, else None."""
    return None if msg.get(name) is None else field(msg, name, kind)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)
