"""Parse ``--model-loader-extra-config`` into one frozen, typed object.

Every problem is raised as ``NetloaderConfigError`` naming the offending key, at
start-up, so an operator never runs with a silently defaulted setting.
"""

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_ascend.model_loader.netloader.fleet.dns import DnsSource
from vllm_ascend.model_loader.netloader.fleet.registry import RegistryError, parse_registry_url
from vllm_ascend.model_loader.netloader.parts import PART_BYTES
from vllm_ascend.model_loader.netloader.wire.addresses import (
    AddressError,
    format_address,
    parse_address,
)
from vllm_ascend.model_loader.netloader.wire.auth import MIN_SECRET_BYTES, SECRET_ENV
from vllm_ascend.model_loader.netloader.wire.messages import DATA_PLANES, LOADED, PROCESSED

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_BUCKET_MB = 64
DEFAULT_MIN_RATE_MB_PER_S = 1.0
# The most transfers one seed (or relay) runs at once; RELAY_FANOUT is at most this.
MAX_CONCURRENT_TRANSFERS = 4
# RELAY_FANOUT's default: a chain, which uses each instance's uplink once. On links
# where every instance sends as fast as it receives, a wider tree only splits a sender's
# uplink among its children (see the developer guide's "Fan-out").
DEFAULT_RELAY_FANOUT = 1
# vllm-ascend's netloader puts a draft model's seed here above the target's port.
DRAFT_PORT_OFFSET = 10000
# INT8_CACHE values (see seed/retention.py for what each keeps where). The default is
# vllm-ascend's: a drop-in config never costs memory nobody asked for.
INT8_CACHE_MODES = ("hbm", "dram", "no")
DEFAULT_INT8_CACHE = "no"
# What a seed's send limit must move in TIMEOUT: a relay below it passes a tensor
# larger than a part on part by part as its own fetch verifies them (``seed.relay``),
# with no keepalive inside the tensor, so its clients may see a part's time at the
# seed's rate without a byte, and allow TIMEOUT of that (``planes.progress``); two
# parts leave room for the window that was already running.
_SILENCE_BYTES = 2 * PART_BYTES
# LAYOUT values: which form of the weights moves (see layout.py). "auto" moves the
# processed (runtime) layout wherever it is exact, else the loaded one.
AUTO = "auto"
LAYOUT_CHOICES = (AUTO, PROCESSED, LOADED)


class NetloaderConfigError(ValueError):
    """The Netloader extra config is invalid; the message names the key."""


@dataclass(frozen=True)
class SourceEntry:
    """The seed addresses (``host:port`` / ``[v6]:port``) of one global rank."""

    device_id: int
    sources: tuple[str, ...]


