"""The wire: control frames, bulk-data frames, and every message type. No torch.

Control frame: ``MAGIC | version (u8) | length (u32, big endian) | JSON object``.
The reader passes the most it will accept (``max_bytes``): the header is checked
against it before anything is allocated, so a peer cannot make this side read or
parse more than the exchange needs. A seed never reads more than
``MAX_REQUEST_BYTES`` from a client, before authentication or after.

Every read and write runs under a ``Deadline`` (wall clock for the whole exchange),
not a per-call timeout, so a peer that sends one byte just before each timeout
does not keep a connection for ever.

Bulk data (the host data plane) follows an ``accept`` on the same connection: each
bucket is ``DATA_MAGIC | index (u32) | length (u64)`` then ``length`` bytes, and both
sides know the plan, so the receiver checks index and length before it reads a byte
of payload. A sender that cannot go on sends an abort header (index ``ABORT``) and a
short UTF-8 reason.

Each message type is built by one function and parsed by one function below; the
parsers turn every malformed, mistyped or out-of-range field into ``ProtocolError``.
"""

import contextlib
import json
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from vllm_ascend.model_loader.netloader.addresses import AddressError, parse_address
from vllm_ascend.model_loader.netloader.load_state import NO_STATE, LoadState, LoadStateError

MAGIC = b"NLDR"
PROTOCOL_VERSION = 2
_HEADER = struct.Struct("!4sBI")
# Everything a seed reads from a peer: the request, the 'done', rendezvous records.
MAX_REQUEST_BYTES = 8 * 1024
# A seed's answers that grow with the model: a fixed part, plus per tensor room for a
# digest (an accept: 67 bytes are needed) or a manifest entry (a manifest reply).
REPLY_FIXED_BYTES = 1 << 20
DIGEST_BYTES_PER_TENSOR = 128
MANIFEST_BYTES_PER_TENSOR = 512
DATA_MAGIC = b"NLDB"
_DATA_HEADER = struct.Struct("!4sIQ")
ABORT = 0xFFFFFFFF
KEEPALIVE = 0xFFFFFFFE
MAX_ABORT_REASON_BYTES = 1024
# How long, and how much, a last message waits for the peer to stop sending.
_LINGER_S = 1.0
_LINGER_BYTES = 1 << 20
_NONCE = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A compile cache request: at most this many cache names (vLLM's per-module hashes,
# one per KV cache layout it may resolve to), a rank directory like vLLM's.
MAX_CACHE_NAMES = 16
_RANK_DIR = re.compile(r"rank_[0-9]{1,6}_[0-9]{1,6}")
# One component of a compile cache file's path: no leading dot (so never "." or ".."),
# no separator, a length any file system takes.
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_CACHE_PATH_DEPTH = 6
# A reason read from a peer, as it may appear in a log line; one this side sends stays
# far below MAX_REQUEST_BYTES even when every character needs a 6-byte JSON escape.
_MAX_REASON_CHARS = 1000

# Message types. A connection opens with the seed's CHALLENGE; the client then sends
# HELLO (to receive weights), INFO (what the seed serves) or MANIFEST (the seed's
# tensor list, to explain a manifest refusal). The seed answers HELLO with ACCEPT,
# REDIRECT (to a relay) or REFUSE; after the bulk data the client sends DONE.
# STORE carries a collective group's rendezvous records (see ``collective``).
# COMPILE_CACHE asks for the seed's vLLM compile artifacts (see ``compile_cache``): the
# seed answers with the file list, then sends each file as a bulk-data bucket.
CHALLENGE = "challenge"
HELLO = "hello"
INFO = "info"
MANIFEST = "manifest"
ACCEPT = "accept"
REDIRECT = "redirect"
REFUSE = "refuse"
DONE = "done"
STORE = "store"
COMPILE_CACHE = "compile_cache"
REQUESTS = (HELLO, INFO, MANIFEST, COMPILE_CACHE)
# Data planes a seed can use: bulk data on this connection, or a two-rank collective
# group (gloo on CPU, nccl on CUDA, hccl on Ascend).
TCP = "tcp"
COLLECTIVE = "collective"
DATA_PLANES = (TCP, COLLECTIVE)


class ProtocolError(Exception):
    """The peer sent something this side cannot accept, or went away."""


class DeadlineExceeded(ProtocolError):
    """An exchange did not finish within its wall-clock deadline."""


class Deadline:
    """A wall-clock deadline for one exchange, ``seconds`` from now."""

    def __init__(self, seconds: float, what: str):
        self.seconds = seconds
        self.what = what
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises ``DeadlineExceeded`` once there are none."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{self.what} took longer than {self.seconds:g} s")
        return left


