"""The seed's side of the compile cache: list what a client may have, send it.

Only regular files under the requested ``<H>/inductor_cache/`` and
``<H>/<rank dir>/`` are sent, each path component opened without following a
symlink, and only caches whose artifact (``<H>/<rank dir>/model``) exists.
"""

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3

from vllm_ascend.model_loader.netloader.compile_cache.naming import (
    ARTIFACT,
    CHUNK_BYTES,
    INDUCTOR_DIR,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    CacheRejected,
    host_signature,
)
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError
from vllm_ascend.model_loader.netloader.wire.frames import (
    MAX_REQUEST_BYTES,
    data_header,
    recv_msg,
)
from vllm_ascend.model_loader.netloader.wire.handshake import SeedSide
from vllm_ascend.model_loader.netloader.wire.messages import (
    DONE,
    MAX_CACHE_PATH_DEPTH,
    CacheFile,
    CacheRequest,
    check_cache_path,
    compile_cache_reply,
    parse_done,
)

logger = get_logger(__name__)

# Compile caches a seed sends at once (each reads its files twice: digest, then send).
MAX_CONCURRENT_SENDS = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# A FIFO swapped in for a listed file must not block open(), which no deadline covers
# (O_NONBLOCK changes nothing for a regular file).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


@dataclass(frozen=True)
class CacheServing:
    """How a seed serves its compile cache, built once from the config (``loader``).

    ``root`` is its ``torch_aot_compile`` directory; a transfer ends within
    ``timeout_s`` plus its size at ``min_rate_bytes_per_s``."""

    root: str
    timeout_s: float
    min_rate_bytes_per_s: float
    max_files: int = MAX_FILES
    max_bytes: int = MAX_TOTAL_BYTES
    host: Callable[[], str] = host_signature
    slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_CONCURRENT_SENDS),
        compare=False, repr=False,
    )


def serve(
    sock: socket.socket, side: SeedSide, serving: CacheServing | None, who: str, peer: str,
    deadline: Deadline,
) -> None:
    """Answer an authenticated compile cache request on ``sock``: a refusal with the
    reason, or the file list (proved with the secret, like every answer) followed by
    each file as a bulk-data bucket, then read the client's ``done``. Raises
    ``ProtocolError``/``OSError`` for the connection's log line."""
    request = side.request.cache
    assert request is not None  # a parsed compile cache request has one
    if serving is None:
        side.refuse("this seed does not serve its compile cache (COMPILE_CACHE)", False, deadline)
        return
    if request.host != serving.host():
        side.refuse("compile cache was built on a different host (CPU, vector ISA or "
                    "compiler): its native code may not run there", False, deadline)
        return
    if not serving.slots.acquire(blocking=False):
        side.refuse("seed is busy sending compile caches", True, deadline)
        return
    try:
        try:
            files = list_cache(serving.root, request, serving.max_files, serving.max_bytes)
        except CacheRejected as e:
            side.refuse(str(e), False, deadline)
            return
        side.answer(compile_cache_reply(files), deadline)
        total = sum(f.nbytes for f in files)
        start = time.perf_counter()
        send_files(sock, serving.root, files,
                   Deadline(serving.timeout_s + total / serving.min_rate_bytes_per_s,
                            f"compile cache to {peer}"))
        if files:
            ok, reason = parse_done(recv_msg(
                sock, Deadline(serving.timeout_s, f"'done' from {peer}"), MAX_REQUEST_BYTES,
                expect=DONE,
            ))
            log = logger.info if ok else logger.warning
            log("%s sent its compile cache to %s: %d files, %d bytes in %.3f s "
                "(%s), client %s", who, peer, len(files), total, time.perf_counter() - start,
                ", ".join(sorted({f.path.split("/")[0][:12] for f in files})),
                "installed it" if ok else f"rejected it: {reason}")
        else:
            logger.info("%s has no compile cache for %s's names", who, peer)
    finally:
        serving.slots.release()


