"""Netloader transfer throughput against raw loopback TCP, in one run.

    python -m benchmarks.netloader_transfer [--gb 1.0] [--tensor-mb 64]

A seed process serves a synthetic bf16 model of ``--gb`` gigabytes; this process
receives it the way a starting instance does (handshake, gloo group, staging,
per-tensor blake3 check). The baseline streams the same number of bytes over one
loopback TCP connection between two processes. Prints one JSON object last.
"""

import argparse
import json
import multiprocessing as mp
import socket
import time
from typing import Any

import torch
from torch import nn

IDENTITY = {"model": "bench", "rank": 0, "tensor_parallel_size": 1, "pipeline_parallel_size": 1}


def synthetic_model(gb: float, tensor_mb: int) -> nn.Module:
    model = nn.Module()
    per_tensor = tensor_mb * (1 << 20) // 2
    for i in range(max(1, int(gb * 1e9 // (per_tensor * 2)))):
        t = torch.empty(per_tensor, dtype=torch.bfloat16)
        t.view(torch.int16).random_(-(2**15), 2**15 - 1)
        model.register_parameter(f"w{i}", nn.Parameter(t, requires_grad=False))
    return model


def _seed(ready: Any, stop: Any, gb: float, tensor_mb: int) -> None:
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.server import SeedServer

    weights = LoadedWeights.capture(synthetic_model(gb, tensor_mb))
    server = SeedServer(weights, IDENTITY, 0, "127.0.0.1", 0, 120.0).start()
    server.ready.wait(120)
    ready.put(server.address)
    stop.recv()
    server.stop()


def netloader_gbps(gb: float, tensor_mb: int) -> dict[str, float]:
    from vllm_ascend.model_loader.netloader.client import WeightFetch
    from vllm_ascend.model_loader.netloader.manifest import model_tensors, spec_of

    ctx = mp.get_context("spawn")
    ready, (stop_recv, stop_send) = ctx.Queue(), ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_seed, args=(ready, stop_recv, gb, tensor_mb), daemon=True)
    proc.start()
    try:
        address = ready.get(timeout=600)
        named = model_tensors(synthetic_model(gb, tensor_mb))
        for _, t in named:
            t.zero_()  # touch the client's memory, as an initialized model would be
        fetch = WeightFetch(IDENTITY, [spec_of(n, t) for n, t in named], [t for _, t in named], 120)
        received = fetch.run((address,))
        if received is None:
            raise RuntimeError(f"transfer failed: {fetch.reasons}")
        return {"bytes": received.nbytes, "seconds": received.seconds,
                "gbps": received.nbytes / received.seconds / 1e9}
    finally:
        stop_send.send(None)
        proc.join(30)


def _tcp_sink(port_q: Any, nbytes: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        buf = bytearray(8 << 20)
        got = 0
        while got < nbytes:
            got += conn.recv_into(buf)
        conn.sendall(b"k")


def tcp_gbps(nbytes: int) -> float:
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    proc = ctx.Process(target=_tcp_sink, args=(port_q, nbytes), daemon=True)
    proc.start()
    payload = memoryview(bytearray(8 << 20))
    with socket.create_connection(("127.0.0.1", port_q.get(timeout=60))) as conn:
        start = time.perf_counter()
        sent = 0
        while sent < nbytes:
            conn.sendall(payload[: min(len(payload), nbytes - sent)])
            sent += min(len(payload), nbytes - sent)
        conn.recv(1)
        seconds = time.perf_counter() - start
    proc.join(30)
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--tensor-mb", type=int, default=64)
    args = parser.parse_args()
    result = netloader_gbps(args.gb, args.tensor_mb)
    link = tcp_gbps(result["bytes"])
    print(json.dumps({
        "bytes": result["bytes"], "netloader_seconds": round(result["seconds"], 3),
        "netloader_gbps": round(result["gbps"], 3), "link_gbps": round(link, 3),
        "ratio": round(result["gbps"] / link, 3),
    }))


if __name__ == "__main__":
    main()
