"""Fan-out through relays: clients that arrive while a seed sends are passed down a
chain of clients that are still receiving. A real seed process, real relays (each a
SeedServer over a fetching client's own targets), real sockets."""

import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers.toy import (
    IDENTITY,
    SMALL_BUCKET,
    assert_same_tensors,
    count_metrics,
    fetch_for,
    make_toy,
    scrape,
    wait_for,
)
from tests.helpers.toy_seed import relay_forever, relay_listener, toy_seed
from tests.helpers.wire import challenge_of, connect, frame, hello_for, read
from vllm_ascend.model_loader.netloader.client import Received, WeightFetch, query_seed
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    byte_view,
    model_tensors,
    plan_buckets,
    spec_of,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES
from vllm_ascend.model_loader.netloader.seed.relay import RelayListener, RelayProgress
from vllm_ascend.model_loader.netloader.wire.auth import new_nonce
from vllm_ascend.model_loader.netloader.wire.frames import REFUSE
from vllm_ascend.model_loader.netloader.wire.messages import (
    ACCEPT,
    TCP,
    Accept,
    challenge,
    redirect,
)

# The toy model is about 1.3 MB: at this cap a transfer from the seed lasts about 3 s,
# so the clients a test starts meanwhile find the seed still sending.
SLOW_SEED = 0.5e6


def relay_verified_first_bucket(
    seed: int, timeout_s: float, min_rate: float = 1e6
) -> tuple[RelayListener, RelayProgress, list]:
    """A relay over make_toy(seed) whose own fetch has verified its first bucket and
    nothing more (yet); returns (relay, its progress, the specs)."""
    model = make_toy(seed)
    named = model_tensors(model)
    specs = [spec_of(n, t) for n, t in named]
    relay = relay_listener(timeout_s=timeout_s, min_rate=min_rate)
    progress = relay.begin(
        specs, [t for _, t in named],
        Accept(list(LoadedWeights.capture(model).digests), SMALL_BUCKET, TCP, None),
    )
    progress.verified(len(plan_buckets(specs, SMALL_BUCKET)[0]))
    return relay, progress, specs


class Starting:
    """A starting instance in a thread: a zeroed toy model, its relay, its fetch."""

    def __init__(self, sources: list[str], secret: bytes | None = None):
        self.model = make_toy(None)
        self.secret = secret
        self.relay = relay_listener(secret=secret)
        self.address = f"127.0.0.1:{self.relay.port}"
        self.fetch: WeightFetch = fetch_for(self.model, timeout_s=30.0, secret=secret)
        self.fetch.relay = self.relay
        self.received: Received | None = None
        self._thread = threading.Thread(target=self._run, args=(tuple(sources),), daemon=True)
        self._thread.start()

    def _run(self, sources: tuple[str, ...]) -> None:
        self.received = self.fetch.run(sources)

    def join(self) -> Received | None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "a client hangs"
        return self.received

    def info(self) -> dict[str, Any]:
        return query_seed(self.address, secret=self.secret)


@contextmanager
def a_then_b(seed: str, secret: bytes | None = None) -> Iterator[tuple[Starting, Starting]]:
    """a starts; once the seed sends to it, b starts (so the seed sends b to a's relay).
    Both relays are closed on the way out."""
    a = Starting([seed], secret)
    try:
        wait_for(lambda: query_seed(seed, secret=secret)["active_transfers"] == 1, 10,
                 "seed never sent to a")
        b = Starting([seed], secret)
        try:
            yield a, b
        finally:
            b.relay.close()
    finally:
        a.relay.close()


def why_not_served_by(address: str) -> str:
    """The reason a fresh client (no secret) got nothing from ``address``."""
    fetch = fetch_for(make_toy(None))
    assert fetch.run((address,)) is None
    (reason,) = fetch.reasons
    return reason


