"""Seed instances of other layouts found in a registry (a real ``redis-server``): a
seed instance's first rank is announced to every layout, a client that knows only the
registry and whose layout no seed serves gathers its model across layouts from it,
and records of its own layout, of no layout or of another checkpoint are skipped."""

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
from vllm_ascend.model_loader.netloader.fleet.layouts import (
    layout_free_key,
    layout_record,
    other_layout_candidates,
)
from vllm_ascend.model_loader.netloader.fleet.registry import RedisRegistry, SeedRecord, model_key
from vllm_ascend.model_loader.netloader.manifest import TARGET, LoadedWeights
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.seed.running import RunningSeeds
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
