"""The client: try each seed address in order and collect why each one failed.

It only reports; whether to fall back to disk is the loader's decision. Whatever a
seed or relay answers (malformed, out of range, hostile, dripping, closing early,
sending extra bytes) ends as a reason in ``WeightFetch.reasons``, within a bounded
time: ``TIMEOUT`` for the handshake, the no-progress limit for the bulk data
(``transfer.Progress``), and ``TIMEOUT`` for the closing ``done``.
"""

import dataclasses
import functools
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader import load_state, metrics
from vllm_ascend.model_loader.netloader.cores import worker_cores
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.identity import only_layout_differs
from vllm_ascend.model_loader.netloader.load_state import NO_STATE, LoadState
from vllm_ascend.model_loader.netloader.log import get_logger, who
from vllm_ascend.model_loader.netloader.manifest import (
    TensorSpec,
    first_difference,
    manifest_sha256,
    value_fingerprint,
)
from vllm_ascend.model_loader.netloader.parts import part_count
from vllm_ascend.model_loader.netloader.planes.collective import CLIENT_RANK, group_link
from vllm_ascend.model_loader.netloader.planes.progress import (
    DEFAULT_MIN_RATE_BYTES_PER_S,
    TransferError,
    transfer_deadline_s,
)
from vllm_ascend.model_loader.netloader.planes.stream import StreamLink
from vllm_ascend.model_loader.netloader.planes.transfer import (
    TransferStats,
    bytes_from,
    recv_weights,
)
from vllm_ascend.model_loader.netloader.seed.relay import RelayListener, RelayProgress
from vllm_ascend.model_loader.netloader.wire.addresses import AddressError, parse_address
from vllm_ascend.model_loader.netloader.wire.auth import AuthError
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, clean, text
from vllm_ascend.model_loader.netloader.wire.frames import (
    MANIFEST_BYTES_PER_TENSOR,
    REFUSE,
    reply_cap,
    send_msg,
)
from vllm_ascend.model_loader.netloader.wire.handshake import ask_seed
from vllm_ascend.model_loader.netloader.wire.messages import (
    ACCEPT,
    LOADED,
    PROCESSED,
    REDIRECT,
    TCP,
    Accept,
    ManifestSummary,
    Resume,
    done,
    field,
    hello,
    info_request,
    manifest_request,
    parse_accept,
    parse_redirect,
    parse_refuse,
    refuses_only_the_layout,
)

logger = get_logger(__name__)

_BUSY_RETRY_S = 0.5
_MAX_BUCKET_BYTES = 1 << 30
# A relay the seed named is a peer that may be gone: do not wait long to find out.
_RELAY_CONNECT_S = 5.0
# Nor a seed a DNS answer or a registry record named (it may be a stale record of a
# pod that is gone, whose address drops packets).
DISCOVERED_CONNECT_S = 5.0
# Everything that can go wrong with one source, as this client sees it (UnicodeError:
# the IDNA codec inside socket.create_connection, for a name the checks let through).
SOURCE_ERRORS = (ProtocolError, AuthError, TransferError, OSError, AddressError, UnicodeError)


class SourceRefused(Exception):
    """The seed answered, but will not serve this client (``retry``: not now;
    ``other_layout``: not in the layout asked for, perhaps in the other)."""

    def __init__(self, reason: str, retry: bool = False, other_layout: bool = False):
        super().__init__(reason)
        self.retry = retry
        self.other_layout = other_layout


class Redirected(Exception):
    """The seed is sending and names a relay that must serve ``value_fingerprint``."""

    def __init__(self, relay: str, value_fingerprint: str):
        super().__init__(f"redirected to relay {relay}")
        self.relay = relay
        self.value_fingerprint = value_fingerprint


@dataclass(frozen=True)
class ClientSettings:
    """How a client fetches, built once from the config (``loader``)."""

    identity: dict[str, Any]
    timeout_s: float
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    # A checkpoint or value fingerprint the seed's weights must have (EXPECTED_FINGERPRINT).
    expected_fingerprint: str | None = None
    data_plane: str = TCP
    device: torch.device = torch.device("cpu")
    # A transfer ends within TIMEOUT plus its size at this rate (MIN_RATE_MB_PER_S).
    min_rate_bytes_per_s: float = DEFAULT_MIN_RATE_BYTES_PER_S
    # The layout to ask for (``layout``), and for the processed one this side's
    # processing signature, which the seed's must equal.
    layout: str = LOADED
    processing: dict[str, str] | None = None


