"""The seed registry on a real ``redis-server``: records, their expiry, a store that is
down, slow, killed mid-run or holds garbage, and a toy client that finds its seed
there and nowhere else."""

import json
import logging
import socket
import threading
import time
from dataclasses import astuple

import pytest
import redis
import torch

from tests.helpers.toy import IDENTITY, fetch_for, make_toy, serving, wait_for
from tools.redis_server import RedisServer
from vllm_ascend.model_loader.netloader.config import parse_config
from vllm_ascend.model_loader.netloader.fleet.candidates import Candidates, find_candidates
from vllm_ascend.model_loader.netloader.fleet.registry import (
    Announcer,
    RedisRegistry,
    RegistryError,
    SeedRecord,
    model_key,
    registry_candidates,
)
from vllm_ascend.model_loader.netloader.manifest import TARGET, model_tensors
from vllm_ascend.model_loader.netloader.plan import LoadPlan

KEY = "k" * 64
CHECKPOINT = "c" * 64


@pytest.fixture
def server():
    with RedisServer() as running:
        yield running


def record(address: str, active: int = 0, rank: int = 0) -> SeedRecord:
    return SeedRecord(address, rank, "target", CHECKPOINT, active)


def test_records_are_found_by_model_role_and_rank_until_withdrawn(server):
    registry = RedisRegistry(server.url)
    a, b = record("10.0.0.1:7000"), record("10.0.0.2:7000", active=3)
    registry.publish(KEY, a, 30)
    registry.publish(KEY, b, 30)
    registry.publish(KEY, record("10.0.0.3:7001", rank=1), 30)
    registry.publish("x" * 64, record("10.0.0.4:7000"), 30)
    assert sorted(registry.find(KEY, "target", 0), key=lambda r: r.address) == [a, b]
    assert registry.find(KEY, "draft", 0) == []
    registry.publish(KEY, SeedRecord("10.0.0.2:7000", 0, "target", CHECKPOINT, 0), 30)
    assert {r.address: r.active_transfers for r in registry.find(KEY, "target", 0)} == {
        "10.0.0.1:7000": 0, "10.0.0.2:7000": 0,
    }
    registry.withdraw(KEY, a)
    assert [r.address for r in registry.find(KEY, "target", 0)] == ["10.0.0.2:7000"]


def test_a_record_that_is_not_refreshed_expires(server):
    registry = RedisRegistry(server.url)
    registry.publish(KEY, record("10.0.0.1:7000"), 0.3)
    assert len(registry.find(KEY, "target", 0)) == 1
    time.sleep(0.5)
    assert registry.find(KEY, "target", 0) == []
    index = f"netloader:seeds:{KEY}:target:0"
    assert redis.Redis.from_url(server.url).exists(index) == 0  # nothing left behind


def test_garbage_in_the_registry_is_skipped(server, caplog):
    registry = RedisRegistry(server.url)
    registry.publish(KEY, record("10.0.0.1:7000"), 30)
    raw = redis.Redis.from_url(server.url)
    index = f"netloader:seeds:{KEY}:target:0"
    for address, value in [
        ("10.0.0.2:7000", b"\xff" * 5000),
        ("10.0.0.3:7000", json.dumps({"address": "evil.example:80", "rank": 0,
                                      "role": "target"}).encode()),
        # A valid record under another seed's name is not that seed's.
        ("10.0.0.4:7000", record("10.0.0.9:7000").to_json().encode()),
    ]:
        raw.zadd(index, {address: 2**50})
        raw.set(f"netloader:seed:{KEY}:target:0:{address}", value)
    with caplog.at_level(logging.WARNING):
        assert [r.address for r in registry.find(KEY, "target", 0)] == ["10.0.0.1:7000"]
    assert "record of '10.0.0.2:7000' ignored" in caplog.text


def test_a_registry_that_is_down_or_silent_fails_within_its_timeout():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(RegistryError, match=rf"redis://127.0.0.1:{port}/0: lookup failed"):
        RedisRegistry(f"redis://127.0.0.1:{port}/0").find(KEY, "target", 0)

    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        start = time.monotonic()
        with pytest.raises(RegistryError, match="lookup failed"):
            RedisRegistry(url, timeout_s=0.5).find(KEY, "target", 0)
        assert time.monotonic() - start < 5
    finally:
        silent.close()


