"""Start one in-process vLLM instance and dump every tensor its model runs with.

Used by the e2e tests to compare a Netloader client with a disk load tensor by
tensor, after ``process_weights_after_loading``: parameters, buffers, tensors kept
as plain module attributes, and tensors captured by per-layer kernels' closures
(the CPU GEMM dispatch keeps packed weights there). Opaque kernel handles (oneDNN)
cannot be read; greedy outputs and logprobs cover those. The KV cache is skipped.

Test seams (faults injected at the client -> transport boundary):
  --fault corrupt   flip one bit of the first bucket received, after the network and
                    before the digest check
  --fault stall     print STALLED once the first bucket is on its way, then hang
                    (the test kills the process mid-transfer)
  --swarm N --swarm-from ADDR
                    after loading, fetch this model from ADDR N times at once and
                    compare every copy with this instance's own loaded weights

    python -m tests.e2e.dump_instance MODEL OUT.safetensors [--load-format F] [--extra JSON]
"""

import argparse
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def runtime_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        found[f"param:{name}"] = t
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr == "kv_cache":  # runtime memory, not weights
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found[f"attr:{mod_name}.{attr}"] = value
            for i, cell in enumerate(getattr(value, "__closure__", None) or ()):
                content = cell.cell_contents
                if isinstance(content, torch.Tensor):
                    found[f"closure:{mod_name}.{attr}.{i}"] = content
    return {k: v.detach().cpu().contiguous().clone() for k, v in found.items()}


class _FaultyGroup:
    """Wraps the client's process group; every other call goes to the real one."""

    def __init__(self, pg: Any, fault: str):
        self._pg = pg
        self._fault = fault
        self._first = True

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        work = self._pg.recv(tensors, src, tag)
        first, self._first = self._first, False
        if first and self._fault == "stall":
            print("STALLED", flush=True)
            time.sleep(3600)
        work.wait()
        if first and self._fault == "corrupt":
            flat = tensors[0].view(-1).view(torch.uint8)
            flat[flat.numel() // 2] ^= 1
        return _Done()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pg, name)


class _Done:
    def wait(self) -> bool:
        return True


def install_fault(fault: str) -> None:
    from vllm_ascend.model_loader.netloader import client

    real = client.data_group

    @contextlib.contextmanager
    def faulty(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with real(*args, **kwargs) as pg:
            yield _FaultyGroup(pg, fault)

    client.data_group = faulty  # type: ignore[assignment]


def swarm(n: int, address: str) -> dict[str, Any]:
    """N concurrent fetches of this instance's own model from ``address``."""
    from vllm_ascend.model_loader.netloader.client import WeightFetch
    from vllm_ascend.model_loader.netloader.loader import running_seeds
    from vllm_ascend.model_loader.netloader.manifest import byte_view

    (own,) = running_seeds().values()
    weights = own.weights
    fetches = [
        WeightFetch(
            own.identity, weights.specs,
            [torch.empty_like(t) for t in weights.tensors],
            timeout_s=120.0,
        )
        for _ in range(n)
    ]
    results: list[Any] = [None] * n
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, fetches[i].run((address,))))
        for i in range(n)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    equal = [
        results[i] is not None and all(
            torch.equal(byte_view(got), byte_view(want))
            for got, want in zip(fetches[i].targets, weights.tensors, strict=True)
        )
        for i in range(n)
    ]
    return {
        "hung": sum(t.is_alive() for t in threads),
        "served": sum(r is not None for r in results),
        "equal_to_own_load": sum(equal),
        "reasons": [f.reasons for f in fetches],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--extra", default="{}")
    parser.add_argument("--fault", choices=["corrupt", "stall"])
    parser.add_argument("--swarm", type=int, default=0)
    parser.add_argument("--swarm-from")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import save_file
    from vllm import LLM

    if args.fault:
        install_fault(args.fault)
    llm = LLM(
        args.model, load_format=args.load_format, max_model_len=256, enforce_eager=True,
        model_loader_extra_config=json.loads(args.extra),
    )
    (tensors,) = llm.apply_model(runtime_tensors)
    save_file(tensors, args.out)
    # The engine runs in this process, so its Netloader seed (if any) is visible here.
    from vllm_ascend.model_loader.netloader.loader import running_seeds

    report: dict[str, Any] = {
        "tensors": len(tensors), "seeds": [s.describe() for s in running_seeds().values()],
    }
    if args.swarm:
        report["swarm"] = swarm(args.swarm, args.swarm_from)
    print("DUMP " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
