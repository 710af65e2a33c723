"""Seed and client on two hosts: separate network namespaces joined by a bridge, where
the machine's hostname resolves to nothing the other side can reach."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.netns import Topology

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="network namespaces need root and iproute2",
)


@pytest.mark.parametrize("plane", ["tcp", "collective"])
def test_transfer_between_namespaces_needs_no_interface_setting(plane):
    # Without GLOO_SOCKET_IFNAME, gloo used to bind the address of the hostname
    # (127.0.0.1 here), which the other namespace cannot reach.
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    env["PYTHONPATH"] = str(REPO)
    peer = [sys.executable, "-m", "tests.helpers.netns_peer"]
    with Topology(["seed", "client"], rate_mbit=None) as net:
        seed = net.popen(
            "seed", [*peer, "seed", net.address("seed"), "11", plane], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert seed.stdout is not None and seed.stdin is not None
        address = seed.stdout.readline().strip()
        assert address == f"{net.address('seed')}:{address.rsplit(':', 1)[1]}"
        client = net.popen(
            "client", [*peer, "client", address, "11", plane], cwd=REPO, env=env,
            stdout=subprocess.PIPE, text=True,
        )
        out, _ = client.communicate(timeout=120)
        seed.stdin.close()
        seed.wait(30)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["received"], result["reasons"]
    assert result["equal"]
