"""A seed rank killed mid-gather (a real process, SIGKILL): the client's cross-layout
load ends with that rank named, its tensors hold nothing but verified pieces (or what
they held before), and the disk load that follows leaves it equal to a disk load."""

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.helpers.toy import IDENTITY, wait_for
from tests.helpers.toy_seed import serving_process
from tests.ut.netloader.reshard.layers import checkpoint, loaded, tensor_parallel
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.reshard.fetch import (
    CrossLayoutError,
    GatherSettings,
    SeedRank,
    gather,
)
from vllm_ascend.model_loader.netloader.reshard.shards import place_of
from vllm_ascend.model_loader.netloader.reshard.slices import Shard


def identity(size: int, rank: int) -> dict[str, Any]:
    return {**IDENTITY, "tensor_parallel_size": size, "rank": rank}


def _serve(ready: Any, stop: Any, size: int, rank: int, send_limit: float) -> None:
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
    from vllm_ascend.model_loader.netloader.wire.addresses import listen

    weights = LoadedWeights.capture(loaded(size, rank))
    settings = SeedSettings(identity(size, rank), rank, "127.0.0.1", 10.0, bucket_bytes=2048,
                            send_limit_bytes_per_s=send_limit)
    server = SeedServer(weights, settings, listen("127.0.0.1", 0)).start()
    ready.put(server.address)
    stop.poll(600)
    server.stop()


def seed_rank(size: int, rank: int, send_limit: float) -> Any:
    """Rank ``rank`` of a size-``size`` seed instance in a child process."""
    return serving_process(_serve, size, rank, send_limit)


def disk_load_into(client: torch.nn.Module) -> None:
    """What vLLM's disk loader does after a failed fetch: every parameter written by
    its ``weight_loader`` from the checkpoint."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    params = dict(client.named_parameters())
    for name, shard, values in checkpoint().values():
        param = params[name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        with tensor_parallel(1, 0):
            loader(param, values) if shard is None else loader(param, values, shard)


def test_a_seed_rank_killed_mid_gather_fails_the_gather_and_the_disk_load_is_clean():
    # Rank 1 sends its ~20 KB at 4 KB/s in 2 KB buckets: the kill comes mid-transfer.
    with seed_rank(2, 0, 1e9) as (first, _), seed_rank(2, 1, 4e3) as (second, proc):
        client = loaded(1, 0)
        with torch.no_grad():
            for t in client.parameters():
                t.fill_(float("nan"))
        ranks = [SeedRank(a, place_of(identity(2, r))) for r, a in enumerate((first, second))]
        settings = GatherSettings(identity(1, 0), None, 10.0, 1e3)
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(gather(client, Shard(), ranks, settings))
            except CrossLayoutError as e:
                result.append(e)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        wait_for(lambda: query_seed(second)["active_transfers"] == 1, 60, "rank 1 never sent")
        proc.kill()
        worker.join(30)
        assert not worker.is_alive(), "the client did not notice the dead rank"
    assert isinstance(result[0], CrossLayoutError) and second in str(result[0])
    disk = loaded(1, 0)
    for (name, mine), theirs in zip(client.named_parameters(), disk.parameters(),
                                    strict=True):
        held = ~torch.isnan(mine)
        # Only verified pieces landed: every element is the disk load's or untouched.
        assert torch.equal(mine[held], theirs[held]), name
    assert any(bool(torch.isnan(t).any()) for t in client.parameters())  # not all arrived
    disk_load_into(client)
    for mine, theirs in zip(client.parameters(), disk.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    wait_for(lambda: threading.active_count() <= before + 2, 10, "gather threads to end")
