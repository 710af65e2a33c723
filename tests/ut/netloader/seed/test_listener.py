"""The seed's accept loop: transient errors back off and go on, connections are
bounded, idle handshakes make room for new ones. Real sockets on 127.0.0.1."""

import errno
import socket
import threading
import time

import pytest

from tests.helpers.toy import serving
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.seed.listener import Connection, Listener


class FlakySocket:
    """A real listening socket whose ``accept`` first fails with ``errors`` (the
    listener's only collaborator: the seam)."""

    def __init__(self, errors: list[BaseException]):
        self.real = socket.create_server(("127.0.0.1", 0))
        self.errors = list(errors)

    def accept(self):
        if self.errors:
            raise self.errors.pop(0)
        return self.real.accept()

    def settimeout(self, value):
        self.real.settimeout(value)

    def close(self):
        self.real.close()

    @property
    def address(self):
        return self.real.getsockname()


def echo_once(conn: Connection) -> None:
    conn.sock.settimeout(5)
    conn.sock.sendall(conn.sock.recv(16))


def roundtrip(address, payload=b"ping") -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(payload)
        return s.recv(16)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.ENFILE, "Too many open files in system"),
        OSError(errno.ECONNABORTED, "Software caused connection abort"),
        OSError(errno.ENOBUFS, "No buffer space available"),
        ValueError("a bug in the loop"),  # not even an OSError: logged, and it goes on
    ],
)
def test_accept_errors_back_off_and_the_loop_goes_on(error):
    sock = FlakySocket([error] * 3)
    listener = Listener(sock, echo_once, "test")  # type: ignore[arg-type]
    listener.start()
    try:
        assert roundtrip(sock.address) == b"ping"
        assert sock.errors == []
    finally:
        listener.stop()


def settles(condition, within_s: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``within_s`` seconds (checked every 10 ms)."""
    end = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_a_thread_that_cannot_start_costs_one_connection():
    failures = [RuntimeError("can't start new thread")]

    def spawn(**kwargs):
        if failures:
            raise failures.pop()
        return threading.Thread(**kwargs)

    sock = FlakySocket([])
    listener = Listener(sock, echo_once, "test", spawn=spawn)  # type: ignore[arg-type]
    listener.start()
    try:
        with socket.create_connection(sock.address, timeout=10) as first:
            first.sendall(b"lost")
            try:
                assert first.recv(16) == b""  # closed, not left hanging
            except ConnectionResetError:
                pass  # closed with unread data: a reset is a close too
        assert roundtrip(sock.address) == b"ping"
        # The echo's thread counts itself out after its reply; the failed one never
        # counted, so the count reaches 0 once that thread ends (it stays 1 if it leaked).
        assert settles(lambda: listener.open_connections == 0)
    finally:
        listener.stop()


def test_idle_handshakes_make_room_for_a_new_connection():
    started: list[Connection] = []
    ends: list[bytes] = []

    def wait_for_data(conn: Connection) -> None:
        started.append(conn)
        conn.sock.settimeout(10)
        data = conn.sock.recv(16)
        ends.append(data)
        if data:
            conn.sock.sendall(data)

    sock = FlakySocket([])
    listener = Listener(sock, wait_for_data, "test", max_connections=2)  # type: ignore[arg-type]
    listener.start()
    idle = [socket.create_connection(sock.address, timeout=10) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while len(started) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert roundtrip(sock.address) == b"ping"  # the oldest idle one made room
        assert listener.evicted == 1
        assert settles(lambda: b"" in ends)  # the evicted handler saw its socket end
        assert idle[0].recv(16) == b""  # evicted: its server side is shut down
    finally:
        for s in idle:
            s.close()
        listener.stop()


def test_settled_connections_are_never_evicted():
    release = threading.Event()

    def settle_and_wait(conn: Connection) -> None:
        conn.settle()
        release.wait(10)

    sock = FlakySocket([])
    listener = Listener(sock, settle_and_wait, "test", max_connections=2)  # type: ignore[arg-type]
    listener.start()
    held = [socket.create_connection(sock.address, timeout=10) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while listener.open_connections < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(sock.address, timeout=10) as third:
            assert third.recv(16) == b""  # no room: closed at once
        assert listener.dropped == 1 and listener.evicted == 0
    finally:
        release.set()
        for s in held:
            s.close()
        listener.stop()


def test_a_seed_answers_info_during_a_burst_of_idle_connections():
    with serving(seed=1) as seed:
        host, port = seed.address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(100)]
        try:
            start = time.monotonic()
            info = query_seed(seed.address)
            assert time.monotonic() - start < 3
            assert info["completed_transfers"] == 0
            assert info["open_connections"] <= 32 and info["evicted_connections"] >= 68
        finally:
            for s in idle:
                s.close()
        assert query_seed(seed.address)["evicted_connections"] >= 68


def test_a_flood_from_one_host_evicts_its_own_idle_handshakes_first():
    started: list[Connection] = []

    def wait_for_data(conn: Connection) -> None:
        started.append(conn)
        conn.sock.settimeout(10)
        data = conn.sock.recv(16)
        if data:
            conn.sock.sendall(data)

    sock = FlakySocket([])
    listener = Listener(sock, wait_for_data, "test", max_connections=4)  # type: ignore[arg-type]
    listener.start()

    def from_host(host: str) -> socket.socket:
        return socket.create_connection(sock.address, timeout=10, source_address=(host, 0))

    quiet = from_host("127.0.0.2")  # the oldest: oldest-first eviction would pick it
    time.sleep(0.05)
    noisy = [from_host("127.0.0.3") for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while len(started) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with from_host("127.0.0.4") as newcomer:
            newcomer.sendall(b"ping")
            assert newcomer.recv(16) == b"ping"
        assert listener.evicted == 1
        quiet.sendall(b"still")
        assert quiet.recv(16) == b"still"  # the other host's handshake survived
    finally:
        for s in [quiet, *noisy]:
            s.close()
        listener.stop()


def test_a_listener_stopped_right_after_it_started_ends_without_an_error():
    # stop() closes the socket; a loop thread that only then set its accept timeout
    # died with "Bad file descriptor" (seen as warnings in whole test runs).
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    try:
        for _ in range(30):
            listener = Listener(socket.create_server(("127.0.0.1", 0)), echo_once, "test")
            listener.start()
            listener.stop()
    finally:
        threading.excepthook = previous
    assert errors == []
