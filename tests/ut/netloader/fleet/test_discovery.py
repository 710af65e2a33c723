"""Finding seeds by DNS name and registry record, below any store or network."""

import json
import socket
import threading
import time
from collections import Counter

import pytest

from vllm_ascend.model_loader.netloader.config import (
    NetloaderConfigError,
    SourceEntry,
    parse_config,
)
from vllm_ascend.model_loader.netloader.fleet import dns, registry
from vllm_ascend.model_loader.netloader.fleet.dns import (
    DiscoveryError,
    DnsSource,
    expand,
    resolve,
    spread,
)
from vllm_ascend.model_loader.netloader.fleet.registry import (
    SeedRecord,
    model_key,
    registry_candidates,
)

CHECKPOINT = "c" * 64
OTHER = "d" * 64


def test_a_dns_entry_stands_for_every_rank():
    config = parse_config({"SOURCE": [
        {"device_id": 1, "sources": ["10.0.0.1:7001"]},
        {"dns": "seeds.prod.svc.cluster.local:7000"},
        {"dns": "[fd00::1]:7000"},
    ]})
    dns = DnsSource("seeds.prod.svc.cluster.local", 7000)
    assert config.sources[1] == dns
    assert config.sources_for_rank(0) == (dns, DnsSource("fd00::1", 7000))
    assert config.sources_for_rank(1) == ("10.0.0.1:7001", dns, DnsSource("fd00::1", 7000))
    assert isinstance(config.sources[0], SourceEntry)


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ({"dns": "seeds.svc"}, "SOURCE[0].dns"),  # no port
        ({"dns": "seeds.svc:0"}, "SOURCE[0].dns"),
        ({"dns": "http://seeds.svc:7000"}, "SOURCE[0].dns"),
        ({"dns": "seeds..svc:7000"}, "SOURCE[0].dns"),
        ({"dns": 7000}, "SOURCE[0].dns"),
        ({"dns": "seeds.svc:7000", "device_id": 0}, "SOURCE[0]"),
    ],
)
def test_a_malformed_dns_entry_is_a_config_error_naming_it(item, named):
    with pytest.raises(NetloaderConfigError) as raised:
        parse_config({"SOURCE": [item]})
    assert str(raised.value).startswith(named)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis://:pw@127.0.0.1:6379/0", "redis://127.0.0.1:99999/0",
     "redis:///0", "redis://127.0.0.1:6379/x", "redis://127.0.0.1:6379/0?ssl=1", "", 5],
)
def test_a_malformed_registry_is_a_config_error(url):
    with pytest.raises(NetloaderConfigError, match=r"^REGISTRY: "):
        parse_config({"REGISTRY": url})


def test_a_registry_url_is_kept():
    assert parse_config({"REGISTRY": "redis://[::1]:6380/2"}).registry == "redis://[::1]:6380/2"
    assert registry.parse_registry_url("redis://seeds-registry") == ("seeds-registry", 6379, 0)


def test_rendezvous_order_is_stable_per_key_and_spreads_over_keys():
    seeds = [f"10.0.0.{i}" for i in range(1, 5)]
    assert spread(seeds, "instance-a") == spread(list(reversed(seeds)), "instance-a")
    firsts = Counter(spread(seeds, f"instance-{i}")[0] for i in range(2000))
    assert set(firsts) == set(seeds)
    # 500 expected each; the binomial's standard deviation is about 19.
    assert all(400 < n < 600 for n in firsts.values()), firsts
    # A seed that goes away changes no other seed's place.
    for i in range(50):
        order = spread(seeds, f"instance-{i}")
        assert spread(seeds[1:], f"instance-{i}") == [s for s in order if s != seeds[0]]


def test_expand_puts_each_names_addresses_where_the_name_was():
    looked_up = []

    def resolver(host, timeout_s):
        looked_up.append((host, timeout_s))
        return {"seeds.svc": ["10.0.0.1", "10.0.0.2", "fd00::3"]}[host]

    entries = ["10.9.9.9:5000", DnsSource("seeds.svc", 7000), "10.0.0.1:7002"]
    addresses, notes = expand(entries, 2, "key", exclude=["10.0.0.2:7002"], resolver=resolver,
                              timeout_s=1.5)
    assert notes == [] and looked_up == [("seeds.svc", 1.5)]
    dns = [a for a in spread(["10.0.0.1:7002", "10.0.0.2:7002", "[fd00::3]:7002"], "key")
           if a != "10.0.0.2:7002"]
    assert addresses == ["10.9.9.9:5000", *dns]  # 10.0.0.1:7002 once, at its first place


