"""The data plane: a two-rank stateless process group per transfer, and the
bucketed send/receive of a manifest's tensors over it.

Only ``transfer_device`` and the backend name depend on the device: gloo on CPU,
nccl on CUDA, hccl on Ascend, all through vLLM's stateless-group helper and the
platform's own hook for device backends. Everything else is shared.
"""

import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from torch.distributed import ProcessGroup
from vllm.distributed.utils import (
    stateless_destroy_torch_distributed_process_group,
    stateless_init_torch_distributed_process_group,
)
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
    listen_socket: socket.socket | None = None,
) -> Iterator[ProcessGroup]:
    """Open the two-rank group (the seed passes its bound ``listen_socket``) and
    always destroy it on the way out."""
    pg = stateless_init_torch_distributed_process_group(
        host,
        port,
        rank,
        2,
        current_platform.dist_backend,
        group_name=f"netloader-{uuid.uuid4().hex[:12]}",
        listen_socket=listen_socket,
        timeout=timedelta(seconds=timeout_s),
    )
    assert isinstance(pg, ProcessGroup)
    try:
        yield pg
    finally:
        stateless_destroy_torch_distributed_process_group(pg)


def send_tensors(
    pg: ProcessGroup,
    tensors: list[torch.Tensor],
    specs: list[TensorSpec],
    bucket_bytes: int = BUCKET_BYTES,
    max_bytes_per_s: float | None = None,
) -> int:
    """Send ``tensors`` in manifest order, at most ``max_bytes_per_s`` on average;
    returns the bytes sent."""
    device = transfer_device()
    start = time.monotonic()
    staging: torch.Tensor | None = None
    sent = 0
    for bucket in plan_buckets(specs, bucket_bytes):
        if len(bucket) == 1:
            payload = byte_view(tensors[bucket[0]]).to(device)
        else:
            if staging is None:
                staging = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
            offset = 0
            for i in bucket:
                n = specs[i].nbytes
                staging[offset : offset + n].copy_(byte_view(tensors[i]))
                offset += n
            payload = staging[:offset]
        if payload.numel():
            pg.send([payload], CLIENT_RANK, 0).wait()
            sent += payload.numel()
        if max_bytes_per_s is not None:
            time.sleep(max(0.0, start + sent / max_bytes_per_s - time.monotonic()))
    return sent


def recv_tensors(
    pg: ProcessGroup,
    targets: list[torch.Tensor],
    specs: list[TensorSpec],
    digests: list[str],
    bucket_bytes: int = BUCKET_BYTES,
) -> int:
    """Receive into ``targets`` in manifest order; returns the bytes received.

    Every bucket lands in a staging buffer first and each tensor is copied into its
    target only after its digest matched. So whenever this raises, each target holds
    either its old bytes or exactly the seed's: never partial or corrupted data.
    """
    device = transfer_device()
    largest = max((spec.nbytes for spec in specs), default=0)
    staging = torch.empty(max(bucket_bytes, largest), dtype=torch.uint8, device=device)
    received = 0
    for bucket in plan_buckets(specs, bucket_bytes):
        total = sum(specs[i].nbytes for i in bucket)
        if total:
            pg.recv([staging[:total]], SEED_RANK, 0).wait()
        offset = 0
        for i in bucket:
            n = specs[i].nbytes
            chunk = staging[offset : offset + n]
            if digest(chunk) != digests[i]:
                raise TransferError(f"digest mismatch for {specs[i].name} ({n} bytes)")
            byte_view(targets[i]).copy_(chunk)
            offset += n
        received += total
    return received


