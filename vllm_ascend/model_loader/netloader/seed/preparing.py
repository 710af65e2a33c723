"""A seed that loaded from disk computes its digests after its instance started.

A seed sends each tensor with its digest, taken from the bytes as loaded. Hashing a
3 GB model on the one core vLLM CPU pins a worker to took 1.6 s of the first
instance's start-up (issue 28's measurement). Here only tensors under
``DEFER_BYTES`` (norms, biases, scales: a few MB in all) and tensors in device memory
are hashed in ``load_weights``. For the large host tensors, ``load_weights`` forks a
child process that hashes them from its copy-on-write snapshot of the worker's memory,
at nice 19 (it takes the worker's core when vLLM leaves it idle: after start-up,
between requests), and writes the digests to a pipe. Until they are in, the seed
refuses clients with a ``preparing`` reason, which they treat like a busy seed.

Why a snapshot, not a thread hashing the model later: the digests must be of the bytes
as loaded, and ``process_weights_after_loading`` runs in between and may change a
tensor in place in ways nothing records (through ``.data``, numpy or a custom op, none
of which move torch's version counter). The child sees every page exactly as it was
when ``load_weights`` ended, whatever the worker writes afterwards; the kernel copies a
page only when the worker writes it. The cost is that pages the worker frees meanwhile
(the loaded copies processing replaced) stay allocated until the child exits.

The child is our own code, but is treated as a peer that may fail: its answer is read
under a size bound, checked line by line, and anything wrong (it died, short or
malformed output) fails the preparation: the seed refuses with ``digests_failed``.
The child touches no lock another thread may hold at the fork (no logging, no torch,
no imports) and dies with the worker (``PR_SET_PDEATHSIG``).
"""

import ctypes
import ctypes.util
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader.load_state import NO_STATE, LoadState
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    TensorSpec,
    digest_parts,
    model_tensors,
    spec_of,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES, PartHasher, part_count

logger = get_logger(__name__)

# Host tensors of at least this size are hashed after start-up: on the 3 GB benchmark
# model they are 99.9 % of the bytes; what is hashed at load is scales, norms, biases.
DEFER_BYTES = 1 << 20
_NICE = 19
# What the child hashes between pacing checks (DIGEST_LIMIT_MB_PER_S): a quarter part.
_PIECE = PART_BYTES // 4
_PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
_LINE = re.compile(r"(\d+) ([0-9a-f]{64}) ((?:[0-9a-f]{64}(?:,[0-9a-f]{64})*)?)\n")


def _load_prctl() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return ctypes.CDLL(name, use_errno=True).prctl  # type: ignore[no-any-return]


# Loaded here, at import: the child may not import or load anything after the fork.
_prctl = _load_prctl()


def _forkable() -> bool:
    return hasattr(os, "fork") and hasattr(os, "pipe") and _prctl is not None


