"""Session fixtures: one tiny model, one netloader seed from disk, and the `auto`
reference outputs every instance is compared with. Every e2e module shares the seed,
so the faults some modules inflict on it are followed by checks that it still serves
correctly."""

import os
from pathlib import Path

import pytest

from tests.helpers.e2e import (
    SERVER_ARGS,
    address_of,
    dump,
    greedy,
    netloader_server,
    start_all,
)
from tools.make_tiny_model import main as make_tiny_model
from tools.vllm_server import VllmServer

SEED_TIMEOUT_S = 10

@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("netloader-e2e")


@pytest.fixture(scope="session")
def model(workdir) -> str:
    given = os.environ.get("NETLOADER_TEST_MODEL")
    if given:
        return given
    path = workdir / "tiny-qwen2"
    make_tiny_model([str(path)])
    return str(path)


@pytest.fixture(scope="session")
def seed(model, workdir):
    """A netloader seed (from disk) and the `auto` disk-load reference outputs."""
    # A short TIMEOUT: the fault tests wait for the seed to give up on silent clients.
    # Dev mode: test_netloader_reload.py reloads its weights through /collective_rpc.
    seed = netloader_server(model, workdir, "seed", "0", keys={"TIMEOUT": SEED_TIMEOUT_S},
                            env={"VLLM_SERVER_DEV_MODE": "1"})
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


@pytest.fixture(scope="session")
def disk_tensors(model, workdir):
    """Every runtime tensor of an in-process disk load (`auto`), to compare clients with."""
    tensors, _ = dump(model, workdir / "disk.safetensors", "auto", {})
    return tensors
