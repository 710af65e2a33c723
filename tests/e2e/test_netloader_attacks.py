"""A seed you can put on a shared network, against real vLLM: what a peer must not be
able to do to the serving worker, and what a starting instance must never end up
with. After each attack on the shared seed, it must still be healthy and give the
`auto` reference completions; a starting instance must hold exactly its own
checkpoint's tensors (a disk load's, buffers included) or not start."""

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_netloader_faults import assert_seed_serves_correctly
from tests.helpers import wire
from tests.helpers.e2e import (
    DUMP_ENV,
    PROMPTS,
    REPO,
    assert_equal_tensors,
    dump,
    dump_command,
    greedy,
    netloader_server,
    seed_hello,
    start_all,
)
from tests.helpers.wire import challenge_of, frame, read
from tools.make_tiny_model import main as make_tiny_model
from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.wire.frames import MAGIC, PROTOCOL_VERSION
from vllm_ascend.model_loader.netloader.wire.messages import ACCEPT

pytestmark = pytest.mark.e2e

# The frame that aborted a seed through its gloo pair socket: 48 bytes of a peer's
# idea of a pair header. On the host data plane it is just bytes in the wrong place.
RAW_FRAME = struct.pack("<6Q", 1, 2, 3, 4, 5, 6)


def connect(address: str) -> socket.socket:
    return wire.connect(address, timeout_s=30)


def seed_worker(server: VllmServer, address: str) -> psutil.Process:
    """The process of the server whose seed listens on ``address``: the worker."""
    port = int(address.rsplit(":", 1)[1])
    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in proc.net_connections(kind="tcp")):
            return proc
    raise AssertionError(f"no process of the server listens on {address}")


def wait_idle(address: str) -> None:
    deadline = time.monotonic() + 60
    while query_seed(address)["active_transfers"]:
        assert time.monotonic() < deadline, "the seed still counts the attacker's transfer"
        time.sleep(0.2)


@pytest.mark.parametrize("when", ["after the accept", "mid-transfer", "instead of done"])
def test_a_raw_frame_on_the_data_connection_leaves_the_seed_serving(seed, when):
    """Before: one raw 48-byte frame on the gloo pair socket killed the seed's worker
    (SIGABRT, gloo::EnforceNotMet), and with it the instance."""
    server, address, _ = seed
    worker = seed_worker(server, address)
    before = query_seed(address)
    with connect(address) as s:
        challenge_of(s)
        s.sendall(frame(seed_hello(address)))
        assert read(s)["type"] == ACCEPT
        if when == "mid-transfer":
            s.recv(100_000)
        elif when == "instead of done":
            got = 0
            while got < before["bytes"]:  # every bucket, with its headers
                got += len(s.recv(1 << 20))
        s.sendall(RAW_FRAME * 100)
        s.settimeout(30)
        try:
            while s.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
    wait_idle(address)
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    assert query_seed(address)["completed_transfers"] == before["completed_transfers"]
    assert_seed_serves_correctly(seed)


def test_a_63_mib_frame_before_auth_does_not_hold_up_completions(seed):
    """Before: the seed read and parsed it; a concurrent request waited ~15 s and the
    worker grew by 1.6 GB."""
    server, address, reference = seed
    worker = seed_worker(server, address)
    rss_before = worker.memory_info().rss
    payload = b"[" + b"[]," * (21 << 20) + b"[]]"
    attackers = []
    for _ in range(3):
        s = connect(address)
        challenge_of(s)
        s.sendall(struct.pack("!4sBI", MAGIC, PROTOCOL_VERSION, len(payload)))
        threading.Thread(target=_send_quietly, args=(s, payload), daemon=True).start()
        attackers.append(s)
    try:
        start = time.monotonic()
        server.completion(PROMPTS[0], max_tokens=24)
        assert time.monotonic() - start < 3
        assert worker.memory_info().rss - rss_before < 200 << 20
    finally:
        for s in attackers:
            s.close()
    assert_seed_serves_correctly(seed)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the seed refused and closed: expected


# --- identity by content ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin(workdir, model) -> str:
    """A checkpoint with the seed model's config.json and other weights (a fine-tune)."""
    path = workdir / "twin-qwen2"
    make_tiny_model([str(path), "--seed", "1"])
    assert (path / "config.json").read_text() == (Path(model) / "config.json").read_text()
    return str(path)


def test_two_checkpoints_with_one_config_do_not_serve_each_other(workdir, seed, twin):
    """Before: every digest checked, loaded_from said seed, and the client ran the
    other checkpoint's weights."""
    _, address, _ = seed
    name = query_seed(address)["identity"]["model"]  # so that only the weights differ
    tensors, report = dump(
        twin, workdir / "twin.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [address]}], "MODEL": name},
    )
    (info,) = report["seeds"]
    assert info["loaded_from"] == "disk"
    assert "checkpoint" in info["fallback_reasons"][0], info["fallback_reasons"]
    own, _ = dump(twin, workdir / "twin-disk.safetensors", "auto", {})
    assert_equal_tensors(tensors, own)


