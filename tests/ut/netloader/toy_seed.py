"""A real nn.Module served by a real SeedServer in a child process, for tests."""

import contextlib
import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

IDENTITY: dict[str, Any] = {
    "model": "toy",
    "architectures": ["Toy"],
    "config_sha256": "0" * 64,
    "dtype": "bfloat16",
    "quantization": None,
    "revision": None,
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "rank": 0,
    "role": "target",
}
SMALL_BUCKET = 1 << 20


class Toy(nn.Module):
    """Mixed dtypes, a tied weight, buffers, an empty tensor and one tensor larger
    than SMALL_BUCKET, so every path of the bucket plan is taken."""

    def __init__(self, vocab: int = 300) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64, dtype=torch.bfloat16)
        self.proj = nn.Linear(64, 128)
        self.big = nn.Parameter(torch.empty(300_000, dtype=torch.float32), requires_grad=False)
        self.head = nn.Linear(64, vocab, bias=False, dtype=torch.bfloat16)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.arange(10))
        self.register_buffer("nothing", torch.empty(0))


def make_toy(seed: int | None, vocab: int = 300) -> Toy:
    """Random values from ``seed``; ``None`` gives an all-zero model (a fresh client)."""
    model = Toy(vocab)
    gen = torch.Generator().manual_seed(seed or 0)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if seed is None:
                t.zero_()
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    return model


def flip_one_byte_in_first_transfer() -> None:
    """Test seam at server -> transport: the first transfer sends a copy of one tensor
    with a single flipped bit, under the digests of the true values."""
    from vllm_ascend.model_loader.netloader import server
    from vllm_ascend.model_loader.netloader.manifest import byte_view

    send = server.send_tensors
    done: list[bool] = []

    def corrupted(pg: Any, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> int:
        if not done:
            done.append(True)
            i = max(range(len(tensors)), key=lambda k: tensors[k].nbytes)
            bad = tensors[i].clone()
            byte_view(bad)[12345] ^= 1
            tensors = [*tensors[:i], bad, *tensors[i + 1 :]]
        return send(pg, tensors, *args, **kwargs)

    server.send_tensors = corrupted  # type: ignore[assignment]


def _serve(
    ready: Any, stop: Any, seed: int, identity: dict[str, Any], timeout_s: float,
    send_limit: float | None, secret: bytes | None, corrupt_first: bool,
) -> None:
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.server import SeedServer

    if corrupt_first:
        flip_one_byte_in_first_transfer()
    weights = LoadedWeights.capture(make_toy(seed))
    server = SeedServer(
        weights, identity, 0, "127.0.0.1", 0, timeout_s, bucket_bytes=SMALL_BUCKET,
        send_limit_bytes_per_s=send_limit, secret=secret,
    ).start()
    server.ready.wait(30)
    ready.put(server.address)
    stop.poll(600)
    server.stop()


@contextmanager
def toy_seed(
    seed: int = 0,
    identity: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    send_limit: float | None = None,
    secret: bytes | None = None,
    corrupt_first: bool = False,
) -> Iterator[tuple[str, mp.Process]]:
    """A seed process serving ``make_toy(seed)``; yields (address, process)."""
    ctx = mp.get_context("spawn")
    # A pipe, not an Event: setting an Event deadlocks once a waiter was SIGKILLed.
    ready, (stop_recv, stop_send) = ctx.Queue(), ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_serve, args=(
            ready, stop_recv, seed, identity or IDENTITY, timeout_s, send_limit, secret,
            corrupt_first,
        ),
        daemon=True,
    )
    proc.start()
    try:
        yield ready.get(timeout=120), proc
    finally:
        with contextlib.suppress(OSError):
            stop_send.send(None)
        proc.join(15)
        if proc.is_alive():
            proc.kill()


def fetch_forever(address: str, receiving: Any) -> None:
    """A client process that fetches the toy model from ``address`` (and gets killed).

    It sends on the pipe ``receiving`` once its group is built and the transfer starts,
    so the test kills it mid-transfer, not during the handshake or the group's setup."""
    from vllm_ascend.model_loader.netloader import client
    from vllm_ascend.model_loader.netloader.manifest import model_tensors, spec_of

    recv = client.recv_tensors

    def announced(*args: Any, **kwargs: Any) -> int:
        receiving.send(True)
        return recv(*args, **kwargs)

    client.recv_tensors = announced  # type: ignore[assignment]
    named = model_tensors(make_toy(None))
    client.WeightFetch(
        IDENTITY, [spec_of(n, t) for n, t in named], [t for _, t in named], 60.0
    ).run((address,))
