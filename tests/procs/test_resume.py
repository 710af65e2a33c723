"""Resume: a source that fails mid-transfer leaves its verified tensors in place, and
the next source with the same value fingerprint sends only the rest."""

import socket

import pytest
import torch

from tests.helpers.toy import (
    IDENTITY,
    assert_same_tensors,
    fetch_for,
    make_toy,
    only_verified,
    serving,
    wait_for,
)
from tests.helpers.toy_seed import toy_seed
from tests.helpers.wire import challenge_of, connect, frame, hello_for, read, summary_of
from tests.procs.test_attacks import fake_seed
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, model_tensors
from vllm_ascend.model_loader.netloader.wire.auth import new_nonce
from vllm_ascend.model_loader.netloader.wire.frames import REFUSE
from vllm_ascend.model_loader.netloader.wire.messages import accept, challenge

PLANES = ["tcp", "collective"]


def total_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for _, t in model_tensors(model))


def first_tensor_arrived(client: torch.nn.Module) -> bool:
    return bool(torch.count_nonzero(client.big))


def fetch_after_a_kill(first_seed: int, then: str, plane: str, client: torch.nn.Module):
    """Fetch from a seed of ``make_toy(first_seed)`` that dies once it sent its first
    bucket (the big tensor, alone), then from ``then``; returns (fetch, received)."""
    with toy_seed(seed=first_seed, data_plane=plane, die_after=1) as (address, _):
        fetch = fetch_for(client, timeout_s=10.0, data_plane=plane)
        received = fetch.run((address, then))
    assert address in fetch.reasons[0]
    assert first_tensor_arrived(client)
    return fetch, received


@pytest.mark.parametrize("plane", PLANES)
def test_the_next_seed_with_the_same_values_sends_only_what_the_client_lacks(plane):
    client = make_toy(None)
    with serving(seed=3, data_plane=plane) as second:
        fetch, received = fetch_after_a_kill(3, second.address, plane, client)
        assert received is not None, fetch.reasons
        wait_for(lambda: query_seed(second.address)["completed_transfers"] == 1, 10,
                 "the second seed did not count the transfer")
    assert received.source == second.address
    assert received.reused_bytes == client.big.nbytes
    assert received.nbytes + received.reused_bytes == total_bytes(client)
    assert_same_tensors(client, make_toy(3))
    assert received.digests == list(LoadedWeights.capture(make_toy(3)).digests)


@pytest.mark.parametrize("plane", PLANES)
def test_a_seed_with_other_values_sends_everything_again(plane):
    # Same checkpoint identity, other values (a seed whose weights were changed in
    # place, say): nothing the first seed sent may stay.
    client = make_toy(None)
    with serving(seed=4, data_plane=plane) as second:
        fetch, received = fetch_after_a_kill(3, second.address, plane, client)
    assert received is not None, fetch.reasons
    assert received.reused_bytes == 0
    assert received.nbytes == total_bytes(client)
    assert_same_tensors(client, make_toy(4))


def resumes_with_other_values(conn: socket.socket) -> None:
    """A seed that takes up the client's resume offer, but announces other values."""
    conn.sendall(frame(challenge(new_nonce(), False)))
    hello = read(conn)
    digests = list(LoadedWeights.capture(make_toy(9)).digests)
    conn.sendall(frame(accept(digests, 1 << 20, "tcp", hello["identity"]["checkpoint"],
                              hello["resume"]["start"])))
    conn.recv(1)


def test_a_seed_that_resumes_over_other_values_is_refused_and_the_tensors_stay_verified():
    client = make_toy(None)
    address, server = fake_seed(resumes_with_other_values)
    with server:
        fetch, received = fetch_after_a_kill(3, address, "tcp", client)
    assert received is None
    assert "resumes at tensor" in fetch.reasons[1]
    only_verified(client, 3)
    assert torch.count_nonzero(client.embed.weight) == 0


def test_a_client_that_claims_a_larger_manifest_cannot_resume_past_the_seeds_end():
    """Before: the seed bounded a resume by the client's own tensor count, accepted
    start 10**9 - 1 (sending nothing) and counted a completed transfer."""
    toy = make_toy(3)
    with serving(seed=3) as seed:
        summary = summary_of(make_toy(None))
        values = LoadedWeights.capture(toy).value_fingerprint()
        lying = {**summary.to_wire(), "tensors": 10**9}
        with connect(seed.address) as s:
            challenge_of(s)
            s.sendall(frame(hello_for(IDENTITY, make_toy(None), manifest=lying,
                                      resume={"start": 10**9 - 1, "values": values})))
            reply = read(s)
        assert reply["type"] == REFUSE and "tensor manifest differs" in reply["reason"], reply
        assert query_seed(seed.address)["completed_transfers"] == 0


def old_seed_that_dies_before_sending(conn: socket.socket) -> None:
    """A seed that predates resuming (no start: it sends everything) with the same
    values, and dies before its first bucket."""
    conn.sendall(frame(challenge(new_nonce(), False)))
    hello = read(conn)
    reply = accept(list(LoadedWeights.capture(make_toy(3)).digests), 1 << 20, "tcp",
                   hello["identity"]["checkpoint"])
    del reply["start"]
    conn.sendall(frame(reply))


def test_a_source_with_the_same_values_that_fails_before_sending_keeps_what_is_held():
    client = make_toy(None)
    old, server = fake_seed(old_seed_that_dies_before_sending)
    with server, serving(seed=3) as third:
        with toy_seed(seed=3, die_after=1) as (first, _):
            fetch = fetch_for(client, timeout_s=10.0)
            received = fetch.run((first, old, third.address))
    assert received is not None, fetch.reasons
    assert len(fetch.reasons) == 2 and old in fetch.reasons[1]
    assert received.source == third.address
    assert received.reused_bytes == client.big.nbytes
    assert_same_tensors(client, make_toy(3))
