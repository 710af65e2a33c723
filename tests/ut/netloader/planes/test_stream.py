"""The host data plane over a real TCP connection on 127.0.0.1: every header checked
against the plan, no-progress limits instead of per-call timeouts, bytes received
straight into the targets and a target counted only once its digest matched."""

import functools
import os
import socket
import threading
import time

import pytest
import torch

from tests.helpers.toy import bf16_tensors
from tests.helpers.wire import tcp_pair
from vllm_ascend.model_loader.netloader.manifest import (
    byte_view,
    digest,
    digest_parts,
    plan_buckets,
    spec_of,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES
from vllm_ascend.model_loader.netloader.planes.progress import PROGRESS_BYTES, TransferError
from vllm_ascend.model_loader.netloader.planes.stream import StreamLink
from vllm_ascend.model_loader.netloader.planes.transfer import recv_weights, send_weights
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import abort_frame, data_header

BUCKET = 256 << 10


@pytest.fixture(autouse=True, params=["threaded", "one_core"])
def receiving_thread(request):
    """Every test twice: as an unpinned process receives (a reader thread, a helper
    faulting pages ahead, hashing on the rest), and pinned to one CPU as a vLLM CPU
    worker is (the receiving thread reads and hashes each piece itself). Threads the
    test starts inherit the pin."""
    before = os.sched_getaffinity(0)
    if request.param == "one_core":
        os.sched_setaffinity(0, {min(before)})
    try:
        yield request.param
    finally:
        os.sched_setaffinity(0, before)


def model(seed: int | None) -> list[torch.Tensor]:
    """Small tensors that share buckets, one that travels alone (3 MiB), an empty one."""
    return bf16_tensors([1000, 70_000, 0, 1_500_000, 5, 40_000], seed, stride=10)


SPECS = [spec_of(f"t{i}", t) for i, t in enumerate(model(None))]
SIZES = [sum(SPECS[i].nbytes for i in b) for b in plan_buckets(SPECS, BUCKET)]
TOTAL = sum(SIZES)


VERIFIED: list[int] = []


def receive(
    sock: socket.socket, timeout_s: float = 5.0, targets: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], object]:
    """The targets after a receive, and its error; ``VERIFIED[-1]`` is how many leading
    targets the receive reported verified (``on_verified``)."""
    targets = model(None) if targets is None else targets
    digests = [digest(t) for t in model(1)]
    VERIFIED.clear()
    VERIFIED.append(0)
    try:
        recv_weights(StreamLink(sock, timeout_s, TOTAL), targets, SPECS, digests, BUCKET,
                     on_verified=VERIFIED.append)
        return targets, None
    except (TransferError, ProtocolError) as e:
        return targets, e


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def assert_only_verified(targets: list[torch.Tensor]) -> int:
    """Every target reported verified holds exactly the seed's bytes; returns how many
    were (the others may hold anything: the caller rewrites them)."""
    done = VERIFIED[-1]
    assert VERIFIED == sorted(VERIFIED)
    for got, want in zip(targets[:done], model(1)[:done], strict=True):
        assert torch.equal(got, want)
    return done


def assert_a_whole_transfer_arrives_bit_for_bit() -> None:
    a, b = tcp_pair()
    with a, b:
        sender = in_thread(lambda: send_weights(StreamLink(a, 5.0, TOTAL), model(1), SPECS, BUCKET))
        targets, error = receive(b)
        sender.join(10)
    assert error is None
    for got, want in zip(targets, model(1), strict=True):
        assert torch.equal(got, want)


def test_every_tensor_arrives_bit_for_bit():
    assert_a_whole_transfer_arrives_bit_for_bit()


@pytest.mark.parametrize(
    "header",
    [data_header(1, SIZES[0]), data_header(0, SIZES[0] + 1), data_header(0, 2**63),
     b"XXXX" + data_header(0, SIZES[0])[4:]],
    ids=["wrong index", "one byte more", "huge", "bad magic"],
)
def test_a_header_off_the_plan_fails_before_any_payload_is_read(header):
    a, b = tcp_pair()
    with a, b:
        a.sendall(header + b"\x00" * 100)
        start = time.monotonic()
        targets, error = receive(b)
    assert isinstance(error, ProtocolError) and time.monotonic() - start < 2
    assert all(torch.count_nonzero(t) == 0 for t in targets)


def test_a_dripping_sender_is_cut_off_after_the_no_progress_limit():
    a, b = tcp_pair()
    stop = threading.Event()

    def drip() -> None:
        a.sendall(data_header(0, SIZES[0]))
        while not stop.wait(0.2):
            try:
                a.sendall(b"\x01")
            except OSError:
                return

    with a, b:
        dripper = in_thread(drip)
        start = time.monotonic()
        targets, error = receive(b, timeout_s=1.0)
        elapsed = time.monotonic() - start
        stop.set()
        dripper.join(5)
    assert isinstance(error, TransferError) and "no progress for 1 s" in str(error)
    assert elapsed < 3
    assert assert_only_verified(targets) == 0


