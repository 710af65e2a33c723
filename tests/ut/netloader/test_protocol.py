"""Framing and deadlines over a real socket pair and over real TCP on 127.0.0.1."""

import json
import socket
import struct
import threading
import time

import pytest

from tests.wire import tcp_pair
from vllm_ascend.model_loader.netloader.deadline import Deadline, DeadlineExceeded
from vllm_ascend.model_loader.netloader.wire import errors, frames, messages
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import MAGIC, PROTOCOL_VERSION, REFUSE
from vllm_ascend.model_loader.netloader.wire.messages import field

CAP = 1 << 20


def recv_msg(sock, expect=None, cap=CAP, seconds=5.0):
    return frames.recv_msg(sock, Deadline(seconds, "test"), cap, expect)


def send_msg(sock, msg):
    frames.send_msg(sock, msg, Deadline(5.0, "test"))

# Built here, not taken from the module, so the tests pin the wire format.
HEADER = struct.Struct("!4sBI")
RECV_TIMEOUT_S = 5.0
# A receive loop that ignored EOF would spin forever; fail instead of hanging the run.
pytestmark = pytest.mark.timeout(30)


def frame(payload: bytes, magic=MAGIC, version=PROTOCOL_VERSION, length=None) -> bytes:
    return HEADER.pack(magic, version, len(payload) if length is None else length) + payload


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
    # until the deadline (DeadlineExceeded) or swallow the tail.
    a.sendall(frame(b"", length=CAP + 1) + b"tail")
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="exceeds the 1048576-byte cap"):
        recv_msg(b)
    assert time.monotonic() - start < RECV_TIMEOUT_S / 2
    assert b.recv(4) == b"tail"


def test_length_at_the_cap_is_read(pair):
    a, b = pair
    pad = "p" * (64 - len(b'{"type":"x","pad":""}'))
    payload = json.dumps({"type": "x", "pad": pad}, separators=(",", ":")).encode()
    assert len(payload) == 64
    a.sendall(frame(payload))
    assert recv_msg(b, cap=64) == {"type": "x", "pad": pad}
    a.sendall(frame(payload + b" "))
    with pytest.raises(ProtocolError):
        recv_msg(b, cap=64)


def test_a_seed_reads_at_most_a_few_kib_from_any_peer():
    assert frames.MAX_REQUEST_BYTES <= 16 * 1024


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
    a.sendall(frame(b'{"type":"accept","bucket_bytes":' + b"9" * 5000 + b"}"))
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
def test_silent_peer_hits_the_deadline(pair, partial):
    a, b = pair
    a.sendall(partial)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="took longer than 0.2 s"):
        recv_msg(b, seconds=0.2)
    assert time.monotonic() - start < 2.0


