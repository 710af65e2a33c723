"""Network namespaces joined by rate-limited links, so that in a benchmark the
network, not the CPU, is the bottleneck. Needs root and iproute2 (``ip``, ``tc``).

    with Topology(["seed", "c0", "c1"], rate_mbit=300) as net:
        net.address("seed")                         # "10.77.0.1"
        proc = net.popen("c0", [sys.executable, "-c", "print(1)"])

Shape: a hub namespace holds a bridge; each node is a namespace with one interface,
``eth0``, whose veth peer is a port of the bridge. Both directions of every link are
shaped with tbf (the node's egress on ``eth0``, its ingress on the hub's port), so each
node has a full-duplex link of ``rate_mbit``: a seed sending to N clients at once
shares its one uplink, as a host shares its NIC.

Nothing is created in the caller's namespace: each veth pair is made inside the hub
with its peer moved straight into the node's namespace, so deleting the namespaces
removes every link. Names carry a per-run tag (``nlb<pid>-<node>``); a run refuses to
start if any of its names exists, and teardown deletes only the namespaces it created,
after ending the processes started in them. ``python tools/netns.py cleanup`` deletes
what a killed run left behind (namespaces whose tagged pid is gone).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

PREFIX = "nlb"
HUB = "hub"
SUBNET = "10.77.0"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed, or the topology would touch something not ours."""


def _ip(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def existing_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("ip", "netns", "list").splitlines() if line.strip()]


class Topology:
    """A star of ``nodes`` around a bridge, every link shaped to ``rate_mbit``
    (``None``: unshaped veth, as fast as the CPUs move bytes)."""

    def __init__(
        self,
        nodes: Sequence[str],
        rate_mbit: float | None,
        queue_ms: float = 20.0,
        tag: str | None = None,
        hosts: dict[str, Sequence[str]] | None = None,
    ):
        if len(set(nodes)) != len(nodes) or not 0 < len(nodes) < 250:
            raise ValueError(f"need 1..249 distinct node names, got {list(nodes)}")
        for node in (*nodes, HUB):
            if not re.fullmatch(r"[a-z0-9]+", node):
                raise ValueError(f"node names are lowercase letters and digits: {node!r}")
        if HUB in nodes:
            raise ValueError(f"{HUB!r} is the bridge's namespace, not a node name")
        self.nodes = list(nodes)
        self.rate_mbit = rate_mbit
        self.queue_ms = queue_ms
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        # Host names every node resolves (name -> the nodes it resolves to), through an
        # /etc/netns/<namespace>/hosts file that `ip netns exec` mounts over /etc/hosts.
        self.hosts = {name: list(members) for name, members in (hosts or {}).items()}
        for name, members in self.hosts.items():
            unknown = sorted(set(members) - set(nodes))
            if unknown or not re.fullmatch(r"[a-z0-9.-]+", name):
                raise ValueError(f"host name {name!r} must resolve to nodes, not {unknown}")
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def namespace(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def address(self, node: str) -> str:
        return f"{SUBNET}.{self.nodes.index(node) + 1}"

    def __enter__(self) -> Topology:
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def create(self) -> None:
        names = [self.namespace(n) for n in (HUB, *self.nodes)]
        clash = sorted(set(names) & set(existing_namespaces()))
        if clash:
            raise NetnsError(f"namespaces already exist (not ours, left alone): {clash}")
        hub = self._add_namespace(HUB)
        _ip("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("ip", "-n", hub, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            ns = self._add_namespace(node)
            port = f"p{i}"
            _ip("ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("ip", "-n", hub, "link", "set", port, "master", "br0")
            _ip("ip", "-n", hub, "link", "set", port, "up")
            _ip("ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _ip("ip", "-n", ns, "link", "set", "eth0", "up")
            if self.rate_mbit is not None:
                self._shape(ns, "eth0")
                self._shape(hub, port)

    def _add_namespace(self, node: str) -> str:
        ns = self.namespace(node)
        _ip("ip", "netns", "add", ns)
        self._created.append(ns)
        _ip("ip", "-n", ns, "link", "set", "lo", "up")
        if self.hosts and node != HUB:
            os.makedirs(_etc(ns), exist_ok=True)
            lines = ["127.0.0.1 localhost", "::1 localhost"]
            lines += [f"{self.address(m)} {name}" for name, ms in self.hosts.items() for m in ms]
            with open(os.path.join(_etc(ns), "hosts"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return ns

    def _shape(self, ns: str, dev: str) -> None:
        assert self.rate_mbit is not None
        rate_bytes = self.rate_mbit * 1e6 / 8
        # At least one 64 KiB GSO segment per burst, and 2 ms worth of bytes, so the
        # token bucket does not add its own stalls at this rate.
        burst = max(128 * 1024, int(rate_bytes * 0.002))
        _ip("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{self.rate_mbit}mbit", "burst", str(burst),
            "latency", f"{self.queue_ms}ms")

    def popen(self, node: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``node``'s namespace; teardown ends it if still running."""
        if self.namespace(node) not in self._created:
            raise NetnsError(f"no namespace for node {node!r}")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(node), *cmd], start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def link_stats(self) -> dict[str, dict[str, int]]:
        """Bytes sent and packets dropped by each node's uplink shaper."""
        stats = {}
        for node in self.nodes:
            out = _ip("tc", "-n", self.namespace(node), "-s", "qdisc", "show", "dev", "eth0")
            sent = re.search(r"Sent (\d+) bytes \d+ pkt \(dropped (\d+)", out)
            if sent:
                stats[node] = {"sent_bytes": int(sent[1]), "dropped": int(sent[2])}
        return stats

    def teardown(self) -> None:
        """End the processes started here, then delete the namespaces created here."""
        for proc in self._procs:
            _end(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            _end_pids_in(ns)
            try:
                _ip("ip", "netns", "del", ns)
            except NetnsError as e:
                print(f"netns: could not delete {ns}: {e}", file=sys.stderr)
            shutil.rmtree(_etc(ns), ignore_errors=True)
        self._created.clear()


def _etc(ns: str) -> str:
    """The folder whose files `ip netns exec` mounts over /etc in namespace ``ns``."""
    return os.path.join("/etc/netns", ns)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a ``with Topology(...)`` block still tears
    down when its process is terminated (SIGKILL leaves work for ``cleanup``)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _end(proc: subprocess.Popen[Any]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            _close(stream)


def _close(stream: IO[Any]) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _end_pids_in(ns: str) -> None:
    """Kill what still runs in one of our namespaces (descendants of our processes)."""
    try:
        pids = [int(p) for p in _ip("ip", "netns", "pids", ns).split()]
    except NetnsError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        time.sleep(0.05)


def stale_namespaces() -> list[str]:
    """Our namespaces whose creating process is gone."""
    stale = []
    for ns in existing_namespaces():
        match = _NAME.match(ns)
        if match and not os.path.exists(f"/proc/{match[1]}"):
            stale.append(ns)
    return stale


def main(argv: list[str]) -> int:
    if argv[1:] == ["list"]:
        print("\n".join(ns for ns in existing_namespaces() if _NAME.match(ns)))
        return 0
    if argv[1:] == ["cleanup"]:
        for ns in stale_namespaces():
            _end_pids_in(ns)
            _ip("ip", "netns", "del", ns)
            shutil.rmtree(_etc(ns), ignore_errors=True)
            print(f"deleted {ns}")
        return 0
    print(f"usage: {argv[0]} list|cleanup", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
