"""Where every element of a rank's tensor comes from: its place in the whole tensor.

A rank of a tensor-parallel instance holds a slice of each parameter; which one is
vLLM's choice, made in each layer class's ``__init__`` and ``weight_loader``
(vllm/model_executor/layers/linear.py, vocab_parallel_embedding.py). This module states
that choice for any rank of any tensor-parallel size, from what the layer object says
about itself (its class, its totals such as ``output_sizes`` and ``total_num_kv_heads``,
each parameter's ``output_dim`` / ``input_dim``), so a client at one size can tell which
elements a seed rank at another size holds without asking it.

The *logical* tensor of a parameter is what a disk load at tensor-parallel size 1 puts
in it, without padding: for ``qkv_proj.weight`` the rows of q, then k, then v, as the
checkpoint has them; for a vocab-parallel embedding the checkpoint's rows (the padding a
rank adds is zeros, ``weight_loader`` fills it so). A rank's tensor is a product of
per-dimension maps (``Placement``): along each dimension, runs of local indices that
hold runs of logical ones, or zeros.

Exactness over reach: a module class or parameter class this module does not know, a
packed or block-quantized dimension, a layer whose tensor-parallel group is not the
instance's, raise ``Indescribable`` naming the tensor and why; the caller then refuses
the cross-layout load (same-layout seeds and the disk still work). The unit tests check
every description against vLLM's own ``weight_loader`` at each rank.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class TensorProblem(ValueError):
    """Something about one tensor (``name``) that stops a cross-layout load (``why``)."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


class Indescribable(TensorProblem):
    """A tensor whose place in the whole cannot be stated exactly."""


@dataclass(frozen=True)
class Segment:
    """Along one dimension: local indices ``[start, start + length)`` hold logical
    indices ``[source, source + length)``; ``source`` None: zeros (padding)."""

    start: int
    length: int
    source: int | None


@dataclass(frozen=True)
class Placement:
    """One rank's tensor as a product of per-dimension maps into the logical tensor
    of shape ``logical``: ``dims[d]`` covers local dimension ``d`` in order, without
    gaps. Elements of a zero segment are zeros; all others equal the logical element."""

    logical: tuple[int, ...]
    dims: tuple[tuple[Segment, ...], ...]
    # Computed by each rank from its own layout when the model is built (an expert
    # map): no seed's copy is right for another layout, nothing moves.
    built: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The local tensor's shape (elements per dimension)."""
        return tuple(sum(s.length for s in segments) for segments in self.dims)

    def cells(self) -> Iterator[tuple[Segment, ...]]:
        """Every product of one segment per dimension (a box of the local tensor)."""
        yield from _product(self.dims)

    @classmethod
    def own(cls, shape: tuple[int, ...]) -> "Placement":
        """A tensor each rank builds for its own layout (``built``)."""
        return cls(tuple(shape), Placement.whole(shape).dims, built=True)

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> "Placement":
        """A tensor every rank holds whole (a norm, a row-parallel bias)."""
        return cls(tuple(shape), tuple((Segment(0, n, 0),) if n else () for n in shape))


@dataclass(frozen=True)
class Shard:
    """A rank's place in an instance's layout: its tensor-parallel group's size and its
    rank there; the data-parallel size and rank and whether experts are sharded
    (``enable_expert_parallel``) and how (``expert_placement``, vLLM's
    ``expert_placement_strategy``, and ``redundant_experts``), which decide where a MoE
    layer's experts sit."""

    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    expert_parallel: bool = False
    expert_placement: str = "linear"
    # Physical experts beyond the logical ones (EPLB's ``num_redundant_experts``).
    redundant_experts: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} outside size {self.tp_size}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"data-parallel rank {self.dp_rank} outside size {self.dp_size}")

    def experts(self) -> tuple[int, int, int, int]:
        """(tp size, tp rank, ep size, ep rank) of a MoE layer at this shard: vLLM
        spreads experts over data- and tensor-parallel ranks together
        (``FusedMoEParallelConfig.make``, fused_moe/config.py): split within each expert
        without expert parallelism, whole experts split over the ranks with it."""
        size = self.dp_size * self.tp_size
        rank = self.dp_rank * self.tp_size + self.tp_rank
        if self.expert_parallel and size > 1:
            return 1, 0, size, rank
        return size, rank, 1, 0