class PendingWeights:
    """A model's tensors as loaded, the small ones' (and device ones') digests taken
    now and the large host ones' being computed by a child process from a snapshot
    taken now: what ``LoadedWeights.capture`` gives, in two steps. ``finish`` waits
    for the child. ``limit_bytes_per_s`` paces the child (DIGEST_LIMIT_MB_PER_S).
    Where the platform cannot fork, everything is hashed now."""

    def __init__(self, model: nn.Module, state: LoadState = NO_STATE,
                 limit_bytes_per_s: float | None = None):
        named = model_tensors(model)
        self.names = [name for name, _ in named]
        self.tensors = [t if t.is_contiguous() else t.contiguous() for _, t in named]
        self.specs: tuple[TensorSpec, ...] = tuple(spec_of(n, t) for n, t in named)
        self.state = state
        self.total_bytes = sum(s.nbytes for s in self.specs)
        self.deferred = [i for i, t in enumerate(self.tensors) if _forkable()
                         and t.nbytes >= DEFER_BYTES and t.device.type == "cpu"]
        self._digests: list[str | None] = [None] * len(self.tensors)
        self._parts: dict[str, tuple[str, ...]] = {}
        self._child: _Child | None = None
        if self.deferred:
            start = time.perf_counter()
            try:
                self._child = _Child.fork([(i, self.tensors[i]) for i in self.deferred],
                                          limit_bytes_per_s)
                logger.info("Netloader: child %d hashes %d tensor(s), %.3f GB, from a snapshot "
                            "of the load (forked in %.3f s)", self._child.pid, len(self.deferred),
                            sum(self.tensors[i].nbytes for i in self.deferred) / 1e9,
                            time.perf_counter() - start)
            except OSError as e:  # no memory for the page tables, a process limit
                logger.warning("Netloader: cannot fork to hash %d tensor(s) after start-up "
                               "(%s); hashing them now", len(self.deferred), e)
                self.deferred = []
        later = set(self.deferred)
        for i, t in enumerate(self.tensors):
            if i not in later:
                d, p = digest_parts(t)
                self._record(i, d, p)
        self.deferred_bytes = sum(self.specs[i].nbytes for i in self.deferred)

    def _record(self, i: int, d: str, parts: Sequence[str]) -> None:
        self._digests[i] = d
        if parts:
            self._parts[d] = tuple(parts)

    def finish(self, on_bytes: Callable[[int], None] | None = None) -> LoadedWeights:
        """The weights with every digest: waits for the child's. ``on_bytes(n)`` hears
        of each ``n`` bytes hashed. Raises ``RuntimeError`` if the child failed."""
        if self._child is not None:
            nbytes = {i: self.specs[i].nbytes for i in self.deferred}
            for i, d, parts in self._child.results(nbytes):
                self._record(i, d, parts)
                if on_bytes is not None:
                    on_bytes(nbytes[i])
            self._child = None
        digests = [d for d in self._digests if d is not None]
        if len(digests) != len(self.tensors):
            raise RuntimeError("the digest of a tensor is missing")
        named = list(zip(self.names, self.tensors, strict=True))
        return LoadedWeights(named, digests, self.state, parts=self._parts)

    def cancel(self) -> None:
        """Stop the child, if it still runs (its seed stopped)."""
        if self._child is not None:
            self._child.kill()


class _Child:
    """The child process hashing host tensors from its snapshot, and the read end of
    its pipe: one line per tensor, ``index digest part,part,...``."""

    def __init__(self, pid: int, fd: int, expected: int):
        self.pid = pid
        self._fd = fd
        self._expected = expected  # lines

    @classmethod
    def fork(cls, items: list[tuple[int, torch.Tensor]], limit: float | None) -> "_Child":
        jobs = [(i, t.data_ptr(), t.nbytes) for i, t in items]
        parent = os.getpid()
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:  # pragma: no cover - the child; its output is what the tests check
            _child_main(w, r, jobs, limit, parent)
        os.close(w)
        return cls(pid, r, len(jobs))

    def results(self, nbytes: dict[int, int]) -> list[tuple[int, str, tuple[str, ...]]]:
        """Every tensor's (index, digest, part digests), checked: each index once, each
        digest and part count as its size requires. Raises ``RuntimeError``."""
        cap = sum(140 + 65 * part_count(n) for n in nbytes.values())
        data = bytearray()
        try:
            while chunk := os.read(self._fd, 1 << 16):
                data += chunk
                if len(data) > cap:
                    raise RuntimeError(f"the hashing child wrote more than {cap} bytes")
        finally:
            os.close(self._fd)
            _, status = os.waitpid(self.pid, 0)
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            raise RuntimeError(f"the hashing child ended with status {status:#x}")
        out: dict[int, tuple[str, tuple[str, ...]]] = {}
        for line in data.decode("ascii", "replace").splitlines(keepends=True):
            m = _LINE.fullmatch(line)
            if m is None or int(m[1]) not in nbytes or int(m[1]) in out:
                raise RuntimeError(f"the hashing child wrote {line[:80]!r}")
            parts = tuple(m[3].split(",")) if m[3] else ()
            if len(parts) != part_count(nbytes[int(m[1])]):
                raise RuntimeError(f"the hashing child gave {len(parts)} parts for tensor {m[1]}")
            out[int(m[1])] = (m[2], parts)
        if len(out) != self._expected:
            raise RuntimeError(f"the hashing child gave {len(out)} of {self._expected} digests")
        return [(i, d, p) for i, (d, p) in out.items()]

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass  # gone already; ``results`` reaps it


