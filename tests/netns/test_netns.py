"""tools/netns.py: the benchmark topology connects its nodes, leaves nothing behind,
and never touches a namespace it did not create. Needs root, ``ip`` and ``tc``."""

import os
import shutil
import subprocess
import sys

import pytest

from tools.netns import NetnsError, Topology, existing_namespaces

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="network namespaces need root and iproute2",
)

ECHO = """
import socket, sys
with socket.create_server((sys.argv[1], 0)) as srv:
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    with conn:
        conn.sendall(conn.recv(64))
"""


def test_nodes_reach_each_other_and_teardown_removes_everything() -> None:
    before = set(existing_namespaces())
    with Topology(["a", "b"], rate_mbit=100) as net:
        names = {net.namespace(n) for n in ("hub", "a", "b")}
        assert names <= set(existing_namespaces())
        server = net.popen("b", [sys.executable, "-c", ECHO, net.address("b")],
                           stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        client = net.popen("a", [sys.executable, "-c", (
            "import socket, sys\n"
            "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n"
            "c.sendall(b'ping'); print(c.recv(64).decode())"
        ), net.address("b"), port], stdout=subprocess.PIPE, text=True)
        assert client.communicate(timeout=30)[0].strip() == "ping"
        # One that never exits: teardown has to end it.
        net.popen("a", [sys.executable, "-c", "import time; time.sleep(600)"])
    assert set(existing_namespaces()) == before


def test_refuses_a_namespace_it_did_not_create() -> None:
    tag = f"nlb{os.getpid()}x"
    theirs = f"{tag}-a"
    subprocess.run(["ip", "netns", "add", theirs], check=True)
    try:
        with pytest.raises(NetnsError, match="already exist"), Topology(["a"], None, tag=tag):
            pass
        assert theirs in existing_namespaces()
        assert f"{tag}-hub" not in existing_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", theirs], check=True)
