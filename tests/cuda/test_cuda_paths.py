"""The host data plane with device memory on both sides, on a real CUDA device.

Skipped without one (CI has none); run where a GPU is lent. What is checked: a seed
whose loaded tensors live in device memory sends them over the ``tcp`` data plane to
a client whose targets live in device memory; a seed that keeps what processing
replaced in host memory (INT8_CACHE ``dram``) serves a device client from there; a
device tensor's digest equals its host copy's. The ``collective`` plane needs two
devices (NCCL refuses two ranks on one), so one lent GPU cannot check it."""

import time

import pytest
import torch

from tests.helpers.toy import IDENTITY, SMALL_BUCKET, make_toy
from vllm_ascend.model_loader.netloader.client import ClientSettings, WeightFetch
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    digest,
    model_tensors,
    spec_of,
)
from vllm_ascend.model_loader.netloader.seed.retention import Retained, Retention, retain
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen
from vllm_ascend.model_loader.netloader.wire.messages import TCP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)


def seed_of(
    weights: LoadedWeights, bucket: int = SMALL_BUCKET, retained: Retained | None = None
) -> SeedServer:
    settings = SeedSettings(IDENTITY, 0, "127.0.0.1", 30.0, bucket_bytes=bucket,
                            data_plane=TCP, device=CUDA)
    return SeedServer(weights, settings, listen("127.0.0.1", 0), retained=retained)


def fetched_from(weights: LoadedWeights, retained: Retained | None = None) -> torch.nn.Module:
    """A zeroed toy model on the device, filled from a seed serving ``weights``."""
    seed = seed_of(weights, retained=retained).start()
    try:
        client = make_toy(None).to(CUDA)
        fetch_into(client, seed.address)
    finally:
        seed.stop()
    return client


def fetch_into(model: torch.nn.Module, address: str) -> WeightFetch:
    named = model_tensors(model)
    fetch = WeightFetch(
        ClientSettings(IDENTITY, 30.0, data_plane=TCP, device=CUDA),
        [spec_of(n, t) for n, t in named], [t for _, t in named],
    )
    assert fetch.run([address]) is not None, fetch.reasons
    return fetch


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(model_tensors(a), model_tensors(b), strict=True):
        assert x.device.type == y.device.type == "cuda", name
        assert torch.equal(x, y), name


def test_device_tensors_travel_to_a_device_client_over_the_tcp_plane():
    source = make_toy(1).to(CUDA)
    assert_same(fetched_from(LoadedWeights.capture(source)), source)


def test_a_seed_keeping_replaced_tensors_in_host_memory_serves_a_device_client():
    source = make_toy(2).to(CUDA)
    want = make_toy(2).to(CUDA)
    loaded = LoadedWeights.capture(source)
    with torch.no_grad():  # processing replaces proj.weight's storage
        source.proj.weight.data = source.proj.weight.data.t().contiguous().t()
    kept, retained = retain(loaded, Retention("dram"))
    moved = [spec.name for spec, t in zip(kept.specs, kept.tensors, strict=True)
             if t.device.type == "cpu"]
    assert moved == ["proj.weight"] and retained.nbytes == source.proj.weight.nbytes
    assert_same(fetched_from(kept, retained), want)


def test_a_device_tensors_digest_is_its_host_copys():
    t = torch.randn(1 << 20, device=CUDA).to(torch.bfloat16)
    assert digest(t) == digest(t.cpu())


def test_one_gib_of_device_tensors_over_the_tcp_plane_reports_its_rate():
    """Not a timed test: prints the rate for the guide's caveats."""
    tensors = [torch.randn(64 << 20, device=CUDA).to(torch.bfloat16) for _ in range(8)]
    named = [(f"t{i}", t) for i, t in enumerate(tensors)]
    seed = seed_of(LoadedWeights(named, [digest(t) for t in tensors]), 64 << 20).start()
    try:
        targets = [torch.zeros_like(t) for t in tensors]
        fetch = WeightFetch(ClientSettings(IDENTITY, 60.0, data_plane=TCP, device=CUDA),
                            [spec_of(n, t) for n, t in named], targets)
        start = time.perf_counter()
        assert fetch.run([seed.address]) is not None, fetch.reasons
        seconds = time.perf_counter() - start
    finally:
        seed.stop()
    assert all(torch.equal(a, b) for a, b in zip(targets, tensors, strict=True))
    nbytes = sum(t.nbytes for t in tensors)
    print(f"CUDA tcp plane: {nbytes / 1e9:.3f} GB in {seconds:.3f} s "
          f"({nbytes / seconds / 1e9:.2f} GB/s; waited {fetch.stats.wait_s:.3f} s, "
          f"verified {fetch.stats.verify_s:.3f} s, copied {fetch.stats.copy_s:.3f} s)")
