"""Seed addresses: strict parsing, formatting, and listeners in the right family."""

import socket

import pytest

from vllm_ascend.model_loader.netloader.wire.addresses import (
    AddressError,
    format_address,
    is_host_name,
    listen,
    parse_address,
)


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
        ("seed-0.svc.cluster.local:1", ("seed-0.svc.cluster.local", 1)),
        ("localhost.:65535", ("localhost.", 65535)),
        ("[::1]:7000", ("::1", 7000)),
        ("[fe80::1%eth0]:7000", ("fe80::1%eth0", 7000)),
        ("[::ffff:10.0.0.1]:7000", ("::ffff:10.0.0.1", 7000)),
    ],
)
def test_parse_address(text, parsed):
    assert parse_address(text) == parsed
    assert format_address(*parsed) == text


@pytest.mark.parametrize(
    "text",
    ["fe80::1", "::1", "::1:7000", "[::1:7000", "[::1]", "[::1]7000", "[10.0.0.1]:7000",
     "[zz::1]:7000", "tcp://h:7000", " h:7000", "h:7000\n", "h :7000", "h:", ":7000", "h",
     "h:0", "h:65536", "h:+7000", "h:٧٠٠٠", "a..b:7000", "-a:7000", "a-:7000", "a_b:7000",
     "a" * 64 + ":7000", ".".join(["a" * 63] * 4) + ":1", "exämple.com:7000", "", None, 7000],
)
def test_malformed_addresses_name_the_key(text):
    with pytest.raises(AddressError, match="SOURCE\\[0\\]"):
        parse_address(text, key="SOURCE[0]")


def test_host_names_follow_rfc_1123():
    assert is_host_name("a-b.c1.d") and is_host_name("a" * 63)
    assert not is_host_name("a" * 64) and not is_host_name("") and not is_host_name("a..b")


@pytest.mark.parametrize("host, family", [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_listen_binds_the_hosts_family(host, family):
    with listen(host, 0) as sock:
        assert sock.family == family
        port = sock.getsockname()[1]
        with socket.create_connection((host, port), timeout=5):
            conn, _ = sock.accept()
            conn.close()


def test_listen_on_a_taken_port_fails_at_once():
    with listen("127.0.0.1", 0) as first:
        with pytest.raises(OSError):
            listen("127.0.0.1", first.getsockname()[1])
