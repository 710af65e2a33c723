"""Loading across layouts on vLLM CPU (issue 25): a client at one tensor-parallel size
loads from a seed at another, with no weight files of its own, and equals a disk load
in its own layout (every runtime tensor, greedy texts and logprobs).

Per model, two seeds that loaded from disk serve at once: one at TP=1 and one at TP=2
(each also the disk-load reference of its size). A TP=1 client names rank 0 of the
TP=2 seed only (the seed listens at LISTEN_PORT + rank, so the client learns rank 1);
a TP=2 client names the TP=1 seed."""

import json

import pytest

from tests.e2e.test_netloader_model_kinds import wait_for_seeds
from tests.helpers.e2e import ServingDump, assert_equal_tensors, dump, weightless_copy
from tools.vllm_server import free_port

pytestmark = pytest.mark.e2e

TP2_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_clients_at_tp1_and_tp2_load_across_layouts_and_equal_a_disk_load(model, workdir):
    out = workdir / "layouts"
    out.mkdir(parents=True, exist_ok=True)
    name = "dense"
    seeds: dict[int, ServingDump] = {}
    ports = {size: free_port(size) for size in (1, 2)}
    try:
        for size in (1, 2):
            extra = {"model": name, "output_prefix": f"{out}/tp{size}-seed-",
                     "listen_port": ports[size]}
            seeds[size] = ServingDump(
                model, out / f"tp{size}.safetensors", extra,
                "--llm", json.dumps({"tensor_parallel_size": size}), "--generate",
                env=TP2_ENV if size == 2 else {"VLLM_CPU_OMP_THREADS_BIND": "0"})
        infos = {size: wait_for_seeds(seeds[size], out / f"tp{size}-seed-", size, False)
                 ["target"] for size in (1, 2)}
        references = {size: seeds[size].report() for size in (1, 2)}
        bare = weightless_copy(model, out / "bare")
        checkpoint = infos[1][0]["identity"]["checkpoint"]
        assert infos[2][0]["identity"]["checkpoint"] == checkpoint  # layout-free
        for size, other in ((1, 2), (2, 1)):
            extra = {
                "MODEL": name, "EXPECTED_FINGERPRINT": checkpoint,
                # One rank of the other instance, for every rank of this one.
                "SOURCE": [{"device_id": r, "sources": [infos[other][0]["address"]]}
                           for r in range(size)],
            }
            tensors, report = dump(bare, out / f"client-tp{size}.safetensors", "netloader",
                                   extra, "--llm", json.dumps({"tensor_parallel_size": size}),
                                   "--generate", env=TP2_ENV if size == 2 else None)
            expected, disk = references[size]
            assert_equal_tensors(tensors, expected)
            assert report["outputs"] == disk["outputs"]
            assert all(v for v in disk["outputs"].values())
            if size == 1:  # its seed runs in this process: it says where it loaded from
                assert report["seeds"][0]["loaded_from"] == (
                    f"seed {infos[2][0]['address']} (across layouts)")
    finally:
        for seed in seeds.values():
            seed.stop()
