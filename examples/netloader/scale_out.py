"""Scale out: one seed, then N clients started together from it, each one verified.

    python -m examples.netloader.scale_out --model .models/tiny-qwen2 --clients 2

The seed loads the model from disk. Then N clients start at the same time, all with
the seed as their SOURCE. A client that asks while the seed is sending is sent on to
the relay of one that is still receiving (RELAY, on by default), so ``loaded_from``
names the seed or another client of this run. Each client is checked the way an
operator would: its own seed answers ``info`` with that ``loaded_from`` and the seed's
value fingerprint, and its greedy outputs equal the seed's. Prints a JSON summary last (per
client: where its weights came from, load seconds, seconds to healthy) and exits 0
only if every client passed. With ``$NETLOADER_SECRET`` set (or ``--secret-file``),
every instance and every ``info`` query uses the shared secret.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from examples.netloader.demo import PROMPTS, wait_for_file
from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.config import parse_config


def netloader_server(
    model: str, workdir: Path, name: str, cpu: str, keys: dict[str, Any]
) -> VllmServer:
    """A netloader instance writing its seed address to ``{workdir}/{name}-0.txt``."""
    return VllmServer(
        model, load_format="netloader", cpu_bind=cpu, log_path=workdir / f"{name}.log",
        extra_config={"OUTPUT_PREFIX": f"{workdir}/{name}-", **keys},
    )


def check_client(
    server: VllmServer, address: str, sources: list[str], seed_info: dict[str, Any],
    seed_outputs: list[str], secret: bytes | None,
) -> dict[str, Any]:
    """``sources``: the seed's address and the other clients' (their relays)."""
    info = query_seed(address, secret=secret)
    result = {
        "address": address,
        "loaded_from": info["loaded_from"],
        "load_s": round(info["load_seconds"], 3),
        "completed_transfers": info["completed_transfers"],
        "healthy_after_s": round(server.startup_seconds or 0.0, 1),
        "same_fingerprint": info["value_fingerprint"] == seed_info["value_fingerprint"],
        "identical_outputs": server.complete(PROMPTS) == seed_outputs,
    }
    result["ok"] = (
        result["loaded_from"] in [f"seed {a}" for a in sources if a != address]
        and result["same_fingerprint"] and result["identical_outputs"]
    )
    return result


def run(model: str, clients: int, workdir: Path, secret_file: str | None) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    keys: dict[str, Any] = {"SECRET_FILE": secret_file} if secret_file else {}
    # The same rule the servers apply: SECRET_FILE, else $NETLOADER_SECRET, else none.
    secret = parse_config(keys).secret
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))]
    seed = netloader_server(model, workdir, "seed", cpus[0], keys)
    started: list[VllmServer] = [seed]
    try:
        print(f"[scale-out] starting the seed (loads {model} from disk) ...", flush=True)
        seed.start().wait_healthy()
        seed_address = wait_for_file(workdir / "seed-0.txt", seed)
        seed_outputs = seed.complete(PROMPTS)
        print(f"[scale-out] seed healthy after {seed.startup_seconds:.1f} s on "
              f"{seed_address}; starting {clients} clients from it ...", flush=True)
        source = {"SOURCE": [{"device_id": 0, "sources": [seed_address]}]}
        group = [
            netloader_server(model, workdir, f"client{i}", cpus[(i + 1) % len(cpus)],
                             {**keys, **source})
            for i in range(clients)
        ]
        started += group
        for server in group:
            server.start()
        # Each client's own clock: how long until *it* answered /health.
        pool = ThreadPoolExecutor(clients)
        try:
            list(pool.map(lambda s: s.wait_healthy(300), group))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        seed_info = query_seed(seed_address, secret=secret)
        addresses = [wait_for_file(workdir / f"client{i}-0.txt", server)
                     for i, server in enumerate(group)]
        results = [
            check_client(server, address, [seed_address, *addresses], seed_info,
                         seed_outputs, secret)
            for server, address in zip(group, addresses, strict=True)
        ]
        return {
            "model": model,
            "bytes": seed_info["bytes"],
            "seed": {
                "address": seed_address,
                "loaded_from": seed_info["loaded_from"],
                "load_s": round(seed_info["load_seconds"], 3),
                "healthy_after_s": round(seed.startup_seconds or 0.0, 1),
                "completed_transfers": seed_info["completed_transfers"],
            },
            "clients": results,
            "ok": all(r["ok"] for r in results),
        }
    finally:
        for server in reversed(started):
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description="One Netloader seed, then N clients started together from it."
    )
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--clients", type=int, default=2, help="clients to start at once")
    parser.add_argument("--secret-file", help="shared secret file (else $NETLOADER_SECRET)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "netloader-scale-out",
                        help="server logs and seed address files")
    args = parser.parse_args()
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so every server started so far is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary = run(args.model, args.clients, args.workdir.resolve(), args.secret_file)
    for client in summary["clients"]:
        print(f"[scale-out] {'PASS' if client['ok'] else 'FAIL'} client {client['address']}: "
              f"weights from {client['loaded_from']} in {client['load_s']:.3f} s, outputs "
              f"{'identical' if client['identical_outputs'] else 'DIFFER'}", flush=True)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
