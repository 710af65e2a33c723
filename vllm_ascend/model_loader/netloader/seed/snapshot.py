"""Hashing host tensors in a forked child, from its copy-on-write snapshot of the worker.

``SnapshotHasher.fork`` forks the worker at the end of ``load_weights``; the child sees
every private anonymous page exactly as it was at the fork, whatever the worker writes
afterwards (the kernel copies a page only when the worker writes it). It hashes the
tensors it was given at the lowest priority, writes one line per tensor to a pipe
(``index digest part,part,...``) and exits. Only tensors that lie wholly in private
anonymous memory that the fork copies are given to it (``snapshot_safe``): shared
memory (the child would see live writes), ``MADV_DONTFORK`` pages (pinned or RDMA
memory: absent in the child), ``MADV_WIPEONFORK`` pages (zero there) and file mappings
(read at hashing time) are hashed by the caller instead.

The child is treated as a peer that may fail: its first byte (that it armed its
death signal and closed the worker's descriptors) must come within ``ARM_S``; each
line is checked as it arrives (each index once, the part count its size requires,
parts that join to the digest); a child that fails any check is killed and reaped, and
the caller's preparation fails. After the fork the child runs only system calls,
blake3 and plain Python: no logging, no torch, no imports; it resets the worker's
signal handlers, offers itself to the OOM killer first, and dies with the thread that
forked it (``PR_SET_PDEATHSIG``) or as soon as it sees its parent gone.
"""

import ctypes
import ctypes.util
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from vllm_ascend.model_loader.netloader.parts import PART_BYTES, PartHasher, join_parts, part_count

# How long the child may take to arm itself (its first byte); the fork's own handlers
# run before (torch's, the hub client's): a child stuck there is killed.
ARM_S = 30.0
_ARMED = b"+"
# What the child hashes between pacing and parent checks: a quarter part.
_PIECE = PART_BYTES // 4
_PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
_LINE = re.compile(rb"(\d{1,9}) ([0-9a-f]{64}) ((?:[0-9a-f]{64}(?:,[0-9a-f]{64})*)?)\n")
# VmFlags of /proc/self/smaps (Documentation/filesystems/proc.rst) that unfit a mapping:
# shared, do-not-copy on fork, wipe on fork, I/O or pure-PFN mappings.
_UNFIT_FLAGS = frozenset({"sh", "dc", "wf", "io", "pf"})
_MAPPING = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)")


def _load_prctl() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return ctypes.CDLL(name, use_errno=True).prctl  # type: ignore[no-any-return]


# Loaded at import: the child may not import or load anything after the fork.
_prctl = _load_prctl()


def forkable() -> bool:
    """Whether this platform can hash in a forked child (Linux: fork, prctl)."""
    return hasattr(os, "fork") and _prctl is not None and os.path.exists("/proc/self/smaps")


