"""A seed process under attack, and a client facing hostile seeds: what the threat
model says a peer must not be able to do (crash, stall, fill memory, take weights
without the secret, hang a client), tried for real against a seed in its own process.
"""

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import pytest

from tests.helpers.toy import (
    IDENTITY,
    assert_same_tensors,
    fetch_for,
    make_toy,
    untouched,
    wait_for,
)
from tests.helpers.toy_seed import toy_seed
from tests.helpers.wire import challenge_of, connect, frame, hello_for, read
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.manifest import model_tensors
from vllm_ascend.model_loader.netloader.wire.auth import new_nonce
from vllm_ascend.model_loader.netloader.wire.frames import MAGIC, PROTOCOL_VERSION, data_header
from vllm_ascend.model_loader.netloader.wire.messages import ACCEPT, accept, challenge

SECRET = b"attack-test-secret-0123456789"
HEADER = struct.Struct("!4sBI")


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def timed_info(address: str, secret: bytes | None = None) -> float:
    start = time.monotonic()
    query_seed(address, timeout_s=30, secret=secret)
    return time.monotonic() - start


def served_after(address: str, seed: int, secret: bytes | None = None) -> None:
    client = make_toy(None)
    fetch = fetch_for(client, timeout_s=10.0, secret=secret)
    assert fetch.run((address,)) is not None, fetch.reasons
    assert_same_tensors(client, make_toy(seed))


# --- nothing big before authentication ---------------------------------------------------


def test_a_63_mib_frame_before_auth_costs_the_seed_nothing():
    """Before: the seed read and parsed the whole frame (RSS +1.6 GB; its threads
    stalled for 12-16 s, a concurrent info took 15.3 s)."""
    with toy_seed(seed=1, secret=SECRET) as (address, proc):
        before = rss(proc)
        payload = b"[" + b"[]," * (21 << 20) + b"[]]"
        s = connect(address)
        challenge_of(s)
        s.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, len(payload)))
        pump = threading.Thread(target=lambda: _send_quietly(s, payload), daemon=True)
        pump.start()
        try:
            assert timed_info(address, SECRET) < 3
            reply = read(s)
            assert "exceeds the 8192-byte cap" in reply["reason"]
        finally:
            s.close()
            pump.join(10)
        assert rss(proc) - before < 50 << 20
        served_after(address, 1, SECRET)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the seed closed on us: expected


def test_connections_that_send_only_a_big_frame_header_pin_no_memory():
    """Before: 12 such connections pinned 770 MB."""
    with toy_seed(seed=2) as (address, proc):
        before = rss(proc)
        held = []
        for _ in range(12):
            s = connect(address)
            challenge_of(s)
            s.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, 60 << 20))
            held.append(s)
        try:
            assert timed_info(address) < 3
            assert rss(proc) - before < 50 << 20
        finally:
            for s in held:
                s.close()
        served_after(address, 2)


# --- deadlines, not per-call timeouts ---------------------------------------------------------


def drip(sock: socket.socket, data: bytes, every_s: float, stop: threading.Event) -> None:
    for i in range(len(data)):
        if stop.wait(every_s):
            return
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return


