"""The host data plane: buckets on the handshake connection, parsed only by this code.

After an ``accept`` the seed writes, for each bucket of the agreed plan, a header
(``protocol.data_header``: index and length) and the bucket's bytes, straight from
the tensors' memory. The client checks each header against the plan before it reads
a byte of payload into a staging buffer of exactly that size, so whatever a peer
sends costs the other side at most the plan's own buffers; a violation is an
exception in this one transfer. There is no second port: the connection is the one
the client just authenticated on.

Host targets are received straight into their own memory (``receive_into``): a reader
thread reads each bucket's payload into the tensors it belongs to, in pieces of
``RECV_CHUNK`` bytes, and the caller hashes each piece while the next one arrives, so
there is neither a staging buffer nor a second copy of a byte, and verifying overlaps
receiving. Other targets (device memory) go through ``receive``: the reader fills the
next staging buffer (``RECV_DEPTH`` of them) while the caller verifies and copies the
previous one. Device tensors go through host memory on both sides.

Bulk reads and writes use a blocking socket with the kernel's own timeouts
(``SO_RCVTIMEO``/``SO_SNDTIMEO``, set to what the no-progress window has left) and
``MSG_WAITALL``: one system call moves a whole bucket when the peer keeps up, and
returns what it has when the peer does not. A Python socket timeout would poll
before every call and return a few dozen KB each time.
"""

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch

from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.manifest import byte_view
from vllm_ascend.model_loader.netloader.planes.progress import Pacer, Progress, TransferError
from vllm_ascend.model_loader.netloader.planes.transfer import Gate, empty_bytes
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import (
    DATA_HEADER_BYTES,
    abort_frame,
    data_header,
    keepalive_frame,
    parse_data_header,
)

RECV_DEPTH = 2
# The piece a reader reads (and the caller hashes) at a time when receiving in place:
# small enough that hashing keeps pace a piece behind, large enough for few wake-ups.
RECV_CHUNK = 4 << 20
# The piece a caller on one core reads and then hashes itself: on this project's VM,
# loopback into touched memory with blake3 after each piece (one pinned core), 256 KiB
# moved 2.3-2.9 GB/s, 64 KiB 1.9, 1 MiB 1.4-2.2, 4 MiB 1.4-1.6 (hashing 0.17-0.25 s per
# GiB: smaller pieces are still in L2 when hashed). It divides ``parts.PART_BYTES``.
INLINE_CHUNK = 256 << 10
# A paced sender's step: small, so that a capped rate reaches the receiver as a steady
# flow, not as bursts with silences longer than its no-progress window.
_PACED_CHUNK = 64 << 10
# An unpaced sender's step: on loopback, 4 MiB sends cost the sender about a third less
# CPU than one send per 64 MiB bucket (measured, benchmarks/netloader_transfer.py).
_CHUNK = 4 << 20
_CPU = torch.device("cpu")


