"""Framing over a real socket pair and over real TCP on 127.0.0.1."""

import json
import socket
import struct
import time

import pytest

from vllm_ascend.model_loader.netloader import protocol
from vllm_ascend.model_loader.netloader.protocol import (
    MAGIC,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    REFUSE,
    ProtocolError,
    field,
    recv_msg,
    send_msg,
)

# Built here, not taken from the module, so the tests pin the wire format.
HEADER = struct.Struct("!4sBI")
RECV_TIMEOUT_S = 5.0
# A receive loop that ignored EOF would spin forever; fail instead of hanging the run.
pytestmark = pytest.mark.timeout(30)


def frame(payload: bytes, magic=MAGIC, version=PROTOCOL_VERSION, length=None) -> bytes:
    return HEADER.pack(magic, version, len(payload) if length is None else length) + payload


def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=RECV_TIMEOUT_S)
        peer, _ = server.accept()
    return client, peer


@pytest.fixture(params=["socketpair", "tcp"])
def pair(request):
    """(sender, receiver): two connected stream sockets; the receiver has a timeout."""
    a, b = socket.socketpair() if request.param == "socketpair" else tcp_pair()
    b.settimeout(RECV_TIMEOUT_S)
    with a, b:
        yield a, b


def test_round_trip_nested_unicode(pair):
    a, b = pair
    msg = {
        "type": "hello",
        "name": "模型 — modèle 🦙",
        "identity": {"rank": 3, "architectures": ["LlamaForCausalLM"], "quantization": None},
        "manifest": [["embed.weight", [300, 64], "bfloat16", 38400], ["nothing", [0], "f", 0]],
        "flags": [True, False, 1.5, -2],
    }
    send_msg(a, msg)
    assert recv_msg(b) == msg


def test_several_frames_on_one_stream_keep_their_boundaries(pair):
    a, b = pair
    msgs = [{"type": "info"}, {"type": "accept", "n": list(range(1000))}, {"type": "done"}]
    for msg in msgs:
        send_msg(a, msg)
    assert [recv_msg(b) for _ in msgs] == msgs


def test_wire_format(pair):
    a, b = pair
    msg = {"type": "done", "ok": True}
    send_msg(a, msg)
    a.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := b.recv(4096):
        data += chunk
    magic, version, length = HEADER.unpack(data[: HEADER.size])
    assert (magic, version) == (MAGIC, PROTOCOL_VERSION)
    assert length == len(data) - HEADER.size
    assert json.loads(data[HEADER.size :]) == msg


def test_recv_reads_frames_written_in_pieces(pair):
    a, b = pair
    data = frame(json.dumps({"type": "hello", "x": "y" * 100}).encode())
    for i in range(0, len(data), 7):
        a.sendall(data[i : i + 7])
    assert recv_msg(b) == {"type": "hello", "x": "y" * 100}


def test_expect_matching_type(pair):
    a, b = pair
    send_msg(a, {"type": "accept", "digests": []})
    assert recv_msg(b, expect="accept") == {"type": "accept", "digests": []}


def test_expect_wrong_type(pair):
    a, b = pair
    send_msg(a, {"type": "hello"})
    with pytest.raises(ProtocolError):
        recv_msg(b, expect="accept")


def test_expect_wrong_type_refuse_carries_reason(pair):
    a, b = pair
    send_msg(a, {"type": REFUSE, "reason": "config_sha256 differs 1234abcd", "retry": False})
    with pytest.raises(ProtocolError, match="config_sha256 differs 1234abcd"):
        recv_msg(b, expect="info")


def test_refuse_without_expect_is_returned(pair):
    a, b = pair
    send_msg(a, {"type": REFUSE, "reason": "busy", "retry": True})
    assert recv_msg(b) == {"type": REFUSE, "reason": "busy", "retry": True}


@pytest.mark.parametrize(
    "data",
    [
        frame(b'{"type":"hello"}', magic=b"NLDX"),
        b"GET / HTTP/1.0\r\n\r\n",
        frame(b'{"type":"hello"}', version=PROTOCOL_VERSION + 1),
        frame(b'{"type":"hello"}', version=0),
    ],
    ids=["bad-magic", "http", "newer-version", "version-0"],
)
def test_bad_header(pair, data):
    a, b = pair
    a.sendall(data)
    with pytest.raises(ProtocolError):
        recv_msg(b)


def test_oversized_length_refused_without_reading_payload(pair):
    a, b = pair
    # Only the header and a few more bytes: reading the announced payload would block
    # until the timeout (TimeoutError, not ProtocolError) or swallow the tail.
    a.sendall(frame(b"", length=MAX_FRAME_BYTES + 1) + b"tail")
    start = time.monotonic()
    with pytest.raises(ProtocolError):
        recv_msg(b)
    assert time.monotonic() - start < RECV_TIMEOUT_S / 2
    assert b.recv(4) == b"tail"


