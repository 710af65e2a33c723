"""A toy model, its identity, and in-process seeds and clients of it, for tests.

Seeds made here run in this process (threads, real sockets on 127.0.0.1); tests that
need a seed in another process (to kill it, limit its descriptors, watch its memory)
use ``tests.helpers.toy_seed``.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader.client import ClientSettings, WeightFetch
from vllm_ascend.model_loader.netloader.identity import LAYOUT_VERSION
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, model_tensors, spec_of
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen

IDENTITY: dict[str, Any] = {
    "model": "toy",
    "architectures": ["Toy"],
    "config_sha256": "0" * 64,
    "dtype": "bfloat16",
    "quantization": None,
    "revision": None,
    "checkpoint": "c" * 64,
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "data_parallel": [1, 0, 1],
    "expert_parallel": None,
    "rank": 0,
    "role": "target",
    "vllm_version": "0.0.0-test",
    "torch_version": torch.__version__,
    "layout": LAYOUT_VERSION,
}
SMALL_BUCKET = 1 << 20


class Toy(nn.Module):
    """Mixed dtypes, a tied weight, buffers (one floating point, after the parameters),
    an empty tensor and one tensor larger than SMALL_BUCKET, so every path of the
    bucket plan is taken."""

    def __init__(self, vocab: int = 300) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64, dtype=torch.bfloat16)
        self.proj = nn.Linear(64, 128)
        self.big = nn.Parameter(torch.empty(300_000, dtype=torch.float32), requires_grad=False)
        self.head = nn.Linear(64, vocab, bias=False, dtype=torch.bfloat16)
        self.head.weight = self.embed.weight
        self.register_buffer("cache", torch.empty(1000, dtype=torch.float32))
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


def bf16_tensors(sizes: list[int], seed: int | None, stride: int = 100) -> list[torch.Tensor]:
    """One bf16 tensor per size: random from ``seed`` (tensor i from seed * stride + i),
    or all zero for ``None`` (a fresh client's targets)."""
    out = []
    for i, n in enumerate(sizes):
        t = torch.zeros(n, dtype=torch.bfloat16)
        if seed is not None:
            t.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed * stride + i)))
        out.append(t)
    return out


def fetch_for(
    model: nn.Module,
    identity: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    secret: bytes | None = None,
    **settings: Any,
) -> WeightFetch:
    """A client's fetch that fills ``model``'s tensors."""
    named = model_tensors(model)
    return WeightFetch(
        ClientSettings(identity or IDENTITY, timeout_s, secret=secret, **settings),
        [spec_of(n, t) for n, t in named],
        [t for _, t in named],
    )


@contextmanager
def serving(
    seed: int = 0, identity: dict[str, Any] | None = None, host: str = "127.0.0.1",
    port: int = 0, **settings: Any,
) -> Iterator[SeedServer]:
    """An in-process seed of ``make_toy(seed)`` on ``host:port`` (0: a free port),
    stopped on the way out."""
    settings.setdefault("bucket_bytes", SMALL_BUCKET)
    timeout_s = settings.pop("timeout_s", 5.0)
    server = SeedServer(
        LoadedWeights.capture(make_toy(seed)),
        SeedSettings(identity or IDENTITY, 0, host, timeout_s, **settings),
        listen(host, port),
    ).start()
    try:
        yield server
    finally:
        server.stop()


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    ta, tb = dict(model_tensors(a)), dict(model_tensors(b))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name


def untouched(model: nn.Module) -> bool:
    """Every tensor still all zero (nothing a fetch received reached it)."""
    return all(torch.count_nonzero(t) == 0 for _, t in model_tensors(model))


def verified_prefix(client: nn.Module, seed: int, held: int) -> None:
    """The first ``held`` tensors of ``client`` (a fetch's verified prefix) are exactly
    ``make_toy(seed)``'s."""
    want = model_tensors(make_toy(seed))
    for (name, got), (_, expected) in zip(model_tensors(client)[:held], want[:held],
                                          strict=True):
        assert torch.equal(got, expected), name


def only_verified(client: nn.Module, seed: int) -> None:
    """Every client tensor is untouched (zero) or exactly ``make_toy(seed)``'s."""
    want = dict(model_tensors(make_toy(seed)))
    for name, t in model_tensors(client):
        assert torch.count_nonzero(t) == 0 or torch.equal(t, want[name]), name


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def count_metrics(folder: Any, monkeypatch: Any) -> None:
    """From here on (until ``monkeypatch`` undoes it) this process's Netloader counts
    start from zero and are written to ``folder``, as a vLLM process writes them to
    $NETLOADER_METRICS_DIR."""
    from vllm_ascend.model_loader.netloader import metrics

    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(folder))
    fresh = metrics.ProcessMetrics()
    monkeypatch.setattr(metrics, "METRICS", fresh)


def scrape(folder: Any) -> dict[tuple[str, tuple], float]:
    """Every sample the Netloader collector gives for ``folder``, as /metrics shows it:
    {(sample name, sorted label items): value}."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_ascend.model_loader.netloader.metrics import NetloaderCollector

    registry = CollectorRegistry()
    registry.register(NetloaderCollector(str(folder)))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