def test_a_slow_sender_that_keeps_progressing_finishes_past_the_limit():
    # 1 MiB per 0.6 s against a 1 s no-progress limit: the whole transfer takes longer
    # than the limit, and its big bucket alone does too. A per-operation timeout on
    # that bucket would fail; this must not.
    a, b = tcp_pair()
    assert TOTAL > 2 * PROGRESS_BYTES

    def slow() -> None:
        from vllm_ascend.model_loader.netloader.planes.progress import Pacer

        send_weights(StreamLink(a, 5.0, TOTAL, Pacer(PROGRESS_BYTES / 0.6)), model(1), SPECS,
                     BUCKET)

    with a, b:
        sender = in_thread(slow)
        start = time.monotonic()
        targets, error = receive(b, timeout_s=1.0)
        elapsed = time.monotonic() - start
        sender.join(10)
    assert error is None and elapsed > 1.0
    for got, want in zip(targets, model(1), strict=True):
        assert torch.equal(got, want)


def test_a_receiver_that_stops_reading_cuts_the_sender_off():
    a, b = tcp_pair()
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = [torch.zeros(8 << 20, dtype=torch.uint8)]
        specs = [spec_of("big", big[0])]
        start = time.monotonic()
        with pytest.raises(TransferError, match="sending: no progress for 1 s"):
            send_weights(StreamLink(a, 1.0, big[0].nbytes), big, specs, BUCKET)
        assert time.monotonic() - start < 5


def test_an_abort_ends_the_transfer_with_the_senders_reason():
    a, b = tcp_pair()
    with a, b:
        link = StreamLink(a, 5.0, TOTAL)
        plan = plan_buckets(SPECS, BUCKET)
        link.send_bucket(0, [model(1)[i] for i in plan[0]], SIZES[0])
        link.abort("relay's own transfer failed")
        targets, error = receive(b)
    assert isinstance(error, ProtocolError)
    assert "sender aborted at bucket 1: relay's own transfer failed" in str(error)
    assert_only_verified(targets)
    assert torch.equal(targets[0], model(1)[0])  # the first bucket was verified and kept


def test_a_wrong_byte_keeps_its_tensor_out_and_the_rest_verified():
    a, b = tcp_pair()
    bad = model(1)
    bad[3][1000] += 1

    with a, b:
        sender = in_thread(lambda: send_weights(StreamLink(a, 5.0, TOTAL), bad, SPECS, BUCKET))
        targets, error = receive(b)
        sender.join(10)
    assert isinstance(error, TransferError) and "digest mismatch for t3" in str(error)
    # The tensors before it verified, it not: never offered to a resume or a relay.
    assert assert_only_verified(targets) == 3


def test_extra_bytes_after_the_last_bucket_are_never_read():
    a, b = tcp_pair()
    with a, b:
        def send_and_more() -> None:
            send_weights(StreamLink(a, 5.0, TOTAL), model(1), SPECS, BUCKET)
            a.sendall(abort_frame("junk after the plan") + b"\xff" * 10_000)

        sender = in_thread(send_and_more)
        targets, error = receive(b)
        sender.join(10)
    assert error is None
    for got, want in zip(targets, model(1), strict=True):
        assert torch.equal(got, want)


# --- review findings: a peer that moves just enough, and senders' windows -------------------


def test_a_sender_that_moves_just_enough_still_meets_the_transfers_deadline():
    # 1 MiB every 0.8 s passes a 1 s no-progress window for ever; the transfer's
    # deadline (TIMEOUT + size at the minimum rate) still ends it.
    from vllm_ascend.model_loader.netloader.planes.progress import Pacer

    a, b = tcp_pair()

    def slow() -> None:
        try:
            send_weights(StreamLink(a, 5.0, TOTAL, Pacer(PROGRESS_BYTES / 0.8)), model(1),
                         SPECS, BUCKET)
        except (OSError, TransferError):
            pass  # the receiver gave up: expected

    with a, b:
        sender = in_thread(slow)
        targets = model(None)
        start = time.monotonic()
        VERIFIED[:] = [0]
        with pytest.raises(TransferError, match="not done within 2 s"):
            recv_weights(StreamLink(b, 1.0, TOTAL, deadline_s=2.0), targets, SPECS,
                         [digest(t) for t in model(1)], BUCKET, on_verified=VERIFIED.append)
        assert time.monotonic() - start < 3
        b.close()
        sender.join(10)
    assert assert_only_verified(targets) < len(targets)


