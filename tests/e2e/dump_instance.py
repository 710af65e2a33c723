"""Start one in-process vLLM instance and dump every tensor its model runs with.

Used by the e2e tests to compare a Netloader client with a disk load tensor by
tensor, after ``process_weights_after_loading``: parameters, buffers, tensors kept
as plain module attributes, and tensors captured by per-layer kernels' closures
(the CPU GEMM dispatch keeps packed weights there). Opaque kernel handles (oneDNN)
cannot be read; greedy outputs and logprobs cover those. The KV cache is skipped.

    python -m tests.e2e.dump_instance MODEL OUT.safetensors [--load-format F] [--extra JSON]
"""

import argparse
import json
import os

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--extra", default="{}")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import save_file
    from vllm import LLM

    llm = LLM(
        args.model, load_format=args.load_format, max_model_len=256, enforce_eager=True,
        model_loader_extra_config=json.loads(args.extra),
    )
    (tensors,) = llm.apply_model(runtime_tensors)
    save_file(tensors, args.out)
    # The engine runs in this process, so its Netloader seed (if any) is visible here.
    from vllm_ascend.model_loader.netloader.loader import running_seeds

    seeds = [seed.describe() for seed in running_seeds().values()]
    print("DUMP " + json.dumps({"tensors": len(tensors), "seeds": seeds}))


if __name__ == "__main__":
    main()
