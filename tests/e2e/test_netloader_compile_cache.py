"""The compile cache end to end: real vLLM servers on CPU *without* --enforce-eager.

A seed loads from disk and compiles during warm-up (vLLM keeps the result under its
VLLM_CACHE_ROOT). A client with a cache root of its own and the same CPU binding (so
vLLM's cache names match) gets the weights and the seed's compile cache, vLLM loads the
artifact instead of compiling, and the client's greedy completions and logprobs equal
the seed's.
"""

from pathlib import Path

import pytest

from tests.helpers.e2e import SERVER_ARGS, address_of, greedy, start_all
from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.compile_cache.naming import AOT_SUBDIR

pytestmark = pytest.mark.e2e

SECRET = "compile-cache-e2e-secret-0123456789"


def compiling_server(model: str, workdir: Path, name: str, sources: list[str] | None = None
                     ) -> VllmServer:
    """A netloader server that compiles (no --enforce-eager), with a cache root of its
    own, the shared secret (so COMPILE_CACHE "auto" ships the cache), bound to cpu 0."""
    extra: dict = {"OUTPUT_PREFIX": f"{workdir}/{name}-"}
    if sources is not None:
        extra["SOURCE"] = [{"device_id": 0, "sources": sources}]
    return VllmServer(
        model, load_format="netloader", cpu_bind="0", extra_config=extra,
        log_path=workdir / f"{name}.log", extra_args=SERVER_ARGS, enforce_eager=False,
        env={"VLLM_CACHE_ROOT": str(workdir / f"{name}-cache"), "NETLOADER_SECRET": SECRET},
    )


def cache_files(root: Path) -> dict[str, bytes]:
    """Every regular file of vLLM's AOT compile cache under ``root``, by relative path."""
    base = root.joinpath(*AOT_SUBDIR)
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*")) if p.is_file() and "locks" not in p.parts
    }


def test_client_given_the_seeds_compile_cache_loads_it_and_serves_identical_outputs(
    model, workdir
):
    seed = compiling_server(model, workdir, "cc-seed")
    client = None
    try:
        start_all(seed)
        seed_files = cache_files(workdir / "cc-seed-cache")
        artifacts = [p for p in seed_files if p.endswith("/rank_0_0/model")]
        assert artifacts, f"the seed compiled nothing: {sorted(seed_files)[:5]}"
        reference = greedy(seed)

        seed_address = address_of(workdir / "cc-seed-")
        client = compiling_server(model, workdir, "cc-client", [seed_address])
        start_all(client)
        info = query_seed(address_of(workdir / "cc-client-"), secret=SECRET.encode())
        assert info["loaded_from"] == f"seed {seed_address}"
        client_files = cache_files(workdir / "cc-client-cache")
        # Every file the seed had is now the client's, byte for byte.
        for path in artifacts:
            assert client_files.get(path) == seed_files[path], path
        assert {p: client_files.get(p) for p in seed_files} == seed_files
        # vLLM loaded the artifact instead of compiling (its own log line).
        log = client.log_text()
        assert "Directly load AOT compilation from path" in log, client.log_tail(80)
        assert "Compiling model again" not in log
        assert greedy(client) == reference
        assert all(logprobs for _, logprobs in reference)
    finally:
        if client is not None:
            client.stop()
        seed.stop()
