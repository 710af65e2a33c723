"""Seeds found in a registry (``REGISTRY: "redis://host:port/db"``).

Each seed publishes a record (address, rank, role, checkpoint fingerprint, active
transfers, relaying) under its model key, refreshed every ``HEARTBEAT_S`` with a
time-to-live of ``RECORD_TTL_S``, and withdraws it when it stops; a client reads the
live records of its own model key, role and rank and tries the least loaded first.
``Registry`` is the interface a store implements; ``RedisRegistry`` is the one there
is. A record is a candidate only: the handshake decides (see ``fleet``).
"""

import contextlib
import hashlib
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vllm_ascend.model_loader.netloader.deadline import CallTimedOut, call_within
from vllm_ascend.model_loader.netloader.fleet.dns import MAX_CANDIDATES, DiscoveryError, spread
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.wire.addresses import (
    AddressError,
    format_address,
    parse_address,
)

logger = get_logger(__name__)

HEARTBEAT_S = 5.0
RECORD_TTL_S = 15.0
# Each socket read or connect of a registry command (redis-py's socket timeouts), and
# the wall-clock deadline of a whole registry operation (a lookup, a publish, a
# withdrawal, the name lookup of the registry's host included): a registry that drips
# its answer is cut off there.
REGISTRY_TIMEOUT_S = 2.0
REGISTRY_DEADLINE_S = 5.0
_MAX_RECORD_BYTES = 4096
# The most records one lookup reads (``Registry.find``'s ``most``): 128 KiB at most.
MAX_RECORDS_READ = 32
_MAX_MEMBER_BYTES = 64
# One round trip, with every size bounded on the server: drop expired members, take
# the freshest (highest expiry), and at most _MAX_RECORD_BYTES + 1 of each record (so
# an over-long one is seen as such and skipped). KEYS[1]: the index; ARGV: the most
# members, the record key prefix, the longest member, the longest record.
_FIND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, m in ipairs(members) do
  if string.len(m) <= tonumber(ARGV[3]) then
    local v = redis.call('GETRANGE', ARGV[2] .. m, 0, tonumber(ARGV[4]))
    table.insert(out, m)
    table.insert(out, v)
  end
end
return out
"""
_KEY_PREFIX = "netloader"
# Identity fields that differ between the seeds one client may use: rank and role are
# looked up separately, and a node without weight files has no checkpoint fingerprint
# (records carry it, and the handshake compares it), nor an exact one (the handshake
# compares it where both sides have one; the key stays what older releases publish).
NOT_IN_MODEL_KEY = ("rank", "role", "checkpoint", "checkpoint_exact")


class RegistryError(DiscoveryError):
    """A registry URL is malformed or the registry cannot be reached."""


def model_key(identity: dict[str, Any]) -> str:
    """sha256 (hex) of the identity without rank, role and checkpoint: the seeds of one
    model, software and layout of ranks share it (see identity.IDENTITY_FIELDS)."""
    kept = {k: v for k, v in identity.items() if k not in NOT_IN_MODEL_KEY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class SeedRecord:
    """What a seed publishes about itself: a hint for clients, never trusted."""

    address: str
    rank: int
    role: str
    # checkpoint fingerprint (None: the seed's node had no weight files)
    checkpoint: str | None
    active_transfers: int = 0
    relaying: bool = False
    # The seed's ``model_key`` (its layout included), set on a record published under
    # a key without the layout (``fleet.layouts``): clients skip their own layout's.
    layout_key: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str) -> "SeedRecord":
        """Parse a record read from the registry; ValueError for anything malformed
        (the registry is shared: its content is as hostile as a peer's)."""
        if len(data) > _MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(data)} bytes")
        try:
            raw = json.loads(data)
        except Exception as e:  # noqa: BLE001 - RecursionError, UnicodeDecodeError...: all one bad record
            raise ValueError(f"not JSON: {type(e).__name__}") from e
        if not isinstance(raw, dict):
            raise ValueError("record is not an object")
        address, rank, role = raw.get("address"), raw.get("rank"), raw.get("role")
        checkpoint, active = raw.get("checkpoint"), raw.get("active_transfers", 0)
        try:
            parse_address(address, key="record address", ip_only=True)
        except AddressError as e:
            raise ValueError(str(e)) from e
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0):
            raise ValueError(f"rank {rank!r}")
        if not isinstance(role, str) or len(role) > 16:
            raise ValueError(f"role {role!r:.40}")
        if checkpoint is not None and not (isinstance(checkpoint, str) and len(checkpoint) == 64):
            raise ValueError(f"checkpoint {checkpoint!r:.80}")
        if not (isinstance(active, int) and not isinstance(active, bool) and active >= 0):
            raise ValueError(f"active_transfers {active!r:.40}")
        layout_key = raw.get("layout_key")
        if layout_key is not None and not (isinstance(layout_key, str) and len(layout_key) == 64):
            raise ValueError(f"layout_key {layout_key!r:.80}")
        return cls(str(address), rank, role, checkpoint, active, raw.get("relaying") is True,
                   layout_key)


