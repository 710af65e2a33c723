"""Control and bulk-data frames, and deadlines, over a real socket pair and over real TCP on
127.0.0.1 (``wire.frames``)."""

import json
import socket
import struct
import threading
import time

import pytest

from tests.helpers.wire import tcp_pair
from vllm_ascend.model_loader.netloader.deadline import Deadline, DeadlineExceeded
from vllm_ascend.model_loader.netloader.wire import frames
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import MAGIC, PROTOCOL_VERSION, REFUSE

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