class StreamLink:
    """One transfer's bulk data on ``sock``. ``timeout_s`` is the no-progress limit and
    ``deadline_s`` the transfer's wall-clock bound (see ``transfer.Progress``);
    ``pacer`` caps the sender's rate; ``on_bytes(n)`` hears of every ``n`` bytes received
    (a relay's own fetch tells its senders that it still moves)."""

    def __init__(
        self,
        sock: socket.socket,
        timeout_s: float,
        total_bytes: int,
        pacer: Pacer | None = None,
        deadline_s: float | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ):
        self._sock = sock
        # A bucket's last segment, a header or a keepalive must not wait for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timeout_s = timeout_s
        self._total = total_bytes
        self._pacer = pacer or Pacer(None)
        self._deadline_s = deadline_s
        self._on_bytes = on_bytes
        self._send_progress: Progress | None = None
        # Whether a bucket's payload is partly sent (a relay's gate raised within it):
        # an abort frame then would be read as payload, so ``abort`` ends the stream.
        self._in_payload = False

    # --- sending ---------------------------------------------------------------------

    def _sending(self) -> Progress:
        if self._send_progress is None:
            self._send_progress = Progress(
                self._timeout_s, self._total, "sending", self._deadline_s
            )
        return self._send_progress

    def send_bucket(
        self, index: int, tensors: Sequence[torch.Tensor], nbytes: int,
        gate: Gate | None = None,
    ) -> None:
        """``transfer.Link.send_bucket``: a relay's ``gate`` is asked before each piece
        (within a tensor, pieces start at its first byte, so a piece is within a part)."""
        progress = self._sending()
        # MSG_MORE: the header leaves in one segment with the payload that follows.
        more = socket.MSG_MORE if nbytes else 0
        self._send(memoryview(data_header(index, nbytes)), progress, count=False, flags=more)
        paced = self._pacer.rate is not None
        self._in_payload = True
        offset = 0  # bytes of the bucket before this tensor
        for t in tensors:
            data = byte_view(t)
            if gate is not None and data.device.type != "cpu":
                gate(offset + data.numel())  # copied to the host whole
            if data.device.type != "cpu":
                data = data.to(_CPU)
            view = _buffer(data)
            step = _PACED_CHUNK if paced else _CHUNK
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                if gate is not None:
                    gate(offset + start + len(chunk))
                self._send(chunk, progress)
                self._pacer.sent(len(chunk))
            offset += len(view)
        self._in_payload = False

    def flush(self) -> None:
        pass  # send_bucket returns once the kernel has every byte

    def keepalive(self) -> None:
        self._send(memoryview(keepalive_frame()), self._sending(), count=False)

    def abort(self, reason: str) -> None:
        """Tell the receiver this sender cannot go on (best effort, short deadline); within
        a bucket's payload, by ending the stream (the receiver sees it short)."""
        try:
            if self._in_payload:
                self._sock.shutdown(socket.SHUT_WR)
                return
            self._sock.settimeout(1.0)
            self._sock.sendall(abort_frame(reason))
        except OSError:
            pass  # the receiver will see the connection end instead

    def _send(
        self, view: memoryview, progress: Progress, count: bool = True, flags: int = 0
    ) -> None:
        self._move(lambda v: self._sock.send(v, flags), socket.SO_SNDTIMEO, view, progress,
                   count, None)

    def _move(
        self,
        call: Callable[[memoryview], int],
        option: int,
        view: memoryview,
        progress: Progress,
        count: bool,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        """Move all of ``view`` with ``call`` (a send or a receive into it) on the blocking
        socket, the kernel's ``option`` timeout set to what the window has left; with
        ``count``, the bytes are progress (and ``on_bytes`` hears of them)."""
        done = 0
        self._sock.settimeout(None)  # blocking: the kernel's timeout applies (module doc)
        while done < len(view):
            _kernel_timeout(self._sock, option, progress.time_left())
            t0 = time.monotonic()
            try:
                k: int | None = call(view[done:])
            except (BlockingIOError, TimeoutError):
                k = None  # time_left() decides whether the window moved enough
            progress.waited(time.monotonic() - t0)
            if k is None:
                continue
            if k == 0:
                raise ProtocolError(f"peer closed the connection after {done} of {len(view)} bytes")
            done += k
            if count:
                progress.moved(k)
                if on_bytes is not None:
                    on_bytes(k)

    # --- receiving ---------------------------------------------------------------------

    def receive(self, sizes: Sequence[int]) -> Generator[torch.Tensor, None, None]:
        """Yield each bucket of ``sizes`` bytes, checked against its header; a reader
        thread fills the next buffer meanwhile. Closing the generator (or an error)
        stops the reader and shuts this side's reading down."""
        depth = min(RECV_DEPTH, len(sizes))
        largest = max(sizes, default=0)
        free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(depth):
            free.put(empty_bytes(largest, _CPU))
        filled: queue.Queue[tuple[torch.Tensor, int] | BaseException] = queue.Queue()
        stop = threading.Event()
        reader = _started(self._read_all, sizes, free, filled, stop)
        try:
            for _ in sizes:
                item = filled.get()
                if isinstance(item, BaseException):
                    raise item
                slot, size = item
                yield slot[:size]
                free.put(slot)
        finally:
            free.put(empty_bytes(0, _CPU))  # wakes a reader waiting for a buffer
            self._stop_reader(reader, stop)

    def receive_into(
        self, buckets: Sequence[Sequence[torch.Tensor]],
        on_reached: Callable[[int], None] | None = None, inline: bool = False,
    ) -> Generator[tuple[int, memoryview | None], None, None]:
        """Read each bucket straight into its tensors (flat uint8 host tensors, the
        targets' own memory, in order) once its header matched the plan. Yields
        (position of the tensor in the transfer, piece) for each piece that landed, then
        (position, None) once the tensor is whole. ``on_reached(n)`` hears that the first
        ``n`` bytes are written (``memory.Populator`` faults pages in ahead of them).

        A reader thread reads ``RECV_CHUNK`` pieces while the caller hashes the last
        one; ``inline`` (a caller on one core, ``cores.single_core``) reads on the
        calling thread instead, ``INLINE_CHUNK`` at a time, so that the caller hashes
        each piece right after it landed, while it is in cache, and no second thread
        takes turns with it on that core.

        Whatever a peer sends, no read goes past the tensor it fills: each is bounded by
        that tensor's bytes, and a bucket's header is checked against the plan before any
        of its payload is read. Closing the generator (or an error) stops the reader and
        shuts this side's reading down."""
        if inline:
            finished = False
            try:
                yield from self._pieces(buckets, on_reached, INLINE_CHUNK, None)
                finished = True
            finally:
                if not finished:  # as a stopped reader leaves it: nothing more is read
                    self._shut_reading()
            return
        filled: queue.Queue[tuple[int, memoryview | None] | BaseException | None] = (
            queue.Queue())
        stop = threading.Event()
        reader = _started(self._read_into, buckets, filled, stop, on_reached)
        try:
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop_reader(reader, stop)

    def _stop_reader(self, reader: threading.Thread, stop: threading.Event) -> None:
        """End a receive's reader thread: told to stop, woken from a blocking recv by
        shutting this side's reading down, joined."""
        stop.set()
        if reader.is_alive():
            self._shut_reading()
        reader.join(30)

    def _shut_reading(self) -> None:
        """Shut this side's reading down: a blocked recv returns, nothing more is read."""
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # the connection is gone already

    def _read_into(
        self,
        buckets: Sequence[Sequence[torch.Tensor]],
        filled: "queue.Queue[tuple[int, memoryview | None] | BaseException | None]",
        stop: threading.Event,
        on_reached: Callable[[int], None] | None,
    ) -> None:
        try:
            for item in self._pieces(buckets, on_reached, RECV_CHUNK, stop):
                filled.put(item)
            if not stop.is_set():
                filled.put(None)
        except Exception as e:  # noqa: BLE001 - thread top level: every failure reaches the caller
            filled.put(e if not stop.is_set() else TransferError("stopped"))

    def _pieces(
        self,
        buckets: Sequence[Sequence[torch.Tensor]],
        on_reached: Callable[[int], None] | None,
        chunk: int,
        stop: threading.Event | None,
    ) -> Generator[tuple[int, memoryview | None], None, None]:
        """``receive_into``'s items, read on the calling thread ``chunk`` bytes at a
        time (pieces start at each tensor's first byte); ends early once ``stop`` is set."""
        progress = Progress(self._timeout_s, self._total, "receiving", self._deadline_s)
        position = written = 0
        for index, tensors in enumerate(buckets):
            size = sum(t.numel() for t in tensors)
            while self._header(index, size, progress):
                progress.alive()  # a relay waiting on its own fetch, which still moves
            for t in tensors:
                view = _buffer(t)
                for start in range(0, len(view), chunk):
                    if stop is not None and stop.is_set():
                        return
                    piece = view[start : start + chunk]
                    self._recv_into(piece, progress)
                    yield position, piece
                    written += len(piece)
                    if on_reached is not None:
                        on_reached(written)
                yield position, None
                position += 1

    def _read_all(
        self,
        sizes: Sequence[int],
        free: "queue.Queue[torch.Tensor]",
        filled: "queue.Queue[tuple[torch.Tensor, int] | BaseException]",
        stop: threading.Event,
    ) -> None:
        progress = Progress(self._timeout_s, self._total, "receiving", self._deadline_s)
        try:
            for index, size in enumerate(sizes):
                slot = free.get()
                if stop.is_set():
                    return
                while self._header(index, size, progress):
                    progress.alive()  # a relay waiting on its own fetch, which still moves
                self._recv_into(_buffer(slot[:size]), progress)
                filled.put((slot, size))
        except Exception as e:  # noqa: BLE001 - thread top level: every failure reaches the caller
            filled.put(e if not stop.is_set() else TransferError("stopped"))

    def _header(self, index: int, size: int, progress: Progress) -> bool:
        """Read and check the next data header; True if it was a keepalive."""
        header = bytearray(DATA_HEADER_BYTES)
        self._recv_into(memoryview(header), progress, count=False)
        return parse_data_header(
            bytes(header), index, size, self._sock, Deadline(self._timeout_s, "abort reason")
        )

    def _recv_into(self, view: memoryview, progress: Progress, count: bool = True) -> None:
        self._move(lambda v: self._sock.recv_into(v, len(v), socket.MSG_WAITALL),
                   socket.SO_RCVTIMEO, view, progress, count, self._on_bytes)


def _started(target: Callable[..., None], *args: Any) -> threading.Thread:
    reader = threading.Thread(target=target, args=args, name="netloader-stream-recv",
                              daemon=True)
    reader.start()
    return reader


def _buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a flat uint8 host tensor, shared with it (no copy)."""
    return memoryview(t.numpy())  # type: ignore[arg-type]  # ndarray is a buffer


def _kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Set ``SO_RCVTIMEO``/``SO_SNDTIMEO`` to ``seconds`` (at least 1 ms: 0 means none)."""
    micros = max(int(seconds * 1e6), 1000)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", *divmod(micros, 1_000_000)))
