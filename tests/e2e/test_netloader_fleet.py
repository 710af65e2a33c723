"""Fleets on real vLLM servers: clients with no address at all find a live seed of
their model through a registry (a real redis-server) or a DNS name, load from disk
when none is up, and every transfer shows on the instances' own /metrics."""

import threading
import time
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.e2e import address_of, greedy, netloader_server, start_all
from tools.redis_server import RedisServer
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.fleet.registry import HEARTBEAT_S

pytestmark = pytest.mark.e2e


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every netloader_* sample on ``server``'s /metrics."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("netloader_")
    }


def transfers(samples: dict, role: str, result: str) -> float:
    return samples.get(("netloader_transfers_total", (("result", result), ("role", role))), 0)


def announced(url: str, address: str) -> bool:
    """Whether the registry holds a live record of the target seed at ``address``."""
    return bool(redis.Redis.from_url(url).keys(f"netloader:seed:*:target:0:{address}"))


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def registry():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def fleet_seed(model, workdir, registry):
    """A seed that announces itself in the registry, capped at 2 MB/s so that a
    transfer of the tiny model (8.5 MB) lasts long enough to be scraped."""
    seed = netloader_server(model, workdir, "fleet-seed", "0", keys={
        "REGISTRY": registry.url, "SEND_LIMIT_MB_PER_S": 2, "BUCKET_MB": 1,
    })
    try:
        start_all(seed)
        yield seed, address_of(workdir / "fleet-seed-")
    finally:
        seed.stop()


def test_a_seed_announces_itself_and_outlives_its_registry(seed, fleet_seed, registry):
    _, _, reference = seed
    server, address = fleet_seed
    wait_until(lambda: announced(registry.url, address), 3 * HEARTBEAT_S, "record")
    registry.kill()
    time.sleep(HEARTBEAT_S + 1)  # at least one heartbeat meets a dead registry
    assert query_seed(address)["loaded_from"] == "disk"
    assert greedy(server) == reference
    registry.start()  # an empty registry: the restart lost every record
    wait_until(lambda: announced(registry.url, address), 3 * HEARTBEAT_S, "record again")
    log = server.log_text()
    assert log.count(f"Netloader seed {address}: registry {registry.url}: publish failed") == 1
    assert f"Netloader seed {address}: registered in {registry.url} again" in log


def test_clients_with_no_address_find_a_live_seed_or_load_from_disk(
    model, workdir, seed, fleet_seed, registry
):
    """Three instances start together: one knows only the registry, one only a DNS name
    (``localhost``, resolved by the system's resolver, at the session seed's port), and
    one a registry database where no seed of its model lives. The fleet seed's /metrics
    is scraped while it sends."""
    seed_server, seed_address, reference = seed
    fleet, fleet_address = fleet_seed
    wait_until(lambda: announced(registry.url, fleet_address), 3 * HEARTBEAT_S, "record")
    port = int(seed_address.rsplit(":", 1)[1])
    by_registry = netloader_server(model, workdir, "by-registry", "0", keys={
        "REGISTRY": registry.url, "RELAY": False, "MIN_RATE_MB_PER_S": 1,
    })
    by_dns = netloader_server(model, workdir, "by-dns", "1", keys={
        "SOURCE": [{"dns": f"localhost:{port}"}], "RELAY": False,
    })
    empty = registry.url.removesuffix("/0") + "/1"
    nothing = netloader_server(model, workdir, "nothing-up", "1", keys={"REGISTRY": empty})
    busiest = [0.0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            active = scrape(fleet).get(("netloader_active_transfers", (("role", "seed"),)), 0)
            busiest[0] = max(busiest[0], active)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clients = (by_registry, by_dns, nothing)
    try:
        start_all(*clients)
        stop.set()
        watcher.join(10)
        registry_info = query_seed(address_of(workdir / "by-registry-"))
        dns_info = query_seed(address_of(workdir / "by-dns-"))
        nothing_info = query_seed(address_of(workdir / "nothing-up-"))
        assert registry_info["loaded_from"] == f"seed {fleet_address}"
        assert registry_info["fallback_reasons"] == []
        assert dns_info["loaded_from"] == f"seed {seed_address}"
        assert nothing_info["loaded_from"] == "disk"
        assert nothing_info["fallback_reasons"] == [
            f"registry {empty}: no live seed of this model, role and rank"
        ]
        for server in clients:
            assert greedy(server) == reference

        assert busiest[0] == 1  # seen while it sent
        sent = scrape(fleet)
        assert transfers(sent, "seed", "ok") == 1
        assert sent[("netloader_transfer_bytes_total", (("role", "seed"),))] > 8e6
        assert sent[("netloader_active_transfers", (("role", "seed"),))] == 0
        got = scrape(by_registry)
        assert transfers(got, "client", "ok") == 1
        assert got[("netloader_transfer_duration_seconds_count", (("role", "client"),))] == 1
        assert got[("netloader_transfer_duration_seconds_sum", (("role", "client"),))] > 2
        assert got[("netloader_transfer_bytes_total", (("role", "client"),))] == (
            sent[("netloader_transfer_bytes_total", (("role", "seed"),))]
        )
        fell = scrape(nothing)
        assert fell[("netloader_fallbacks_total", (("reason", "no_seed_found"),))] == 1
        assert transfers(fell, "client", "ok") == 0
        assert transfers(scrape(seed_server), "seed", "ok") >= 1
    finally:
        stop.set()
        for server in clients:
            server.stop()