def test_clients_arriving_while_the_seed_sends_are_chained_through_relays(
    tmp_path, monkeypatch
):
    count_metrics(tmp_path, monkeypatch)  # the clients and relays here, not the seed
    with toy_seed(seed=5, send_limit=SLOW_SEED, timeout_s=10.0) as (seed, proc), \
            a_then_b(seed) as (a, b):
        wait_for(lambda: a.relay.seed is not None and a.info()["active_transfers"] == 1,
                 10, "a's relay never sent to b")
        # b's transfer began while a was still receiving (a relay, not a finished seed).
        assert a.info()["relaying"] is True
        c = Starting([seed])  # b is now the chain's tail
        try:
            results = [s.join() for s in (a, b, c)]
            assert all(r is not None for r in results), [s.fetch.reasons for s in (a, b, c)]
            assert [r.source for r in results] == [seed, a.address, b.address]  # type: ignore[union-attr]
            for s in (a, b, c):
                assert_same_tensors(s.model, make_toy(5))
                assert s.fetch.reasons == []
            # The seed sent the model once; each relay passed it on once and is now a seed.
            # (A seed counts a transfer once it has read the client's 'done'.)
            wait_for(lambda: query_seed(seed)["completed_transfers"] == 1, 10, "seed count")
            wait_for(lambda: [s.info()["completed_transfers"] for s in (a, b, c)] == [1, 1, 0],
                     10, "relay counts")
            assert query_seed(seed)["completed_transfers"] == 1
            assert all(s.info()["relaying"] is False for s in (a, b, c))
            assert proc.is_alive()
            counts = scrape(tmp_path)
            assert counts[("netloader_relay_hops_total", ())] == 2  # b to a, c to b
            relayed = ("netloader_transfers_total", (("result", "ok"), ("role", "relay")))
            assert counts[relayed] == 2
        finally:
            c.relay.close()


def test_with_a_fanout_of_two_clients_form_a_tree_and_all_get_the_model():
    # RELAY_FANOUT 2: the seed sends to a and b itself, then c and d to a's relay, e and
    # f to b's (breadth first), each relay passing on what its own fetch verified.
    with toy_seed(seed=5, send_limit=0.2e6, timeout_s=10.0, fanout=2) as (seed, proc):
        started: list[Starting] = []
        try:
            for parent, count in [(None, 1), (None, 2), (0, 1), (0, 2), (1, 1), (1, 2)]:
                started.append(Starting([seed]))
                sender = (lambda: query_seed(seed)) if parent is None \
                    else started[parent].info
                wait_for(lambda: sender()["active_transfers"] == count, 10,  # noqa: B023
                         f"client {len(started)} never served by {parent}")
            results = [s.join() for s in started]
            assert all(r is not None for r in results), [s.fetch.reasons for s in started]
            a, b = started[0].address, started[1].address
            assert [r.source for r in results] == [seed, seed, a, a, b, b]  # type: ignore[union-attr]
            for s in started:
                assert_same_tensors(s.model, make_toy(5))
                assert s.fetch.reasons == []
            wait_for(lambda: query_seed(seed)["completed_transfers"] == 2, 10, "seed count")
            wait_for(lambda: [s.info()["completed_transfers"] for s in started]
                     == [2, 2, 0, 0, 0, 0], 10, "relay counts")
            assert proc.is_alive()
        finally:
            for s in started:
                s.relay.close()


def test_a_relay_killed_mid_way_sends_its_tree_back_to_the_seed():
    # RELAY_FANOUT 3: a (a process), x and y are the seed's direct clients; b and c are
    # sent to a's relay. a is killed while it relays to both: b and c ask the seed
    # itself and get the model; the seed forgets a and the relays below it (b's and c's
    # never got their model from a), so a later client goes to x, which has room, not
    # to a, which had room too. The seed keeps serving.
    ctx = mp.get_context("spawn")
    with toy_seed(seed=3, send_limit=0.2e6, timeout_s=10.0, fanout=3) as (seed, proc):
        port_recv, port_send = ctx.Pipe(duplex=False)
        a = ctx.Process(target=relay_forever, args=(seed, port_send, 3), daemon=True)
        a.start()
        started: list[Starting] = []
        try:
            assert port_recv.poll(60), "a never started"
            a_address = f"127.0.0.1:{port_recv.recv()}"
            wait_for(lambda: query_seed(seed)["active_transfers"] == 1, 30, "a not served")
            for count in (2, 3):  # x, y
                started.append(Starting([seed]))
                wait_for(lambda: query_seed(seed)["active_transfers"] == count,  # noqa: B023
                         10, "x or y not served")
            for count in (1, 2):  # b, c
                started.append(Starting([seed]))
                wait_for(lambda: query_seed(a_address)["active_transfers"] == count,  # noqa: B023
                         10, "a never relayed")
            assert query_seed(seed)["relays"] == {"loaded": 5}
            a.kill()
            a.join(10)
            wait_for(lambda: query_seed(seed)["relays"] == {"loaded": 2}, 10,
                     "the seed still sends clients to a or below it")
            late = Starting([seed])
            started.append(late)
            results = [s.join() for s in started]
            assert all(r is not None for r in results), [s.fetch.reasons for s in started]
            x = started[0]
            assert [r.source for r in results] == [seed] * 4 + [x.address]  # type: ignore[union-attr]
            for s in started:
                assert_same_tensors(s.model, make_toy(3))
            for s in started[2:4]:  # b, c
                (reason,) = s.fetch.reasons
                assert f"relay {a_address} (named by {seed})" in reason, reason
            assert late.fetch.reasons == []
            assert proc.is_alive()
        finally:
            a.kill()
            a.join(10)
            port_recv.close()
            port_send.close()
            for s in started:
                s.relay.close()


