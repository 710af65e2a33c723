"""Frames on a Netloader connection. No torch.

Control frame: ``MAGIC | version (u8) | length (u32, big endian) | JSON object``.
The reader passes the most it will accept (``max_bytes``): the header is checked
against it before anything is allocated, so a peer cannot make this side read or
parse more than the exchange needs. A seed never reads more than
``MAX_REQUEST_BYTES`` from a client, before authentication or after.

Every read and write runs under a ``Deadline`` (wall clock for the whole exchange),
not a per-call timeout, so a peer that sends one byte just before each timeout
does not keep a connection for ever.

Bulk data (the host data plane) follows an ``accept`` on the same connection: each
bucket is ``DATA_MAGIC | index (u32) | length (u64)`` then ``length`` bytes, and both
sides know the plan, so the receiver checks index and length before it reads a byte
of payload. A sender that cannot go on sends an abort header (index ``ABORT``) and a
short UTF-8 reason.
"""

import contextlib
import json
import socket
import struct
from typing import Any

from vllm_ascend.model_loader.netloader.deadline import Deadline, DeadlineExceeded
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, clean, text

MAGIC = b"NLDR"
PROTOCOL_VERSION = 3
_HEADER = struct.Struct("!4sBI")
# Everything a seed reads from a peer: the request, the 'done', rendezvous records.
MAX_REQUEST_BYTES = 8 * 1024
# A seed's answers that grow with the model: a fixed part, plus per tensor room for a
# digest (an accept: 67 bytes are needed) or a manifest entry (a manifest reply).
REPLY_FIXED_BYTES = 1 << 20
DIGEST_BYTES_PER_TENSOR = 128
MANIFEST_BYTES_PER_TENSOR = 512
DATA_MAGIC = b"NLDB"
_DATA_HEADER = struct.Struct("!4sIQ")
ABORT = 0xFFFFFFFF
KEEPALIVE = 0xFFFFFFFE
MAX_ABORT_REASON_BYTES = 1024
# How long, and how much, a last message waits for the peer to stop sending.
_LINGER_S = 1.0
_LINGER_BYTES = 1 << 20
# The one message type the framing knows: a refusal, whose reason the reader reports
# when it expected another type (every other type is in ``messages``).
REFUSE = "refuse"


# --- control frames ----------------------------------------------------------------


def send_msg(sock: socket.socket, msg: dict[str, Any], deadline: Deadline) -> None:
    payload = json.dumps(msg, separators=(",", ":")).encode()
    sock.settimeout(deadline.remaining())
    try:
        sock.sendall(_HEADER.pack(MAGIC, PROTOCOL_VERSION, len(payload)) + payload)
    except TimeoutError as e:
        raise DeadlineExceeded(
            f"{deadline.what} took longer than {deadline.seconds:g} s (the peer does not read)"
        ) from e


def send_last(sock: socket.socket, msg: dict[str, Any], deadline: Deadline) -> None:
    """Send ``msg`` as the last frame of a connection whose peer may have sent more.

    Closing a socket with unread input makes the kernel answer with a reset, which
    can destroy the message before the peer reads it. So this side stops writing,
    then discards what still arrives until the peer closes, for at most ``_LINGER_S``
    and ``_LINGER_BYTES``; a peer that keeps sending gets the reset."""
    with contextlib.suppress(OSError, ProtocolError):  # the peer may be gone; nothing to save
        send_msg(sock, msg, deadline)
        linger = Deadline(_LINGER_S, "linger")
        sock.shutdown(socket.SHUT_WR)
        left = _LINGER_BYTES
        while left > 0:
            sock.settimeout(linger.remaining())
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)


def recv_msg(
    sock: socket.socket, deadline: Deadline, max_bytes: int, expect: str | None = None
) -> dict[str, Any]:
    """Read one frame of at most ``max_bytes`` payload; if ``expect`` is given, the
    message must be of that type (a REFUSE raises with its reason)."""
    magic, version, length = _HEADER.unpack(recv_exact(sock, _HEADER.size, deadline))
    if magic != MAGIC:
        raise ProtocolError(f"not a Netloader peer (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte cap")
    try:
        msg = json.loads(recv_exact(sock, length, deadline))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; deep nesting
        # exhausts the parser's recursion.
        raise ProtocolError(f"frame is not acceptable JSON: {str(e)[:200]}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    if expect is not None and msg["type"] != expect:
        detail = f": {text(msg, 'reason')}" if msg["type"] == REFUSE else ""
        raise ProtocolError(f"expected '{expect}', got '{clean(msg['type'], 40)}'{detail}")
    return msg


def recv_exact(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def recv_into(sock: socket.socket, view: memoryview, deadline: Deadline) -> None:
    """Fill ``view`` from ``sock`` before ``deadline``."""
    got, n = 0, len(view)
    while got < n:
        sock.settimeout(deadline.remaining())
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError as e:
            raise DeadlineExceeded(
                f"{deadline.what} took longer than {deadline.seconds:g} s "
                f"(got {got} of {n} bytes)"
            ) from e
        if k == 0:
            raise ProtocolError(f"peer closed the connection after {got} of {n} bytes")
        got += k


def reply_cap(tensors: int, per_tensor: int = DIGEST_BYTES_PER_TENSOR) -> int:
    """The most a client reads for a seed's answer about a model of ``tensors`` tensors
    (its JSON parse then costs at most a few tens of times that in memory)."""
    return REPLY_FIXED_BYTES + per_tensor * tensors


# --- bulk-data frames ------------------------------------------------------------


def data_header(index: int, length: int) -> bytes:
    return _DATA_HEADER.pack(DATA_MAGIC, index, length)


def keepalive_frame() -> bytes:
    return _DATA_HEADER.pack(DATA_MAGIC, KEEPALIVE, 0)


def abort_frame(reason: str) -> bytes:
    payload = reason.encode()[:MAX_ABORT_REASON_BYTES]
    return _DATA_HEADER.pack(DATA_MAGIC, ABORT, len(payload)) + payload


DATA_HEADER_BYTES = _DATA_HEADER.size


def parse_data_header(
    header: bytes, index: int, length: int, sock: socket.socket, deadline: Deadline
) -> bool:
    """Check a bucket header against the plan (bucket ``index`` of ``length`` bytes);
    True if it is a keepalive instead (the bucket's header comes next). An abort frame
    raises ``ProtocolError`` with the sender's reason."""
    magic, got_index, got_length = _DATA_HEADER.unpack(header)
    if magic != DATA_MAGIC:
        raise ProtocolError(f"bucket {index}: bad data magic {magic!r}")
    if (got_index, got_length) == (KEEPALIVE, 0):
        return True
    if got_index == ABORT:
        if got_length > MAX_ABORT_REASON_BYTES:
            raise ProtocolError(f"bucket {index}: sender aborted with an over-long reason")
        reason = clean(recv_exact(sock, got_length, deadline).decode(errors="replace"))
        raise ProtocolError(f"sender aborted at bucket {index}: {reason}")
    if (got_index, got_length) != (index, length):
        raise ProtocolError(
            f"bucket {got_index} of {got_length} bytes where the plan has bucket {index} "
            f"of {length} bytes"
        )
    return False
