"""The seed: a listener in a worker that sends its loaded weights to clients.

Nothing a peer does takes the worker down or holds it up: connections are bounded
and accepted by ``listener.Listener``; a peer proves the secret (or, without one,
sends its small request) before the seed looks at anything it sent, and never sends
more than ``protocol.MAX_REQUEST_BYTES`` at a time; every exchange has a deadline
and bulk data a no-progress limit; at most ``SeedSettings.max_transfers`` transfers
run at once. Whatever one connection does ends as a logged failure of that
connection.
"""

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vllm_ascend.model_loader.netloader import metrics
from vllm_ascend.model_loader.netloader.compile_cache import serving
from vllm_ascend.model_loader.netloader.config import (
    DEFAULT_RELAY_FANOUT,
    MAX_CONCURRENT_TRANSFERS,
)
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.identity import IDENTITY_DIFFERS, identity_difference
from vllm_ascend.model_loader.netloader.layout import signature_difference
from vllm_ascend.model_loader.netloader.log import get_logger, who
from vllm_ascend.model_loader.netloader.manifest import (
    DRAFT,
    LoadedWeights,
    manifest_sha256,
)
from vllm_ascend.model_loader.netloader.metrics import FAILED, OK, RELAY, SEED
from vllm_ascend.model_loader.netloader.plan import LoadOutcome
from vllm_ascend.model_loader.netloader.planes.collective import SEED_RANK, group_link
from vllm_ascend.model_loader.netloader.planes.progress import (
    DEFAULT_MIN_RATE_BYTES_PER_S,
    Pacer,
    TransferError,
    transfer_deadline_s,
)
from vllm_ascend.model_loader.netloader.planes.stream import StreamLink
from vllm_ascend.model_loader.netloader.planes.transfer import (
    BUCKET_BYTES,
    Link,
    WaitReady,
    bytes_from,
    send_weights,
    use_device,
)
from vllm_ascend.model_loader.netloader.seed import slicing
from vllm_ascend.model_loader.netloader.seed.layouts import Layouts
from vllm_ascend.model_loader.netloader.seed.listener import (
    Connection,
    Listener,
    write_address_file,
)
from vllm_ascend.model_loader.netloader.seed.preparing import Preparation
from vllm_ascend.model_loader.netloader.seed.relay import (
    RelayProgress,
    RelayStalled,
    RelayTree,
    relay_address,
)
from vllm_ascend.model_loader.netloader.seed.retention import Retained
from vllm_ascend.model_loader.netloader.wire.addresses import format_address
from vllm_ascend.model_loader.netloader.wire.auth import SECRET_ENV, AuthError
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, clean
from vllm_ascend.model_loader.netloader.wire.frames import MAX_REQUEST_BYTES, recv_msg, send_last
from vllm_ascend.model_loader.netloader.wire.handshake import SeedSide, open_as_seed
from vllm_ascend.model_loader.netloader.wire.messages import (
    COMPILE_CACHE,
    DONE,
    HELLO,
    INFO,
    LAYOUTS,
    PROCESSED,
    SLICES,
    TCP,
    Request,
    accept,
    info,
    manifest_reply,
    parse_done,
    redirect,
    refuse,
)

logger = get_logger(__name__)

# The most a relay sends per bucket while its own fetch still runs: a relay sends each
# byte once its own fetch verified it, a tensor up to ``parts.PART_BYTES`` whole and a
# larger one part by part, and waits between buckets with keepalives, so small buckets
# keep those waits short. A chain of N relays fills in about N times one part's (or
# small tensor's) time on the link: 8 hops of 4 MiB at 37.5 MB/s, 0.9 s (with whole
# 16 MiB tensors, 3.6 s: 8 instances took 1.58x one, 1.20x in parts). A seed's own
# buckets (and a relay's once its fetch is done) stay BUCKET_MB.
RELAY_BUCKET_BYTES = 4 << 20
# The most a handshake may take, whatever TIMEOUT says: a few small frames.
HANDSHAKE_S = 10.0
# An open seed (no shared secret) says so once per process, not once per rank or reload.
_open_seed_warned = threading.Event()


