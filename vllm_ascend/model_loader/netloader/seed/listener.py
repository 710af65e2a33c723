"""Accepting connections for a seed: bounded, and impossible to kill from outside.

Each connection runs ``handle(connection)`` in a thread of its own. At most
``max_connections`` are open at once; when a new one arrives at the bound, a
connection still in its handshake (one that has not ``settle``d) is closed to make
room: the oldest of the peer host that has the most of them, so idle or dripping
peers lock out neither a client that answers at once nor the other hosts. If every
open connection has settled (transfers, bounded by the seed), the new one is closed.
New connections are accepted at most ``ACCEPT_RATE`` per second (bursts of
``ACCEPT_BURST``): a flood of connections waits in the kernel's backlog instead of
costing the serving worker a thread start each.

``accept`` failures (EMFILE when the process is out of descriptors, ECONNABORTED,
ENOBUFS...) and threads that cannot start are transient: the loop logs them (at
most once per ``_LOG_EVERY_S``), backs off up to ``_MAX_BACKOFF_S`` and goes on.
Out of descriptors, it first closes the oldest connection still in its handshake,
so a burst of idle connections cannot keep everyone else out.
"""

import errno
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from vllm_ascend.model_loader.netloader.log import get_logger

logger = get_logger(__name__)


MAX_CONNECTIONS = 32
ACCEPT_RATE = 200.0
ACCEPT_BURST = 64
_ACCEPT_POLL_S = 0.5
_MAX_BACKOFF_S = 1.0
_LOG_EVERY_S = 10.0


class Connection:
    """One accepted connection. The listener may close it (``evict``) until the
    handler calls ``settle``; closing happens under a lock, so a socket is never
    shut down after its descriptor was released and reused."""

    def __init__(self, sock: socket.socket, peer: str, host: str = ""):
        self.sock = sock
        self.peer = peer
        self.host = host
        self.opened = time.monotonic()
        self._lock = threading.Lock()
        self._settled = False
        self._closed = False

    def settle(self) -> None:
        """The handshake is over: from now on the listener leaves this connection be."""
        with self._lock:
            self._settled = True

    @property
    def settled(self) -> bool:
        with self._lock:
            return self._settled

    def evict(self) -> bool:
        """Shut an unsettled connection down (its handler then sees the end of it)."""
        with self._lock:
            if self._settled or self._closed:
                return False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer is gone already
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.sock.close()


class Listener:
    """Runs ``handle`` for each connection accepted on the bound ``sock``, on a thread
    named ``name``, until ``stop``. ``spawn`` makes the connection threads (a seam
    for tests)."""

    def __init__(
        self,
        sock: socket.socket,
        handle: Callable[[Connection], None],
        name: str,
        max_connections: int = MAX_CONNECTIONS,
        spawn: Callable[..., threading.Thread] = threading.Thread,
    ):
        self._sock = sock
        self._spawn = spawn
        self._handle = handle
        self._name = name
        self._max = max_connections
        self._live: list[Connection] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._last_log = 0.0
        self._tokens = float(ACCEPT_BURST)
        self._refilled = time.monotonic()
        self.evicted = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        # Here, not in the thread: a ``stop`` right after ``start`` closes the socket,
        # and a thread that only then set the timeout died on the closed descriptor.
        self._sock.settimeout(_ACCEPT_POLL_S)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._sock.close()
        self._thread.join(timeout=5)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopped.is_set():
            try:
                backoff = self._accept_one(backoff)
            except Exception:  # noqa: BLE001 - thread top level: the loop must outlive any bug
                logger.exception("Netloader %s: unexpected error in the accept loop", self._name)
                backoff = _MAX_BACKOFF_S
            if backoff:
                self._stopped.wait(backoff)

    def _accept_one(self, backoff: float) -> float:
        """Accept and admit one connection; returns how long to back off (0: none)."""
        wait = self._take_token()
        if wait:
            return wait
        try:
            sock, addr = self._sock.accept()
        except TimeoutError:
            return 0.0
        except OSError as e:
            if self._stopped.is_set():
                return 0.0
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # Out of descriptors: an idle handshake gives its one back, so the next
                # connection (perhaps an operator's info request) can be accepted.
                with self._lock:
                    if self._evict_oldest():
                        self._log_transient("out of descriptors; closed an idle handshake", e, 0)
                        return 0.01
            backoff = min(max(2 * backoff, 0.05), _MAX_BACKOFF_S)
            self._log_transient("accept failed", e, backoff)
            return backoff
        host, port = addr[0], addr[1]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self._admit(Connection(sock, peer, host)):
            return 0.0
        return min(max(2 * backoff, 0.05), _MAX_BACKOFF_S)

    def _admit(self, conn: Connection) -> bool:
        """Start ``conn``'s thread, making room first if at the bound; False if a
        thread could not be started (the caller backs off)."""
        with self._lock:
            if len(self._live) >= self._max and not self._evict_oldest():
                self.dropped += 1
                conn.close()
                return True
            self._live.append(conn)
        try:
            self._spawn(
                target=self._run_handler, args=(conn,), name=f"{self._name}-conn", daemon=True
            ).start()
        except Exception as e:  # noqa: BLE001 - "can't start new thread" (RuntimeError) or a broken spawn: one connection lost, never the loop
            self._forget(conn)
            conn.close()
            self._log_transient("cannot start a connection thread", e, 0)
            return False
        return True

    def _take_token(self) -> float:
        """Take one accept from the rate limit; 0, or how long until one is there."""
        now = time.monotonic()
        self._tokens = min(float(ACCEPT_BURST),
                           self._tokens + (now - self._refilled) * ACCEPT_RATE)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / ACCEPT_RATE

    def _evict_oldest(self) -> bool:
        """Close the oldest unsettled connection of the host that has the most
        unsettled ones (called with ``_lock`` held)."""
        unsettled = [c for c in self._live if not c.settled]
        per_host = Counter(c.host for c in unsettled)
        for host, _ in per_host.most_common():
            for old in sorted((c for c in unsettled if c.host == host), key=lambda c: c.opened):
                if old.evict():
                    self._live.remove(old)
                    self.evicted += 1
                    return True
        return False

    def _run_handler(self, conn: Connection) -> None:
        try:
            self._handle(conn)
        finally:
            self._forget(conn)
            conn.close()

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            if conn in self._live:
                self._live.remove(conn)

    def _log_transient(self, what: str, error: BaseException, backoff: float) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning(
                "Netloader %s: %s (%s); going on after %.2f s", self._name, what, error, backoff
            )


def write_address_file(prefix: str | None, rank: int, address: str) -> None:
    """Write ``address`` to {prefix}{rank}.txt (OUTPUT_PREFIX), atomically: whoever
    reads it sees the whole address or no file."""
    if prefix is None:
        return
    path = f"{prefix}{rank}.txt"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(address + "\n")
    os.replace(tmp, path)
