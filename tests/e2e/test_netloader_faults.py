"""Bad input and faults against a real vLLM seed (issue: a seed and client that can be
trusted). After each one the seed must still be healthy and give the `auto` reference
completions, and no client may end up with a model that differs from a disk load."""

import json
import os
import select
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.e2e.conftest import SEED_TIMEOUT_S
from tests.helpers import wire
from tests.helpers.e2e import (
    DUMP_ENV,
    REPO,
    address_of,
    assert_equal_tensors,
    dump,
    dump_command,
    greedy,
    netloader_server,
    seed_hello,
    start_all,
)
from tests.helpers.wire import challenge_of, frame, read
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.wire.auth import AuthError
from vllm_ascend.model_loader.netloader.wire.frames import MAGIC, PROTOCOL_VERSION, REFUSE
from vllm_ascend.model_loader.netloader.wire.messages import HELLO

pytestmark = pytest.mark.e2e

SECRET = "e2e-shared-secret-0123456789abcdef"


def assert_seed_serves_correctly(seed) -> None:
    server, address, reference = seed
    assert server.health_ok()
    assert greedy(server) == reference
    assert query_seed(address)["active_transfers"] == 0


def connect(address: str) -> socket.socket:
    # A seed under a transfer may answer slowly; the unit tests' 5 s is too short here.
    return wire.connect(address, timeout_s=30)


BAD_REQUESTS = {
    "garbage": lambda _: b"\x00\xffGET / HTTP/1.1\r\n\r\n" * 3,
    "truncated frame": lambda _: frame({"type": HELLO})[:-3],
    "oversized length": lambda _: struct.pack("!4sBI", MAGIC, PROTOCOL_VERSION, 2**32 - 1),
    "wrong protocol version": lambda _: frame({"type": HELLO}, version=PROTOCOL_VERSION + 1),
    "valid frame, wrong type": lambda _: frame({"type": "done", "ok": True}),
    "not an object": lambda _: frame(["hello"]),
    "hello without manifest": lambda address: frame(
        {k: v for k, v in seed_hello(address).items() if k != "manifest"}
    ),
}
MISMATCHES = {
    "other model": {"config_sha256": "0" * 64},
    "other checkpoint": {"checkpoint": "0" * 64},
    "other vLLM": {"vllm_version": "0.31.0"},
    "other TP size": {"tensor_parallel_size": 2},
    "other rank": {"rank": 1},
    "other dtype": {"dtype": "float32"},
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_is_refused_and_seed_keeps_serving(seed, name):
    _, address, _ = seed
    junk = BAD_REQUESTS[name](address)
    with connect(address) as s:
        assert challenge_of(s)["auth"] is False
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)  # a truncated frame ends in EOF instead of a wait
        reply = read(s)
    assert reply["type"] == REFUSE and reply["reason"].startswith("bad request"), reply
    assert_seed_serves_correctly(seed)


@pytest.mark.parametrize("name", MISMATCHES)
def test_mismatched_identity_is_refused_before_any_collective(seed, name):
    _, address, _ = seed
    identity = {**query_seed(address)["identity"], **MISMATCHES[name]}
    before = query_seed(address)["completed_transfers"]
    request = seed_hello(address, identity=identity)
    with connect(address) as s:
        challenge_of(s)
        s.sendall(frame(request))
        reply = read(s)
    field = next(iter(MISMATCHES[name]))
    assert reply["type"] == REFUSE and field in reply["reason"], reply
    assert "digests" not in reply
    assert query_seed(address)["completed_transfers"] == before
    assert_seed_serves_correctly(seed)


def test_silent_client_costs_the_seed_one_timeout(seed):
    _, address, _ = seed
    with connect(address) as s:
        challenge_of(s)
        start = time.monotonic()
        assert_seed_serves_correctly(seed)  # while the silent client holds its connection
        s.settimeout(SEED_TIMEOUT_S + 30)
        assert s.recv(1) == b""  # the seed gave up on it and closed
        assert time.monotonic() - start < SEED_TIMEOUT_S + 30
    assert_seed_serves_correctly(seed)


