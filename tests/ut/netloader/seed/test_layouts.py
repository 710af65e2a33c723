"""A seed's two layouts over real sockets: the processed one only to a client whose
processing runs the same way, each layout refused by name where it is not served, a
relay that serves only the layout it receives, and a seed whose experts moved."""

import dataclasses

import pytest
import torch

from tests.helpers.toy import (
    IDENTITY,
    SMALL_BUCKET,
    assert_same_tensors,
    fetch_for,
    make_toy,
    untouched,
    wait_for,
)
from vllm_ascend.model_loader.netloader.client import SourceRefused
from vllm_ascend.model_loader.netloader.config import parse_config
from vllm_ascend.model_loader.netloader.manifest import TARGET, LoadedWeights, spec_of
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.seed.running import RunningSeeds
from vllm_ascend.model_loader.netloader.seed.server import Layouts, SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen
from vllm_ascend.model_loader.netloader.wire.messages import LOADED, PROCESSED, Accept

SIGNATURE = "5" * 64
PROCESSING = {"platform": "cpu", "device": "AVX2 amx=False", "methods": "m" * 32,
              "env": "e" * 32}


def seed_of(layouts: Layouts, placement=None) -> SeedServer:
    settings = SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0, bucket_bytes=SMALL_BUCKET,
                            processing=PROCESSING)
    return SeedServer(layouts, settings, listen("127.0.0.1", 0), placement=placement).start()


def attempt(seed: SeedServer, client: torch.nn.Module, **settings):
    return fetch_for(client, **settings)._attempt(seed.address)


def processed(seed_value: int = 1) -> LoadedWeights:
    return LoadedWeights.capture(make_toy(seed_value))


def test_the_processed_layout_reaches_a_client_whose_processing_runs_the_same_way():
    seed = seed_of(Layouts(None, processed(), SIGNATURE))
    try:
        client = make_toy(None)
        received = attempt(seed, client, layout=PROCESSED, processing=PROCESSING)
        assert (received.layout, received.signature) == (PROCESSED, SIGNATURE)
        assert_same_tensors(client, make_toy(1))
    finally:
        seed.stop()


@pytest.mark.parametrize("field", ["platform", "device", "methods", "env"])
def test_a_client_whose_processing_differs_is_refused_by_name_before_any_byte(field):
    seed = seed_of(Layouts(None, processed(), SIGNATURE))
    try:
        client = make_toy(None)
        theirs = {**PROCESSING, field: "other"}
        with pytest.raises(SourceRefused, match=f"processing signature differs \\({field} ") as e:
            attempt(seed, client, layout=PROCESSED, processing=theirs)
        assert e.value.other_layout  # the loaded layout is worth asking for
        assert untouched(client)
    finally:
        seed.stop()


@pytest.mark.parametrize("served, asked", [(LOADED, PROCESSED), (PROCESSED, LOADED)])
def test_a_layout_a_seed_does_not_serve_is_refused_by_name(served, asked):
    weights = processed()
    layouts = (Layouts(weights, not_processed="quantization method does not take it")
               if served == LOADED else Layouts(None, weights, SIGNATURE))
    seed = seed_of(layouts)
    try:
        client = make_toy(None)
        with pytest.raises(SourceRefused, match=f"does not serve the {asked} layout") as e:
            attempt(seed, client, layout=asked, processing=PROCESSING)
        assert e.value.other_layout
        assert untouched(client)
        # A refusal of the client's model is not one of a layout.
        with pytest.raises(SourceRefused, match="model identity differs") as e:
            attempt(seed, client, layout=asked, processing=PROCESSING,
                    identity={**IDENTITY, "model": "other"})
        assert not e.value.other_layout
        assert seed.describe()["layouts"][asked]["unavailable"]
    finally:
        seed.stop()


def test_a_relay_serves_the_layout_it_receives_and_never_the_other(monkeypatch):
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    plan = LoadPlan(parse_config({}, environ={}), 0, TARGET, torch.device("cpu"),
                    IDENTITY, "instance", processing=PROCESSING)
    relay = RunningSeeds().open_relay(plan)
    weights = processed(2)
    specs = list(weights.specs)
    accepted = Accept(list(weights.digests), SMALL_BUCKET, "tcp", IDENTITY["checkpoint"],
                      layout=PROCESSED, signature=SIGNATURE)
    progress = relay.begin(specs, list(weights.tensors), accepted)
    progress.verified(len(specs))  # its own fetch verified everything
    seed = relay.serving_complete()
    try:
        assert seed is not None and seed.layouts.loaded is None
        client = make_toy(None)
        with pytest.raises(SourceRefused, match="does not serve the loaded layout"):
            attempt(seed, client, layout=LOADED)
        received = attempt(seed, client, layout=PROCESSED, processing=PROCESSING)
        assert received.signature == SIGNATURE
        assert_same_tensors(client, make_toy(2))
    finally:
        relay.close()


