"""The shared secret, between real seed and client processes over real sockets."""

import json
import socket
import threading

import pytest

from tests.helpers.toy import IDENTITY, assert_same_tensors, fetch_for, make_toy, untouched
from tests.helpers.toy_seed import toy_seed
from tests.helpers.wire import challenge_of, connect, frame, hello_for, read
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.wire.auth import (
    AuthError,
    client_proof,
    new_nonce,
    seed_proof,
)
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import REFUSE
from vllm_ascend.model_loader.netloader.wire.messages import ACCEPT, HELLO, INFO, accept, challenge

SECRET = b"correct horse battery staple 42"
WRONG = b"incorrect horse battery staple 4"


@pytest.fixture(scope="module")
def guarded():
    with toy_seed(seed=9, secret=SECRET) as (address, proc):
        yield address, proc


def test_client_with_the_secret_is_served_bit_for_bit(guarded):
    address, _ = guarded
    client = make_toy(None)
    fetch = fetch_for(client, secret=SECRET)
    received = fetch.run((address,))
    assert received is not None, fetch.reasons
    assert_same_tensors(client, make_toy(9))
    assert query_seed(address, secret=SECRET)["identity"] == IDENTITY


@pytest.mark.parametrize("secret", [None, WRONG])
def test_client_without_the_right_secret_gets_nothing(guarded, secret):
    address, proc = guarded
    client = make_toy(None)
    fetch = fetch_for(client, secret=secret)
    assert fetch.run((address,)) is None
    assert "secret" in fetch.reasons[0]
    assert untouched(client)
    # Without a secret the client stops at the challenge; with a wrong one the seed refuses.
    expected = (AuthError, "requires the shared secret") if secret is None else (
        ProtocolError, "authentication failed")
    with pytest.raises(expected[0], match=expected[1]):
        query_seed(address, secret=secret)
    assert proc.is_alive()


@pytest.mark.parametrize("proof", [None, "0" * 64, client_proof(WRONG, "n", "m")])
def test_seed_answers_a_bad_proof_with_a_bare_refusal(guarded, proof):
    """No identity, manifest, digest or rendezvous port goes back, only the refusal."""
    address, _ = guarded
    with connect(address) as s:
        assert challenge_of(s)["auth"] is True
        request = hello_for(IDENTITY, make_toy(None))
        if proof is not None:
            request["proof"] = proof
        s.sendall(frame(request))
        reply = read(s)
    assert reply["type"] == REFUSE and set(reply) == {"type", "reason", "retry"}
    assert "authentication" in reply["reason"]


def test_a_proof_from_another_connection_is_refused(guarded):
    """Proofs cover the seed's fresh nonce, so a recorded one cannot be replayed."""
    address, _ = guarded
    nonce = new_nonce()
    with connect(address) as first:
        old_nonce = challenge_of(first)["nonce"]
    replayed = client_proof(SECRET, old_nonce, nonce)
    with connect(address) as s:
        assert challenge_of(s)["nonce"] != old_nonce
        s.sendall(frame({"type": INFO, "nonce": nonce, "proof": replayed}))
        reply = read(s)
    assert reply["type"] == REFUSE and "authentication failed" in reply["reason"]


def test_client_with_a_secret_does_not_trust_an_open_seed():
    with toy_seed(seed=2) as (address, _):
        client = make_toy(None)
        fetch = fetch_for(client, secret=SECRET)
        assert fetch.run((address,)) is None
        assert "does not require the shared secret" in fetch.reasons[0]
        assert untouched(client)