def test_corrupted_payload_makes_the_client_load_from_disk(model, workdir, seed, disk_tensors):
    """One bit flipped between the network and the digest check (a seam in the client)."""
    _, address, _ = seed
    before = query_seed(address)["completed_transfers"]
    tensors, report = dump(
        model, workdir / "corrupt.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [address]}]}, "--fault", "corrupt",
    )
    (info,) = report["seeds"]
    assert info["loaded_from"] == "disk"
    assert "digest mismatch" in info["fallback_reasons"][0]
    assert_equal_tensors(tensors, disk_tensors)
    assert query_seed(address)["completed_transfers"] == before
    assert_seed_serves_correctly(seed)


def test_client_killed_mid_transfer_frees_the_seed(model, workdir, seed):
    _, address, _ = seed
    before = query_seed(address)["completed_transfers"]
    cmd = dump_command(
        model, workdir / "killed.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [address]}]}, "--fault", "stall",
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **DUMP_ENV}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        assert wait_for_line(proc, "STALLED", 240), "the client never started receiving"
        assert query_seed(address)["active_transfers"] == 1
        server, _, reference = seed  # the seed's own users, during the stalled transfer
        assert server.health_ok() and greedy(server) == reference
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + SEED_TIMEOUT_S + 30
    while query_seed(address)["active_transfers"] != 0:
        assert time.monotonic() < deadline, "the seed still holds the killed client's transfer"
        time.sleep(0.2)
    assert query_seed(address)["completed_transfers"] == before
    assert_seed_serves_correctly(seed)


def wait_for_line(proc: subprocess.Popen, line: str, timeout_s: float) -> bool:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready and proc.stdout.readline().strip() == line:
            return True
    return False


def test_eight_clients_at_once_are_all_served_exactly(model, workdir, seed):
    """Eight fetches start together against the real seed (4 run at a time, the rest
    are told to retry). Each copy must equal this in-process instance's own disk load."""
    _, address, _ = seed
    before = query_seed(address)["completed_transfers"]
    _, report = dump(
        model, workdir / "swarm.safetensors", "netloader", {},
        "--swarm", "8", "--swarm-from", address,
    )
    assert report["seeds"][0]["loaded_from"] == "disk"
    swarm = report["swarm"]
    assert swarm["hung"] == 0
    assert swarm["served"] == 8, swarm["reasons"]
    assert swarm["equal_to_own_load"] == 8
    assert query_seed(address)["completed_transfers"] == before + 8
    assert_seed_serves_correctly(seed)


