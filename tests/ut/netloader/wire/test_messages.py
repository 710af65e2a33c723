"""Every message a peer can send is parsed into what it means or a ProtocolError
(``wire.messages``), and a peer's text reaches logs as printable ASCII (``wire.errors``)."""

import json

import pytest

from vllm_ascend.model_loader.netloader.wire import errors, frames, messages
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.messages import field

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


def test_an_accept_must_serve_the_layout_asked_for_and_a_processed_one_its_signature():
    processed = accept_of(layout="processed", signature="5" * 64)
    got = messages.parse_accept(processed, 3, ("tcp",), 1 << 30, layout="processed")
    assert (got.layout, got.signature) == ("processed", "5" * 64)
    with pytest.raises(ProtocolError, match="another layout than the processed one"):
        messages.parse_accept(accept_of(), 3, ("tcp",), 1 << 30, layout="processed")
    with pytest.raises(ProtocolError, match="another layout than the loaded one"):
        messages.parse_accept(processed, 3, ("tcp",), 1 << 30)
    with pytest.raises(ProtocolError, match="signature"):
        messages.parse_accept(accept_of(layout="processed"), 3, ("tcp",), 1 << 30,
                              layout="processed")


@pytest.mark.parametrize("processing", [
    None, "cpu", ["cpu"], {"platform": 1}, {f"k{i}": "v" for i in range(9)},
    {"platform": "x" * 161}, {"p" * 33: "cpu"},
])
def test_a_processed_hello_carries_a_few_short_signature_fields(processing):
    msg = {**GOOD_HELLO, "layout": "processed"}
    if processing is not None:
        msg["processing"] = processing
    with pytest.raises(ProtocolError, match="processing"):
        messages.parse_request(msg)


def test_a_hello_names_a_known_layout():
    request = messages.parse_request({**GOOD_HELLO, "layout": "processed",
                                      "processing": {"platform": "cpu"}})
    assert (request.layout, request.processing) == ("processed", {"platform": "cpu"})
    assert messages.parse_request(GOOD_HELLO).layout == "loaded"
    with pytest.raises(ProtocolError, match="layout 'runtime'"):
        messages.parse_request({**GOOD_HELLO, "layout": "runtime"})
