"""Netloader on instances with two ranks (TP=2, PP=2), on real vLLM CPU servers.

Each rank of a seed serves its own shard, on ``LISTEN_PORT + rank`` (or a free port)
written to ``{OUTPUT_PREFIX}{rank}.txt``; each rank of a client fetches from the seeds
its ``SOURCE`` entry with ``device_id`` = its global rank names. Every instance is
compared with an ``auto`` instance of the *same* layout: TP and PP change the
arithmetic (all-reduce order, compiled graphs), so a TP=1 reference is not bit-equal.

vLLM CPU 0.32 runs PP=2 only without ``--enforce-eager``: in eager mode the CPU model
runner never warms up, so the last stage has no buffer to receive the first stage's
hidden states into, and the first request kills the engine with ``AssertionError`` at
``assert self.intermediate_tensors is not None`` (``gpu_model_runner.py``,
``sync_and_gather_intermediate_tensors``). The PP instances here therefore compile.
"""


import pytest

from tests.helpers.e2e import SERVER_ARGS, address_of, greedy, start_all, weightless_copy
from tools.vllm_server import VllmServer, free_port
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e

RANKS = (0, 1)
# The model's name on every instance here: a client without weight files reads its
# config from another directory.
NAME = {"MODEL": "tiny-qwen2"}
TP2 = ["--tensor-parallel-size", "2"]
PP2 = ["--pipeline-parallel-size", "2"]


def two_rank_server(
    model: str, workdir, name: str, layout: list[str], extra: dict | None = None,
    eager: bool = True,
) -> VllmServer:
    """A two-worker instance, one worker per core; ``extra`` None means `auto`."""
    return VllmServer(
        model, load_format="auto" if extra is None else "netloader", extra_config=extra,
        cpu_bind="0|1", log_path=workdir / f"{name}.log", extra_args=[*SERVER_ARGS, *layout],
        enforce_eager=eager,
        # Its own compile cache: two instances compiling at once must not share one.
        env={"VLLM_CACHE_ROOT": str(workdir / f"cache-{name}")},
    )


def weightless_tp1_client(model: str, workdir, name: str, seed_address: str) -> VllmServer:
    """A TP=1 `vllm serve` client without weight files that names one seed rank (and
    pins that seed's checkpoint); its seed info at ``{workdir}/{name}-0.txt``."""
    return VllmServer(
        weightless_copy(model, workdir / f"{name}-bare"), load_format="netloader",
        cpu_bind="0", log_path=workdir / f"{name}.log", extra_args=SERVER_ARGS,
        extra_config={
            "OUTPUT_PREFIX": str(workdir / f"{name}-"), **NAME,
            "EXPECTED_FINGERPRINT": query_seed(seed_address)["identity"]["checkpoint"],
            "SOURCE": [{"device_id": 0, "sources": [seed_address]}],
        },
    )


def infos(addresses: list[str]) -> list[dict]:
    return [query_seed(address) for address in addresses]


class TestTensorParallel:
    @pytest.fixture(scope="class")
    def tp_seed(self, model, workdir):
        """A TP=2 netloader seed from disk on LISTEN_PORT, and TP=2 `auto` outputs."""
        port = free_port(span=2)
        prefix = workdir / "tp-seed-"
        seed = two_rank_server(
            model, workdir, "tp-seed", TP2,
            {"OUTPUT_PREFIX": str(prefix), "LISTEN_PORT": port, **NAME}
        )
        disk = two_rank_server(model, workdir, "tp-auto", TP2)
        try:
            start_all(seed, disk)
            reference = greedy(disk)
            disk.stop()
            yield seed, [address_of(prefix, r) for r in RANKS], reference, port
        finally:
            disk.stop()
            seed.stop()

    @pytest.fixture(scope="class")
    def tp_client(self, model, workdir, tp_seed):
        """Each client rank lists the *other* rank's seed first, then its own."""
        _, seed_addresses, _, _ = tp_seed
        prefix = workdir / "tp-client-"
        sources = [
            {"device_id": r, "sources": [seed_addresses[1 - r], seed_addresses[r]]}
            for r in RANKS
        ]
        client = two_rank_server(
            model, workdir, "tp-client", TP2,
            {"OUTPUT_PREFIX": str(prefix), "SOURCE": sources, **NAME}
        )
        try:
            start_all(client)
            yield client, [address_of(prefix, r) for r in RANKS]
        finally:
            client.stop()

    def test_seed_ranks_serve_own_shards_on_listen_port_plus_rank(self, tp_seed):
        server, addresses, reference, port = tp_seed
        seed_infos = infos(addresses)
        for rank, info in zip(RANKS, seed_infos, strict=True):
            assert info["address"] == f"127.0.0.1:{port + rank}"
            assert info["loaded_from"] == "disk"
            identity = info["identity"]
            assert (identity["rank"], identity["role"]) == (rank, "target")
            assert (identity["tensor_parallel_size"], identity["pipeline_parallel_size"]) == (2, 1)
        # Shards of equal shapes but other values: only the rank tells them apart.
        assert seed_infos[0]["tensors"] == seed_infos[1]["tensors"]
        assert seed_infos[0]["bytes"] == seed_infos[1]["bytes"]
        assert seed_infos[0]["value_fingerprint"] != seed_infos[1]["value_fingerprint"]
        assert all(logprobs for _, logprobs in reference) and any(text for text, _ in reference)
        assert greedy(server) == reference

    def test_client_ranks_load_from_matching_seed_ranks(self, tp_seed, tp_client):
        _, seed_addresses, reference, _ = tp_seed
        client, client_addresses = tp_client
        for rank, seed_info, info in zip(
            RANKS, infos(seed_addresses), infos(client_addresses), strict=True
        ):
            assert info["loaded_from"] == f"seed {seed_addresses[rank]}"
            assert info["value_fingerprint"] == seed_info["value_fingerprint"]
            assert info["identity"] == seed_info["identity"]
            # The other rank's seed, tried first, refused: same shapes, wrong shard.
            # (A refusal reads from the seed's side: "<seed's> here vs <client's> there".)
            (refusal,) = info["fallback_reasons"]
            assert seed_addresses[1 - rank] in refusal
            assert f"rank: {1 - rank} here vs {rank} there" in refusal
            assert seed_info["completed_transfers"] == 1
        assert greedy(client) == reference

    def test_tp1_client_is_refused_the_same_layout_transfer_and_loads_across_layouts(
        self, model, workdir, tp_seed, seed
    ):
        """A `vllm serve` client at TP=1 without weight files named rank 0 of the TP=2
        seed: refused the same-layout transfer, it gathers from both ranks (the seed
        listens at LISTEN_PORT + rank) and answers as the TP=1 disk load does. (Until
        issue 25 it loaded from disk.)"""
        _, seed_addresses, _, _ = tp_seed
        _, _, tp1_reference = seed
        before = [query_seed(a)["completed_transfers"] for a in seed_addresses]
        prefix = workdir / "tp1-client-"
        client = weightless_tp1_client(model, workdir, "tp1-client", seed_addresses[0])
        try:
            start_all(client)
            info = query_seed(address_of(prefix))
            assert info["loaded_from"] == f"seed {seed_addresses[0]} (across layouts)"
            (refusal,) = info["fallback_reasons"]
            assert "tensor_parallel_size: 2 here vs 1 there" in refusal
            # Every tensor byte for byte as the TP=1 disk load's (the session seed's).
            assert info["value_fingerprint"] == query_seed(seed[1])["value_fingerprint"]
            assert greedy(client) == tp1_reference
            # Both ranks served it: a completed transfer each.
            assert [query_seed(a)["completed_transfers"] for a in seed_addresses] == [
                n + 1 for n in before]
        finally:
            client.stop()


