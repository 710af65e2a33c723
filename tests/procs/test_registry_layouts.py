"""Seed instances of other layouts found in a registry (a real ``redis-server``): a
seed instance's first rank is announced to every layout, a client that knows only the
registry and whose layout no seed serves gathers its model across layouts from it,
and records of its own layout, of no layout or of another checkpoint are skipped."""

import dataclasses
import socket
import threading
from collections.abc import Iterator

import pytest
import torch

from tests.helpers.toy import IDENTITY, wait_for
from tests.ut.netloader.reshard.layers import loaded
from tools.redis_server import RedisServer
from tools.vllm_server import free_port
from vllm_ascend.model_loader.netloader import fetch as fetching
from vllm_ascend.model_loader.netloader.config import parse_config
from vllm_ascend.model_loader.netloader.fleet.candidates import find_candidates
from vllm_ascend.model_loader.netloader.fleet.dns import MAX_CANDIDATES
from vllm_ascend.model_loader.netloader.fleet.layouts import (
    announces_layout,
    layout_free_key,
    layout_key,
    layout_record,
    other_layout_candidates,
)
from vllm_ascend.model_loader.netloader.fleet.registry import RedisRegistry, SeedRecord, model_key
from vllm_ascend.model_loader.netloader.loader import _ask_again, _only_across
from vllm_ascend.model_loader.netloader.manifest import TARGET, LoadedWeights
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.seed.running import RunningSeeds, seed_settings
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen

CHECKPOINT = "c" * 64


def identity(size: int, rank: int = 0, **more) -> dict:
    return {**IDENTITY, "checkpoint": CHECKPOINT, "tensor_parallel_size": size,
            "rank": rank, **more}


def plan(url: str, ident: dict, **extra) -> LoadPlan:
    return LoadPlan(parse_config({"REGISTRY": url, **extra}, environ={}), ident["rank"],
                    TARGET, torch.device("cpu"), ident, "instance")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def tp2_instance(server) -> Iterator[list[SeedServer]]:
    """A TP=2 seed instance of vLLM's layer classes on one host at LISTEN_PORT + rank,
    each rank announced as the loader announces it."""
    port = free_port(2)
    announcing = RunningSeeds()
    servers = []
    try:
        for rank in range(2):
            settings = SeedSettings(identity(2, rank), rank, "127.0.0.1", 5.0, rank_ports=True)
            seed = SeedServer(LoadedWeights.capture(loaded(2, rank)), settings,
                              listen("127.0.0.1", port + rank)).start()
            servers.append(seed)
            seed_plan = plan(server.url, identity(2, rank))
            with announcing._lock:
                announcing._seeds[seed_plan.key] = seed
            announcing._announce(seed_plan, seed)
        yield servers
    finally:
        announcing.withdraw_all()
        for seed in servers:
            seed.stop()


def test_every_layout_of_one_model_shares_the_layout_free_key_and_nothing_else_does():
    assert len({layout_free_key(identity(size, rank)) for size in (1, 2, 4)
                for rank in range(size)}) == 1
    assert layout_free_key(identity(1, pipeline_parallel_size=2)) == layout_free_key(
        identity(1))
    assert layout_free_key(identity(1, config_sha256="1" * 64)) != layout_free_key(identity(1))
    assert layout_free_key(identity(1, dtype="float16")) != layout_free_key(identity(1))


def test_only_other_layouts_of_this_checkpoint_are_candidates(server):
    registry = RedisRegistry(server.url)
    key = layout_free_key(identity(1))

    def publish(address: str, checkpoint: str = CHECKPOINT, layout: dict | None = None,
                active: int = 0) -> None:
        record = SeedRecord(address, 0, "target", checkpoint, active)
        if layout is not None:
            record = layout_record(record, layout)
        registry.publish(key, record, 30)

    publish("10.0.0.1:7000", layout=identity(2), active=2)
    publish("10.0.0.2:7000", layout=identity(4))
    publish("10.0.0.3:7000", layout=identity(1))  # this client's own layout
    publish("10.0.0.4:7000")  # no layout key: not an announcement to other layouts
    publish("10.0.0.5:7000", checkpoint="d" * 64, layout=identity(2))
    publish("10.0.0.6:7000", layout=identity(2))
    found = other_layout_candidates(registry, identity(1), "instance", ["10.0.0.6:7000"])
    assert found == ["10.0.0.2:7000", "10.0.0.1:7000"]  # least loaded first
    # A node without weight files keeps every checkpoint (its pin decides).
    assert "10.0.0.5:7000" in other_layout_candidates(
        registry, identity(1, checkpoint=None), "instance")
    raw = registry._connect()
    raw.set(f"netloader:seed:{key}:target:0:10.0.0.7:7000",
            '{"address": "10.0.0.7:7000", "rank": 0, "role": "target", '
            '"layout_key": ["not", "a", "key"]}')
    raw.zadd(f"netloader:seeds:{key}:target:0", {"10.0.0.7:7000": 2**50})
    assert "10.0.0.7:7000" not in other_layout_candidates(registry, identity(1), "instance")


def test_only_the_first_rank_of_an_instance_is_announced_to_other_layouts(server,
                                                                          tp2_instance):
    registry = RedisRegistry(server.url)
    first, second = tp2_instance
    wait_for(lambda: registry.find(layout_free_key(identity(1)), "target", 0), 10,
             "the layout record")
    (record,) = registry.find(layout_free_key(identity(1)), "target", 0)
    assert (record.address, record.layout_key) == (first.address, model_key(identity(2)))
    assert registry.find(layout_free_key(identity(1)), "target", 1) == []
    # Each rank is still announced to its own layout.
    assert [r.address for r in registry.find(model_key(identity(2)), "target", 1)] == [
        second.address]


