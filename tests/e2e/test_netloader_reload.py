"""``reload_weights`` (vLLM's in-place reload, reached through the dev-mode
``/collective_rpc`` endpoint or ``LLM.collective_rpc``) on Netloader instances.

vLLM reads the checkpoint through the loader's ``get_all_weights``; Netloader reads it
from disk as ``auto`` does. A seed whose reload reads the checkpoint it serves goes on
serving it; a reload from another checkpoint stops that seed.
"""

import json
import urllib.request

import pytest

from tests.helpers.e2e import assert_equal_tensors, dump, greedy
from tools.make_tiny_model import main as make_tiny_model
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e


def collective_rpc(url: str, method: str) -> None:
    request = urllib.request.Request(
        f"{url}/collective_rpc", data=json.dumps({"method": method}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200, resp.read()


def test_client_that_fetched_reloads_from_disk_before_it_serves(
    model, workdir, seed, disk_tensors
):
    _, address, _ = seed
    received, report = dump(
        model, workdir / "reloaded-client.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [address]}]}, "--reload",
    )
    (own,) = report["seeds"]
    assert own["loaded_from"] == f"seed {address}"
    assert own["value_fingerprint"] == query_seed(address)["value_fingerprint"]
    assert_equal_tensors(received, disk_tensors)


def test_seed_that_served_reloads_and_goes_on_serving_the_same_weights(
    model, workdir, seed, disk_tensors
):
    server, address, reference = seed
    before = query_seed(address)
    # It has served clients already (the test above, and in a full run many more).
    assert before["completed_transfers"] >= 1
    collective_rpc(server.url, "reload_weights")
    assert greedy(server) == reference
    after = query_seed(address)
    assert after["value_fingerprint"] == before["value_fingerprint"]
    received, report = dump(
        model, workdir / "after-reload.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [address]}]},
    )
    assert [s["loaded_from"] for s in report["seeds"]] == [f"seed {address}"]
    assert_equal_tensors(received, disk_tensors)


def test_reload_from_another_checkpoint_runs_it_and_stops_the_seed(model, workdir):
    """Same shapes, other values: the instance runs the new weights as `auto` would,
    and no longer serves the old ones (nor claims the new ones)."""
    other = workdir / "reload-other"
    make_tiny_model([str(other), "--seed", "7"])
    from_other, _ = dump(str(other), workdir / "other-auto.safetensors", "auto", {})
    received, report = dump(
        model, workdir / "reloaded-other.safetensors", "netloader", {},
        "--reload-from", str(other),
    )
    assert report["seeds"] == []
    assert_equal_tensors(received, from_other)