def test_an_idle_seed_forgets_its_chain():
    # a (a relay) is served and gone. Later the seed sends to x, which offers no relay:
    # y, arriving meanwhile, must not be sent to a's closed relay.
    with toy_seed(seed=2, send_limit=SLOW_SEED, timeout_s=10.0) as (seed, _):
        a = Starting([seed])
        assert a.join() is not None, a.fetch.reasons
        a.relay.close()
        wait_for(lambda: query_seed(seed)["active_transfers"] == 0, 10, "a still counted")
        x_model = make_toy(None)
        x = threading.Thread(target=fetch_for(x_model, timeout_s=30.0).run, args=((seed,),))
        x.start()
        wait_for(lambda: query_seed(seed)["active_transfers"] == 1, 10, "seed never sent to x")
        y = Starting([seed])
        try:
            received = y.join()
            assert received is not None and received.source == seed, y.fetch.reasons
            assert y.fetch.reasons == []
            x.join(60)
            assert_same_tensors(x_model, make_toy(2))
        finally:
            y.relay.close()


def test_with_a_shared_secret_the_redirect_and_the_relay_prove_it():
    secret = b"relay-test-secret-0123456789"
    with toy_seed(seed=4, send_limit=SLOW_SEED, timeout_s=10.0, secret=secret) as (seed, _), \
            a_then_b(seed, secret) as (a, b):
        results = [a.join(), b.join()]
        assert all(r is not None for r in results), [a.fetch.reasons, b.fetch.reasons]
        assert [r.source for r in results] == [seed, a.address]  # type: ignore[union-attr]
        for s in (a, b):
            assert_same_tensors(s.model, make_toy(4))
        # Without the secret, the relay (now a seed) serves nothing.
        assert "requires the shared secret" in why_not_served_by(a.address)


def test_a_redirect_without_the_seeds_proof_is_not_followed():
    # Something that answers like a seed with the secret, but sends a redirect without
    # the proof: the client does not go there.
    secret = b"relay-test-secret-0123456789"
    with socket.create_server(("127.0.0.1", 0)) as fake:
        address = f"127.0.0.1:{fake.getsockname()[1]}"

        def answer() -> None:
            conn, _ = fake.accept()
            with conn:
                conn.sendall(frame(challenge(new_nonce(), True)))
                read(conn)
                conn.sendall(frame(redirect("127.0.0.1:9", "0" * 64)))

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        fetch = fetch_for(make_toy(None), secret=secret)
        assert fetch.run((address,)) is None
        thread.join(10)
    assert len(fetch.reasons) == 1 and "valid proof" in fetch.reasons[0], fetch.reasons


def test_a_relay_whose_own_transfer_fails_sends_its_client_back_to_the_seed():
    # The seed's first transfer (to a) carries a flipped bit in its largest tensor, which
    # comes after smaller ones: a's relay has passed those on to b when a's check fails.
    with toy_seed(seed=6, send_limit=SLOW_SEED, timeout_s=10.0, corrupt_first=True) as (
        seed, _,
    ), a_then_b(seed) as (a, b):
        assert a.join() is None
        assert "digest mismatch" in a.fetch.reasons[0], a.fetch.reasons
        received = b.join()
        assert received is not None and received.source == seed, b.fetch.reasons
        assert len(b.fetch.reasons) == 1, b.fetch.reasons
        assert f"relay {a.address} (named by {seed})" in b.fetch.reasons[0]
        assert_same_tensors(b.model, make_toy(6))
        # a's relay refuses anyone else now: it will never hold the model.
        assert "own transfer failed" in why_not_served_by(a.address)


