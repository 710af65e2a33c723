"""vLLM's own model classes (Qwen2 dense, Qwen2 W8A8), built at tensor-parallel ranks
1, 2 and 4 in one process and filled by their ``load_weights`` from a checkpoint: a
client at each size gathers from a seed at each other size exactly what its own load
holds; what cannot be described is refused by name."""

import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from vllm_ascend.model_loader.netloader.reshard.gather import apply, plan_gather
from vllm_ascend.model_loader.netloader.reshard.slices import (
    Indescribable,
    Placement,
    Shard,
    describe,
)

ROOT = Path(__file__).resolve().parents[4]
# 4 query heads, 2 KV heads (replicated at size 4), a vocabulary of 1000 rows that
# vLLM pads to 1024 (the last rank at size 4 holds 232 rows and 24 zeros).
SHAPE = ["--hidden-size", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--intermediate-size", "128", "--vocab-size", "1000"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reshard-models")
    made = {}
    for kind in ("dense", "w8a8", "moe"):
        made[kind] = out / kind
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_model.py"),
                        str(made[kind]), "--kind", kind, *SHAPE], check=True,
                       capture_output=True)
    return made


def _group(size: int, rank: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        world_size=size, rank_in_group=rank, is_first_rank=True, is_last_rank=True,
        device_group=types.SimpleNamespace(size=lambda: size, rank=lambda: rank))


def build(path: Path, shard: Shard, load: bool = True) -> torch.nn.Module:
    """The model of ``path`` at ``shard`` (tensor-parallel size and rank; experts
    sharded or not, their placement and redundant copies), filled by its
    ``load_weights`` from the checkpoint. The seam: vLLM's process groups as the layers
    read them (tensor, pipeline, expert, data and context parallel). EPLB, which
    redundant experts need, is set on the config after vLLM's check that refuses it
    on CPU: the static placement it starts from is all a load uses."""
    from vllm.config import ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    parallel = ParallelConfig(tensor_parallel_size=shard.tp_size,
                              enable_expert_parallel=shard.expert_parallel,
                              expert_placement_strategy=shard.expert_placement)
    config = VllmConfig(model_config=ModelConfig(model=str(path), dtype="float32"),
                        parallel_config=parallel)
    config.parallel_config.enable_eplb = shard.redundant_experts > 0
    config.parallel_config.eplb_config.num_redundant_experts = shard.redundant_experts
    tp = _group(shard.tp_size, shard.tp_rank)
    with mock.patch.multiple(parallel_state, _TP=tp, _EP=tp, _PP=_group(1, 0),
                             _DP=_group(1, 0), _PCP=_group(1, 0)), \
            set_current_vllm_config(config):
        model = initialize_model(vllm_config=config)
        if load:
            files = sorted(str(f) for f in path.glob("*.safetensors"))
            model.load_weights(safetensors_weights_iterator(files, use_tqdm_on_load=False))
    return model


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.data for n, t in [*model.named_parameters(), *model.named_buffers()]}


def gathers_disk_equal(path: Path, seeds: list[Shard], clients: list[Shard]) -> None:
    """Each client shard gathers from the seed shards (one instance's ranks) exactly
    what its own load holds; what it predicts each seed rank holds is that rank's."""
    sources = []
    for seed in seeds:
        sources.append(tensors(build(path, seed)))
    for shard in clients:
        client = build(path, shard)
        mine = describe(client, shard)
        theirs = [describe(client, seed) for seed in seeds]
        for seed, predicted, held in zip(seeds, theirs, sources, strict=True):
            # Expert maps are built per layout and exist only with expert parallelism.
            moved = {n for n, p in predicted.items() if not p.built}
            assert moved and moved <= set(held), seed
            assert {n: predicted[n].shape for n in moved} == {
                n: tuple(held[n].shape) for n in moved}, seed
        disk = tensors(client)
        into = {n: torch.full_like(t, float("nan")) if t.is_floating_point() else
                torch.full_like(t, 7) for n, t in disk.items()}
        plan = plan_gather(mine, theirs)
        for name in plan.kept:  # built for the client's own layout (expert maps)
            into[name] = disk[name].clone()
        apply(plan, sources, into)
        for name, tensor in disk.items():
            assert torch.equal(into[name], tensor), (name, seeds[0], shard)


def ranks(size: int, **layout: object) -> list[Shard]:
    return [Shard(size, r, **layout) for r in range(size)]  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["dense", "w8a8", "moe"])
@pytest.mark.parametrize("seed_size, client_size", [(2, 1), (1, 2), (4, 2), (1, 4)])
def test_a_client_at_one_size_gathers_a_disk_equal_load_from_a_seed_at_another(
        checkpoints, kind, seed_size, client_size):
    gathers_disk_equal(checkpoints[kind], ranks(seed_size), ranks(client_size))


@pytest.mark.parametrize("seed, client", [
    (dict(size=2, redundant_experts=2), dict(size=4)),
    (dict(size=4), dict(size=2, redundant_experts=2)),
    (dict(size=2), dict(size=1, expert_parallel=False)),
], ids=["ep2-redundant-to-ep4", "ep4-to-ep2-redundant", "ep2-to-tp1"])
def test_experts_move_between_expert_parallel_sizes_and_placements(checkpoints, seed, client):
    """Below vLLM (vLLM CPU runs no expert parallelism): whole experts over the ranks,
    a static placement with redundant copies. (Round-robin placement needs grouped
    routing, which Qwen3-MoE lacks: vLLM places its experts linearly whatever is set.)"""

    def layout(spec: dict) -> list[Shard]:
        spec = {"expert_parallel": True, **spec}
        return ranks(spec.pop("size"), **spec)

    gathers_disk_equal(checkpoints["moe"], layout(seed), layout(client))


def test_the_descriptions_say_which_quantized_tensors_split(checkpoints):
    model = build(checkpoints["w8a8"], Shard(2, 0), load=False)
    placements = describe(model, Shard(2, 1))
    qkv_scale = placements["model.layers.0.self_attn.qkv_proj.weight_scale"]
    assert qkv_scale.logical == (64 + 2 * 2 * 16, 1)  # q, k, v rows, one scale each
    # The KV cache's scale: one per layer, whole on every rank.
    assert placements["model.layers.0.self_attn.attn.k_scale"] == Placement.whole((1,))
    # The int8 weight and its per-channel scale split alike.
    weight = placements["model.layers.0.mlp.gate_up_proj.weight"]
    scale = placements["model.layers.0.mlp.gate_up_proj.weight_scale"]
    assert weight.dims[0] == scale.dims[0]


def test_a_model_with_a_layer_class_it_cannot_describe_is_refused_by_name(checkpoints):
    model = build(checkpoints["dense"], Shard(), load=False)
    model.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)  # plain torch: no vLLM split
    with pytest.raises(Indescribable, match=r"model\.layers\.0\.mlp\.extra\.weight: no "
                                            r"description for layer class .*Linear"):
        describe(model, Shard(2, 0))