def test_a_dripping_peer_does_not_stretch_the_deadline(pair):
    # One byte every 0.2 s: each recv returns well inside any per-call timeout, so a
    # per-call timeout never fires; the exchange's deadline still does.
    a, b = pair
    data = frame(b'{"type":"hello","pad":"' + b"x" * 200 + b'"}')
    stop = threading.Event()

    def drip() -> None:
        for byte in data:
            if stop.wait(0.2):
                return
            try:
                a.sendall(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        recv_msg(b, seconds=1.0)
    assert time.monotonic() - start < 1.5
    stop.set()
    thread.join(5)


def test_an_expired_deadline_fails_before_any_io(pair):
    a, b = pair
    deadline = Deadline(0.01, "late")
    time.sleep(0.05)
    a.sendall(frame(b'{"type":"done"}'))
    with pytest.raises(DeadlineExceeded):
        frames.recv_msg(b, deadline, CAP)


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
        frames.send_last(peer, {"type": REFUSE, "reason": "bad request"}, Deadline(5, "t"))
        peer.close()
        got = b""
        while chunk := sender.recv(4096):  # a reset here would raise and lose the refusal
            got += chunk
        assert json.loads(got[HEADER.size :])["reason"] == "bad request"


def test_send_last_gives_up_on_a_peer_that_keeps_sending(monkeypatch):
    monkeypatch.setattr(frames, "_LINGER_BYTES", 1 << 16)
    sender, peer = tcp_pair()
    with sender, peer:
        sender.setblocking(False)
        sender.send(b"x" * (1 << 18))  # fills buffers past the linger budget; never closes
        begun = time.monotonic()
        frames.send_last(peer, {"type": REFUSE, "reason": "bad request"}, Deadline(5, "t"))
        # Bounded by the byte budget, not by the peer: it returns although data still flows.
        assert time.monotonic() - begun < frames._LINGER_S + 1.0
        assert sender.recv(1 << 16)[:4] == MAGIC


# --- messages: every hostile field is a ProtocolError ------------------------------------

NONCE = "0123456789abcdef" * 2
GOOD_HELLO = {
    **messages.hello(
        {"model": "m"}, messages.ManifestSummary(3, 30, "a" * 64), 7001, False, ("tcp",)
    ),
    "nonce": NONCE,
}


def test_a_hello_parses_into_its_request():
    request = messages.parse_request(GOOD_HELLO)
    assert (request.kind, request.relay_port, request.direct) == ("hello", 7001, False)
    assert request.manifest == messages.ManifestSummary(3, 30, "a" * 64)
    assert request.data_planes == ("tcp",) and request.wire is GOOD_HELLO


@pytest.mark.parametrize(
    "change",
    [
        {"type": "accept"},
        {"nonce": "x"},
        {"nonce": NONCE.upper()},
        {"nonce": 12},
        {"proof": 12},
        {"identity": "m"},
        {"manifest": [["a", [1], "f", 4]]},
        {"manifest": {"tensors": -1, "bytes": 0, "sha256": "a" * 64}},
        {"manifest": {"tensors": 1, "bytes": 0, "sha256": "A" * 64}},
        {"manifest": {"tensors": True, "bytes": 0, "sha256": "a" * 64}},
        {"relay_port": 0},
        {"relay_port": 70000},
        {"relay_port": "80"},
        {"relay_port": 1.5},
        {"direct": "yes"},
        {"data_planes": []},
        {"data_planes": "tcp"},
        {"data_planes": [1]},
        {"expect": "not a digest"},
        {"resume": {"start": 0, "values": "v" * 64}},  # nothing held
        {"resume": {"start": 3, "values": "a" * 64}},  # the manifest has 3 tensors
        {"resume": {"start": -1, "values": "a" * 64}},
        {"resume": {"start": True, "values": "a" * 64}},
        {"resume": {"start": 1, "values": "not a digest"}},
        {"resume": {"start": 1}},
        {"resume": [1, "a" * 64]},
    ],
)
def test_a_hostile_hello_is_a_protocol_error(change):
    with pytest.raises(ProtocolError):
        messages.parse_request({**GOOD_HELLO, **change})


def accept_of(**change):
    return {**messages.accept(["d" * 64] * 3, 1 << 20, "tcp", "c" * 64), **change}


def test_an_accept_parses_against_what_was_asked():
    got = messages.parse_accept(accept_of(), 3, ("tcp",), 1 << 30)
    assert got == messages.Accept(["d" * 64] * 3, 1 << 20, "tcp", "c" * 64)


def test_a_resume_round_trips_and_the_accept_may_start_where_it_was_offered():
    resume = messages.Resume(2, "a" * 64)
    msg = {**messages.hello({"model": "m"}, messages.ManifestSummary(3, 30, "a" * 64), None,
                            False, ("tcp",), resume=resume), "nonce": NONCE}
    assert messages.parse_request(msg).resume == resume
    assert messages.parse_request(GOOD_HELLO).resume is None
    assert messages.parse_accept(accept_of(start=2), 3, ("tcp",), 1 << 30, 2).start == 2
    assert messages.parse_accept(accept_of(start=0), 3, ("tcp",), 1 << 30, 2).start == 0
    # A seed that predates resuming sends no start: it sends everything.
    old = {k: v for k, v in accept_of().items() if k != "start"}
    assert messages.parse_accept(old, 3, ("tcp",), 1 << 30, 2).start == 0


def test_an_accept_carries_the_load_state_and_must_carry_one():
    state = [["", "has_own_embed_tokens", False, None, True]]
    got = messages.parse_accept(accept_of(state=state), 3, ("tcp",), 1 << 30)
    assert got.state.describe() == ["has_own_embed_tokens=True"]
    without = {k: v for k, v in accept_of().items() if k != "state"}
    with pytest.raises(ProtocolError, match="state"):
        messages.parse_accept(without, 3, ("tcp",), 1 << 30)
    with pytest.raises(ProtocolError, match="malformed load state"):
        messages.parse_accept(accept_of(state=[["", "x", False, None, {"a": 1}]]), 3,
                              ("tcp",), 1 << 30)


@pytest.mark.parametrize("start, offered", [(1, 2), (2, 0), (5, 0), (-1, 0), ("2", 2)])
def test_an_accept_that_starts_where_the_client_did_not_offer_is_a_protocol_error(
    start, offered
):
    with pytest.raises(ProtocolError):
        messages.parse_accept(accept_of(start=start), 3, ("tcp",), 1 << 30, offered)


@pytest.mark.parametrize(
    "change",
    [
        {"digests": ["d" * 64] * 2},  # one short
        {"digests": ["d" * 64] * 4},  # one too many
        {"digests": ["d" * 63] * 3},
        {"digests": [1, 2, 3]},
        {"digests": "ddd"},
        {"bucket_bytes": 0},
        {"bucket_bytes": -1},
        {"bucket_bytes": 2**40},
        {"bucket_bytes": "64"},
        {"data_plane": "collective"},  # not offered
        {"data_plane": "x" * 10_000},
        {"checkpoint": "not hex"},
        {"checkpoint": 5},
    ],
)
def test_a_hostile_accept_is_a_protocol_error(change):
    with pytest.raises(ProtocolError):
        messages.parse_accept(accept_of(**change), 3, ("tcp",), 1 << 30)


@pytest.mark.parametrize(
    "relay",
    [
        "a" * 64 + ".example:7000",  # a 64-character label (the IDNA codec's UnicodeError)
        "tcp://h:7000",
        "::1:7000",
        "[::1:7000",
        " h:7000",
        "h:70000",
        "h:0",
        "h",
        "",
        "exämple.com:7000",
        7000,
    ],
)
def test_a_hostile_redirect_is_a_protocol_error(relay):
    with pytest.raises(ProtocolError):
        messages.parse_redirect(messages.redirect(relay, "f" * 64))  # type: ignore[arg-type]


def test_a_redirect_must_name_the_value_fingerprint():
    assert messages.parse_redirect(messages.redirect("[::1]:7000", "f" * 64)) == (
        "[::1]:7000", "f" * 64
    )
    with pytest.raises(ProtocolError):
        messages.parse_redirect({"type": "redirect", "relay": "h:1", "value_fingerprint": "0"})


@pytest.mark.parametrize("nonce", ["", "g" * 32, NONCE + "0", None, 5])
def test_a_hostile_challenge_is_a_protocol_error(nonce):
    with pytest.raises(ProtocolError):
        messages.parse_challenge({"type": "challenge", "nonce": nonce, "auth": False})


# --- bulk-data headers ---------------------------------------------------------------------


def test_a_bucket_header_must_match_the_plan(pair):
    a, b = pair
    header = frames.data_header(3, 1000)
    frames.parse_data_header(header, 3, 1000, b, Deadline(1, "t"))
    for index, length in [(4, 1000), (3, 1001), (3, 2**63)]:
        with pytest.raises(ProtocolError, match="where the plan has bucket 3 of 1000 bytes"):
            frames.parse_data_header(
                frames.data_header(index, length), 3, 1000, b, Deadline(1, "t")
            )
    with pytest.raises(ProtocolError, match="bad data magic"):
        frames.parse_data_header(b"XXXX" + header[4:], 3, 1000, b, Deadline(1, "t"))


def test_an_abort_frame_carries_the_senders_reason(pair):
    a, b = pair
    frame_ = frames.abort_frame("relay stalled")
    a.sendall(frame_[frames.DATA_HEADER_BYTES:])
    with pytest.raises(ProtocolError, match="sender aborted at bucket 2: relay stalled"):
        frames.parse_data_header(
            frame_[: frames.DATA_HEADER_BYTES], 2, 10, b, Deadline(1, "t")
        )


def test_an_abort_frame_with_an_overlong_reason_is_not_read(pair):
    a, b = pair
    header = struct.pack("!4sIQ", frames.DATA_MAGIC, frames.ABORT, 2**40)
    with pytest.raises(ProtocolError, match="over-long reason"):
        frames.parse_data_header(header, 0, 10, b, Deadline(1, "t"))


# --- review findings: peer strings that broke the client or the logs ----------------------


@pytest.mark.parametrize(
    "change",
    [{"proof": "\ud800" * 64}, {"proof": "A" * 64}, {"nonce": "a" * 32 + "\n"},
     {"type": "hello\n"}],
)
def test_a_lone_surrogate_or_a_newline_in_a_request_is_a_protocol_error(change):
    with pytest.raises(ProtocolError):
        messages.parse_request({**GOOD_HELLO, **change})


def test_a_lone_surrogate_in_a_digest_is_a_protocol_error():
    digests = ["d" * 63 + "\ud800", "d" * 64, "d" * 64]
    with pytest.raises(ProtocolError):
        messages.parse_accept(accept_of(digests=digests), 3, ("tcp",), 1 << 30)


@pytest.mark.parametrize(
    "relay",
    ["[fe80::1%" + "a" * 64 + "]:7000", "[fe80::1%eth0\n]:7000", "localhost:7000",
     "seed.example:7000"],
)
def test_a_redirect_names_an_ip_with_a_short_zone(relay):
    with pytest.raises(ProtocolError):
        messages.parse_redirect(messages.redirect(relay, "f" * 64))


def test_peer_text_reaches_logs_as_printable_ascii():
    reason = errors.text({"reason": "a\nb\x1b[31m\ud800é" + "x" * 5000}, "reason")
    assert reason.isascii() and reason.isprintable() and "\n" not in reason
    assert reason.startswith("a\\nb\\x1b[31m\\ud800\\xe9") and len(reason) < 5000
    done = messages.done(False, "é" * 5000)
    assert len(json.dumps(done)) < frames.MAX_REQUEST_BYTES


def test_a_hostile_resume_is_refused_in_a_short_reason_that_names_the_field():
    huge = {**GOOD_HELLO, "resume": {"start": 10**4000, "values": "a" * 64}}
    with pytest.raises(ProtocolError) as e:
        messages.parse_request(huge)
    assert len(str(e.value)) < 100
    with pytest.raises(ProtocolError, match="'resume'"):
        messages.parse_request({**GOOD_HELLO, "resume": {"start": "1", "values": "a" * 64}})
