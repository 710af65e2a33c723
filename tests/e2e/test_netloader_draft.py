"""Netloader for a speculative decoder's draft model, on real vLLM CPU servers.

vLLM loads the draft (``--speculative-config`` method ``draft_model``) with the
target's load config, so through Netloader, in the same worker and global rank. The
draft gets a listener of its own (``DRAFT_LISTEN_PORT + rank`` or a free port, address
in ``{OUTPUT_PREFIX}draft{rank}.txt``) and its seeds from ``DRAFT_SOURCE``.

The draft here is the target model itself: the hardest case for identity (same path,
same config, same tensors) and a draft whose proposals are accepted, so a client whose
draft got wrong weights would accept a different number of draft tokens.
"""

import json
import time
import urllib.request

import pytest

from tests.helpers.e2e import PROMPTS, SERVER_ARGS, address_of, greedy, start_all
from tools.vllm_server import VllmServer, free_port
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e

ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
DRAFTED = "vllm:spec_decode_num_draft_tokens_total"


def spec_server(model: str, workdir, name: str, cpu: str, extra: dict | None) -> VllmServer:
    """Target ``model`` drafting with itself, 2 tokens a step; ``extra`` None means `auto`."""
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 2}
    return VllmServer(
        model, load_format="auto" if extra is None else "netloader", extra_config=extra,
        cpu_bind=cpu, log_path=workdir / f"{name}.log",
        extra_args=[*SERVER_ARGS, "--speculative-config", json.dumps(spec)],
    )


def spec_run(server: VllmServer) -> tuple[list, dict[str, float]]:
    """Greedy outputs and how many draft tokens those requests proposed and had accepted.

    One prompt per request: with speculative decoding, vLLM CPU's logprobs depend on how
    the prompts of one request happen to be batched (the same `auto` instance gave other
    logprobs on a second identical 3-prompt request); one at a time they are repeatable."""
    before = spec_counts(server)
    outputs = [greedy(server, [prompt])[0] for prompt in PROMPTS]
    after = spec_counts(server)
    return outputs, {name: after[name] - before[name] for name in after}


def spec_counts(server: VllmServer) -> dict[str, float]:
    """The counters once they stop moving: the last step's stats may land after the reply."""
    last = None
    for _ in range(20):
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as resp:
            lines = resp.read().decode().splitlines()
        counts = {
            name: sum(
                float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{")
            )
            for name in (DRAFTED, ACCEPTED)
        }
        if counts == last:
            return counts
        last = counts
        time.sleep(0.25)
    raise AssertionError(f"speculative decoding counters still moving: {last}")


@pytest.fixture(scope="module")
def spec_seed(model, workdir):
    """A netloader seed (target and draft from disk, both on fixed ports) and the
    outputs and draft counts of an `auto` instance with the same speculative config."""
    ports = {"LISTEN_PORT": free_port(), "DRAFT_LISTEN_PORT": free_port()}
    prefix = workdir / "spec-seed-"
    seed = spec_server(model, workdir, "spec-seed", "0", {"OUTPUT_PREFIX": str(prefix), **ports})
    disk = spec_server(model, workdir, "spec-auto", "1", None)
    try:
        start_all(seed, disk)
        reference = spec_run(disk)
        disk.stop()
        yield seed, address_of(prefix), address_of(f"{prefix}draft"), reference, ports
    finally:
        disk.stop()
        seed.stop()


@pytest.fixture(scope="module")
def spec_clients(model, workdir, spec_seed):
    """Two clients of the seed's target at once: one takes its draft from the seed's
    draft listener; the other is pointed at the seed's *target* listener for its draft,
    which must refuse it, so that draft loads from disk on its own.

    Neither offers to relay: started together, the second to reach the seed would
    otherwise be sent to the first (fan-out, covered in test_netloader_relay.py), and
    which one that is depends on timing."""
    _, target, draft, _, _ = spec_seed
    both = spec_server(model, workdir, "spec-client", "0", {
        "OUTPUT_PREFIX": str(workdir / "spec-client-"),
        "SOURCE": [{"device_id": 0, "sources": [target]}],
        "DRAFT_SOURCE": [{"device_id": 0, "sources": [draft]}],
        "RELAY": False,
    })
    lone = spec_server(model, workdir, "spec-lone", "1", {
        "OUTPUT_PREFIX": str(workdir / "spec-lone-"),
        "SOURCE": [{"device_id": 0, "sources": [target]}],
        "DRAFT_SOURCE": [{"device_id": 0, "sources": [target]}],
        "RELAY": False,
    })
    try:
        start_all(both, lone)
        yield both, lone
    finally:
        both.stop()
        lone.stop()


def test_seed_serves_target_and_draft_on_their_own_ports(spec_seed):
    server, target, draft, reference, ports = spec_seed
    target_info, draft_info = query_seed(target), query_seed(draft)
    assert target_info["address"] == f"127.0.0.1:{ports['LISTEN_PORT']}"
    assert draft_info["address"] == f"127.0.0.1:{ports['DRAFT_LISTEN_PORT']}"
    assert target_info["identity"]["role"] == "target"
    assert draft_info["identity"]["role"] == "draft"
    # Same model as draft: everything but the role agrees, down to the weights.
    assert {k: v for k, v in draft_info["identity"].items() if k != "role"} == {
        k: v for k, v in target_info["identity"].items() if k != "role"
    }
    assert draft_info["value_fingerprint"] == target_info["value_fingerprint"]
    assert target_info["loaded_from"] == draft_info["loaded_from"] == "disk"
    _, counts = reference
    assert counts[DRAFTED] > 0 and counts[ACCEPTED] > 0
    assert spec_run(server) == reference


def test_client_takes_target_and_draft_from_their_seeds(workdir, spec_seed, spec_clients):
    _, target, draft, reference, _ = spec_seed
    client, _ = spec_clients
    client_target = query_seed(address_of(workdir / "spec-client-"))
    client_draft = query_seed(address_of(workdir / "spec-client-draft"))
    assert client_target["loaded_from"] == f"seed {target}"
    assert client_draft["loaded_from"] == f"seed {draft}"
    assert client_draft["identity"]["role"] == "draft"
    assert client_target["address"] != client_draft["address"]
    assert spec_run(client) == reference


def test_draft_refused_by_target_listener_loads_from_disk_alone(
    workdir, spec_seed, spec_clients
):
    _, target, draft, reference, _ = spec_seed
    _, lone = spec_clients
    lone_target = query_seed(address_of(workdir / "spec-lone-"))
    lone_draft = query_seed(address_of(workdir / "spec-lone-draft"))
    assert lone_target["loaded_from"] == f"seed {target}"
    assert lone_draft["loaded_from"] == "disk"
    (refusal,) = lone_draft["fallback_reasons"]
    assert target in refusal and "role: 'target' here vs 'draft' there" in refusal
    assert spec_run(lone) == reference
    # Two targets and one draft went out; the target listener served no draft.
    assert query_seed(target)["completed_transfers"] == 2
    assert query_seed(draft)["completed_transfers"] == 1

