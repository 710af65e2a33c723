"""Each rank's tensors, as vLLM's own ``weight_loader`` fills them at any
tensor-parallel size, equal what ``slices.describe`` says they hold; a tensor it cannot
describe is refused by name."""

import pytest
import torch
from torch import nn

from tests.ut.netloader.reshard.layers import (
    HIDDEN,
    KV_HEADS,
    VOCAB,
    loaded,
    tensor_parallel,
)
from vllm_ascend.model_loader.netloader.reshard.slices import (
    Indescribable,
    Placement,
    Shard,
    describe,
)

SIZES = [(size, rank) for size in (1, 2, 4) for rank in range(size)]


def logical_of(whole: nn.Module, placements: dict[str, Placement]) -> dict[str, torch.Tensor]:
    """The logical tensors: a disk load at size 1 without its padding."""
    tensors = dict(whole.named_parameters())
    return {name: tensors[name][tuple(slice(0, n) for n in p.logical)]
            for name, p in placements.items()}


def materialize(placement: Placement, logical: torch.Tensor) -> torch.Tensor:
    """What a rank holds according to ``placement``, built from the logical tensor."""
    out = torch.full(placement.shape, float("nan"), dtype=logical.dtype)
    for cell in placement.cells():
        local = tuple(slice(s.start, s.start + s.length) for s in cell)
        if any(s.source is None for s in cell):
            out[local] = 0
        else:
            out[local] = logical[tuple(slice(s.source, s.source + s.length) for s in cell)]
    return out


@pytest.mark.parametrize("size, rank", SIZES)
def test_every_tensor_of_every_rank_is_what_its_description_says(size, rank):
    whole = loaded(1, 0)
    logical = logical_of(whole, describe(whole, Shard()))
    layer = loaded(size, rank)
    placements = describe(layer, Shard(size, rank))
    assert set(placements) == {n for n, _ in layer.named_parameters()}
    for name, tensor in layer.named_parameters():
        assert placements[name].shape == tuple(tensor.shape), name
        assert torch.equal(materialize(placements[name], logical[name]), tensor.data), name


@pytest.mark.parametrize("built", [(1, 0), (2, 1), (4, 2)])
def test_a_layer_built_in_one_layout_describes_every_other(built):
    """A client at one size computes what a seed rank at another holds from its own
    layer objects (their totals, not their shapes)."""
    layer = loaded(*built)
    for size, rank in SIZES:
        there = loaded(size, rank)
        mine = describe(layer, Shard(size, rank))
        assert mine == describe(there, Shard(size, rank))


def test_key_value_heads_are_replicated_when_ranks_outnumber_them():
    """At size 4 with 2 KV heads, ranks 0 and 1 hold head 0, ranks 2 and 3 head 1."""
    layer = loaded(1, 0)
    k_rows = []
    for rank in range(4):
        qkv = describe(layer, Shard(4, rank))["qkv.weight"]
        q, k, v = qkv.dims[0]
        k_rows.append(k.source)
    head = layer.qkv.head_size
    q_rows = layer.qkv.total_num_heads * head
    assert KV_HEADS == 2
    assert k_rows == [q_rows, q_rows, q_rows + head, q_rows + head]


def test_a_vocabulary_the_ranks_do_not_divide_ends_in_zeros():
    """100 rows padded to 128: at size 4 the last rank holds rows 96-99 and 28 zeros."""
    layer = loaded(1, 0)
    embed = describe(layer, Shard(4, 3))["embed.weight"]
    assert embed.logical == (VOCAB, HIDDEN)
    assert [(s.start, s.length, s.source) for s in embed.dims[0]] == [(0, 4, 96), (4, 28, None)]


def test_a_layer_class_without_a_description_is_refused_by_name():
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Parameter(torch.zeros(4, 4))

    model = nn.Module()
    model.block = nn.Module()
    model.block.mixer = Mixer()
    with pytest.raises(Indescribable, match=r"block\.mixer\.mix: no description for layer class "
                                            r".*Mixer") as e:
        describe(model, Shard(2, 0))
    assert e.value.name == "block.mixer.mix"


def test_a_packed_parameter_is_refused_by_name():
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    with tensor_parallel(1, 0):
        model = nn.Module()
        model.proj = ColumnParallelLinear(HIDDEN, 16, bias=False, params_dtype=torch.float32)
    model.proj.weight.packed_dim = 1  # as int4 methods mark theirs
    with pytest.raises(Indescribable, match=r"proj\.weight: a packed"):
        describe(model, Shard(2, 1))


def test_a_size_that_does_not_split_a_layer_is_refused_by_name():
    layer = loaded(1, 0)
    with pytest.raises(Indescribable, match=r"embed\.weight: 128 padded rows do not split "
                                            r"evenly over 3 ranks"):
        describe(layer, Shard(3, 0))
