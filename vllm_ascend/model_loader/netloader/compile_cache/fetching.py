"""The client's side of the compile cache: ask the seed that served the weights,
verify every file, move each complete cache into place.

Every failure here ends as a log line and "no cache": the instance then compiles as
it would have anyway. Nothing becomes visible in the cache root unless every file of
it arrived and matched its digest, and an existing cache directory is never
overwritten.
"""

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field

import blake3
from torch import nn

from vllm_ascend.model_loader.netloader.compile_cache.naming import (
    ARTIFACT,
    CHUNK_BYTES,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    CacheRejected,
    NoCache,
    aot_cache_dir,
    cache_request,
)
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.wire.addresses import AddressError, parse_address
from vllm_ascend.model_loader.netloader.wire.auth import AuthError
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, clean
from vllm_ascend.model_loader.netloader.wire.frames import (
    DATA_HEADER_BYTES,
    MANIFEST_BYTES_PER_TENSOR,
    parse_data_header,
    recv_exact,
    recv_into,
    reply_cap,
    send_msg,
)
from vllm_ascend.model_loader.netloader.wire.handshake import ask_seed
from vllm_ascend.model_loader.netloader.wire.messages import (
    COMPILE_CACHE,
    REFUSE,
    CacheFile,
    CacheRequest,
    done,
    parse_compile_cache_reply,
    parse_refuse,
)

logger = get_logger(__name__)

_STAGING_PREFIX = ".netloader-staging-"
# What a peer's answer may make fail on the client, all ending as "no cache".
CACHE_ERRORS = (ProtocolError, AuthError, OSError, AddressError, UnicodeError, ValueError)


class CacheRefused(Exception):
    """The seed answered with a refusal (its reason is the message)."""


@dataclass(frozen=True)
class CacheFetch:
    """How a client fetches a compile cache (``loader``): the shared secret, the
    handshake's and each read's deadline (``timeout_s``), the minimum average rate of
    the bytes, and where the cache goes (None: this process's VLLM_CACHE_ROOT)."""

    timeout_s: float
    min_rate_bytes_per_s: float
    secret: bytes | None = field(default=None, repr=False)
    root: str | None = None
    max_files: int = MAX_FILES
    max_bytes: int = MAX_TOTAL_BYTES


@dataclass(frozen=True)
class Installed:
    """What a fetch put into the cache root: cache names installed, names that were
    already there (left alone), files and bytes received."""

    hashes: tuple[str, ...]
    present: tuple[str, ...]
    files: int
    nbytes: int
    seconds: float


def fetch(address: str, request: CacheRequest, settings: CacheFetch) -> Installed:
    """Ask the seed at ``address`` for the caches ``request`` names that this root does
    not hold yet, verify every file, then move each cache directory into place.

    Raises ``NoCache`` (nothing to fetch, or the seed has none), ``CacheRefused``,
    ``CacheRejected`` or one of ``CACHE_ERRORS``; nothing becomes visible in the cache
    root unless every file of it arrived and matched its digest."""
    root = aot_cache_dir() if settings.root is None else settings.root
    present = tuple(h for h in request.hashes if os.path.lexists(os.path.join(root, h)))
    wanted = tuple(h for h in request.hashes if h not in present)
    if not wanted:
        raise NoCache(f"every cache name is already in {root}")
    request = CacheRequest(wanted, request.rank_dir, request.host)
    start = time.perf_counter()
    host, port = parse_address(address, key="source")
    with socket.create_connection((host, port), timeout=settings.timeout_s) as conn:
        reply = ask_seed(
            conn, request.to_wire(), settings.secret,
            Deadline(settings.timeout_s, f"compile cache request to {address}"),
            reply_cap(settings.max_files, MANIFEST_BYTES_PER_TENSOR),
        )
        if reply["type"] == REFUSE:
            raise CacheRefused(parse_refuse(reply)[0])
        if reply["type"] != COMPILE_CACHE:
            raise ProtocolError(f"expected '{COMPILE_CACHE}', got '{clean(reply['type'], 40)}'")
        files = parse_compile_cache_reply(reply, request, settings.max_files, settings.max_bytes)
        if not files:
            raise NoCache(f"seed {address} has no compile cache for this configuration")
        complete = {f.path.split("/")[0] for f in files
                    if f.path.split("/")[1:] == [request.rank_dir, ARTIFACT]}
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root)
        try:
            total = sum(f.nbytes for f in files)
            deadline = Deadline(settings.timeout_s + total / settings.min_rate_bytes_per_s,
                                f"compile cache from {address}")
            try:
                receive_files(conn, staging, files, deadline)
            except (*CACHE_ERRORS, CacheRejected) as e:
                _say_done(conn, False, f"{type(e).__name__}: {e}")
                raise
            _say_done(conn, True, None)
            installed = _move_into_place(staging, root, sorted(complete))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    moved = [f for f in files if f.path.split("/")[0] in installed]
    return Installed(tuple(installed), present + tuple(sorted(complete - set(installed))),
                     len(moved), sum(f.nbytes for f in moved), time.perf_counter() - start)