@pytest.fixture(scope="module")
def weightless(workdir, model) -> str:
    """The seed model's directory without its weight files: a scale-out node that has
    only the config and tokenizer."""
    path = workdir / "weightless"
    shutil.copytree(model, path, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(path)


@pytest.mark.parametrize("which", ["checkpoint", "value"])
def test_a_node_without_weight_files_loads_the_weights_its_fingerprint_names(
    workdir, seed, weightless, disk_tensors, which
):
    _, address, _ = seed
    info = query_seed(address)
    expected = info["identity"]["checkpoint"] if which == "checkpoint" else info[
        "value_fingerprint"]
    tensors, report = dump(
        weightless, workdir / f"weightless-{which}.safetensors", "netloader",
        {"SOURCE": [{"device_id": 0, "sources": [address]}],
         "MODEL": info["identity"]["model"], "EXPECTED_FINGERPRINT": expected},
    )
    (own,) = report["seeds"]
    assert own["loaded_from"] == f"seed {address}", own["fallback_reasons"]
    # It now serves the seed's checkpoint under its name, so its own clients check it too.
    assert own["identity"]["checkpoint"] == info["identity"]["checkpoint"]
    assert_equal_tensors(tensors, disk_tensors)


@pytest.mark.parametrize("expected", [None, "0" * 64], ids=["none", "another"])
def test_a_node_without_weight_files_and_no_matching_fingerprint_does_not_start(
    workdir, seed, weightless, expected
):
    _, address, _ = seed
    extra: dict = {"SOURCE": [{"device_id": 0, "sources": [address]}],
                   "MODEL": query_seed(address)["identity"]["model"]}
    if expected is not None:
        extra["EXPECTED_FINGERPRINT"] = expected
    done = subprocess.run(
        dump_command(weightless, workdir / "never.safetensors", "netloader", extra),
        cwd=REPO, env={**os.environ, **DUMP_ENV}, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "DUMP " not in done.stdout
    assert "Cannot find any model weights" in output
    why = ("no weight files on this node and no EXPECTED_FINGERPRINT" if expected is None
           else "not EXPECTED_FINGERPRINT")
    assert why in output


# --- a failed fetch leaves a disk load, buffers included ------------------------------------


def test_a_transfer_that_fails_at_its_very_end_leaves_a_disk_loads_buffers(
    model, workdir, disk_tensors
):
    """A hostile seed (a real vLLM instance's weights) serves a processed layout whose
    every digest is right but whose state signature is not, so the client fails after it
    installed and processed the tensors in a model built on the meta device; then, in
    the loaded layout, a rotary cache with other values under a matching digest, and a
    last tensor that fails. Before: the client's disk load kept the seed's cache (the
    disk loader never writes that buffer)."""
    cmd = dump_command(model, workdir / "tampered-seed.safetensors", "netloader", {},
                       "--serve-tampered")
    hostile = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **DUMP_ENV}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert hostile.stdout is not None
        address = ""
        for line in hostile.stdout:
            if line.startswith("TAMPERED "):
                address = line.split()[1]
                break
        assert address, "the hostile seed never started"
        tensors, report = dump(
            model, workdir / "late.safetensors", "netloader",
            {"SOURCE": [{"device_id": 0, "sources": [address]}]},
        )
    finally:
        assert hostile.stdin is not None
        hostile.stdin.close()
        hostile.wait(60)
    (info,) = report["seeds"]
    assert info["loaded_from"] == "disk"
    processed, loaded = info["fallback_reasons"]
    assert "processed layout not reproduced" in processed and "not the seed's" in processed
    assert "digest mismatch" in loaded
    assert_equal_tensors(tensors, disk_tensors)


# --- IPv6 ---------------------------------------------------------------------------------


def test_seed_and_client_on_ipv6_loopback(model, workdir, seed, disk_tensors):
    """Before: with VLLM_HOST_IP=::1 the seed could not bind, and start-up failed."""
    _, _, reference = seed
    v6 = netloader_server(model, workdir, "v6-seed", "1", env={"VLLM_HOST_IP": "::1"})
    try:
        start_all(v6)
        address = (workdir / "v6-seed-0.txt").read_text().strip()
        assert address.startswith("[::1]:")
        assert greedy(v6) == reference
        tensors, report = dump(
            model, workdir / "v6-client.safetensors", "netloader",
            {"SOURCE": [{"device_id": 0, "sources": [address]}]},
            env={"VLLM_HOST_IP": "::1"},
        )
    finally:
        v6.stop()
    (info,) = report["seeds"]
    assert info["loaded_from"] == f"seed {address}" and info["address"].startswith("[::1]:")
    assert_equal_tensors(tensors, disk_tensors)


def test_a_connection_flood_does_not_hold_up_completions(seed):
    """Connections opened and dropped as fast as two threads can, for 4 s: the serving
    worker accepts them at a bounded rate and answers its users meanwhile."""
    server, address, reference = seed
    host, port = address.rsplit(":", 1)
    stop = threading.Event()
    opened = [0, 0]

    def flood(i: int) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=5):
                    opened[i] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        start = time.monotonic()
        server.completion(PROMPTS[0], max_tokens=24)
        assert time.monotonic() - start < 3
        assert query_seed(address, timeout_s=10)["identity"]
    finally:
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(10)
    assert sum(opened) > 100
    assert_seed_serves_correctly(seed)


def test_hostile_seeds_then_a_good_one_leave_a_vllm_client_with_the_good_ones_tensors(
    model, workdir, seed, disk_tensors
):
    """A redirect to a host with a 64-character label, a bucket size of 2**40 and a
    bucket off the plan (before: the first escaped load_weights as UnicodeError and the
    instance did not start), then the real seed."""
    from tests.procs.test_attacks import HOSTILE, fake_seed

    _, address, _ = seed
    names = ["redirect to a 64-character label", "a bucket off the plan", "not a frame"]
    fakes = [fake_seed(HOSTILE[name]) for name in names]
    try:
        tensors, report = dump(
            model, workdir / "hostile.safetensors", "netloader",
            {"SOURCE": [{"device_id": 0, "sources": [*(a for a, _ in fakes), address]}],
             "TIMEOUT": 5},
        )
    finally:
        for _, server in fakes:
            server.close()
    (info,) = report["seeds"]
    assert info["loaded_from"] == f"seed {address}"
    assert len(info["fallback_reasons"]) == len(names), info["fallback_reasons"]
    assert_equal_tensors(tensors, disk_tensors)
