"""Start one in-process vLLM instance and dump every tensor its model runs with.

Used by the e2e tests to compare a Netloader client with a disk load tensor by
tensor, after ``process_weights_after_loading``: parameters, buffers, tensors kept
as plain module attributes, and tensors captured by per-layer kernels' closures
(the CPU GEMM dispatch keeps packed weights there). Opaque kernel handles (oneDNN)
cannot be read; greedy outputs and logprobs cover those. The KV cache is skipped.

Test seams (faults injected at the client -> data plane boundary):
  --fault corrupt   flip one bit of the first bucket (or piece, received in place)
                    received, after the network and before the digest check
  --fault stall     print STALLED once the first bucket has arrived, then hang
                    (the test kills the process mid-transfer)
  --swarm N --swarm-from ADDR
                    after loading, fetch this model from ADDR N times at once and
                    compare every copy with this instance's own loaded weights
  --llm JSON        more keyword arguments for vllm.LLM (speculative_config, quantization,
                    enable_lora, runner, tensor_parallel_size, enforce_eager (default
                    true; vLLM CPU runs pipeline parallelism only compiled), ...)
  --generate        put greedy texts and per-token logprobs of PROMPTS in the report
                    (embeddings for a pooling model), one prompt at a time; with
                    --lora PATH also those of each prompt with that LoRA adapter, and
                    with --image-prompt P that of prompt P with one generated image
  --reload          call reload_weights (vLLM's in-place reload) before dumping
  --reload-from P   the same, from the checkpoint in directory P
  --serve           after the report, go on serving as a seed until stdin ends
  --then-file F     then drop this instance and start another in this process, with the
                    arguments (a JSON list) the test writes to F once it knows them
  --serve-tampered  after loading, serve a hostile seed of this model: in the loaded
                    layout the first buffer (rotary cache) holds other values under a
                    matching digest, and the last tensor's digest is wrong, so a client's
                    transfer fails at its very end; the processed layout has every digest
                    right but another state signature, so a client fails only after it
                    installed and processed the tensors; prints TAMPERED <address> and
                    serves until stdin ends

    python -m tests.helpers.dump_instance MODEL OUT.safetensors [--load-format F] [--extra JSON]
"""

import argparse
import json
import os
import sys
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


PROMPTS = [
    "The quickest way to start a new server is",
    "Once upon a time, in a data center far away,",
]


def draft_view(worker: Any) -> dict[str, Any]:
    """A speculative decoder's draft as its proposer runs it: the flags its load set,
    which modules it shares with the target, and every draft tensor's blake3."""
    from vllm_ascend.model_loader.netloader.manifest import digest

    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    draft = getattr(drafter, "model", None)
    if draft is None:
        return {}
    target = runner.get_model()
    draft_ids = {id(m) for m in draft.modules()}
    return {
        "class": type(draft).__name__,
        "flags": {f: getattr(draft, f) for f in ("has_own_embed_tokens", "has_own_lm_head")
                  if hasattr(draft, f)},
        # Target modules the draft runs with (the proposer shares them in place).
        "shared": sorted(name for name, m in target.named_modules()
                         if name and id(m) in draft_ids and not list(m.children())),
        "digests": {name: digest(t) for name, t in runtime_tensors(draft).items()},
    }


def test_image() -> Any:
    """A 64x48 RGB gradient: the same pixels every run."""
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4 % 256, y * 5 % 256, x * y % 256) for y in range(48) for x in range(64)])
    return image


def outputs(llm: Any, lora: str | None, image_prompt: str | None) -> dict[str, Any]:
    """Greedy completions (or embeddings) of PROMPTS, one request each."""
    from vllm import SamplingParams

    if llm.llm_engine.model_config.runner_type == "pooling":
        return {"embeddings": [llm.embed([p], use_tqdm=False)[0].outputs.embedding
                               for p in PROMPTS]}
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=1)

    def run(request: Any, prompts: list[Any] = PROMPTS) -> list[Any]:
        done = []
        for prompt in prompts:
            out = llm.generate([prompt], params, use_tqdm=False, lora_request=request)
            o = out[0].outputs[0]
            done.append([o.text, [next(iter(d.values())).logprob for d in o.logprobs]])
        return done

    found: dict[str, Any] = {"greedy": run(None)}
    if image_prompt is not None:
        found["image"] = run(None, [{"prompt": image_prompt,
                                     "multi_modal_data": {"image": test_image()}}])
    if lora is not None:
        from vllm.lora.request import LoRARequest

        found["lora"] = run(LoRARequest("adapter", 1, lora))
    return found


