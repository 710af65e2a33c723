"""The data plane: a two-rank stateless process group per transfer, and the
bucketed send/receive of a manifest's tensors over it.

Only ``transfer_device`` and the group's backend depend on the device: gloo on CPU,
built here; nccl on CUDA and hccl on Ascend, built by the platform's own hook for
device groups. Everything else is shared, the group's store included.
"""

import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch._C._distributed_c10d import _register_process_group
from torch.distributed import PrefixStore, ProcessGroup, ProcessGroupGloo, TCPStore
from torch.distributed.distributed_c10d import GroupName
from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group
from vllm.platforms import current_platform

from vllm_ascend.model_loader.netloader.manifest import (
    TensorSpec,
    byte_view,
    digest,
    plan_buckets,
)

SEED_RANK = 0
CLIENT_RANK = 1
BUCKET_BYTES = 64 * 1024 * 1024
# Buckets in flight at once: the seed packs the next while one is sent, the client
# verifies one while the next arrives. Each costs a staging buffer of a bucket
# (or of the largest tensor, which travels alone) on the transfer device.
SEND_DEPTH = 2
RECV_DEPTH = 2


class TransferError(Exception):
    """The bulk transfer failed or delivered bytes that do not match their digest."""


def transfer_device() -> torch.device:
    if current_platform.dist_backend == "gloo":
        return torch.device("cpu")
    return torch.device(current_platform.device_type, torch.accelerator.current_device_index())


def bind_rendezvous(host: str) -> socket.socket:
    """A listening socket for the group's store, bound once (no probe-then-bind race)."""
    return socket.create_server((host, 0))


@contextmanager
def data_group(
    host: str,
    port: int,
    rank: int,
    timeout_s: float,
    local_host: str,
    listen_socket: socket.socket | None = None,
) -> Iterator[ProcessGroup]:
    """Open the two-rank group with the seed's store at ``host:port`` (the seed passes
    its bound ``listen_socket``), and always destroy it on the way out.

    ``local_host`` is this side's address on the handshake connection: a gloo group
    binds its data connection there, which is an address the peer has just reached.

    The store is built here rather than by vLLM's stateless-group helper for two
    reasons. Its keys then do not depend on how each side spells the seed's host
    (the helper prefixes them with ``tcp://host:port``, so a client that named the
    seed ``localhost`` or by a DNS name never met a seed bound to an IP). And a store
    that times out waiting for its client closes the listening fd itself; the helper
    then closed that fd number a second time, which could close a file another thread
    of the worker had just opened.
    """
    timeout = timedelta(seconds=timeout_s)
    store = _store(host, port, rank, timeout, listen_socket)
    name = GroupName(f"netloader-{uuid.uuid4().hex[:12]}")
    pg = _group_on(PrefixStore("netloader", store), rank, timeout, local_host)
    pg._set_group_name(name)
    _register_process_group(name, pg)
    try:
        yield pg
    finally:
        stateless_destroy_torch_distributed_process_group(pg)


def _store(
    host: str, port: int, rank: int, timeout: timedelta, listen_socket: socket.socket | None
) -> TCPStore:
    if listen_socket is None:
        return TCPStore(host, port, world_size=2, is_master=False, timeout=timeout)
    # From here the store owns the fd: it closes it when done, and also when it fails.
    fd = listen_socket.detach()
    return TCPStore(
        host, port, world_size=2, is_master=True, timeout=timeout, master_listen_fd=fd
    )


def _group_on(
    store: PrefixStore, rank: int, timeout: timedelta, local_host: str
) -> ProcessGroup:
    backend = current_platform.dist_backend
    if backend != "gloo":
        return current_platform.stateless_init_device_torch_dist_pg(
            backend, store, rank, 2, timeout
        )
    # By default gloo binds to the address its hostname resolves to, often 127.0.0.1,
    # which a peer on another host cannot reach. An operator's GLOO_SOCKET_IFNAME wins.
    # The private options type is the constructor's only way to choose the device (torch's
    # own gloo tests use it); the stubs know only the public one, which cannot.
    options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
    options._devices = [
        ProcessGroupGloo.create_device(interface=i) for i in interfaces
    ] or [ProcessGroupGloo.create_device(hostname=local_host)]
    # No vLLM ``suppress_stdout`` around this (its helper has one): gloo prints nothing
    # there, and that redirect is not thread-safe: overlapping setups for concurrent
    # clients once left a seed worker's fd 1 on /dev/null for good.
    gloo = ProcessGroupGloo(store, rank, 2, options)
    gloo._set_sequence_number_for_group()
    pg = ProcessGroup(store, rank, 2)
    pg._set_default_backend(ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, gloo)
    return pg


