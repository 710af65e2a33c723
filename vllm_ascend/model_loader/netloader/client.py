"""The client: try each seed address in order and collect why each one failed.

It only reports; whether to fall back to disk is the loader's decision.
"""

import dataclasses
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import logger

from vllm_ascend.model_loader.netloader.config import split_address
from vllm_ascend.model_loader.netloader.manifest import TensorSpec
from vllm_ascend.model_loader.netloader.protocol import (
    ACCEPT,
    DONE,
    HELLO,
    INFO,
    REFUSE,
    ProtocolError,
    field,
    recv_msg,
    send_msg,
)
from vllm_ascend.model_loader.netloader.transport import (
    CLIENT_RANK,
    TransferError,
    data_group,
    recv_tensors,
)

_BUSY_RETRY_S = 0.5
_MAX_BUCKET_BYTES = 1 << 30


class SourceRefused(Exception):
    """The seed answered, but will not serve this client."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.retry = retry


@dataclass
class Received:
    source: str
    nbytes: int
    seconds: float
    digests: list[str]


@dataclass
class WeightFetch:
    """One attempt to fill ``targets`` (in manifest order) from a list of seeds.

    A failed attempt leaves each target untouched or holding exactly the seed's
    verified bytes (see ``recv_tensors``), so the next seed or the disk loader can
    fill the same model."""

    identity: dict[str, Any]
    specs: list[TensorSpec]
    targets: list[torch.Tensor]
    timeout_s: float
    reasons: list[str] = dataclasses.field(default_factory=list)

    def run(self, addresses: tuple[str, ...]) -> Received | None:
        for address in addresses:
            try:
                return self._from_source(address)
            except SourceRefused as e:
                self.reasons.append(f"{address} refused: {e}")
            except (ProtocolError, TransferError, OSError, RuntimeError) as e:
                self.reasons.append(f"{address} failed: {type(e).__name__}: {e}")
        return None

    def _from_source(self, address: str) -> Received:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self._attempt(address)
            except SourceRefused as e:
                if not e.retry or time.monotonic() + _BUSY_RETRY_S > deadline:
                    raise
                time.sleep(_BUSY_RETRY_S)

    def _attempt(self, address: str) -> Received:
        host, port = split_address(address)
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=self.timeout_s) as conn:
            conn.settimeout(self.timeout_s)
            send_msg(
                conn,
                {
                    "type": HELLO,
                    "identity": self.identity,
                    "manifest": [spec.to_wire() for spec in self.specs],
                },
            )
            reply = recv_msg(conn)
            if reply["type"] == REFUSE:
                raise SourceRefused(str(reply.get("reason")), reply.get("retry") is True)
            if reply["type"] != ACCEPT:
                raise ProtocolError(f"expected '{ACCEPT}', got '{reply['type']}'")
            digests = field(reply, "digests", list)
            if len(digests) != len(self.specs) or not all(isinstance(d, str) for d in digests):
                raise ProtocolError("accept carries a digest list that does not fit the manifest")
            store_port = field(reply, "store_port", int)
            bucket_bytes = field(reply, "bucket_bytes", int)
            if not 0 < bucket_bytes <= _MAX_BUCKET_BYTES:
                raise ProtocolError(f"accept carries a bucket size of {bucket_bytes} bytes")
            try:
                with data_group(host, store_port, CLIENT_RANK, self.timeout_s) as pg:
                    nbytes = recv_tensors(pg, self.targets, self.specs, digests, bucket_bytes)
            except TransferError as e:
                send_msg(conn, {"type": DONE, "ok": False, "reason": str(e)})
                raise
            send_msg(conn, {"type": DONE, "ok": True})
        seconds = time.perf_counter() - start
        logger.info(
            "Netloader rank %s received %d bytes from %s in %.3f s (%.2f GB/s), "
            "all %d digests verified",
            self.identity.get("rank"), nbytes, address, seconds, nbytes / seconds / 1e9,
            len(digests),
        )
        return Received(address, nbytes, seconds, digests)


def query_seed(address: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Ask a seed what it serves (identity, size, value fingerprint, transfers)."""
    host, port = split_address(address)
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        conn.settimeout(timeout_s)
        send_msg(conn, {"type": INFO})
        return recv_msg(conn, expect=INFO)
