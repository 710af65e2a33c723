"""A seed that loaded from disk computes its digests after its instance started.

A seed sends each tensor with its digest, taken from the bytes as loaded. Hashing a
3 GB model on the one core vLLM CPU pins a worker to took 1.6 s of the first
instance's start-up (issue 28's measurement). Here, on the CPU platform, the large
host tensors (``DEFER_BYTES`` and more) that a fork copies as they are
(``snapshot.snapshot_safe``) are hashed by a child process forked at the end of
``load_weights``, from its copy-on-write snapshot of the worker, at the lowest
priority: it takes the worker's core when vLLM leaves it idle (after start-up, between
requests). Everything else (norms, biases, scales; device, pinned or shared memory) is
hashed in ``load_weights`` as before. Until the child's digests are in, the seed
refuses clients with a ``preparing`` reason, which they treat like a busy seed.

Why a snapshot, not a thread hashing the model later: the digests must be of the bytes
as loaded, and ``process_weights_after_loading`` runs in between and may change a
tensor in place in ways nothing records (through ``.data``, numpy or a custom op, none
of which move torch's version counter). The cost: pages the worker frees meanwhile (the
loaded copies processing replaced) stay allocated until the child exits.
"""

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from vllm_ascend.model_loader.netloader.seed.snapshot import (
    SnapshotHasher,
    forkable,
    snapshot_safe,
)

logger = get_logger(__name__)

# Host tensors of at least this size are hashed after start-up: on the 3 GB benchmark
# model they are 99.9 % of the bytes; what is hashed at load is scales, norms, biases.
DEFER_BYTES = 1 << 20


class PendingWeights:
    """A model's tensors as loaded, some digests taken now and the large host ones'
    being computed by a child process from a snapshot taken now (``defer``: the CPU
    platform): what ``LoadedWeights.capture`` gives, in two steps. ``finish`` waits for
    the child; ``limit_bytes_per_s`` paces it (DIGEST_LIMIT_MB_PER_S)."""

    def __init__(self, model: nn.Module, state: LoadState = NO_STATE,
                 limit_bytes_per_s: float | None = None, defer: bool = True):
        named = model_tensors(model)
        self.names = [name for name, _ in named]
        self.tensors = [t if t.is_contiguous() else t.contiguous() for _, t in named]
        self.specs: tuple[TensorSpec, ...] = tuple(spec_of(n, t) for n, t in named)
        self.state = state
        self.total_bytes = sum(s.nbytes for s in self.specs)
        large = [i for i, t in enumerate(self.tensors) if t.nbytes >= DEFER_BYTES]
        safe = snapshot_safe([self.tensors[i] for i in large]) if defer and forkable() else []
        self.deferred = [i for i, ok in zip(large, safe, strict=False) if ok]
        self._digests: list[str | None] = [None] * len(self.tensors)
        self._parts: dict[str, tuple[str, ...]] = {}
        self._child: SnapshotHasher | None = None
        self.cancelled = False
        if self.deferred:
            self._fork(limit_bytes_per_s)
        later = set(self.deferred)
        for i, t in enumerate(self.tensors):
            if i not in later:
                d, p = digest_parts(t)
                self._record(i, d, p)
        self.deferred_bytes = sum(self.specs[i].nbytes for i in self.deferred)

    def _fork(self, limit_bytes_per_s: float | None) -> None:
        start = time.perf_counter()
        try:
            self._child = SnapshotHasher.fork([(i, self.tensors[i]) for i in self.deferred],
                                              limit_bytes_per_s)
        except OSError as e:  # no memory for the page tables, a process limit
            logger.warning("Netloader: cannot fork to hash %d tensor(s) after start-up (%s); "
                           "hashing them now", len(self.deferred), e)
            self.deferred = []
            return
        logger.info("Netloader: child %d hashes %d tensor(s), %.3f GB, from a snapshot of the "
                    "load (forked in %.3f s)", self._child.pid, len(self.deferred),
                    sum(self.tensors[i].nbytes for i in self.deferred) / 1e9,
                    time.perf_counter() - start)

    def _record(self, i: int, d: str, parts: Sequence[str]) -> None:
        self._digests[i] = d
        if parts:
            self._parts[d] = tuple(parts)

    def finish(self, on_bytes: Callable[[int], None] | None = None) -> LoadedWeights:
        """The weights with every digest: waits for the child's. ``on_bytes(n)`` hears
        of each ``n`` bytes hashed, tensor by tensor. Raises ``RuntimeError`` if the
        child failed (this object then lets go of the tensors)."""
        child = self._child
        try:
            for i, d, parts in child.results() if child is not None else ():
                self._record(i, d, parts)
                if on_bytes is not None:
                    on_bytes(self.specs[i].nbytes)
            digests = [d for d in self._digests if d is not None]
            if len(digests) != len(self.tensors):
                raise RuntimeError("the digest of a tensor is missing")
        except BaseException:
            self.tensors = []  # a failed seed keeps nothing alive
            raise
        finally:
            self._child = None
        named = list(zip(self.names, self.tensors, strict=True))
        return LoadedWeights(named, digests, self.state, parts=self._parts)

    def cancel(self) -> None:
        """Stop the child, if it still runs (its seed stopped): ``finish`` then raises."""
        self.cancelled = True
        child = self._child
        if child is not None:
            child.kill()


@dataclass
class Preparation:
    """How far a preparing seed is: hashed and total bytes of its deferred tensors,
    and why it failed (``error``). ``specs``: its manifest."""

    specs: tuple[TensorSpec, ...]
    total_bytes: int
    hashed_bytes: int = 0
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
    ready: Callable[[LoadedWeights], None], failed: Callable[[], None] = lambda: None,
) -> threading.Thread:
    """Wait for ``pending``'s digests on a thread (the hashing itself runs in the
    child, at nice 19), then call ``ready`` with the finished weights (it starts
    serving them). A failure is logged and kept in ``preparation.error`` (the seed then
    refuses for good), and ``failed`` is called."""

    def run() -> None:
        start = time.monotonic()
        try:
            weights = pending.finish(lambda n: _count(preparation, n))
        except Exception as e:  # noqa: BLE001 - thread top level: the seed refuses, the worker serves
            preparation.error = f"{type(e).__name__}: {e}"
            if pending.cancelled:
                logger.info("%s: stopped while computing its digests", who)
            else:
                logger.exception("%s: computing the digests failed; this seed refuses "
                                 "clients", who)
            failed()
            return
        logger.info("%s: digests of %d tensor(s), %.3f GB, computed in %.1f s after load",
                    who, len(pending.deferred), pending.deferred_bytes / 1e9,
                    time.monotonic() - start)
        try:
            ready(weights)
        except Exception as e:  # noqa: BLE001 - thread top level, as above
            preparation.error = f"{type(e).__name__}: {e}"
            logger.exception("%s: starting to serve after the digests failed", who)
            failed()

    thread = threading.Thread(target=run, name="netloader-seed-digests", daemon=True)
    thread.start()
    return thread


def _count(preparation: Preparation, n: int) -> None:
    preparation.hashed_bytes += n
