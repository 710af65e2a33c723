"""Hand-made frames and raw connections, for tests that talk to a seed without the client."""

import json
import socket
import struct

from vllm_ascend.model_loader.netloader.protocol import MAGIC, PROTOCOL_VERSION


def frame(msg: object, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame around ``msg``; any JSON value and any version, to build bad requests too."""
    payload = json.dumps(msg).encode()
    return struct.pack("!4sBI", MAGIC, version, len(payload)) + payload


def connect(address: str, timeout_s: float = 5.0) -> socket.socket:
    """A raw TCP connection to a seed's ``host:port``."""
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout_s)