def test_seed_killed_mid_transfer_client_resumes_from_the_next_seed(
    model, workdir, seed, disk_tensors
):
    """A seed capped at 1 MB/s in 1 MiB buckets is SIGKILLed ~3 s into a transfer of
    the 8 MB model, in the processed layout (the default); the client goes on to the
    next seed in SOURCE, which serves the same values, so it sends only what the client
    does not hold yet. The client's runtime tensors equal a disk load's, bit for bit."""
    _, seed_address, _ = seed
    doomed = netloader_server(
        model, workdir, "doomed", "1", keys={"BUCKET_MB": 1, "SEND_LIMIT_MB_PER_S": 1}
    )
    client = None
    try:
        start_all(doomed)
        doomed_address = address_of(workdir / "doomed-")
        out = workdir / "resumed.safetensors"
        extra = {"SOURCE": [{"device_id": 0, "sources": [doomed_address, seed_address]}]}
        client = subprocess.Popen(
            dump_command(model, out, "netloader", extra), cwd=REPO,
            env={**os.environ, **DUMP_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while query_seed(doomed_address)["active_transfers"] == 0:
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.05)
        time.sleep(3)  # ~3 of the model's 8 MB sent: some buckets verified, most not
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        stdout, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stdout[-3000:] + stderr[-3000:]
    finally:
        if client is not None and client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
        doomed.stop()
    report = [line for line in stdout.splitlines() if line.startswith("DUMP ")][-1]
    (info,) = json.loads(report.removeprefix("DUMP "))["seeds"]
    assert info["loaded_from"] == f"seed {seed_address}"
    assert info["loaded_layout"] == "processed"
    assert len(info["fallback_reasons"]) == 1 and doomed_address in info["fallback_reasons"][0]
    assert 0 < info["reused_bytes"] < info["bytes"]
    assert_equal_tensors(load_file(str(out)), disk_tensors)
    assert_seed_serves_correctly(seed)


def test_shared_secret_end_to_end(model, workdir, seed):
    """A seed with the secret serves a client with it and refuses one with another secret
    (which loads from disk); neither log holds the secret; an open seed warns once."""
    _, _, reference = seed
    env = {"NETLOADER_SECRET": SECRET}
    guarded = netloader_server(model, workdir, "guarded", "1", env=env)
    start_all(guarded)
    guarded_address = address_of(workdir / "guarded-")
    trusted = netloader_server(model, workdir, "trusted", "0", [guarded_address], env=env)
    intruder = netloader_server(
        model, workdir, "intruder", "1", [guarded_address],
        env={"NETLOADER_SECRET": "not-the-secret-0123456789"},
    )
    try:
        start_all(trusted, intruder)
        secret = SECRET.encode()
        trusted_info = query_seed(address_of(workdir / "trusted-"), secret=secret)
        assert trusted_info["loaded_from"] == f"seed {guarded_address}"
        intruder_info = query_seed(
            address_of(workdir / "intruder-"), secret=b"not-the-secret-0123456789"
        )
        assert intruder_info["loaded_from"] == "disk"
        assert "authentication failed" in intruder_info["fallback_reasons"][0]
        assert greedy(trusted) == reference and greedy(intruder) == reference
        with pytest.raises(AuthError):
            query_seed(guarded_address)
        assert query_seed(guarded_address, secret=secret)["completed_transfers"] == 1
    finally:
        for server in (trusted, intruder, guarded):
            server.stop()
    for name in ("guarded", "trusted", "intruder"):
        log = Path(workdir / f"{name}.log").read_text(errors="replace")
        assert SECRET not in log and "no shared secret" not in log, name
    open_log = Path(workdir / "seed.log").read_text(errors="replace")
    assert open_log.count("no shared secret") == 1


def test_a_seed_still_computing_its_digests_refuses_a_client_then_serves_it(
    model, workdir, disk_tensors
):
    """A seed that loaded from disk hashes its large tensors after start-up; here
    DIGEST_LIMIT_MB_PER_S holds that at 2 MiB in ~40 s, so a client started as soon as
    the seed is healthy asks while it is preparing, is refused as a busy seed is, asks
    again, and is served the moment the digests are done."""
    server = netloader_server(model, workdir, "preparing-seed", "0",
                              keys={"DIGEST_LIMIT_MB_PER_S": 0.05})
    try:
        start_all(server)
        address = address_of(workdir / "preparing-seed-", timeout_s=0)
        info = query_seed(address)
        assert info["value_fingerprint"] is None
        assert info["preparing"]["total_bytes"] >= 2 << 20
        assert "preparing" in info["layouts"]["loaded"]["unavailable"]
        tensors, report = dump(
            model, workdir / "after-preparing.safetensors", "netloader",
            {"SOURCE": [{"device_id": 0, "sources": [address]}], "TIMEOUT": 120},
        )
        (own,) = report["seeds"]
        assert own["loaded_from"] == f"seed {address}", own
        assert own["fallback_reasons"] == []
        assert_equal_tensors(tensors, disk_tensors)
        done = query_seed(address)
        assert "preparing" not in done and done["completed_transfers"] == 1
        assert own["value_fingerprint"] == done["value_fingerprint"]
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        refused = [line for line in metrics.splitlines()
                   if line.startswith("netloader_refusals_total") and 'reason="preparing"' in line]
        assert refused and float(refused[0].split()[-1]) >= 1, metrics[-2000:]
    finally:
        server.stop()