def test_a_receiver_that_reads_a_bucket_of_small_tensors_drop_by_drop_is_cut_off():
    # Before: the sender opened a fresh window after every tensor, so a bucket of small
    # tensors needed only one of them per window from its reader.
    a, b = tcp_pair()
    small = [torch.ones(2048, dtype=torch.uint8) for _ in range(2000)]  # 4 MB in one bucket
    specs = [spec_of(f"s{i}", t) for i, t in enumerate(small)]
    stop = threading.Event()

    def sip() -> None:
        while not stop.wait(0.05):
            try:
                b.recv(2048)
            except OSError:
                return

    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        reader = in_thread(sip)
        start = time.monotonic()
        with pytest.raises(TransferError, match="sending: no progress for 1 s"):
            send_weights(StreamLink(a, 1.0, sum(s.nbytes for s in specs)), small, specs,
                         8 << 20)
        assert time.monotonic() - start < 5
        stop.set()
        reader.join(5)


def test_keepalives_renew_the_window_and_only_the_deadline_ends_them():
    a, b = tcp_pair()
    from vllm_ascend.model_loader.netloader.wire.frames import keepalive_frame

    def keep_alive_forever() -> None:
        try:
            for _ in range(100):
                a.sendall(keepalive_frame())
                time.sleep(0.3)
        except OSError:
            pass

    with a, b:
        sender = in_thread(keep_alive_forever)
        start = time.monotonic()
        with pytest.raises(TransferError, match="not done within 3 s"):
            recv_weights(StreamLink(b, 1.0, TOTAL, deadline_s=3.0), model(None), SPECS,
                         [digest(t) for t in model(1)], BUCKET)
        assert 2.5 < time.monotonic() - start < 4.5  # past three 1 s windows: renewed
        b.close()
        sender.join(40)


# --- received in place: bounded writes, and the kernel's help optional -----------------------


