"""A seed that loaded from disk hashes its large tensors after it listens, at the lowest
priority: the digests equal those of the finished tensors, a tensor changed in place
meanwhile is refused by name, and clients are told it is preparing (they retry, or
move on to the next source) until it serves."""

import os
import threading
import time

import pytest
import torch

from tests.helpers.toy import (
    IDENTITY,
    SMALL_BUCKET,
    assert_same_tensors,
    fetch_for,
    make_toy,
    serving,
)
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
from vllm_ascend.model_loader.netloader.parts import PART_BYTES
from vllm_ascend.model_loader.netloader.planes.progress import Pacer
from vllm_ascend.model_loader.netloader.seed.preparing import (
    DEFER_BYTES,
    PendingWeights,
    Preparation,
    prepare_in_background,
)
from vllm_ascend.model_loader.netloader.seed.server import Layouts, SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen


def test_digests_computed_after_the_load_equal_those_of_the_finished_tensors():
    model = make_toy(6, vocab=40_000)  # a tied 5 MB embedding: digested in parts
    pending = PendingWeights(model)
    assert {pending.specs[i].name for i in pending.deferred} == {"embed.weight", "big"}
    assert any(pending.specs[i].nbytes > PART_BYTES for i in pending.deferred)
    assert all(s.nbytes >= DEFER_BYTES for s in (pending.specs[i] for i in pending.deferred))
    weights = pending.finish()
    whole = LoadedWeights.capture(model)
    assert weights.digests == whole.digests
    assert weights.parts == whole.parts
    assert weights.value_fingerprint() == whole.value_fingerprint()
    assert weights.dropped == ()


def test_small_tensors_are_hashed_at_load_and_a_large_one_changed_in_place_is_dropped():
    model = make_toy(6)
    pending = PendingWeights(model)
    at_load = LoadedWeights.capture(make_toy(6)).digests
    with torch.no_grad():
        model.proj.bias.add_(1.0)  # small: its digest was taken at load
        model.big.add_(0.0)  # large: same bytes, but its version moved
    weights = pending.finish()
    names = [s.name for s in weights.specs]
    assert weights.digests[names.index("proj.bias")] == at_load[names.index("proj.bias")]
    assert weights.dropped == ("big",)
    assert weights.tensors[names.index("big")].is_meta
    server = SeedServer(weights, SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0,
                                              bucket_bytes=SMALL_BUCKET),
                        listen("127.0.0.1", 0)).start()
    try:
        fetch = fetch_for(make_toy(None))
        assert fetch.run((server.address,)) is None
        assert "big" in fetch.reasons[0] and "refused" in fetch.reasons[0]
    finally:
        server.stop()


def test_digest_limit_paces_the_hashing_and_the_digests_stay_the_same():
    model = make_toy(6)
    pending = PendingWeights(model)
    hashed: list[int] = []
    start = time.monotonic()
    weights = pending.finish(hashed.append, Pacer(2e6))
    # 1.2 MB at 2 MB/s: its last piece is reported 0.6 s in at the earliest.
    assert time.monotonic() - start >= 0.45
    assert sum(hashed) == model.big.nbytes and len(hashed) > 1
    assert weights.digests == LoadedWeights.capture(model).digests


@pytest.fixture
def preparing_seed():
    """A seed of make_toy(5) still hashing: its digests are done, but ``gate`` holds it
    back from serving until the test sets it. Yields (server, gate, priorities seen)."""
    model = make_toy(5)
    pending = PendingWeights(model)
    preparation = Preparation(pending.specs, pending.deferred_bytes)
    server = SeedServer(Layouts(None), SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0,
                                                    bucket_bytes=SMALL_BUCKET),
                        listen("127.0.0.1", 0), preparing=preparation).start()
    gate = threading.Event()
    nice: list[int] = []

    def ready(weights: LoadedWeights) -> None:
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        gate.wait(30)
        server.keep(Layouts(weights), None)

    thread = prepare_in_background(pending, preparation, "test seed", ready)
    try:
        yield server, gate, nice
    finally:
        gate.set()
        thread.join(10)
        server.stop()


def test_a_preparing_seed_says_so_and_a_client_moves_on_to_the_next_source(preparing_seed):
    server, gate, nice = preparing_seed
    info = query_seed(server.address)
    assert info["value_fingerprint"] is None
    assert info["preparing"]["total_bytes"] == make_toy(5).big.nbytes
    assert "preparing" in info["layouts"]["loaded"]["unavailable"]
    with serving(seed=5) as other:
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=1.0)
        start = time.monotonic()
        received = fetch.run((server.address, other.address))
        assert received is not None and received.source == other.address
        # Told "preparing", it retried like at a busy seed until its TIMEOUT, then moved on.
        assert time.monotonic() - start >= 0.45
        assert "preparing" in fetch.reasons[0]
        assert_same_tensors(client, make_toy(5))
    assert nice and nice[0] == 19


def test_a_client_told_preparing_retries_and_is_served_once_the_digests_are_done(
    preparing_seed,
):
    server, gate, _ = preparing_seed
    client = make_toy(None)
    fetch = fetch_for(client, timeout_s=20.0)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fetch.run((server.address,))))
    thread.start()
    time.sleep(1.5)  # refused as preparing at least twice meanwhile
    assert not result
    gate.set()
    thread.join(30)
    assert result and result[0] is not None, fetch.reasons
    assert_same_tensors(client, make_toy(5))
    info = query_seed(server.address)
    assert "preparing" not in info
    assert info["value_fingerprint"] == LoadedWeights.capture(make_toy(5)).value_fingerprint()


def test_a_seed_whose_hashing_failed_refuses_for_good_and_clients_do_not_wait():
    pending = PendingWeights(make_toy(5))
    preparation = Preparation(pending.specs, pending.deferred_bytes)
    server = SeedServer(Layouts(None), SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0),
                        listen("127.0.0.1", 0), preparing=preparation).start()

    def ready(weights: LoadedWeights) -> None:
        raise RuntimeError("out of memory, say")

    try:
        prepare_in_background(pending, preparation, "test seed", ready).join(10)
        assert preparation.error is not None
        fetch = fetch_for(make_toy(None), timeout_s=10.0)
        start = time.monotonic()
        assert fetch.run((server.address,)) is None
        assert time.monotonic() - start < 2.0  # not retried like a busy seed
        assert "could not compute its digests" in fetch.reasons[0]
        assert "out of memory, say" in query_seed(server.address)["preparing"]["error"]
    finally:
        server.stop()
