"""What a seed keeps beyond its running model (INT8_CACHE / INT8_CACHE_NAME)."""

from typing import Any

import pytest
import torch

from tests.helpers.toy import IDENTITY, SMALL_BUCKET, fetch_for, make_toy, untouched
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, byte_view
from vllm_ascend.model_loader.netloader.seed.retention import Retained, Retention, retain
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen


def processed(seed: int) -> tuple[torch.nn.Module, LoadedWeights]:
    """A toy model loaded (captured) and then processed the way CPU packing does it:
    ``proj.weight`` gets new storage (the loaded bytes live on only in the capture) and
    ``embed.weight`` is packed into a kernel closure that keeps a new tensor."""
    model = make_toy(seed)
    loaded = LoadedWeights.capture(model)
    with torch.no_grad():
        model.proj.weight.data = model.proj.weight.data.t().contiguous().t()
        packed = model.embed.weight.detach().clone()
        model.embed.weight.data = torch.empty(0, dtype=packed.dtype)
    model.kernel = lambda x: x @ packed  # type: ignore[assignment]
    return model, loaded


def fetch_from(kept: LoadedWeights, retained: Retained) -> tuple[torch.nn.Module, Any, Any, dict]:
    """A zeroed toy client's fetch from a seed serving ``kept``: (client, fetch, what it
    received or None, the seed's ``info`` afterwards)."""
    settings = SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0, bucket_bytes=SMALL_BUCKET)
    seed = SeedServer(kept, settings, listen("127.0.0.1", 0), retained=retained).start()
    try:
        client = make_toy(None)
        fetch = fetch_for(client)
        received = fetch.run([seed.address])
        return client, fetch, received, seed.describe()
    finally:
        seed.stop()


def test_retained_tensors_are_those_processing_replaced():
    model, loaded = processed(1)
    kept, retained = retain(loaded, Retention())
    assert retained.tensors == 2  # embed.weight (tied head) and proj.weight
    assert retained.nbytes == model.proj.weight.nbytes + 300 * 64 * 2
    assert retained.dropped == () and kept.dropped == ()
    assert kept.value_fingerprint() == loaded.value_fingerprint()
    assert all(torch.equal(byte_view(a), byte_view(b))
               for a, b in zip(kept.tensors, loaded.tensors, strict=True))



def test_a_loaded_tensor_the_model_still_holds_anywhere_is_not_retained():
    """A list, a closure, a bound partial: wherever the running model keeps the loaded
    storage, it is the model's memory, not the seed's."""
    model, loaded = processed(1)
    proj = next(t for spec, t in zip(loaded.specs, loaded.tensors, strict=True)
                if spec.name == "proj.weight")
    model.tables = [proj.view(-1)]  # type: ignore[assignment]
    _, retained = retain(loaded, Retention())
    assert retained.tensors == 1  # only embed.weight now


def test_a_model_that_processing_left_alone_costs_nothing_extra():
    model = make_toy(1)
    _, retained = retain(LoadedWeights.capture(model), Retention("no"))
    assert (retained.tensors, retained.nbytes, retained.dropped) == (0, 0, ())


@pytest.mark.parametrize("retention, dropped", [
    (Retention("no"), ["embed.weight", "proj.weight"]),
    (Retention("hbm", ("proj",)), ["embed.weight"]),
    (Retention("dram", ("embed",)), ["proj.weight"]),
])
def test_what_the_cache_does_not_cover_is_dropped_and_the_seed_refuses(retention, dropped):
    model, loaded = processed(1)
    kept, retained = retain(loaded, retention)
    assert list(retained.dropped) == dropped
    assert kept.specs == loaded.specs  # the manifest stays; meta tensors stand in
    assert all(t.is_meta for spec, t in zip(kept.specs, kept.tensors, strict=True)
               if spec.name in dropped)
    client, fetch, received, info = fetch_from(kept, retained)
    assert received is None
    (reason,) = fetch.reasons
    assert f"keeps no loaded copy of {len(dropped)} tensor(s)" in reason
    assert untouched(client)
    assert info["int8_cache"] == retention.mode and info["dropped_tensors"] == len(dropped)


def test_a_seed_that_keeps_the_replaced_tensors_in_host_memory_serves_them():
    model, loaded = processed(2)
    kept, retained = retain(loaded, Retention("dram"))
    client, fetch, received, info = fetch_from(kept, retained)
    assert received is not None, fetch.reasons
    want = make_toy(2)
    assert torch.equal(client.proj.weight, want.proj.weight)
    assert torch.equal(client.embed.weight, want.embed.weight)
    assert info["retained_bytes"] == retained.nbytes > 0