class TestPipelineParallel:
    @pytest.fixture(scope="class")
    def pp_seed(self, model, workdir):
        """A PP=2 netloader seed from disk on free ports, and PP=2 `auto` outputs."""
        prefix = workdir / "pp-seed-"
        # On LISTEN_PORT: a client in another layout learns rank 1 from rank 0.
        seed = two_rank_server(
            model, workdir, "pp-seed", PP2,
            {"OUTPUT_PREFIX": str(prefix), "LISTEN_PORT": free_port(span=2), **NAME},
            eager=False,
        )
        disk = two_rank_server(model, workdir, "pp-auto", PP2, eager=False)
        try:
            start_all(seed, disk)
            reference = greedy(disk)
            disk.stop()
            yield seed, [address_of(prefix, r) for r in RANKS], reference
        finally:
            disk.stop()
            seed.stop()

    def test_stages_load_from_matching_seed_stages(self, model, workdir, pp_seed):
        seed, seed_addresses, reference = pp_seed
        seed_infos = infos(seed_addresses)
        for rank, info in zip(RANKS, seed_infos, strict=True):
            assert info["loaded_from"] == "disk"
            identity = info["identity"]
            assert (identity["rank"], identity["pipeline_parallel_size"]) == (rank, 2)
        # Each stage holds its own layers (the last one also the final norm and lm_head).
        assert seed_infos[0]["tensors"] != seed_infos[1]["tensors"]
        assert greedy(seed) == reference

        prefix = workdir / "pp-client-"
        sources = [{"device_id": r, "sources": [seed_addresses[r]]} for r in RANKS]
        client = two_rank_server(
            model, workdir, "pp-client", PP2,
            {"OUTPUT_PREFIX": str(prefix), "SOURCE": sources, **NAME}, eager=False,
        )
        try:
            start_all(client)
            for rank, seed_info in zip(RANKS, seed_infos, strict=True):
                info = query_seed(address_of(prefix, rank))
                assert info["loaded_from"] == f"seed {seed_addresses[rank]}"
                assert info["fallback_reasons"] == []
                assert info["value_fingerprint"] == seed_info["value_fingerprint"]
            assert greedy(client) == reference
        finally:
            client.stop()

    def test_a_tp1_client_loads_across_layouts_from_the_pp2_seed(
        self, model, workdir, pp_seed, seed
    ):
        """Issue 25's PP=2 -> PP=1 case: each stage's manifest says which layers it
        holds; the client, without weight files, named rank 0 only, gathers from both
        stages and answers as the TP=1 disk load does."""
        _, seed_addresses, _ = pp_seed
        _, _, tp1_reference = seed
        prefix = workdir / "pp-to-tp1-client-"
        client = weightless_tp1_client(model, workdir, "pp-to-tp1-client", seed_addresses[0])
        try:
            start_all(client)
            info = query_seed(address_of(prefix))
            assert info["loaded_from"] == f"seed {seed_addresses[0]} (across layouts)"
            assert info["value_fingerprint"] == query_seed(seed[1])["value_fingerprint"]
            assert greedy(client) == tp1_reference
        finally:
            client.stop()