def test_a_seed_whose_experts_moved_refuses_every_client():
    where = {"map": "at load"}
    seed = seed_of(Layouts(processed(), processed(), SIGNATURE), placement=lambda: where["map"])
    try:
        attempt(seed, make_toy(None), layout=LOADED)  # served while the experts stay
        where["map"] = "moved by EPLB"
        client = make_toy(None)
        with pytest.raises(SourceRefused, match="expert placement moved"):
            attempt(seed, client, layout=LOADED)
        assert untouched(client)
    finally:
        seed.stop()


def test_each_layout_has_its_value_fingerprint_in_info():
    loaded, runtime = processed(1), processed(3)
    seed = seed_of(Layouts(loaded, runtime, SIGNATURE))
    try:
        info = seed.describe()
        assert info["layouts"][LOADED]["value_fingerprint"] == loaded.value_fingerprint()
        assert info["layouts"][PROCESSED]["value_fingerprint"] == runtime.value_fingerprint()
        # The loaded layout's, comparable with a disk load's on any host; the processed
        # one's only where the seed serves no loaded layout.
        assert info["value_fingerprint"] == loaded.value_fingerprint()
    finally:
        seed.stop()
    seed = seed_of(Layouts(None, runtime, SIGNATURE))
    try:
        assert seed.describe()["value_fingerprint"] == runtime.value_fingerprint()
    finally:
        seed.stop()


def test_specs_of_both_layouts_are_the_loaded_manifest():
    loaded, runtime = processed(1), processed(3)
    assert [dataclasses.astuple(s) for s in loaded.specs] == [
        dataclasses.astuple(spec_of(s.name, t)) for s, t in zip(runtime.specs, runtime.tensors,
                                                                strict=True)]


def test_a_client_without_a_relay_that_fails_beside_another_transfer_ends_cleanly(caplog):
    """Before: the seed's clean-up took the absent relay (None) for the chain's tail,
    deleted a tail that was not there and logged a KeyError traceback."""
    import logging
    import socket
    import time

    from vllm_ascend.model_loader.netloader.client import SOURCE_ERRORS

    settings = SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0, bucket_bytes=SMALL_BUCKET,
                            send_limit_bytes_per_s=2e6, processing=PROCESSING)
    seed = SeedServer(processed(), settings, listen("127.0.0.1", 0)).start()
    caplog.set_level(logging.WARNING, logger="vllm.netloader")
    try:
        import threading

        slow = threading.Thread(target=lambda: attempt(seed, make_toy(None), layout=LOADED),
                                daemon=True)
        slow.start()
        while seed.describe()["active_transfers"] == 0:
            time.sleep(0.01)
        failing = fetch_for(make_toy(None), layout=LOADED)
        real_receive = failing._receive

        def receive_then_vanish(conn: socket.socket, accepted, progress):
            conn.shutdown(socket.SHUT_RDWR)  # gone mid-transfer
            return real_receive(conn, accepted, progress)

        failing._receive = receive_then_vanish  # type: ignore[method-assign]
        with pytest.raises(SOURCE_ERRORS):
            failing._attempt(seed.address)
        deadline = time.monotonic() + 5
        while seed.describe()["active_transfers"] > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        slow.join(30)
    finally:
        seed.stop()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_a_processing_signature_reaches_the_refusal_and_the_log_as_printable_text():
    """Before: a peer's newline and terminal escapes went into the seed's log line."""
    seed = seed_of(Layouts(None, processed(), SIGNATURE))
    try:
        forged = {**PROCESSING, "device": "x\nINFO forged line \x1b[2J"}
        with pytest.raises(SourceRefused) as refused:
            attempt(seed, make_toy(None), layout=PROCESSED, processing=forged)
        reason = str(refused.value)
        assert "processing signature differs" in reason
        assert "\n" not in reason and "\x1b" not in reason
    finally:
        seed.stop()


