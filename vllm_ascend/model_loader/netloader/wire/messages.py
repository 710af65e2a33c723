"""Every message type: one function builds it, one parses it. No torch.

The parsers turn every malformed, mistyped or out-of-range field into
``ProtocolError``. Frames, caps and deadlines are in ``frames``.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from vllm_ascend.model_loader.netloader.load_state import NO_STATE, LoadState, LoadStateError
from vllm_ascend.model_loader.netloader.parts import join_parts
from vllm_ascend.model_loader.netloader.wire.addresses import AddressError, parse_address
from vllm_ascend.model_loader.netloader.wire.errors import (
    MAX_REASON_CHARS,
    ProtocolError,
    clean,
    text,
)
from vllm_ascend.model_loader.netloader.wire.frames import REFUSE
from vllm_ascend.model_loader.netloader.wire.slices import SLICES, SliceAsk

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
DONE = "done"
STORE = "store"
COMPILE_CACHE = "compile_cache"
REQUESTS = (HELLO, INFO, MANIFEST, COMPILE_CACHE, SLICES)
# Data planes a seed can use: bulk data on this connection, or a two-rank collective
# group (gloo on CPU, nccl on CUDA, hccl on Ascend).
TCP = "tcp"
COLLECTIVE = "collective"
DATA_PLANES = (TCP, COLLECTIVE)
# Which form of the weights a transfer moves (see ``layout``): as ``load_weights`` left
# them, or as ``process_weights_after_loading`` left them.
LOADED = "loaded"
PROCESSED = "processed"
LAYOUTS = (LOADED, PROCESSED)
# A client's processing signature (``layout.processing_signature``): a few short fields.
_MAX_SIGNATURE_FIELDS = 8
_MAX_SIGNATURE_CHARS = 160


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
    # The layout a hello asks for, and (processed) the client's processing signature.
    layout: str = LOADED
    processing: dict[str, str] | None = None
    # A cross-layout request's ask (``wire.slices``; None: another kind of request).
    slices: SliceAsk | None = None


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
    resume: Resume | None = None, layout: str = LOADED,
    processing: dict[str, str] | None = None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": HELLO, "identity": identity, "manifest": manifest.to_wire(),
        "direct": direct, "data_planes": list(data_planes), "layout": layout,
    }
    if processing is not None:
        msg["processing"] = processing
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
    identity = manifest = resume = cache = processing = slices = None
    planes: tuple[str, ...] = ()
    layout = LOADED
    if kind == COMPILE_CACHE:
        cache = CacheRequest.from_wire(msg)
    if kind == SLICES:
        identity = field(msg, "identity", dict)
        slices = SliceAsk.from_wire(msg.get("slices"))
        planes = (TCP,)
    if kind == HELLO:
        identity = field(msg, "identity", dict)
        manifest = ManifestSummary.from_wire(msg.get("manifest"))
        planes = tuple(field(msg, "data_planes", list))
        if not planes or not all(isinstance(p, str) for p in planes):
            raise ProtocolError("hello field 'data_planes' is not a non-empty list of names")
        if "resume" in msg:
            resume = Resume.from_wire(msg["resume"], manifest.tensors)
        layout = optional_field(msg, "layout", str) or LOADED
        if layout not in LAYOUTS:
            raise ProtocolError(f"hello asks for layout '{clean(layout, 20)}'")
        processing = _processing_field(msg) if layout == PROCESSED else None
    return Request(
        kind=kind, nonce=nonce, proof=proof, identity=identity, manifest=manifest,
        relay_port=port_field(msg, "relay_port"),
        direct=optional_field(msg, "direct", bool) is True,
        data_planes=planes, expect=sha256_field(msg, "expect", optional=True), wire=msg,
        resume=resume, cache=cache, layout=layout, processing=processing, slices=slices,
    )


def _processing_field(msg: dict[str, Any]) -> dict[str, str]:
    """A processed hello's processing signature: a few short string fields."""
    value = field(msg, "processing", dict)
    if len(value) > _MAX_SIGNATURE_FIELDS or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 32
        and len(v) <= _MAX_SIGNATURE_CHARS for k, v in value.items()
    ):
        raise ProtocolError("hello field 'processing' is not a few short string fields")
    return value


def refuse(reason: str, retry: bool, other_layout: bool = False) -> dict[str, Any]:
    """A refusal; ``other_layout``: the seed might serve the layout not asked for (it
    refused this one, not the client's model)."""
    msg: dict[str, Any] = {"type": REFUSE, "reason": reason, "retry": retry}
    if other_layout:
        msg["other_layout"] = True
    return msg


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


