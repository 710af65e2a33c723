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

from vllm_ascend.model_loader.netloader.auth import (
    AuthError,
    client_proof,
    new_nonce,
    proof_matches,
    seed_proof,
)
from vllm_ascend.model_loader.netloader.config import split_address
from vllm_ascend.model_loader.netloader.manifest import TensorSpec
from vllm_ascend.model_loader.netloader.protocol import (
    ACCEPT,
    CHALLENGE,
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
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    reasons: list[str] = dataclasses.field(default_factory=list)

    def run(self, addresses: tuple[str, ...]) -> Received | None:
        for address in addresses:
            start = time.perf_counter()
            try:
                return self._from_source(address)
            except SourceRefused as e:
                reason = f"{address} refused: {e}"
            except (ProtocolError, AuthError, TransferError, OSError, RuntimeError) as e:
                reason = f"{address} failed: {type(e).__name__}: {e}"
            self.reasons.append(reason)
            logger.warning(
                "Netloader rank %s: no verified model from %s after %.3f s (%s)",
                self.identity.get("rank"), address, time.perf_counter() - start, reason,
            )
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
            hello = {
                "type": HELLO,
                "identity": self.identity,
                "manifest": [spec.to_wire() for spec in self.specs],
            }
            reply = exchange(conn, hello, self.secret)
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
                local = conn.getsockname()[0]
                with data_group(host, store_port, CLIENT_RANK, self.timeout_s, local) as pg:
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


def exchange(
    conn: socket.socket, request: dict[str, Any], secret: bytes | None
) -> dict[str, Any]:
    """Answer the seed's challenge with ``request`` and return the seed's reply.

    With a secret, the request carries this side's proof and every reply but a
    refusal must carry the seed's proof over its body; a seed that does not ask for
    the secret is not trusted at all. Without one, a seed that asks for it is
    refused here, before the request (and its manifest) leaves this host."""
    challenge = recv_msg(conn, expect=CHALLENGE)
    seed_nonce = field(challenge, "nonce", str)
    seed_wants_secret = challenge.get("auth") is True
    if secret is None and seed_wants_secret:
        raise AuthError("seed requires the shared secret, and this side has none")
    if secret is not None and not seed_wants_secret:
        raise AuthError("seed does not require the shared secret; not trusting it")
    nonce = new_nonce()
    request = {**request, "nonce": nonce}
    if secret is not None:
        request["proof"] = client_proof(secret, seed_nonce, nonce)
    send_msg(conn, request)
    reply = recv_msg(conn)
    if secret is not None and reply["type"] != REFUSE:
        if not proof_matches(seed_proof(secret, seed_nonce, request, reply), reply.get("proof")):
            raise AuthError("seed's answer does not carry a valid proof of the shared secret")
    return reply


def query_seed(
    address: str, timeout_s: float = 10.0, secret: bytes | None = None
) -> dict[str, Any]:
    """Ask a seed what it serves (identity, size, value fingerprint, transfers)."""
    host, port = split_address(address)
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        conn.settimeout(timeout_s)
        reply = exchange(conn, {"type": INFO}, secret)
    if reply["type"] != INFO:
        detail = f": {reply.get('reason')}" if reply["type"] == REFUSE else ""
        raise ProtocolError(f"expected '{INFO}', got '{reply['type']}'{detail}")
    reply.pop("proof", None)
    return reply