def fenced(fill: int = 0xA5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The targets as views into one buffer with a fence of ``fill`` bytes around each."""
    fence = 4096
    shapes = [t.shape for t in model(None)]
    sizes = [SPECS[i].nbytes for i in range(len(shapes))]
    arena = torch.full((sum(sizes) + fence * (len(sizes) + 1),), fill, dtype=torch.uint8)
    targets, offset = [], fence
    for shape, n in zip(shapes, sizes, strict=True):
        view = arena[offset: offset + n].view(torch.bfloat16).reshape(shape)
        view.zero_()
        targets.append(view)
        offset += n + fence
    return arena, targets


def fences_intact(arena: torch.Tensor, targets: list[torch.Tensor], fill: int = 0xA5) -> bool:
    mask = torch.ones(arena.numel(), dtype=torch.bool)
    base = arena.data_ptr()
    for t in targets:
        start = t.data_ptr() - base
        mask[start: start + t.nbytes] = False
    return bool(torch.all(arena[mask] == fill))


@pytest.mark.parametrize("how", ["fewer", "more", "more_in_a_tensor"])
def test_a_seed_that_sends_more_or_fewer_bytes_than_planned_never_writes_past_a_tensor(how):
    """The header must match the plan before a byte of payload is read, and every read
    is bounded by the tensor it fills: whatever the seed sends, the fence bytes around
    the targets keep their value."""
    a, b = tcp_pair()
    plan = plan_buckets(SPECS, BUCKET)
    payload = b"".join(model(1)[i].view(torch.uint8).numpy().tobytes() for i in plan[0])

    def hostile() -> None:
        try:
            if how == "fewer":
                a.sendall(data_header(0, SIZES[0]) + payload[: len(payload) // 2])
                a.shutdown(socket.SHUT_WR)
            elif how == "more":
                a.sendall(data_header(0, SIZES[0] + 4096) + payload + b"\xff" * 4096)
            else:  # the right header, then more bytes than the bucket holds
                a.sendall(data_header(0, SIZES[0]) + payload + b"\xff" * 100_000)
        except OSError:
            pass

    arena, targets = fenced()
    with a, b:
        sender = in_thread(hostile)
        _, error = receive(b, timeout_s=1.0, targets=targets)
        sender.join(5)
    assert error is not None
    assert fences_intact(arena, targets)
    assert_only_verified(targets)


def test_huge_pages_and_faulting_ahead_that_the_kernel_refuses_change_nothing_but_the_log(
    monkeypatch, caplog
):
    import errno
    import logging

    from vllm_ascend.model_loader.netloader.planes import memory

    calls: list[int] = []

    def refuse(start: int, length: int, advice: int) -> int:
        calls.append(advice)
        import ctypes

        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(memory, "madvise", refuse)
    monkeypatch.setattr(memory, "_warned", set())
    caplog.set_level(logging.INFO, logger="vllm.netloader")
    assert_a_whole_transfer_arrives_bit_for_bit()
    assert memory.MADV_HUGEPAGE in calls
    said = [r.getMessage() for r in caplog.records if "does not" in r.getMessage()]
    assert said and all("EINVAL" in m for m in said) and len(said) == len(set(said))


def test_a_large_tensor_is_verified_part_by_part_and_a_bad_part_stops_it_there():
    # A 10 MiB tensor (parts of 4, 4, 2 MiB) after a small one, one byte wrong in its
    # last part: the first two parts are reported verified as they land (a relay
    # passes them on), the bad part and the tensor never are.
    want = [torch.arange(1000, dtype=torch.int32),
            torch.randn((10 << 20) // 4, generator=torch.Generator().manual_seed(4))]
    bad = [t.clone() for t in want]
    bad[1][-5] += 1
    specs = [spec_of(f"t{i}", t) for i, t in enumerate(want)]
    digests, parts = zip(*(digest_parts(t) for t in want), strict=True)
    total = sum(s.nbytes for s in specs)
    targets = [torch.zeros_like(t) for t in want]
    tensors: list[int] = []
    verified: list[int] = []
    a, b = tcp_pair()
    with a, b:
        sender = in_thread(lambda: send_weights(StreamLink(a, 5.0, total), bad, specs, BUCKET))
        with pytest.raises(TransferError, match="digest mismatch for t1 .* in part 2"):
            recv_weights(StreamLink(b, 5.0, total), targets, specs, list(digests), BUCKET,
                         on_verified=tensors.append, parts=dict(zip(digests, parts, strict=True)),
                         on_verified_bytes=verified.append)
        sender.join(10)
    assert tensors == [1]
    assert verified == [4000, 4000 + PART_BYTES, 4000 + 2 * PART_BYTES]
    assert torch.equal(byte_view(targets[1])[: 2 * PART_BYTES],
                       byte_view(want[1])[: 2 * PART_BYTES])


def test_a_large_tensor_without_its_part_digests_is_still_checked_whole():
    # A receiver that was not told the parts (no relay needs them) checks the parts'
    # join against the tensor digest at the end, and reports no part early.
    want = torch.randn((9 << 20) // 4, generator=torch.Generator().manual_seed(5))
    for wrong in (False, True):
        sent = want.clone()
        if wrong:
            sent[0] += 1
        spec = spec_of("t0", want)
        target = torch.zeros_like(want)
        verified: list[int] = []
        a, b = tcp_pair()
        with a, b:
            sender = in_thread(functools.partial(
                send_weights, StreamLink(a, 5.0, spec.nbytes), [sent], [spec], BUCKET))
            try:
                recv_weights(StreamLink(b, 5.0, spec.nbytes), [target], [spec],
                             [digest(want)], BUCKET, on_verified_bytes=verified.append)
                error = None
            except TransferError as e:
                error = e
            sender.join(10)
        assert (error is not None) == wrong
        assert verified == ([] if wrong else [spec.nbytes])


def test_a_relay_waits_for_a_bucket_of_small_tensors_with_keepalives_then_parts_without():
    # A relay bucket of three 1.1 MiB tensors, then a 9 MiB tensor alone. Its own fetch
    # may report them a whole upstream bucket at a time (device targets), so the relay
    # waits for all of the small tensors' bucket with keepalives, and inside a bucket
    # (no keepalive can go there) only for the large tensor's later parts.
    mib = 1 << 20
    tensors = [torch.zeros(int(1.1 * mib), dtype=torch.uint8) for _ in range(3)]
    tensors.append(torch.zeros(9 * mib, dtype=torch.uint8))
    specs = [spec_of(f"t{i}", t) for i, t in enumerate(tensors)]
    total = sum(s.nbytes for s in specs)
    small = sum(s.nbytes for s in specs[:3])
    waits: list[tuple[int, bool]] = []
    a, b = tcp_pair()
    with a, b:
        drain = in_thread(lambda: [None for _ in iter(lambda: b.recv(1 << 20), b"")])
        send_weights(StreamLink(a, 5.0, total), tensors, specs, 4 * mib,
                     wait_ready=lambda n, keepalive: waits.append((n, keepalive is not None)))
        a.shutdown(socket.SHUT_WR)
        drain.join(10)
    assert [n for n, alive in waits if alive] == [small, small + PART_BYTES]
    assert all(n <= small for n, alive in waits[:waits.index((small + PART_BYTES, True))])
    assert sorted({n for n, alive in waits if not alive and n > small}) == [
        small + PART_BYTES, small + 2 * PART_BYTES, small + 9 * mib]
