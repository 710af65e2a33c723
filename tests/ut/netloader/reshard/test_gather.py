"""A client at one tensor-parallel size gathers each of its tensors from seed ranks at
another: every element exactly once, equal to vLLM's own load at the client's rank."""

import pytest
import torch

from tests.ut.netloader.reshard.layers import loaded
from vllm_ascend.model_loader.netloader.reshard.gather import (
    Gather,
    Uncovered,
    apply,
    plan_gather,
)
from vllm_ascend.model_loader.netloader.reshard.slices import Shard, describe

LAYOUTS = [(2, 1), (1, 2), (4, 1), (1, 4), (4, 2), (2, 4)]


def fill(plan: Gather, seed_size: int, into: dict[str, torch.Tensor]) -> None:
    sources = [dict(loaded(seed_size, r).named_parameters()) for r in range(seed_size)]
    apply(plan, [{n: t.data for n, t in s.items()} for s in sources], into)


def fills_each_element_once(plan: Gather, shapes: dict[str, tuple[int, ...]]) -> bool:
    counts = {n: torch.zeros(s, dtype=torch.int32) for n, s in shapes.items()}
    for copy in plan.copies:
        counts[copy.name][copy.dst.index()] += 1
    for name, box in plan.zeros:
        counts[name][box.index()] += 1
    return all(bool((c == 1).all()) for c in counts.values())


@pytest.mark.parametrize("seed_size, client_size", LAYOUTS)
def test_a_client_gathers_a_disk_equal_load_from_seed_ranks_of_another_size(seed_size,
                                                                            client_size):
    for rank in range(client_size):
        client = loaded(client_size, rank, seed=0)
        disk = {n: t.data.clone() for n, t in client.named_parameters()}
        mine = describe(client, Shard(client_size, rank))
        # What each seed rank holds, as the client computes it from its own layers.
        theirs = [describe(client, Shard(seed_size, r)) for r in range(seed_size)]
        plan = plan_gather(mine, theirs)
        assert fills_each_element_once(plan, {n: t.shape for n, t in disk.items()})
        into = {n: torch.full_like(t, float("nan")) for n, t in disk.items()}
        fill(plan, seed_size, into)
        for name, tensor in disk.items():
            assert torch.equal(into[name], tensor), (name, seed_size, client_size, rank)


def test_replicated_tensors_are_spread_over_the_ranks_that_hold_them():
    """Both ranks of a size-2 seed hold the norm, the row-parallel bias and the
    replicated router whole: each goes to the rank asked for fewer elements so far."""
    client = loaded(1, 0)
    whole = ("o.bias", "router.weight", "norm.weight")

    def only(placements):
        return {n: placements[n] for n in whole}

    plan = plan_gather(only(describe(client, Shard())),
                       [only(describe(client, Shard(2, r))) for r in range(2)])
    assert [(c.name, c.source) for c in plan.copies] == [
        ("o.bias", 0), ("router.weight", 1), ("norm.weight", 0)]


def test_pipeline_stages_hold_disjoint_tensors_and_together_fill_the_client():
    """Two stages of a size-1 tensor-parallel seed: each holds some layers whole."""
    client = loaded(1, 0)
    mine = describe(client, Shard())
    names = sorted(mine)
    stages = [{n: mine[n] for n in names[:5]}, {n: mine[n] for n in names[5:]}]
    plan = plan_gather(mine, stages)
    assert {c.name for c in plan.copies if c.source == 0} == set(names[:5])
    assert {c.name for c in plan.copies if c.source == 1} == set(names[5:])


def test_a_missing_seed_rank_is_named_with_the_elements_nobody_holds():
    client = loaded(1, 0)
    only_first = [describe(client, Shard(2, 0))]
    with pytest.raises(Uncovered, match=r"no seed rank holds its elements") as e:
        plan_gather(describe(client, Shard()), only_first)
    assert e.value.name in {n for n, _ in client.named_parameters()}


def test_a_seed_whose_whole_tensor_differs_is_not_the_same_model():
    client = loaded(1, 0)
    mine = describe(client, Shard())
    theirs = dict(mine)
    other = mine["norm.weight"]
    theirs["norm.weight"] = type(other)((other.logical[0] * 2,), other.dims)
    with pytest.raises(Uncovered, match=r"norm\.weight: the whole tensor is"):
        plan_gather(mine, [theirs])
