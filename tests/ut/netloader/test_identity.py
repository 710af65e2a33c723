"""What a model is: identity fields, the checkpoint's content fingerprint, and which
weight files a node has. Real files, real safetensors checkpoints."""

import json
import shutil
import struct
import types
from pathlib import Path

import pytest
import torch

from tools.make_tiny_model import main as make_tiny_model
from vllm_ascend.model_loader.netloader.identity import (
    IDENTITY_FIELDS,
    LAYOUT_VERSION,
    CheckpointError,
    checkpoint_fingerprint,
    identity_difference,
    model_identity,
    weight_files,
)


class FakeHFConfig:
    def __init__(self, values: dict, architectures=None) -> None:
        self._values = values
        self.architectures = architectures

    def to_dict(self) -> dict:
        return dict(self._values)


HF = {"hidden_size": 64, "num_layers": 2, "rope": {"theta": 1e4}, "torch_dtype": torch.float16}


def identity(hf_values=None, architectures=("ToyForCausalLM",), **overrides):
    hf = FakeHFConfig(dict(HF if hf_values is None else hf_values), architectures)
    model_config = types.SimpleNamespace(
        hf_config=hf,
        dtype=overrides.pop("dtype", torch.bfloat16),
        quantization=overrides.pop("quantization", None),
        revision=overrides.pop("revision", "main"),
    )
    parallel_config = types.SimpleNamespace(
        tensor_parallel_size=overrides.pop("tp", 2), pipeline_parallel_size=overrides.pop("pp", 1)
    )
    return model_identity(
        model_config, parallel_config, overrides.pop("rank", 1), overrides.pop("name", "toy"),
        checkpoint=overrides.pop("checkpoint", "c" * 64),
    )


def test_model_identity_fields():
    ident = identity()
    assert set(ident) == set(IDENTITY_FIELDS)
    assert ident["model"] == "toy"
    assert ident["architectures"] == ["ToyForCausalLM"]
    assert ident["dtype"] == "bfloat16"
    assert ident["quantization"] is None and ident["revision"] == "main"
    assert (ident["tensor_parallel_size"], ident["pipeline_parallel_size"]) == (2, 1)
    assert ident["rank"] == 1
    assert len(ident["config_sha256"]) == 64
    import vllm

    assert ident["vllm_version"] == vllm.__version__
    assert ident["torch_version"] == torch.__version__
    assert ident["layout"] == LAYOUT_VERSION and ident["checkpoint"] == "c" * 64
    json.dumps(ident)  # it travels in a hello message


def vllm_identity(rank: int = 0, **parallel) -> dict:
    """The identity of rank ``rank`` under a real vLLM ``ParallelConfig(**parallel)``."""
    from vllm.config import ParallelConfig

    model_config = types.SimpleNamespace(hf_config=FakeHFConfig(HF, ["ToyMoE"]),
                                         dtype=torch.bfloat16, quantization=None,
                                         revision=None)
    return model_identity(model_config, ParallelConfig(**parallel), rank, "moe",
                          checkpoint="c" * 64)


