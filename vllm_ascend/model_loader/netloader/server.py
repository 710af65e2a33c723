"""The seed: a listener thread in a worker that sends its loaded weights to clients.

It never takes the worker down: each connection runs in its own thread with a
timeout on every socket and group operation, and whatever a client does costs
the seed at most that timeout.

Fan-out: a starting instance listens before its own fetch (``RelayListener``) and
names that port in its hello. While a seed is sending, it sends the next client
to the last such relay instead of splitting its uplink, so N clients form a chain
in which each passes on the tensors it has verified while it still receives.
"""

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vllm.logger import logger

from vllm_ascend.model_loader.netloader.auth import (
    SECRET_ENV,
    AuthError,
    client_proof,
    new_nonce,
    proof_matches,
    seed_proof,
)
from vllm_ascend.model_loader.netloader.manifest import (
    DRAFT,
    LoadedWeights,
    RelayStalled,
    TensorSpec,
    first_difference,
    identity_difference,
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
    send_last,
    send_msg,
)
from vllm_ascend.model_loader.netloader.transport import (
    BUCKET_BYTES,
    SEED_RANK,
    TransferError,
    bind_rendezvous,
    data_group,
    send_tensors,
)

MAX_CONCURRENT_TRANSFERS = 4
_ACCEPT_POLL_S = 0.5
# An open seed (no shared secret) says so once per process, not once per rank or reload.
_open_seed_warned = threading.Event()