@dataclass(frozen=True)
class NetloaderConfig:
    """The extra config, parsed; see the user guide's key table for each field."""

    sources: tuple[SourceEntry | DnsSource, ...] = ()
    model: str | None = None
    listen_port: int | None = None
    output_prefix: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    bucket_mb: int = DEFAULT_BUCKET_MB
    # Cap on a seed's average send rate, to protect its own traffic; None = no cap.
    send_limit_mb_per_s: float | None = None
    # Cap on the rate a disk-loaded seed hashes its weights at after start-up
    # (``seed.preparing``), to protect its own traffic's memory bandwidth; None = no cap.
    digest_limit_mb_per_s: float | None = None
    # Every transfer ends within TIMEOUT plus its size at this average rate.
    min_rate_mb_per_s: float = DEFAULT_MIN_RATE_MB_PER_S
    # Shared secret from SECRET_FILE or $NETLOADER_SECRET; kept out of repr and logs.
    secret: bytes | None = field(default=None, repr=False)
    # A speculative decoder's draft model has seeds and a listener of its own.
    # None: not set (derived from SOURCE); () set empty (the draft loads from disk).
    draft_sources: tuple[SourceEntry | DnsSource, ...] | None = None
    draft_listen_port: int | None = None
    # Listen before the fetch and pass verified tensors on to the clients a busy seed
    # sends here (see relay.RelayListener).
    relay: bool = True
    # How many clients a seed sends to itself before it sends further clients on to
    # relays, and how many to each relay: 1 a chain, more a tree of that fan-out whose
    # depth grows as log N (see seed/relay.py ``RelayTree``).
    relay_fanout: int = DEFAULT_RELAY_FANOUT
    # "tcp" (bulk data on the handshake connection) or "collective" (a two-rank group);
    # None: tcp for host memory, collective for device memory.
    data_plane: str | None = None
    # The checkpoint or value fingerprint a seed's weights must have (a node without
    # weight files names the weights it accepts this way).
    expected_fingerprint: str | None = None
    # The same for a speculative decoder's draft model (see ``loader``: a draft that is
    # the target's own checkpoint takes EXPECTED_FINGERPRINT).
    draft_expected_fingerprint: str | None = None
    # Where seeds register and clients look them up ("redis://host:port/db"); a hint,
    # never a trust decision (see fleet/registry.py).
    registry: str | None = None
    # Ship vLLM's compile cache with the weights: None ("auto") only between instances
    # that share a secret, True also without one (an explicit opt-in), False never.
    compile_cache: bool | None = None
    # Where a seed keeps the loaded copy of tensors that processing replaced ("hbm",
    # "dram", "no"), and which names that covers (None: all); see seed/retention.py.
    int8_cache: str = DEFAULT_INT8_CACHE
    int8_cache_name: tuple[str, ...] | None = None
    # Which layout moves: "auto" (processed where exact, else loaded), "processed" (never
    # the loaded one), "loaded" (as before the processed layout existed); see layout.py.
    layout: str = AUTO

    def compile_cache_enabled(self) -> bool:
        """Whether this instance fetches (as a client) and serves (as a seed) its
        compile cache: with COMPILE_CACHE "auto" only when a shared secret is set, as
        the cache is code that the receiving instance runs."""
        if self.compile_cache is None:
            return self.secret is not None
        return self.compile_cache

    def sources_for_rank(
        self, rank: int, draft: bool = False
    ) -> tuple[str | DnsSource, ...]:
        """Seed addresses for global rank ``rank`` (for its draft model if ``draft``),
        in the order to try them; a ``DnsSource`` stands for every address its name
        resolves to at load time (``fleet.dns.expand``)."""
        found: list[str | DnsSource] = []
        for entry in self._draft_sources() if draft else self.sources:
            if isinstance(entry, DnsSource):
                found.append(entry)
            elif entry.device_id == rank:
                found.extend(entry.sources)
        return tuple(found)

    def _draft_sources(self) -> tuple[SourceEntry | DnsSource, ...]:
        """DRAFT_SOURCE, else SOURCE with every port moved up by DRAFT_PORT_OFFSET:
        where a seed whose draft listener took the default port has it (the layout
        vllm-ascend's netloader uses)."""
        if self.draft_sources is not None:
            return self.draft_sources
        moved: list[SourceEntry | DnsSource] = []
        for entry in self.sources:
            if isinstance(entry, DnsSource):
                if entry.base_port + DRAFT_PORT_OFFSET <= 65535:
                    moved.append(DnsSource(entry.host, entry.base_port + DRAFT_PORT_OFFSET))
                continue
            addresses = []
            for address in entry.sources:
                host, port = parse_address(address)
                if port + DRAFT_PORT_OFFSET <= 65535:
                    addresses.append(format_address(host, port + DRAFT_PORT_OFFSET))
            if addresses:
                moved.append(SourceEntry(entry.device_id, tuple(addresses)))
        return tuple(moved)

    def listen_port_for_rank(self, rank: int, draft: bool = False) -> int:
        """Port for rank ``rank``'s seed listener (its draft model's if ``draft``);
        0 asks the OS for a free one. A draft without DRAFT_LISTEN_PORT listens on
        LISTEN_PORT + DRAFT_PORT_OFFSET + rank, as vllm-ascend's netloader does."""
        key, base = ("DRAFT_LISTEN_PORT", self.draft_listen_port) if draft else (
            "LISTEN_PORT", self.listen_port)
        offset = 0
        if draft and base is None and self.listen_port is not None:
            key, base, offset = "LISTEN_PORT", self.listen_port, DRAFT_PORT_OFFSET
        if base is None:
            return 0
        port = base + offset + rank
        if port > 65535:
            plus = f" + {offset} (draft)" if offset else ""
            raise NetloaderConfigError(
                f"{key} {base}{plus} + rank {rank} = {port} exceeds 65535"
            )
        return port


