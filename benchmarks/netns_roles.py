"""The processes a namespace benchmark starts, one role each, driven over stdin/stdout.

    python -m benchmarks.netns_roles seed   --host A --gb G [--servers none:64,20:64] [--steps]
    python -m benchmarks.netns_roles client --host A --gb G [--relay] [--bucket-mb 64]
    python -m benchmarks.netns_roles prober
    python -m benchmarks.netns_roles tcp-sink --host A
    python -m benchmarks.netns_roles tcp-source
    python -m benchmarks.netns_roles http-store --host A --directory DIR
    python -m benchmarks.netns_roles downloader --dest DIR

Each role prints one JSON object per line to stdout (logs go to stderr) and reads one
JSON command per line from stdin; ``{"cmd": "quit"}`` (or stdin closing) ends it.
Times are ``time.monotonic()``, one clock for every process on the machine, so the
driver can compare them across namespaces. ``Child`` is the driver's side.
"""

import argparse
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"model": "bench", "rank": 0, "tensor_parallel_size": 1, "pipeline_parallel_size": 1}
TENSOR_MB = 16.0
STEP_INTERVAL_S = 0.01
PROBE_INTERVAL_S = 0.02


def emit(**msg: Any) -> None:
    print(json.dumps(msg), flush=True)


def commands() -> Any:
    """Commands from stdin until 'quit' or end of input."""
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("cmd") == "quit":
            return
        yield msg


def build_model(gb: float, tensor_mb: float, fill: bool) -> Any:
    from benchmarks.netloader_transfer import synthetic_model

    return synthetic_model(gb, tensor_mb, fill=fill)


class StepClock:
    """A stand-in for the seed's own serving: a fixed matmul every STEP_INTERVAL_S,
    each step's duration recorded; it slows when the transfer takes the CPU."""

    def __init__(self) -> None:
        import torch

        self.a = torch.randn(384, 384)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import torch

        while not self._stop.wait(STEP_INTERVAL_S):
            t0 = time.monotonic()
            torch.mm(self.a, self.a).sum().item()
            self.samples.append((t0, time.monotonic() - t0))

    def take(self) -> list[tuple[float, float]]:
        samples, self.samples = self.samples, []
        return samples


def role_seed(args: argparse.Namespace) -> None:
    """One model in memory, one SeedServer per ``--servers`` entry (send limit in
    MB/s or 'none', bucket MB), so capped and uncapped sends share everything else."""
    import torch

    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
    from vllm_ascend.model_loader.netloader.wire.addresses import listen

    torch.set_num_threads(1)
    weights = LoadedWeights.capture(build_model(args.gb, args.tensor_mb, fill=True))
    servers = []
    for spec in args.servers.split(","):
        limit, bucket_mb = spec.split(":")
        settings = SeedSettings(
            IDENTITY, 0, args.host, args.timeout,
            bucket_bytes=int(float(bucket_mb) * (1 << 20)),
            send_limit_bytes_per_s=None if limit == "none" else float(limit) * 1e6,
            fanout=args.fanout,
        )
        servers.append(SeedServer(weights, settings, listen(args.host, 0)).start())
    clock = StepClock() if args.steps else None
    if clock is not None:
        clock.start()
    emit(addresses=[s.address for s in servers], bytes=weights.total_bytes,
         tensors=len(weights.specs))
    try:
        for msg in commands():
            if msg["cmd"] == "steps":
                emit(steps=clock.take() if clock is not None else [])
    finally:
        for server in servers:
            server.stop()


