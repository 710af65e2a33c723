"""Seed addresses: strict parsing of ``host:port`` / ``[v6]:port``, formatting, and
binding a listener in the right address family.

An address reaches this module from an operator (``SOURCE``) or from a peer (a
redirect). Both are checked the same way, so a malformed one is an error that names
where it came from, never a name lookup that fails later, or a ``UnicodeError`` from
the IDNA codec deep inside ``socket.create_connection``.
"""

import ipaddress
import re
import socket

# RFC 1123 host name labels: letters, digits and inner hyphens, 1..63 characters.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_HOST_NAME = 253
# An IPv6 zone: an interface name (at most 15 characters on Linux) or index.
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class AddressError(ValueError):
    """An address is malformed; the message names where it came from (``key``)."""


def parse_address(text: object, key: str = "address", ip_only: bool = False) -> tuple[str, int]:
    """``"host:port"`` or ``"[ipv6]:port"`` -> ``(host, port)``.

    ``host`` is an IPv4 address, an RFC 1123 host name (unless ``ip_only``), or (in
    brackets) an IPv6 address, optionally with a ``%scope`` of at most 15 characters.
    Raises ``AddressError`` naming ``key`` for anything else: a bare IPv6 address, a
    URL scheme, whitespace, an empty or over-long label, a port outside 1..65535."""
    if not isinstance(text, str) or len(text) > _MAX_HOST_NAME + 8:
        raise AddressError(f"{key} must be a string 'host:port', got {text!r:.300}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not _is_ipv6(host):
            raise AddressError(f"{key} must look like '[ipv6]:port', got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise AddressError(
                f"{key} must look like 'host:port' (IPv6 as '[addr]:port'), got {text!r}"
            )
        if not (_is_ipv4(host) or not ip_only and is_host_name(host)):
            kind = "IP address" if ip_only else "IPv4 address or host name"
            raise AddressError(f"{key} has no valid {kind}: {text!r}")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise AddressError(f"{key} must end in ':port' with a decimal port, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise AddressError(f"{key} port must be in 1..65535, got {port}")
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_host_name(host: str) -> bool:
    """An RFC 1123 host name (ASCII letters, digits, hyphens; labels of 1..63)."""
    if not host or len(host) > _MAX_HOST_NAME or not host.isascii():
        return False
    labels = host.removesuffix(".").split(".")
    return all(_LABEL.fullmatch(label) for label in labels)


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, else AF_INET (a host name binds as IPv4 unless
    it resolves only to IPv6)."""
    if _is_ipv6(host):
        return socket.AF_INET6
    if _is_ipv4(host):
        return socket.AF_INET
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    families = {info[0] for info in infos}
    return socket.AF_INET if socket.AF_INET in families else socket.AF_INET6


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), bound once; IPv6
    hosts bind IPv6 only. Raises OSError if the port is taken."""
    family = family_of(host)
    return socket.create_server(
        (host, port), family=family, backlog=backlog,
        dualstack_ipv6=False,
    )


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    address, _, scope = host.partition("%")
    if "%" in host and not _SCOPE.fullmatch(scope):
        return False
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True
