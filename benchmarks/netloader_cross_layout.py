"""A client at TP=1 loading a dense model of about 1 GB from a TP=2 seed, against the
same-layout transfer of the same model (issue 25's ``cross_layout_over_same``).

    python -m benchmarks.netloader_cross_layout [--gb 1] [--workdir .bench/cross-layout]

Two seeds (real vLLM CPU servers that loaded from disk, LISTEN_PORT fixed) serve at
once: one at TP=2, one at TP=1. Then two TP=1 clients, one after the other, each from
the same model directory: one named the TP=1 seed (``LAYOUT loaded``: the same bytes
move as across layouts, and the client processes them alike), one named rank 0 of the
TP=2 seed (it is refused the same-layout transfer, learns rank 1 and gathers from
both). From their logs: the Netloader load (``loaded ... in X s``: for the cross-layout
client also the refused same-layout attempt and the seed's ``info``), and the whole
model load (``model ready in``). Prints one JSON object last; exit 1 unless each client
loaded from the seed it was meant to.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers.e2e import SERVER_ARGS, address_of, start_all
from tools.vllm_server import VllmServer, free_port

REPO = Path(__file__).resolve().parents[1]
LOADED = re.compile(r"Netloader rank 0 target loaded \d+ tensors \(([0-9.]+) GB\) from (.+?) "
                    r"in ([0-9.]+) s")
READY = re.compile(r"Netloader rank 0 target: model ready in ([0-9.]+) s")
GATHERED = re.compile(r"gathered (\d+) bytes across layouts from (\d+) seed rank\(s\) in "
                      r"([0-9.]+) s")


def figures(log: Path) -> dict[str, Any]:
    text = log.read_text(encoding="utf-8", errors="replace")
    loaded, ready, gathered = LOADED.findall(text), READY.findall(text), GATHERED.findall(text)
    return {
        "loaded_from": loaded[-1][1] if loaded else None,
        "netloader_load_s": float(loaded[-1][2]) if loaded else None,
        "model_loading_s": float(ready[-1]) if ready else None,
        "gather_s": float(gathered[-1][2]) if gathered else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "cross-layout")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = REPO / ".models" / f"bench-{args.gb:g}gb"
    subprocess.run([sys.executable, "tools/make_tiny_model.py", str(model), "--target-gb",
                    str(args.gb)], cwd=REPO, check=True, capture_output=True)
    start = time.monotonic()
    ports = {1: free_port(1), 2: free_port(2)}
    seeds = {
        size: VllmServer(
            str(model), load_format="netloader", cpu_bind="0|1" if size == 2 else "0",
            extra_config={"OUTPUT_PREFIX": f"{args.workdir}/tp{size}-seed-",
                          "LISTEN_PORT": ports[size]},
            log_path=args.workdir / f"tp{size}-seed.log",
            extra_args=[*SERVER_ARGS, "--tensor-parallel-size", str(size)],
        ) for size in (1, 2)
    }
    result: dict[str, Any] = {"model": str(model),
                              "checkpoint_bytes": sum(f.stat().st_size
                                                      for f in model.glob("*.safetensors"))}
    try:
        start_all(*seeds.values())
        addresses = {size: address_of(f"{args.workdir}/tp{size}-seed-") for size in (1, 2)}
        for name, size, layout in (("same_layout", 1, "loaded"), ("cross_layout", 2, None)):
            log = args.workdir / f"client-{name}.log"
            log.unlink(missing_ok=True)
            extra: dict[str, Any] = {"SOURCE": [{"device_id": 0,
                                                  "sources": [addresses[size]]}]}
            if layout is not None:
                extra["LAYOUT"] = layout
            with VllmServer(str(model), load_format="netloader", cpu_bind="1",
                            extra_config=extra, log_path=log, extra_args=SERVER_ARGS):
                pass
            result[name] = figures(log)
    finally:
        for seed in seeds.values():
            seed.stop()
    same, cross = result["same_layout"], result["cross_layout"]
    if same["netloader_load_s"] and cross["netloader_load_s"]:
        result["cross_layout_over_same"] = round(
            cross["netloader_load_s"] / same["netloader_load_s"], 3)
    if same["model_loading_s"] and cross["model_loading_s"]:
        result["cross_layout_over_same_model_loading"] = round(
            cross["model_loading_s"] / same["model_loading_s"], 3)
    result["total_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))
    ok = (same["loaded_from"] == f"seed {addresses[1]}"
          and cross["loaded_from"] == f"seed {addresses[2]} (across layouts)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