def test_a_name_that_fails_is_a_note_and_the_others_still_count():
    def resolver(host, timeout_s):
        raise DiscoveryError(f"DNS name {host!r} does not resolve: boom")

    addresses, notes = expand(
        [DnsSource("gone.svc", 7000), DnsSource("big.svc", 65535), "10.0.0.1:7000"], 1, "k",
        resolver=resolver,
    )
    assert addresses == ["10.0.0.1:7000"]
    assert notes == [
        "dns gone.svc:7000: DNS name 'gone.svc' does not resolve: boom",
        "dns big.svc:65535: port 65535 + rank 1 exceeds 65535",
    ]


def test_only_ourselves_in_dns_is_a_note():
    addresses, notes = expand(
        [DnsSource("me.svc", 7000)], 0, "k", exclude=["10.0.0.1:7000"],
        resolver=lambda host, t: ["10.0.0.1"],
    )
    assert addresses == [] and notes == ["dns me.svc:7000: no address but this instance's own"]


def test_resolve_asks_the_systems_resolver():
    assert "127.0.0.1" in resolve("localhost")
    with pytest.raises(DiscoveryError, match="does not resolve"):
        resolve("no-such-host.invalid")


def test_a_resolver_that_hangs_costs_its_timeout(monkeypatch):
    release = threading.Event()

    def hangs(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror("released")

    monkeypatch.setattr(dns.socket, "getaddrinfo", hangs)
    start = time.monotonic()
    try:
        with pytest.raises(DiscoveryError, match="did not resolve within 0.3 s"):
            resolve("slow.svc", 0.3)
        assert time.monotonic() - start < 5
    finally:
        release.set()


def test_the_model_key_ignores_rank_role_and_checkpoint_only():
    identity = {"model": "m", "config_sha256": "a", "rank": 0, "role": "target",
                "checkpoint": CHECKPOINT, "vllm_version": "0.32.0"}
    same = {**identity, "rank": 3, "role": "draft", "checkpoint": None}
    assert model_key(identity) == model_key(same)
    assert model_key(identity) != model_key({**identity, "vllm_version": "0.33.0"})


@pytest.mark.parametrize(
    "raw",
    [
        b"x" * 5000,
        b"[]",
        b"{not json",
        json.dumps({"address": "evil.example:80", "rank": 0, "role": "target"}).encode(),
        json.dumps({"address": "10.0.0.1:7000", "rank": True, "role": "target"}).encode(),
        json.dumps({"address": "10.0.0.1:7000", "rank": 0, "role": "t" * 40}).encode(),
        json.dumps({"address": "10.0.0.1:7000", "rank": 0, "role": "target",
                    "checkpoint": "short"}).encode(),
        json.dumps({"address": "10.0.0.1:7000", "rank": 0, "role": "target",
                    "active_transfers": -1}).encode(),
    ],
)
def test_a_hostile_record_is_a_value_error(raw):
    with pytest.raises(ValueError):
        SeedRecord.from_json(raw)


def test_a_record_survives_its_round_trip():
    record = SeedRecord("[fd00::1]:7000", 1, "draft", CHECKPOINT, 2, True)
    assert SeedRecord.from_json(record.to_json()) == record


class Listed:
    """A registry that lists fixed records (the seam ``registry_candidates`` reads)."""

    name = "listed"

    def __init__(self, records):
        self.records = records
        self.asked = []

    def find(self, key, role, rank):
        self.asked.append((key, role, rank))
        return self.records


def test_registry_candidates_are_this_models_least_loaded_seeds_first():
    identity = {"model": "m", "rank": 1, "role": "target", "checkpoint": CHECKPOINT}
    records = [
        SeedRecord("10.0.0.1:7001", 1, "target", CHECKPOINT, active_transfers=2),
        SeedRecord("10.0.0.2:7001", 1, "target", CHECKPOINT, active_transfers=0, relaying=True),
        SeedRecord("10.0.0.3:7001", 1, "target", OTHER),  # another checkpoint
        SeedRecord("10.0.0.4:7001", 1, "target", None),  # weightless: the handshake decides
        SeedRecord("10.0.0.5:7001", 1, "target", CHECKPOINT, active_transfers=1),
        SeedRecord("10.0.0.6:7001", 1, "target", CHECKPOINT),  # ourselves
    ]
    registry = Listed(records)
    found = registry_candidates(registry, identity, "k", exclude=["10.0.0.6:7001"])
    assert registry.asked == [(model_key(identity), "target", 1)]
    assert found == ["10.0.0.4:7001", "10.0.0.2:7001", "10.0.0.5:7001", "10.0.0.1:7001"]
    # A node without weight files keeps every checkpoint: the handshake checks its
    # EXPECTED_FINGERPRINT.
    weightless = registry_candidates(registry, {**identity, "checkpoint": None}, "k")
    assert "10.0.0.3:7001" in weightless and len(weightless) == 6