@dataclass
class Received:
    source: str
    nbytes: int
    seconds: float
    digests: list[str]
    # The seed's checkpoint fingerprint (what this instance now holds).
    checkpoint: str | None
    # Bytes kept from an earlier source with the same value fingerprint that failed
    # (a resumed transfer): not part of ``nbytes``.
    reused_bytes: int = 0
    # What the seed's load set besides tensors; checked against ``WeightFetch.model``,
    # for the loader to ``load_state.apply``.
    state: LoadState = NO_STATE
    layout: str = LOADED
    # The processed layout: the seed's ``layout.state_signature`` after its processing.
    signature: str | None = None
    # The part digests of the large tensors, by digest (``Accept.parts``).
    parts: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclass
class WeightFetch:
    """One attempt to fill ``targets`` (in manifest order) from a list of seeds.

    A failed attempt leaves each target untouched or holding exactly the seed's
    verified bytes (see ``transfer.recv_weights``), so the next seed or the disk
    loader can fill the same model."""

    settings: ClientSettings
    specs: Sequence[TensorSpec]
    targets: Sequence[torch.Tensor]
    # This instance's own listener: offered to the seed as a relay for the clients that
    # come after it, and started by the first transfer a seed accepts.
    relay: "RelayListener[Any] | None" = None
    reasons: list[str] = dataclasses.field(default_factory=list)
    # Addresses found by discovery (DNS, registry), not named by the operator: they get
    # DISCOVERED_CONNECT_S to connect and answer, not TIMEOUT.
    discovered: frozenset[str] = frozenset()
    # The model the targets belong to: a seed's load state must apply to it (None: a
    # fetch of bare tensors, whose caller checks any state itself).
    model: nn.Module | None = None

    def __post_init__(self) -> None:
        self._summary = ManifestSummary(
            len(self.specs), sum(s.nbytes for s in self.specs), manifest_sha256(self.specs)
        )
        self._part_counts = [part_count(s.nbytes) for s in self.specs]
        # The first ``_held`` targets hold verified bytes of the weights with value
        # fingerprint ``_held_values``: the next source with that fingerprint resumes.
        self._held = 0
        self._held_values: str | None = None
        # Where the receiving thread spent the last transfer's time.
        self.stats = TransferStats()
        # Whether a seed refused only the layout asked for (the other may serve).
        self.layout_refused = False
        # Seeds that refused this model's identity for its parallel layout alone: they
        # may serve it across layouts (``reshard.discover``).
        self.identity_refused: list[str] = []

    @property
    def held(self) -> int:
        """How many leading targets hold bytes verified against a source's digests (where
        a resume starts); the others may hold anything a failed source wrote."""
        return self._held

    def _resume(self) -> Resume | None:
        if self._held_values is None or not 0 < self._held < len(self.specs):
            return None
        return Resume(self._held, self._held_values)

    def _verified(self, n: int) -> None:
        self._held = max(self._held, n)

    @property
    def _who(self) -> str:
        """``Netloader rank 0``: how this fetch's lines start."""
        return who(self.settings.identity.get("rank"))

    def run(self, addresses: Sequence[str]) -> Received | None:
        """What the first of ``addresses`` that serves delivered, or None (each
        failure's reason in ``reasons``). Receiving and hashing may use every core the
        worker was given (``cores.worker_cores``, in ``_receive``); the calling thread's
        CPU affinity is as before when this returns or raises."""
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
            self.layout_refused |= e.other_layout
            if only_layout_differs(str(e)):
                self.identity_refused.append(address)
        except SOURCE_ERRORS as e:
            reason = f"{label} failed: {type(e).__name__}: {e}"
        self.reasons.append(reason)
        logger.warning(
            "%s: no verified model from %s after %.3f s (%s)%s",
            self._who, address, time.perf_counter() - start, reason, then,
        )
        return None

    def _from_source(self, address: str) -> Received:
        deadline = time.monotonic() + self.settings.timeout_s
        direct = False
        while True:
            try:
                return self._attempt(address, direct)
            except Redirected as e:
                if direct:
                    raise ProtocolError("seed redirected a request that asked it not to") from e
                metrics.METRICS.relay_hop()
                received = self._via_relay(e.relay, e.value_fingerprint, address)
                if received is not None:
                    return received
                direct = True  # the relay could not serve: ask the seed itself
            except SourceRefused as e:
                if not e.retry or time.monotonic() + _BUSY_RETRY_S > deadline:
                    raise
                time.sleep(_BUSY_RETRY_S)

    def _via_relay(self, relay: str, fingerprint: str, seed: str) -> Received | None:
        """One attempt at the relay ``seed`` sent us to; None (reason kept) if it failed."""

        def attempt() -> Received:
            try:
                return self._attempt(relay, direct=True, fingerprint=fingerprint)
            except Redirected as e:
                raise ProtocolError("relay redirected a request that asked it not to") from e

        return self._tried(
            relay, f"relay {relay} (named by {seed})", attempt, then=f"; asking {seed} directly"
        )

    def _attempt(
        self, address: str, direct: bool = False, fingerprint: str | None = None
    ) -> Received:
        """One transfer from ``address``. ``direct`` asks it not to redirect; a
        ``fingerprint`` (from the seed that redirected here) pins the digests a relay
        may announce to the seed's."""
        host, port = parse_address(address, key="source")
        timeout_s = self.settings.timeout_s
        # A relay the seed named, or a seed discovery named, gets less time to answer
        # than a seed the operator named.
        handshake_s = timeout_s
        if fingerprint is not None:
            handshake_s = min(timeout_s, _RELAY_CONNECT_S)
        elif address in self.discovered:
            handshake_s = min(timeout_s, DISCOVERED_CONNECT_S)
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=handshake_s) as conn:
            offer_relay = self.relay is not None and self.relay.seed is None
            resume = self._resume()
            body = hello(
                self.settings.identity, self._summary,
                self.relay.port if offer_relay and self.relay is not None else None,
                direct, (self.settings.data_plane,), self.settings.expected_fingerprint, resume,
                self.settings.layout, self.settings.processing,
            )
            reply = ask_seed(
                conn, body, self.settings.secret,
                Deadline(handshake_s, f"handshake with {address}"),
                reply_cap(len(self.specs)) + load_state.WIRE_BYTES
                + 64 * sum(self._part_counts),
            )
            accepted = self._accepted(address, reply, fingerprint, resume)
            progress = self._begin_relay(accepted) if offer_relay else None
            try:
                nbytes = self._receive(conn, accepted, progress)
            except SOURCE_ERRORS as e:
                with_done = Deadline(1.0, "sending 'done'")
                try:
                    send_msg(conn, done(False, f"{type(e).__name__}: {e}"), with_done)
                except SOURCE_ERRORS:
                    pass  # the seed may be gone: the reason stays on this side
                raise
            finally:
                if progress is not None and not progress.complete:
                    # Its clients stop waiting for tensors this side will not verify.
                    progress.fail(f"its own transfer from {address} did not complete")
            try:
                send_msg(conn, done(True), Deadline(timeout_s, f"'done' to {address}"))
            except SOURCE_ERRORS as e:
                # Every tensor is verified: only the seed's count of transfers misses it.
                logger.warning("%s: 'done' to %s failed: %s", self._who, address, e)
        seconds = time.perf_counter() - start
        reused = self._summary.nbytes - nbytes
        stats = self.stats
        logger.info(
            "%s received %d bytes from %s over %s in %.3f s (%.2f GB/s), "
            "all %d digests verified (waited %.3f s for data, verified %.3f s, %.3f s of "
            "CPU, copied %.3f s), %s layout%s",
            self._who, nbytes, address, accepted.data_plane, seconds,
            nbytes / max(seconds, 1e-9) / 1e9, len(accepted.digests),
            stats.wait_s, stats.verify_s, stats.verify_cpu_s, stats.copy_s, accepted.layout,
            f"; resumed at tensor {accepted.start}: {reused} bytes reused" if reused else "",
        )
        return Received(address, nbytes, seconds, accepted.digests, accepted.checkpoint, reused,
                        accepted.state, accepted.layout, accepted.signature, accepted.parts)

    def _accepted(
        self, address: str, reply: dict[str, Any], fingerprint: str | None,
        resume: Resume | None,
    ) -> Accept:
        """The seed's accept, checked; every other answer raises. From here on the
        targets count as this seed's: from its start on they are overwritten, and
        before it they hold what it announced (a resume with its value fingerprint)."""
        kind = reply["type"]
        if kind == REFUSE:
            reason, retry = parse_refuse(reply)
            if reason.startswith("tensor manifest differs"):
                reason += self._manifest_detail(address)
            raise SourceRefused(reason, retry, refuses_only_the_layout(reply))
        if kind == REDIRECT:
            raise Redirected(*parse_redirect(reply))
        if kind != ACCEPT:
            raise ProtocolError(f"expected '{ACCEPT}', got '{clean(kind, 40)}'")
        accepted = parse_accept(reply, len(self.specs), (self.settings.data_plane,),
                                _MAX_BUCKET_BYTES, resume.start if resume is not None else 0,
                                self.settings.layout, self._part_counts)
        values = value_fingerprint(self.specs, accepted.digests, accepted.state)
        if accepted.start and resume is not None and values != resume.values:
            raise ProtocolError(
                f"seed resumes at tensor {accepted.start} but serves values {values}, "
                f"not the {resume.values} this client holds"
            )
        if fingerprint is not None and values != fingerprint:
            raise ProtocolError("relay announces other weights than the seed that named it")
        expected = self.settings.expected_fingerprint
        if expected is not None and expected not in (accepted.checkpoint, values):
            raise SourceRefused(
                f"seed serves checkpoint {accepted.checkpoint} with values {values}, "
                f"not EXPECTED_FINGERPRINT {expected}",
                # A value fingerprint names one layout: the other may match it.
                other_layout=accepted.layout == PROCESSED,
            )
        mine = self.settings.identity.get("checkpoint")
        if mine is not None and accepted.checkpoint != mine:
            raise SourceRefused(f"seed serves checkpoint {accepted.checkpoint}, this side {mine}")
        if self.model is not None:
            try:
                load_state.check(self.model, accepted.state)
            except load_state.LoadStateError as e:
                raise SourceRefused(str(e)) from e
        if resume is not None and accepted.start == 0:
            logger.info(
                "%s: %s sends from tensor 0 (it serves values %s, not the "
                "%s of the %d tensors held)", self._who, address, values[:12],
                resume.values[:12], resume.start,
            )
        if values != self._held_values:
            # Other weights: what is held counts for nothing from here on. With the
            # same values the prefix stays held (a start of 0 rewrites it identically).
            self._held = accepted.start
        self._held_values = values
        return accepted

    def _receive(
        self, conn: socket.socket, accepted: Accept, progress: RelayProgress | None
    ) -> int:
        # Only threads that end with the transfer start while the thread is widened.
        with worker_cores(self._who):
            return self._receive_on(conn, accepted, progress)

    def _receive_on(
        self, conn: socket.socket, accepted: Accept, progress: RelayProgress | None
    ) -> int:
        settings = self.settings

        def on_verified(n: int) -> None:
            self._verified(n)
            if progress is not None:
                progress.verified(n)

        first = accepted.start
        total = bytes_from(self.specs, first)
        stats = self.stats = TransferStats()
        deadline_s = transfer_deadline_s(total, settings.timeout_s, settings.min_rate_bytes_per_s)
        if accepted.data_plane == TCP:
            link = StreamLink(
                conn, settings.timeout_s, total, deadline_s=deadline_s,
                on_bytes=progress.arrived if progress is not None else None,
            )
            return recv_weights(link, self.targets, self.specs, accepted.digests,
                                accepted.bucket_bytes, stats=stats, on_verified=on_verified,
                                start=first, parts=accepted.parts,
                                on_verified_bytes=(progress.verified_bytes
                                                   if progress is not None else None))
        setup = Deadline(settings.timeout_s, "group set-up")
        with group_link(conn, CLIENT_RANK, settings.timeout_s, settings.device, setup,
                        deadline_s=deadline_s) as group:
            return recv_weights(group, self.targets, self.specs, accepted.digests,
                                accepted.bucket_bytes, stats=stats, on_verified=on_verified,
                                parts=accepted.parts,
                                start=first)

    def _manifest_detail(self, address: str) -> str:
        """The first difference between this side's manifest and the seed's (asked
        for on a second connection), or "" if the seed cannot tell."""
        try:
            cap = reply_cap(len(self.specs), MANIFEST_BYTES_PER_TENSOR)
            reply = ask_once(address, manifest_request(), self.settings.secret,
                             min(self.settings.timeout_s, 10.0), cap)
            entries = field(reply, "tensors", list)
            theirs = [TensorSpec.from_wire(item) for item in entries]
        except (*SOURCE_ERRORS, ValueError) as e:
            return f" (its manifest could not be read: {type(e).__name__})"
        difference = first_difference(self.specs, theirs)
        return f"; first difference: {difference}" if difference else ""

    def _begin_relay(self, accepted: Accept) -> RelayProgress:
        assert self.relay is not None
        progress = self.relay.begin(self.specs, self.targets, accepted)
        logger.info(
            "%s relays on port %d: passes on each tensor (each 4 MiB part of a large "
            "one) once verified",
            self._who, self.relay.port,
        )
        return progress


def ask_once(
    address: str, body: dict[str, Any], secret: bytes | None, timeout_s: float, cap: int
) -> dict[str, Any]:
    """One request to ``address`` and its answer of the same type (at most ``cap``
    bytes). Raises ``ProtocolError`` (a refusal too), ``AuthError``, ``OSError``."""
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        reply = ask_seed(conn, body, secret, Deadline(timeout_s, f"request to {address}"), cap)
    if reply["type"] == REFUSE:
        raise ProtocolError(f"refused: {text(reply, 'reason')}")
    if reply["type"] != body["type"]:
        raise ProtocolError(f"expected '{body['type']}', got '{clean(reply['type'], 40)}'")
    return reply


def query_seed(
    address: str, timeout_s: float = 10.0, secret: bytes | None = None
) -> dict[str, Any]:
    """Ask a seed what it serves (identity, size, value fingerprint, transfers).
    Raises ``ProtocolError``, ``AuthError``, ``OSError`` or ``AddressError``."""
    return ask_once(address, info_request(), secret, timeout_s, reply_cap(0))
