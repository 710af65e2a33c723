"""DNS discovery across hosts: one name that resolves to two seed hosts (network
namespaces, the name in each one's hosts file, as a Kubernetes headless Service
resolves to its pods), each seed on the same port, as pods of one Deployment are."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.netns import Topology
from vllm_ascend.model_loader.netloader.fleet.dns import spread

REPO = Path(__file__).resolve().parents[2]
NAME = "seeds.netloader.test"
PORT = 41000
PEER = [sys.executable, "-m", "tests.helpers.netns_peer"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2",
)


def dns_client(net: Topology, key: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = net.popen("client", [*PEER, "dns-client", f"{NAME}:{PORT}", "11", key], cwd=REPO,
                     env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def test_a_name_of_two_hosts_spreads_clients_and_outlives_one_seed():
    with Topology(["s1", "s2", "client"], rate_mbit=None, hosts={NAME: ["s1", "s2"]}) as net:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        seeds = {
            node: net.popen(node, [*PEER, "seed", net.address(node), "11", "tcp", str(PORT)],
                            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
            for node in ("s1", "s2")
        }
        addresses = {}
        for node, proc in seeds.items():
            assert proc.stdout is not None
            addresses[node] = proc.stdout.readline().strip()
            assert addresses[node] == f"{net.address(node)}:{PORT}"
        both = sorted(addresses.values())
        # Two instances whose rendezvous order puts a different seed first.
        keys = {spread(both, f"instance-{i}")[0]: f"instance-{i}" for i in range(20)}
        assert set(keys) == set(both)
        for first, key in keys.items():
            result = dns_client(net, key)
            assert sorted(result["candidates"]) == both and result["notes"] == []
            assert result["candidates"][0] == first
            assert result["source"] == first and result["equal"], result["reasons"]
        # s1's seed goes away: its clients go on to s2.
        s1 = seeds["s1"]
        assert s1.stdin is not None
        s1.stdin.close()
        s1.wait(30)
        result = dns_client(net, keys[addresses["s1"]])
        assert result["source"] == addresses["s2"] and result["equal"]
        (reason,) = result["reasons"]
        assert reason.startswith(f"{addresses['s1']} failed: ConnectionRefusedError")
