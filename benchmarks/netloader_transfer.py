"""Netloader transfer throughput against raw loopback TCP, in one run, with phases.

    python -m benchmarks.netloader_transfer [--gb 1.0] [--tensor-mb 64] [--repeat 3]
                                            [--fresh-targets] [--pin]

A seed process serves a synthetic bf16 model of ``--gb`` gigabytes on both data
planes; this process receives it the way a starting instance does (handshake,
staging, per-tensor blake3 check), once over the host data plane (``tcp``: the
buckets on the handshake connection) and once over the collective plane (a gloo
group, the path every CPU transfer took before the host data plane). The baseline
(``link``) streams the same number of bytes over one loopback TCP connection between
two processes into a small reused buffer; ``link_into_memory`` streams them into a
buffer the size of the model instead, as any loader must (touched, or fresh with
``--fresh-targets``). Each repeat runs them all back to back, so they see the same
machine; figures are medians over repeats.

``--fresh-targets`` receives into never-touched memory, as into a model vLLM has
just built (its weights are ``torch.empty``); by default the targets are zeroed
first. ``--pin`` puts the seed (and the TCP sink) on CPU 0 and the client (and the
TCP source) on CPU 1, as ``VLLM_CPU_OMP_THREADS_BIND`` does for two servers.

Phases of a transfer, as the client sees them: ``handshake`` (connect, hello,
accept), ``group_setup`` (the two-rank gloo group; collective plane only),
``transfer`` (receive, verify, copy: ``recv_weights``; its ``wait_s``/``verify_s``/
``copy_s`` say where the receiving thread spent it), ``teardown`` (group destroyed,
'done' sent). ``gloo`` sends the same bytes over a gloo group alone (no staging,
digest or copy) and ``stream`` over the host plane's framing alone (bucket headers,
the same socket calls, two reused buffers; no digest or copy): each plane's gap splits
into its transport's part and Netloader's own (verify, copy). Each plane gets one
untimed transfer first, and the planes take turns going first in each repeat: a
process's first transfer pays for fresh buffers, which is not the plane's doing.
``overhead_s`` is the total minus the time the raw link needs for the same bytes.
CPU seconds are per transfer, all threads of the process. ``link_into_fresh`` streams
the bytes into never-touched memory of the model's size (4 KiB pages, no advice): the
baseline a load inside vLLM is held to (``load_vs_fresh_link`` in ``run_all``).
``memory`` measures a 1 GB tensor never touched before: its first write at 4 KiB pages,
and with transparent huge pages asked for and the pages faulted in first
(``planes/memory.py``: populate, then the write). Prints one JSON object last.
"""

import argparse
import dataclasses
import json
import mmap
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

IDENTITY = {"model": "bench", "rank": 0, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
            "checkpoint": "b" * 64}
SEED_CPU, CLIENT_CPU = 0, 1
PLANES = ("tcp", "collective")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})


