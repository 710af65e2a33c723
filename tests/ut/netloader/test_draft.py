"""A speculative decoder's draft model beside the target: own keys, own listener, own
identity. (The real thing on vLLM runs in tests/e2e/test_netloader_draft.py.)"""

import types
from pathlib import Path

import pytest
import torch

from tests.helpers.toy import IDENTITY, fetch_for, make_toy, serving
from tools.make_tiny_model import main as make_tiny_model
from tools.vllm_server import free_port
from vllm_ascend.model_loader.netloader.client import WeightFetch
from vllm_ascend.model_loader.netloader.config import NetloaderConfigError, parse_config
from vllm_ascend.model_loader.netloader.identity import identity_difference, model_identity
from vllm_ascend.model_loader.netloader.manifest import (
    DRAFT,
    TARGET,
    LoadedWeights,
    model_tensors,
)
from vllm_ascend.model_loader.netloader.plan import listener_for, model_role
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen

# --- config: DRAFT_SOURCE and DRAFT_LISTEN_PORT ------------------------------------------


def test_draft_sources_and_ports_are_apart_from_the_targets():
    config = parse_config({
        "SOURCE": [{"device_id": 0, "sources": ["10.0.0.1:7000"]}],
        "DRAFT_SOURCE": [
            {"device_id": 0, "sources": ["10.0.0.1:8000", "10.0.0.2:8000"]},
            {"device_id": 1, "sources": ["10.0.0.1:8001"]},
        ],
        "LISTEN_PORT": 7000,
        "DRAFT_LISTEN_PORT": 8000,
    })
    assert config.sources_for_rank(0) == ("10.0.0.1:7000",)
    assert config.sources_for_rank(1) == ()
    assert config.sources_for_rank(0, draft=True) == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert config.sources_for_rank(1, draft=True) == ("10.0.0.1:8001",)
    assert [config.listen_port_for_rank(r) for r in (0, 3)] == [7000, 7003]
    assert [config.listen_port_for_rank(r, draft=True) for r in (0, 3)] == [8000, 8003]


def test_draft_without_its_keys_uses_the_target_ports_plus_10000_like_vllm_ascend():
    config = parse_config({
        "SOURCE": [
            {"device_id": 0, "sources": ["10.0.0.1:7000", "[fd00::2]:7000", "10.0.0.3:60000"]},
            {"device_id": 1, "sources": ["10.0.0.1:7001"]},
            {"dns": "seeds.ns.svc:7000"},
        ],
        "LISTEN_PORT": 7000,
    })
    # 60000 + 10000 is no port: that seed has no draft listener by this rule.
    assert [str(s) for s in config.sources_for_rank(0, draft=True)] == [
        "10.0.0.1:17000", "[fd00::2]:17000", "seeds.ns.svc:17000",
    ]
    assert [str(s) for s in config.sources_for_rank(1, draft=True)] == [
        "10.0.0.1:17001", "seeds.ns.svc:17000",
    ]
    assert config.listen_port_for_rank(0, draft=True) == 17000
    assert config.listen_port_for_rank(3, draft=True) == 17003


def test_draft_keys_win_over_the_derived_ones():
    config = parse_config({
        "SOURCE": [{"device_id": 0, "sources": ["10.0.0.1:7000"]}], "LISTEN_PORT": 7000,
        "DRAFT_SOURCE": [{"device_id": 0, "sources": ["10.0.0.9:9000"]}],
        "DRAFT_LISTEN_PORT": 9000,
    })
    assert config.sources_for_rank(0, draft=True) == ("10.0.0.9:9000",)
    assert config.listen_port_for_rank(0, draft=True) == 9000


def test_an_empty_draft_source_means_no_draft_seeds():
    config = parse_config({
        "SOURCE": [{"device_id": 0, "sources": ["10.0.0.1:7000"]}], "DRAFT_SOURCE": [],
    })
    assert config.sources_for_rank(0, draft=True) == ()


def test_derived_draft_port_past_65535_names_listen_port():
    config = parse_config({"LISTEN_PORT": 60000})
    with pytest.raises(NetloaderConfigError, match=r"LISTEN_PORT 60000 \+ 10000"):
        config.listen_port_for_rank(0, draft=True)


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.1:8000",
        [{"device_id": -1, "sources": ["10.0.0.1:8000"]}],
        [{"device_id": 0, "sources": ["no-port"]}],
        [{"device_id": 0, "sources": []}],
        [{"rank": 0, "sources": ["10.0.0.1:8000"]}],
    ],
)
def test_bad_draft_source_names_draft_source(value):
    with pytest.raises(NetloaderConfigError, match="DRAFT_SOURCE"):
        parse_config({"DRAFT_SOURCE": value})


@pytest.mark.parametrize("value", [0, 65536, "8000", True, 80.0])
def test_bad_draft_listen_port_names_draft_listen_port(value):
    with pytest.raises(NetloaderConfigError, match="DRAFT_LISTEN_PORT"):
        parse_config({"DRAFT_LISTEN_PORT": value})


def test_draft_listen_port_past_65535_names_draft_listen_port():
    config = parse_config({"LISTEN_PORT": 60000, "DRAFT_LISTEN_PORT": 65535})
    assert config.listen_port_for_rank(1) == 60001
    with pytest.raises(NetloaderConfigError, match="DRAFT_LISTEN_PORT 65535 \\+ rank 1"):
        config.listen_port_for_rank(1, draft=True)


