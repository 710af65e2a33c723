"""Seeds found by DNS: every address a name resolves to is a seed host.

``{"dns": "name:port"}`` in SOURCE: rank ``r``'s seed listens on ``port + r`` at
each address (a Kubernetes headless Service resolves to the addresses of its ready
pods). The addresses are tried in an order drawn from this instance's id by
rendezvous (highest-random-weight) hashing, Thaler and Ravishankar, "Using name-based
mappings to increase hit rates", IEEE/ACM ToN 6(1), 1998: every rank of one instance
tries the same seed first, and instances spread evenly. Like the registry, DNS gives
candidates only: the handshake decides (see ``fleet``).
"""

import hashlib
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_ascend.model_loader.netloader.deadline import CallTimedOut, call_within
from vllm_ascend.model_loader.netloader.log import get_logger, who
from vllm_ascend.model_loader.netloader.wire.addresses import format_address

logger = get_logger(__name__)

# A name lookup that takes longer than this is a failed source (getaddrinfo has no
# timeout of its own; the resolver's is 5 s per try, resolv.conf(5)).
DNS_TIMEOUT_S = 5.0
# The most addresses one DNS name or one registry lookup contributes (each gets
# client.DISCOVERED_CONNECT_S to answer).
MAX_CANDIDATES = 8


class DiscoveryError(Exception):
    """A DNS name or a registry could not be read; the message names which."""



@dataclass(frozen=True)
class DnsSource:
    """A DNS name whose every address is a seed host: rank ``r``'s seed listens on
    ``base_port + r`` there (``{"dns": "name:port"}`` in SOURCE; e.g. a Kubernetes
    headless Service, which resolves to the addresses of its ready pods)."""

    host: str
    base_port: int

    def __str__(self) -> str:
        return format_address(self.host, self.base_port)



def resolve(host: str, timeout_s: float = DNS_TIMEOUT_S) -> list[str]:
    """Every IP address ``host`` resolves to (IPv4 and IPv6, the resolver's order,
    no duplicates). Raises ``DiscoveryError`` if the lookup fails or takes longer
    than ``timeout_s`` (the lookup then finishes in a daemon thread, unused)."""
    try:
        infos: list[Any] = call_within(
            lambda: socket.getaddrinfo(host, None, type=socket.SOCK_STREAM),
            timeout_s, f"netloader-dns-{host}",
        )
    except CallTimedOut:
        raise DiscoveryError(f"DNS name {host!r} did not resolve within {timeout_s:g} s") from None
    except (OSError, UnicodeError) as e:
        raise DiscoveryError(f"DNS name {host!r} does not resolve: {e}") from e
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        if family == socket.AF_INET6 and sockaddr[3]:
            ip = f"{ip.partition('%')[0]}%{sockaddr[3]}"
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def spread(addresses: Iterable[str], key: str) -> list[str]:
    """``addresses`` ordered by rendezvous hashing on ``key``: sha256(key, address),
    highest first. The same key gives the same order (all ranks of one instance);
    different keys give independent orders (instances spread over seeds), and adding
    or removing one address leaves the others' order unchanged."""
    return sorted(
        addresses, key=lambda a: hashlib.sha256(f"{key}\0{a}".encode()).digest(), reverse=True
    )


def expand(
    entries: Sequence[str | DnsSource],
    rank: int,
    spread_key: str,
    exclude: Iterable[str] = (),
    resolver: Callable[[str, float], list[str]] = resolve,
    timeout_s: float = DNS_TIMEOUT_S,
) -> tuple[list[str], list[str]]:
    """(seed addresses for ``rank`` in the order to try them, why a name gave none).

    A static address stays where it is; a ``DnsSource`` is replaced by its name's
    addresses at ``base_port + rank``, in ``spread`` order, at most
    ``MAX_CANDIDATES``. Addresses in ``exclude`` (this rank's own listener) and
    repeats are left out."""
    skip = set(exclude)
    addresses: list[str] = []
    notes: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            found = [entry]
        else:
            port = entry.base_port + rank
            if port > 65535:
                notes.append(f"dns {entry}: port {entry.base_port} + rank {rank} exceeds 65535")
                continue
            try:
                ips = resolver(entry.host, timeout_s)
            except DiscoveryError as e:
                notes.append(f"dns {entry}: {e}")
                continue
            found = spread([format_address(ip, port) for ip in ips], spread_key)
            found = [a for a in found if a not in skip][:MAX_CANDIDATES]
            if not found:
                notes.append(f"dns {entry}: no address but this instance's own")
            logger.info(
                "%s: %s resolved to %d seed address(es): %s",
                who(rank), entry, len(found), ", ".join(found),
            )
        for address in found:
            if address not in addresses and address not in skip:
                addresses.append(address)
    return addresses, notes