class SeedServer:
    """Serves one rank's loaded weights on ``host:port`` until stopped."""

    def __init__(
        self,
        weights: LoadedWeights,
        identity: dict[str, Any],
        rank: int,
        host: str,
        port: int,
        timeout_s: float,
        output_prefix: str | None = None,
        bucket_bytes: int = BUCKET_BYTES,
        send_limit_bytes_per_s: float | None = None,
        loaded_from: str = "disk",
        load_seconds: float | None = None,
        fallback_reasons: tuple[str, ...] = (),
        secret: bytes | None = None,
        listen_socket: socket.socket | None = None,
    ):
        self.weights = weights
        self.identity = identity
        self.rank = rank
        # "rank 0", or "rank 0 draft" for a draft model's seed: every log line names it.
        self._who = f"rank {rank}" + (" draft" if identity.get("role") == DRAFT else "")
        self.timeout_s = timeout_s
        self._host = host
        self._output_prefix = output_prefix
        self._bucket_bytes = bucket_bytes
        self._send_limit = send_limit_bytes_per_s
        self._loaded_from = loaded_from
        self._load_seconds = load_seconds
        self._fallback_reasons = list(fallback_reasons)
        self._secret = secret
        self._counts_lock = threading.Lock()
        self._active = 0
        self._completed = 0
        # The relay of the client that joined the chain last: where the next client goes
        # while this seed is sending. Reset when it stops sending.
        self._tail: str | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_TRANSFERS)
        self._stopped = threading.Event()
        # Bound here, in the caller's thread, so a taken port fails start-up loudly
        # (a relay's was bound before its fetch began: see RelayListener).
        self._sock = listen_socket or socket.create_server((host, port))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, name=f"netloader-seed-rank{rank}", daemon=True
        )
        self.ready = threading.Event()

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    def start(self) -> "SeedServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._sock.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # Broad on purpose: this is the thread's top level, and a seed bug must
        # never reach the worker that serves users. The traceback is logged.
        # No post-processing re-digest here: on vLLM CPU it changed the greedy outputs
        # of a 1 GB model (cause not yet found). Clients verify every tensor against
        # the digests taken before processing, so a tensor processing modified in
        # place makes transfers fail (the client loads from disk), never wrong.
        try:
            self._write_address_file()
            logger.info(
                "Netloader seed %s listening on %s: %d tensors, %.3f GB",
                self._who, self.address, len(self.weights.specs), self.weights.total_bytes / 1e9,
            )
            if self._secret is None and not _open_seed_warned.is_set():
                _open_seed_warned.set()
                logger.warning(
                    "Netloader seed has no shared secret (SECRET_FILE or $%s): any host "
                    "that reaches %s can pull this model's weights", SECRET_ENV, self.address,
                )
            self.ready.set()
            self._accept_loop()
        except Exception:  # noqa: BLE001 - thread top level, see above
            if not self._stopped.is_set():
                logger.exception("Netloader seed %s stopped by an error", self._who)
        finally:
            self._sock.close()

    def _write_address_file(self) -> None:
        if self._output_prefix is None:
            return
        path = f"{self._output_prefix}{self.rank}.txt"
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.address + "\n")
        os.replace(tmp, path)

    def _accept_loop(self) -> None:
        self._sock.settimeout(_ACCEPT_POLL_S)
        while not self._stopped.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                raise
            threading.Thread(
                target=self._handle, args=(conn, f"{peer[0]}:{peer[1]}"), daemon=True,
                name=f"netloader-seed-rank{self.rank}-conn",
            ).start()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        # Broad at the top of the connection thread, for the same reason as _run.
        try:
            with conn:
                conn.settimeout(self.timeout_s)
                try:
                    self._serve(conn, peer)
                except ProtocolError as e:
                    send_last(conn, {"type": REFUSE, "reason": f"bad request: {e}", "retry": False})
                    raise
                except AuthError as e:
                    # Nothing but this fixed reason goes back: no identity, no manifest.
                    send_last(conn, {"type": REFUSE, "reason": str(e), "retry": False})
                    raise
        except (
            ProtocolError, AuthError, TransferError, RelayStalled, OSError, RuntimeError
        ) as e:
            logger.warning("Netloader seed %s: client %s failed: %s", self._who, peer, e)
        except Exception:  # noqa: BLE001 - connection thread top level, see above
            logger.exception("Netloader seed %s: client %s hit an error", self._who, peer)

    def describe(self) -> dict[str, Any]:
        """What this seed serves, for operators and tests (the ``info`` request)."""
        with self._counts_lock:
            active, completed = self._active, self._completed
        return {
            "identity": self.identity,
            "address": self.address,
            "tensors": len(self.weights.specs),
            "bytes": self.weights.total_bytes,
            "value_fingerprint": self.weights.value_fingerprint(),
            "loaded_from": self._loaded_from,
            "load_seconds": self._load_seconds,
            "fallback_reasons": self._fallback_reasons,
            "relaying": not self.weights.complete,
            "active_transfers": active,
            "completed_transfers": completed,
        }

    def _serve(self, conn: socket.socket, peer: str) -> None:
        seed_nonce = new_nonce()
        send_msg(conn, {"type": CHALLENGE, "nonce": seed_nonce, "auth": self._secret is not None})
        hello = recv_msg(conn)
        if hello["type"] not in (HELLO, INFO):
            raise ProtocolError(f"expected '{HELLO}' or '{INFO}', got '{hello['type']}'")
        self._authenticate(hello, seed_nonce)
        if hello["type"] == INFO:
            self._answer(conn, {"type": INFO, **self.describe()}, seed_nonce, hello)
            return
        reason = self._refusal(hello)
        if reason is not None:
            logger.warning("Netloader seed %s refused %s: %s", self._who, peer, reason)
            send_last(conn, {"type": REFUSE, "reason": reason, "retry": False})
            return
        relay = _relay_address(conn, hello)
        direct = optional_field(hello, "direct", bool) is True
        with self._counts_lock:
            tail = self._tail
            if tail is not None and self._active and not direct:
                route = "redirect"
            elif self._slots.acquire(blocking=False):
                route = "serve"
                self._active += 1
            else:
                route = "busy"
            if relay is not None and route != "busy":
                self._tail = relay
        if route == "redirect":
            logger.info("Netloader seed %s sends %s to relay %s", self._who, peer, tail)
            body = {
                "type": REFUSE, "reason": f"seed is sending; relay {tail} passes it on",
                "retry": True, "redirect": tail,
                "value_fingerprint": self.weights.value_fingerprint(),
            }
            self._answer(conn, body, seed_nonce, hello)
            return
        if route == "busy":
            send_last(conn, {"type": REFUSE, "reason": "seed is busy", "retry": True})
            return
        verified = False
        try:
            verified = self._send_weights(conn, peer, seed_nonce, hello)
        finally:
            with self._counts_lock:
                self._active -= 1
                if verified:
                    self._completed += 1
                # A relay that did not get the model cannot pass it on; and once this seed
                # is idle, the next client starts a new chain (the old one may be gone).
                if not self._active or not verified and self._tail == relay:
                    self._tail = None
            self._slots.release()

    def promote(
        self, loaded_from: str, load_seconds: float, fallback_reasons: tuple[str, ...]
    ) -> None:
        """A relay whose own fetch completed goes on as this instance's seed."""
        with self._counts_lock:
            self._loaded_from = loaded_from
            self._load_seconds = load_seconds
            self._fallback_reasons = list(fallback_reasons)

    def _authenticate(self, request: dict[str, Any], seed_nonce: str) -> None:
        """Raise AuthError unless the client proved it knows the secret (if one is set)."""
        if self._secret is None:
            return
        nonce, proof = request.get("nonce"), request.get("proof")
        if not isinstance(nonce, str) or proof is None:
            raise AuthError("authentication required: this seed needs the shared secret")
        if not proof_matches(client_proof(self._secret, seed_nonce, nonce), proof):
            raise AuthError("authentication failed: wrong shared secret")

    def _answer(
        self, conn: socket.socket, body: dict[str, Any], seed_nonce: str, request: dict[str, Any]
    ) -> None:
        """Send ``body``, with the seed's proof over it and ``request`` when a secret is set."""
        if self._secret is not None:
            body = {**body, "proof": seed_proof(self._secret, seed_nonce, request, body)}
        send_msg(conn, body)

    def _refusal(self, hello: dict[str, Any]) -> str | None:
        difference = identity_difference(self.identity, hello.get("identity"))
        if difference is not None:
            return f"model identity differs: {difference}"
        try:
            theirs = [TensorSpec.from_wire(item) for item in field(hello, "manifest", list)]
        except ValueError as e:
            raise ProtocolError(str(e)) from e
        difference = first_difference(self.weights.specs, theirs)
        if difference is not None:
            return f"tensor manifest differs: {difference}"
        failure = self.weights.failure
        if failure is not None:
            return f"this relay's own transfer failed ({failure})"
        return None

    def _send_weights(
        self, conn: socket.socket, peer: str, seed_nonce: str, hello: dict[str, Any]
    ) -> bool:
        """Send every tensor; True if the client verified them all."""
        # Closed here if the group never took it over (the group detaches its fd).
        with bind_rendezvous(self._host) as rendezvous:
            store_port = rendezvous.getsockname()[1]
            accept = {
                "type": ACCEPT,
                "store_port": store_port,
                "bucket_bytes": self._bucket_bytes,
                "digests": self.weights.digests,
            }
            self._answer(conn, accept, seed_nonce, hello)
            start = time.perf_counter()
            group = data_group(
                self._host, store_port, SEED_RANK, self.timeout_s, conn.getsockname()[0],
                listen_socket=rendezvous,
            )
            with group as pg:
                sent = send_tensors(
                    pg, self.weights.tensors, self.weights.specs, self._bucket_bytes,
                    self._send_limit,
                    wait_ready=None if self.weights.complete else self._wait_ready,
                )
        seconds = time.perf_counter() - start
        done = recv_msg(conn, expect=DONE)
        verified = done.get("ok") is True
        log = logger.info if verified else logger.warning
        log(
            "Netloader seed %s sent to %s: %d bytes in %.3f s (%.2f GB/s), client %s",
            self._who, peer, sent, seconds, sent / seconds / 1e9,
            "verified all digests" if verified else f"rejected: {done.get('reason')}",
        )
        return verified

    def _wait_ready(self, count: int) -> None:
        self.weights.wait_ready(count, self.timeout_s)