def receive_files(
    sock: socket.socket, staging: str, files: list[CacheFile], deadline: Deadline
) -> None:
    """Read bucket ``i`` of exactly ``files[i].nbytes`` into ``staging/<path>`` for each
    file, and check its blake3 digest (``CacheRejected`` on a mismatch). ``staging``
    is a fresh directory only this side writes; paths were checked by the parser."""
    for index, f in enumerate(files):
        while True:
            header = recv_exact(sock, DATA_HEADER_BYTES, deadline)
            if not parse_data_header(header, index, f.nbytes, sock, deadline):
                break  # keepalives (never sent for a cache) only cost the deadline
        target = os.path.join(staging, *f.path.split("/"))
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        h = blake3.blake3()
        with os.fdopen(fd, "wb") as out:
            buf = bytearray(min(f.nbytes, CHUNK_BYTES))
            left = f.nbytes
            while left:
                view = memoryview(buf)[: min(left, len(buf))]
                recv_into(sock, view, deadline)
                h.update(view)
                out.write(view)
                left -= len(view)
        if h.hexdigest() != f.digest:
            raise CacheRejected(f"digest mismatch for compile cache file {f.path}")


def _move_into_place(staging: str, root: str, names: list[str]) -> list[str]:
    """Rename each complete ``staging/<H>`` to ``root/<H>`` unless one exists; the
    names moved. A cache without its artifact (``<H>/<rank dir>/model``) stays out."""
    moved: list[str] = []
    for name in names:
        dest = os.path.join(root, name)
        if os.path.lexists(dest):
            continue  # never overwrite: vLLM (or another rank) got there first
        os.rename(os.path.join(staging, name), dest)
        moved.append(name)
    return moved


def _say_done(sock: socket.socket, ok: bool, reason: str | None) -> None:
    try:
        send_msg(sock, done(ok, reason), Deadline(1.0, "sending 'done'"))
    except (ProtocolError, OSError):
        pass  # the seed may be gone; the outcome is this side's log line


def install_from_seed(
    model: nn.Module, address: str, settings: CacheFetch, who: str
) -> Installed | None:
    """The loader's hook: fetch ``model``'s compile cache from the seed that just
    served its weights, and log what happened; never raises for anything the seed
    sends or any state of this host (the instance then compiles itself)."""
    start = time.perf_counter()
    try:
        request = cache_request(model)
        installed = fetch(address, request, settings)
    except NoCache as e:
        logger.info("%s: no compile cache installed: %s", who, e)
        return None
    except CacheRefused as e:
        logger.warning("%s: seed %s refused its compile cache: %s", who, address, e)
        return None
    except (*CACHE_ERRORS, CacheRejected) as e:
        logger.warning(
            "%s: compile cache from %s not installed after %.3f s (%s: %s); vLLM "
            "compiles the model itself", who, address, time.perf_counter() - start,
            type(e).__name__, e,
        )
        return None
    except Exception:  # noqa: BLE001 - vLLM internals (the names) may change: compiling is always right
        logger.exception("%s: compile cache fetch from %s failed", who, address)
        return None
    logger.info(
        "%s installed the compile cache from seed %s: %s (%d files, %d bytes) "
        "in %.3f s%s", who, address, ", ".join(installed.hashes) or "nothing new",
        installed.files, installed.nbytes, installed.seconds,
        f"; already here: {', '.join(installed.present)}" if installed.present else "",
    )
    return installed
