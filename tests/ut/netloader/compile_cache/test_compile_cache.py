"""The compile cache in-process: its messages and path rules, the COMPILE_CACHE key,
and what a seed lists from a cache directory (real files, symlinks, lock files)."""

import os
from pathlib import Path

import pytest

from vllm_ascend.model_loader.netloader.compile_cache.cpu_aot_shim import allow_cpu_aot_load
from vllm_ascend.model_loader.netloader.compile_cache.naming import CacheRejected, host_signature
from vllm_ascend.model_loader.netloader.compile_cache.serving import list_cache
from vllm_ascend.model_loader.netloader.config import NetloaderConfigError, parse_config
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.messages import (
    MAX_CACHE_NAMES,
    CacheRequest,
    parse_compile_cache_reply,
    parse_request,
)

H = "a" * 64
OTHER = "b" * 64
DIGEST = "d" * 64
REQUEST = CacheRequest((H,), "rank_0_0", "c" * 64)


def reply(*entries, max_files=100, max_bytes=1 << 20):
    return parse_compile_cache_reply(
        {"type": "compile_cache", "files": list(entries)}, REQUEST, max_files, max_bytes
    )


# --- the reply a client reads --------------------------------------------------------


def test_acceptable_listing_parses():
    files = reply([f"{H}/rank_0_0/model", 10, DIGEST],
                  [f"{H}/inductor_cache/fm/cfm.py", 0, DIGEST])
    assert [(f.path, f.nbytes) for f in files] == [
        (f"{H}/rank_0_0/model", 10), (f"{H}/inductor_cache/fm/cfm.py", 0)]


@pytest.mark.parametrize("path", [
    f"/{H}/rank_0_0/model",                     # absolute
    f"{H}/rank_0_0/../../../etc/passwd",        # traversal
    f"{H}/inductor_cache/../rank_0_0/model",
    f"{H}/inductor_cache/./x",
    f"{H}/inductor_cache/.hidden",
    f"{H}/inductor_cache//x",
    f"{H}/inductor_cache/a\\b",
    f"{H}/inductor_cache/new\nline",
    f"{H}/rank_1_0/model",                      # another rank's directory
    f"{H}/somewhere/model",
    f"{OTHER}/rank_0_0/model",                  # a name that was not asked for
    f"{H}/model",                               # too shallow
    f"{H}/inductor_cache/a/b/c/d/e",            # too deep
    f"{H}/inductor_cache/" + "x" * 200,         # too long a name
    "",
    7,
])
def test_hostile_paths_are_refused(path):
    with pytest.raises(ProtocolError):
        reply([path, 1, DIGEST])


@pytest.mark.parametrize("entry", [
    [f"{H}/rank_0_0/model", -1, DIGEST],
    [f"{H}/rank_0_0/model", True, DIGEST],
    [f"{H}/rank_0_0/model", 1.5, DIGEST],
    [f"{H}/rank_0_0/model", 1, "D" * 64],
    [f"{H}/rank_0_0/model", 1, DIGEST[:-1]],
    [f"{H}/rank_0_0/model", 1],
    {"path": f"{H}/rank_0_0/model"},
])
def test_malformed_entries_are_refused(entry):
    with pytest.raises(ProtocolError):
        reply(entry)


def test_duplicate_and_nested_paths_are_refused():
    with pytest.raises(ProtocolError, match="twice or nests"):
        reply([f"{H}/rank_0_0/model", 1, DIGEST], [f"{H}/rank_0_0/model", 1, DIGEST])
    with pytest.raises(ProtocolError, match="twice or nests"):
        reply([f"{H}/inductor_cache/a", 1, DIGEST], [f"{H}/inductor_cache/a/b", 1, DIGEST])
    with pytest.raises(ProtocolError, match="twice or nests"):
        reply([f"{H}/inductor_cache/a/b", 1, DIGEST], [f"{H}/inductor_cache/a", 1, DIGEST])


def test_caps_on_files_and_bytes():
    with pytest.raises(ProtocolError, match="files"):
        reply(*[[f"{H}/inductor_cache/f{i}", 0, DIGEST] for i in range(3)], max_files=2)
    with pytest.raises(ProtocolError, match="bytes"):
        reply([f"{H}/inductor_cache/a", 600, DIGEST], [f"{H}/inductor_cache/b", 600, DIGEST],
              max_bytes=1000)


# --- the request a seed reads ----------------------------------------------------------


def request_msg(**fields):
    msg = {**REQUEST.to_wire(), "nonce": "0" * 32, **fields}
    return parse_request(msg)


def test_request_round_trips():
    assert request_msg().cache == REQUEST


@pytest.mark.parametrize("fields", [
    {"hashes": []},
    {"hashes": [H, H]},
    {"hashes": ["A" * 64]},
    {"hashes": [f"{i:064x}" for i in range(MAX_CACHE_NAMES + 1)]},
    {"hashes": H},
    {"rank_dir": "../rank_0_0"},
    {"rank_dir": "rank_0"},
    {"host": "x"},
    {"host": None},
])
def test_malformed_requests_are_refused(fields):
    with pytest.raises(ProtocolError):
        request_msg(**fields)


