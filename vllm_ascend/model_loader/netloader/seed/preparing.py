"""A seed that loaded from disk computes its digests after its instance started.

A seed sends each tensor with its digest, taken from the bytes as loaded. Hashing a
3 GB model on the one core vLLM CPU pins a worker to took 1.6 s of the first
instance's start-up (issue 28's measurement). Here only tensors under
``DEFER_BYTES`` (norms, biases, scales: a few MB in all) are hashed in
``load_weights``; the large ones are hashed once the model is processed and the seed
listens, on a thread at the lowest CPU priority (nice 19), which takes the core when
the worker leaves it idle: after start-up, between requests. Until it is done the seed
refuses clients with a ``preparing`` reason, which they treat like a busy seed.

What makes this exact: the digest must be of the bytes as loaded, and processing runs
in between. torch counts every in-place change of a tensor (its version counter,
which vLLM's ``process_weights_after_loading`` bumps even where it writes the same
values: the attention layers' ``_k_scale`` on vLLM CPU 0.32). A deferred tensor whose
version moved since ``load_weights`` is not hashed: the seed no longer holds its
loaded bytes, and it is dropped from the loaded layout as INT8_CACHE drops tensors
(clients are refused with its name). Tensors without a version counter (created in
inference mode) are hashed at load as before.
"""

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader.cores import worker_cores
from vllm_ascend.model_loader.netloader.load_state import NO_STATE, LoadState
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    TensorSpec,
    byte_view,
    digest_parts,
    model_tensors,
    spec_of,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES, PartHasher
from vllm_ascend.model_loader.netloader.planes.progress import Pacer

logger = get_logger(__name__)

# Tensors of at least this size are hashed after start-up: on the 3 GB benchmark model
# they are 99.9 % of the bytes; what is hashed at load is scales, norms and biases.
DEFER_BYTES = 1 << 20
_NICE = 19
# What the background thread hashes between progress reports and pacing
# (DIGEST_LIMIT_MB_PER_S): a quarter of a part.
_PIECE = PART_BYTES // 4


def _version(t: torch.Tensor) -> int | None:
    """``t``'s in-place change counter, or None for a tensor without one."""
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor has no version counter
        return None


class PendingWeights:
    """A model's tensors as loaded, the small ones' digests taken now and the large
    ones' left for ``finish``: what ``LoadedWeights.capture`` gives, in two steps."""

    def __init__(self, model: nn.Module, state: LoadState = NO_STATE):
        named = model_tensors(model)
        self.names = [name for name, _ in named]
        self.tensors = [t if t.is_contiguous() else t.contiguous() for _, t in named]
        self.specs: tuple[TensorSpec, ...] = tuple(spec_of(n, t) for n, t in named)
        self.state = state
        self.total_bytes = sum(s.nbytes for s in self.specs)
        self._versions = [_version(t) for t in self.tensors]
        self.deferred = [i for i, t in enumerate(self.tensors)
                         if t.nbytes >= DEFER_BYTES and self._versions[i] is not None]
        later = set(self.deferred)
        self._digests: list[str | None] = [None] * len(self.tensors)
        self._parts: dict[str, tuple[str, ...]] = {}
        for i in range(len(self.tensors)):
            if i not in later:
                self._hash(i)
        self.deferred_bytes = sum(self.specs[i].nbytes for i in self.deferred)

    def _hash(self, i: int) -> None:
        d, p = digest_parts(self.tensors[i])
        self._digests[i] = d
        if p:
            self._parts[d] = p

    def _hash_paced(self, i: int, on_bytes: Callable[[int], None] | None,
                    pacer: Pacer | None) -> None:
        """``_hash`` a piece at a time (the digest is the same), reporting each."""
        data = memoryview(byte_view(self.tensors[i]).numpy())  # type: ignore[arg-type]
        hasher = PartHasher(len(data))
        for start in range(0, len(data), _PIECE):
            piece = data[start : start + _PIECE]
            hasher.update(piece)
            if on_bytes is not None:
                on_bytes(len(piece))
            if pacer is not None:
                pacer.sent(len(piece))
        d = hasher.hexdigest()
        self._digests[i] = d
        if hasher.parts:
            self._parts[d] = tuple(hasher.parts)

    def finish(
        self, on_bytes: Callable[[int], None] | None = None, pacer: Pacer | None = None,
    ) -> LoadedWeights:
        """Hash the deferred tensors; those changed in place since the load (their
        version moved, before or while they were hashed) are dropped, a meta tensor of
        their shape standing in. ``on_bytes(n)`` hears of each ``n`` bytes hashed;
        ``pacer`` (DIGEST_LIMIT_MB_PER_S) keeps the hashing at its rate."""
        dropped: list[str] = []
        for i in self.deferred:
            t = self.tensors[i]
            if _version(t) == self._versions[i]:
                self._hash_paced(i, on_bytes, pacer)
            if _version(t) != self._versions[i]:
                dropped.append(self.names[i])
                self.tensors[i] = torch.empty(t.shape, dtype=t.dtype, device="meta")
                self._digests[i] = "0" * 64  # never sent: a seed with dropped tensors refuses
        named = list(zip(self.names, self.tensors, strict=True))
        digests = [d for d in self._digests if d is not None]
        assert len(digests) == len(named), "every tensor is hashed or dropped"
        parts = {d: p for d, p in self._parts.items() if d in set(digests)}
        return LoadedWeights(named, digests, self.state, tuple(dropped), parts)


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
            "layouts": {name: {"unavailable": self.reason()} for name in layouts},
            "relaying": False,
            "preparing": {"hashed_bytes": self.hashed_bytes, "total_bytes": self.total_bytes,
                          "error": self.error},
        }


def prepare_in_background(
    pending: PendingWeights, preparation: Preparation, who: str,
    ready: Callable[[LoadedWeights], None], limit_bytes_per_s: float | None = None,
) -> threading.Thread:
    """Hash ``pending``'s deferred tensors on a thread at nice 19 (at most
    ``limit_bytes_per_s``, DIGEST_LIMIT_MB_PER_S), then call ``ready`` with the finished
    weights (it starts serving them). A failure is logged and kept in
    ``preparation.error``; the seed then goes on refusing."""

    def run() -> None:
        try:
            _lower_priority(who)
            with worker_cores(who):
                weights = pending.finish(lambda n: _count(preparation, n),
                                         Pacer(limit_bytes_per_s) if limit_bytes_per_s else None)
                ready(weights)
            preparation.done = True
            logger.info("%s: digests of %d tensor(s), %.3f GB, computed after start-up%s",
                        who, len(pending.deferred), pending.deferred_bytes / 1e9,
                        f"; {len(weights.dropped)} changed in place by processing, e.g. "
                        f"{weights.dropped[0]}" if weights.dropped else "")
        except Exception as e:  # noqa: BLE001 - thread top level: the seed refuses, the worker serves
            preparation.error = f"{type(e).__name__}: {e}"
            logger.exception("%s: computing the digests failed; this seed refuses clients", who)

    thread = threading.Thread(target=run, name="netloader-seed-digests", daemon=True)
    thread.start()
    return thread


def _count(preparation: Preparation, n: int) -> None:
    preparation.hashed_bytes += n


def _lower_priority(who: str) -> None:
    """Nice 19 for the calling thread (Linux: ``setpriority`` on a thread id sets that
    thread's nice alone): it takes a busy core's idle moments, ~1.5 % of it otherwise."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
    except (AttributeError, OSError) as e:
        logger.info("%s: hashing at normal priority (%s)", who, e)