class Registry(Protocol):
    """A store where seeds announce themselves. Every method raises ``RegistryError``
    (and only that) when the store cannot be used, within a bounded time."""

    name: str

    def publish(self, key: str, record: SeedRecord, ttl_s: float) -> None:
        """Add or refresh ``record`` under model ``key``, live for ``ttl_s`` seconds."""

    def withdraw(self, key: str, record: SeedRecord) -> None:
        """Remove ``record`` (its seed stopped)."""

    def find(self, key: str, role: str, rank: int,
             most: int = MAX_CANDIDATES) -> list[SeedRecord]:
        """The live records of model ``key``, ``role`` and ``rank``, at most ``most``
        (the freshest), in no particular order."""


def parse_registry_url(url: Any) -> tuple[str, int, int]:
    """``redis://host:port/db`` -> (host, port, db); port defaults to 6379, db to 0.
    Raises ``RegistryError`` naming what is wrong."""
    if not isinstance(url, str) or not url:
        raise RegistryError(f"must be a URL 'redis://host:port/db', got {url!r:.100}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis":
        raise RegistryError(f"only redis:// registries are supported, got {url!r:.100}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise RegistryError(
            "the URL must not carry credentials or options (use the network's access "
            f"control; credentials would be logged with the extra config): {url!r:.100}"
        )
    try:
        host, port = parts.hostname, parts.port
        port = 6379 if port is None else port
    except ValueError as e:
        raise RegistryError(f"bad port in {url!r:.100}: {e}") from e
    if not host:
        raise RegistryError(f"no host in {url!r:.100}")
    try:
        parse_address(format_address(host, port), key="REGISTRY host")
    except AddressError as e:
        raise RegistryError(str(e)) from e
    db_text = parts.path.strip("/") or "0"
    if not (db_text.isascii() and db_text.isdigit() and int(db_text) < 16):
        raise RegistryError(f"database must be a number in 0..15, got {db_text!r:.20}")
    return host, port, int(db_text)


def open_registry(url: str, timeout_s: float = REGISTRY_TIMEOUT_S) -> Registry:
    """The registry at ``url`` (see ``parse_registry_url``); connects lazily."""
    return RedisRegistry(url, timeout_s)


class RedisRegistry:
    """Seed records in Redis: one string key per seed (JSON, expiring after the TTL)
    and one sorted set per (model key, role, rank) whose scores are the records'
    expiry times in the server's clock (``TIME``), so clients' and seeds' clocks never
    matter. Every operation ends within ``deadline_s`` (no retries); whatever the
    server answers is bounded in size by the lookup script."""

    def __init__(
        self, url: str, timeout_s: float = REGISTRY_TIMEOUT_S,
        deadline_s: float = REGISTRY_DEADLINE_S,
    ):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        host, port, db = parse_registry_url(url)
        self.name = url
        self._deadline_s = deadline_s
        # Each operation gets a connection of its own, so that closing one whose answer
        # outlasted its deadline never breaks another thread's operation.
        self._connect: Callable[[], Any] = lambda: redis.Redis(
            host=host, port=port, db=db, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
        )

    def publish(self, key: str, record: SeedRecord, ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)

        def run(r: Any) -> None:
            seconds, micros = r.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            index = self._index(key, record.role, record.rank)
            pipe = r.pipeline(transaction=True)
            pipe.set(self._record(key, record), record.to_json(), px=ttl_ms)
            pipe.zadd(index, {record.address: now_ms + ttl_ms})
            pipe.pexpire(index, ttl_ms)
            pipe.execute()

        self._call("publish", run)

    def withdraw(self, key: str, record: SeedRecord) -> None:
        def run(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.zrem(self._index(key, record.role, record.rank), record.address)
            pipe.delete(self._record(key, record))
            pipe.execute()

        self._call("withdraw", run)

    def find(self, key: str, role: str, rank: int,
             most: int = MAX_CANDIDATES) -> list[SeedRecord]:
        prefix = self._record(key, SeedRecord("", rank, role, None))
        most = max(1, min(int(most), MAX_RECORDS_READ))

        def run(r: Any) -> list[Any]:
            reply = r.eval(
                _FIND_SCRIPT, 1, self._index(key, role, rank),
                most, prefix, _MAX_MEMBER_BYTES, _MAX_RECORD_BYTES,
            )
            return reply if isinstance(reply, list) else []  # type: ignore[return-value]

        reply = self._call("lookup", run)
        records = []
        for member, value in zip(reply[0::2], reply[1::2], strict=False):
            if not (isinstance(member, bytes) and len(member) <= _MAX_MEMBER_BYTES
                    and isinstance(value, bytes)):
                continue  # not what the script returns: not a registry we understand
            address = member.decode("utf-8", "replace")
            if not value:
                continue  # expired between the index and the record
            try:
                record = SeedRecord.from_json(value)
            except ValueError as e:
                logger.warning("Netloader registry %s: record of %r ignored: %s",
                               self.name, address, e)
                continue
            if (record.address, record.rank, record.role) == (address, rank, role):
                records.append(record)
        return records

    def _call(self, what: str, run: Callable[[Any], Any]) -> Any:
        """``run(client)`` in a helper thread on a connection of its own, ended by
        ``deadline_s``: redis-py's socket timeouts bound each read, not a command whose
        reply drips. On the deadline that connection is closed under the helper, which
        then ends with an error."""
        clients: list[Any] = []  # made in the helper: connecting is part of the deadline

        def call() -> Any:
            try:
                clients.append(self._connect())
                return run(clients[0])
            finally:
                for client in clients:
                    with contextlib.suppress(Exception):
                        client.close()

        def close_under_it() -> None:
            for client in list(clients):
                with contextlib.suppress(Exception):  # best effort; the helper is a daemon
                    client.close()

        try:
            return call_within(call, self._deadline_s, f"netloader-registry-{what}",
                               on_timeout=close_under_it)
        except CallTimedOut:
            raise RegistryError(
                f"registry {self.name}: {what} failed: no answer within {self._deadline_s:g} s"
            ) from None
        except Exception as e:  # noqa: BLE001 - any answer of a registry is one failed operation
            raise RegistryError(
                f"registry {self.name}: {what} failed: {type(e).__name__}: {e}"
            ) from e

    @staticmethod
    def _index(key: str, role: str, rank: int) -> str:
        return f"{_KEY_PREFIX}:seeds:{key}:{role}:{rank}"

    @staticmethod
    def _record(key: str, record: SeedRecord) -> str:
        return f"{_KEY_PREFIX}:seed:{key}:{record.role}:{record.rank}:{record.address}"


def registry_candidates(
    registry: Registry,
    identity: dict[str, Any],
    spread_key: str,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Addresses of the live seeds of exactly ``identity``'s model, role and rank,
    least loaded first (active transfers, then not relaying, then ``spread`` order).

    A record whose checkpoint fingerprint differs from this node's is left out (a node
    without weight files keeps them all: its EXPECTED_FINGERPRINT may be a value
    fingerprint, which the handshake checks). Raises ``RegistryError``."""
    records = registry.find(model_key(identity), identity["role"], identity["rank"])
    return least_loaded(records, identity.get("checkpoint"), spread_key, exclude)


def least_loaded(
    records: Iterable[SeedRecord], checkpoint: str | None, spread_key: str,
    exclude: Iterable[str] = (),
) -> list[str]:
    """The addresses of ``records`` not in ``exclude`` whose checkpoint fingerprint is
    ``checkpoint``'s (or unknown on either side), least loaded first (active
    transfers, then not relaying, then ``spread`` order on ``spread_key``)."""
    skip = set(exclude)
    kept = [
        r for r in records
        if r.address not in skip and (checkpoint is None or r.checkpoint in (None, checkpoint))
    ]
    order = {a: i for i, a in enumerate(spread([r.address for r in kept], spread_key))}
    kept.sort(key=lambda r: (r.active_transfers, r.relaying, order[r.address]))
    return [r.address for r in kept]


class Announcer:
    """Keeps one seed's record in a registry: publishes it now and every
    ``interval_s`` (the record read fresh from ``describe`` each time), withdraws it on
    ``stop``; and the same for each (key, describe) of ``also`` (its record for clients
    of other layouts, ``fleet.layouts``), in the same heartbeat. A registry that fails
    is logged once when it starts and once when it stops failing; the seed serves on
    either way."""

    def __init__(
        self,
        registry: Registry,
        key: str,
        describe: Callable[[], SeedRecord],
        interval_s: float = HEARTBEAT_S,
        ttl_s: float = RECORD_TTL_S,
        also: Sequence[tuple[str, Callable[[], SeedRecord]]] = (),
    ):
        self._registry = registry
        self._records = [(key, describe), *also]
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._stopped = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="netloader-announce", daemon=True)

    def start(self) -> "Announcer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop heartbeats and withdraw the records (best effort: a registry that is
        down lets them expire after the TTL; the first failed withdrawal ends it, so
        a dead registry costs one deadline)."""
        self._stopped.set()
        self._thread.join(timeout=REGISTRY_DEADLINE_S)
        for key, describe in self._records:
            try:
                self._registry.withdraw(key, describe())
            except Exception as e:  # noqa: BLE001 - RegistryError, or a registry's bug: the record expires
                logger.warning("Netloader: cannot withdraw seed record (%s); it expires in %g s",
                               e, self._ttl_s)
                return

    def _run(self) -> None:
        while not self._stopped.is_set():
            record = self._records[0][1]()
            try:
                # Every record (the first that fails raises: the registry is down).
                self._registry.publish(self._records[0][0], record, self._ttl_s)
                for key, describe in self._records[1:]:
                    self._registry.publish(key, describe(), self._ttl_s)
            except RegistryError as e:
                if not self._failing:
                    logger.warning("Netloader seed %s: %s; serving on, retrying every %g s",
                                   record.address, e, self._interval_s)
                self._failing = True
            except Exception:  # noqa: BLE001 - a heartbeat bug must never reach the worker
                logger.exception("Netloader seed %s: registry heartbeat failed", record.address)
            else:
                if self._failing:
                    logger.info("Netloader seed %s: registered in %s again",
                                record.address, self._registry.name)
                self._failing = False
            self._stopped.wait(self._interval_s)