@pytest.mark.parametrize("client_size", [1, 4])
def test_a_client_that_knows_only_the_registry_gathers_from_an_instance_of_another_layout(
        server, tp2_instance, client_size):
    wait_for(lambda: RedisRegistry(server.url).find(layout_free_key(identity(1)), "target", 0),
             10, "the layout record")
    for rank in range(client_size):
        client = loaded(client_size, rank)
        with torch.no_grad():
            for t in client.parameters():
                t.fill_(float("nan"))
        client_plan = plan(server.url, identity(client_size, rank))
        assert find_candidates(client_plan, [], []).addresses == []
        fetched = fetching.fetch_weights(client, client_plan, RunningSeeds())
        assert fetched.gathered is not None, fetched.reasons
        assert fetched.gathered_from == tp2_instance[0].address
        disk = loaded(client_size, rank)
        for (name, mine), theirs in zip(client.named_parameters(), disk.parameters(),
                                        strict=True):
            assert torch.equal(mine, theirs), name


def test_the_processed_pass_leaves_other_layouts_to_the_loaded_one(server, tp2_instance):
    """The loader asks for the processed layout first: with only other layouts in the
    registry that pass asks no seed and says which to ask for the loaded layout."""
    wait_for(lambda: RedisRegistry(server.url).find(layout_free_key(identity(1)), "target", 0),
             10, "the layout record")
    client = loaded(1, 0)
    fetched = fetching.fetch_weights(client, plan(server.url, identity(1)), RunningSeeds(),
                                     layout="processed", targets=[], finish=None)
    assert fetched.gathered is None and fetched.received is None
    assert fetched.identity_refused == (tp2_instance[0].address,)


def test_a_dead_seed_of_this_layout_does_not_hide_the_instances_of_others(server,
                                                                          tp2_instance):
    """The registry also lists a seed of the client's own layout that fails (it closes
    every connection; its record still live): the processed pass fails on it and still
    hands the other layouts to the loaded pass, which gathers from them without asking
    the failed seed again. (Before, the failed seed ended the load on disk; then, once
    the other layouts were handed on, it was asked twice: twice its timeout.)"""
    registry = RedisRegistry(server.url)
    wait_for(lambda: registry.find(layout_free_key(identity(1)), "target", 0), 10,
             "the layout record")
    closing = socket.create_server(("127.0.0.1", 0))
    dead = f"127.0.0.1:{closing.getsockname()[1]}"
    accepted = []

    def close_each() -> None:
        while True:
            try:
                conn, _ = closing.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    try:
        registry.publish(model_key(identity(1)), SeedRecord(dead, 0, "target", CHECKPOINT), 30)
        client = loaded(1, 0)
        client_plan = plan(server.url, identity(1))
        first = fetching.fetch_weights(client, client_plan, RunningSeeds(),
                                       layout="processed", targets=[], finish=None)
        assert first.fallback == "seeds_failed" and any(dead in r for r in first.reasons)
        assert first.identity_refused == (tp2_instance[0].address,)
        assert _ask_again(first) and _only_across(first) == (tp2_instance[0].address,)
        asked = len(accepted)
        assert asked >= 1
        fetched = fetching.fetch_weights(client, client_plan, RunningSeeds(),
                                         across_only=_only_across(first))
        assert fetched.gathered_from == tp2_instance[0].address, fetched.reasons
        assert len(accepted) == asked  # the failed seed was not asked again
    finally:
        closing.close()


def test_instances_of_the_clients_own_layout_do_not_crowd_the_others_out(server):
    """More live records of the client's own layout (and of another checkpoint) than a
    lookup returns, all fresher than the one instance in another layout."""
    registry = RedisRegistry(server.url)
    key = layout_free_key(identity(1))
    registry.publish(key, layout_record(SeedRecord("10.0.1.1:7000", 0, "target", CHECKPOINT),
                                        identity(2)), 30)
    for i in range(MAX_CANDIDATES):
        registry.publish(key, layout_record(
            SeedRecord(f"10.0.2.{i}:7000", 0, "target", CHECKPOINT), identity(1)), 60)
        registry.publish(key, layout_record(
            SeedRecord(f"10.0.3.{i}:7000", 0, "target", "d" * 64), identity(4)), 60)
    assert other_layout_candidates(registry, identity(1), "instance") == ["10.0.1.1:7000"]


def test_the_ranks_of_one_expert_parallel_instance_share_its_layout_key():
    def ep(rank: int, size: int = 2) -> dict:
        return identity(2, rank, expert_parallel={
            "size": size, "rank": rank, "placement": "linear", "redundant_experts": 0,
            "dynamic_eplb": False})

    assert layout_key(ep(0)) == layout_key(ep(1))
    assert layout_key(ep(0)) != layout_key(ep(0, size=4))
    assert layout_key(identity(2, 0, data_parallel=[2, 1, 1])) != layout_key(identity(2, 0))


def test_an_instance_over_several_hosts_does_not_say_its_ranks_follow_from_one(server):
    """Its ranks' addresses are not LISTEN_PORT + rank on one host: its info says so
    (a cross-layout client then names the reason) and it is not announced to other
    layouts."""
    one_host = plan(server.url, identity(2), LISTEN_PORT=7000)
    assert seed_settings(one_host, "127.0.0.1").rank_ports
    two_hosts = dataclasses.replace(one_host, hosts=2)
    settings = seed_settings(two_hosts, "127.0.0.1")
    assert not settings.rank_ports
    assert not announces_layout(two_hosts.identity, settings.rank_ports)