def role_client(args: argparse.Namespace) -> None:
    """Targets shaped like the seed's model, filled by one WeightFetch per 'fetch'.

    With ``--relay`` each fetch offers a relay (as a starting instance does with
    RELAY): it serves until the next fetch or 'quit', so later clients can finish."""
    from vllm_ascend.model_loader.netloader.client import ClientSettings, WeightFetch
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, model_tensors, spec_of
    from vllm_ascend.model_loader.netloader.seed.relay import RelayListener, RelayProgress
    from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
    from vllm_ascend.model_loader.netloader.wire.addresses import listen

    named = model_tensors(build_model(args.gb, args.tensor_mb, fill=False))
    for _, t in named:
        t.zero_()  # touched once here, so page faults stay out of the timed transfer
    specs, targets = [spec_of(n, t) for n, t in named], [t for _, t in named]
    relay_settings = SeedSettings(
        IDENTITY, 0, args.host, args.timeout, bucket_bytes=int(args.bucket_mb * (1 << 20)),
        fanout=args.fanout,
    )

    def relay_seed(weights: LoadedWeights, progress: RelayProgress, sock: socket.socket,
                   checkpoint: str | None) -> SeedServer:
        return SeedServer(weights, relay_settings, sock, progress=progress).start()

    relay: RelayListener | None = None
    emit(ready=True, bytes=sum(s.nbytes for s in specs))
    try:
        for msg in commands():
            if msg["cmd"] == "fetch":
                if relay is not None:
                    relay.close()
                relay = (RelayListener(listen(args.host, 0), relay_seed) if args.relay
                         else None)
                fetch = WeightFetch(ClientSettings(IDENTITY, args.timeout), specs, targets,
                                    relay=relay)
                start = time.monotonic()
                received = fetch.run(tuple(msg["sources"]))
                emit(ok=received is not None, start=start, end=time.monotonic(),
                     bytes=received.nbytes if received else 0,
                     source=received.source if received else None, reasons=fetch.reasons,
                     relay=f"{args.host}:{relay.port}" if relay is not None else None)
    finally:
        if relay is not None:
            relay.close()


def role_prober(args: argparse.Namespace) -> None:
    """'info' round trips to a seed every PROBE_INTERVAL_S: what a user of the seed's
    host sees of its responsiveness (the seed's threads and its uplink's queue)."""
    from vllm_ascend.model_loader.netloader.client import query_seed
    from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError

    samples: list[tuple[float, float, bool]] = []
    stop = threading.Event()

    def probe(address: str) -> None:
        while not stop.wait(PROBE_INTERVAL_S):
            t0 = time.monotonic()
            try:
                query_seed(address, timeout_s=10.0)
                ok = True
            except (OSError, ProtocolError):
                ok = False
            samples.append((t0, time.monotonic() - t0, ok))

    thread: threading.Thread | None = None
    for msg in commands():
        if msg["cmd"] == "probe" and thread is None:
            thread = threading.Thread(target=probe, args=(msg["address"],), daemon=True)
            thread.start()
            emit(probing=msg["address"])
        elif msg["cmd"] == "samples":
            taken = samples[:]
            del samples[: len(taken)]
            emit(samples=taken)
    stop.set()


def role_tcp_sink(args: argparse.Namespace) -> None:
    """Receives one stream per 'accept'; reports when its last byte arrived."""
    with socket.create_server((args.host, 0)) as srv:
        emit(port=srv.getsockname()[1])
        buf = bytearray(4 << 20)
        for msg in commands():
            if msg["cmd"] != "accept":
                continue
            conn, _ = srv.accept()
            with conn:
                got = 0
                while n := conn.recv_into(buf):
                    got += n
            emit(bytes=got, end=time.monotonic())


