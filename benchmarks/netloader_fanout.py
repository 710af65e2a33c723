"""Fan-out: N clients start fetching one seed's model together; how long until all N
have received and verified it, with the links (not the CPUs) as the bottleneck.

    python -m benchmarks.netloader_fanout [--clients 1,2,4,8] [--gb 0.25] [--rate-mbit 300]
                                          [--mode relay] [--bucket-mb 16] [--tcp-mb 64]
                                          [--fanout 1] [--repeat 1]

Needs root: every process runs in a network namespace of its own (tools/netns.py), the
seed in one and client i in another, every link shaped to ``--rate-mbit`` both ways
(0: unshaped). The baseline is raw TCP on the same links: the seed's namespace streams
``--tcp-mb`` to each of N sinks at once, which is what the links allow with no
Netloader in the way.

Every client names only the seed as its source. ``--mode relay``: each client offers a
relay (RELAY, the default of the loader), so the seed sends to the first and chains
the others to the client before them, each passing on verified buckets while it still
receives. ``--mode direct``: no relays, the seed's uplink carries N copies and the time
grows about N-fold. ``--bucket-mb`` is the seed's and the relays' bucket: a chain adds
about one bucket's time on the link per hop. ``--fanout`` is RELAY_FANOUT of the seed
and the relays: 1 a chain, k a tree (each sender's uplink split k ways, depth log_k N).

CPU: each process's user plus system seconds over each timed round (psutil), per GB
delivered to the clients (N times the model): ``cpu_s_per_gb`` for the seed and for
all clients together (a relay's sending counts to its client), ``tcp_cpu_s_per_gb``
for the raw TCP sender and receivers over every round. Prints one JSON object last.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.netns_roles import Child
from tools.netns import Topology, exit_on_sigterm

# The client role's flags per mode.
MODES = {"direct": [], "relay": ["--relay"]}


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("this benchmark creates network namespaces: run it as root")


def fetch_together(
    seed: Child, clients: list[Child], plans: list[list[str]], timeout: float
) -> dict[str, Any]:
    """Start every client's fetch at once; time until the last one has verified, and
    the CPU seconds the seed and the clients (summed) used meanwhile."""
    cpu0 = [c.cpu_seconds() for c in (seed, *clients)]
    start = time.monotonic()
    for child, sources in zip(clients, plans, strict=True):
        child.send(cmd="fetch", sources=sources)
    results = [child.recv(timeout) for child in clients]
    cpu = [c.cpu_seconds() - c0 for c, c0 in zip((seed, *clients), cpu0, strict=True)]
    failed = [r["reasons"] for r in results if not r["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(clients)} clients failed: {failed}")
    return {
        "seconds": max(r["end"] for r in results) - start,
        "per_client_s": [round(r["end"] - r["start"], 3) for r in results],
        "bytes": [r["bytes"] for r in results],
        "sources": [r["source"] for r in results],
        "seed_cpu_s": cpu[0],
        "clients_cpu_s": sum(cpu[1:]),
    }


def tcp_together(
    source: Child, sinks: list[Child], addresses: list[str], nbytes: int, timeout: float
) -> dict[str, float]:
    """Raw TCP from ``source``'s namespace, ``nbytes`` to every sink at once.

    Returns ``seconds`` until the last byte of the last stream arrived, and the CPU
    seconds of the sender (``sender_cpu_s``) and of all sinks (``receiver_cpu_s``).
    Raises TimeoutError or RuntimeError (with the role's log) if a role does not answer
    within ``timeout`` seconds."""
    cpu0 = [c.cpu_seconds() for c in (source, *sinks)]
    for sink in sinks:
        sink.send(cmd="accept")
    sent = source.ask(timeout, cmd="send", to=addresses, bytes=nbytes)
    ends = [sink.recv(timeout)["end"] for sink in sinks]
    cpu = [c.cpu_seconds() - c0 for c, c0 in zip((source, *sinks), cpu0, strict=True)]
    return {"seconds": float(max(ends) - sent["start"]), "sender_cpu_s": cpu[0],
            "receiver_cpu_s": sum(cpu[1:])}


def tcp_rounds(
    source: Child, sinks: list[Child], addresses: list[str], counts: list[int], nbytes: int,
    repeat: int, timeout: float,
) -> tuple[dict[int, float], dict[str, float]]:
    """``tcp_together`` to the first N sinks for each N in ``counts``, ``repeat`` times:
    the median seconds per N, and the sender's and the receivers' CPU seconds per GB
    delivered over all rounds (``{"sender": s, "receiver": s}``)."""
    runs = {n: [tcp_together(source, sinks[:n], addresses[:n], nbytes, timeout)
                for _ in range(repeat)] for n in counts}
    gb = sum(n * nbytes for n in counts) * repeat / 1e9
    per_gb = {side: round(sum(r[f"{side}_cpu_s"] for rs in runs.values() for r in rs) / gb, 3)
              for side in ("sender", "receiver")}
    return {n: statistics.median(r["seconds"] for r in rs) for n, rs in runs.items()}, per_gb


def measure(args: argparse.Namespace) -> dict[str, Any]:
    counts = sorted({int(n) for n in args.clients.split(",")})
    rate = args.rate_mbit or None
    names = [f"c{i}" for i in range(max(counts))]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = ["--gb", str(args.gb), "--tensor-mb", str(args.tensor_mb)]
    # Generous: the slowest plan at a tenth of the link rate, plus start-up.
    slowest_s = max(counts) * args.gb * 1e9 * 8 / ((rate or 8000) * 1e6 * 0.1)
    with Topology(["seed", *names], rate) as net:
        def child(node: str, role: str, extra: list[str]) -> Child:
            log = workdir / f"{node}-{role}.log"
            log.unlink(missing_ok=True)
            return Child(functools.partial(net.popen, node), role, extra, log)

        seed_addr = net.address("seed")
        bucket = str(args.bucket_mb)
        fanout = ["--fanout", str(args.fanout)]
        seed = child("seed", "seed", ["--host", seed_addr, "--servers", f"none:{bucket}",
                                      *fanout, *model])
        clients = [child(n, "client", ["--host", net.address(n), "--bucket-mb", bucket,
                                       *fanout, *MODES[args.mode], *model]) for n in names]
        sinks = [child(n, "tcp-sink", ["--host", net.address(n)]) for n in names]
        source = child("seed", "tcp-source", [])
        everyone = [seed, *clients, *sinks, source]
        try:
            address = seed.recv(600)["addresses"][0]
            for c in clients:
                c.recv(600)
            sink_addrs = [f"{net.address(n)}:{s.recv(60)['port']}" for n, s in zip(
                names, sinks, strict=True)]
            tcp_bytes = int(args.tcp_mb * 1e6)
            tcp, tcp_cpu = tcp_rounds(source, sinks, sink_addrs, counts, tcp_bytes,
                                      args.repeat, slowest_s)
            runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
            for _ in range(args.repeat):
                for n in counts:
                    plans = [[address]] * n
                    runs[n].append(fetch_together(seed, clients[:n], plans, slowest_s + 120))
                    print(f"fanout {args.mode} N={n}: {runs[n][-1]['seconds']:.2f} s "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
            link_stats = net.link_stats() if rate else {}
        finally:
            for c in everyone:
                c.quit()
    out = summarize(args, counts, rate, tcp, tcp_bytes, runs, link_stats)
    out["tcp_cpu_s_per_gb"] = tcp_cpu
    return out


def cpu_per_gb(rounds: list[dict[str, Any]], n: int, nbytes: int, keys: dict[str, str]
               ) -> dict[str, float]:
    """CPU seconds per GB delivered (``n * nbytes`` per round) over ``rounds``, for each
    output name in ``keys`` (output name -> the rounds' CPU-seconds key)."""
    gb = n * nbytes * len(rounds) / 1e9
    return {name: round(sum(r[key] for r in rounds) / gb, 3) for name, key in keys.items()}


def summarize(
    args: argparse.Namespace, counts: list[int], rate: float | None, tcp: dict[int, float],
    tcp_bytes: int, runs: dict[int, list[dict[str, Any]]], link_stats: dict[str, Any],
) -> dict[str, Any]:
    nbytes = runs[counts[0]][0]["bytes"][0]
    fanout = {n: statistics.median(r["seconds"] for r in runs[n]) for n in counts}
    one = counts[0]
    out: dict[str, Any] = {
        "mode": args.mode,
        "bucket_mb": args.bucket_mb,
        "relay_fanout": args.fanout,
        "rate_mbit": rate,
        "bytes": nbytes,
        "clients": counts,
        "fanout_s": {str(n): round(s, 3) for n, s in fanout.items()},
        "per_client_s": {str(n): runs[n][len(runs[n]) // 2]["per_client_s"] for n in counts},
        "sources": {str(n): runs[n][len(runs[n]) // 2]["sources"] for n in counts},
        "netloader_mbit": round(nbytes * 8 / fanout[one] / 1e6, 1),
        "cpu_s_per_gb": {str(n): cpu_per_gb(runs[n], n, nbytes, {
            "seed": "seed_cpu_s", "clients": "clients_cpu_s"}) for n in counts},
        **scale_out_fields("fanout", fanout, nbytes, tcp, tcp_bytes, link_stats, args.repeat),
    }
    return out


def scale_out_fields(
    name: str, seconds: dict[int, float], nbytes: int, tcp: dict[int, float], tcp_bytes: int,
    link_stats: dict[str, Any], repeat: int,
) -> dict[str, Any]:
    """What every scale-out benchmark reports beside its own figures: ``seconds[n]``
    until all ``n`` instances held ``nbytes`` each, as an aggregate rate (Mbit/s) and as
    ``<name>_<n>_over_<first n>``; the raw TCP rounds (``tcp[n]`` seconds for
    ``tcp_bytes`` to each of ``n`` sinks) the same way; the links' counters."""
    one = min(seconds)
    out: dict[str, Any] = {
        "aggregate_mbit": {str(n): round(n * nbytes * 8 / s / 1e6, 1)
                           for n, s in seconds.items()},
        "tcp_bytes_per_client": tcp_bytes,
        "tcp_fanout_s": {str(n): round(s, 3) for n, s in tcp.items()},
        "tcp_link_mbit": round(tcp_bytes * 8 / tcp[one] / 1e6, 1),
        "link_stats": link_stats,
        "repeat": repeat,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for n in seconds:
        if n != one:
            out[f"{name}_{n}_over_{one}"] = round(seconds[n] / seconds[one], 3)
            out[f"tcp_{n}_over_{one}"] = round(tcp[n] / tcp[one], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--gb", type=float, default=0.25)
    parser.add_argument("--tensor-mb", type=float, default=16.0)
    parser.add_argument("--rate-mbit", type=float, default=300.0)
    parser.add_argument("--mode", choices=sorted(MODES), default="relay")
    parser.add_argument("--bucket-mb", type=float, default=16.0)
    parser.add_argument("--tcp-mb", type=float, default=64.0)
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", default=".bench/fanout")
    args = parser.parse_args()
    require_root()
    exit_on_sigterm()
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