def test_an_announced_seed_is_found_fetched_and_withdrawn(server):
    """A real toy seed announced in Redis; a client that knows only the registry finds
    it, fetches its weights and verifies them; the record goes when the seed stops."""
    identity = {**IDENTITY, "checkpoint": CHECKPOINT}
    registry = RedisRegistry(server.url)
    with serving(seed=7, identity=identity) as seed:
        def describe() -> SeedRecord:
            info = seed.describe()
            return SeedRecord(seed.address, 0, "target", CHECKPOINT,
                              info["active_transfers"], info["relaying"])

        announcer = Announcer(registry, model_key(identity), describe, interval_s=0.2).start()
        try:
            wait_for(lambda: registry_candidates(registry, identity, "instance") != [], 5,
                     "the first heartbeat")
            found = registry_candidates(registry, identity, "instance")
            assert found == [seed.address]
            model = make_toy(None)
            received = fetch_for(model, identity=identity).run(found)
            assert received is not None and received.source == seed.address
            want = dict(model_tensors(make_toy(7)))
            assert all(t.equal(want[n]) for n, t in model_tensors(model))
        finally:
            announcer.stop()
        assert registry_candidates(registry, identity, "instance") == []


def test_a_registry_killed_mid_run_costs_the_seed_nothing_and_it_registers_again(
    server, caplog
):
    identity = {**IDENTITY, "checkpoint": CHECKPOINT}
    registry = RedisRegistry(server.url, timeout_s=0.5)
    with serving(seed=3, identity=identity) as seed:
        describe = lambda: SeedRecord(seed.address, 0, "target", CHECKPOINT)  # noqa: E731
        # With its record for clients of other layouts: one heartbeat, one warning.
        announcer = Announcer(registry, model_key(identity), describe, interval_s=0.2,
                              ttl_s=2, also=[(KEY, describe)]).start()
        try:
            wait_for(lambda: registry.find(model_key(identity), "target", 0) != [], 5,
                     "the first record")
            assert registry.find(KEY, "target", 0) != []
            with caplog.at_level(logging.WARNING):
                server.kill()
                time.sleep(1)
            assert "publish failed" in caplog.text
            # Said once, not per beat nor per record.
            assert caplog.text.count("publish failed") == 1
            # The seed serves on while its registry is gone.
            model = make_toy(None)
            assert fetch_for(model, identity=identity).run([seed.address]) is not None
            server.start()  # empty: a restart lost every record
            wait_for(lambda: registry.find(model_key(identity), "target", 0) != [], 5,
                     "the record after the restart")
            wait_for(lambda: registry.find(KEY, "target", 0) != [], 5,
                     "the other record after the restart")
        finally:
            announcer.stop()
        assert registry.find(KEY, "target", 0) == []  # both withdrawn
        assert registry.find(model_key(identity), "target", 0) == []


def test_a_heartbeat_that_raises_keeps_beating():
    beats = []

    class Broken:
        name = "broken"

        def publish(self, key, record, ttl_s):
            beats.append(time.monotonic())
            raise RuntimeError("a bug in a registry")

        def withdraw(self, key, record):
            pass

    announcer = Announcer(Broken(), KEY, lambda: record("10.0.0.1:7000"), interval_s=0.05)
    announcer.start()
    wait_for(lambda: len(beats) >= 3, 5, "three beats")
    announcer.stop()
    assert not any(t.name == "netloader-announce" and t.is_alive()
                   for t in threading.enumerate())


def candidates_for(extra: dict) -> Candidates:
    """The candidates rank 0's target of an instance with extra config ``extra`` tries
    (``fleet.candidates``, as the loader's fetch asks for them)."""
    config = parse_config(extra, environ={})
    plan = LoadPlan(config, 0, TARGET, torch.device("cpu"), {**IDENTITY, "checkpoint": CHECKPOINT},
                    "instance")
    return find_candidates(plan, config.sources_for_rank(0), own=[])


@pytest.mark.parametrize("how", ["down", "silent"])
def test_a_registry_that_is_down_or_silent_leaves_the_static_sources(how):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = silent.getsockname()[1]
    if how == "down":
        silent.close()
    try:
        start = time.monotonic()
        addresses, discovered, notes, across = astuple(candidates_for({
            "REGISTRY": f"redis://127.0.0.1:{port}/0",
            "SOURCE": [{"device_id": 0, "sources": ["10.0.0.9:7000"]}],
        }))
        assert time.monotonic() - start < 15
        assert addresses == ["10.0.0.9:7000"] and discovered == set() and across == ()
        (note,) = notes
        assert note.startswith(f"registry redis://127.0.0.1:{port}/0: lookup failed")
    finally:
        silent.close()


def test_registry_seeds_come_before_static_ones_and_never_twice(server):
    identity = {**IDENTITY, "checkpoint": CHECKPOINT}
    registry = RedisRegistry(server.url)
    key = model_key(identity)
    registry.publish(key, SeedRecord("10.0.0.1:7000", 0, "target", CHECKPOINT, 1), 30)
    registry.publish(key, SeedRecord("10.0.0.2:7000", 0, "target", CHECKPOINT, 0), 30)
    addresses, discovered, notes, across = astuple(candidates_for({
        "REGISTRY": server.url,
        "SOURCE": [{"device_id": 0, "sources": ["10.0.0.1:7000", "10.0.0.3:7000"]}],
    }))
    assert addresses == ["10.0.0.2:7000", "10.0.0.1:7000", "10.0.0.3:7000"] and notes == []
    assert across == ()
    assert discovered == {"10.0.0.1:7000", "10.0.0.2:7000"}


