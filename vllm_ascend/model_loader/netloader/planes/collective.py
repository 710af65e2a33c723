"""The device data plane: a two-rank stateless process group per transfer.

Only a collective library reaches device-to-device bandwidth (nccl on CUDA, hccl on
Ascend; gloo on CPU, selectable so that tests cover this path). Such a group is
built for cooperating ranks, so this module keeps what it can off the network:

- The group's rendezvous store is ``TunnelStore``: its records travel as frames on
  the handshake connection, which the client has just authenticated on. No
  TCPStore, no rendezvous port: only that peer can take part.
- What the library itself opens afterwards is out of Netloader's hands: gloo listens
  on a port of its own for the pair connection, NCCL and HCCL open bootstrap and
  transport sockets. A peer that holds the shared secret can send them bytes that
  make the library abort the process (gloo's ``EnforceNotMet``). Use this plane only
  between hosts that trust each other; the host data plane (``stream``) has no such
  exposure.

A bucket larger than ``CHUNK_BYTES`` moves as several operations, each of which must
finish within the transfer's timeout, so a slow link with a huge tensor works; and
the whole transfer within its wall-clock deadline (``transfer.transfer_deadline_s``).
"""

import contextlib
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch._C._distributed_c10d import _register_process_group
from torch.distributed import PrefixStore, ProcessGroup, ProcessGroupGloo, Store
from torch.distributed.distributed_c10d import GroupName
from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group
from vllm.platforms import current_platform

from vllm_ascend.model_loader.netloader.deadline import (
    CallTimedOut,
    Deadline,
    DeadlineExceeded,
    call_within,
)
from vllm_ascend.model_loader.netloader.manifest import byte_view
from vllm_ascend.model_loader.netloader.planes.progress import Pacer, TransferError
from vllm_ascend.model_loader.netloader.planes.transfer import Gate, copy_bytes, empty_bytes
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import MAX_REQUEST_BYTES, recv_msg, send_msg
from vllm_ascend.model_loader.netloader.wire.messages import STORE, parse_store_record, store_record

SEED_RANK = 0
CLIENT_RANK = 1
CHUNK_BYTES = 16 << 20
# Buckets in flight at once: the seed packs the next while one is sent, the client
# verifies one while the next arrives. Each costs a staging buffer on the device.
SEND_DEPTH = 2
RECV_DEPTH = 2
# A peer holding the secret could otherwise fill this side's memory with records.
_MAX_RECORDS = 64
_READY = "netloader/ready"


class TunnelStore(Store):
    """A c10d ``Store`` for two ranks whose records cross ``conn`` (the authenticated
    handshake connection) as ``store`` frames, each exchange under ``deadline``.

    Each side keeps what it set and what the peer sent; ``get``/``wait`` read frames
    until the key is there. Only set/get/wait/check are needed by gloo, nccl and hccl
    group set-up; the rest raise."""

    def __init__(self, conn: socket.socket, deadline: Deadline):
        super().__init__()
        self._conn = conn
        self._deadline = deadline
        self._records: dict[str, bytes] = {}

    def set(self, key: str, value: Any) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._records[key] = data
        send_msg(self._conn, store_record(key, data), self._deadline)

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._records[key]

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        while any(k not in self._records for k in keys):
            self._read_record()

    def check(self, keys: list[str]) -> bool:
        return all(k in self._records for k in keys)

    def add(self, key: str, amount: int) -> int:
        raise RuntimeError("TunnelStore does not support add")

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        raise RuntimeError("TunnelStore does not support compare_set")

    def delete_key(self, key: str) -> bool:
        return self._records.pop(key, None) is not None

    def num_keys(self) -> int:
        return len(self._records)

    def set_timeout(self, timeout: Any) -> None:
        pass  # the handshake deadline bounds every exchange

    def finish(self) -> None:
        """Barrier: both sides have sent every record, so none is left on the
        connection for the messages that follow the transfer."""
        self.set(_READY, b"1")
        self.wait([_READY + "/peer"])

    def _read_record(self) -> None:
        key, value = parse_store_record(
            recv_msg(self._conn, self._deadline, MAX_REQUEST_BYTES, expect=STORE)
        )
        if key == _READY:
            key = _READY + "/peer"
        if key in self._records or len(self._records) >= _MAX_RECORDS:
            raise ProtocolError(f"rendezvous record {key[:60]!r} repeated or one too many")
        self._records[key] = value


@contextmanager
def group_link(
    conn: socket.socket,
    rank: int,
    timeout_s: float,
    device: torch.device,
    setup_deadline: Deadline,
    pacer: Pacer | None = None,
    deadline_s: float | None = None,
) -> Iterator["GroupLink"]:
    """Open the two-rank group over ``conn`` (see ``TunnelStore``), yield its link (whose
    transfer must end within ``deadline_s``), and always destroy the group on the way
    out."""
    store = TunnelStore(conn, setup_deadline)
    timeout = timedelta(seconds=timeout_s)
    pg = _within(
        setup_deadline, conn,
        lambda: _group_on(PrefixStore("netloader", store), rank, timeout, conn.getsockname()[0]),
    )
    try:
        name = GroupName(f"netloader-{uuid.uuid4().hex[:12]}")
        pg._set_group_name(name)
        _register_process_group(name, pg)
        store.finish()
        yield GroupLink(pg, rank, timeout, device, pacer or Pacer(None), deadline_s)
    finally:
        stateless_destroy_torch_distributed_process_group(pg)