def describe(model: nn.Module, shard: Shard) -> dict[str, Placement]:
    """The ``Placement`` at ``shard`` of every tensor that moves (``manifest.model_tensors``:
    parameters then buffers, a tied or shared one under its first name) of ``model``,
    built in any layout: only its layout-independent attributes are read. Raises
    ``Indescribable`` for the first tensor it cannot state exactly."""
    found: dict[str, Placement] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner, _, pname = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        found[name] = describe_tensor(module, pname, tensor, shard, name)
    return found


def describe_tensor(module: nn.Module, pname: str, tensor: torch.Tensor, shard: Shard,
                    name: str) -> Placement:
    """The ``Placement`` at ``shard`` of ``module``'s parameter or buffer ``pname``
    (``tensor``, as built in the caller's own layout); ``name`` names it in errors."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        LinearBase,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    kind = type(module)
    if _is_attention(module) and tensor.numel() <= 1:
        # The attention's q/k/v/prob scales and zero points: one value per layer
        # (``Attention``'s ``_k_scale``, a KV-cache method's ``k_scale``), the same on
        # every rank. Per-head scales would split with the heads: refused below.
        return Placement.whole(tuple(tensor.shape))
    if isinstance(module, _replicated_classes()) or (
            isinstance(module, LinearBase) and getattr(module, "disable_tp", False)):
        return Placement.whole(tuple(tensor.shape))
    if isinstance(module, (LinearBase, VocabParallelEmbedding)):
        _check_parameter(tensor, name)
        own_size = getattr(module, "tp_size", None)
        if own_size is None or not _same_group(module):
            raise Indescribable(name, f"{kind.__name__} is split over a group other than "
                                      f"the instance's tensor-parallel group")
    if _is_routed_experts(module):
        return _experts(module, pname, tensor, shard, name)
    if isinstance(module, ReplicatedLinear):
        return Placement.whole(tuple(tensor.shape))
    if isinstance(module, VocabParallelEmbedding):
        return _vocab(module, tensor, shard, name)
    if isinstance(module, QKVParallelLinear):
        return _fused(module, tensor, _qkv_parts(module), shard, name)
    if isinstance(module, MergedColumnParallelLinear):
        return _fused(module, tensor, [_Even(int(n)) for n in module.output_sizes], shard,
                      name)
    if isinstance(module, ColumnParallelLinear):
        return _split(module, tensor, getattr(tensor, "output_dim", None), shard, name)
    if isinstance(module, RowParallelLinear):
        return _split(module, tensor, getattr(tensor, "input_dim", None), shard, name)
    raise Indescribable(name, f"no description for layer class {kind.__module__}."
                              f"{kind.__qualname__}")


def _replicated_classes() -> tuple[type, ...]:
    """Layer classes whose tensors are the same on every rank at any size: norms (their
    weight is one vector of the hidden size), rotary embeddings (a cache computed from
    the head size and the positions)."""
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm, LayerNorm, RMSNorm
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    return (RMSNorm, GemmaRMSNorm, LayerNorm, RotaryEmbeddingBase, nn.LayerNorm)


def _is_attention(module: nn.Module) -> bool:
    from vllm.model_executor.layers.attention.attention import Attention

    return isinstance(module, Attention)


def _is_routed_experts(module: nn.Module) -> bool:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return isinstance(module, RoutedExperts)


def _same_group(module: nn.Module) -> bool:
    """Whether the layer is split over the instance's tensor-parallel group (a
    vocab-parallel embedding may name its own ``parallel_group``)."""
    return getattr(module, "parallel_group", None) is None


def _check_parameter(tensor: torch.Tensor, name: str) -> None:
    """Refuse parameter classes whose split is not the plain one of their dimension:
    packed (several values per element along a dimension), block- or group-quantized
    scales, anything vLLM adds later."""
    from vllm.model_executor.parameter import (
        BasevLLMParameter,
        ChannelQuantScaleParameter,
        ModelWeightParameter,
        PerTensorScaleParameter,
    )

    plain = (ModelWeightParameter, ChannelQuantScaleParameter, PerTensorScaleParameter)
    if isinstance(tensor, BasevLLMParameter) and type(tensor) not in plain:
        raise Indescribable(name, f"parameter class {type(tensor).__name__} has no description")
    if getattr(tensor, "packed_dim", None) is not None or getattr(tensor, "is_transposed",
                                                                   False):
        raise Indescribable(name, "a packed or transposed dimension has no description")


def _even(total: int, shard: Shard, name: str) -> tuple[int, int]:
    """(start, length) of ``shard``'s even share of ``total`` (vLLM's ``divide``)."""
    if total % shard.tp_size:
        raise Indescribable(name, f"{total} does not split evenly over {shard.tp_size} ranks")
    length = total // shard.tp_size
    return shard.tp_rank * length, length


def _own(module: Any) -> Shard:
    """The shard ``module`` was built for (its ``tp_rank`` / ``tp_size``)."""
    return Shard(int(module.tp_size), int(module.tp_rank))


def _split(module: Any, tensor: torch.Tensor, dim: int | None, shard: Shard,
           name: str) -> Placement:
    """``tensor`` split evenly along ``dim`` (None: not split): ColumnParallelLinear's
    ``output_dim``, RowParallelLinear's ``input_dim`` (a row-parallel bias has none
    that its ``weight_loader`` reads: every rank holds it whole)."""
    if dim is None:
        return Placement.whole(tuple(tensor.shape))
    logical = list(tensor.shape)
    logical[dim] *= int(module.tp_size)
    start, length = _even(logical[dim], shard, name)
    dims = list(Placement.whole(tuple(logical)).dims)
    dims[dim] = (Segment(0, length, start),)
    return Placement(tuple(logical), tuple(dims))


@dataclass(frozen=True)
class _Even:
    """A fused part of ``total`` logical rows that ranks split evenly."""

    total: int

    def at(self, shard: Shard, name: str) -> tuple[int, int]:
        return _even(self.total, shard, name)


@dataclass(frozen=True)
class _Heads:
    """A fused part of ``heads`` attention heads of ``size`` rows each: split by whole
    heads, or, when ranks outnumber the heads, one head per rank, each held by
    ``tp_size / heads`` ranks (``QKVParallelLinear.num_kv_head_replicas``)."""

    heads: int
    size: int

    @property
    def total(self) -> int:
        return self.heads * self.size

    def at(self, shard: Shard, name: str) -> tuple[int, int]:
        if shard.tp_size >= self.heads:
            if shard.tp_size % self.heads:
                raise Indescribable(name, f"{shard.tp_size} ranks do not replicate "
                                          f"{self.heads} heads evenly")
            head = shard.tp_rank // (shard.tp_size // self.heads)
            return head * self.size, self.size
        start, length = _even(self.heads, shard, name)
        return start * self.size, length * self.size


def _qkv_parts(module: Any) -> list[_Heads]:
    """q, k and v of ``QKVParallelLinear`` in its output order (its ``output_sizes``
    and ``weight_loader``): query heads split by rank, key/value heads replicated where
    ranks outnumber them."""
    v_size = int(getattr(module, "v_head_size", module.head_size))
    return [_Heads(int(module.total_num_heads), int(module.head_size)),
            _Heads(int(module.total_num_kv_heads), int(module.head_size)),
            _Heads(int(module.total_num_kv_heads), v_size)]


def _fused(module: Any, tensor: torch.Tensor, parts: "list[_Even] | list[_Heads]",
           shard: Shard, name: str) -> Placement:
    """A fused column-parallel tensor (QKV, gate/up) whose ``output_dim`` holds each
    rank's share of every part, in order; other dimensions whole. Its local size must
    be what the parts give at the layer's own shard (else the layer is not what this
    description says)."""
    dim = getattr(tensor, "output_dim", None)
    if dim is None:
        # Per-tensor scales: one per fused part, the same on every rank.
        return Placement.whole(tuple(tensor.shape))
    own = sum(part.at(_own(module), name)[1] for part in parts)
    if tensor.shape[dim] != own:
        raise Indescribable(name, f"its output dimension holds {tensor.shape[dim]} "
                                  f"elements, its fused parts {own}")
    logical = list(tensor.shape)
    logical[dim] = sum(part.total for part in parts)
    dims = list(Placement.whole(tuple(logical)).dims)
    local = offset = 0
    segments = []
    for part in parts:
        start, length = part.at(shard, name)
        segments.append(Segment(local, length, offset + start))
        local += length
        offset += part.total
    dims[dim] = tuple(segments)
    return Placement(tuple(logical), tuple(dims))


def _vocab(module: Any, tensor: torch.Tensor, shard: Shard, name: str) -> Placement:
    """A vocab-parallel embedding or LM head at ``shard``: along ``output_dim`` its
    share of the checkpoint's rows (``VocabParallelEmbedding._get_indices``, vLLM's own
    arithmetic), then zeros to the padded share (``weight_loader`` fills them)."""
    dim = getattr(tensor, "output_dim", None)
    if dim is None:
        return Placement.whole(tuple(tensor.shape))
    if module.num_added_embeddings:
        raise Indescribable(name, "added (LoRA) vocabulary rows have no description")
    if module.num_embeddings_padded % shard.tp_size:
        raise Indescribable(name, f"{module.num_embeddings_padded} padded rows do not "
                                  f"split evenly over {shard.tp_size} ranks")
    indices = type(module)._get_indices(
        module.num_embeddings_padded, module.org_vocab_size_padded, module.num_embeddings,
        module.org_vocab_size, shard.tp_rank, shard.tp_size)
    rows = module.num_embeddings_padded // shard.tp_size
    if tensor.shape[dim] != module.num_embeddings_padded // int(module.tp_size):
        raise Indescribable(name, f"holds {tensor.shape[dim]} rows, not its padded share")
    logical = list(tensor.shape)
    logical[dim] = int(module.org_vocab_size)
    held = indices.num_org_elements
    segments = [Segment(0, held, indices.org_vocab_start_index)] if held else []
    if rows > held:
        segments.append(Segment(held, rows - held, None))
    dims = list(Placement.whole(tuple(logical)).dims)
    dims[dim] = tuple(segments)
    return Placement(tuple(logical), tuple(dims))


def _product(dims: tuple[tuple[Segment, ...], ...]) -> Iterator[tuple[Segment, ...]]:
    if not dims:
        yield ()
        return
    for first in dims[0]:
        for rest in _product(dims[1:]):
            yield (first, *rest)


def _experts(module: Any, pname: str, tensor: torch.Tensor, shard: Shard,
             name: str) -> Placement:
    """A MoE layer's expert weights (``RoutedExperts``, unquantized): ``w13_weight``
    [experts, 2 x intermediate, hidden] holds each expert's gate rows then its up rows,
    ``w2_weight`` [experts, hidden, intermediate] its down projection; both split the
    intermediate size over the MoE tensor-parallel ranks (``_load_w13``, ``_load_w2``)
    and hold the physical experts ``determine_expert_map`` places on the rank, physical
    expert ``p`` being logical expert ``build_initial_global_physical_to_logical_map``
    [p] (vLLM's static placement with redundant experts; dynamic EPLB moves them and
    makes the seed refuse once they moved, ``seed.server``)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    if pname in _EXPERT_MAPS:
        return Placement.own(tuple(tensor.shape))
    config = module.moe_config
    parallel = config.moe_parallel_config
    why = ("a quantized expert method" if type(module.quant_method) is not
           UnquantizedFusedMoEMethod else
           "expert biases" if config.has_bias else
           "padded intermediate sizes" if config.intermediate_pad or
           config.tp_shard_with_padding else
           "fused shared experts" if module.expert_map_manager.num_fused_shared_experts else
           "context parallelism" if parallel.pcp_size > 1 else
           "a non-gated activation" if not config.is_act_and_mul else
           f"the expert tensor {pname}" if pname not in ("w13_weight", "w2_weight") else "")
    if why or getattr(tensor, "is_transposed", False) or tensor.dim() != 3:
        raise Indescribable(name, f"no description for {why or 'a transposed layout'}")
    inter, hidden = int(config.intermediate_size), int(config.hidden_dim)
    logical, physical = int(config.num_logical_experts), int(config.num_experts)
    strategy = str(module.expert_map_manager.placement_strategy)
    slots = _expert_slots(logical, physical, parallel.ep_size, parallel.ep_rank, strategy)
    if tensor.shape[0] != len(slots) or tensor.shape[1 if pname == "w2_weight" else 2] != hidden:
        raise Indescribable(name, f"holds {tuple(tensor.shape)}, not {len(slots)} experts "
                                  f"of hidden size {hidden}")
    tp_size, tp_rank, ep_size, ep_rank = shard.experts()
    if (logical + shard.redundant_experts) % ep_size:
        raise Indescribable(name, f"{logical + shard.redundant_experts} experts do not "
                                  f"split evenly over {ep_size} ranks")
    placed = _expert_slots(logical, logical + shard.redundant_experts, ep_size, ep_rank,
                           shard.expert_placement)
    part = Shard(tp_size, tp_rank)
    if inter % tp_size or inter % parallel.tp_size:
        raise Indescribable(name, f"intermediate size {inter} does not split evenly")
    if tensor.shape[2 if pname == "w2_weight" else 1] * parallel.tp_size != (
            inter if pname == "w2_weight" else 2 * inter):
        raise Indescribable(name, f"holds {tuple(tensor.shape)}, not its intermediate share")
    start, length = _even(inter, part, name)
    experts = tuple(Segment(i, 1, logical) for i, logical in enumerate(placed))
    if pname == "w13_weight":
        rows = (Segment(0, length, start), Segment(length, length, inter + start))
        return Placement((logical, 2 * inter, hidden),
                         (experts, rows, (Segment(0, hidden, 0),)))
    return Placement((logical, hidden, inter),
                     (experts, (Segment(0, hidden, 0),), (Segment(0, length, start),)))


# What ``RoutedExperts`` registers for its placement (``ExpertMapManager``'s maps).
_EXPERT_MAPS = ("_expert_map", "expert_map", "_expert_mask", "expert_mask")


def _expert_slots(logical: int, physical: int, ep_size: int, ep_rank: int,
                  strategy: str) -> list[int]:
    """The logical expert each local expert slot of expert-parallel rank ``ep_rank``
    holds, of ``physical`` experts placed by ``strategy``."""
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    to_logical = EplbState.build_initial_global_physical_to_logical_map(
        logical, physical - logical)
    _, expert_map, _ = determine_expert_map(ep_size, ep_rank, physical,
                                            strategy)  # type: ignore[arg-type]
    if expert_map is None:
        return [int(to_logical[p]) for p in range(physical)]
    local = sorted((int(slot), p) for p, slot in enumerate(expert_map.tolist()) if slot >= 0)
    return [int(to_logical[p]) for _, p in local]
