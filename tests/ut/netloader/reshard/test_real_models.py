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
    for kind in ("dense", "w8a8"):
        made[kind] = out / kind
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_model.py"),
                        str(made[kind]), "--kind", kind, *SHAPE], check=True,
                       capture_output=True)
    return made


def build(path: Path, size: int, rank: int, load: bool = True) -> torch.nn.Module:
    """The model of ``path`` at tensor-parallel ``rank`` of ``size`` (the seam:
    vLLM's tensor-, pipeline- and expert-parallel groups as the layers read them),
    filled by its ``load_weights`` from the checkpoint."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    config = VllmConfig(model_config=ModelConfig(model=str(path), dtype="float32"))
    tp = types.SimpleNamespace(world_size=size, rank_in_group=rank)
    one = types.SimpleNamespace(world_size=1, rank_in_group=0, is_first_rank=True,
                                is_last_rank=True)
    with mock.patch.object(parallel_state, "_TP", tp), \
            mock.patch.object(parallel_state, "_PP", one), set_current_vllm_config(config):
        model = initialize_model(vllm_config=config)
        if load:
            files = sorted(str(f) for f in path.glob("*.safetensors"))
            model.load_weights(safetensors_weights_iterator(files, use_tqdm_on_load=False))
    return model


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.data for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("kind", ["dense", "w8a8"])
def test_every_size_gathers_a_disk_equal_load_from_every_other(checkpoints, kind):
    path = checkpoints[kind]
    sizes = (1, 2, 4)
    loads = {(s, r): build(path, s, r) for s in sizes for r in range(s)}
    for seed_size in sizes:
        sources = [tensors(loads[(seed_size, r)]) for r in range(seed_size)]
        for client_size in sizes:
            if client_size == seed_size:
                continue
            for rank in range(client_size):
                client = loads[(client_size, rank)]
                mine = describe(client, Shard(client_size, rank))
                theirs = [describe(client, Shard(seed_size, r)) for r in range(seed_size)]
                for r in range(seed_size):  # what the client predicts each seed rank holds
                    assert {n: p.shape for n, p in theirs[r].items()} == {
                        n: tuple(t.shape) for n, t in sources[r].items()}
                disk = tensors(client)
                into = {n: torch.full_like(t, 7) if not t.is_floating_point() else
                        torch.full_like(t, float("nan")) for n, t in disk.items()}
                apply(plan_gather(mine, theirs), sources, into)
                for name, tensor in disk.items():
                    assert torch.equal(into[name], tensor), (kind, name, seed_size,
                                                             client_size, rank)


def test_the_descriptions_say_which_quantized_tensors_split(checkpoints):
    model = build(checkpoints["w8a8"], 2, 0, load=False)
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
    model = build(checkpoints["dense"], 1, 0, load=False)
    model.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)  # plain torch: no vLLM split
    with pytest.raises(Indescribable, match=r"model\.layers\.0\.mlp\.extra\.weight: no "
                                            r"description for layer class .*Linear"):
        describe(model, Shard(2, 0))