def send_tensors(
    pg: ProcessGroup,
    tensors: list[torch.Tensor],
    specs: list[TensorSpec],
    bucket_bytes: int = BUCKET_BYTES,
    max_bytes_per_s: float | None = None,
    wait_ready: Callable[[int], None] | None = None,
) -> int:
    """Send ``tensors`` in manifest order, at most ``max_bytes_per_s`` on average;
    returns the bytes sent.

    Up to ``SEND_DEPTH`` buckets are in flight, so packing the next multi-tensor
    bucket into its staging buffer overlaps the sending of the previous one.
    A relay passes ``wait_ready(n)``, which returns once its first ``n`` tensors hold
    verified bytes (or raises): each bucket leaves as soon as its own transfer has it.
    """
    device = transfer_device()
    start = time.monotonic()
    free: list[torch.Tensor] = []
    # (work, payload, staging buffer to give back): the payload stays referenced until sent.
    in_flight: deque[tuple[Any, torch.Tensor, torch.Tensor | None]] = deque()
    sent = 0
    for bucket in plan_buckets(specs, bucket_bytes):
        if len(in_flight) == SEND_DEPTH:
            free.extend(_complete(in_flight.popleft()))
        if wait_ready is not None:
            wait_ready(bucket[-1] + 1)
        staging = None
        if len(bucket) == 1:
            payload = byte_view(tensors[bucket[0]]).to(device)
        else:
            staging = free.pop() if free else _empty(bucket_bytes, device)
            payload = _pack(staging, [tensors[i] for i in bucket])
        if payload.numel():
            in_flight.append((pg.send([payload], CLIENT_RANK, 0), payload, staging))
            sent += payload.numel()
        elif staging is not None:
            free.append(staging)
        if max_bytes_per_s is not None:
            time.sleep(max(0.0, start + sent / max_bytes_per_s - time.monotonic()))
    while in_flight:
        _complete(in_flight.popleft())
    return sent


def _complete(entry: tuple[Any, torch.Tensor, torch.Tensor | None]) -> list[torch.Tensor]:
    """Wait for one send; its staging buffer (if any) is free again."""
    work, _, staging = entry
    work.wait()
    return [] if staging is None else [staging]


def _pack(staging: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    offset = 0
    for t in tensors:
        n = t.nbytes
        _copy_bytes(staging[offset : offset + n], byte_view(t))
        offset += n
    return staging[:offset]


@dataclass
class TransferStats:
    """Where ``recv_tensors`` spent its time on the receiving thread, in seconds."""

    wait_s: float = 0.0  # blocked until the next bucket had arrived
    verify_s: float = 0.0  # blake3 over received bytes
    copy_s: float = 0.0  # verified bytes into the targets, first touch of their pages included
    staging_bytes: int = 0


def recv_tensors(
    pg: ProcessGroup,
    targets: list[torch.Tensor],
    specs: list[TensorSpec],
    digests: list[str],
    bucket_bytes: int = BUCKET_BYTES,
    stats: TransferStats | None = None,
    on_verified: Callable[[int], None] | None = None,
) -> int:
    """Receive into ``targets`` in manifest order; returns the bytes received.

    Every bucket lands in a staging buffer first and each tensor is copied into its
    target only after its digest matched. So whenever this raises, each target holds
    either its old bytes or exactly the seed's: never partial or corrupted data.

    ``RECV_DEPTH`` buckets are posted at once: while one is verified and copied,
    the next is already arriving (gloo's own thread reads it, blake3 and the copy
    release the GIL), so the link does not idle while the host verifies.
    ``on_verified(n)`` hears after each bucket that the first ``n`` targets are done.
    """
    stats = stats if stats is not None else TransferStats()
    buckets = plan_buckets(specs, bucket_bytes)
    sizes = [sum(specs[i].nbytes for i in bucket) for bucket in buckets]
    depth = min(RECV_DEPTH, len(buckets))
    device = transfer_device()
    slots = [_empty(max(sizes, default=0), device) for _ in range(depth)]
    stats.staging_bytes = sum(slot.numel() for slot in slots)

    def post(k: int) -> Any:
        if not sizes[k]:
            return None
        return pg.recv([slots[k % depth][: sizes[k]]], SEED_RANK, 0)

    posted = deque(post(k) for k in range(depth))
    for k, bucket in enumerate(buckets):
        work = posted.popleft()
        if work is not None:
            t0 = time.perf_counter()
            work.wait()
            stats.wait_s += time.perf_counter() - t0
        _deliver(slots[k % depth], bucket, targets, specs, digests, stats)
        if on_verified is not None:
            on_verified(bucket[-1] + 1)
        if k + depth < len(buckets):
            posted.append(post(k + depth))
    return sum(sizes)


def _deliver(
    staging: torch.Tensor,
    bucket: list[int],
    targets: list[torch.Tensor],
    specs: list[TensorSpec],
    digests: list[str],
    stats: TransferStats,
) -> None:
    """Verify each tensor of a received bucket, then copy it into its target."""
    offset = 0
    for i in bucket:
        n = specs[i].nbytes
        chunk = staging[offset : offset + n]
        t0 = time.perf_counter()
        ok = digest(chunk) == digests[i]
        t1 = time.perf_counter()
        stats.verify_s += t1 - t0
        if not ok:
            raise TransferError(f"digest mismatch for {specs[i].name} ({n} bytes)")
        _copy_bytes(byte_view(targets[i]), chunk)
        stats.copy_s += time.perf_counter() - t1
        offset += n


def _empty(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, single-threaded between host tensors: torch's copy runs on
    every intra-op thread, and their spin-wait afterwards takes the core that the
    group's receiving (or a seed's serving) thread needs."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(dst.detach().numpy(), src.detach().numpy())
    else:
        dst.copy_(src)
