"""Which tensors move, in which order, and how they are fingerprinted: real tensors."""

import json
import random

import blake3
import pytest
import torch
from torch import nn

from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    TensorSpec,
    byte_view,
    digest,
    first_difference,
    manifest_sha256,
    model_tensors,
    plan_buckets,
    spec_of,
)


class Tiny(nn.Module):
    """A tied weight, a buffer, a meta parameter and a meta buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, dtype=torch.bfloat16)
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(4, 10, bias=False, dtype=torch.bfloat16)
        self.head.weight = self.embed.weight
        self.ghost = nn.Parameter(torch.empty(5, device="meta"), requires_grad=False)
        self.register_buffer("steps", torch.arange(3))
        self.register_buffer("ghost_buf", torch.empty(2, device="meta"))


def make_tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def host_digest(t: torch.Tensor) -> str:
    """Reference: single-threaded blake3 over a host copy of the bytes."""
    data = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return blake3.blake3(data).hexdigest()


def specs_of_sizes(sizes: list[int]) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", (n,), "uint8", n) for i, n in enumerate(sizes)]


# --- TensorSpec ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TensorSpec("model.layers.0.w", (2, 3), "bfloat16", 12),
        TensorSpec("scalar", (), "float32", 4),
        TensorSpec("empty", (0, 7), "int8", 0),
    ],
)
def test_tensor_spec_wire_round_trip(spec):
    assert TensorSpec.from_wire(spec.to_wire()) == spec
    # What really travels is JSON: tuples become lists and must come back as tuples.
    back = TensorSpec.from_wire(json.loads(json.dumps(spec.to_wire())))
    assert back == spec and isinstance(back.shape, tuple)


@pytest.mark.parametrize(
    "item",
    [
        None,
        "w",
        {"name": "w"},
        ("w", [2], "float32", 8),  # JSON never yields a tuple
        ["w", [2], "float32"],
        ["w", [2], "float32", 8, 0],
        [1, [2], "float32", 8],
        ["w", 2, "float32", 8],
        ["w", (2,), "float32", 8],
        ["w", [2, -1], "float32", 8],
        ["w", [2.0], "float32", 8],
        ["w", ["2"], "float32", 8],
        ["w", [2], None, 8],
        ["w", [2], "float32", -8],
        ["w", [2], "float32", 8.0],
        ["w", [2], "float32", "8"],
    ],
)
def test_tensor_spec_rejects_malformed_entries(item):
    with pytest.raises(ValueError):
        TensorSpec.from_wire(item)


# --- model_tensors / spec_of / byte_view ----------------------------------------------


def test_model_tensors_params_then_buffers_tied_once_meta_skipped():
    model = make_tiny(0)
    named = model_tensors(model)
    assert [name for name, _ in named] == ["embed.weight", "proj.weight", "proj.bias", "steps"]
    tensors = dict(named)
    # Detached views of the module's own storage, not copies.
    assert tensors["embed.weight"].data_ptr() == model.head.weight.data_ptr()
    assert tensors["proj.weight"].data_ptr() == model.proj.weight.data_ptr()
    assert not any(t.requires_grad for _, t in named)
    with torch.no_grad():
        model.proj.bias.fill_(3.0)
    assert torch.equal(tensors["proj.bias"], torch.full((6,), 3.0))


def test_model_tensors_order_is_stable_between_instances():
    assert [n for n, _ in model_tensors(make_tiny(0))] == [
        n for n, _ in model_tensors(make_tiny(1))
    ]


@pytest.mark.parametrize(
    "dtype, name",
    [
        (torch.float32, "float32"),
        (torch.bfloat16, "bfloat16"),
        (torch.float16, "float16"),
        (torch.int64, "int64"),
        (torch.int8, "int8"),
        (torch.uint8, "uint8"),
        (torch.bool, "bool"),
    ],
)
def test_spec_of_dtype_string(dtype, name):
    t = torch.zeros(3, 5, dtype=dtype)
    assert spec_of("w", t) == TensorSpec("w", (3, 5), name, 15 * t.element_size())


def test_spec_of_scalar_and_empty():
    assert spec_of("s", torch.tensor(1.0)) == TensorSpec("s", (), "float32", 4)
    assert spec_of("e", torch.empty(0, 4, dtype=torch.float16)) == TensorSpec(
        "e", (0, 4), "float16", 0
    )


def test_byte_view_shares_storage():
    t = torch.zeros(4, 3, dtype=torch.float32)
    view = byte_view(t)
    assert view.dtype == torch.uint8 and view.shape == (t.nbytes,)
    assert view.data_ptr() == t.data_ptr()
    view[:4] = torch.tensor([1.5]).view(torch.uint8)
    assert t[0, 0].item() == 1.5
    assert torch.count_nonzero(t) == 1


def test_byte_view_of_bfloat16_scalar_and_empty():
    assert byte_view(torch.ones(5, dtype=torch.bfloat16)).numel() == 10
    scalar = torch.tensor(7, dtype=torch.int32)
    assert bytes(byte_view(scalar).tolist()) == scalar.numpy().tobytes()
    assert byte_view(torch.empty(0)).numel() == 0


@pytest.mark.parametrize(
    "make",
    [lambda: torch.zeros(4, 3).t(), lambda: torch.zeros(4, 6)[:, ::2]],
    ids=["transpose", "stride"],
)
def test_byte_view_rejects_non_contiguous(make):
    with pytest.raises(ValueError):
        byte_view(make())


# --- digest ------------------------------------------------------------------------


def test_digest_equal_tensors_equal_digest():
    a = torch.randn(64, 33)
    assert digest(a) == digest(a.clone()) == host_digest(a)


def test_digest_one_flipped_byte_changes_it():
    a = torch.randn(64, 33)
    b = a.clone()
    byte_view(b)[1000] ^= 0x01
    assert digest(a) != digest(b)


def test_digest_bfloat16():
    a = torch.randn(100).to(torch.bfloat16)
    b = a.clone()
    assert digest(a) == digest(b) == host_digest(a)
    b[99] = -b[99]  # flips the sign bit, even for 0
    assert digest(a) != digest(b)


def test_digest_scalar_and_empty():
    assert digest(torch.tensor(1.0)) == host_digest(torch.tensor(1.0))
    assert digest(torch.tensor(1.0)) != digest(torch.tensor(2.0))
    assert digest(torch.empty(0)) == blake3.blake3(b"").hexdigest()
    assert digest(torch.empty(0, 5, dtype=torch.bfloat16)) == blake3.blake3(b"").hexdigest()


def test_digest_of_non_contiguous_is_that_of_its_contiguous_copy():
    a = torch.randn(8, 5)
    assert digest(a.t()) == digest(a.t().contiguous())
    assert digest(a.t()) != digest(a)


def test_digest_large_tensor_threaded_path_matches_host_copy():
    a = torch.randn(3 * (1 << 20) // 4 + 123)  # ~3 MiB, above the threaded threshold
    assert a.nbytes > 1 << 20
    assert digest(a) == host_digest(a)
    b = a.clone()
    byte_view(b)[-1] ^= 0x80
    assert digest(b) != digest(a) and digest(b) == host_digest(b)


# --- first_difference ----------------------------------------------------------------

BASE = [
    TensorSpec("a", (2, 3), "float32", 24),
    TensorSpec("b", (4,), "bfloat16", 8),
    TensorSpec("c", (), "int64", 8),
]


def test_first_difference_equal():
    assert first_difference(BASE, list(BASE)) is None
    assert first_difference([], []) is None


@pytest.mark.parametrize(
    "changed",
    [
        TensorSpec("b", (2, 2), "bfloat16", 8),  # shape
        TensorSpec("b", (4,), "float16", 8),  # dtype
        TensorSpec("bb", (4,), "bfloat16", 8),  # name
        TensorSpec("b", (4,), "bfloat16", 9),  # nbytes
    ],
    ids=["shape", "dtype", "name", "nbytes"],
)
def test_first_difference_field(changed):
    theirs = [BASE[0], changed, BASE[2]]
    assert first_difference(BASE, theirs) is not None
    assert first_difference(theirs, BASE) is not None


def test_first_difference_reports_the_first():
    theirs = [BASE[0], TensorSpec("b", (5,), "bfloat16", 10), TensorSpec("zz", (), "int8", 1)]
    reason = first_difference(BASE, theirs)
    assert reason is not None and "zz" not in reason


@pytest.mark.parametrize("theirs", [BASE[:2], BASE + [TensorSpec("d", (1,), "int8", 1)], []])
def test_first_difference_length(theirs):
    assert first_difference(BASE, theirs) is not None
    assert first_difference(theirs, BASE) is not None


# --- plan_buckets --------------------------------------------------------------------


def check_plan(sizes: list[int], cap: int) -> list[list[int]]:
    buckets = plan_buckets(specs_of_sizes(sizes), cap)
    assert [i for bucket in buckets for i in bucket] == list(range(len(sizes)))
    assert all(bucket for bucket in buckets)
    for bucket in buckets:
        if len(bucket) > 1:
            assert sum(sizes[i] for i in bucket) <= cap
            assert all(sizes[i] < cap for i in bucket)
    return buckets


def test_plan_buckets_example():
    sizes = [10, 20, 30, 100, 5, 5, 0, 60, 0]
    assert check_plan(sizes, 50) == [[0, 1], [2], [3], [4, 5, 6], [7], [8]]


def test_plan_buckets_fill_to_exactly_the_cap():
    assert check_plan([25, 25, 25], 50) == [[0, 1], [2]]


def test_plan_buckets_large_tensors_alone():
    assert check_plan([50], 50) == [[0]]
    assert check_plan([10, 50, 10], 50) == [[0], [1], [2]]
    assert check_plan([10, 500, 600, 10], 50) == [[0], [1], [2], [3]]


def test_plan_buckets_zero_size_tensors():
    assert check_plan([0, 0, 0], 50) == [[0, 1, 2]]
    assert check_plan([50, 0, 50], 50) == [[0], [1], [2]]


def test_plan_buckets_empty():
    assert plan_buckets([], 50) == []


def test_plan_buckets_random_invariants():
    rng = random.Random(1234)
    for _ in range(300):
        cap = rng.randint(1, 200)
        sizes = [rng.choice([0, rng.randint(1, cap), rng.randint(1, 3 * cap)]) for _ in range(30)]
        buckets = check_plan(sizes, cap)
        # Greedy: a bucket could not have taken the next tensor.
        for bucket, nxt in zip(buckets, buckets[1:], strict=False):
            if sizes[bucket[0]] < cap and sizes[nxt[0]] < cap:
                assert sum(sizes[i] for i in bucket) + sizes[nxt[0]] > cap


# --- LoadedWeights -------------------------------------------------------------------


def test_capture_matches_model_tensors():
    model = make_tiny(0)
    weights = LoadedWeights.capture(model)
    named = model_tensors(model)
    assert list(weights.specs) == [spec_of(n, t) for n, t in named]
    assert list(weights.digests) == [host_digest(t) for _, t in named]
    assert weights.total_bytes == sum(t.nbytes for _, t in named)


def test_capture_uses_given_digests_and_checks_their_count():
    model = make_tiny(0)
    n = len(model_tensors(model))
    weights = LoadedWeights.capture(model, ["x"] * n)
    assert list(weights.digests) == ["x"] * n
    assert weights.changed() == [spec.name for spec in weights.specs]
    with pytest.raises(ValueError):
        LoadedWeights.capture(model, ["x"] * (n - 1))


def test_changed_empty_when_untouched():
    assert LoadedWeights.capture(make_tiny(0)).changed() == []


def test_changed_names_an_in_place_modification():
    model = make_tiny(0)
    weights = LoadedWeights.capture(model)
    with torch.no_grad():
        model.proj.weight[2, 1] += 1.0
    assert weights.changed() == ["proj.weight"]


def test_changed_names_a_tied_tensor_once():
    model = make_tiny(0)
    weights = LoadedWeights.capture(model)
    with torch.no_grad():
        model.head.weight.mul_(2)
    assert weights.changed() == ["embed.weight"]


def test_replaced_parameter_is_not_changed_and_keeps_loaded_values():
    model = make_tiny(0)
    loaded = model.proj.weight.detach().clone()
    weights = LoadedWeights.capture(model)
    # What CPU post-processing does: a new Parameter in place of the loaded one.
    model.proj.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    assert weights.changed() == []
    names = [spec.name for spec in weights.specs]
    assert torch.equal(weights.tensors[names.index("proj.weight")], loaded)


def test_data_swap_is_not_changed_and_keeps_loaded_values():
    model = make_tiny(0)
    loaded = model.proj.weight.detach().clone()
    weights = LoadedWeights.capture(model)
    model.proj.weight.data = torch.zeros(6, 4)
    assert weights.changed() == []
    names = [spec.name for spec in weights.specs]
    assert torch.equal(weights.tensors[names.index("proj.weight")], loaded)


def test_value_fingerprint():
    a = LoadedWeights.capture(make_tiny(0)).value_fingerprint()
    assert a == LoadedWeights.capture(make_tiny(0)).value_fingerprint()
    model = make_tiny(0)
    with torch.no_grad():
        model.proj.bias[0] += 1.0
    assert LoadedWeights.capture(model).value_fingerprint() != a
    assert LoadedWeights.capture(make_tiny(1)).value_fingerprint() != a


# --- manifest_sha256: what a hello carries instead of the manifest --------------------


def test_manifest_sha256_is_stable_and_names_every_field():
    specs = [spec_of(n, t) for n, t in model_tensors(make_tiny(0))]
    assert manifest_sha256(specs) == manifest_sha256([spec_of(n, t) for n, t in
                                                      model_tensors(make_tiny(1))])
    base = manifest_sha256(specs)
    for i, change in enumerate([
        {"name": "other"}, {"shape": (99,)}, {"dtype": "float64"}, {"nbytes": 1},
    ]):
        changed = list(specs)
        changed[i % len(specs)] = TensorSpec(**{**vars(specs[i % len(specs)]), **change})
        assert manifest_sha256(changed) != base, change
    assert manifest_sha256(specs[:-1]) != base
    assert manifest_sha256(list(reversed(specs))) != base