def _fit_ranges() -> list[tuple[int, int]]:
    """[start, end) of this process's private anonymous mappings that a fork copies as
    they are, merged where adjacent (``/proc/self/smaps``)."""
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int, bool] | None = None
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            m = _MAPPING.match(line)
            if m is not None:
                if current is not None and current[2]:
                    ranges.append(current[:2])
                path = m[5].strip()
                anonymous = m[4] == "0" and (not path or path == "[heap]"
                                             or path.startswith("[anon"))
                current = (int(m[1], 16), int(m[2], 16), m[3][3] == "p" and anonymous)
            elif line.startswith("VmFlags:") and current is not None:
                if _UNFIT_FLAGS & set(line.split()[1:]):
                    current = (current[0], current[1], False)
    if current is not None and current[2]:
        ranges.append(current[:2])
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def snapshot_safe(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """For each tensor, whether a forked child sees its bytes exactly as they are now:
    a host tensor, not pinned or shared, wholly inside private anonymous memory without
    ``MADV_DONTFORK`` or ``MADV_WIPEONFORK``."""
    ranges = _fit_ranges()
    out = []
    for t in tensors:
        ok = t.device.type == "cpu" and not t.is_pinned() and not t.is_shared() and t.nbytes > 0
        if ok:
            start, end = t.data_ptr(), t.data_ptr() + t.nbytes
            ok = any(lo <= start and end <= hi for lo, hi in ranges)
        out.append(ok)
    return out


class SnapshotHasher:
    """A child hashing ``(index, tensor)`` from its snapshot; ``results`` reads it."""

    def __init__(self, pid: int, fd: int, nbytes: dict[int, int]):
        self.pid = pid
        self._fd = fd
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._reaped = False

    @classmethod
    def fork(cls, items: Sequence[tuple[int, torch.Tensor]],
             limit_bytes_per_s: float | None) -> "SnapshotHasher":
        """Fork the child now (raises ``OSError`` if the kernel cannot)."""
        jobs = [(i, t.data_ptr(), t.nbytes) for i, t in items]
        parent = os.getpid()
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:  # pragma: no cover - the child; its answers are what tests check
            _child_main(w, jobs, limit_bytes_per_s, parent)
        os.close(w)
        return cls(pid, r, {i: n for i, _, n in jobs})

    def results(self) -> Iterator[tuple[int, str, tuple[str, ...]]]:
        """Each tensor's (index, digest, part digests) as the child reports it, checked.
        Raises ``RuntimeError`` (the child killed and reaped) on anything else."""
        seen: set[int] = set()
        buffer = b""
        try:
            ready, _, _ = select.select([self._fd], [], [], ARM_S)
            if not ready:
                raise RuntimeError(f"the hashing child did not start within {ARM_S:.0f} s")
            if os.read(self._fd, 1) != _ARMED:
                raise RuntimeError("the hashing child ended before it started")
            longest = 140 + 65 * part_count(max(self._nbytes.values()))
            while chunk := os.read(self._fd, 1 << 16):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    yield self._checked(line + b"\n", seen)
                if len(buffer) > longest:
                    raise RuntimeError("the hashing child wrote an overlong line")
            if buffer or len(seen) != len(self._nbytes):
                raise RuntimeError(f"the hashing child gave {len(seen)} of "
                                   f"{len(self._nbytes)} digests")
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(self._fd)
            status = self._reap()
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            raise RuntimeError(f"the hashing child ended with status {status:#x}")

    def _checked(self, line: bytes, seen: set[int]) -> tuple[int, str, tuple[str, ...]]:
        m = _LINE.fullmatch(line)
        i = int(m[1]) if m is not None else -1
        if m is None or i not in self._nbytes or i in seen:
            raise RuntimeError(f"the hashing child wrote {line[:80]!r}")
        digest = m[2].decode()
        parts = tuple(m[3].decode().split(",")) if m[3] else ()
        if len(parts) != part_count(self._nbytes[i]) or (parts and join_parts(parts) != digest):
            raise RuntimeError(f"the hashing child gave parts that do not fit tensor {i}")
        seen.add(i)
        return i, digest, parts

    def _reap(self) -> int:
        with self._lock:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                status = -1  # reaped elsewhere (SIGCHLD ignored): its output decides
            self._reaped = True
            return status if status != -1 else 0

    def kill(self) -> None:
        """SIGKILL the child unless it was reaped (its pid may be another's by then)."""
        with self._lock:
            if not self._reaped:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass  # exited already; ``results`` reaps it


def _child_main(w: int, jobs: list[tuple[int, int, int]], limit: float | None,
                parent: int) -> None:  # pragma: no cover - runs in the forked child
    """Hash each (index, address, nbytes) and write its line to ``w``; exit."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        assert _prctl is not None
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)
        os.closerange(0, w)  # the worker's sockets and devices: never held open by us
        os.closerange(w + 1, max(os.sysconf("SC_OPEN_MAX"), w + 2))
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        os.write(fd, b"1000")
        os.close(fd)
        os.nice(19)
        os.write(w, _ARMED)
        start, done = time.monotonic(), 0
        for i, address, nbytes in jobs:
            view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
            hasher = PartHasher(nbytes, threads=1)
            for off in range(0, nbytes, _PIECE):
                if os.getppid() != parent:
                    os._exit(1)
                piece = view[off : off + _PIECE]
                hasher.update(piece)
                done += len(piece)
                if limit:
                    time.sleep(max(0.0, start + done / limit - time.monotonic()))
            line = f"{i} {hasher.hexdigest()} {','.join(hasher.parts)}\n".encode()
            while line:
                line = line[os.write(w, line):]
        code = 0
    finally:
        os._exit(code)
