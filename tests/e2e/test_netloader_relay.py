"""Fan-out between real vLLM servers: instances that start together while a seed is
sending are chained through each other's relays (RELAY, on by default)."""

import pytest

from tests.helpers.e2e import address_of, greedy, netloader_server, start_all
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e


def test_instances_starting_together_chain_through_a_relay(model, workdir, seed):
    """A seed capped at 0.5 MB/s (the tiny model takes about 17 s) and two instances
    started together against it: it sends to the one that asks first and redirects the
    other to that one's relay. Both serve the reference outputs, the seed sent the model
    once, and the relay, now a seed, reports the transfer it passed on."""
    _, _, reference = seed
    # Seed and clients agree on a minimum rate at or below the seed's cap.
    keys = {"BUCKET_MB": 1, "MIN_RATE_MB_PER_S": 0.5}
    slow = netloader_server(model, workdir, "slow", "0", keys={**keys, "SEND_LIMIT_MB_PER_S": 0.5})
    starting = []
    try:
        start_all(slow)
        slow_address = address_of(workdir / "slow-")
        starting = [
            netloader_server(model, workdir, name, "1", [slow_address], keys=keys)
            for name in ("relay-a", "relay-b")
        ]
        start_all(*starting)
        infos = [query_seed(address_of(workdir / f"{name}-")) for name in ("relay-a", "relay-b")]
        by_source = {info["loaded_from"]: info for info in infos}
        first = by_source.pop(f"seed {slow_address}", None)
        assert first is not None, [i["loaded_from"] for i in infos]
        [(second_from, second)] = by_source.items()
        assert second_from == f"seed {first['address']}"
        assert second["fallback_reasons"] == [] and first["fallback_reasons"] == []
        assert first["completed_transfers"] == 1 and second["completed_transfers"] == 0
        assert query_seed(slow_address)["completed_transfers"] == 1
        assert first["value_fingerprint"] == second["value_fingerprint"]
        for server in starting:
            assert greedy(server) == reference
    finally:
        for server in (*starting, slow):
            server.stop()
