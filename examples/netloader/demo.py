"""Netloader demo: a seed loads a model from disk, a client receives it from the seed.

Run it with ``make demo`` (the embedded tiny model) or ``make demo MODEL=/path``.
It starts two real vLLM servers on 127.0.0.1, sends the same prompts to both at
temperature 0, reports where the client's weights came from and how long loading
took, and exits 0 only if the outputs are identical. With ``--phases-out FILE`` it
also writes the measured start-up phases of both servers there (see ``phases.py``),
which ``tools/netloader_diagrams.py`` draws as the timing diagram of the user guide.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from examples.netloader.phases import demo_phases, write_logging_config
from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.client import query_seed

PROMPTS = [
    "The quickest way to start a new server is",
    "Once upon a time, in a data center far away,",
    "1, 2, 3, 4,",
    "Weights travel over the network because",
]


def wait_for_file(path: Path, server: VllmServer, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited before writing {path}:\n{server.failure_text()}")
        time.sleep(0.2)
    raise RuntimeError(f"{path} did not appear within {timeout:.0f} s")


def describe(info: dict) -> str:
    gbps = info["bytes"] / info["load_seconds"] / 1e9 if info["load_seconds"] else 0.0
    return (
        f"{info['bytes'] / 1e6:.1f} MB from {info['loaded_from']} "
        f"in {info['load_seconds']:.3f} s ({gbps:.2f} GB/s)"
    )


def run(model: str, workdir: Path, max_tokens: int, phases_out: Path | None = None) -> bool:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # With --phases-out, every log line carries its wall-clock time (see phases.py).
    env = (
        {"VLLM_LOGGING_CONFIG_PATH": str(write_logging_config(workdir / "logging.json"))}
        if phases_out is not None else {}
    )
    clock: dict[str, float] = {}
    seed = VllmServer(
        model, load_format="netloader", cpu_bind="0", log_path=workdir / "seed.log",
        extra_config={"OUTPUT_PREFIX": f"{workdir}/seed-"}, env=env,
    )
    client = None
    try:
        print(f"[demo] starting seed server (loads {model} from disk) ...", flush=True)
        clock["seed_start"] = time.time()
        seed.start().wait_healthy()
        clock["seed_healthy"] = time.time()
        seed_address = wait_for_file(workdir / "seed-0.txt", seed)
        print(f"[demo] seed healthy after {seed.startup_seconds:.1f} s, "
              f"Netloader listening on {seed_address}", flush=True)

        client = VllmServer(
            model, load_format="netloader", cpu_bind="1", log_path=workdir / "client.log",
            extra_config={
                "SOURCE": [{"device_id": 0, "sources": [seed_address]}],
                "OUTPUT_PREFIX": f"{workdir}/client-",
            },
            env=env,
        )
        print("[demo] starting client server (SOURCE = the seed) ...", flush=True)
        clock["client_start"] = time.time()
        client.start().wait_healthy()
        clock["client_healthy"] = time.time()
        client_address = wait_for_file(workdir / "client-0.txt", client)
        seed_info, client_info = query_seed(seed_address), query_seed(client_address)
        print(f"[demo] client healthy after {client.startup_seconds:.1f} s; "
              f"now a seed itself on {client_address}", flush=True)
        print(f"[demo] seed   weights: {describe(seed_info)}")
        print(f"[demo] client weights: {describe(client_info)}")
        fingerprints_match = seed_info["value_fingerprint"] == client_info["value_fingerprint"]
        print(f"[demo] weight value fingerprints equal: {fingerprints_match}")

        seed_out = seed.complete(PROMPTS, max_tokens=max_tokens)
        client_out = client.complete(PROMPTS, max_tokens=max_tokens)
        for prompt, a, b in zip(PROMPTS, seed_out, client_out, strict=True):
            print(f"[demo] {'same' if a == b else 'DIFF'} | {prompt!r} -> {a!r}")
            if a != b:
                print(f"[demo]      client -> {b!r}")
        from_seed = client_info["loaded_from"] == f"seed {seed_address}"
        identical = seed_out == client_out
        ok = identical and from_seed and fingerprints_match
        summary = {
            "identical_outputs": identical,
            "client_loaded_from": client_info["loaded_from"],
            "client_load_s": round(client_info["load_seconds"], 3),
            "seed_disk_load_s": round(seed_info["load_seconds"], 3),
            "bytes": client_info["bytes"],
        }
        print(json.dumps(summary))
        if phases_out is not None:
            clock["end"] = time.time()
            phases = demo_phases(seed.log_text(), client.log_text(), clock, model)
            phases_out.write_text(json.dumps(phases, indent=1) + "\n")
            print(f"[demo] start-up phases written to {phases_out}")
        print(
            f"netloader demo: {'PASS' if ok else 'FAIL'} - outputs "
            f"{'identical' if identical else 'DIFFER'} on {len(PROMPTS)} prompts; "
            f"client weights {describe(client_info)}"
        )
        return ok
    finally:
        for server in (client, seed):
            if server is not None:
                server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--workdir", default=".demo", type=Path)
    parser.add_argument("--max-tokens", default=32, type=int)
    parser.add_argument("--phases-out", type=Path,
                        help="write both servers' measured start-up phases (JSON) here")
    args = parser.parse_args()
    phases_out = args.phases_out.resolve() if args.phases_out else None
    return 0 if run(args.model, args.workdir.resolve(), args.max_tokens, phases_out) else 1


if __name__ == "__main__":
    sys.exit(main())