def _child_main(w: int, r: int, jobs: list[tuple[int, int, int]], limit: float | None,
                parent: int) -> None:  # pragma: no cover - runs in the forked child
    """Hash each (index, address, nbytes) and write its line to ``w``; exit. Only
    system calls, blake3 and plain Python: another thread of the worker may have held
    any lock at the fork."""
    code = 1
    try:
        assert _prctl is not None
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the worker died before the signal was armed
        os.close(r)
        os.closerange(0, w)  # sockets and files of the worker: never held open by us
        os.closerange(w + 1, 1 << 16)
        os.nice(_NICE)
        start, done = time.monotonic(), 0
        for i, address, nbytes in jobs:
            view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
            hasher = PartHasher(nbytes, threads=1)
            for off in range(0, nbytes, _PIECE):
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


@dataclass
class Preparation:
    """How far a preparing seed is: hashed and total bytes of its deferred tensors,
    and how it ended (``done``; ``error`` if it failed). ``specs``: its manifest."""

    specs: tuple[TensorSpec, ...]
    total_bytes: int
    hashed_bytes: int = 0
    done: bool = False
    error: str | None = None

    def refusal(self) -> tuple[str, str]:
        """(kind, reason) of a refusal meanwhile: ``preparing`` (clients retry), or
        ``digests_failed`` once the hashing failed (the seed will never serve)."""
        if self.error is not None:
            return "digests_failed", f"this seed could not compute its digests ({self.error})"
        return "preparing", self.reason()

    def reason(self) -> str:
        """Why a client is refused meanwhile."""
        return (f"seed is preparing: computing the digests of its weights "
                f"({self.hashed_bytes / 1e6:.1f} of {self.total_bytes / 1e6:.1f} MB)")

    def seed_info(self, common: dict[str, Any], layouts: Sequence[str]) -> dict[str, Any]:
        """A preparing seed's ``info``: ``common`` (identity, address, load, transfers)
        and no value fingerprint yet."""
        return {
            **common,
            "tensors": len(self.specs),
            "bytes": sum(s.nbytes for s in self.specs),
            "value_fingerprint": None,
            "layouts": {name: {"unavailable": self.refusal()[1]} for name in layouts},
            "relaying": False,
            "preparing": {"hashed_bytes": self.hashed_bytes, "total_bytes": self.total_bytes,
                          "error": self.error},
        }


def prepare_in_background(
    pending: PendingWeights, preparation: Preparation, who: str,
    ready: Callable[[LoadedWeights], None],
) -> threading.Thread:
    """Wait for ``pending``'s digests on a thread (the hashing itself runs in the
    child, at nice 19), then call ``ready`` with the finished weights (it starts
    serving them). A failure is logged and kept in ``preparation.error``; the seed then
    refuses for good."""

    def run() -> None:
        start = time.monotonic()
        try:
            weights = pending.finish(lambda n: _count(preparation, n))
        except Exception as e:  # noqa: BLE001 - thread top level: the seed refuses, the worker serves
            preparation.error = f"{type(e).__name__}: {e}"
            logger.exception("%s: computing the digests failed; this seed refuses clients", who)
            return
        logger.info("%s: digests of %d tensor(s), %.3f GB, computed in %.1f s after load",
                    who, len(pending.deferred), pending.deferred_bytes / 1e9,
                    time.monotonic() - start)
        try:
            ready(weights)
            preparation.done = True
        except Exception as e:  # noqa: BLE001 - thread top level, as above
            preparation.error = f"{type(e).__name__}: {e}"
            logger.exception("%s: starting to serve after the digests failed", who)

    thread = threading.Thread(target=run, name="netloader-seed-digests", daemon=True)
    thread.start()
    return thread


def _count(preparation: Preparation, n: int) -> None:
    preparation.hashed_bytes += n