def synthetic_model(gb: float, tensor_mb: float, fill: bool = True) -> nn.Module:
    model = nn.Module()
    per_tensor = int(tensor_mb * (1 << 20)) // 2
    for i in range(max(1, int(gb * 1e9 // (per_tensor * 2)))):
        t = torch.empty(per_tensor, dtype=torch.bfloat16)
        if fill:
            t.view(torch.int16).random_(-(2**15), 2**15 - 1)
        model.register_parameter(f"w{i}", nn.Parameter(t, requires_grad=False))
    return model


def _seed(ready: Any, conn: Any, gb: float, tensor_mb: float, cpu: int | None) -> None:
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
    from vllm_ascend.model_loader.netloader.wire.addresses import listen

    pin(cpu)
    weights = LoadedWeights.capture(synthetic_model(gb, tensor_mb))
    servers = {
        plane: SeedServer(
            weights, SeedSettings(IDENTITY, 0, "127.0.0.1", 120.0, data_plane=plane),
            listen("127.0.0.1", 0),
        ).start()
        for plane in PLANES
    }
    ready.put({plane: server.address for plane, server in servers.items()})
    while conn.recv() is not None:  # each request is answered with this process's CPU time
        conn.send(cpu_seconds())
    for server in servers.values():
        server.stop()


@contextmanager
def phase_clock(times: dict[str, float], stats: Any) -> Iterator[None]:
    """Time the client's phases through the calls it makes: the collective group's
    setup and teardown around ``group_link``, the bulk in ``recv_weights``."""
    from vllm_ascend.model_loader.netloader import client

    original_group, original_recv = client.group_link, client.recv_weights

    @contextmanager
    def timed_group(*args: Any, **kwargs: Any) -> Iterator[Any]:
        times["group_called"] = time.perf_counter()
        with original_group(*args, **kwargs) as link:
            times["group_ready"] = time.perf_counter()
            yield link
            times["group_leaving"] = time.perf_counter()

    def timed_recv(*args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        times.setdefault("group_called", start)
        times.setdefault("group_ready", start)
        try:
            # The bench's own stats object, in place of the client's.
            return original_recv(*args, **{**kwargs, "stats": stats})
        finally:
            times["transfer"] = time.perf_counter() - start
            times.setdefault("group_leaving", time.perf_counter())

    client.group_link, client.recv_weights = timed_group, timed_recv  # type: ignore[assignment]
    try:
        yield
    finally:
        client.group_link, client.recv_weights = original_group, original_recv


def netloader_once(
    address: str, plane: str, gb: float, tensor_mb: float, fresh: bool
) -> dict[str, Any]:
    from vllm_ascend.model_loader.netloader.client import ClientSettings, WeightFetch
    from vllm_ascend.model_loader.netloader.manifest import model_tensors, spec_of
    from vllm_ascend.model_loader.netloader.planes.transfer import TransferStats

    named = model_tensors(synthetic_model(gb, tensor_mb, fill=False))
    if not fresh:
        for _, t in named:
            t.zero_()  # touch the client's memory, as an initialized model would be
    fetch = WeightFetch(
        ClientSettings(IDENTITY, 120.0, data_plane=plane),
        [spec_of(n, t) for n, t in named], [t for _, t in named],
    )
    times: dict[str, float] = {}
    stats = TransferStats()
    cpu0 = cpu_seconds()
    with phase_clock(times, stats):
        start = time.perf_counter()
        received = fetch.run((address,))
        end = time.perf_counter()
    if received is None:
        raise RuntimeError(f"transfer failed: {fetch.reasons}")
    phases = {
        "handshake_s": times["group_called"] - start,
        "group_setup_s": times["group_ready"] - times["group_called"],
        "transfer_s": times["transfer"],
        "teardown_s": end - times["group_leaving"],
    }
    return {"bytes": received.nbytes, "seconds": end - start, "phases": phases,
            "transfer": dataclasses.asdict(stats), "client_cpu_s": cpu_seconds() - cpu0}


def _sink_buffer(nbytes: int, into: str) -> memoryview:
    if into == "reused":  # one small buffer, over and over: what a raw link can do
        return memoryview(bytearray(8 << 20))
    buf = mmap.mmap(-1, nbytes)  # never-touched pages, like a model vLLM has just built
    if into == "touched":
        torch.frombuffer(buf, dtype=torch.uint8).fill_(1)  # write every page once
    return memoryview(buf)


def memory_figures(gb: float = 1.0) -> dict[str, float]:
    """Seconds to first write ``gb`` GB of never-touched memory at 4 KiB pages, and with
    huge pages asked for and populated first (the populate, and the write after it)."""
    from vllm_ascend.model_loader.netloader.planes import memory

    nbytes = int(gb * 1e9)
    plain = torch.empty(nbytes, dtype=torch.uint8)
    t0 = time.perf_counter()
    plain.fill_(1)
    first_write_s = time.perf_counter() - t0
    del plain
    huge = torch.empty(nbytes, dtype=torch.uint8)
    t0 = time.perf_counter()
    memory.prepare([huge])
    populated = memory.populate(huge)
    t1 = time.perf_counter()
    huge.fill_(1)
    t2 = time.perf_counter()
    return {"gb": gb, "first_write_4k_s": round(first_write_s, 3),
            "first_write_4k_gbps": round(gb / first_write_s, 3),
            "hugepage_populate_s": round(t1 - t0, 3), "write_after_populate_s": round(t2 - t1, 3),
            "populate_supported": populated}


def _tcp_sink(port_q: Any, nbytes: int, cpu: int | None, into: str) -> None:
    pin(cpu)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        buf = _sink_buffer(nbytes, into)
        cpu0 = cpu_seconds()
        got = 0
        while got < nbytes:
            offset = got % len(buf)
            got += conn.recv_into(buf[offset : offset + min(8 << 20, nbytes - got)])
        port_q.put(cpu_seconds() - cpu0)
        conn.sendall(b"k")


def tcp_once(nbytes: int, sink_cpu: int | None, into: str = "reused") -> dict[str, float]:
    """Stream ``nbytes`` to a sink process that receives ``into`` a small reused
    buffer (the link's own speed) or into a model-sized one, touched or fresh."""
    payload = memoryview(bytearray(8 << 20))
    with peer_process(_tcp_sink, nbytes, sink_cpu, into) as port_q, \
            socket.create_connection(("127.0.0.1", port_q.get(timeout=60))) as conn:
        cpu0, start = cpu_seconds(), time.perf_counter()
        sent = 0
        while sent < nbytes:
            n = min(len(payload), nbytes - sent)
            conn.sendall(payload[:n])
            sent += n
        conn.recv(1)
        seconds, sender_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        return {"gbps": nbytes / seconds / 1e9, "sender_cpu_s": sender_cpu,
                "receiver_cpu_s": port_q.get(timeout=60)}


@contextmanager
def peer_process(target: Callable[..., None], *args: Any) -> Iterator[Any]:
    """``target(queue, *args)`` in a spawned process; yields the queue it answers on."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args), daemon=True)
    proc.start()
    try:
        yield queue
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


GLOO_CHUNK = 64 << 20


def _gloo_sender(port_q: Any, nbytes: int, cpu: int | None) -> None:
    from vllm_ascend.model_loader.netloader.deadline import Deadline
    from vllm_ascend.model_loader.netloader.planes.collective import SEED_RANK, group_link

    pin(cpu)
    payload = torch.ones(GLOO_CHUNK, dtype=torch.uint8)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_q.put(server.getsockname()[1])
        conn, _ = server.accept()
    with conn, group_link(conn, SEED_RANK, 120, torch.device("cpu"),
                          Deadline(120, "setup")) as link:
        pg = link._pg
        cpu0 = cpu_seconds()
        works: list[Any] = []
        for offset in range(0, nbytes, GLOO_CHUNK):
            works.append(pg.send([payload[: min(GLOO_CHUNK, nbytes - offset)]], 1, 0))
            if len(works) == 2:
                works.pop(0).wait()
        for work in works:
            work.wait()
        port_q.put(cpu_seconds() - cpu0)


def gloo_once(nbytes: int, sender_cpu: int | None) -> dict[str, float]:
    """The same bytes over a gloo group alone: two 64 MB chunks in flight into two
    reused, touched buffers; no staging, digest or copy. What is left between this and
    the collective plane is Netloader's own work; between this and ``link``, gloo's."""
    from vllm_ascend.model_loader.netloader.deadline import Deadline
    from vllm_ascend.model_loader.netloader.planes.collective import CLIENT_RANK, group_link

    with peer_process(_gloo_sender, nbytes, sender_cpu) as port_q:
        port = port_q.get(timeout=60)
        conn = socket.create_connection(("127.0.0.1", port), timeout=120)
        with conn, group_link(conn, CLIENT_RANK, 120, torch.device("cpu"),
                              Deadline(120, "setup")) as link:
            pg = link._pg
            slots = [torch.zeros(GLOO_CHUNK, dtype=torch.uint8) for _ in range(2)]
            sizes = [min(GLOO_CHUNK, nbytes - o) for o in range(0, nbytes, GLOO_CHUNK)]
            cpu0, start = cpu_seconds(), time.perf_counter()
            posted = [pg.recv([slots[k % 2][: sizes[k]]], 0, 0)
                      for k in range(min(2, len(sizes)))]
            for k in range(len(sizes)):
                posted.pop(0).wait()
                if k + 2 < len(sizes):
                    posted.append(pg.recv([slots[k % 2][: sizes[k + 2]]], 0, 0))
            seconds, receiver_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        return {"gbps": nbytes / seconds / 1e9, "receiver_cpu_s": receiver_cpu,
                "sender_cpu_s": port_q.get(timeout=60)}


def _stream_sender(port_q: Any, nbytes: int, cpu: int | None) -> None:
    from vllm_ascend.model_loader.netloader.planes.stream import StreamLink

    pin(cpu)
    payload = torch.ones(GLOO_CHUNK, dtype=torch.uint8)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_q.put(server.getsockname()[1])
        conn, _ = server.accept()
    with conn:
        link = StreamLink(conn, 120, nbytes)
        cpu0 = cpu_seconds()
        for k, offset in enumerate(range(0, nbytes, GLOO_CHUNK)):
            size = min(GLOO_CHUNK, nbytes - offset)
            link.send_bucket(k, [payload[:size]], size)
        conn.recv(1)
        port_q.put(cpu_seconds() - cpu0)


def stream_once(nbytes: int, sender_cpu: int | None) -> dict[str, float]:
    """The same bytes over the host plane's framing alone: 64 MB buckets, each header
    checked, read into two reused buffers by the link's reader thread; no digest or
    copy. The host plane's counterpart of ``gloo_once``."""
    from vllm_ascend.model_loader.netloader.planes.stream import StreamLink

    with peer_process(_stream_sender, nbytes, sender_cpu) as port_q:
        port = port_q.get(timeout=60)
        with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
            sizes = [min(GLOO_CHUNK, nbytes - o) for o in range(0, nbytes, GLOO_CHUNK)]
            cpu0, start = cpu_seconds(), time.perf_counter()
            for _ in StreamLink(conn, 120, nbytes).receive(sizes):
                pass
            seconds, receiver_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
            conn.sendall(b"k")
        return {"gbps": nbytes / seconds / 1e9, "receiver_cpu_s": receiver_cpu,
                "sender_cpu_s": port_q.get(timeout=60)}


def median(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return round(statistics.median(key(r) for r in runs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--tensor-mb", type=float, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fresh-targets", action="store_true")
    parser.add_argument("--pin", action="store_true")
    args = parser.parse_args()
    seed_cpu, client_cpu = (SEED_CPU, CLIENT_CPU) if args.pin else (None, None)

    ctx = mp.get_context("spawn")
    ready, (conn, child_conn) = ctx.Queue(), ctx.Pipe()
    proc = ctx.Process(
        target=_seed, args=(ready, child_conn, args.gb, args.tensor_mb, seed_cpu), daemon=True
    )
    proc.start()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    runs = []
    try:
        addresses = ready.get(timeout=600)
        pin(client_cpu)
        for plane in PLANES:  # untimed: the process's first transfer of each plane
            netloader_once(addresses[plane], plane, args.gb, args.tensor_mb, args.fresh_targets)
        for i in range(args.repeat):
            run: dict[str, Any] = {}
            for plane in PLANES if i % 2 == 0 else PLANES[::-1]:
                conn.send("cpu")
                seed_cpu0 = conn.recv()
                one = netloader_once(addresses[plane], plane, args.gb, args.tensor_mb,
                                     args.fresh_targets)
                conn.send("cpu")
                one["seed_cpu_s"] = conn.recv() - seed_cpu0
                one["gbps"] = one["bytes"] / one["seconds"] / 1e9
                run[plane] = one
            nbytes = run["tcp"]["bytes"]
            run["link"] = tcp_once(nbytes, seed_cpu)
            into = "fresh" if args.fresh_targets else "touched"
            run["link_into_memory"] = tcp_once(nbytes, seed_cpu, into)
            run["link_into_fresh"] = (run["link_into_memory"] if into == "fresh"
                                      else tcp_once(nbytes, seed_cpu, "fresh"))
            run["gloo"] = gloo_once(nbytes, seed_cpu)
            run["stream"] = stream_once(nbytes, seed_cpu)
            for plane in PLANES:
                run[plane]["overhead_s"] = (
                    run[plane]["seconds"] - nbytes / (run["link"]["gbps"] * 1e9)
                )
            runs.append(run)
            print(f"run {i}: netloader tcp {run['tcp']['gbps']:.3f} GB/s, collective "
                  f"{run['collective']['gbps']:.3f} GB/s, link {run['link']['gbps']:.3f} "
                  f"GB/s, link into memory {run['link_into_memory']['gbps']:.3f} GB/s, "
                  f"gloo alone {run['gloo']['gbps']:.3f} GB/s, stream alone "
                  f"{run['stream']['gbps']:.3f} GB/s, {json.dumps(run)}", flush=True)
    finally:
        conn.send(None)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        if affinity is not None:
            os.sched_setaffinity(0, affinity)

    def plane_summary(plane: str) -> dict[str, Any]:
        return {
            "seconds": median(runs, lambda r: r[plane]["seconds"]),
            "gbps": median(runs, lambda r: r[plane]["gbps"]),
            "ratio": median(runs, lambda r: r[plane]["gbps"] / r["link"]["gbps"]),
            "overhead_s": median(runs, lambda r: r[plane]["overhead_s"]),
            "phases": {k: median(runs, lambda r, k=k: r[plane]["phases"][k])
                       for k in runs[0][plane]["phases"]},
            "transfer": {k: median(runs, lambda r, k=k: r[plane]["transfer"][k])
                         for k in runs[0][plane]["transfer"]},
            "client_cpu_s": median(runs, lambda r: r[plane]["client_cpu_s"]),
            "seed_cpu_s": median(runs, lambda r: r[plane]["seed_cpu_s"]),
        }

    tcp, collective = plane_summary("tcp"), plane_summary("collective")
    print(json.dumps({
        "bytes": runs[0]["tcp"]["bytes"],
        "netloader_seconds": tcp["seconds"],
        "netloader_gbps": tcp["gbps"],
        "link_gbps": median(runs, lambda r: r["link"]["gbps"]),
        "ratio": tcp["ratio"],
        "collective_gbps": collective["gbps"],
        "collective_ratio": collective["ratio"],
        "link_into_memory_gbps": median(runs, lambda r: r["link_into_memory"]["gbps"]),
        "link_into_fresh_gbps": median(runs, lambda r: r["link_into_fresh"]["gbps"]),
        "memory": memory_figures(),
        "ratio_vs_memory": median(runs, lambda r: r["tcp"]["gbps"] / r["link_into_memory"]["gbps"]),
        "gloo_gbps": median(runs, lambda r: r["gloo"]["gbps"]),
        "gloo_ratio": median(runs, lambda r: r["gloo"]["gbps"] / r["link"]["gbps"]),
        "gloo_cpu_s": {k: median(runs, lambda r, k=k: r["gloo"][k])
                       for k in ("sender_cpu_s", "receiver_cpu_s")},
        "stream_gbps": median(runs, lambda r: r["stream"]["gbps"]),
        "stream_ratio": median(runs, lambda r: r["stream"]["gbps"] / r["link"]["gbps"]),
        "stream_cpu_s": {k: median(runs, lambda r, k=k: r["stream"][k])
                         for k in ("sender_cpu_s", "receiver_cpu_s")},
        "tcp_plane": tcp,
        "collective_plane": collective,
        "link_cpu_s": {k: median(runs, lambda r, k=k: r["link"][k])
                       for k in ("sender_cpu_s", "receiver_cpu_s")},
        "link_into_memory_cpu_s": {k: median(runs, lambda r, k=k: r["link_into_memory"][k])
                                   for k in ("sender_cpu_s", "receiver_cpu_s")},
        "repeat": args.repeat, "fresh_targets": args.fresh_targets, "pin": args.pin,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
