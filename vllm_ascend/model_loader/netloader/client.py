"""The client: try each seed address in order and collect why each one failed.

It only reports; whether to fall back to disk is the loader's decision.
"""

import dataclasses
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import logger

from vllm_ascend.model_loader.netloader.auth import (
    AuthError,
    client_proof,
    new_nonce,
    proof_matches,
    seed_proof,
)
from vllm_ascend.model_loader.netloader.config import NetloaderConfigError, split_address
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    TensorSpec,
    value_fingerprint,
)
from vllm_ascend.model_loader.netloader.protocol import (
    ACCEPT,
    CHALLENGE,
    DONE,
    HELLO,
    INFO,
    REFUSE,
    ProtocolError,
    field,
    optional_field,
    recv_msg,
    send_msg,
)
from vllm_ascend.model_loader.netloader.transport import (
    CLIENT_RANK,
    TransferError,
    data_group,
    recv_tensors,
)

if TYPE_CHECKING:
    from vllm_ascend.model_loader.netloader.server import RelayListener

_BUSY_RETRY_S = 0.5
_MAX_BUCKET_BYTES = 1 << 30
# A relay the seed named is a peer that may be gone: do not wait long to find out.
_RELAY_CONNECT_S = 5.0


class SourceRefused(Exception):
    """The seed answered, but will not serve this client (``redirect``: it sends it to
    a relay, which must serve the weights of ``value_fingerprint``)."""

    def __init__(
        self, reason: str, retry: bool, redirect: str | None = None,
        value_fingerprint: str | None = None,
    ):
        super().__init__(reason)
        self.retry = retry
        self.redirect = redirect
        self.value_fingerprint = value_fingerprint


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
    # This instance's own listener: offered to the seed as a relay for the clients that
    # come after it, and started by the first transfer a seed accepts.
    relay: "RelayListener | None" = None
    reasons: list[str] = dataclasses.field(default_factory=list)

    def run(self, addresses: tuple[str, ...]) -> Received | None:
        for address in addresses:
            received = self._tried(address, address, functools.partial(self._from_source, address))
            if received is not None:
                return received
        return None

    def _tried(
        self, address: str, label: str, attempt: Callable[[], Received], then: str = ""
    ) -> Received | None:
        """``attempt()``'s result, or None with why it failed kept and logged."""
        start = time.perf_counter()
        try:
            return attempt()
        except SourceRefused as e:
            reason = f"{label} refused: {e}"
        except (ProtocolError, AuthError, TransferError, OSError, RuntimeError) as e:
            reason = f"{label} failed: {type(e).__name__}: {e}"
        self.reasons.append(reason)
        logger.warning(
            "Netloader rank %s: no verified model from %s after %.3f s (%s)%s",
            self.identity.get("rank"), address, time.perf_counter() - start, reason, then,
        )
        return None

    def _from_source(self, address: str) -> Received:
        deadline = time.monotonic() + self.timeout_s
        direct = False
        while True:
            try:
                return self._attempt(address, direct)
            except SourceRefused as e:
                if e.redirect is not None and not direct:
                    received = self._via_relay(e.redirect, e.value_fingerprint, address)
                    if received is not None:
                        return received
                    direct = True  # the relay could not serve: ask the seed itself
                    continue
                if not e.retry or time.monotonic() + _BUSY_RETRY_S > deadline:
                    raise
                time.sleep(_BUSY_RETRY_S)

    def _via_relay(self, relay: str, fingerprint: str | None, seed: str) -> Received | None:
        """One attempt at the relay ``seed`` sent us to; None (reason kept) if it failed."""
        return self._tried(
            relay, f"relay {relay} (named by {seed})",
            lambda: self._attempt(relay, direct=True, fingerprint=fingerprint),
            then=f"; asking {seed} directly",
        )

    def _attempt(
        self, address: str, direct: bool = False, fingerprint: str | None = None
    ) -> Received:
        """One transfer from ``address``. ``direct`` asks it not to redirect; a
        ``fingerprint`` (from the seed that redirected here) pins the digests a relay
        may announce to the seed's."""
        host, port = split_address(address)
        start = time.perf_counter()
        connect_s = self.timeout_s if fingerprint is None else min(self.timeout_s, _RELAY_CONNECT_S)
        with socket.create_connection((host, port), timeout=connect_s) as conn:
            conn.settimeout(self.timeout_s)
            hello: dict[str, Any] = {
                "type": HELLO,
                "identity": self.identity,
                "manifest": [spec.to_wire() for spec in self.specs],
                "direct": direct,
            }
            if self.relay is not None and self.relay.seed is None:
                hello["relay_port"] = self.relay.port
            reply = exchange(conn, hello, self.secret)
            if reply["type"] == REFUSE:
                raise _refusal(reply)
            if reply["type"] != ACCEPT:
                raise ProtocolError(f"expected '{ACCEPT}', got '{reply['type']}'")
            digests = field(reply, "digests", list)
            if len(digests) != len(self.specs) or not all(isinstance(d, str) for d in digests):
                raise ProtocolError("accept carries a digest list that does not fit the manifest")
            store_port = field(reply, "store_port", int)
            bucket_bytes = field(reply, "bucket_bytes", int)
            if not 0 < bucket_bytes <= _MAX_BUCKET_BYTES:
                raise ProtocolError(f"accept carries a bucket size of {bucket_bytes} bytes")
            if fingerprint is not None and value_fingerprint(self.specs, digests) != fingerprint:
                raise ProtocolError("relay announces other weights than the seed that named it")
            relayed = self._begin_relay(digests) if "relay_port" in hello else None
            try:
                local = conn.getsockname()[0]
                with data_group(host, store_port, CLIENT_RANK, self.timeout_s, local) as pg:
                    nbytes = recv_tensors(
                        pg, self.targets, self.specs, digests, bucket_bytes,
                        on_verified=relayed.verified if relayed is not None else None,
                    )
            except TransferError as e:
                send_msg(conn, {"type": DONE, "ok": False, "reason": str(e)})
                raise
            finally:
                if relayed is not None and not relayed.complete:
                    # Its clients stop waiting for tensors this side will not verify.
                    relayed.fail(f"its own transfer from {address} did not complete")
            send_msg(conn, {"type": DONE, "ok": True})
        seconds = time.perf_counter() - start
        logger.info(
            "Netloader rank %s received %d bytes from %s in %.3f s (%.2f GB/s), "
            "all %d digests verified",
            self.identity.get("rank"), nbytes, address, seconds, nbytes / seconds / 1e9,
            len(digests),
        )
        return Received(address, nbytes, seconds, digests)

    def _begin_relay(self, digests: list[str]) -> LoadedWeights:
        assert self.relay is not None
        weights = self.relay.begin(self.specs, self.targets, digests)
        logger.info(
            "Netloader rank %s relays on port %d: passes on each tensor once verified",
            self.identity.get("rank"), self.relay.port,
        )
        return weights


def _refusal(reply: dict[str, Any]) -> SourceRefused:
    redirect = optional_field(reply, "redirect", str)
    fingerprint = None
    if redirect is not None:
        try:
            split_address(redirect, key="redirect")
        except NetloaderConfigError as e:
            raise ProtocolError(str(e)) from e
        fingerprint = field(reply, "value_fingerprint", str)
    return SourceRefused(
        str(reply.get("reason")), reply.get("retry") is True, redirect, fingerprint
    )


def exchange(
    conn: socket.socket, request: dict[str, Any], secret: bytes | None
) -> dict[str, Any]:
    """Answer the seed's challenge with ``request`` and return the seed's reply.

    With a secret, the request carries this side's proof and every reply but a
    plain refusal must carry the seed's proof over its body; a seed that does not ask for
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
    # A plain refusal may come without a proof (the seed refuses a wrong secret without
    # one); a redirect sends this client elsewhere, so it must carry one.
    if secret is not None and (reply["type"] != REFUSE or "redirect" in reply):
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
