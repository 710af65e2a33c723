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
from vllm_ascend.model_loader.netloader.seed import snapshot
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


def test_a_tensor_changed_in_place_after_the_load_keeps_the_digest_of_its_loaded_bytes():
    """Processing may write a tensor in place where torch counts nothing (``.data``,
    numpy): the digests are of the snapshot taken at the load, never of such bytes.
    The child is paced (~3 s), so it is still hashing when the worker writes."""
    model = make_toy(6, vocab=40_000)
    pending = PendingWeights(model, limit_bytes_per_s=2e6)
    at_load = LoadedWeights.capture(make_toy(6, vocab=40_000))
    with torch.no_grad():
        model.big.data.mul_(2)  # large: in the child's snapshot as it was
        model.embed.weight.view(torch.int16).numpy()[:] = 0  # tied, over 4 MiB: parts too
        model.proj.bias.data.add_(1)  # small: hashed at the load
    assert pending._child is not None  # still hashing
    weights = pending.finish()
    assert weights.digests == at_load.digests
    assert weights.parts == at_load.parts
    # So a client that receives the changed bytes rejects them.
    assert LoadedWeights.capture(model).digests != at_load.digests


def test_shared_memory_is_hashed_at_the_load_not_from_a_snapshot():
    """A fork shares such pages instead of copying them: the child would see live
    writes, so only private anonymous memory is left to it."""
    model = make_toy(6, vocab=40_000)
    model.big.share_memory_()
    pending = PendingWeights(model)
    names = [s.name for s in pending.specs]
    assert names.index("big") not in pending.deferred
    assert names.index("embed.weight") in pending.deferred
    at_load = LoadedWeights.capture(model).digests
    with torch.no_grad():
        model.big.data.mul_(2)
    assert pending.finish().digests == at_load


def test_the_hashing_runs_in_a_child_process_at_the_lowest_priority():
    pending = PendingWeights(make_toy(6), limit_bytes_per_s=1e6)  # ~1.2 s
    child = pending._child
    assert child is not None and child.pid != os.getpid()
    time.sleep(0.3)
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == 19
    assert os.getpriority(os.PRIO_PROCESS, 0) != 19
    hashed: list[int] = []
    pending.finish(hashed.append)
    assert hashed == [make_toy(6).big.nbytes]


def test_a_stopped_seed_kills_its_hashing_child_and_lets_go_of_the_tensors():
    pending = PendingWeights(make_toy(6), limit_bytes_per_s=0.1e6)  # ~12 s
    child = pending._child
    assert child is not None
    pending.cancel()
    with pytest.raises(RuntimeError, match="ended"):
        pending.finish()
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)  # killed and reaped
    assert pending.tensors == []
    child.kill()  # after the reap: never a signal to a pid that may be another's


@pytest.mark.parametrize("writes, error", [
    (b"", "ended before it started"),
    (b"+7 " + b"a" * 64 + b" \n", "wrote"),  # a tensor it was not given
    (b"+3 " + b"a" * 64 + b" \n", "parts"),  # 2 MiB: no parts, but the digest is fine
    (b"+3 " + b"a" * 64, "of 1 digests"),  # no newline, then the end
    (b"+" + b"x" * 70_000, "overlong"),
])
def test_a_hashing_child_that_writes_anything_else_fails_the_preparation(
    monkeypatch, writes, error
):
    monkeypatch.setattr(snapshot, "ARM_S", 1.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the stand-in child
        os.close(r)
        os.write(w, writes)
        os._exit(0)
    os.close(w)
    nbytes = {3: (2 << 20) if error != "parts" else 5 << 20}
    with pytest.raises(RuntimeError, match=error):
        list(snapshot.SnapshotHasher(pid, r, nbytes).results())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped


def test_digest_limit_paces_the_hashing_and_the_digests_stay_the_same():
    model = make_toy(6)
    start = time.monotonic()
    pending = PendingWeights(model, limit_bytes_per_s=2e6)
    hashed: list[int] = []
    weights = pending.finish(hashed.append)
    # 1.2 MB at 2 MB/s: its last piece is hashed 0.6 s in at the earliest.
    assert time.monotonic() - start >= 0.45
    assert hashed == [model.big.nbytes]
    assert weights.digests == LoadedWeights.capture(model).digests


@pytest.fixture
def preparing_seed():
    """A seed of make_toy(5) still hashing: its digests are done, but ``gate`` holds it
    back from serving until the test sets it. Yields (server, gate)."""
    model = make_toy(5)
    pending = PendingWeights(model)
    preparation = Preparation(pending.specs, pending.deferred_bytes)
    server = SeedServer(Layouts(None), SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0,
                                                    bucket_bytes=SMALL_BUCKET),
                        listen("127.0.0.1", 0), preparing=preparation).start()
    gate = threading.Event()

    def ready(weights: LoadedWeights) -> None:
        gate.wait(30)
        server.keep(Layouts(weights), None)

    thread = prepare_in_background(pending, preparation, "test seed", ready)
    try:
        yield server, gate
    finally:
        gate.set()
        thread.join(10)
        server.stop()


def test_a_preparing_seed_says_so_and_a_client_moves_on_to_the_next_source(preparing_seed):
    server, gate = preparing_seed
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


def test_a_client_told_preparing_retries_and_is_served_once_the_digests_are_done(
    preparing_seed,
):
    server, gate = preparing_seed
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


def test_a_client_of_another_manifest_is_refused_at_once_not_told_to_wait(preparing_seed):
    """Found by the third attack review: the preparing refusal (retry) came before the
    manifest check, so a client of another model waited its whole TIMEOUT."""
    server, _ = preparing_seed
    fetch = fetch_for(make_toy(None, vocab=301), timeout_s=10.0)
    start = time.monotonic()
    assert fetch.run((server.address,)) is None
    assert time.monotonic() - start < 2.0
    assert "manifest differs" in fetch.reasons[0]