# --- framing ---------------------------------------------------------------------


def send_msg(sock: socket.socket, msg: dict[str, Any], deadline: Deadline) -> None:
    payload = json.dumps(msg, separators=(",", ":")).encode()
    sock.settimeout(deadline.remaining())
    try:
        sock.sendall(_HEADER.pack(MAGIC, PROTOCOL_VERSION, len(payload)) + payload)
    except TimeoutError as e:
        raise DeadlineExceeded(
            f"{deadline.what} took longer than {deadline.seconds:g} s (the peer does not read)"
        ) from e


def send_last(sock: socket.socket, msg: dict[str, Any], deadline: Deadline) -> None:
    """Send ``msg`` as the last frame of a connection whose peer may have sent more.

    Closing a socket with unread input makes the kernel answer with a reset, which
    can destroy the message before the peer reads it. So this side stops writing,
    then discards what still arrives until the peer closes, for at most ``_LINGER_S``
    and ``_LINGER_BYTES``; a peer that keeps sending gets the reset."""
    with contextlib.suppress(OSError, ProtocolError):  # the peer may be gone; nothing to save
        send_msg(sock, msg, deadline)
        linger = Deadline(_LINGER_S, "linger")
        sock.shutdown(socket.SHUT_WR)
        left = _LINGER_BYTES
        while left > 0:
            sock.settimeout(linger.remaining())
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)


