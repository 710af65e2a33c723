"""Loading across layouts on vLLM CPU (issue 25): a client at one parallel layout
loads from a seed at another, with no weight files of its own, and equals a disk load
in its own layout (every runtime tensor, greedy texts and logprobs).

Per model, seeds that loaded from disk serve at once, one per layout (each also the
disk-load reference of its layout): TP=1 and TP=2. A client names rank 0 of the other
instance only (the seeds listen at LISTEN_PORT + rank, so it learns the other ranks):
TP=1 from TP=2, TP=2 from TP=1; the dense TP=2 client knows only a registry (a real
redis-server) where the TP=1 seed announced itself to every layout. The dense TP=2 ->
TP=1 and PP=2 -> TP=1 cases share the TP=2 and PP=2 seeds of test_netloader_parallel.py
(value fingerprints and greedy outputs against the TP=1 disk load)."""

import json

import pytest

from tests.e2e.test_netloader_model_kinds import build, wait_for_seeds
from tests.helpers.e2e import ServingDump, assert_equal_tensors, dump, weightless_copy
from tools.redis_server import RedisServer
from tools.vllm_server import free_port

pytestmark = pytest.mark.e2e

TWO_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
# vLLM CPU 0.32 runs PP=2 only compiled (test_netloader_parallel.py).
LAYOUTS = {"tp1": {}, "tp2": {"tensor_parallel_size": 2},
           "pp2": {"pipeline_parallel_size": 2, "enforce_eager": False}}
# (model kind, the seeds' layouts, (client layout, seed layout) pairs, the seeds' extra
# keys). A cross-layout load moves the loaded layout: where processing replaces the
# loaded tensors (vLLM CPU's MoE prepack, int8 repacking) the seeds keep a loaded copy
# (INT8_CACHE hbm), as the guide says; without it the load is refused by name.
KEEP = {"int8_cache": "hbm"}
CASES = {
    "dense": (("tp1", "tp2"), (("tp2", "tp1"),), {}),
    "moe": (("tp1", "tp2"), (("tp1", "tp2"), ("tp2", "tp1")), KEEP),
    "w8a8": (("tp1", "tp2"), (("tp1", "tp2"), ("tp2", "tp1")), KEEP),
}
# (model kind, client layout, seed layout) whose seed announces itself in a registry and
# whose client knows only the registry (no SOURCE).
BY_REGISTRY = {("dense", "tp2", "tp1")}


def ranks(layout: str) -> int:
    sizes = LAYOUTS[layout]
    return sizes.get("tensor_parallel_size", 1) * sizes.get("pipeline_parallel_size", 1)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_client_in_one_layout_loads_from_a_seed_in_another_and_equals_a_disk_load(
        model, workdir, kind):
    path = model if kind == "dense" else build(workdir, kind, ("--kind", kind))
    out = workdir / "layouts" / kind
    out.mkdir(parents=True, exist_ok=True)
    layouts, pairs, keys = CASES[kind]
    seeds: dict[str, ServingDump] = {}
    registry = RedisServer().start()
    announced = {theirs for k, _, theirs in BY_REGISTRY if k == kind}
    try:
        for layout in layouts:
            extra = {"model": kind, "output_prefix": f"{out}/{layout}-seed-",
                     "listen_port": free_port(ranks(layout)), **keys}
            if layout in announced:
                extra["registry"] = registry.url
            env = TWO_ENV if ranks(layout) > 1 else {"VLLM_CPU_OMP_THREADS_BIND": "0"}
            seeds[layout] = ServingDump(
                path, out / f"{layout}.safetensors", extra,
                "--llm", json.dumps(LAYOUTS[layout]), "--generate",
                # A compiled instance's own cache: two compiling at once must not share.
                env={**env, "VLLM_CACHE_ROOT": str(out / f"cache-{layout}")})
        infos = {layout: wait_for_seeds(seeds[layout], out / f"{layout}-seed-",
                                        ranks(layout), False)["target"]
                 for layout in layouts}
        references = {layout: seeds[layout].report() for layout in layouts}
        checkpoint = infos["tp1"][0]["identity"]["checkpoint"]
        # What the weights are does not depend on the layout.
        assert {info[0]["identity"]["checkpoint"] for info in infos.values()} == {checkpoint}
        bare = weightless_copy(path, out / "bare")
        for mine, theirs in pairs:
            extra = {"MODEL": kind, "EXPECTED_FINGERPRINT": checkpoint}
            if (kind, mine, theirs) in BY_REGISTRY:
                extra["REGISTRY"] = registry.url
            else:
                extra["SOURCE"] = [{"device_id": r, "sources": [infos[theirs][0]["address"]]}
                                   for r in range(ranks(mine))]
            tensors, report = dump(bare, out / f"client-{mine}-from-{theirs}.safetensors",
                                   "netloader", extra, "--llm", json.dumps(LAYOUTS[mine]),
                                   "--generate",
                                   env=TWO_ENV if ranks(mine) > 1 else None)
            expected, disk = references[mine]
            assert_equal_tensors(tensors, expected)
            assert report["outputs"] == disk["outputs"], (mine, theirs)
            assert all(v for v in disk["outputs"].values())
            # The client has no weight files: a disk load would have failed to start.
            if ranks(mine) == 1:  # its seed runs in this process: where it loaded from
                assert report["seeds"][0]["loaded_from"] == (
                    f"seed {infos[theirs][0]['address']} (across layouts)")
    finally:
        for seed in seeds.values():
            seed.stop()
        registry.stop()