def test_tampered_accept_is_rejected_before_any_byte_moves():
    """A man in the middle who changes the digests in an 'accept' breaks the seed's proof."""
    client = make_toy(None)
    fetch = fetch_for(client, secret=SECRET)
    with socket.create_server(("127.0.0.1", 0)) as fake:
        address = f"127.0.0.1:{fake.getsockname()[1]}"
        nonce = new_nonce()

        def serve() -> None:
            conn, _ = fake.accept()
            with conn:
                conn.sendall(frame(challenge(nonce, True)))
                hello = read(conn)
                tensors = hello["manifest"]["tensors"]
                body = accept(["0" * 64] * tensors, 1 << 20, "tcp", IDENTITY["checkpoint"])
                proof = seed_proof(SECRET, nonce, hello, body)
                body["digests"] = ["1" * 64] * tensors
                conn.sendall(frame({**body, "proof": proof}))
                conn.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert fetch.run((address,)) is None
        thread.join(5)
    assert "valid proof" in fetch.reasons[0]
    assert untouched(client)


def test_rewritten_identity_breaks_the_seeds_proof(guarded):
    """A man in the middle rewrites the client's identity in its hello so that a seed of
    another model (same tensor manifest, same secret) accepts. The seed's proof covers
    the request it read, so the client sees the rewrite and takes nothing."""
    address, _ = guarded
    host, port = address.rsplit(":", 1)
    wanted = dict(IDENTITY, config_sha256="1" * 64)  # not the model the seed serves
    with socket.create_server(("127.0.0.1", 0)) as mitm:
        mitm_address = f"127.0.0.1:{mitm.getsockname()[1]}"
        seen: list[dict] = []

        def serve() -> None:
            conn, _ = mitm.accept()
            with conn, socket.create_connection((host, int(port)), timeout=5) as upstream:
                conn.sendall(frame(challenge_of(upstream)))
                hello = read(conn)
                assert hello["type"] == HELLO
                upstream.sendall(frame({**hello, "identity": IDENTITY}))
                reply = read(upstream)
                seen.append(reply)
                conn.sendall(frame(reply))
                conn.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = make_toy(None)
        fetch = fetch_for(client, identity=wanted, secret=SECRET)
        assert fetch.run((mitm_address,)) is None
        thread.join(10)
    assert seen and seen[0]["type"] == ACCEPT  # the seed itself was fooled
    assert "valid proof" in fetch.reasons[0]
    assert untouched(client)


def test_secret_never_crosses_the_wire(guarded):
    """Every byte between client and seed (handshake and bulk data), through a recording
    relay."""
    address, _ = guarded
    host, port = address.rsplit(":", 1)
    recorded = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as relay:
        relay_address = f"127.0.0.1:{relay.getsockname()[1]}"

        def pump(src: socket.socket, dst: socket.socket) -> None:
            while data := src.recv(65536):
                recorded.extend(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

        def serve() -> None:
            conn, _ = relay.accept()
            with conn, socket.create_connection((host, int(port))) as upstream:
                back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
                back.start()
                pump(conn, upstream)
                back.join(10)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = make_toy(None)
        fetch = fetch_for(client, secret=SECRET)
        received = fetch.run((relay_address,))
        thread.join(10)
    assert received is not None, fetch.reasons
    assert_same_tensors(client, make_toy(9))
    assert b'"proof"' in recorded and len(recorded) > 1_000_000  # the bulk data too
    assert SECRET not in recorded and SECRET.hex().encode() not in recorded
    assert json.dumps(SECRET.decode()).encode() not in recorded


def test_query_cli_uses_the_secret_file(guarded, tmp_path, capsys, monkeypatch):
    from vllm_ascend.model_loader.netloader.query import main

    address, _ = guarded
    monkeypatch.delenv("NETLOADER_SECRET", raising=False)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    assert main([address, "--secret-file", str(secret_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["address"] == address and info["identity"] == IDENTITY
    assert info["loaded_from"] == "disk" and info["bytes"] > 0
    assert main([address]) == 1
    assert "requires the shared secret" in json.loads(capsys.readouterr().out)["error"]
    monkeypatch.setenv("NETLOADER_SECRET", WRONG.decode())
    assert main([address]) == 1
    assert "authentication failed" in json.loads(capsys.readouterr().out)["error"]
