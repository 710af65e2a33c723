"""The shared secret, between real seed and client processes over real sockets."""

import json
import socket
import threading

import pytest
import torch

from tests.ut.netloader.test_transfer import assert_same_tensors, fetch_for
from tests.ut.netloader.toy_seed import IDENTITY, make_toy, toy_seed
from tests.wire import connect, frame
from vllm_ascend.model_loader.netloader.auth import AuthError, client_proof, seed_proof
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.manifest import model_tensors, spec_of
from vllm_ascend.model_loader.netloader.protocol import (
    ACCEPT,
    CHALLENGE,
    HELLO,
    INFO,
    REFUSE,
    ProtocolError,
    recv_msg,
    send_msg,
)

SECRET = b"correct horse battery staple 42"
WRONG = b"incorrect horse battery staple 4"


@pytest.fixture(scope="module")
def guarded():
    with toy_seed(seed=9, secret=SECRET) as (address, proc):
        yield address, proc


def untouched(model: torch.nn.Module) -> bool:
    return all(torch.count_nonzero(t) == 0 for _, t in model_tensors(model))


def hello_of(model: torch.nn.Module) -> dict:
    return {
        "type": HELLO,
        "identity": IDENTITY,
        "manifest": [spec_of(n, t).to_wire() for n, t in model_tensors(model)],
    }


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


@pytest.mark.parametrize("proof", [None, "0" * 64, 12, client_proof(WRONG, "n", "m")])
def test_seed_answers_a_bad_proof_with_a_bare_refusal(guarded, proof):
    """No identity, manifest, digest or rendezvous port goes back, only the refusal."""
    address, _ = guarded
    with connect(address) as s:
        challenge = recv_msg(s, expect=CHALLENGE)
        assert challenge["auth"] is True
        request = {**hello_of(make_toy(None)), "nonce": "m"}
        if proof is not None:
            request["proof"] = proof
        s.sendall(frame(request))
        reply = recv_msg(s)
    assert reply["type"] == REFUSE and set(reply) == {"type", "reason", "retry"}
    assert "authentication" in reply["reason"]


def test_a_proof_from_another_connection_is_refused(guarded):
    """Proofs cover the seed's fresh nonce, so a recorded one cannot be replayed."""
    address, _ = guarded
    with connect(address) as first:
        old_nonce = recv_msg(first, expect=CHALLENGE)["nonce"]
    replayed = client_proof(SECRET, old_nonce, "m")
    with connect(address) as s:
        assert recv_msg(s, expect=CHALLENGE)["nonce"] != old_nonce
        send_msg(s, {"type": INFO, "nonce": "m", "proof": replayed})
        reply = recv_msg(s)
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

        def serve() -> None:
            conn, _ = fake.accept()
            with conn:
                send_msg(conn, {"type": CHALLENGE, "nonce": "n", "auth": True})
                hello = recv_msg(conn)
                body = {"type": ACCEPT, "store_port": 1, "bucket_bytes": 1 << 20,
                        "digests": ["0" * 64] * len(hello["manifest"])}
                proof = seed_proof(SECRET, "n", hello, body)
                body["digests"] = ["1" * 64] * len(hello["manifest"])
                send_msg(conn, {**body, "proof": proof})
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
                send_msg(conn, recv_msg(upstream, expect=CHALLENGE))
                hello = recv_msg(conn, expect=HELLO)
                send_msg(upstream, {**hello, "identity": IDENTITY})
                reply = recv_msg(upstream)
                seen.append(reply)
                send_msg(conn, reply)
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
    """Every control-plane byte between client and seed, through a recording relay."""
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
    assert b'"proof"' in recorded and len(recorded) > 1000
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