def _within(
    deadline: Deadline, conn: socket.socket, make: Callable[[], ProcessGroup]
) -> ProcessGroup:
    """``make()`` within ``deadline`` (``call_within``). The group's constructor cannot
    be interrupted, and gloo's connect to a peer that died during set-up was seen to
    outlast its own timeout (> 25 s at a 10 s TIMEOUT): at the deadline the tunnel
    connection is shut down under the helper (its store calls then fail), a group it
    still makes is destroyed, and ``DeadlineExceeded`` is raised here."""

    def shut_down() -> None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    try:
        return call_within(make, deadline.left_or_zero(), "netloader-group-setup",
                           on_timeout=shut_down,
                           discard=stateless_destroy_torch_distributed_process_group)
    except CallTimedOut:
        raise DeadlineExceeded(f"{deadline.what} took longer than {deadline.seconds:g} s") from None


def _group_on(store: PrefixStore, rank: int, timeout: timedelta, local_host: str) -> ProcessGroup:
    backend = current_platform.dist_backend
    if backend != "gloo":
        return current_platform.stateless_init_device_torch_dist_pg(
            backend, store, rank, 2, timeout
        )
    # By default gloo binds to the address its hostname resolves to, often 127.0.0.1,
    # which a peer on another host cannot reach: bind where the peer reached this side.
    # An operator's GLOO_SOCKET_IFNAME wins. The private options type is the only way
    # to choose the device (torch's own gloo tests use it).
    options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
    options._devices = [
        ProcessGroupGloo.create_device(interface=i) for i in interfaces
    ] or [ProcessGroupGloo.create_device(hostname=local_host)]
    gloo = ProcessGroupGloo(store, rank, 2, options)
    gloo._set_sequence_number_for_group()
    pg = ProcessGroup(store, rank, 2)
    pg._set_default_backend(ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, gloo)
    return pg


class GroupLink:
    """Buckets over a two-rank group; each operation moves at most ``CHUNK_BYTES`` and
    must finish within ``timeout``."""

    def __init__(self, pg: ProcessGroup, rank: int, timeout: timedelta, device: torch.device,
                 pacer: Pacer, deadline_s: float | None = None):
        self._pg = pg
        self._end = None if deadline_s is None else time.monotonic() + deadline_s
        self._peer = CLIENT_RANK if rank == SEED_RANK else SEED_RANK
        self._timeout = timeout
        self._device = device
        self._pacer = pacer
        self._free: list[torch.Tensor] = []
        # (work, payload kept alive until sent, staging buffer to give back)
        self._in_flight: deque[tuple[Any, torch.Tensor, torch.Tensor | None]] = deque()

    def send_bucket(
        self, index: int, tensors: Sequence[torch.Tensor], nbytes: int,
        gate: Gate | None = None,
    ) -> None:
        """``transfer.Link.send_bucket``; a relay's ``gate`` is asked once, for the whole
        bucket (it goes out as one collective send)."""
        if gate is not None:
            gate(nbytes)
        staging = None
        if len(tensors) == 1:
            payload = byte_view(tensors[0]).to(self._device)
        else:
            staging = self._staging(nbytes)
            offset = 0
            for t in tensors:
                copy_bytes(staging[offset : offset + t.nbytes], byte_view(t))
                offset += t.nbytes
            payload = staging[:offset]
        chunks = _chunks(payload)
        for k, chunk in enumerate(chunks):
            while len(self._in_flight) >= SEND_DEPTH:
                self._complete_send()
            last = k == len(chunks) - 1
            work = self._pg.send([chunk], self._peer, 0)
            self._in_flight.append((work, chunk, staging if last else None))
            self._pacer.sent(chunk.numel())
        if not chunks and staging is not None:
            self._free.append(staging)

    def flush(self) -> None:
        """Wait until every bucket handed to ``send_bucket`` has left."""
        while self._in_flight:
            self._complete_send()

    def abort(self, reason: str) -> None:
        pass  # the group has no message for it: the receiver's timeout ends the transfer

    def keepalive(self) -> None:
        pass  # no message for it either: a collective relay's client waits per operation

    def receive(self, sizes: Sequence[int]) -> Generator[torch.Tensor, None, None]:
        depth = min(RECV_DEPTH, len(sizes))
        slots = [empty_bytes(max(sizes, default=0), self._device) for _ in range(depth)]
        posted: deque[list[Any]] = deque()
        for k in range(depth):
            posted.append(self._post(slots[k][: sizes[k]]))
        for k, size in enumerate(sizes):
            for work in posted.popleft():
                self._wait(work, f"bucket {k}")
            yield slots[k % depth][:size]
            if k + depth < len(sizes):
                posted.append(self._post(slots[k % depth][: sizes[k + depth]]))

    def _post(self, buffer: torch.Tensor) -> list[Any]:
        return [self._pg.recv([chunk], self._peer, 0) for chunk in _chunks(buffer)]

    def _complete_send(self) -> None:
        work, _, staging = self._in_flight.popleft()
        self._wait(work, "send")
        if staging is not None:
            self._free.append(staging)

    def _wait(self, work: Any, what: str) -> None:
        timeout = self._timeout
        if self._end is not None:
            left = self._end - time.monotonic()
            if left <= 0:
                raise TransferError(f"{what}: the transfer's deadline passed")
            timeout = min(timeout, timedelta(seconds=left))
        try:
            work.wait(timeout)
        except RuntimeError as e:
            raise TransferError(f"{what}: {e}") from e

    def _staging(self, nbytes: int) -> torch.Tensor:
        while self._free:
            buf = self._free.pop()
            if buf.numel() >= nbytes:
                return buf
        return empty_bytes(nbytes, self._device)


def _chunks(buffer: torch.Tensor) -> list[torch.Tensor]:
    return [buffer[i : i + CHUNK_BYTES] for i in range(0, buffer.numel(), CHUNK_BYTES)]
