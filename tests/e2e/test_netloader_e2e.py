"""Netloader end to end on real vLLM servers (CPU, gloo), on the embedded tiny model.

One seed (netloader, loaded from disk) and one disk-loaded reference (`auto`) start
first; every other instance is compared with them: greedy texts and the logprob of
every generated token must be identical, and where the weights came from is read
from each instance's own seed ``info`` answer, not from its log.
"""


import pytest
import torch

from tests.helpers.e2e import address_of, dump, greedy, netloader_server, start_all
from tools.make_tiny_model import main as make_tiny_model
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def other_model(workdir) -> str:
    """Same architecture and sizes, other weights and one more layer: a different model."""
    path = workdir / "other-qwen2"
    make_tiny_model([str(path), "--layers", "5", "--seed", "1"])
    return str(path)


@pytest.fixture(scope="module")
def client(model, workdir, seed):
    _, seed_address, _ = seed
    server = netloader_server(model, workdir, "client", "1", [seed_address])
    try:
        start_all(server)
        yield server, address_of(workdir / "client-")
    finally:
        server.stop()


def test_seed_from_disk_matches_auto_load(seed):
    server, address, reference = seed
    info = query_seed(address)
    assert info["loaded_from"] == "disk"
    assert greedy(server) == reference
    # Not vacuous: every prompt generated tokens. A random-weight model may pick a
    # special token first and then decode to "" (seen once), so not every text.
    assert all(logprobs for _, logprobs in reference) and any(text for text, _ in reference)


def test_client_loads_from_seed_and_matches_disk_load(seed, client):
    seed_server, seed_address, reference = seed
    client_server, client_address = client
    seed_info, client_info = query_seed(seed_address), query_seed(client_address)
    assert client_info["loaded_from"] == f"seed {seed_address}"
    assert client_info["value_fingerprint"] == seed_info["value_fingerprint"]
    assert client_info["bytes"] == seed_info["bytes"] > 0
    assert seed_info["completed_transfers"] >= 1
    assert greedy(client_server) == reference
    assert seed_server.health_ok() and greedy(seed_server) == reference


def test_client_serves_a_third_instance(model, workdir, client, seed):
    _, client_address = client
    _, _, reference = seed
    third = netloader_server(model, workdir, "third", "0", [client_address])
    try:
        start_all(third)
        info = query_seed(address_of(workdir / "third-"))
        assert info["loaded_from"] == f"seed {client_address}"
        assert greedy(third) == reference
    finally:
        third.stop()
    assert query_seed(client_address)["completed_transfers"] == 1


def test_unreachable_source_and_other_models_seed_fall_back_to_disk(
    model, other_model, workdir, seed
):
    """(b) nothing listens at the source; (c) the source serves a different model."""
    seed_server, _, reference = seed
    other = netloader_server(other_model, workdir, "other", "0")
    lonely = netloader_server(model, workdir, "lonely", "1", ["127.0.0.1:9"])
    start_all(other, lonely)
    try:
        assert query_seed(address_of(workdir / "lonely-"))["loaded_from"] == "disk"
        assert greedy(lonely) == reference
        lonely.stop()
        other_address = address_of(workdir / "other-")
        refused = netloader_server(model, workdir, "refused", "1", [other_address])
        try:
            start_all(refused)
            assert query_seed(address_of(workdir / "refused-"))["loaded_from"] == "disk"
            assert greedy(refused) == reference
        finally:
            refused.stop()
        other_info = query_seed(other_address)
        assert other_info["completed_transfers"] == 0
        assert other_info["identity"]["config_sha256"] != query_seed(
            address_of(workdir / "seed-"))["identity"]["config_sha256"]
    finally:
        lonely.stop()
        other.stop()
    assert seed_server.health_ok()


def test_client_runtime_tensors_equal_disk_load(model, workdir, seed):
    """Every tensor the processed model holds (params, buffers, attributes, kernel
    closures) equals a disk load's, bit for bit."""
    _, seed_address, _ = seed
    received, report = dump(
        model, workdir / "client.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [seed_address]}]},
    )
    assert [s["loaded_from"] for s in report["seeds"]] == [f"seed {seed_address}"]
    from_disk, _ = dump(model, workdir / "disk.safetensors", "auto", {})
    assert received.keys() == from_disk.keys()
    assert sum(t.numel() for t in from_disk.values()) > 0
    for name, t in from_disk.items():
        assert received[name].dtype == t.dtype, name
        assert torch.equal(received[name], t), name