@dataclass(frozen=True)
class SeedSettings:
    """How a seed serves, built once from the config (``loader``)."""

    identity: dict[str, Any]
    rank: int
    host: str
    timeout_s: float
    bucket_bytes: int = BUCKET_BYTES
    send_limit_bytes_per_s: float | None = None
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    output_prefix: str | None = None
    data_plane: str = TCP
    # The worker's device, captured where the seed is created: a fresh thread's
    # current device is device 0, whatever the worker uses.
    device: torch.device = torch.device("cpu")
    max_transfers: int = MAX_CONCURRENT_TRANSFERS
    # A transfer ends within TIMEOUT plus its size at this rate (MIN_RATE_MB_PER_S), or
    # at the send cap if that is lower: a slow reader cannot hold a slot for long.
    min_rate_bytes_per_s: float = DEFAULT_MIN_RATE_BYTES_PER_S
    # This instance's vLLM compile cache, if it may be served (COMPILE_CACHE); None:
    # compile cache requests are refused.
    compile_cache: "serving.CacheServing | None" = None
    # This instance's ``layout.processing_signature`` (None: no processed layout).
    processing: dict[str, str] | None = None
    # RELAY_FANOUT: clients this seed sends to at once before it sends further ones to
    # its relays (``relay.RelayTree``); at most ``max_transfers``.
    fanout: int = DEFAULT_RELAY_FANOUT
    # Whether every rank of this instance listens on its host at LISTEN_PORT + rank.
    rank_ports: bool = False

    @property
    def who(self) -> str:
        """``Netloader seed rank 0`` (``... rank 0 draft`` for a draft model's seed):
        how every line of this seed starts."""
        return who(self.rank, DRAFT if self.identity.get("role") == DRAFT else None, seed=True)

    @property
    def handshake_s(self) -> float:
        return min(self.timeout_s, HANDSHAKE_S)


