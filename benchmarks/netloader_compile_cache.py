"""A client's time-to-healthy with and without the seed's compile cache (vLLM CPU).

    python -m benchmarks.netloader_compile_cache [--model DIR] [--repeats 1]
                                                 [--workdir .bench/compile_cache]

Every instance runs without ``--enforce-eager`` (vLLM compiles during warm-up), bound
to the same CPU (so vLLM's compile cache names match), with a cache root
(``VLLM_CACHE_ROOT``) of its own and a shared secret:

1. a seed loads from disk and compiles;
2. per repeat, a client fetches the weights from it with ``COMPILE_CACHE: false``
   (it compiles itself), then one with the default (``auto``: the secret is set, so it
   installs the seed's cache and vLLM loads the artifact).

Time-to-healthy is from process start to the first 200 from ``/health``. The JSON line
printed last holds ``client_without_cache_s`` and ``client_with_cache_s`` (medians),
``compile_cache_speedup`` (without / with), vLLM's own "init engine" time (profiling,
KV cache, warm-up: where the compile happens) for both, whether every client with the cache loaded
vLLM's artifact (``loaded_artifact``) and whether every client's greedy texts equal the
seed's (``outputs_equal``).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from tools.make_tiny_model import main as make_tiny_model
from tools.vllm_server import VllmServer

SECRET = "netloader-compile-cache-benchmark-secret"
PROMPTS = ["The quickest way to start a new server is", "1, 2, 3, 4,"]
LOADED = "Directly load AOT compilation from path"
HEALTHY_S = 900
# vLLM's own line for profiling, KV cache and warm-up (the compile happens in there).
INIT_ENGINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)")


def server(model: str, workdir: Path, name: str, sources: list[str] | None,
           compile_cache: Any = "auto") -> VllmServer:
    cache = workdir / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    extra: dict[str, Any] = {"OUTPUT_PREFIX": f"{workdir}/{name}-", "COMPILE_CACHE": compile_cache}
    if sources:
        extra["SOURCE"] = [{"device_id": 0, "sources": sources}]
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)
    return VllmServer(
        model, load_format="netloader", cpu_bind="0", extra_config=extra, log_path=log,
        extra_args=["--no-enable-prefix-caching"], enforce_eager=False,
        env={"VLLM_CACHE_ROOT": str(cache), "NETLOADER_SECRET": SECRET},
    )


def started(s: VllmServer) -> float:
    s.start()
    s.wait_healthy(HEALTHY_S)
    assert s.startup_seconds is not None
    return s.startup_seconds


def client_run(model: str, workdir: Path, name: str, seed_address: str, compile_cache: Any,
               reference: list[str]) -> dict[str, Any]:
    client = server(model, workdir, name, [seed_address], compile_cache)
    try:
        seconds = started(client)
        init = INIT_ENGINE.search(client.log_text())
        return {
            "seconds": round(seconds, 2),
            "init_engine_s": float(init.group(1)) if init else None,
            "loaded_artifact": LOADED in client.log_text(),
            "outputs_equal": client.complete(PROMPTS, max_tokens=16) == reference,
            "load_avg": round(os.getloadavg()[0], 2),
        }
    finally:
        client.stop()


def measure(model: str, workdir: Path, repeats: int) -> dict[str, Any]:
    seed = server(model, workdir, "seed", None)
    try:
        seed_s = started(seed)
        reference = seed.complete(PROMPTS, max_tokens=16)
        address = Path(f"{workdir}/seed-0.txt").read_text().strip()
        without, with_ = [], []
        for i in range(repeats):
            without.append(client_run(model, workdir, f"plain{i}", address, False, reference))
            with_.append(client_run(model, workdir, f"cached{i}", address, "auto", reference))
    finally:
        seed.stop()
    off = statistics.median(r["seconds"] for r in without)
    on = statistics.median(r["seconds"] for r in with_)
    return {
        "seed_s": round(seed_s, 2),
        "client_without_cache_s": off,
        "client_with_cache_s": on,
        "compile_cache_speedup": round(off / on, 2),
        "init_engine_without_s": _median(r["init_engine_s"] for r in without),
        "init_engine_with_s": _median(r["init_engine_s"] for r in with_),
        "loaded_artifact": all(r["loaded_artifact"] for r in with_),
        "compiled_without": not any(r["loaded_artifact"] for r in without),
        "outputs_equal": all(r["outputs_equal"] for r in without + with_),
        "runs": {"without": without, "with": with_},
    }


def _median(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="model directory (default: the tiny Qwen2 model)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", default=".bench/compile_cache")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = str(workdir / "tiny-qwen2")
        if not Path(model, "config.json").exists():
            make_tiny_model([model])
    start = time.monotonic()
    result = measure(model, workdir, args.repeats)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