def spec_counts(llm: Any) -> dict[str, float]:
    """Draft tokens proposed and accepted so far (0 without a draft)."""
    counts = {"drafted": 0.0, "accepted": 0.0}
    for metric in llm.get_metrics():
        for key, name in (("drafted", "vllm:spec_decode_num_draft_tokens"),
                          ("accepted", "vllm:spec_decode_num_accepted_tokens")):
            if metric.name == name:
                counts[key] += float(getattr(metric, "value", 0))
    return counts


def install_fault(fault: str) -> None:
    """Wrap the client's host data plane (``client.StreamLink``): the module seam."""
    from vllm_ascend.model_loader.netloader import client
    from vllm_ascend.model_loader.netloader.planes.stream import StreamLink

    class FaultyLink(StreamLink):
        def receive(self, sizes: Any) -> Iterator[torch.Tensor]:
            for k, bucket in enumerate(super().receive(sizes)):
                if k == 0 and fault == "stall":
                    print("STALLED", flush=True)
                    time.sleep(3600)
                if k == 0 and fault == "corrupt":
                    bucket[bucket.numel() // 2] ^= 1
                yield bucket

        def receive_into(self, buckets: Any, on_reached: Any = None,
                         inline: bool = False) -> Iterator[Any]:
            first = True
            for position, piece in super().receive_into(buckets, on_reached, inline):
                if first and piece is not None and len(piece):
                    first = False
                    if fault == "stall":
                        print("STALLED", flush=True)
                        time.sleep(3600)
                    if fault == "corrupt":
                        piece[len(piece) // 2] ^= 1
                yield position, piece

    client.StreamLink = FaultyLink  # type: ignore[misc]


def settled(seed: Any, timeout_s: float = 120.0) -> dict[str, Any]:
    """``seed.describe()`` once it is done preparing (a seed that loaded from disk
    hashes its large tensors after start-up; its value fingerprint comes then)."""
    deadline = time.monotonic() + timeout_s
    while "preparing" in (info := seed.describe()):
        if info["preparing"].get("error") or time.monotonic() > deadline:
            return info  # the test sees why
        time.sleep(0.1)
    return info


def own_seed() -> Any:
    """This process's one seed, once it is done preparing (a seed that loaded from disk
    hashes its large tensors after start-up: until then it serves no layout)."""
    from vllm_ascend.model_loader.netloader.seed.running import running_seeds

    (own,) = running_seeds().values()
    assert "preparing" not in settled(own), "this instance's seed is still preparing"
    return own


def serve_tampered() -> str:
    """Replace this process's seed with a hostile one (see the module doc)."""
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, digest
    from vllm_ascend.model_loader.netloader.seed.server import Layouts, SeedServer
    from vllm_ascend.model_loader.netloader.wire.addresses import listen

    own = own_seed()
    # The dense model's processed layout holds its loaded bytes (every linear's weight
    # is a oneDNN kernel's input): the base of both hostile layouts.
    weights = own.layouts.processed
    assert weights is not None
    named = [(spec.name, t) for spec, t in zip(weights.specs, weights.tensors, strict=True)]
    digests = list(weights.digests)
    first_buffer = next(i for i, (name, _) in enumerate(named) if name.endswith("cos_sin_cache"))
    name, cache = named[first_buffer]
    named[first_buffer] = (name, cache + 1)
    digests[first_buffer] = digest(named[first_buffer][1])
    digests[-1] = "0" * 64
    assert first_buffer < len(named) - 1, "the failure must come after the buffer"
    own.stop()
    settings = own.settings
    layouts = Layouts(LoadedWeights(named, digests), weights, "0" * 64)
    hostile = SeedServer(layouts, settings, listen(settings.host, 0))
    return hostile.start().address


def swarm(n: int, address: str) -> dict[str, Any]:
    """N concurrent fetches of this instance's own model from ``address``."""
    from vllm_ascend.model_loader.netloader.client import ClientSettings, WeightFetch
    from vllm_ascend.model_loader.netloader.manifest import byte_view

    own = own_seed()
    weights = own.weights
    fetches = [
        WeightFetch(
            ClientSettings(own.identity, timeout_s=120.0), weights.specs,
            [torch.empty_like(t) for t in weights.tensors],
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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--extra", default="{}")
    parser.add_argument("--fault", choices=["corrupt", "stall"])
    parser.add_argument("--swarm", type=int, default=0)
    parser.add_argument("--swarm-from")
    parser.add_argument("--serve-tampered", action="store_true")
    parser.add_argument("--llm", default="{}")
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--lora")
    parser.add_argument("--image-prompt")
    parser.add_argument("--reload", action="store_true")
    parser.add_argument("--reload-from")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--then-file")
    return parser


def instance(args: argparse.Namespace) -> None:
    """Start one instance, dump it, print its report, serve if asked; returns with the
    instance gone (its LLM is dropped with this frame)."""
    more = json.loads(args.llm)
    if args.generate:
        more.setdefault("disable_log_stats", False)  # LLM.get_metrics needs the stats
    if more.get("tensor_parallel_size", 1) * more.get("pipeline_parallel_size", 1) == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import save_file
    from vllm import LLM

    if args.fault:
        install_fault(args.fault)
    llm = LLM(
        args.model, load_format=args.load_format, max_model_len=256,
        enforce_eager=more.pop("enforce_eager", True),
        model_loader_extra_config=json.loads(args.extra), **more,
    )
    if args.reload:
        llm.collective_rpc("reload_weights")
    if args.reload_from:
        llm.collective_rpc("reload_weights", kwargs={"weights_path": args.reload_from})
    # By module name, not __main__: with TP > 1 the functions travel to the workers.
    from tests.helpers import dump_instance as this

    per_rank = llm.apply_model(this.runtime_tensors)
    tensors = per_rank[0] if len(per_rank) == 1 else {
        f"rank{r}:{name}": t for r, ts in enumerate(per_rank) for name, t in ts.items()
    }
    save_file(tensors, args.out)
    # The engine runs in this process, so its Netloader seed (if any) is visible here.
    from vllm_ascend.model_loader.netloader.seed.running import running_seeds

    report: dict[str, Any] = {
        "tensors": len(tensors), "seeds": [settled(s) for s in running_seeds().values()],
    }
    if args.swarm:
        report["swarm"] = swarm(args.swarm, args.swarm_from)
    if args.generate:
        # vLLM's counters are process-wide: an earlier instance's counts are subtracted.
        before = spec_counts(llm)
        report["outputs"] = outputs(llm, args.lora, args.image_prompt)
        report["spec"] = {k: v - before[k] for k, v in spec_counts(llm).items()}
        report["draft"] = llm.collective_rpc(this.draft_view)[0]
    # One write() of the whole line: print() hands a line over 8 KiB to the file in
    # pieces, and a log line from another thread landed between them once (a fresh
    # run's [lora] report cut at char 1612).
    sys.stdout.flush()
    line = memoryview(("DUMP " + json.dumps(report) + "\n").encode())
    while line:
        line = line[os.write(sys.stdout.fileno(), line):]
    if args.serve:
        sys.stdin.read()
    if args.serve_tampered:
        print("TAMPERED " + serve_tampered(), flush=True)
        sys.stdin.read()


def main() -> None:
    args = parser().parse_args()
    instance(args)
    if args.then_file:
        # A second instance in this process, once the test has written its arguments:
        # it saves the ~10 s of importing vLLM again (the e2e model-kind tests).
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        gc.collect()
        cleanup_dist_env_and_memory()
        deadline = time.monotonic() + 300
        while not os.path.exists(args.then_file):
            if time.monotonic() > deadline:
                raise SystemExit(f"no {args.then_file} within 300 s")
            time.sleep(0.2)
        with open(args.then_file, encoding="utf-8") as f:
            instance(parser().parse_args(json.load(f)))


if __name__ == "__main__":
    main()
