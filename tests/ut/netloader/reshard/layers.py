"""Real vLLM layers built at any tensor-parallel rank in one process, filled by vLLM's
own ``weight_loader`` from checkpoint tensors: what a disk load puts in each rank.

The seam: ``vllm.distributed.parallel_state._TP``, the group every layer asks for its
size and rank, stands in as an object with ``world_size`` and ``rank_in_group``."""

import contextlib
import types
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from torch import nn

HIDDEN, HEAD, HEADS, KV_HEADS, VOCAB = 32, 8, 4, 2, 100


@contextlib.contextmanager
def tensor_parallel(size: int, rank: int) -> Iterator[None]:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    group = types.SimpleNamespace(world_size=size, rank_in_group=rank)
    with mock.patch.object(parallel_state, "_TP", group), set_current_vllm_config(VllmConfig()):
        yield


class Block(nn.Module):
    """One of each layer class a dense decoder has (Qwen2, Llama), small."""

    def __init__(self) -> None:
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import (
            ColumnParallelLinear,
            MergedColumnParallelLinear,
            QKVParallelLinear,
            ReplicatedLinear,
            RowParallelLinear,
        )
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            VocabParallelEmbedding,
        )

        super().__init__()
        dtype = torch.float32
        self.embed = VocabParallelEmbedding(VOCAB, HIDDEN, params_dtype=dtype)
        self.qkv = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=True,
                                     params_dtype=dtype)
        self.o = RowParallelLinear(HEADS * HEAD, HIDDEN, bias=True, params_dtype=dtype)
        self.gate_up = MergedColumnParallelLinear(HIDDEN, [48, 48], bias=False,
                                                  params_dtype=dtype)
        self.column = ColumnParallelLinear(HIDDEN, 24, bias=True, params_dtype=dtype)
        self.router = ReplicatedLinear(HIDDEN, 4, bias=False, params_dtype=dtype)
        self.norm = RMSNorm(HIDDEN)
        self.head = ParallelLMHead(VOCAB, HIDDEN, params_dtype=dtype)


def checkpoint(seed: int = 0) -> dict[str, tuple[str, object, torch.Tensor]]:
    """Checkpoint tensors of a ``Block``: name -> (parameter, shard id, values)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    q, kv = HEADS * HEAD, KV_HEADS * HEAD
    return {
        "embed": ("embed.weight", None, r(VOCAB, HIDDEN)),
        "q": ("qkv.weight", "q", r(q, HIDDEN)), "k": ("qkv.weight", "k", r(kv, HIDDEN)),
        "v": ("qkv.weight", "v", r(kv, HIDDEN)),
        "q_bias": ("qkv.bias", "q", r(q)), "k_bias": ("qkv.bias", "k", r(kv)),
        "v_bias": ("qkv.bias", "v", r(kv)),
        "o": ("o.weight", None, r(HIDDEN, q)), "o_bias": ("o.bias", None, r(HIDDEN)),
        "gate": ("gate_up.weight", 0, r(48, HIDDEN)), "up": ("gate_up.weight", 1, r(48, HIDDEN)),
        "column": ("column.weight", None, r(24, HIDDEN)), "column_bias": ("column.bias", None,
                                                                       r(24)),
        "router": ("router.weight", None, r(4, HIDDEN)),
        "norm": ("norm.weight", None, r(HIDDEN)),
        "head": ("head.weight", None, r(VOCAB, HIDDEN)),
    }


def loaded(size: int, rank: int, make: Callable[[], nn.Module] = Block,
           seed: int = 0) -> nn.Module:
    """``make()`` at tensor-parallel ``rank`` of ``size``, every tensor filled by its
    ``weight_loader`` from ``checkpoint(seed)`` (padding as vLLM leaves it: NaN first,
    so a row no loader writes would show)."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    with tensor_parallel(size, rank):
        layer = make()
    params = dict(layer.named_parameters())
    for p in params.values():
        p.data.fill_(float("nan"))
    for name, shard, values in checkpoint(seed).values():
        if name not in params:
            continue
        param = params[name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        with tensor_parallel(size, rank):
            loader(param, values) if shard is None else loader(param, values, shard)
    return layer