def refuses_only_the_layout(msg: dict[str, Any]) -> bool:
    """Whether a refusal was of the layout asked for, not of the client's model."""
    return msg.get("other_layout") is True


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
    layout: str = LOADED
    # The processed layout's ``layout.state_signature`` of the seed's model.
    signature: str | None = None
    # The part digests of each tensor larger than ``manifest.PART_BYTES``, by its
    # digest; each tuple joins to that digest (``manifest.join_parts``).
    parts: dict[str, tuple[str, ...]] = dataclass_field(default_factory=dict)


def accept(
    digests: list[str], bucket_bytes: int, data_plane: str, checkpoint: str | None,
    start: int = 0, state: LoadState = NO_STATE, layout: str = LOADED,
    signature: str | None = None, parts: Sequence[str] = (),
) -> dict[str, Any]:
    """``parts``: the part digests of every tensor that has them, in manifest order,
    from tensor 0 whatever ``start`` is (a relay serves them all on)."""
    msg = {
        "type": ACCEPT, "digests": digests, "bucket_bytes": bucket_bytes,
        "data_plane": data_plane, "checkpoint": checkpoint, "start": start,
        "state": state.to_wire(), "layout": layout, "parts": "".join(parts),
    }
    if signature is not None:
        msg["signature"] = signature
    return msg


def parse_accept(
    msg: dict[str, Any], tensors: int, offered: tuple[str, ...], max_bucket_bytes: int,
    resume_at: int = 0, layout: str = LOADED, part_counts: Sequence[int] | None = None,
) -> Accept:
    """Check an accept against what this client asked for: one digest per tensor of
    its manifest, a bucket size in (0, max_bucket_bytes], a data plane it offered, a
    start of 0 or ``resume_at`` (the tensor it offered to resume at; a seed that
    predates resuming sends no start: 0), and ``part_counts[i]`` part digests for each
    tensor ``i`` (``manifest.part_count`` of its size; None: none has parts) that join
    to its digest."""
    digests = field(msg, "digests", list)
    if len(digests) != tensors or not all(
        isinstance(d, str) and _SHA256.fullmatch(d) for d in digests
    ):
        raise ProtocolError(
            f"accept carries {len(digests)} digests (or malformed ones) for {tensors} tensors"
        )
    parts = _parse_parts(field(msg, "parts", str), digests, part_counts or [0] * tensors)
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
    if (optional_field(msg, "layout", str) or LOADED) != layout:
        raise ProtocolError(f"accept serves another layout than the {layout} one asked for")
    signature = sha256_field(msg, "signature", optional=layout != PROCESSED)
    return Accept(digests, bucket_bytes, plane, sha256_field(msg, "checkpoint", optional=True),
                  start, state, layout, signature if layout == PROCESSED else None, parts)


def _parse_parts(
    text: str, digests: list[str], part_counts: Sequence[int]
) -> dict[str, tuple[str, ...]]:
    """An accept's ``parts``: 64 hex digits per part, ``part_counts[i]`` of them for
    tensor ``i`` in order, each tensor's joining to its digest. Raises ProtocolError."""
    if len(text) != 64 * sum(part_counts) or not all(
        _SHA256.fullmatch(text, k, k + 64) for k in range(0, len(text), 64)
    ):
        raise ProtocolError(
            f"accept carries {len(text)} characters of part digests (or malformed ones), "
            f"not the {64 * sum(part_counts)} of {sum(part_counts)} parts"
        )
    parts: dict[str, tuple[str, ...]] = {}
    offset = 0
    for i, (d, count) in enumerate(zip(digests, part_counts, strict=True)):
        if not count:
            continue
        mine = tuple(text[k : k + 64] for k in range(offset, offset + 64 * count, 64))
        offset += 64 * count
        if join_parts(mine) != d:
            raise ProtocolError(f"accept's part digests of tensor {i} do not join to its digest")
        parts[d] = mine
    return parts


def info(description: dict[str, Any]) -> dict[str, Any]:
    return {"type": INFO, **description}


def manifest_reply(entries: list[Any]) -> dict[str, Any]:
    return {"type": MANIFEST, "tensors": entries}


def done(ok: bool, reason: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": DONE, "ok": ok}
    if reason is not None:
        msg["reason"] = reason[:MAX_REASON_CHARS]
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