def role_tcp_source(args: argparse.Namespace) -> None:
    """Sends ``bytes`` to every address in 'send' at once, one thread per stream."""
    payload = memoryview(bytes(4 << 20))

    def stream(address: str, nbytes: int) -> None:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=120) as conn:
            sent = 0
            while sent < nbytes:
                n = min(len(payload), nbytes - sent)
                conn.sendall(payload[:n])
                sent += n

    for msg in commands():
        if msg["cmd"] == "send":
            start = time.monotonic()
            threads = [threading.Thread(target=stream, args=(a, msg["bytes"]))
                       for a in msg["to"]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            emit(start=start, end=time.monotonic())


def own_cpu_seconds() -> float:
    """User plus system CPU seconds of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def role_http_store(args: argparse.Namespace) -> None:
    """Shared storage: ``--directory`` served over HTTP by the standard library's file
    server (what ``python -m http.server`` runs: one thread per connection, files copied
    to the socket 64 KiB at a time), on a free port it reports; serves until 'quit'."""

    class Handler(SimpleHTTPRequestHandler):
        timeout = args.timeout  # every socket operation of a connection, in seconds

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=args.directory, **kw)

    with ThreadingHTTPServer((args.host, 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        emit(port=server.server_address[1])
        try:
            for _ in commands():
                pass
        finally:
            server.shutdown()


def download(session: Any, url: str, path: Path, timeout: float) -> int:
    """GET ``url`` into the file ``path``, streamed 1 MiB at a time; returns its bytes.
    Raises ``requests.RequestException`` on an HTTP error status, a timeout (seconds,
    per socket operation) or a body shorter than its Content-Length."""
    written = 0
    with session.get(url, stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        with open(path, "wb") as f:
            for chunk in resp.iter_content(1 << 20):
                written += f.write(chunk)
    return written


def role_downloader(args: argparse.Namespace) -> None:
    """A starting instance without Netloader. Its model is built first (``--gb`` of
    ``--tensor-mb`` tensors, touched, as the client role's targets). Per 'download'
    (``base`` URL, ``files``): every file fetched into ``--dest``, then every safetensors
    file opened with ``safetensors.torch.load_file`` (mmap) and each tensor copied into
    the model's tensor of that name, as vLLM's default loader does; reports when each
    phase ended, the bytes, and this process's CPU seconds per phase. The files are
    deleted after each round."""
    import requests
    from safetensors.torch import load_file

    from vllm_ascend.model_loader.netloader.manifest import model_tensors

    targets = dict(model_tensors(build_model(args.gb, args.tensor_mb, fill=False)))
    for t in targets.values():
        t.zero_()  # touched once here, so page faults stay out of the timed load
    dest = Path(args.dest)
    emit(ready=True, bytes=sum(t.nbytes for t in targets.values()))
    with requests.Session() as session:
        for msg in commands():
            if msg["cmd"] != "download":
                continue
            dest.mkdir(parents=True, exist_ok=True)
            start, cpu0 = time.monotonic(), own_cpu_seconds()
            try:
                got = sum(download(session, msg["base"] + name, dest / name, args.timeout)
                          for name in msg["files"])
            except (requests.RequestException, OSError) as e:
                shutil.rmtree(dest, ignore_errors=True)
                emit(ok=False, reason=f"{type(e).__name__}: {e}")
                continue
            downloaded, cpu1 = time.monotonic(), own_cpu_seconds()
            tensor_bytes = 0
            for name in msg["files"]:
                if name.endswith(".safetensors"):
                    for key, t in load_file(dest / name).items():
                        tensor_bytes += targets[key].copy_(t).nbytes
            end, cpu2 = time.monotonic(), own_cpu_seconds()
            shutil.rmtree(dest)
            emit(ok=True, start=start, downloaded=downloaded, end=end, bytes=got,
                 tensor_bytes=tensor_bytes, download_cpu_s=cpu1 - cpu0, load_cpu_s=cpu2 - cpu1)


ROLES = {
    "seed": role_seed,
    "client": role_client,
    "prober": role_prober,
    "tcp-sink": role_tcp_sink,
    "tcp-source": role_tcp_source,
    "http-store": role_http_store,
    "downloader": role_downloader,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--gb", type=float, default=0.25)
    parser.add_argument("--tensor-mb", type=float, default=TENSOR_MB)
    parser.add_argument("--servers", default="none:64",
                        help="seed: one listener per LIMIT:BUCKET_MB (LIMIT in MB/s or none)")
    parser.add_argument("--steps", action="store_true", help="seed: run the step clock")
    parser.add_argument("--relay", action="store_true", help="client: relay while fetching")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="client: relay's bucket")
    parser.add_argument("--fanout", type=int, default=1,
                        help="seed and client's relay: RELAY_FANOUT (1: a chain)")
    parser.add_argument("--directory", default=".", help="http-store: the folder it serves")
    parser.add_argument("--dest", default=".bench/download", help="downloader: where files go")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    ROLES[args.role](args)


class Child:
    """The driver's handle on one role process (in a namespace, or here with ``popen``
    = ``subprocess.Popen``); its stderr goes to ``log``."""

    def __init__(self, popen: Any, role: str, args: list[str], log: Path):
        self.log = log
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with open(log, "ab") as err:
            self.proc = popen(
                [sys.executable, "-m", "benchmarks.netns_roles", role, *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env,
            )
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""

    def send(self, **msg: Any) -> None:
        stdin: IO[bytes] = self.proc.stdin
        stdin.write((json.dumps(msg) + "\n").encode())
        stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise TimeoutError(f"no answer in {timeout:.0f} s; {self.log}:\n{self.tail()}")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError(f"process ended; {self.log}:\n{self.tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, timeout: float, **msg: Any) -> dict[str, Any]:
        self.send(**msg)
        return self.recv(timeout)

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds the process has used so far, all its threads
        (``ip netns exec`` execs the command, so the pid is the role's own)."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def quit(self, timeout: float = 20) -> None:
        try:
            self.send(cmd="quit")
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        self._sel.close()

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


if __name__ == "__main__":
    main()
