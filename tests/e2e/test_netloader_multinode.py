"""Instances that span hosts: a TP=2 seed instance over two hosts and a TP=2 client
instance over two others, each launched as vLLM's multi-node launch does it
(``--nnodes 2 --node-rank 0|1 --master-addr``, multiprocessing executor, the second
node ``--headless``), every host a network namespace with its own address.

Each rank's seed listens on its own host's address (VLLM_HOST_IP) and writes it to its
own file; each client rank loads from the matching seed rank; both instances give the
same outputs. vLLM CPU refuses Ray, so this is the only multi-node launch it runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.e2e import REPO, SERVER_ARGS, address_of
from tools.netns import Topology
from tools.vllm_server import BASE_ENV

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2",
    ),
]

API_PORT = 8000
MASTER_PORT = 29501
LISTEN_PORT = 47000
STARTUP_S = 600


class TwoHostInstance:
    """One TP=2 vLLM instance: node rank 0 (API server) on ``nodes[0]``, node rank 1
    (headless) on ``nodes[1]``."""

    def __init__(self, net: Topology, name: str, nodes: tuple[str, str], model: str,
                 extra: dict, logdir: Path):
        self.net, self.name, self.nodes, self.model = net, name, nodes, model
        self.extra, self.logdir = extra, logdir
        self.head = net.address(nodes[0])
        self.url = f"http://{self.head}:{API_PORT}"

    def start(self) -> None:
        common = [
            "--model", self.model, "--tensor-parallel-size", "2", "--nnodes", "2",
            "--master-addr", self.head, "--master-port", str(MASTER_PORT),
            "--load-format", "netloader", "--model-loader-extra-config", json.dumps(self.extra),
            "--max-model-len", "512", "--enforce-eager", *SERVER_ARGS,
        ]
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common,
                "--node-rank", "0", "--host", self.head, "--port", str(API_PORT)]
        other = [sys.executable, "-m", "tools.vllm_headless", *common, "--node-rank", "1"]
        for core, (node, cmd) in enumerate(zip(self.nodes, (head, other), strict=True)):
            env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(REPO),
                   "VLLM_HOST_IP": self.net.address(node), "VLLM_CPU_OMP_THREADS_BIND": str(core),
                   # vLLM's own gloo group: without it gloo binds the address the host
                   # name resolves to (127.0.0.1 here), which the other host cannot reach.
                   "GLOO_SOCKET_IFNAME": "eth0"}
            env.pop("NETLOADER_METRICS_DIR", None)
            log = open(self.logdir / f"{self.name}-{node}.log", "ab")  # noqa: SIM115 - the child owns it
            self.net.popen(node, cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
            log.close()

    def log_tail(self) -> str:
        return "\n".join(
            (self.logdir / f"{self.name}-{n}.log").read_text(errors="replace")[-3000:]
            for n in self.nodes
        )


def probe(net: Topology, node: str, *args: str, timeout_s: float = 300) -> object:
    proc = net.popen(node, [sys.executable, "-m", "tests.helpers.netns_probe", *args], cwd=REPO,
                     env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                     text=True)
    out, _ = proc.communicate(timeout=timeout_s + 60)
    return json.loads(out.strip().splitlines()[-1])


def wait_healthy(net: Topology, instance: TwoHostInstance) -> None:
    ready = probe(net, instance.nodes[0], "wait", instance.url, str(STARTUP_S),
                  timeout_s=STARTUP_S)
    assert ready is True, f"{instance.name} not healthy:\n{instance.log_tail()}"


def test_a_two_host_client_loads_each_rank_from_the_matching_two_host_seed(model, workdir):
    with Topology(["s0", "s1", "c0", "c1"], rate_mbit=None) as net:
        seed_prefix = workdir / "mn-seed-"
        seed = TwoHostInstance(net, "mn-seed", ("s0", "s1"), model, {
            "OUTPUT_PREFIX": str(seed_prefix), "LISTEN_PORT": LISTEN_PORT,
        }, workdir)
        seed.start()
        wait_healthy(net, seed)
        # Each rank's seed listens, and wrote its address, on its own host.
        seeds = [address_of(seed_prefix, rank) for rank in (0, 1)]
        assert seeds == [f"{net.address('s0')}:{LISTEN_PORT}",
                         f"{net.address('s1')}:{LISTEN_PORT + 1}"]

        client_prefix = workdir / "mn-client-"
        client = TwoHostInstance(net, "mn-client", ("c0", "c1"), model, {
            "OUTPUT_PREFIX": str(client_prefix),
            "SOURCE": [{"device_id": rank, "sources": [seeds[rank]]} for rank in (0, 1)],
        }, workdir)
        client.start()
        wait_healthy(net, client)
        clients = [address_of(client_prefix, rank) for rank in (0, 1)]
        assert [c.rsplit(":", 1)[0] for c in clients] == [net.address("c0"), net.address("c1")]

        infos = probe(net, "c0", "info", *clients, *seeds)
        assert isinstance(infos, list)
        client_infos, seed_infos = infos[:2], infos[2:]
        for rank, info in enumerate(client_infos):
            assert info["loaded_from"] == f"seed {seeds[rank]}", client.log_tail()
            assert info["fallback_reasons"] == []
            assert info["identity"]["rank"] == rank
            assert info["identity"]["tensor_parallel_size"] == 2
            assert info["value_fingerprint"] == seed_infos[rank]["value_fingerprint"]
        assert [i["completed_transfers"] for i in seed_infos] == [1, 1]
        assert seed_infos[0]["value_fingerprint"] != seed_infos[1]["value_fingerprint"]

        assert probe(net, "c0", "greedy", client.url, model) == probe(
            net, "c0", "greedy", seed.url, model
        )