# --- the key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "secret", "enabled"), [
    (None, None, False), (None, "s" * 16, True), ("auto", None, False),
    ("auto", "s" * 16, True), (True, None, True), (False, "s" * 16, False),
])
def test_compile_cache_key_needs_a_secret_or_an_opt_in(value, secret, enabled):
    extra = {} if value is None else {"COMPILE_CACHE": value}
    environ = {} if secret is None else {"NETLOADER_SECRET": secret}
    assert parse_config(extra, environ).compile_cache_enabled() is enabled


@pytest.mark.parametrize("value", ["true", 1, "yes", None])
def test_compile_cache_key_rejects_other_values(value):
    with pytest.raises(NetloaderConfigError, match="COMPILE_CACHE"):
        parse_config({"COMPILE_CACHE": value})


# --- what a seed lists -----------------------------------------------------------------------


def make_cache(root: Path, name: str = H, complete: bool = True) -> dict[str, bytes]:
    """A cache directory like vLLM's; returns the files a seed must list."""
    files = {
        f"{name}/rank_0_0/model": b"artifact" * 100,
        f"{name}/inductor_cache/fm/cfm.py": b"print('compiled')\n",
        f"{name}/inductor_cache/xx/cxx.main.so": os.urandom(3000),
        f"{name}/inductor_cache/aotautograd/k1/k1": b"",
    }
    if not complete:
        files.pop(f"{name}/rank_0_0/model")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / name / "inductor_cache" / "locks").mkdir(exist_ok=True)
    (root / name / "inductor_cache" / "locks" / "cxx.lock").write_bytes(b"")
    (root / name / "inductor_cache" / "xx" / "cxx.lock").write_bytes(b"")
    (root / name / "rank_1_0").mkdir(exist_ok=True)
    (root / name / "rank_1_0" / "model").write_bytes(b"other rank")
    return files


def test_seed_lists_exactly_the_requested_cache(tmp_path):
    files = make_cache(tmp_path)
    make_cache(tmp_path, OTHER)
    listed = list_cache(str(tmp_path), REQUEST)
    assert {f.path: f.nbytes for f in listed} == {p: len(d) for p, d in files.items()}
    import blake3

    assert all(f.digest == blake3.blake3(files[f.path]).hexdigest() for f in listed)


def test_seed_lists_nothing_for_an_incomplete_cache_or_none(tmp_path):
    make_cache(tmp_path, complete=False)
    assert list_cache(str(tmp_path), REQUEST) == []
    assert list_cache(str(tmp_path / "missing"), REQUEST) == []


def test_seed_never_follows_a_symlink(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    files = make_cache(root)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for clients")
    (root / H / "inductor_cache" / "link.py").symlink_to(secret)
    (root / H / "inductor_cache" / "linkdir").symlink_to(tmp_path)
    listed = {f.path for f in list_cache(str(root), REQUEST)}
    assert listed == set(files)
    # A cache directory that is itself a symlink is not served either.
    other = tmp_path / "other"
    other.mkdir()
    make_cache(other)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / H).symlink_to(other / H)
    assert list_cache(str(linked), REQUEST) == []


def test_seed_refuses_a_cache_over_its_caps(tmp_path):
    make_cache(tmp_path)
    with pytest.raises(CacheRejected):
        list_cache(str(tmp_path), REQUEST, max_files=2)
    with pytest.raises(CacheRejected):
        list_cache(str(tmp_path), REQUEST, max_bytes=1000)


# --- this host ---------------------------------------------------------------------------------


def test_host_signature_is_stable_hex():
    sig = host_signature()
    assert len(sig) == 64 and int(sig, 16) >= 0 and host_signature() == sig


def test_cpu_shim_is_added_once_and_only_where_missing():
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as B

    allow_cpu_aot_load()
    assert callable(B.finalize_loading)
    assert allow_cpu_aot_load() is False


# --- the names, against a real vLLM config ------------------------------------------------


def test_names_follow_vllms_recipe_for_every_kv_cache_layout():
    import hashlib

    from torch import nn
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key
    from vllm.config import VllmConfig
    from vllm.v1.attention.backends.utils import record_kv_cache_layout

    from vllm_ascend.model_loader.netloader.compile_cache.naming import module_hashes

    class Compiled(nn.Module):
        def forward(self, x):
            return x

    module = Compiled()
    module.vllm_config = VllmConfig()
    names = module_hashes(module)
    assert len(names) == len(set(names)) == 6
    # Put back as found: vLLM refuses to resolve a layout over a different one.
    assert module.vllm_config.cache_config.kv_cache_layout is None
    # What vLLM computes at warm-up, once the engine resolved the layout.
    record_kv_cache_layout(module.vllm_config.cache_config, "LBNHC")
    factors = aot_compile_hash_factors(module.vllm_config) + [_model_hash_key(module.forward)]
    expected = hashlib.sha256(str(factors).encode()).hexdigest()
    assert expected in names
    assert module_hashes(module) == [expected]
