"""Hand-made frames and raw connections, for tests that talk to a seed (or play one)
without the library's own client."""

import json
import socket
import struct
from typing import Any

from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.manifest import manifest_sha256, model_tensors, spec_of
from vllm_ascend.model_loader.netloader.wire.addresses import parse_address
from vllm_ascend.model_loader.netloader.wire.auth import new_nonce
from vllm_ascend.model_loader.netloader.wire.frames import MAGIC, PROTOCOL_VERSION, recv_msg
from vllm_ascend.model_loader.netloader.wire.messages import CHALLENGE, TCP, ManifestSummary, hello


def frame(msg: object, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame around ``msg``; any JSON value and any version, to build bad requests too."""
    payload = json.dumps(msg).encode()
    return struct.pack("!4sBI", MAGIC, version, len(payload)) + payload


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one real TCP connection on 127.0.0.1 (the first has a 5 s timeout)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname(), timeout=5)
        b, _ = server.accept()
    return a, b


def connect(address: str, timeout_s: float = 5.0) -> socket.socket:
    """A raw TCP connection to a seed's ``host:port`` or ``[v6]:port``."""
    return socket.create_connection(parse_address(address), timeout=timeout_s)


def read(sock: socket.socket, cap: int = 1 << 24, timeout_s: float = 10.0) -> dict[str, Any]:
    """The next frame from ``sock``, whatever its type."""
    return recv_msg(sock, Deadline(timeout_s, "test read"), cap)


def challenge_of(sock: socket.socket) -> dict[str, Any]:
    return recv_msg(sock, Deadline(10.0, "challenge"), 1 << 16, expect=CHALLENGE)


def summary_of(model: Any) -> ManifestSummary:
    specs = [spec_of(n, t) for n, t in model_tensors(model)]
    return ManifestSummary(len(specs), sum(s.nbytes for s in specs), manifest_sha256(specs))


def hello_for(identity: dict[str, Any], model: Any, **fields: Any) -> dict[str, Any]:
    """A client's hello for ``model`` (no proof), with ``fields`` added or replaced."""
    return {
        **hello(identity, summary_of(model), None, False, (TCP,)),
        "nonce": new_nonce(),
        **fields,
    }