@pytest.mark.parametrize("one, other", [
    # The same world rank, experts sharded or not.
    ({"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}),
    # Experts over two data-parallel engines: rank 0 of engine 0 and of engine 1.
    ({"data_parallel_size": 2, "data_parallel_rank": 0, "enable_expert_parallel": True},
     {"data_parallel_size": 2, "data_parallel_rank": 1, "enable_expert_parallel": True}),
    # One engine alone, or one of two data-parallel engines (dense: experts replicated).
    ({}, {"data_parallel_size": 2, "data_parallel_rank": 0}),
    # The same ranks, experts placed another way.
    ({"enable_expert_parallel": True},
     {"enable_expert_parallel": True, "expert_placement_strategy": "round_robin"}),
])
def test_identities_that_differ_only_in_expert_or_data_parallelism_refuse_each_other(one, other):
    """Equal shapes on equal ranks can hold different experts: a seed whose experts sit
    elsewhere must be refused before any byte, as every shape check and digest passes."""
    difference = identity_difference(vllm_identity(**one), vllm_identity(**other))
    assert difference is not None
    assert "data_parallel" in difference or "expert_parallel" in difference


def test_expert_parallel_size_and_rank_follow_vllms_sharding():
    ident = vllm_identity(1, tensor_parallel_size=2, data_parallel_size=2,
                          data_parallel_rank=1, enable_expert_parallel=True)
    assert ident["data_parallel"] == [2, 1, 1]
    assert ident["expert_parallel"] == {"size": 4, "rank": 3, "placement": "linear",
                                        "redundant_experts": 0, "dynamic_eplb": False}
    assert vllm_identity()["expert_parallel"] is None


def test_model_identity_without_architectures():
    assert identity(architectures=None)["architectures"] == []


def test_config_sha_ignores_private_keys_transformers_version_and_order():
    base = identity()["config_sha256"]
    noisy = dict(HF, _name_or_path="/some/path", _commit_hash="abc", transformers_version="9.9")
    assert identity(noisy)["config_sha256"] == base
    assert identity(dict(reversed(list(HF.items()))))["config_sha256"] == base


@pytest.mark.parametrize(
    "change",
    [{"hidden_size": 65}, {"rope": {"theta": 1e6}}, {"extra_key": 1}, {"num_layers": "2"}],
)
def test_config_sha_changes_with_the_config(change):
    assert identity(dict(HF, **change))["config_sha256"] != identity()["config_sha256"]


def test_identity_difference_equal():
    assert identity_difference(identity(), identity()) is None
    # Keys outside the identity fields do not matter.
    assert identity_difference(identity(), dict(identity(), note="x")) is None


def test_identity_difference_names_every_differing_field():
    mine = identity()
    theirs = identity(dtype=torch.float16, rank=0, tp=4, hf_values=dict(HF, hidden_size=1))
    reason = identity_difference(mine, theirs)
    assert reason is not None
    for key in ("dtype", "rank", "tensor_parallel_size", "config_sha256"):
        assert key in reason
    for key in ("architectures", "revision", "quantization", "pipeline_parallel_size"):
        assert key not in reason


def test_identity_difference_missing_field():
    theirs = identity()
    del theirs["revision"]
    reason = identity_difference(identity(), theirs)
    assert reason is not None and "revision" in reason


@pytest.mark.parametrize("theirs", [None, [], "toy", 1])
def test_identity_difference_non_dict(theirs):
    assert identity_difference(identity(), theirs) is not None


@pytest.mark.parametrize(
    "field, value", [("vllm_version", "0.31.0"), ("torch_version", "2.12.0"), ("layout", 1)]
)
def test_other_software_is_another_identity(field, value):
    reason = identity_difference(identity(), dict(identity(), **{field: value}))
    assert reason is not None and field in reason


def test_checkpoint_is_compared_only_when_both_sides_have_one():
    assert "checkpoint" in identity_difference(identity(), identity(checkpoint="d" * 64))
    # A node without weight files names what it accepts by EXPECTED_FINGERPRINT instead.
    assert identity_difference(identity(), identity(checkpoint=None)) is None
    assert identity_difference(identity(checkpoint=None), identity()) is None


# --- checkpoint_fingerprint: what the weights are --------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints with one config.json and different weights (two fine-tunes of one
    base), and a copy of the first at another path."""
    root = tmp_path_factory.mktemp("ckpt")
    make_tiny_model([str(root / "a"), "--layers", "1", "--seed", "0"])
    make_tiny_model([str(root / "b"), "--layers", "1", "--seed", "1"])
    shutil.copytree(root / "a", root / "a-copy")
    return {name: root / name for name in ("a", "b", "a-copy")}


def fingerprint(path: Path) -> str:
    return checkpoint_fingerprint(weight_files(str(path)))


def test_one_config_two_weights_two_fingerprints(checkpoints):
    a, b = checkpoints["a"], checkpoints["b"]
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    def header(path: Path) -> bytes:
        data = (path / "model.safetensors").read_bytes()
        return data[: 8 + struct.unpack("<Q", data[:8])[0]]

    assert header(a) == header(b)  # same names, shapes, dtypes, offsets and sizes
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert fingerprint(a) != fingerprint(b)


def test_the_same_checkpoint_at_another_path_has_the_same_fingerprint(checkpoints):
    assert fingerprint(checkpoints["a"]) == fingerprint(checkpoints["a-copy"])
    assert len(fingerprint(checkpoints["a"])) == 64


def tensor_data_start(path: Path) -> int:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    first = min(v["data_offsets"][0] for k, v in json.loads(data[8 : 8 + n]).items()
                if k != "__metadata__")
    return 8 + n + first


def test_a_changed_tensor_changes_the_fingerprint(checkpoints, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(checkpoints["a"], changed)
    path = changed / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[tensor_data_start(path) + 1] ^= 1
    path.write_bytes(bytes(data))
    assert fingerprint(changed) != fingerprint(checkpoints["a"])


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:4],  # shorter than a header length
        lambda d: struct.pack("<Q", 2**40) + d[8:],  # header longer than the file
        lambda d: struct.pack("<Q", 2) + b"[]" + d[10:],  # header is not an object
        lambda d: struct.pack("<Q", 14) + b'{"t": {"a": 1' + d[22:],  # not JSON
    ],
)
def test_a_malformed_safetensors_file_is_a_checkpoint_error(checkpoints, tmp_path, damage):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(damage((checkpoints["a"] / "model.safetensors").read_bytes()))
    with pytest.raises(CheckpointError):
        checkpoint_fingerprint([str(bad)])


@pytest.mark.parametrize("where", [0, 99_999])
def test_other_formats_are_sampled_at_both_ends(tmp_path, where):
    a = tmp_path / "a" / "pytorch_model.bin"
    b = tmp_path / "b" / "pytorch_model.bin"
    for path in (a, b):
        path.parent.mkdir()
    data = bytearray(b"x" * 100_000)
    a.write_bytes(bytes(data))
    data[where] = ord("y")
    b.write_bytes(bytes(data))
    assert checkpoint_fingerprint([str(a)]) != checkpoint_fingerprint([str(b)])


# --- weight_files: what a node has -------------------------------------------------------


def test_weight_files_follow_the_safetensors_index(tmp_path):
    for name in ("model-00001.safetensors", "model-00002.safetensors", "consolidated.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001.safetensors", "b": "model-00002.safetensors",
    }}))
    assert [Path(f).name for f in weight_files(str(tmp_path))] == [
        "model-00001.safetensors", "model-00002.safetensors",
    ]


def test_weight_files_skip_training_state(tmp_path):
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.bin"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(f).name for f in weight_files(str(tmp_path))] == ["pytorch_model.bin"]


def test_a_node_without_weight_files_has_none(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert weight_files(str(tmp_path)) == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weight_files("no-such-org/no-such-model") == []


def test_a_difference_shows_each_value_as_python_writes_it_and_cuts_long_ones():
    assert identity_difference(identity(rank=1), identity(rank=0)) == "rank: 1 here vs 0 there"
    long = identity_difference(identity(), identity(name="m" * 500))
    assert long is not None and len(long) < 250 and long.endswith("... there")


def test_a_hub_model_is_looked_up_in_the_download_dir_the_disk_loader_uses(tmp_path, monkeypatch):
    """With --download-dir, the files vLLM would load are there, not in the default
    cache: fingerprinting another snapshot would name another checkpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "download-dir"
    snapshot = cache / "models--org--model" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (cache / "models--org--model" / "refs").mkdir()
    (cache / "models--org--model" / "refs" / "main").write_text("1" * 40)
    assert weight_files("org/model", cache_dir=str(cache)) == [str(snapshot / "model.safetensors")]
    assert weight_files("org/model", cache_dir=str(tmp_path / "elsewhere")) == []


def test_a_refusal_for_the_layout_alone_is_told_from_one_for_another_model():
    """A seed's refusal names every differing field: only one that names layout fields
    alone sends a client to ask it across layouts (a draft refused by a target's
    listener, or another model, does not)."""
    from tests.helpers.toy import IDENTITY
    from vllm_ascend.model_loader.netloader.identity import (
        IDENTITY_DIFFERS,
        identity_difference,
        only_layout_differs,
    )

    def refusal(**theirs: object) -> str:
        return f"{IDENTITY_DIFFERS}: {identity_difference(IDENTITY, {**IDENTITY, **theirs})}"

    assert only_layout_differs(refusal(tensor_parallel_size=2, rank=1))
    assert only_layout_differs(refusal(pipeline_parallel_size=2))
    assert not only_layout_differs(refusal(role="draft"))
    assert not only_layout_differs(refusal(tensor_parallel_size=2, config_sha256="1" * 64))
    assert not only_layout_differs("seed is busy")
