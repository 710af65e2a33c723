"""Finding the ranks of a seed instance in another layout from one rank's answer: a
hostile answer cannot make the client describe or dial thousands of ranks."""

import pytest
import torch

from tests.helpers.toy import IDENTITY, make_toy
from vllm_ascend.model_loader.netloader.config import parse_config
from vllm_ascend.model_loader.netloader.manifest import TARGET, LoadedWeights
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.reshard.discover import MAX_RANKS, _instance
from vllm_ascend.model_loader.netloader.reshard.fetch import CrossLayoutError
from vllm_ascend.model_loader.netloader.reshard.shards import place_of
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen


def seed_saying(identity: dict, rank_ports: bool = True) -> SeedServer:
    settings = SeedSettings(identity, 0, "127.0.0.1", 5.0, rank_ports=rank_ports)
    return SeedServer(LoadedWeights.capture(make_toy(1)), settings,
                      listen("127.0.0.1", 0)).start()


def plan() -> LoadPlan:
    return LoadPlan(parse_config({}, environ={}), 0, TARGET, torch.device("cpu"),
                    IDENTITY, "instance")


def test_the_other_ranks_follow_from_rank_ports():
    seed = seed_saying({**IDENTITY, "tensor_parallel_size": 4, "rank": 1})
    try:
        ranks = _instance(seed.address, plan(), place_of(IDENTITY), 10)
        port = int(seed.address.rsplit(":", 1)[1])
        assert [r.address for r in ranks] == [f"127.0.0.1:{port - 1 + r}" for r in range(4)]
        assert [r.place.shard.tp_rank for r in ranks] == [0, 1, 2, 3]
    finally:
        seed.stop()


@pytest.mark.parametrize("identity, rank_ports, why", [
    ({"tensor_parallel_size": 10**6, "rank": 0}, True, f"at most {MAX_RANKS}"),
    ({"tensor_parallel_size": 2, "rank": 0}, False, "does not listen at LISTEN_PORT"),
    ({"tensor_parallel_size": 1, "rank": 0}, True, "the same layout"),
    ({"config_sha256": "9" * 64}, True, "another model"),
])
def test_an_answer_that_names_no_usable_instance_is_refused(identity, rank_ports, why):
    seed = seed_saying({**IDENTITY, **identity}, rank_ports)
    try:
        with pytest.raises(CrossLayoutError, match=why):
            _instance(seed.address, plan(), place_of(IDENTITY), 10)
    finally:
        seed.stop()