def test_a_record_that_lies_costs_one_refusal_never_wrong_weights(server):
    """The registry is a hint: a seed of another checkpoint announced as this one (and
    as the least loaded) is asked first and refuses in the handshake; the true seed
    serves."""
    mine = {**IDENTITY, "checkpoint": CHECKPOINT}
    other = {**IDENTITY, "checkpoint": "e" * 64}
    registry = RedisRegistry(server.url)
    key = model_key(mine)
    assert key == model_key(other)
    with serving(seed=5, identity=other) as liar, serving(seed=7, identity=mine) as true:
        registry.publish(key, SeedRecord(liar.address, 0, "target", CHECKPOINT, 0), 30)
        registry.publish(key, SeedRecord(true.address, 0, "target", CHECKPOINT, 3), 30)
        found = registry_candidates(registry, mine, "instance")
        assert found == [liar.address, true.address]
        model = make_toy(None)
        fetch = fetch_for(model, identity=mine)
        received = fetch.run(found)
        assert received is not None and received.source == true.address
        (reason,) = fetch.reasons
        assert reason.startswith(f"{liar.address} refused: model identity differs: checkpoint")
        want = dict(model_tensors(make_toy(7)))
        assert all(t.equal(want[n]) for n, t in model_tensors(model))


def dripping_server(reply: bytes, every_s: float) -> tuple[socket.socket, threading.Event]:
    """A server that answers every connection with ``reply``, one byte every
    ``every_s`` (under redis-py's per-read timeout), until the event is set."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in reply:
                    if stop.wait(every_s):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, stop


def test_a_registry_that_drips_its_answer_is_cut_off_at_the_deadline():
    server, stop = dripping_server(b"*1\r\n$" + b"9" * 40, every_s=0.5)
    url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    try:
        registry = RedisRegistry(url, timeout_s=1.0, deadline_s=2.0)
        start = time.monotonic()
        with pytest.raises(RegistryError, match="no answer within 2 s"):
            registry.find(KEY, "target", 0)
        with pytest.raises(RegistryError, match="no answer within 2 s"):
            registry.publish(KEY, record("10.0.0.1:7000"), 30)
        assert time.monotonic() - start < 8
        stopped = time.monotonic()
        Announcer(registry, KEY, lambda: record("10.0.0.1:7000"), interval_s=0.1).start().stop()
        assert time.monotonic() - stopped < 15  # the beat and the withdrawal, each bounded
    finally:
        stop.set()
        server.close()


def test_what_a_lookup_reads_is_bounded_in_size_and_freshest_first(server):
    raw = redis.Redis.from_url(server.url)
    index = f"netloader:seeds:{KEY}:target:0"
    registry = RedisRegistry(server.url)
    # A record of 50 MB and one nested too deep for json: each is one skipped record.
    for address, value in [("10.0.0.7:7000", b"{" * (50 << 20)),
                           ("10.0.0.8:7000", b"[" * 4000)]:
        raw.zadd(index, {address: 2**50})
        raw.set(f"netloader:seed:{KEY}:target:0:{address}", value)
    raw.zadd(index, {"m" * 5000: 2**50})  # an over-long member, never returned
    # More live records than a lookup takes: the freshest (latest expiry) win.
    for i in range(12):
        registry.publish(KEY, record(f"10.0.1.{i}:7000"), 10 + i)
    found = {r.address for r in registry.find(KEY, "target", 0)}
    # The 8 freshest members: the 3 planted ones (expiring last), then the 5 newest.
    assert found == {f"10.0.1.{i}:7000" for i in range(7, 12)}


def test_a_discovered_seed_that_drops_packets_costs_seconds_not_timeout():
    """A registry or DNS candidate gets DISCOVERED_CONNECT_S to answer; the operator's
    own SOURCE keeps TIMEOUT."""
    from vllm_ascend.model_loader.netloader.client import DISCOVERED_CONNECT_S

    silent = socket.create_server(("127.0.0.1", 0), backlog=1)  # accepts, never answers
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        fetch = fetch_for(make_toy(None), timeout_s=30.0)
        fetch.discovered = frozenset({address})
        start = time.monotonic()
        assert fetch.run([address]) is None
        assert DISCOVERED_CONNECT_S - 0.5 < time.monotonic() - start < DISCOVERED_CONNECT_S + 5
    finally:
        silent.close()
