"""Shared storage: N new instances start together, each downloading the checkpoint from
one HTTP file server and then loading it; how long until all N have it in memory. The
operator's alternative to a Netloader seed (``benchmarks.netloader_fanout``).

    python -m benchmarks.netloader_storage [--clients 1,2,4,8] [--gb 0.25] [--rate-mbit 300]
                                           [--shard-mb 128] [--tcp-mb 32] [--repeat 1]

Needs root. The same topology and links as the fan-out benchmark (tools/netns.py): the
storage server in one namespace (``store``), client i in another, every link shaped to
``--rate-mbit`` both ways (0: unshaped). The checkpoint is the fan-out seed's synthetic
model (``--gb`` of 16 MB bf16 tensors, the same bytes), written as HuggingFace-style
safetensors shards of at most ``--shard-mb`` plus their index, into ``--workdir``.

The server is the standard library's threading HTTP file server (``python -m
http.server``). Each client (role ``downloader``) GETs every file of the checkpoint with
``requests``, streamed to its own folder on disk, then loads every shard with
``safetensors.torch.load_file`` and copies each tensor into its model (built and
touched before the clock starts, as the fan-out client's, and as a starting vLLM has
built its model before loading). Nothing is verified beyond HTTP's Content-Length
(Netloader checks a blake3 digest of every bucket). All N start at once; ``storage_s``
is the time until the last one has loaded, ``download_s`` until the last one has
downloaded.

The baseline is raw TCP from the server's namespace: ``--tcp-mb`` to each of N sinks
at once (``tcp_fanout_s``), what the server's uplink allows with no HTTP or disk.

CPU: each process's user plus system seconds over each timed round, per GB delivered
to the clients (N times the checkpoint): ``cpu_s_per_gb`` for the server and for all
clients together (also split into ``clients_download`` and ``clients_load``), and
``tcp_cpu_s_per_gb`` for the raw TCP sender and receivers. Prints one JSON object last.
"""

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.netloader_fanout import cpu_per_gb, require_root, scale_out_fields, tcp_rounds
from benchmarks.netns_roles import TENSOR_MB, Child
from tools.netns import Topology, exit_on_sigterm


