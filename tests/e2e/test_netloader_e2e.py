"""Netloader end to end on real vLLM servers (CPU, gloo), on the embedded tiny model.

One seed (netloader, loaded from disk) and one disk-loaded reference (`auto`) start
first; every other instance is compared with them: greedy texts and the logprob of
every generated token must be identical, and where the weights came from is read
from each instance's own seed ``info`` answer, not from its log.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.make_tiny_model import main as make_tiny_model
from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The quickest way to start a new server is",
    "Once upon a time, in a data center far away,",
    "1, 2, 3, 4,",
]
REPO = Path(__file__).resolve().parents[2]
# A repeated prompt would hit the prefix cache and take another numeric path; without
# it, every request is computed the same way and logprobs can be compared exactly.
SERVER_ARGS = ["--no-enable-prefix-caching"]


def greedy(server: VllmServer) -> list[tuple[str, list[float]]]:
    """Text and per-token logprobs of a temperature-0 completion per prompt."""
    body = {
        "model": server.model_name, "prompt": PROMPTS, "max_tokens": 24,
        "temperature": 0, "logprobs": 1, "seed": 0,
    }
    req = urllib.request.Request(
        f"{server.url}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        choices = sorted(json.load(resp)["choices"], key=lambda c: c["index"])
    return [(c["text"], c["logprobs"]["token_logprobs"]) for c in choices]


def start_all(*servers: VllmServer) -> None:
    """Start servers together (one per core) and wait until all are healthy."""
    for s in servers:
        s.start()
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.wait_healthy(240), servers))


def address_of(prefix: Path) -> str:
    return Path(f"{prefix}0.txt").read_text().strip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("netloader-e2e")


@pytest.fixture(scope="module")
def model(workdir) -> str:
    given = os.environ.get("NETLOADER_TEST_MODEL")
    if given:
        return given
    path = workdir / "tiny-qwen2"
    make_tiny_model([str(path)])
    return str(path)


@pytest.fixture(scope="module")
def other_model(workdir) -> str:
    """Same architecture and sizes, other weights and one more layer: a different model."""
    path = workdir / "other-qwen2"
    make_tiny_model([str(path), "--layers", "5", "--seed", "1"])
    return str(path)


def netloader_server(
    model: str, workdir: Path, name: str, cpu: str, sources: list[str] | None = None
) -> VllmServer:
    extra: dict = {"OUTPUT_PREFIX": f"{workdir}/{name}-"}
    if sources is not None:
        extra["SOURCE"] = [{"device_id": 0, "sources": sources}]
    return VllmServer(
        model, load_format="netloader", cpu_bind=cpu, extra_config=extra,
        log_path=workdir / f"{name}.log", extra_args=SERVER_ARGS,
    )


@pytest.fixture(scope="module")
def seed(model, workdir):
    """A netloader seed (from disk) and the `auto` disk-load reference outputs."""
    seed = netloader_server(model, workdir, "seed", "0")
    disk = VllmServer(
        model, load_format="auto", cpu_bind="1", log_path=workdir / "disk.log",
        extra_args=SERVER_ARGS,
    )
    try:
        start_all(seed, disk)
        reference = greedy(disk)
        disk.stop()
        yield seed, address_of(workdir / "seed-"), reference
    finally:
        disk.stop()
        seed.stop()


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
    assert all(text for text, _ in reference)


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


def dump(model: str, out: Path, load_format: str, extra: dict) -> tuple[dict, dict]:
    """Runtime tensors of an in-process instance, and its report (tensor count, seeds)."""
    env = {
        **os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "1",
    }
    cmd = [
        sys.executable, "-m", "tests.e2e.dump_instance", model, str(out),
        "--load-format", load_format, "--extra", json.dumps(extra),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = [line for line in done.stdout.splitlines() if line.startswith("DUMP ")][-1]
    return load_file(str(out)), json.loads(report.removeprefix("DUMP "))


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


def test_seed_killed_mid_transfer_client_loads_from_disk(
    model, workdir, seed
):
    """A real seed, capped at 2 MB/s in 1 MiB buckets so the transfer lasts seconds,
    is SIGKILLed while it sends; the client must still come up with the right model."""
    _, _, reference = seed
    doomed = VllmServer(
        model, load_format="netloader", cpu_bind="0", log_path=workdir / "doomed.log",
        extra_args=SERVER_ARGS,
        extra_config={
            "OUTPUT_PREFIX": f"{workdir}/doomed-", "BUCKET_MB": 1, "SEND_LIMIT_MB_PER_S": 2,
        },
    )
    survivor = None
    try:
        start_all(doomed)
        doomed_address = address_of(workdir / "doomed-")
        survivor = netloader_server(model, workdir, "survivor", "1", [doomed_address])
        survivor.start()
        deadline = time.monotonic() + 240
        while query_seed(doomed_address)["active_transfers"] == 0:
            assert time.monotonic() < deadline and survivor.proc.poll() is None
            time.sleep(0.05)
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        survivor.wait_healthy(240)
        info = query_seed(address_of(workdir / "survivor-"))
        assert info["loaded_from"] == "disk"
        assert len(info["fallback_reasons"]) == 1 and doomed_address in info["fallback_reasons"][0]
        assert greedy(survivor) == reference
    finally:
        for server in (survivor, doomed):
            if server is not None:
                server.stop()
