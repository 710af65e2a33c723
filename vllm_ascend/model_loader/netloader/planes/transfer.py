"""Moving a manifest's tensors over a data plane, the same for both planes.

A *link* (``stream.StreamLink`` for bulk data on the handshake connection,
``collective.GroupLink`` for a two-rank process group) moves whole buckets; this
module decides what goes in each bucket and, on the receiving side, checks every
tensor's digest before a byte of it reaches the model. How long a transfer may take
is ``progress``'s business.
"""

import functools
import itertools
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vllm_ascend.model_loader.netloader.cores import hash_threads, single_core
from vllm_ascend.model_loader.netloader.manifest import (
    TensorSpec,
    byte_view,
    digest,
    plan_buckets,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES, PartHasher
from vllm_ascend.model_loader.netloader.planes import memory
from vllm_ascend.model_loader.netloader.planes.progress import TransferError

BUCKET_BYTES = 64 * 1024 * 1024


class Link(Protocol):
    """One transfer's data plane, as the two sides of ``transfer`` see it."""

    def send_bucket(
        self, index: int, tensors: Sequence[torch.Tensor], nbytes: int,
        gate: "Gate | None" = None,
    ) -> None:
        """Send bucket ``index``: the bytes of ``tensors`` back to back (``nbytes`` in all).
        ``gate(n)`` returns once the bucket's first ``n`` bytes may leave (a relay's own
        fetch verified them); a link calls it before sending them."""

    def flush(self) -> None:
        """Return once every bucket handed to ``send_bucket`` has left this side."""

    def abort(self, reason: str) -> None:
        """Tell the receiver, if the plane can, that this sender cannot go on."""

    def keepalive(self) -> None:
        """Tell the receiver, if the plane can, that this sender is waiting on a
        transfer of its own that still moves (a relay): not silence."""

    def receive(self, sizes: Sequence[int]) -> Generator[torch.Tensor, None, None]:
        """Yield each bucket's bytes as a flat uint8 tensor, in order; a yielded tensor
        is valid until the next one is asked for."""
        ...  # pragma: no cover


@dataclass
class TransferStats:
    """Where ``recv_weights`` spent its time on the receiving thread, in seconds."""

    wait_s: float = 0.0  # blocked until the next bucket had arrived (or reading it inline)
    verify_s: float = 0.0  # blake3 over received bytes, wall clock
    # The same hashing in CPU seconds of the receiving thread (``time.thread_time``): what
    # the check costs, apart from waiting for a core other threads hold.
    verify_cpu_s: float = 0.0
    # Verified bytes into the targets, first touch of their pages included (0 when they
    # are received in place: there is no second copy).
    copy_s: float = 0.0


def bucket_sizes(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[int]:
    """Bytes of each bucket of the plan (``plan_buckets``)."""
    return [sum(specs[i].nbytes for i in b) for b in plan_buckets(specs, bucket_bytes)]


def plan_from(specs: Sequence[TensorSpec], bucket_bytes: int, start: int) -> list[list[int]]:
    """The buckets of a transfer that begins at tensor ``start`` (a resumed one): the
    plan of ``specs[start:]``, with indices into ``specs``. Both sides compute it."""
    return [[start + i for i in b] for b in plan_buckets(specs[start:], bucket_bytes)]


def byte_starts(specs: Sequence[TensorSpec]) -> list[int]:
    """Where each tensor's bytes begin among the weights' (manifest order, from tensor
    0), then their total: the offsets a relay's verified bytes count in."""
    return [0, *itertools.accumulate(s.nbytes for s in specs)]


def bytes_from(specs: Sequence[TensorSpec], start: int) -> int:
    """Bytes of a transfer that begins at tensor ``start``."""
    return sum(s.nbytes for s in specs[start:])


# A relay's gate: wait_ready(n, keepalive) returns once the first n bytes of its
# weights (manifest order, from tensor 0) are verified (or raises), calling keepalive()
# now and then while it waits (None: it cannot be told, mid-bucket).
WaitReady = Callable[[int, Callable[[], None] | None], None]
# Within one bucket: gate(n) returns once the bucket's first n bytes may leave.
Gate = Callable[[int], None]


def send_weights(
    link: Link,
    tensors: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    bucket_bytes: int,
    wait_ready: WaitReady | None = None,
    start: int = 0,
) -> int:
    """Send ``tensors[start:]`` in manifest order, bucket by bucket; returns the bytes
    sent.

    A relay passes ``wait_ready``: a bucket starts once its own transfer verified all
    of it, or the first part of a tensor larger than ``PART_BYTES`` (such a tensor is a
    bucket of its own), with keepalives to the receiver meanwhile; the link then sends
    each further part once that is verified too. Keepalives go between buckets only, so
    only a large tensor's parts are waited for without them."""
    sent = 0
    starts = byte_starts(specs)
    for index, bucket in enumerate(plan_from(specs, bucket_bytes, start)):
        nbytes = sum(specs[i].nbytes for i in bucket)
        gate: Gate | None = None
        if wait_ready is not None:
            begin = starts[bucket[0]]
            wait_ready(begin + min(nbytes, PART_BYTES), link.keepalive)
            gate = functools.partial(_gate, wait_ready, begin)
        link.send_bucket(index, [tensors[i] for i in bucket], nbytes, gate)
        sent += nbytes
    link.flush()
    return sent


def _gate(wait_ready: WaitReady, begin: int, n: int) -> None:
    """A bucket's ``Gate``: its first ``n`` bytes are those from ``begin`` on."""
    wait_ready(begin + n, None)


def recv_weights(
    link: Link,
    targets: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    digests: Sequence[str],
    bucket_bytes: int,
    stats: TransferStats | None = None,
    on_verified: Callable[[int], None] | None = None,
    start: int = 0,
    parts: Mapping[str, Sequence[str]] | None = None,
    on_verified_bytes: Callable[[int], None] | None = None,
) -> int:
    """Receive ``targets[start:]`` in manifest order (the first ``start`` already hold
    verified bytes: a resumed transfer); returns the bytes received.

    A tensor counts as done only once its digest matched: ``on_verified(n)`` hears that
    the first ``n`` targets hold exactly the seed's bytes, in order. Host targets on a
    link that can receive in place (``stream.StreamLink.receive_into``) are written
    straight into their own memory, huge pages asked for (``memory``), and hashed
    piece by piece: on one core (``cores.single_core``, a vLLM CPU worker) each piece
    on this thread right after it landed; with more, while a reader thread reads the
    next and a helper faults pages in ahead, blake3 on the cores left; a tensor
    larger than ``PART_BYTES`` is checked part by part against ``parts`` (by its
    digest: the seed's part digests, which the accept proved join to it), and
    ``on_verified_bytes(n)`` hears that the first ``n`` bytes of the weights (from
    tensor 0) are verified as each part matches, for a relay to pass them on. Whenever this
    raises, the targets not yet reported done may hold anything (the caller restores or
    rewrites them: the disk loader writes every parameter, ``fetch`` restores buffers).
    Other targets arrive in the link's staging buffer and are copied only once verified.
    """
    stats = stats if stats is not None else TransferStats()
    buckets = plan_from(specs, bucket_bytes, start)
    sizes = [sum(specs[i].nbytes for i in b) for b in buckets]
    receive_into = getattr(link, "receive_into", None)
    if receive_into is not None and all(targets[i].device.type == "cpu"
                                        for b in buckets for i in b):
        _recv_in_place(receive_into, buckets, targets, specs, digests, stats, on_verified,
                       parts or {}, on_verified_bytes)
        return sum(sizes)
    arrivals = link.receive(sizes)
    try:
        for bucket in buckets:
            t0 = time.perf_counter()
            staging = next(arrivals)
            stats.wait_s += time.perf_counter() - t0
            deliver(staging, bucket, targets, specs, digests, stats)
            if on_verified is not None:
                on_verified(bucket[-1] + 1)
    finally:
        arrivals.close()
    return sum(sizes)


def _recv_in_place(
    receive_into: Callable[..., Generator[tuple[int, memoryview | None], None, None]],
    buckets: list[list[int]],
    targets: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    digests: Sequence[str],
    stats: TransferStats,
    on_verified: Callable[[int], None] | None,
    parts: Mapping[str, Sequence[str]],
    on_verified_bytes: Callable[[int], None] | None,
) -> None:
    """``recv_weights`` for host targets received in place (see there)."""
    order = [i for b in buckets for i in b]
    starts = byte_starts(specs)
    memory.prepare([targets[i] for i in order])
    # One core (``cores``): read and hash on this thread, no page-faulting helper (it only
    # takes turns with the reader there). Else a reader thread has a core of its own.
    inline = single_core()
    threads = 1 if inline else max(1, hash_threads() - 1)
    populator = memory.Populator([] if inline else [targets[i] for i in order]).start()
    arrivals = receive_into([[byte_view(targets[i]) for i in b] for b in buckets],
                            None if inline else populator.reached, inline=inline)
    check = None
    current = -1
    try:
        while True:
            t0 = time.perf_counter()
            item = next(arrivals, None)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            stats.wait_s += t1 - t0
            if item is None:
                return
            position, piece = item
            i = order[position]
            if position != current:
                check = _TensorCheck(specs[i], digests[i], parts.get(digests[i]), threads)
                current = position
            assert check is not None
            if piece is not None:
                verified = check.update(piece)
                if verified and on_verified_bytes is not None:
                    on_verified_bytes(starts[i] + verified)
            else:
                check.finish()
            stats.verify_s += time.perf_counter() - t1
            stats.verify_cpu_s += time.thread_time() - c1
            if piece is None:
                if on_verified is not None:
                    on_verified(i + 1)
                if on_verified_bytes is not None:
                    on_verified_bytes(starts[i + 1])
    finally:
        arrivals.close()
        populator.stop()


class _TensorCheck:
    """The digest check of one tensor received piece by piece (``PartHasher``): a
    tensor larger than ``PART_BYTES`` has each part compared as it completes with
    ``expected`` (its part digests, when known); at the end its digest must match
    either way. Raises ``TransferError`` on a mismatch."""

    def __init__(self, spec: TensorSpec, digest: str, expected: Sequence[str] | None,
                 threads: int | None = None):
        self._spec = spec
        self._digest = digest
        self._hasher = PartHasher(spec.nbytes, threads)
        self._expected = expected if self._hasher.parted else None

    def update(self, piece: memoryview) -> int:
        """Hash ``piece`` (the tensor's next bytes); returns how many leading bytes of
        the tensor are verified part by part now (0: none yet, or no parts)."""
        first = len(self._hasher.parts)
        if not self._hasher.update(piece) or self._expected is None:
            return 0
        parts = self._hasher.parts
        for k in range(first, len(parts)):
            if k >= len(self._expected) or parts[k] != self._expected[k]:
                raise TransferError(
                    f"digest mismatch for {self._spec.name} ({self._spec.nbytes} bytes) "
                    f"in part {k} (bytes {k * PART_BYTES} on)"
                )
        return min(len(parts) * PART_BYTES, self._spec.nbytes)

    def finish(self) -> None:
        """The tensor is whole: its digest must match."""
        if self._hasher.seen != self._spec.nbytes or self._hasher.hexdigest() != self._digest:
            raise TransferError(
                f"digest mismatch for {self._spec.name} ({self._spec.nbytes} bytes)"
            )


def deliver(
    staging: torch.Tensor,
    bucket: list[int],
    targets: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    digests: Sequence[str],
    stats: TransferStats,
) -> None:
    """Verify each tensor of a received bucket, then copy it into its target."""
    offset = 0
    for i in bucket:
        n = specs[i].nbytes
        chunk = staging[offset : offset + n]
        t0, c0 = time.perf_counter(), time.thread_time()
        ok = digest(chunk) == digests[i]
        t1 = time.perf_counter()
        stats.verify_s += t1 - t0
        stats.verify_cpu_s += time.thread_time() - c0
        if not ok:
            raise TransferError(f"digest mismatch for {specs[i].name} ({n} bytes)")
        copy_bytes(byte_view(targets[i]), chunk)
        stats.copy_s += time.perf_counter() - t1
        offset += n


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, single-threaded between host tensors: torch's copy runs on
    every intra-op thread, and their spin-wait afterwards takes the core that the
    receiving (or a seed's serving) thread needs."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(dst.detach().numpy(), src.detach().numpy())
    else:
        dst.copy_(src)


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current device. A new thread starts on
    device 0, whatever device the worker that created it uses."""
    if device.type != "cpu" and device.index is not None:
        torch.accelerator.set_device_index(device.index)


def empty_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)