def test_a_redirect_to_a_relay_with_other_weights_is_not_followed():
    # A peer of the seed names, as its relay port, a seed of other weights on its own
    # host, then stalls so the seed stays busy. The next client is sent there, finds
    # digests that do not fit the fingerprint the seed gave it, and asks the seed itself.
    with toy_seed(seed=7, timeout_s=5.0) as (seed, proc), toy_seed(seed=8) as (other, _):
        with connect(seed) as stalling:
            challenge_of(stalling)
            stalling.sendall(frame(hello_for(
                IDENTITY, make_toy(None), relay_port=int(other.rsplit(":", 1)[1])
            )))
            assert read(stalling)["type"] == ACCEPT  # and reads no bulk data
            client = make_toy(None)
            fetch = fetch_for(client)
            received = fetch.run((seed,))
        assert received is not None and received.source == seed, fetch.reasons
        assert len(fetch.reasons) == 1 and "other weights than the seed" in fetch.reasons[0]
        assert_same_tensors(client, make_toy(7))
        assert proc.is_alive()


def test_a_client_sent_to_a_relay_that_stalls_is_back_on_the_seed_in_bounded_time():
    # The relay's own fetch verified the first bucket, then stops: its client (TIMEOUT
    # 2 s) gets that bucket, no more, and must be back on the seed within a few
    # timeouts (it was still fetching after 20 s before no-progress limits).
    relay, _, _ = relay_verified_first_bucket(5, timeout_s=30.0)
    try:
        # 0.8 MB/s: the seed moves more than 1 MiB per client TIMEOUT of 2 s.
        with toy_seed(seed=5, send_limit=0.8e6, timeout_s=10.0) as (seed, _):
            with connect(seed) as busy:  # keeps the seed sending while the client asks
                challenge_of(busy)
                busy.sendall(frame(hello_for(IDENTITY, make_toy(None), relay_port=relay.port)))
                assert read(busy)["type"] == ACCEPT
                client = make_toy(None)
                fetch = fetch_for(client, timeout_s=2.0, min_rate_bytes_per_s=0.5e6)
                start = time.monotonic()
                received = fetch.run((seed,))
                elapsed = time.monotonic() - start
        assert received is not None and received.source == seed, fetch.reasons
        assert len(fetch.reasons) == 1 and "no progress for 2 s" in fetch.reasons[0]
        assert_same_tensors(client, make_toy(5))
        assert elapsed < 20, elapsed
    finally:
        relay.close()


@pytest.fixture(scope="module")
def plain_seed():
    with toy_seed(seed=7) as (address, proc):
        yield address, proc


@pytest.mark.parametrize("relay_port", [0, 70000, "80", 1.5])
def test_a_hello_with_a_bad_relay_port_is_refused(plain_seed, relay_port):
    seed, proc = plain_seed
    with connect(seed) as s:
        challenge_of(s)
        s.sendall(frame(hello_for(IDENTITY, make_toy(None), relay_port=relay_port)))
        reply = read(s)
    assert reply["type"] == REFUSE and reply["reason"].startswith("bad request"), reply
    assert proc.is_alive()


def test_a_relay_sends_only_what_its_fetch_verified():
    # A relay whose fetch has verified the first bucket's tensors and then stalls: its
    # client gets that bucket, then its transfer fails; nothing unverified leaves.
    model = make_toy(3)
    named = model_tensors(model)
    specs = [spec_of(n, t) for n, t in named]
    first_bucket = plan_buckets(specs, SMALL_BUCKET)[0]
    relay = relay_listener(timeout_s=1.0)
    progress = relay.begin(
        specs, [t for _, t in named],
        Accept(list(LoadedWeights.capture(model).digests), SMALL_BUCKET, TCP, None),
    )
    progress.verified(len(first_bucket))
    try:
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=5.0)
        assert fetch.run((f"127.0.0.1:{relay.port}",)) is None
        got = model_tensors(client)
        for i, ((name, t), (_, sent)) in enumerate(zip(got, named, strict=True)):
            if i < len(first_bucket):
                assert torch.equal(t, sent), f"verified {name} did not arrive"
            else:
                assert not t.any(), f"unverified {name} reached the client"
        assert not progress.complete
    finally:
        relay.close()


