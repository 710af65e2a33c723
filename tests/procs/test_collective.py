"""The collective data plane: a two-process gloo group whose rendezvous crosses the
authenticated connection (``TunnelStore``), with more buckets than either side keeps
in flight and a tensor larger than one operation's chunk."""

import multiprocessing as mp
import socket
import threading
import time
from typing import Any

import pytest
import torch

from tests.helpers.toy import bf16_tensors
from tests.helpers.wire import frame, tcp_pair
from vllm_ascend.model_loader.netloader.deadline import Deadline, DeadlineExceeded
from vllm_ascend.model_loader.netloader.manifest import digest, plan_buckets, spec_of
from vllm_ascend.model_loader.netloader.planes.collective import (
    CHUNK_BYTES,
    CLIENT_RANK,
    RECV_DEPTH,
    SEED_RANK,
    TunnelStore,
    group_link,
)
from vllm_ascend.model_loader.netloader.planes.progress import TransferError
from vllm_ascend.model_loader.netloader.planes.transfer import (
    TransferStats,
    recv_weights,
    send_weights,
)
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.messages import store_record

BUCKET = 64 << 10
CPU = torch.device("cpu")


def tensors_of(seed: int | None) -> list[torch.Tensor]:
    """Mixed sizes around BUCKET: empty, tiny, several per bucket, ones that travel alone,
    and one of more than CHUNK_BYTES. ``None`` gives the same shapes, all zero."""
    gen = torch.Generator().manual_seed(1)
    sizes = [int(s) for s in torch.randint(0, 24_000, (40,), generator=gen)]
    sizes[3], sizes[17], sizes[30] = 0, 50_000, 90_000  # 100 kB and 180 kB bf16: alone
    sizes[35] = CHUNK_BYTES // 2 + 1000  # bf16: just over one chunk, moves as two operations
    return bf16_tensors(sizes, seed)


def _seed(port_q: Any, seed: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_q.put(server.getsockname()[1])
        conn, _ = server.accept()
    tensors = tensors_of(seed)
    specs = [spec_of(f"t{i}", t) for i, t in enumerate(tensors)]
    try:
        with conn, group_link(conn, SEED_RANK, 10.0, CPU, Deadline(10, "setup")) as link:
            send_weights(link, tensors, specs, BUCKET)
    except (RuntimeError, TransferError, ProtocolError, OSError):
        pass  # the client gave up on purpose in one test: its group is gone


def receive(digests_for: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, float]:
    """Receive seed 5's tensors into zeros; returns (expected, received, error or stats,
    seconds until recv_weights returned or raised)."""
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    proc = ctx.Process(target=_seed, args=(port_q, 5), daemon=True)
    proc.start()
    expected, targets = tensors_of(5), tensors_of(None)
    specs = [spec_of(f"t{i}", t) for i, t in enumerate(targets)]
    stats = TransferStats()
    elapsed = 0.0
    conn = socket.create_connection(("127.0.0.1", port_q.get(timeout=60)), timeout=10)
    try:
        with conn, group_link(conn, CLIENT_RANK, 10.0, CPU, Deadline(10, "setup")) as link:
            start = time.monotonic()
            try:
                recv_weights(link, targets, specs, digests_for(expected), BUCKET, stats)
            finally:
                elapsed = time.monotonic() - start
        outcome: Any = stats
        proc.join(20)
    except TransferError as e:
        outcome = e
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(20)
    return expected, targets, outcome, elapsed


def test_plan_has_more_buckets_than_are_in_flight():
    specs = [spec_of(f"t{i}", t) for i, t in enumerate(tensors_of(None))]
    assert len(plan_buckets(specs, BUCKET)) > 3 * RECV_DEPTH


def test_every_tensor_arrives_bit_for_bit():
    expected, received, stats, _ = receive(lambda ts: [digest(t) for t in ts])
    assert isinstance(stats, TransferStats)
    for a, b in zip(expected, received, strict=True):
        assert torch.equal(a, b)
    assert stats.verify_s > 0


@pytest.mark.parametrize("bad", [0, 17, 25, 39])
def test_digest_mismatch_mid_stream_leaves_only_verified_tensors(bad):
    def digests(ts: list[torch.Tensor]) -> list[str]:
        out = [digest(t) for t in ts]
        out[bad] = "0" * 64
        return out

    expected, received, error, seconds = receive(digests)
    assert isinstance(error, TransferError) and f"t{bad} " in str(error)
    assert seconds < 5, "receives posted ahead held up the failure"
    for i, (a, b) in enumerate(zip(expected, received, strict=True)):
        if i < bad:
            assert torch.equal(a, b), i
        else:  # never delivered, though later buckets may already have arrived in staging
            assert torch.count_nonzero(b) == 0, i


def test_the_rendezvous_needs_no_port_but_the_connection():
    # TCPStore listened on a port of its own, and anyone who found it could join the
    # group or fill the seed's memory with records. The tunnel has no listener at all.
    a, b = socket.socketpair()
    with a, b:
        store_a, store_b = TunnelStore(a, Deadline(5, "a")), TunnelStore(b, Deadline(5, "b"))
        store_a.set("rank0", b"address of rank 0")
        assert store_b.get("rank0") == b"address of rank 0"
        store_b.set("rank1", b"\x00\xff")
        assert store_a.get("rank1") == b"\x00\xff"
        assert store_a.check(["rank0", "rank1"]) and not store_a.check(["other"])


def test_a_peer_cannot_overwrite_or_flood_the_rendezvous():
    a, b = socket.socketpair()
    with a, b:
        store = TunnelStore(b, Deadline(5, "rendezvous"))
        store.set("mine", b"1")
        a.sendall(frame(store_record("mine", b"hijacked")))
        with pytest.raises(ProtocolError, match="repeated"):
            store.get("theirs")
        assert store.get("mine") == b"1"
    a, b = socket.socketpair()
    with a, b:
        store = TunnelStore(b, Deadline(5, "rendezvous"))
        def flood() -> None:
            try:
                for i in range(100):
                    a.sendall(frame(store_record(f"k{i}", b"x" * 1000)))
            except OSError:
                pass  # the store stopped reading: that is the point

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        with pytest.raises(ProtocolError, match="one too many"):
            store.get("never")
        sender.join(5)


def test_a_peer_that_never_joins_fails_group_setup_at_its_deadline():
    a, b = tcp_pair()
    with a, b:
        start = time.monotonic()
        with pytest.raises((DeadlineExceeded, RuntimeError), match="took longer than 1 s"):
            with group_link(a, SEED_RANK, 10.0, CPU, Deadline(1.0, "group set-up")):
                pass
        assert time.monotonic() - start < 10
