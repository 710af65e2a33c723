"""The seed's responsiveness while it sends, with and without a send cap.

    python -m benchmarks.netloader_seed_latency [--gb 0.2] [--rate-mbit 300]
                                                [--cap-mb-s 18.75] [--bucket-mb 64]

Needs root (tools/netns.py): the seed, one client and one user each get a namespace,
every link shaped to ``--rate-mbit`` (0: unshaped, so the CPUs are the limit). The
seed process serves one model through two listeners, one uncapped and one with
``send_limit_bytes_per_s`` (what SEND_LIMIT_MB_PER_S sets), and runs a step clock: a
fixed matmul every 10 ms standing in for its own serving. The user sends an ``info``
request to the seed every 20 ms over its link, so a reply waits for whatever the seed's
uplink has queued. Three windows: ``idle`` (nothing sent), ``full`` (the client
fetches from the uncapped listener), ``capped`` (from the capped one).
Per window: round-trip and step times in ms (p50, p99, max). Prints one JSON object last.
"""

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.netloader_fanout import require_root
from benchmarks.netns_roles import Child
from tools.netns import Topology, exit_on_sigterm

IDLE_S = 3.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "n": len(ordered)}


def window(seed: Child, prober: Child, start: float, end: float) -> dict[str, Any]:
    """The step and probe samples taken between ``start`` and ``end``."""
    steps = [d for t, d in seed.ask(30, cmd="steps")["steps"] if start <= t <= end]
    probes = [(d, ok) for t, d, ok in prober.ask(30, cmd="samples")["samples"]
              if start <= t <= end]
    return {
        "seconds": round(end - start, 3),
        "probe": {**percentiles([d for d, ok in probes if ok]),
                  "failed": sum(1 for _, ok in probes if not ok)},
        "step": percentiles(steps),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rate = args.rate_mbit or None
    cap = args.cap_mb_s or (rate / 8 / 2 if rate else 100.0)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = ["--gb", str(args.gb), "--tensor-mb", str(args.tensor_mb)]
    servers = f"none:{args.bucket_mb},{cap}:{args.bucket_mb}"
    timeout = args.gb * 1e9 / (cap * 1e6) * 3 + 120
    with Topology(["seed", "client", "user"], rate) as net:
        def child(node: str, role: str, extra: list[str]) -> Child:
            log = workdir / f"{node}-{role}.log"
            log.unlink(missing_ok=True)
            return Child(functools.partial(net.popen, node), role, extra, log)

        seed = child("seed", "seed",
                     ["--host", net.address("seed"), "--servers", servers, "--steps", *model])
        client = child("client", "client", model)
        prober = child("user", "prober", [])
        try:
            uncapped, capped = seed.recv(600)["addresses"]
            nbytes = client.recv(600)["bytes"]
            prober.ask(60, cmd="probe", address=uncapped)
            time.sleep(1.0)  # first probes pay for imports and connections
            window(seed, prober, 0, 0)  # drops the warm-up samples
            start = time.monotonic()
            time.sleep(IDLE_S)
            scenarios = {"idle": window(seed, prober, start, time.monotonic())}
            for name, address in (("full", uncapped), ("capped", capped)):
                start = time.monotonic()
                got = client.ask(timeout, cmd="fetch", sources=[address])
                if not got["ok"]:
                    raise RuntimeError(f"{name} transfer failed: {got['reasons']}")
                scenarios[name] = window(seed, prober, start, time.monotonic())
                scenarios[name]["mbit"] = round(
                    nbytes * 8 / scenarios[name]["seconds"] / 1e6, 1)
                print(f"seed latency {name}: {json.dumps(scenarios[name])}", flush=True)
        finally:
            for c in (seed, client, prober):
                c.quit()
    return {
        "rate_mbit": rate,
        "bytes": nbytes,
        "cap_mb_s": cap,
        "bucket_mb": args.bucket_mb,
        "scenarios": scenarios,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=0.2)
    parser.add_argument("--tensor-mb", type=float, default=16.0)
    parser.add_argument("--rate-mbit", type=float, default=300.0)
    parser.add_argument("--cap-mb-s", type=float, default=None,
                        help="send limit in MB/s (default: half the link, or 100 if unshaped)")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--workdir", default=".bench/seed-latency")
    args = parser.parse_args()
    require_root()
    exit_on_sigterm()
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