@contextmanager
def dripping(sock: socket.socket, data: bytes, every_s: float) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=drip, args=(sock, data, every_s, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def closed_within(sock: socket.socket, seconds: float) -> float:
    """How long until the peer closes ``sock`` (reading and discarding)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_client_that_drips_its_hello_is_cut_off_at_the_handshake_deadline():
    with toy_seed(seed=3, timeout_s=2.0) as (address, proc):
        with connect(address) as s:
            challenge_of(s)
            with dripping(s, frame(hello_for(IDENTITY, make_toy(None))), 0.5):
                assert closed_within(s, 30) < 5
        assert proc.is_alive()
        served_after(address, 3)


def test_a_client_that_drips_its_done_does_not_keep_a_transfer_slot():
    with toy_seed(seed=4, timeout_s=2.0) as (address, _):
        with connect(address) as s:
            challenge_of(s)
            s.sendall(frame(hello_for(IDENTITY, make_toy(None))))
            assert read(s)["type"] == ACCEPT
            total = sum(t.nbytes for _, t in model_tensors(make_toy(None)))
            s.settimeout(10)
            got = 0
            while got < total:  # all the data, with its bucket headers
                got += len(s.recv(1 << 20)) if got < total else 0
            with dripping(s, frame({"type": "done", "ok": True, "pad": "x" * 100}), 0.5):
                wait_for(lambda: query_seed(address)["active_transfers"] == 0, 6,
                         "the dripping client still holds its transfer slot")
        assert query_seed(address)["completed_transfers"] == 0
        served_after(address, 4)


def fake_seed(answer: Callable[[socket.socket], None]) -> tuple[str, socket.socket]:
    """A listener on 127.0.0.1 whose connections ``answer`` plays, each in a thread."""
    server = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_play, args=(answer, conn), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}", server


def _play(answer: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn:
        try:
            answer(conn)
        except OSError:
            pass  # the client went away: that is what the tests want


def accept_then(then: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(frame(challenge(new_nonce(), False)))
        hello = read(conn)
        tensors = hello["manifest"]["tensors"]
        conn.sendall(frame(accept(["0" * 64] * tensors, 1 << 20, "tcp", IDENTITY["checkpoint"])))
        then(conn)

    return answer


def drip_forever(data: bytes) -> Callable[[socket.socket], None]:
    def play(conn: socket.socket) -> None:
        drip(conn, data * 100_000, 0.3, threading.Event())

    return play


@pytest.mark.parametrize(
    "answer",
    [
        drip_forever(frame(challenge(new_nonce(), False))),
        accept_then(drip_forever(data_header(0, 1 << 20) + b"\x01")),
    ],
    ids=["drips its challenge", "drips the bulk data"],
)
def test_a_seed_that_drips_costs_the_client_about_one_timeout(answer):
    """Before: a client with TIMEOUT 1 s spent 45 s in one attempt."""
    address, server = fake_seed(answer)
    with server:
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=1.0)
        start = time.monotonic()
        assert fetch.run((address,)) is None
        assert time.monotonic() - start < 4
    assert "took longer than 1 s" in fetch.reasons[0] or "no progress for 1 s" in fetch.reasons[0]
    assert untouched(client)


# --- a listener that cannot be killed ------------------------------------------------------


def test_a_burst_that_exhausts_descriptors_leaves_the_seed_answering_and_serving():
    """Before: 130 idle connections at a 128-descriptor limit ended the accept loop
    (EMFILE), and the worker ran on as a seed nobody could reach."""
    with toy_seed(seed=5, timeout_s=30.0, nofile=20) as (address, proc):
        burst = []
        try:
            for _ in range(60):
                burst.append(connect(address))
            assert timed_info(address) < 10  # during the burst
        finally:
            for s in burst:
                s.close()
        assert timed_info(address) < 10  # after it
        served_after(address, 5)
        assert proc.is_alive()


# --- only holders of the secret get any weight byte ------------------------------------------


def listening_ports(pid: int) -> set[int]:
    return {
        c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_a_peer_without_the_secret_finds_no_port_that_gives_it_a_byte():
    """Before: the rendezvous store and gloo accepted whoever connected to the announced
    port first: a peer without the secret got the first 1.2 MB of a weight tensor."""
    with toy_seed(seed=6, secret=SECRET, send_limit=0.3e6) as (address, proc):
        seed_port = int(address.rsplit(":", 1)[1])
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=30.0, secret=SECRET)
        worker = threading.Thread(target=fetch.run, args=((address,),), daemon=True)
        worker.start()
        wait_for(lambda: query_seed(address, secret=SECRET)["active_transfers"] == 1, 30,
                 "the legitimate transfer never started")
        ports = listening_ports(proc.pid)
        stolen = bytearray()
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(2)
                if port == seed_port:  # the seed itself: no proof, so a bare refusal
                    challenge_of(s)
                    s.sendall(frame(hello_for(IDENTITY, make_toy(None))))
                try:
                    while chunk := s.recv(65536):
                        stolen += chunk
                except OSError:
                    pass
        worker.join(60)
        assert ports == {seed_port}, "the seed listens on a port besides its own"
        assert b"digests" not in stolen and len(stolen) < 1000
        assert_same_tensors(client, make_toy(6))


# --- hostile answers: the client falls back, nothing reaches the model -----------------------


def refuse_with(msg: dict) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(frame(challenge(new_nonce(), False)))
        read(conn)
        conn.sendall(frame(msg))
        conn.recv(1)

    return answer


def raw(data: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(frame(challenge(new_nonce(), False)))
        read(conn)
        conn.sendall(data)
        conn.recv(1)

    return answer


HOSTILE = {
    "redirect to a 64-character label": refuse_with(
        {"type": "redirect", "relay": "a" * 64 + ".example:7000", "value_fingerprint": "0" * 64}
    ),
    "redirect to a URL": refuse_with(
        {"type": "redirect", "relay": "tcp://h:7000", "value_fingerprint": "0" * 64}
    ),
    "accept with a bucket of 2**40": refuse_with(
        {**accept(["0" * 64] * 7, 1 << 40, "tcp", IDENTITY["checkpoint"])}
    ),
    "accept with one digest too few": refuse_with(
        {**accept(["0" * 64] * 6, 1 << 20, "tcp", IDENTITY["checkpoint"])}
    ),
    "accept with another checkpoint": refuse_with(
        {**accept(["0" * 64] * 7, 1 << 20, "tcp", "d" * 64)}
    ),
    "accept over an unknown data plane": refuse_with(
        {**accept(["0" * 64] * 7, 1 << 20, "rdma", IDENTITY["checkpoint"])}
    ),
    "an answer of the wrong type": refuse_with({"type": "challenge", "nonce": "0" * 32}),
    "an answer of 64 MiB": raw(HEADER.pack(MAGIC, PROTOCOL_VERSION, 64 << 20)),
    "not a frame": raw(b"HTTP/1.1 200 OK\r\n\r\n"),
    "a bucket off the plan": accept_then(lambda c: c.sendall(data_header(5, 1 << 30))),
    "more bytes than the bucket": accept_then(
        lambda c: c.sendall(data_header(0, 1 << 20) + b"\x00" * (2 << 20))
    ),
    "wrong bytes": accept_then(
        lambda c: [c.sendall(data_header(k, n) + b"\x01" * n) for k, n in _plan()]
    ),
    "closes mid-bucket": accept_then(lambda c: c.sendall(data_header(0, 1000))),
}


def _plan() -> list[tuple[int, int]]:
    from tests.helpers.toy import SMALL_BUCKET
    from vllm_ascend.model_loader.netloader.manifest import plan_buckets, spec_of

    specs = [spec_of(n, t) for n, t in model_tensors(make_toy(None))]
    return [(k, sum(specs[i].nbytes for i in b))
            for k, b in enumerate(plan_buckets(specs, SMALL_BUCKET))]


def test_every_hostile_answer_becomes_a_reason_and_the_next_source_serves():
    assert len(model_tensors(make_toy(None))) == 7  # the digest counts above
    fakes = [fake_seed(answer) for answer in HOSTILE.values()]
    with toy_seed(seed=7) as (good, _):
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=3.0)
        start = time.monotonic()
        received = fetch.run((*[a for a, _ in fakes], good))
        elapsed = time.monotonic() - start
    for _, server in fakes:
        server.close()
    assert received is not None and received.source == good, fetch.reasons
    assert len(fetch.reasons) == len(HOSTILE), fetch.reasons
    assert_same_tensors(client, make_toy(7))
    assert elapsed < 3.0 * len(HOSTILE)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_answer_counts_nothing_verified(name):
    """No tensor of a hostile answer counts as verified (none is offered to a resume or
    passed on by a relay); only wrong bytes under a plan that matches reach a tensor,
    which the disk loader then rewrites (they are received in place)."""
    address, server = fake_seed(HOSTILE[name])
    with server:
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=3.0)
        assert fetch.run((address,)) is None
    assert len(fetch.reasons) == 1
    assert fetch.held == 0
    assert untouched(client) or name == "wrong bytes"