# --- which model is the draft, as vLLM builds its configs --------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("draft-ut") / "tiny"
    make_tiny_model([str(path), "--layers", "1"])
    return str(path)


def test_vllm_marks_the_draft_model_config_and_only_it(tiny_model):
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig

    target = ModelConfig(model=tiny_model, max_model_len=128)
    parallel = ParallelConfig()
    spec = SpeculativeConfig(
        method="draft_model", model=tiny_model, num_speculative_tokens=2,
        target_model_config=target, target_parallel_config=parallel,
    )
    assert (model_role(target), model_role(spec.draft_model_config)) == (TARGET, DRAFT)
    # Methods without a draft model reuse the target's config object itself: an identity
    # test ("is the speculative config's draft model config") would call the target a draft.
    ngram = SpeculativeConfig(
        method="ngram", num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max=3,
        target_model_config=target, target_parallel_config=parallel,
    )
    assert ngram.draft_model_config is target and model_role(target) == TARGET


# --- listeners: one per role, never the same port or address file ------------------------


def test_target_and_draft_listeners_bind_apart_on_fixed_ports(tmp_path):
    base = free_port(span=12)
    config = parse_config({
        "LISTEN_PORT": base, "DRAFT_LISTEN_PORT": base + 10,
        "OUTPUT_PREFIX": str(tmp_path / "seed-"),
    })
    rank = 1
    plans = {role: listener_for(config, rank, role) for role in (TARGET, DRAFT)}
    assert plans == {
        TARGET: (base + 1, str(tmp_path / "seed-")),
        DRAFT: (base + 11, str(tmp_path / "seed-draft")),
    }
    weights = LoadedWeights.capture(make_toy(0))
    seeds = [
        SeedServer(
            weights,
            SeedSettings(dict(IDENTITY, role=role), rank, "127.0.0.1", 5.0, output_prefix=prefix),
            listen("127.0.0.1", port),
        )
        for role, (port, prefix) in plans.items()
    ]
    try:
        for seed in seeds:
            seed.start().ready.wait(10)
        assert (tmp_path / "seed-1.txt").read_text() == f"127.0.0.1:{base + 1}\n"
        assert (tmp_path / "seed-draft1.txt").read_text() == f"127.0.0.1:{base + 11}\n"
    finally:
        for seed in seeds:
            seed.stop()


def test_draft_without_draft_listen_port_listens_10000_above_a_fixed_target(tmp_path):
    config = parse_config({"LISTEN_PORT": 7000, "OUTPUT_PREFIX": str(tmp_path / "s")})
    assert listener_for(config, 0, DRAFT) == (17000, str(tmp_path / "sdraft"))
    assert listener_for(parse_config({}), 0, DRAFT) == (0, None)


# --- identity: a target listener never serves a draft, even of the very same model ----------


def fetch_toy(address: str, role: str) -> tuple[WeightFetch, torch.nn.Module, bool]:
    model = make_toy(None)
    fetch = fetch_for(model, dict(IDENTITY, role=role))
    return fetch, model, fetch.run((address,)) is not None


def test_model_identity_carries_the_role():
    hf = types.SimpleNamespace(to_dict=lambda: {"hidden_size": 8}, architectures=["Toy"])
    model_config = types.SimpleNamespace(
        hf_config=hf, dtype=torch.bfloat16, quantization=None, revision=None
    )
    parallel = types.SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    target = model_identity(model_config, parallel, 0, "m")
    draft = model_identity(model_config, parallel, 0, "m", DRAFT)
    assert target["checkpoint"] is None
    assert (target["role"], draft["role"]) == (TARGET, DRAFT)
    assert identity_difference(target, draft) == "role: 'target' here vs 'draft' there"


@pytest.mark.parametrize("seed_role", [TARGET, DRAFT])
def test_seed_serves_only_its_own_role(seed_role):
    other = DRAFT if seed_role == TARGET else TARGET
    with serving(seed=3, identity=dict(IDENTITY, role=seed_role)) as server:
        address = server.address
        fetch, model, ok = fetch_toy(address, other)
        assert not ok
        (reason,) = fetch.reasons
        assert f"role: '{seed_role}' here vs '{other}' there" in reason
        assert all(not t.any() for _, t in model_tensors(model))  # nothing moved
        fetch, model, ok = fetch_toy(address, seed_role)
        assert ok and fetch.reasons == []
        expected = dict(model_tensors(make_toy(3)))
        for name, t in model_tensors(model):
            assert torch.equal(t, expected[name]), name


def test_address_files_do_not_collide_for_any_rank(tmp_path):
    config = parse_config({"OUTPUT_PREFIX": str(tmp_path / "p")})
    files = {
        Path(f"{listener_for(config, rank, role)[1]}{rank}.txt")
        for rank in range(64) for role in (TARGET, DRAFT)
    }
    assert len(files) == 128


def test_draft_expected_fingerprint_is_its_own_key():
    config = parse_config({"EXPECTED_FINGERPRINT": "a" * 64,
                           "DRAFT_EXPECTED_FINGERPRINT": "b" * 64})
    assert (config.expected_fingerprint, config.draft_expected_fingerprint) == (
        "a" * 64, "b" * 64)
    with pytest.raises(NetloaderConfigError, match="DRAFT_EXPECTED_FINGERPRINT must be"):
        parse_config({"DRAFT_EXPECTED_FINGERPRINT": "B" * 64})