def test_a_relay_whose_own_fetch_is_slow_but_moving_keeps_its_client():
    # Its own fetch needs 5 s for the next bucket (one huge tensor on a slow link, say):
    # bytes keep arriving, nothing is verified yet. Its client (TIMEOUT 2 s) hears
    # keepalives meanwhile, so it waits instead of giving up, and gets every tensor.
    # A minimum rate the 5 s of this slow fetch stays above, on both sides.
    relay, progress, specs = relay_verified_first_bucket(4, timeout_s=2.0, min_rate=0.1e6)
    stop = threading.Event()

    def upstream() -> None:
        end = time.monotonic() + 5
        while time.monotonic() < end and not stop.wait(0.3):
            progress.arrived(64 << 10)
        progress.verified(len(specs))

    feeder = threading.Thread(target=upstream, daemon=True)
    feeder.start()
    try:
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=2.0, min_rate_bytes_per_s=0.1e6)
        start = time.monotonic()
        received = fetch.run((f"127.0.0.1:{relay.port}",))
        assert received is not None, fetch.reasons
        assert time.monotonic() - start > 4  # it did wait through the slow bucket
        assert_same_tensors(client, make_toy(4))
    finally:
        stop.set()
        feeder.join(10)
        relay.close()


def test_a_relay_whose_own_fetch_went_silent_fails_its_client_in_bounded_time():
    relay, _, _ = relay_verified_first_bucket(4, timeout_s=2.0)
    try:
        client = make_toy(None)
        fetch = fetch_for(client, timeout_s=30.0)
        start = time.monotonic()
        assert fetch.run((f"127.0.0.1:{relay.port}",)) is None
        assert time.monotonic() - start < 10
        assert "made no progress" in fetch.reasons[0], fetch.reasons
    finally:
        relay.close()


class Big(nn.Module):
    """A small tensor, then one of 10 MiB (parts of 4, 4 and 2 MiB)."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Parameter(torch.zeros(1000), requires_grad=False)
        self.big = nn.Parameter(torch.zeros((10 << 20) // 4), requires_grad=False)


def make_big(seed: int | None) -> Big:
    model = Big()
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for _, t in model_tensors(model):
            t.copy_(torch.randn(t.shape, generator=gen))
    return model


def test_a_relay_passes_a_large_tensor_on_part_by_part_and_only_verified_parts():
    # The relay's own fetch has verified the small tensor and the first 4 MiB part of
    # the large one, then stalls: its client gets exactly those bytes (without waiting
    # for the whole tensor), nothing after them, and fails. Once the relay's fetch
    # verified everything, the next client gets every tensor.
    model = make_big(7)
    named = model_tensors(model)
    specs = [spec_of(n, t) for n, t in named]
    weights = LoadedWeights.capture(model)
    relay = relay_listener(timeout_s=1.0)
    progress = relay.begin(
        specs, [t for _, t in named],
        Accept(list(weights.digests), SMALL_BUCKET, TCP, None, parts=weights.parts),
    )
    progress.verified(1)
    progress.verified_bytes(specs[0].nbytes + PART_BYTES)
    try:
        client = make_big(None)
        assert fetch_for(client, timeout_s=5.0).run((f"127.0.0.1:{relay.port}",)) is None
        assert torch.equal(client.small, model.small)
        got, want = byte_view(client.big), byte_view(model.big)
        assert torch.equal(got[:PART_BYTES], want[:PART_BYTES]), "a verified part waited"
        assert not got[PART_BYTES:].any(), "an unverified part left the relay"

        progress.verified(len(specs))
        client = make_big(None)
        assert fetch_for(client, timeout_s=5.0).run((f"127.0.0.1:{relay.port}",))
        assert_same_tensors(client, model)
    finally:
        relay.close()