def write_checkpoint(folder: Path, gb: float, tensor_mb: float, shard_mb: float) -> list[str]:
    """The fan-out seed's synthetic model (``gb`` GB of ``tensor_mb`` MB tensors, random
    bits) as safetensors shards of at most ``shard_mb`` MB (at least one tensor each) and
    a ``model.safetensors.index.json``; replaces ``folder``'s ``model*`` files. Returns
    the file names, index first. Raises OSError if the folder cannot be written."""
    from safetensors.torch import save_file

    from benchmarks.netloader_transfer import synthetic_model

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model*"):
        old.unlink()
    tensors = dict(synthetic_model(gb, tensor_mb, fill=True).named_parameters())
    shards: list[dict[str, Any]] = [{}]
    for name, t in tensors.items():
        size = sum(x.nbytes for x in shards[-1].values())
        if shards[-1] and size + t.nbytes > shard_mb * (1 << 20):
            shards.append({})
        shards[-1][name] = t.detach()
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, file in zip(shards, files, strict=True):
        save_file(shard, str(folder / file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: f for shard, f in zip(shards, files, strict=True) for n in shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return ["model.safetensors.index.json", *files]


def download_together(
    store: Child, clients: list[Child], base: str, files: list[str], timeout: float
) -> dict[str, Any]:
    """Start every client's download at once; time until the last one has loaded (and
    downloaded), with the server's and the clients' CPU seconds. Raises RuntimeError
    naming each failed client's reason, TimeoutError after ``timeout`` seconds."""
    cpu0 = store.cpu_seconds()
    start = time.monotonic()
    for child in clients:
        child.send(cmd="download", base=base, files=files)
    results = [child.recv(timeout) for child in clients]
    server_cpu = store.cpu_seconds() - cpu0
    failed = [r["reason"] for r in results if not r["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(clients)} downloads failed: {failed}")
    return {
        "seconds": max(r["end"] for r in results) - start,
        "download_s": max(r["downloaded"] for r in results) - start,
        "per_client_s": [round(r["end"] - r["start"], 3) for r in results],
        "load_s": [round(r["end"] - r["downloaded"], 3) for r in results],
        "bytes": results[0]["bytes"],
        "tensor_bytes": results[0]["tensor_bytes"],
        "server_cpu_s": server_cpu,
        "clients_cpu_s": sum(r["download_cpu_s"] + r["load_cpu_s"] for r in results),
        "clients_download_cpu_s": sum(r["download_cpu_s"] for r in results),
        "clients_load_cpu_s": sum(r["load_cpu_s"] for r in results),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    counts = sorted({int(n) for n in args.clients.split(",")})
    rate = args.rate_mbit or None
    names = [f"c{i}" for i in range(max(counts))]
    workdir = Path(args.workdir).resolve()
    files = write_checkpoint(workdir / "checkpoint", args.gb, args.tensor_mb, args.shard_mb)
    # Generous: the largest N's copies at a tenth of the link rate, plus start-up.
    slowest_s = max(counts) * args.gb * 1e9 * 8 / ((rate or 8000) * 1e6 * 0.1)
    with Topology(["store", *names], rate) as net:
        def child(node: str, role: str, extra: list[str]) -> Child:
            log = workdir / f"{node}-{role}.log"
            log.unlink(missing_ok=True)
            return Child(functools.partial(net.popen, node), role, extra, log)

        store = child("store", "http-store", ["--host", net.address("store"),
                                              "--directory", str(workdir / "checkpoint")])
        model = ["--gb", str(args.gb), "--tensor-mb", str(args.tensor_mb)]
        clients = [child(n, "downloader", ["--dest", str(workdir / f"{n}-download"), *model])
                   for n in names]
        sinks = [child(n, "tcp-sink", ["--host", net.address(n)]) for n in names]
        source = child("store", "tcp-source", [])
        try:
            base = f"http://{net.address('store')}:{store.recv(60)['port']}/"
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
                    runs[n].append(download_together(store, clients[:n], base, files,
                                                     slowest_s + 120))
                    print(f"storage N={n}: {runs[n][-1]['seconds']:.2f} s "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
            link_stats = net.link_stats() if rate else {}
        finally:
            for c in (store, *clients, *sinks, source):
                c.quit()
    out = summarize(args, counts, rate, tcp, tcp_bytes, runs, link_stats)
    out["tcp_cpu_s_per_gb"] = tcp_cpu
    return out


def summarize(
    args: argparse.Namespace, counts: list[int], rate: float | None, tcp: dict[int, float],
    tcp_bytes: int, runs: dict[int, list[dict[str, Any]]], link_stats: dict[str, Any],
) -> dict[str, Any]:
    nbytes = runs[counts[0]][0]["bytes"]
    total = {n: statistics.median(r["seconds"] for r in runs[n]) for n in counts}
    middle = {n: runs[n][len(runs[n]) // 2] for n in counts}
    one = counts[0]
    out: dict[str, Any] = {
        "server": "python http.server (ThreadingHTTPServer), requests, safetensors load_file",
        "rate_mbit": rate,
        "bytes": nbytes,
        "tensor_bytes": runs[one][0]["tensor_bytes"],
        "shard_mb": args.shard_mb,
        "clients": counts,
        "storage_s": {str(n): round(s, 3) for n, s in total.items()},
        "download_s": {str(n): round(statistics.median(r["download_s"] for r in runs[n]), 3)
                       for n in counts},
        "per_client_s": {str(n): middle[n]["per_client_s"] for n in counts},
        "load_s": {str(n): middle[n]["load_s"] for n in counts},
        "cpu_s_per_gb": {str(n): cpu_per_gb(runs[n], n, nbytes, {
            "server": "server_cpu_s", "clients": "clients_cpu_s",
            "clients_download": "clients_download_cpu_s",
            "clients_load": "clients_load_cpu_s"}) for n in counts},
        **scale_out_fields("storage", total, nbytes, tcp, tcp_bytes, link_stats, args.repeat),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--gb", type=float, default=0.25)
    parser.add_argument("--tensor-mb", type=float, default=TENSOR_MB)
    parser.add_argument("--shard-mb", type=float, default=128.0)
    parser.add_argument("--rate-mbit", type=float, default=300.0)
    parser.add_argument("--tcp-mb", type=float, default=32.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", default=".bench/storage")
    args = parser.parse_args()
    require_root()
    exit_on_sigterm()
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
