"""What each layout costs a seed and saves a client, on a Qwen3-MoE of about 1 GB.

    python -m benchmarks.netloader_layouts [--workdir .bench/layouts] [--hidden-size 1024]

One seed (real vLLM CPU server, LAYOUT auto, INT8_CACHE hbm) serves both layouts; its
``info`` gives what each costs beyond the running model: ``retained_for_processed_bytes``
is the processed layout's (the kernel inputs vLLM CPU's oneDNN linears packed away),
``retained_bytes`` with ``hbm`` the loaded layout's (every loaded copy processing
replaced; what a seed with LAYOUT loaded keeps). Then two clients, one asking for each
layout (LAYOUT processed, LAYOUT loaded), one after the other; from their logs: the
Netloader load (``loaded ... in X s``: receiving, verifying, and for the processed one
the kernels rebuilt under ``weights_already_processed``) and the whole model load
(``model ready in``: building the model, the load, and processing or, for the processed
layout, rebuilding its kernels). Prints one JSON object last.
"""

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from tests.helpers.e2e import address_of
from tools.make_tiny_model import main as make_tiny_model
from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.client import query_seed

REPO = Path(__file__).resolve().parents[1]
LOADED = re.compile(r"Netloader rank 0 target loaded \d+ tensors \(([0-9.]+) GB\) from (\S+ \S+) "
                    r"in ([0-9.]+) s")
READY = re.compile(r"Netloader rank 0 target: model ready in ([0-9.]+) s")
SKIPPED = "processing skipped"


def build(workdir: Path, hidden: int, layers: int) -> Path:
    model = workdir / f"moe-h{hidden}-l{layers}"
    make_tiny_model([str(model), "--kind", "moe", "--hidden-size", str(hidden),
                     "--layers", str(layers), "--intermediate-size", str(hidden * 3)])
    return model


def client_figures(log: Path) -> dict[str, Any]:
    text = log.read_text(encoding="utf-8", errors="replace")
    loaded = LOADED.findall(text)
    ready = READY.findall(text)
    return {
        "loaded_from": loaded[-1][1] if loaded else None,
        "netloader_load_s": float(loaded[-1][2]) if loaded else None,
        "model_loading_s": float(ready[-1]) if ready else None,
        "processing_skipped": SKIPPED in text,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "layouts")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=18)  # about 1.03 GB
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    model = build(args.workdir, args.hidden_size, args.layers)
    nbytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    seed = VllmServer(
        str(model), load_format="netloader", cpu_bind="0",
        extra_config={"OUTPUT_PREFIX": f"{args.workdir}/seed-", "INT8_CACHE": "hbm"},
        log_path=args.workdir / "seed.log",
    )
    result: dict[str, Any] = {"model": str(model), "checkpoint_bytes": nbytes}
    with seed:
        info = query_seed(address_of(f"{args.workdir}/seed-"))
        result["seed"] = {
            "model_bytes": info["bytes"],
            "processed_layout_keeps_bytes": info["retained_for_processed_bytes"],
            "loaded_layout_keeps_bytes": info["retained_bytes"],
            "layouts": {k: "served" if "value_fingerprint" in v else v["unavailable"]
                        for k, v in info["layouts"].items()},
        }
        for layout in ("processed", "loaded"):
            log = args.workdir / f"client-{layout}.log"
            log.unlink(missing_ok=True)
            extra = {"SOURCE": [{"device_id": 0, "sources": [info["address"]]}],
                     "LAYOUT": layout}
            with VllmServer(str(model), load_format="netloader", cpu_bind="1",
                            extra_config=extra, log_path=log):
                pass
            result[f"client_{layout}"] = client_figures(log)
    result["total_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))
    ok = all(result[f"client_{k}"]["loaded_from"] == f"seed {info['address']}"
             for k in ("processed", "loaded"))
    return 0 if ok and result["client_processed"]["processing_skipped"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