def test_length_at_the_cap_is_read(pair, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", 64)
    a, b = pair
    pad = "p" * (64 - len(b'{"type":"x","pad":""}'))
    payload = json.dumps({"type": "x", "pad": pad}, separators=(",", ":")).encode()
    assert len(payload) == 64
    a.sendall(frame(payload))
    assert recv_msg(b) == {"type": "x", "pad": pad}
    a.sendall(frame(payload + b" "))
    with pytest.raises(ProtocolError):
        recv_msg(b)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # EOF before any header byte
        frame(b"")[:5],  # EOF inside the header
        frame(b'{"type":"hello"}', length=40),  # EOF inside the payload
    ],
    ids=["no-header", "half-header", "half-payload"],
)
def test_truncated_frame_then_eof(pair, data):
    a, b = pair
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        recv_msg(b)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"\xff\xfe"}',  # invalid UTF-8
        b'{"type":"hello"',  # truncated JSON
        b"{'type': 'hello'}",
        b"",  # zero-length frame
        b"[]",
        b'"hello"',
        b"42",
        b"null",
        b'[{"type":"hello"}]',
        b"{}",
        b'{"kind":"hello"}',
        b'{"type":1}',
        b'{"type":null}',
        b'{"type":["hello"]}',
    ],
)
def test_payload_is_not_a_message(pair, payload):
    a, b = pair
    a.sendall(frame(payload))
    with pytest.raises(ProtocolError):
        recv_msg(b)


def test_bad_frame_does_not_desynchronise_a_sender_that_continues(pair):
    # recv_msg consumed exactly the bad frame, so the next frame still parses.
    a, b = pair
    a.sendall(frame(b"[1, 2]") + frame(b'{"type":"done"}'))
    with pytest.raises(ProtocolError):
        recv_msg(b)
    assert recv_msg(b) == {"type": "done"}


def test_huge_json_integer_is_a_protocol_error(pair):
    a, b = pair
    a.sendall(frame(b'{"type":"accept","store_port":' + b"9" * 5000 + b"}"))
    with pytest.raises(ProtocolError):
        recv_msg(b)


def test_deeply_nested_json_is_a_protocol_error(pair):
    a, b = pair
    a.sendall(frame(b'{"type":"hello","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"))
    with pytest.raises(ProtocolError):
        recv_msg(b)


@pytest.mark.parametrize(
    "partial", [b"", frame(b'{"type":"hello"}')[:10]], ids=["nothing", "half-frame"]
)
def test_silent_peer_hits_the_socket_timeout(pair, partial):
    a, b = pair
    a.sendall(partial)
    b.settimeout(0.2)
    start = time.monotonic()
    with pytest.raises(OSError):  # TimeoutError is an OSError
        recv_msg(b)
    assert time.monotonic() - start < 2.0


def test_send_over_the_cap_sends_nothing(pair, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", 64)
    a, b = pair
    with pytest.raises(ProtocolError):
        send_msg(a, {"type": "hello", "pad": "x" * 100})
    send_msg(a, {"type": "small"})  # the stream is still usable
    assert recv_msg(b) == {"type": "small"}


def test_send_to_closed_peer_raises_oserror():
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises(OSError):
            for _ in range(100):  # the first send may still land in the buffer
                send_msg(a, {"type": "hello", "pad": "x" * 65536})


# --- field() -------------------------------------------------------------------------

MSG = {"type": "accept", "port": 5000, "ratio": 0.5, "ok": True, "digests": ["a"], "name": "s"}


@pytest.mark.parametrize(
    "name, kind",
    [
        ("port", int),
        ("ratio", float),
        ("ok", bool),
        ("digests", list),
        ("name", str),
        ("port", (int, float)),
        ("ratio", (int, float)),
    ],
)
def test_field_accepts_right_type(name, kind):
    assert field(MSG, name, kind) == MSG[name]


@pytest.mark.parametrize(
    "name, kind",
    [
        ("missing", int),
        ("missing", str),
        ("name", int),
        ("port", str),
        ("digests", dict),
        ("ratio", int),
        ("ok", int),  # bool is an int in Python, but not on this wire
        ("ok", (int, float)),
        ("port", bool),
    ],
)
def test_field_rejects_missing_or_mistyped(name, kind):
    with pytest.raises(ProtocolError, match=name):
        field(MSG, name, kind)


def test_field_rejects_explicit_null():
    with pytest.raises(ProtocolError):
        field({"type": "accept", "port": None}, "port", int)


def test_send_last_waits_for_a_peer_that_is_done_sending():
    sender, peer = tcp_pair()
    with sender, peer:
        sender.sendall(b"x" * 100_000)  # more than the other side will ever read
        sender.shutdown(socket.SHUT_WR)
        protocol.send_last(peer, {"type": REFUSE, "reason": "bad request"})
        peer.close()
        got = b""
        while chunk := sender.recv(4096):  # a reset here would raise and lose the refusal
            got += chunk
        assert json.loads(got[HEADER.size :])["reason"] == "bad request"


def test_send_last_gives_up_on_a_peer_that_keeps_sending(monkeypatch):
    monkeypatch.setattr(protocol, "_LINGER_BYTES", 1 << 16)
    sender, peer = tcp_pair()
    with sender, peer:
        sender.setblocking(False)
        sender.send(b"x" * (1 << 18))  # fills buffers past the linger budget; never closes
        begun = time.monotonic()
        protocol.send_last(peer, {"type": REFUSE, "reason": "bad request"})
        # Bounded by the byte budget, not by the peer: it returns although data still flows.
        assert time.monotonic() - begun < protocol._LINGER_S + 1.0
        assert sender.recv(1 << 16)[:4] == MAGIC