def test_a_relay_sends_small_buckets_while_its_own_fetch_runs_and_the_seed_its_own():
    """A chain fills in its depth times a relay's bucket over the link's rate: a relay
    whose fetch still runs answers with buckets of at most RELAY_BUCKET_BYTES, whatever
    BUCKET_MB says; a seed (and the relay once promoted) with BUCKET_MB."""
    from tests.helpers.wire import challenge_of, connect, frame, hello_for, read
    from vllm_ascend.model_loader.netloader.seed.relay import RelayProgress
    from vllm_ascend.model_loader.netloader.seed.server import RELAY_BUCKET_BYTES

    def accepted_bucket(seed: SeedServer) -> int:
        with connect(seed.address) as sock:
            challenge_of(sock)
            sock.sendall(frame(hello_for(IDENTITY, make_toy(None))))
            reply = read(sock)
            assert reply["type"] == "accept", reply
            return int(reply["bucket_bytes"])

    big = 64 << 20
    settings = SeedSettings(IDENTITY, 0, "127.0.0.1", 5.0, bucket_bytes=big)
    weights = processed()
    relaying = RelayProgress([s.nbytes for s in weights.specs])
    relaying.verified(len(weights.specs))
    relay = SeedServer(weights, settings, listen("127.0.0.1", 0), progress=relaying).start()
    seed = SeedServer(weights, settings, listen("127.0.0.1", 0)).start()
    try:
        assert accepted_bucket(relay) == RELAY_BUCKET_BYTES < big
        assert accepted_bucket(seed) == big
        relay.promote(relay._outcome)
        assert accepted_bucket(relay) == big
    finally:
        relay.stop()
        seed.stop()


def _process(model: torch.nn.Module) -> None:
    """Process ``model`` (make_toy's) as vLLM CPU does: ``proj.weight`` gets new
    storage and values (a prepacked copy), the tied embedding goes into a kernel
    closure that keeps a packed copy and leaves an empty weight."""
    with torch.no_grad():
        model.proj.weight.data = model.proj.weight.data * 2
        packed = model.embed.weight.detach().clone()
        model.embed.weight.data = torch.empty(0, dtype=packed.dtype)
    model.kernel = lambda x: x @ packed  # type: ignore[assignment]


def test_a_preparing_seed_serves_what_its_model_held_right_after_processing(monkeypatch):
    """Start-up goes on while a disk-loaded seed hashes: vLLM wraps modules for LoRA
    (``proj`` becomes ``proj.base_layer``) and runs the model. The seed's layouts and
    what it says it keeps are those of the model right after processing, equal to a
    seed that served at once. Before: read when the digests were in, the wrapped
    ``proj.weight`` looked consumed into a kernel, its loaded bytes moved instead of the
    processed ones and counted as kept (CI's lora-seed case: 4096 bytes more)."""
    from vllm_ascend.model_loader.netloader.plan import LoadOutcome
    from vllm_ascend.model_loader.netloader.seed.preparing import PendingWeights

    class Wrapped(torch.nn.Module):
        def __init__(self, base: torch.nn.Module) -> None:
            super().__init__()
            self.base_layer = base

    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    plan = LoadPlan(parse_config({}, environ={}), 0, TARGET, torch.device("cpu"),
                    IDENTITY, "instance", processing=PROCESSING)
    at_once, preparing = RunningSeeds(), RunningSeeds()
    try:
        model, reference = make_toy(7, vocab=40_000), make_toy(7, vocab=40_000)
        pending = PendingWeights(model, limit_bytes_per_s=4e6)  # ~1.5 s of hashing
        loaded = LoadedWeights.capture(reference)
        assert pending.deferred
        _process(model)
        _process(reference)
        seed = preparing.start(plan, model, LoadOutcome(), pending)
        assert seed.describe().get("preparing")
        model.proj = Wrapped(model.proj)  # type: ignore[assignment]
        served = at_once.start(plan, reference, LoadOutcome(), loaded)
        wait_for(lambda: not seed.describe().get("preparing"), 30, "the seed to be ready")
        mine, theirs = seed.describe(), served.describe()
        assert mine["layouts"][PROCESSED] == theirs["layouts"][PROCESSED]
        assert mine["retained_bytes"] == theirs["retained_bytes"]
        assert mine["retained_for_processed_bytes"] == 40_000 * 64 * 2  # the embedding
        client = make_toy(None, vocab=40_000)
        attempt(seed, client, layout=PROCESSED, processing=PROCESSING)
        assert torch.equal(client.proj.weight, reference.proj.weight)
    finally:
        for seeds in (at_once, preparing):
            seeds.stop(plan.key)