def recv_msg(
    sock: socket.socket, deadline: Deadline, max_bytes: int, expect: str | None = None
) -> dict[str, Any]:
    """Read one frame of at most ``max_bytes`` payload; if ``expect`` is given, the
    message must be of that type (a REFUSE raises with its reason)."""
    magic, version, length = _HEADER.unpack(recv_exact(sock, _HEADER.size, deadline))
    if magic != MAGIC:
        raise ProtocolError(f"not a Netloader peer (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte cap")
    try:
        msg = json.loads(recv_exact(sock, length, deadline))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; deep nesting
        # exhausts the parser's recursion.
        raise ProtocolError(f"frame is not acceptable JSON: {str(e)[:200]}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    if expect is not None and msg["type"] != expect:
        detail = f": {text(msg, 'reason')}" if msg["type"] == REFUSE else ""
        raise ProtocolError(f"expected '{expect}', got '{clean(msg['type'], 40)}'{detail}")
    return msg


def recv_exact(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def recv_into(sock: socket.socket, view: memoryview, deadline: Deadline) -> None:
    """Fill ``view`` from ``sock`` before ``deadline``."""
    got, n = 0, len(view)
    while got < n:
        sock.settimeout(deadline.remaining())
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError as e:
            raise DeadlineExceeded(
                f"{deadline.what} took longer than {deadline.seconds:g} s "
                f"(got {got} of {n} bytes)"
            ) from e
        if k == 0:
            raise ProtocolError(f"peer closed the connection after {got} of {n} bytes")
        got += k


def reply_cap(tensors: int, per_tensor: int = DIGEST_BYTES_PER_TENSOR) -> int:
    """The most a client reads for a seed's answer about a model of ``tensors`` tensors
    (its JSON parse then costs at most a few tens of times that in memory)."""
    return REPLY_FIXED_BYTES + per_tensor * tensors


# --- bulk-data frames ------------------------------------------------------------


def data_header(index: int, length: int) -> bytes:
    return _DATA_HEADER.pack(DATA_MAGIC, index, length)


def keepalive_frame() -> bytes:
    return _DATA_HEADER.pack(DATA_MAGIC, KEEPALIVE, 0)


def abort_frame(reason: str) -> bytes:
    payload = reason.encode()[:MAX_ABORT_REASON_BYTES]
    return _DATA_HEADER.pack(DATA_MAGIC, ABORT, len(payload)) + payload


DATA_HEADER_BYTES = _DATA_HEADER.size


def parse_data_header(
    header: bytes, index: int, length: int, sock: socket.socket, deadline: Deadline
) -> bool:
    """Check a bucket header against the plan (bucket ``index`` of ``length`` bytes);
    True if it is a keepalive instead (the bucket's header comes next). An abort frame
    raises ``ProtocolError`` with the sender's reason."""
    magic, got_index, got_length = _DATA_HEADER.unpack(header)
    if magic != DATA_MAGIC:
        raise ProtocolError(f"bucket {index}: bad data magic {magic!r}")
    if (got_index, got_length) == (KEEPALIVE, 0):
        return True
    if got_index == ABORT:
        if got_length > MAX_ABORT_REASON_BYTES:
            raise ProtocolError(f"bucket {index}: sender aborted with an over-long reason")
        reason = clean(recv_exact(sock, got_length, deadline).decode(errors="replace"))
        raise ProtocolError(f"sender aborted at bucket {index}: {reason}")
    if (got_index, got_length) != (index, length):
        raise ProtocolError(
            f"bucket {got_index} of {got_length} bytes where the plan has bucket {index} "
            f"of {length} bytes"
        )
    return False


# --- field checks ------------------------------------------------------------------


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``msg[name]`` checked against ``kind``; a missing or mistyped field is a ProtocolError."""
    value = msg.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"'{msg.get('type')}' message field '{name}' is missing or mistyped")
    return value


def optional_field(msg: dict[str, Any], name: str, kind: type) -> Any:
    """``msg[name]`` checked against ``kind`` if present, else None."""
    return None if msg.get(name) is None else field(msg, name, kind)


def text(msg: dict[str, Any], name: str) -> str:
    """A free-text field (a reason) for logs: any type, shortened, and printable ASCII
    (a peer's newlines or lone surrogates never reach a log line as such)."""
    return clean(msg.get(name))


def clean(value: Any, limit: int = _MAX_REASON_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters, non-printable ones escaped."""
    raw = str(value)[:limit]
    return "".join(c if c.isprintable() and c.isascii() else ascii(c)[1:-1] for c in raw)


def port_field(msg: dict[str, Any], name: str) -> int | None:
    port = optional_field(msg, name, int)
    if port is not None and not 1 <= port <= 65535:
        raise ProtocolError(f"'{msg.get('type')}' field '{name}' {port} is not a port")
    return port


def sha256_field(msg: dict[str, Any], name: str, optional: bool = False) -> str | None:
    value = optional_field(msg, name, str) if optional else field(msg, name, str)
    if value is not None and not _SHA256.fullmatch(value):
        raise ProtocolError(f"'{msg.get('type')}' field '{name}' is not a sha256 hex digest")
    return value


# --- messages ------------------------------------------------------------------------


def challenge(nonce: str, auth: bool) -> dict[str, Any]:
    return {"type": CHALLENGE, "nonce": nonce, "auth": auth}


def parse_challenge(msg: dict[str, Any]) -> tuple[str, bool]:
    """(seed nonce, whether the seed requires the shared secret)."""
    nonce = field(msg, "nonce", str)
    if not _NONCE.fullmatch(nonce):
        raise ProtocolError("challenge nonce is not 32 hex digits")
    return nonce, msg.get("auth") is True


@dataclass(frozen=True)
class ManifestSummary:
    """What a client's tensor manifest is, in a few bytes: count, total size, and
    the sha256 of its canonical wire form (``manifest.manifest_sha256``)."""

    tensors: int
    nbytes: int
    sha256: str

    def to_wire(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "bytes": self.nbytes, "sha256": self.sha256}

    @classmethod
    def from_wire(cls, value: Any) -> "ManifestSummary":
        if not isinstance(value, dict):
            raise ProtocolError("hello field 'manifest' is not an object")
        tensors, nbytes = field(value, "tensors", int), field(value, "bytes", int)
        if tensors < 0 or nbytes < 0:
            raise ProtocolError("hello manifest has a negative count or size")
        return cls(tensors, nbytes, sha256_field(value, "sha256") or "")


@dataclass(frozen=True)
class Request:
    """A client's request as the seed read it. ``wire`` is the message itself, which
    the seed's proof covers."""

    kind: str
    nonce: str
    proof: str | None
    identity: dict[str, Any] | None
    manifest: ManifestSummary | None
    relay_port: int | None
    direct: bool
    data_planes: tuple[str, ...]
    # The checkpoint or value fingerprint the client will accept (None: its identity's).
    expect: str | None
    wire: dict[str, Any]
    # What the client already holds from an earlier source (None: nothing).
    resume: "Resume | None" = None
    # A compile cache request's names (None: another kind of request).
    cache: "CacheRequest | None" = None


@dataclass(frozen=True)
class Resume:
    """A client that holds the first ``start`` tensors of its manifest, verified, from
    a source whose weights have value fingerprint ``values``: a seed with the same
    fingerprint may send only the rest (``accept``'s ``start``)."""

    start: int
    values: str

    def to_wire(self) -> dict[str, Any]:
        return {"start": self.start, "values": self.values}

    @classmethod
    def from_wire(cls, value: Any, tensors: int) -> "Resume":
        """Raises ``ProtocolError`` unless ``start`` lies inside a manifest of
        ``tensors`` tensors (1 .. tensors - 1) and ``values`` is a sha256."""
        if not isinstance(value, dict):
            raise ProtocolError("hello field 'resume' is not an object")
        try:
            start = field(value, "start", int)
            values = sha256_field(value, "values") or ""
        except ProtocolError:
            raise ProtocolError(
                "hello field 'resume' is not {start: int, values: sha256}"
            ) from None
        if not 0 < start < tensors:
            raise ProtocolError(
                f"hello resumes at tensor {clean(start, 20)} of {clean(tensors, 20)}"
            )
        return cls(start, values)


def hello(
    identity: dict[str, Any], manifest: ManifestSummary, relay_port: int | None,
    direct: bool, data_planes: tuple[str, ...], expect: str | None = None,
    resume: Resume | None = None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": HELLO, "identity": identity, "manifest": manifest.to_wire(),
        "direct": direct, "data_planes": list(data_planes),
    }
    if relay_port is not None:
        msg["relay_port"] = relay_port
    if expect is not None:
        msg["expect"] = expect
    if resume is not None:
        msg["resume"] = resume.to_wire()
    return msg


def info_request() -> dict[str, Any]:
    return {"type": INFO}


def manifest_request() -> dict[str, Any]:
    return {"type": MANIFEST}


def parse_request(msg: dict[str, Any]) -> Request:
    kind = msg["type"]
    if kind not in REQUESTS:
        raise ProtocolError(f"expected one of {', '.join(REQUESTS)}, got '{clean(kind, 40)}'")
    nonce = field(msg, "nonce", str)
    if not _NONCE.fullmatch(nonce):
        raise ProtocolError("request nonce is not 32 hex digits")
    proof = sha256_field(msg, "proof", optional=True)
    identity = manifest = resume = cache = None
    planes: tuple[str, ...] = ()
    if kind == COMPILE_CACHE:
        cache = CacheRequest.from_wire(msg)
    if kind == HELLO:
        identity = field(msg, "identity", dict)
        manifest = ManifestSummary.from_wire(msg.get("manifest"))
        planes = tuple(field(msg, "data_planes", list))
        if not planes or not all(isinstance(p, str) for p in planes):
            raise ProtocolError("hello field 'data_planes' is not a non-empty list of names")
        if "resume" in msg:
            resume = Resume.from_wire(msg["resume"], manifest.tensors)
    return Request(
        kind=kind, nonce=nonce, proof=proof, identity=identity, manifest=manifest,
        relay_port=port_field(msg, "relay_port"),
        direct=optional_field(msg, "direct", bool) is True,
        data_planes=planes, expect=sha256_field(msg, "expect", optional=True), wire=msg,
        resume=resume, cache=cache,
    )


def refuse(reason: str, retry: bool) -> dict[str, Any]:
    return {"type": REFUSE, "reason": reason, "retry": retry}


def redirect(relay: str, value_fingerprint: str) -> dict[str, Any]:
    return {"type": REDIRECT, "relay": relay, "value_fingerprint": value_fingerprint}


def parse_redirect(msg: dict[str, Any]) -> tuple[str, str]:
    """(relay address, the value fingerprint the relay must serve); the address is
    checked as strictly as a SOURCE entry."""
    relay = field(msg, "relay", str)
    try:
        # A seed names a relay by the address it saw the relay connect from: an IP.
        parse_address(relay, key="redirect", ip_only=True)
    except AddressError as e:
        raise ProtocolError(str(e)) from e
    return relay, sha256_field(msg, "value_fingerprint") or ""


def parse_refuse(msg: dict[str, Any]) -> tuple[str, bool]:
    """(reason, whether the seed asks the client to try again later)."""
    return text(msg, "reason"), msg.get("retry") is True


@dataclass(frozen=True)
class Accept:
    digests: list[str]
    bucket_bytes: int
    data_plane: str
    checkpoint: str | None
    # The first tensor the seed sends: 0, or the client's ``Resume.start``.
    start: int = 0
    # What the seed's load set besides tensors, for the client to replay.
    state: LoadState = NO_STATE


def accept(
    digests: list[str], bucket_bytes: int, data_plane: str, checkpoint: str | None,
    start: int = 0, state: LoadState = NO_STATE,
) -> dict[str, Any]:
    return {
        "type": ACCEPT, "digests": digests, "bucket_bytes": bucket_bytes,
        "data_plane": data_plane, "checkpoint": checkpoint, "start": start,
        "state": state.to_wire(),
    }


def parse_accept(
    msg: dict[str, Any], tensors: int, offered: tuple[str, ...], max_bucket_bytes: int,
    resume_at: int = 0,
) -> Accept:
    """Check an accept against what this client asked for: one digest per tensor of
    its manifest, a bucket size in (0, max_bucket_bytes], a data plane it offered, and
    a start of 0 or ``resume_at`` (the tensor it offered to resume at; a seed that
    predates resuming sends no start: 0)."""
    digests = field(msg, "digests", list)
    if len(digests) != tensors or not all(
        isinstance(d, str) and _SHA256.fullmatch(d) for d in digests
    ):
        raise ProtocolError(
            f"accept carries {len(digests)} digests (or malformed ones) for {tensors} tensors"
        )
    bucket_bytes = field(msg, "bucket_bytes", int)
    if not 0 < bucket_bytes <= max_bucket_bytes:
        raise ProtocolError(f"accept carries a bucket size of {bucket_bytes} bytes")
    plane = field(msg, "data_plane", str)
    if plane not in offered:
        raise ProtocolError(f"accept names data plane '{clean(plane, 40)}', not one offered")
    start = optional_field(msg, "start", int) or 0
    if start not in (0, resume_at):
        raise ProtocolError(f"accept starts at tensor {start}; this client offered {resume_at}")
    try:
        # Required: a seed that sends none cannot tell a load that set nothing from one
        # whose state it drops (peers before the load state differ in ``layout`` too).
        state = LoadState.from_wire(field(msg, "state", list))
    except LoadStateError as e:
        raise ProtocolError(f"accept carries a malformed load state: {e}") from e
    return Accept(digests, bucket_bytes, plane, sha256_field(msg, "checkpoint", optional=True),
                  start, state)


def info(description: dict[str, Any]) -> dict[str, Any]:
    return {"type": INFO, **description}


def manifest_reply(entries: list[Any]) -> dict[str, Any]:
    return {"type": MANIFEST, "tensors": entries}


def done(ok: bool, reason: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": DONE, "ok": ok}
    if reason is not None:
        msg["reason"] = reason[:_MAX_REASON_CHARS]
    return msg


def parse_done(msg: dict[str, Any]) -> tuple[bool, str]:
    """(whether the client verified every tensor, its reason if not)."""
    return msg.get("ok") is True, text(msg, "reason")


def store_record(key: str, value: bytes) -> dict[str, Any]:
    return {"type": STORE, "key": key, "value": value.hex()}


def parse_store_record(msg: dict[str, Any]) -> tuple[str, bytes]:
    key = field(msg, "key", str)
    try:
        value = bytes.fromhex(field(msg, "value", str))
    except ValueError as e:
        raise ProtocolError("store record value is not hex") from e
    return key, value


# --- compile cache --------------------------------------------------------------------


@dataclass(frozen=True)
class CacheRequest:
    """What a client asks a seed's compile cache for: the cache names (64-hex hashes,
    vLLM's directory names under ``torch_aot_compile/``), the rank directory inside
    them (``rank_<rank>_<dp index>``) and the client's host signature
    (``compile_cache.host_signature``: a cache built for another CPU is refused)."""

    hashes: tuple[str, ...]
    rank_dir: str
    host: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": COMPILE_CACHE, "hashes": list(self.hashes), "rank_dir": self.rank_dir,
                "host": self.host}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> "CacheRequest":
        """Raises ``ProtocolError`` unless there are 1..MAX_CACHE_NAMES distinct 64-hex
        hashes, a ``rank_<n>_<n>`` directory and a 64-hex host signature."""
        hashes = field(msg, "hashes", list)
        if not 0 < len(hashes) <= MAX_CACHE_NAMES or not all(
            isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes
        ) or len(set(hashes)) != len(hashes):
            raise ProtocolError(
                f"compile cache request needs 1..{MAX_CACHE_NAMES} distinct 64-hex names"
            )
        rank_dir = field(msg, "rank_dir", str)
        if not _RANK_DIR.fullmatch(rank_dir):
            raise ProtocolError("compile cache request's rank_dir is not rank_<n>_<n>")
        return cls(tuple(hashes), rank_dir, sha256_field(msg, "host") or "")


@dataclass(frozen=True)
class CacheFile:
    """One file of a compile cache reply: ``path`` relative to ``torch_aot_compile/``
    (``<hash>/inductor_cache/...`` or ``<hash>/<rank_dir>/...``), its size in bytes
    and its blake3 digest (64 hex digits)."""

    path: str
    nbytes: int
    digest: str

    def to_wire(self) -> list[Any]:
        return [self.path, self.nbytes, self.digest]


def check_cache_path(path: Any, request: CacheRequest) -> str:
    """``path`` if it is a file path a compile cache for ``request`` may hold, else
    ``ProtocolError``: relative, at most MAX_CACHE_PATH_DEPTH plain components (no "",
    ".", "..", leading dots or odd characters), under one of the requested hashes, and
    there under ``inductor_cache/`` or the requested rank directory."""
    if not isinstance(path, str):
        raise ProtocolError("compile cache file path is not a string")
    parts = path.split("/")
    ok = (
        3 <= len(parts) <= MAX_CACHE_PATH_DEPTH
        and all(_PATH_PART.fullmatch(p) for p in parts)
        and parts[0] in request.hashes
        and parts[1] in ("inductor_cache", request.rank_dir)
    )
    if not ok:
        raise ProtocolError(f"compile cache file path {clean(path, 200)!r} is not acceptable")
    return path


def compile_cache_reply(files: list[CacheFile]) -> dict[str, Any]:
    return {"type": COMPILE_CACHE, "files": [f.to_wire() for f in files]}


def parse_compile_cache_reply(
    msg: dict[str, Any], request: CacheRequest, max_files: int, max_bytes: int
) -> list[CacheFile]:
    """The file list of a seed's compile cache reply, every entry checked: an
    acceptable path (``check_cache_path``) once, a size in [0, max_bytes] with the sum
    at most ``max_bytes``, at most ``max_files`` entries, a 64-hex digest."""
    entries = field(msg, "files", list)
    if len(entries) > max_files:
        raise ProtocolError(f"compile cache reply lists {len(entries)} files (cap {max_files})")
    files: list[CacheFile] = []
    seen: set[str] = set()
    dirs: set[str] = set()
    total = 0
    for item in entries:
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError("compile cache reply entry is not [path, size, digest]")
        path = check_cache_path(item[0], request)
        nbytes, digest_ = item[1], item[2]
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ProtocolError(f"compile cache file {path} has a bad size")
        if not isinstance(digest_, str) or not _SHA256.fullmatch(digest_):
            raise ProtocolError(f"compile cache file {path} has a bad digest")
        parents = {path.rsplit("/", k)[0] for k in range(1, path.count("/") + 1)}
        if path in seen or path in dirs or parents & seen:
            raise ProtocolError(f"compile cache file {path} is listed twice or nests in another")
        total += nbytes
        if total > max_bytes:
            raise ProtocolError(f"compile cache reply holds more than {max_bytes} bytes")
        seen.add(path)
        dirs |= parents
        files.append(CacheFile(path, nbytes, digest_))
    return files