def parse_config(extra: Any, environ: Mapping[str, str] = os.environ) -> NetloaderConfig:
    """Build a ``NetloaderConfig``; ``CONFIG_FILE`` values win over inline keys, and
    ``SECRET_FILE`` wins over ``$NETLOADER_SECRET``."""
    if extra is not None and not isinstance(extra, dict):
        raise NetloaderConfigError("model loader extra config must be a JSON object")
    raw = _canonical_keys(dict(extra or {}), "the extra config")
    config_file = raw.pop("CONFIG_FILE", None)
    if config_file is not None:
        raw.update(_canonical_keys(_read_config_file(config_file), f"CONFIG_FILE {config_file!r}"))
    if "SECRET" in raw:
        # vLLM logs its whole config, the extra config included, at start-up.
        raise NetloaderConfigError(
            f"SECRET must not be given inline (vLLM logs the extra config); "
            f"put it in a file named by SECRET_FILE or in ${SECRET_ENV}"
        )
    secret = _read_secret(raw.pop("SECRET_FILE")) if "SECRET_FILE" in raw else None
    if secret is None and environ.get(SECRET_ENV) is not None:
        secret = _checked_secret(environ[SECRET_ENV].strip().encode(), f"${SECRET_ENV}")
    unknown = sorted(set(raw) - _PARSERS.keys())
    if unknown:
        raise NetloaderConfigError(
            f"unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted([*_PARSERS, 'CONFIG_FILE', 'SECRET_FILE']))}"
        )
    fields: dict[str, Any] = {"secret": secret}
    for key, value in raw.items():
        name, parse = _PARSERS[key]
        fields[name] = parse(value)
    config = NetloaderConfig(**fields)
    limit = config.send_limit_mb_per_s
    if limit is not None and limit * config.timeout_s < _SILENCE_BYTES / 1e6:
        raise NetloaderConfigError(
            f"SEND_LIMIT_MB_PER_S {limit:g} moves less than 8 MiB in TIMEOUT "
            f"{config.timeout_s:g} s: a relay below this seed passes large tensors on in "
            f"4 MiB parts at about this rate, and its clients count TIMEOUT without a byte "
            f"as no progress; raise one of them"
        )
    if limit is not None and limit < config.min_rate_mb_per_s:
        raise NetloaderConfigError(
            f"SEND_LIMIT_MB_PER_S {limit:g} is below MIN_RATE_MB_PER_S "
            f"{config.min_rate_mb_per_s:g}: clients would give up on this seed's transfers; "
            f"lower MIN_RATE_MB_PER_S (on seeds and clients) below the send limit"
        )
    return config