def list_cache(
    root: str, request: CacheRequest, max_files: int = MAX_FILES,
    max_bytes: int = MAX_TOTAL_BYTES,
) -> list[CacheFile]:
    """Every file of the requested caches under ``root`` that is complete (its
    ``<H>/<rank dir>/model`` exists), with size and blake3 digest: regular files under
    ``<H>/inductor_cache/`` (not its ``locks/``, no ``*.lock``) and ``<H>/<rank dir>/``,
    reached without following a symlink. Names that a client would not accept are
    skipped. Raises ``CacheRejected`` past ``max_files`` or ``max_bytes``."""
    files: list[CacheFile] = []
    total = 0

    def add(found: Iterator[tuple[str, int, str]]) -> None:
        nonlocal total
        for path, nbytes, digest_ in found:
            files.append(CacheFile(path, nbytes, digest_))
            total += nbytes
            if len(files) > max_files or total > max_bytes:
                raise CacheRejected(
                    f"compile cache exceeds this seed's caps ({max_files} files, "
                    f"{max_bytes} bytes)"
                )

    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return files  # no cache here at all
    try:
        for name in request.hashes:
            with _opened_dir(root_fd, name) as h_fd:
                if h_fd is None:
                    continue
                with _opened_dir(h_fd, request.rank_dir) as rank_fd:
                    if rank_fd is None or not _is_regular(rank_fd, ARTIFACT):
                        continue
                    add(_walk(rank_fd, f"{name}/{request.rank_dir}"))
                with _opened_dir(h_fd, INDUCTOR_DIR) as ind_fd:
                    if ind_fd is not None:
                        add(_walk(ind_fd, f"{name}/{INDUCTOR_DIR}"))
    finally:
        os.close(root_fd)
    for f in files:
        check_cache_path(f.path, request)  # _walk only yields such names
    return files


class _opened_dir:
    """``os.open(name, dir_fd=parent)`` as a directory, never through a symlink; the
    context value is None if there is no such directory."""

    def __init__(self, parent_fd: int, name: str):
        self._parent, self._name = parent_fd, name
        self._fd: int | None = None

    def __enter__(self) -> int | None:
        try:
            self._fd = os.open(self._name, _DIR_FLAGS, dir_fd=self._parent)
        except OSError:
            self._fd = None
        return self._fd

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _is_regular(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _walk(dir_fd: int, prefix: str) -> Iterator[tuple[str, int, str]]:
    """(path, size, digest) of every regular file below ``dir_fd``, sorted, whose path
    ``prefix/...`` a client accepts (depth, plain names); symlinks, lock files and
    other kinds of file are skipped."""
    if prefix.count("/") + 2 > MAX_CACHE_PATH_DEPTH:
        return
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = f"{prefix}/{entry.name}"
        if entry.name.startswith(".") or entry.is_symlink() or not _plain_name(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            if entry.name == "locks":
                continue
            with _opened_dir(dir_fd, entry.name) as sub:
                if sub is not None:
                    yield from _walk(sub, path)
        elif entry.is_file(follow_symlinks=False) and not entry.name.endswith(".lock"):
            digested = _digest_file(dir_fd, entry.name)
            if digested is not None:
                yield (path, *digested)


def _plain_name(name: str) -> bool:
    try:
        check_cache_path(f"{'0' * 64}/{INDUCTOR_DIR}/{name}",
                         CacheRequest(("0" * 64,), "rank_0_0", "0" * 64))
    except ProtocolError:
        return False
    return True


def _digest_file(dir_fd: int, name: str) -> tuple[int, str] | None:
    """(size, blake3) of a regular file, opened without following a symlink."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        h, n = blake3.blake3(), 0
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def send_files(sock: socket.socket, root: str, files: list[CacheFile], deadline: Deadline) -> None:
    """Each file as bucket ``i`` (``protocol.data_header``) of exactly its listed size,
    read again without following a symlink. A file that changed since it was listed
    raises ``OSError`` (the client then sees the connection end, or a digest mismatch)."""
    for index, f in enumerate(files):
        fd = _open_path(root, f.path)
        with os.fdopen(fd, "rb") as src:
            _send_all(sock, data_header(index, f.nbytes), deadline)
            left = f.nbytes
            while left:
                chunk = src.read(min(left, CHUNK_BYTES))
                if not chunk:
                    raise OSError(f"compile cache file {f.path} shrank while being sent")
                _send_all(sock, chunk, deadline)
                left -= len(chunk)


def _open_path(root: str, path: str) -> int:
    """An fd of the regular file ``root/path``, each component opened without
    following a symlink."""
    parts = path.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
        file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise OSError(f"compile cache file {path} is no longer a regular file")
    return file_fd


def _send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    # Since Python 3.5, a socket timeout bounds a whole sendall: this is a deadline.
    sock.settimeout(deadline.remaining())
    sock.sendall(data)