class SeedServer:
    """Serves one rank's weights on the bound ``sock`` until stopped: ``weights`` in the
    loaded layout, or ``Layouts`` (either layout or both).

    A relay's seed passes ``progress``: it sends each bucket once its own fetch has
    verified it, and refuses new clients once that fetch failed. With ``placement``
    (dynamic EPLB), a seed whose expert placement moved since it loaded refuses. With
    ``preparing`` (``seed.preparing``) it refuses as busy until its digests are done
    and ``keep`` gave it what it serves."""

    def __init__(
        self,
        weights: "LoadedWeights | Layouts",
        settings: SeedSettings,
        sock: socket.socket,
        outcome: LoadOutcome | None = None,
        progress: RelayProgress | None = None,
        retained: Retained | None = None,
        placement: Callable[[], str] | None = None,
        preparing: Preparation | None = None,
    ):
        self.layouts = weights if isinstance(weights, Layouts) else Layouts(weights)
        self._preparing = preparing
        self.settings = settings
        self._placement = placement
        self._placement_at_load = placement() if placement is not None else None
        # How this seed's own load ended (a relay's: "relaying its fetch" until promoted).
        self._outcome = outcome or LoadOutcome()
        self._progress = progress
        # What this seed keeps beyond the running model (a relay's: once it is processed).
        self._retained = retained
        # Both layouts have the loaded manifest (``layout``): one sha serves both.
        specs = preparing.specs if preparing is not None else self.weights.specs
        self._manifest_sha = manifest_sha256(specs)
        self._manifest_wire = [spec.to_wire() for spec in specs]
        self._manifest_bytes = sum(spec.nbytes for spec in specs)
        self._lock = threading.Lock()
        self._active = 0
        self._completed = 0
        # Per layout, the relays of the clients this seed sent to or on: where further
        # clients go while this seed is sending. Reset when it stops sending.
        self._trees: dict[str, RelayTree] = {}
        self.port: int = sock.getsockname()[1]
        self.address = format_address(settings.host, self.port)
        self._listener = Listener(sock, self._handle, f"netloader-seed-rank-{settings.rank}"
                                  + ("-draft" if settings.identity.get("role") == DRAFT else ""))
        self.ready = threading.Event()

    @property
    def identity(self) -> dict[str, Any]:
        return self.settings.identity

    @property
    def weights(self) -> LoadedWeights:
        """The loaded layout if this seed serves it whole, else the processed one."""
        return self.layouts.primary

    def start(self) -> "SeedServer":
        write_address_file(self.settings.output_prefix, self.settings.rank, self.address)
        if self._preparing is None:
            self._log_serving()
        else:  # its clients are refused until ``keep``
            logger.info("%s listening on %s: %s", self.settings.who, self.address,
                        self._preparing.reason())
        if self.settings.secret is None and not _open_seed_warned.is_set():
            _open_seed_warned.set()
            logger.warning(
                "Netloader seed has no shared secret (SECRET_FILE or $%s): any host "
                "that reaches %s can pull this model's weights", SECRET_ENV, self.address,
            )
        self._listener.start()
        self.ready.set()
        return self

    def _log_serving(self) -> None:
        logger.info(
            "%s listening on %s: %d tensors, %.3f GB, %s data plane, %s layout%s",
            self.settings.who, self.address, len(self.weights.specs),
            self.weights.total_bytes / 1e9, self.settings.data_plane,
            " and ".join(name for name in LAYOUTS if self.layouts.weights(name) is not None),
            "" if self.layouts.processed is not None
            else f" (not processed: {self.layouts.not_processed})",
        )

    def stop(self) -> None:
        self._listener.stop()

    def promote(self, outcome: LoadOutcome) -> None:
        """A relay whose own fetch completed goes on as this instance's seed."""
        with self._lock:
            self._outcome = outcome
            self._progress = None

    def keep(self, layouts: Layouts, retained: Retained | None) -> None:
        """Serve ``layouts`` (the tensors ``retention.retain`` kept, and the processed
        layout once the model is processed) from now on; transfers under way finish with
        what they started with."""
        with self._lock:
            self.layouts = layouts
            self._retained = retained
            was_preparing, self._preparing = self._preparing is not None, None
        if was_preparing:
            self._log_serving()

    def describe(self) -> dict[str, Any]:
        """What this seed serves, for operators and tests (the ``info`` request)."""
        with self._lock:
            active, completed, outcome = self._active, self._completed, self._outcome
            progress, retained = self._progress, self._retained
            relays = {layout: len(tree) for layout, tree in self._trees.items() if tree}
            preparing, layouts = self._preparing, self.layouts
        common = {
            "identity": self.identity, "address": self.address,
            "data_plane": self.settings.data_plane,
            "loaded_from": outcome.loaded_from,
            "loaded_layout": outcome.layout,
            "load_seconds": outcome.load_seconds,
            "fallback_reasons": list(outcome.fallback_reasons),
            "active_transfers": active, "completed_transfers": completed,
            "open_connections": self._listener.open_connections,
            "rank_ports": self.settings.rank_ports,
        }
        if preparing is not None:
            return preparing.seed_info(common, LAYOUTS)
        weights = layouts.primary
        return {
            **common,
            "tensors": len(weights.specs),
            "bytes": weights.total_bytes,
            "value_fingerprint": weights.value_fingerprint(),
            "load_state": weights.state.describe(),
            "layouts": {name: self._layout_info(name) for name in LAYOUTS},
            "serves_compile_cache": self.settings.compile_cache is not None,
            "reused_bytes": outcome.reused_bytes,
            "relaying": progress is not None and not progress.complete,
            # Per layout, the relays this seed may send further clients to (RelayTree).
            "relays": relays,
            "evicted_connections": self._listener.evicted,
            **(retained.describe() if retained is not None else {}),
        }

    @contextlib.contextmanager
    def slot(self) -> Iterator[Callable[[], None] | None]:
        """One of ``max_transfers`` transfer slots, for a cross-layout client
        (``seed.slicing``): yields None if none was free, else what to call once the
        client verified every byte (``completed_transfers`` counts it)."""
        with self._lock:
            taken = self._active < self.settings.max_transfers
            self._active += taken
        try:
            yield self._count_completed if taken else None
        finally:
            with self._lock:
                self._active -= taken

    def _count_completed(self) -> None:
        with self._lock:
            self._completed += 1

    def not_serving(self) -> tuple[str, str] | None:
        """(kind, reason) why this seed serves no client now (preparing, experts
        moved), or None."""
        with self._lock:
            preparing, progress = self._preparing, self._progress
        if preparing is not None:
            return preparing.refusal()
        if progress is not None and not progress.complete:
            return "relaying", "this seed is a relay still receiving its own model"
        if self._placement is not None and self._placement() != self._placement_at_load:
            return "expert_placement", "this seed's expert placement moved since it loaded"
        return None

    def _layout_info(self, layout: str) -> dict[str, Any]:
        weights = self.layouts.weights(layout)
        if weights is None:
            return {"unavailable": self.layouts.why_not(layout)}
        if weights.dropped:
            return {"unavailable": f"keeps no loaded copy of {len(weights.dropped)} "
                                   f"tensor(s) (INT8_CACHE), e.g. {weights.dropped[0]}"}
        return {"value_fingerprint": weights.value_fingerprint()}

    # --- one connection ------------------------------------------------------------------

    def _handle(self, conn: Connection) -> None:
        # Broad at the top of the connection thread: a seed bug must never reach the
        # worker that serves users. The traceback is logged.
        who, peer = self.settings.who, conn.peer
        try:
            use_device(self.settings.device)
            self._serve(conn)
        except (ProtocolError, AuthError, TransferError, RelayStalled, OSError) as e:
            logger.warning("%s: client %s failed: %s", who, peer, e)
        except Exception:  # noqa: BLE001 - connection thread top level, see above
            logger.exception("%s: client %s hit an error", who, peer)

    def _serve(self, conn: Connection) -> None:
        deadline = Deadline(self.settings.handshake_s, f"handshake with {conn.peer}")
        try:
            side = open_as_seed(conn.sock, self.settings.secret, deadline)
        except ProtocolError as e:
            metrics.METRICS.refusal("bad_request")
            send_last(conn.sock, refuse(f"bad request: {e}", retry=False), deadline)
            raise
        except AuthError as e:
            metrics.METRICS.refusal("auth")
            # Nothing but this fixed reason goes back: no identity, no manifest.
            send_last(conn.sock, refuse(str(e), retry=False), deadline)
            raise
        conn.settle()
        request = side.request
        if request.kind == INFO:
            side.answer_last(info(self.describe()), deadline)
        elif request.kind == HELLO:
            self._hello(conn, side, deadline)
        elif request.kind == SLICES:
            slicing.serve(self, conn, side, deadline)
        elif request.kind == COMPILE_CACHE:
            serving.serve(conn.sock, side, self.settings.compile_cache,
                                self.settings.who, conn.peer, deadline)
        else:
            side.answer_last(manifest_reply(self._manifest_wire), deadline)

    def _hello(self, conn: Connection, side: SeedSide, deadline: Deadline) -> None:
        refusal = self._refusal(side.request)
        if refusal is not None:
            kind, reason = refusal
            metrics.METRICS.refusal(kind)
            (logger.info if kind == "preparing" else logger.warning)(
                "%s refused %s: %s", self.settings.who, conn.peer, reason)
            side.refuse(reason, retry=kind == "preparing", deadline=deadline,
                        other_layout=kind in ("layout", "processing"))
            return
        relay = relay_address(conn.sock, side.request.relay_port)
        layout = side.request.layout
        route, parent = self._route(relay, side.request.direct, layout)
        if route == "redirect":
            assert parent is not None
            logger.info(
                "%s sends %s to relay %s", self.settings.who, conn.peer, parent
            )
            weights = self.layouts.weights(side.request.layout)
            assert weights is not None  # _refusal checked it
            side.answer_last(redirect(parent, weights.value_fingerprint()), deadline)
            return
        if route == "busy":
            metrics.METRICS.refusal("busy")
            side.refuse("seed is busy", retry=True, deadline=deadline)
            return
        verified = False
        with self._lock:
            role = RELAY if self._progress is not None else SEED
        metrics.METRICS.started(role)
        start = time.perf_counter()
        first = 0
        try:
            first = self._resume_at(side.request)
            verified = self._send(conn, side, deadline, first, layout)
        finally:
            metrics.METRICS.stopped(role)
            metrics.METRICS.ended(role, OK if verified else FAILED,
                                  bytes_from(self.weights.specs, first),
                                  time.perf_counter() - start)
            with self._lock:
                self._active -= 1
                if verified:
                    self._completed += 1
                # A relay that did not get the model cannot pass it on; and once this seed
                # is idle, the next client starts a new tree (the old one may be gone).
                if not self._active:
                    self._trees.clear()
                elif not verified and relay is not None and layout in self._trees:
                    self._trees[layout].drop(relay)

    def _route(self, relay: str | None, direct: bool, layout: str) -> tuple[str, str | None]:
        """("redirect", the relay for ``layout`` to send this client to), ("serve", None)
        with a transfer slot taken, or ("busy", None)."""
        with self._lock:
            tree = self._trees.setdefault(layout, RelayTree(self.settings.fanout))
            parent = None
            if self._active >= self.settings.fanout and not direct:
                parent = tree.parent(relay)
            if parent is not None:
                route = "redirect"
            elif self._active < self.settings.max_transfers:
                route = "serve"
                self._active += 1
            else:
                return "busy", None
            if relay is not None:
                tree.join(relay, parent)
            return route, parent

    def _refusal(self, request: Request) -> tuple[str, str] | None:
        """(kind, for the refusals metric; reason, for the client and the log), or None."""
        difference = identity_difference(self.identity, request.identity)
        if difference is not None:
            return "identity", f"{IDENTITY_DIFFERS}: {difference}"
        if self._placement is not None and self._placement() != self._placement_at_load:
            return "expert_placement", (
                "this seed's expert placement moved since it loaded (dynamic EPLB): its "
                "experts no longer sit where a client of this rank expects them"
            )
        with self._lock:
            preparing = self._preparing
            weights = self.layouts.weights(request.layout)
            why_not = self.layouts.why_not(request.layout)
        if preparing is not None:  # another model's client must not wait for it
            return self._manifest_refusal(request) or preparing.refusal()
        if weights is None:
            return "layout", f"this seed does not serve the {request.layout} layout: {why_not}"
        if request.layout == PROCESSED:
            mismatch = signature_difference(self.settings.processing or {}, request.processing)
            if mismatch is not None:
                return "processing", (
                    f"processing signature differs ({mismatch}): processed tensors are valid "
                    f"only where processing runs the same way; ask for the loaded layout"
                )
        if (wrong := self._manifest_refusal(request)) is not None:
            return wrong
        dropped = weights.dropped
        if dropped:
            return "dropped", (
                f"this seed keeps no loaded copy of {len(dropped)} tensor(s) that "
                f"processing replaced (INT8_CACHE / INT8_CACHE_NAME), e.g. "
                f"{dropped[0]}: it cannot send this model"
            )
        uncarried = weights.state.uncarried
        if uncarried:
            return "load_state", (
                f"this seed's load set state Netloader cannot carry: "
                f"{', '.join(uncarried[:5])}{' ...' if len(uncarried) > 5 else ''}"
            )
        with self._lock:
            progress = self._progress
        if progress is not None and progress.failure is not None:
            return "relay_failed", f"this relay's own transfer failed ({progress.failure})"
        if self.settings.data_plane not in request.data_planes:
            return "data_plane", (
                f"this seed sends over the {self.settings.data_plane} data plane; the client "
                f"offers {', '.join(request.data_planes)[:100]}"
            )
        return None

    def _manifest_refusal(self, request: Request) -> tuple[str, str] | None:
        """Why the client's manifest (count and size too: they bound a resume) is not
        this seed's, which both layouts share; None if it is."""
        theirs = request.manifest
        assert theirs is not None  # a parsed hello has one
        mine = (self._manifest_sha, len(self._manifest_wire), self._manifest_bytes)
        if (theirs.sha256, theirs.tensors, theirs.nbytes) == mine:
            return None
        return "manifest", (
            f"tensor manifest differs: {clean(theirs.tensors, 20)} tensors of "
            f"{clean(theirs.nbytes, 20)} bytes there vs {mine[1]} of {mine[2]} here "
            f"(sha256 {theirs.sha256[:12]} vs {mine[0][:12]})"
        )

    def _resume_at(self, request: Request) -> int:
        """The first tensor to send: where the client resumes if the tensors it holds
        came from weights with this seed's value fingerprint (so they equal this seed's,
        digest for digest), else 0."""
        resume = request.resume
        weights = self.layouts.weights(request.layout)
        if (
            resume is None or weights is None
            or resume.values != weights.value_fingerprint()
            or not 0 < resume.start < len(weights.specs)
        ):
            return 0
        return resume.start

    def _send(
        self, conn: Connection, side: SeedSide, deadline: Deadline, first: int, layout: str
    ) -> bool:
        """Send every tensor of ``layout`` from ``first`` on; True if the client verified
        them all."""
        settings = self.settings
        with self._lock:
            layouts = self.layouts
        weights = layouts.weights(layout)
        if weights is None or weights.dropped:
            # ``keep`` dropped tensors since ``_refusal`` looked (a relay, processed).
            missing = weights.dropped[0] if weights is not None else f"the {layout} layout"
            side.refuse(f"this seed keeps no loaded copy of {missing}",
                        retry=False, deadline=deadline)
            return False
        plane = settings.data_plane
        with self._lock:
            progress = self._progress
        bucket_bytes = (settings.bucket_bytes if progress is None
                        else min(settings.bucket_bytes, RELAY_BUCKET_BYTES))
        side.answer(
            accept(list(weights.digests), bucket_bytes, plane,
                   self.identity.get("checkpoint"), first, weights.state, layout,
                   layouts.signature if layout == PROCESSED else None,
                   [p for d in weights.digests for p in weights.parts.get(d, ())]),
            deadline,
        )
        total = bytes_from(weights.specs, first)
        if first:
            logger.info(
                "%s resumes %s at tensor %d of %d: the client holds %d bytes "
                "of these values, %d to send",
                settings.who, conn.peer, first, len(weights.specs),
                weights.total_bytes - total, total,
            )
        pacer = Pacer(settings.send_limit_bytes_per_s)
        rate = min(settings.min_rate_bytes_per_s,
                   settings.send_limit_bytes_per_s or settings.min_rate_bytes_per_s)
        deadline_s = transfer_deadline_s(total, settings.timeout_s, rate)
        wait_ready: WaitReady | None = None
        if progress is not None:
            def wait_ready(n: int, keepalive: Any) -> None:
                assert progress is not None
                progress.wait_ready(n, settings.timeout_s, keepalive or (lambda: None))

        start = time.perf_counter()
        if plane == TCP:
            link = StreamLink(conn.sock, settings.timeout_s, total, pacer, deadline_s)
            sent = self._send_on(link, weights, bucket_bytes, wait_ready, first)
        else:
            setup = Deadline(settings.handshake_s, f"group set-up with {conn.peer}")
            with group_link(conn.sock, SEED_RANK, settings.timeout_s, settings.device, setup,
                            pacer, deadline_s) as group:
                sent = self._send_on(group, weights, bucket_bytes, wait_ready, first)
        seconds = time.perf_counter() - start
        done = recv_msg(conn.sock, Deadline(settings.timeout_s, f"'done' from {conn.peer}"),
                        MAX_REQUEST_BYTES, expect=DONE)
        verified, reason = parse_done(done)
        log = logger.info if verified else logger.warning
        log(
            "%s sent to %s over %s: %d bytes in %.3f s (%.2f GB/s), %s layout, client %s",
            settings.who, conn.peer, plane, sent, seconds, sent / max(seconds, 1e-9) / 1e9,
            layout,
            "verified all digests" if verified else f"rejected: {reason}",
        )
        return verified

    def _send_on(
        self, link: Link, weights: LoadedWeights, bucket_bytes: int,
        wait_ready: WaitReady | None, first: int,
    ) -> int:
        try:
            return send_weights(link, weights.tensors, weights.specs, bucket_bytes,
                                wait_ready, first)
        except RelayStalled as e:
            link.abort(str(e))
            raise