def _relay_address(conn: socket.socket, hello: dict[str, Any]) -> str | None:
    """Where the client's relay listens: its port from the hello, on the address the
    client came from (never a host the client names, so no one can make this seed
    send other clients to a third party)."""
    port = optional_field(hello, "relay_port", int)
    if port is None:
        return None
    if not 1 <= port <= 65535:
        raise ProtocolError(f"relay_port {port} is not a port")
    host = conn.getpeername()[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayListener:
    """A starting instance's listener, bound before its own fetch so that its port can
    go into the hello. Once the fetch is accepted (the digests are known), ``begin``
    starts a seed over the fetch's targets that sends each tensor as soon as the fetch
    has verified it; after the load that seed goes on serving (``SeedServer.promote``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        make_seed: Callable[[LoadedWeights, socket.socket], SeedServer],
    ):
        self._sock = socket.create_server((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._make_seed = make_seed
        self.seed: SeedServer | None = None

    def begin(
        self, specs: list[TensorSpec], targets: list[Any], digests: list[str]
    ) -> LoadedWeights:
        named = [(spec.name, t) for spec, t in zip(specs, targets, strict=True)]
        weights = LoadedWeights.receiving(named, digests)
        self.seed = self._make_seed(weights, self._sock).start()
        return weights

    def serving_complete(self) -> SeedServer | None:
        """The relay's seed if its fetch delivered every tensor, else None."""
        if self.seed is not None and self.seed.weights.complete:
            return self.seed
        return None

    def close(self) -> None:
        if self.seed is not None:
            self.seed.stop()
        else:
            self._sock.close()