def _canonical_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with every key in its uppercase spelling: vllm-ascend's netloader takes
    its keys in either case (``listen_port`` is ``LISTEN_PORT``). Two spellings of one
    key are an error that names both; an unknown key stays as it is (and is refused by
    name later)."""
    known = {*_PARSERS, "CONFIG_FILE", "SECRET_FILE", "SECRET"}
    canonical: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        upper = key.upper() if isinstance(key, str) and key.upper() in known else key
        if upper in spelled:
            raise NetloaderConfigError(
                f"{where} gives {spelled[upper]!r} and {key!r}, two spellings of {upper}: "
                f"keep one"
            )
        spelled[upper] = key
        canonical[upper] = value
    return canonical


def _read_config_file(path: Any) -> dict[str, Any]:
    if not isinstance(path, str) or not path:
        raise NetloaderConfigError("CONFIG_FILE must be a non-empty path string")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise NetloaderConfigError(f"CONFIG_FILE {path!r} cannot be read: {e}") from e
    except json.JSONDecodeError as e:
        raise NetloaderConfigError(f"CONFIG_FILE {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise NetloaderConfigError(f"CONFIG_FILE {path!r} must hold a JSON object")
    if any(isinstance(k, str) and k.upper() == "CONFIG_FILE" for k in data):
        raise NetloaderConfigError(f"CONFIG_FILE {path!r} must not name another CONFIG_FILE")
    return data


def _parse_sources(value: Any, key: str = "SOURCE") -> tuple[SourceEntry | DnsSource, ...]:
    if not isinstance(value, list):
        raise NetloaderConfigError(
            f'{key} must be a list of {{"device_id": <rank>, "sources": ["ip:port", ...]}} '
            f'or {{"dns": "name:port"}}'
        )
    entries: list[SourceEntry | DnsSource] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, dict) and set(item) == {"dns"}:
            try:
                host, port = parse_address(item["dns"], key=f"{where}.dns")
            except AddressError as e:
                raise NetloaderConfigError(str(e)) from e
            entries.append(DnsSource(host, port))
            continue
        if not isinstance(item, dict) or set(item) != {"device_id", "sources"}:
            raise NetloaderConfigError(
                f'{where} must be an object with exactly "device_id" and "sources", '
                f'or exactly "dns"'
            )
        device_id = item["device_id"]
        if not _is_int(device_id) or device_id < 0:
            raise NetloaderConfigError(f"{where}.device_id must be an integer >= 0")
        addrs = item["sources"]
        if not isinstance(addrs, list) or not addrs:
            raise NetloaderConfigError(f"{where}.sources must be a non-empty list")
        for j, addr in enumerate(addrs):
            try:
                parse_address(addr, key=f"{where}.sources[{j}]")
            except AddressError as e:
                raise NetloaderConfigError(str(e)) from e
        entries.append(SourceEntry(device_id, tuple(addrs)))
    return tuple(entries)


def _parse_model(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise NetloaderConfigError("MODEL must be a non-empty string")
    return value


def _parse_listen_port(value: Any, key: str = "LISTEN_PORT") -> int:
    if not _is_int(value) or not 1 <= value <= 65535:
        raise NetloaderConfigError(f"{key} must be an integer in 1..65535, got {value!r}")
    return int(value)


def _parse_output_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise NetloaderConfigError("OUTPUT_PREFIX must be a non-empty string")
    parent = os.path.dirname(value) or "."
    if not os.path.isdir(parent):
        raise NetloaderConfigError(f"OUTPUT_PREFIX directory {parent!r} does not exist")
    return value


def _parse_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise NetloaderConfigError(
            f"TIMEOUT must be a number of seconds in (0, 3600], got {value!r}"
        )
    return float(value)


def _parse_bucket_mb(value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= 1024:
        raise NetloaderConfigError(f"BUCKET_MB must be an integer in 1..1024, got {value!r}")
    return int(value)


def _parse_send_limit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise NetloaderConfigError(
            f"SEND_LIMIT_MB_PER_S must be a positive number of MB/s, got {value!r}"
        )
    return float(value)


def _parse_digest_limit(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value < float("inf")):
        raise NetloaderConfigError(
            f"DIGEST_LIMIT_MB_PER_S must be a positive number of MB/s, got {value!r}"
        )
    return float(value)


def _parse_min_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise NetloaderConfigError(
            f"MIN_RATE_MB_PER_S must be a positive number of MB/s, got {value!r}"
        )
    return float(value)


def _parse_relay(value: Any) -> bool:
    if not isinstance(value, bool):
        raise NetloaderConfigError(f"RELAY must be true or false, got {value!r}")
    return value


def _parse_relay_fanout(value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_CONCURRENT_TRANSFERS:
        raise NetloaderConfigError(
            f"RELAY_FANOUT must be an integer in 1..{MAX_CONCURRENT_TRANSFERS} (clients "
            f"a seed or relay sends to at once; 1 is a chain), got {value!r}"
        )
    return int(value)


def _parse_data_plane(value: Any) -> str:
    if value not in DATA_PLANES:
        raise NetloaderConfigError(
            f"DATA_PLANE must be one of {', '.join(map(repr, DATA_PLANES))}, got {value!r}"
        )
    return str(value)


def _parse_fingerprint(value: Any, key: str = "EXPECTED_FINGERPRINT") -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise NetloaderConfigError(
            f"{key} must be 64 lowercase hex digits (a seed's "
            f"checkpoint or value fingerprint, from netloader-query), got {value!r}"
        )
    return value


def _parse_registry(value: Any) -> str:

    try:
        parse_registry_url(value)
    except RegistryError as e:
        raise NetloaderConfigError(f"REGISTRY: {e}") from e
    return str(value)


def _parse_compile_cache(value: Any) -> bool | None:
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise NetloaderConfigError(
            f'COMPILE_CACHE must be "auto", true or false, got {value!r}'
        )
    return value


def _parse_int8_cache(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in INT8_CACHE_MODES:
        raise NetloaderConfigError(
            f"INT8_CACHE must be one of {', '.join(map(repr, INT8_CACHE_MODES))}, got {value!r}"
        )
    return value.lower()


def _parse_layout(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LAYOUT_CHOICES:
        raise NetloaderConfigError(
            f"LAYOUT must be one of {', '.join(map(repr, LAYOUT_CHOICES))}, got {value!r}"
        )
    return value.lower()


def _parse_int8_cache_name(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    # An empty list would keep nothing: that is INT8_CACHE "no", said plainly.
    if not isinstance(value, list) or not value or not all(
        isinstance(n, str) and n for n in value
    ):
        raise NetloaderConfigError(
            f"INT8_CACHE_NAME must be a non-empty list of parameter name fragments "
            f"or null (to keep nothing, set INT8_CACHE \"no\"), got {value!r}"
        )
    return tuple(value)


def _read_secret(path: Any) -> bytes:
    if not isinstance(path, str) or not path:
        raise NetloaderConfigError("SECRET_FILE must be a non-empty path string")
    try:
        with open(path, "rb") as f:
            return _checked_secret(f.read().strip(), f"SECRET_FILE {path!r}")
    except OSError as e:
        raise NetloaderConfigError(f"SECRET_FILE {path!r} cannot be read: {e.strerror}") from e


def _checked_secret(secret: bytes, where: str) -> bytes:
    """Messages name where the secret came from, never its value."""
    if len(secret) < MIN_SECRET_BYTES:
        raise NetloaderConfigError(
            f"the shared secret from {where} must be at least {MIN_SECRET_BYTES} bytes "
            f"(got {len(secret)}); e.g. `openssl rand -hex 32`"
        )
    return secret


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# key -> (NetloaderConfig field, parser)
_PARSERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "SOURCE": ("sources", _parse_sources),
    "MODEL": ("model", _parse_model),
    "LISTEN_PORT": ("listen_port", _parse_listen_port),
    "OUTPUT_PREFIX": ("output_prefix", _parse_output_prefix),
    "TIMEOUT": ("timeout_s", _parse_timeout),
    "BUCKET_MB": ("bucket_mb", _parse_bucket_mb),
    "SEND_LIMIT_MB_PER_S": ("send_limit_mb_per_s", _parse_send_limit),
    "MIN_RATE_MB_PER_S": ("min_rate_mb_per_s", _parse_min_rate),
    "DIGEST_LIMIT_MB_PER_S": ("digest_limit_mb_per_s", _parse_digest_limit),
    "DRAFT_SOURCE": ("draft_sources", functools.partial(_parse_sources, key="DRAFT_SOURCE")),
    "RELAY": ("relay", _parse_relay),
    "RELAY_FANOUT": ("relay_fanout", _parse_relay_fanout),
    "DATA_PLANE": ("data_plane", _parse_data_plane),
    "EXPECTED_FINGERPRINT": ("expected_fingerprint", _parse_fingerprint),
    "DRAFT_EXPECTED_FINGERPRINT": (
        "draft_expected_fingerprint",
        functools.partial(_parse_fingerprint, key="DRAFT_EXPECTED_FINGERPRINT"),
    ),
    "REGISTRY": ("registry", _parse_registry),
    "COMPILE_CACHE": ("compile_cache", _parse_compile_cache),
    "INT8_CACHE": ("int8_cache", _parse_int8_cache),
    "INT8_CACHE_NAME": ("int8_cache_name", _parse_int8_cache_name),
    "LAYOUT": ("layout", _parse_layout),
    "DRAFT_LISTEN_PORT": (
        "draft_listen_port", functools.partial(_parse_listen_port, key="DRAFT_LISTEN_PORT")
    ),
}
