"""Which tensors move, in which order, and how they are fingerprinted.

The manifest is every parameter and buffer of the model as built and loaded, in
``model_tensors`` order, each tensor object once (tied ones under their first name):
names, shapes, dtypes and sizes. Both layouts move under it (``layout``): as loaded
(right after ``load_weights``; the client runs vLLM's processing on it as a disk load
would), or as processed (what the running model reads after processing, or the bytes a
kernel was built from). A client computes the manifest from its own model (built on the
meta device for the processed layout) and sends only its sha256, so a seed never parses
a peer's tensor list and no peer chooses a shape the client allocates.

``LoadedWeights`` is what a seed sends: detached views of the tensors and their
digests. Where processing replaced a loaded tensor, the seed's view keeps the loaded
storage alive (``seed.retention`` decides for how long). A tensor that processing
modified in place no longer matches the digest taken at load, so the client, which
checks every tensor, rejects the transfer. (The seed does not re-digest after
processing itself: on vLLM CPU that changed a 1 GB model's greedy outputs;
``LoadedWeights.changed`` stays for tests and diagnosis.)
"""

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader.load_state import NO_STATE, LoadState
from vllm_ascend.model_loader.netloader.parts import PartHasher, join_parts, part_count

# What a model is to its instance: the served model, or the draft a speculative decoder
# loads beside it. Each has its own listener, and a listener only serves its own role.
TARGET = "target"
DRAFT = "draft"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a manifest: its name, shape, dtype name and size in bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_wire(self) -> list[Any]:
        return [self.name, list(self.shape), self.dtype, self.nbytes]

    @classmethod
    def from_wire(cls, item: Any) -> "TensorSpec":
        """Parse a peer's manifest entry; raises ValueError if it is malformed."""
        ok = (
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and isinstance(item[1], list)
            and all(isinstance(d, int) and d >= 0 for d in item[1])
            and isinstance(item[2], str)
            and isinstance(item[3], int)
            and item[3] >= 0
        )
        if not ok:
            raise ValueError(f"malformed manifest entry {str(item)[:200]}")
        return cls(item[0], tuple(item[1]), item[2], item[3])


def model_tensors(model: nn.Module, meta: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, each tensor object once (tied ones under their first
    name); those on the meta device only with ``meta`` (a model built there to receive
    the processed layout, ``processed``)."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    return [(name, t.detach()) for name, t in named if meta or not t.is_meta]


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.nbytes)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor sharing its storage."""
    if not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


def digest(t: torch.Tensor) -> str:
    """A tensor's value digest, 64 hex digits (host copy for device tensors): blake3 of
    its bytes up to ``PART_BYTES``, else ``join_parts`` of its parts' digests."""
    return digest_parts(t)[0]


def digest_parts(t: torch.Tensor) -> tuple[str, tuple[str, ...]]:
    """(``digest(t)``, the blake3 of each ``PART_BYTES`` piece of its bytes in order,
    the last one shorter; () for a tensor of at most ``PART_BYTES``)."""
    data = memoryview(byte_view(t.contiguous()).cpu().numpy())  # type: ignore[arg-type]
    hasher = PartHasher(len(data))
    hasher.update(data)
    return hasher.hexdigest(), tuple(hasher.parts)


def manifest_sha256(specs: Sequence[TensorSpec]) -> str:
    """sha256 of the manifest's canonical wire form: a client sends this instead of
    the manifest itself, so a seed never parses a peer's tensor list."""
    wire = json.dumps([spec.to_wire() for spec in specs], separators=(",", ":"))
    return hashlib.sha256(wire.encode()).hexdigest()


def first_difference(
    mine: Sequence[TensorSpec], theirs: Sequence[TensorSpec]
) -> str | None:
    """Why two manifests differ (the first difference), or None if they are equal."""
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            return f"tensor differs: {a.to_wire()} here vs {b.to_wire()} there"
    if len(mine) != len(theirs):
        return f"{len(mine)} tensors here vs {len(theirs)} there"
    return None


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Group consecutive tensors into buckets of at most ``bucket_bytes``;
    a tensor of that size or more travels alone."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, spec in enumerate(specs):
        if spec.nbytes >= bucket_bytes:
            if current:
                buckets.append(current)
                current, size = [], 0
            buckets.append([i])
            continue
        if size + spec.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += spec.nbytes
    if current:
        buckets.append(current)
    return buckets


# The part digests (``digest_parts``) of the tensors larger than ``PART_BYTES``, by
# their tensor digest.
Parts = Mapping[str, tuple[str, ...]]


class LoadedWeights:
    """A model's tensors as loaded, with their digests and the part digests of the
    large ones (``parts``): what a seed sends. Immutable once built; a relay's progress
    through them lives in ``relay.RelayProgress``.

    A non-contiguous tensor is kept as a contiguous copy (so it can be sent as bytes),
    which an in-place change to the model's original no longer reaches. vLLM's loaded
    parameters are contiguous."""

    def __init__(
        self, named: list[tuple[str, torch.Tensor]], digests: list[str],
        state: LoadState = NO_STATE, dropped: tuple[str, ...] = (),
        parts: Parts | None = None,
    ):
        """``parts`` None: computed from the tensors' bytes (tests). Raises ValueError
        if a digest is missing, or a large tensor's parts are missing or do not join
        to its digest."""
        if len(named) != len(digests):
            raise ValueError("one digest per tensor is needed")
        if parts is None:
            parts = dict(digest_parts(t) for _, t in named
                         if part_count(t.nbytes) and not t.is_meta)
        self.tensors: tuple[torch.Tensor, ...] = tuple(
            t if t.is_contiguous() else t.contiguous() for _, t in named
        )
        self.specs: tuple[TensorSpec, ...] = tuple(spec_of(name, t) for name, t in named)
        self.digests: tuple[str, ...] = tuple(digests)
        self.parts: dict[str, tuple[str, ...]] = {}
        for spec, d in zip(self.specs, self.digests, strict=True):
            if not part_count(spec.nbytes):
                continue
            mine = parts.get(d)
            if mine is None or len(mine) != part_count(spec.nbytes) or join_parts(mine) != d:
                if spec.name in dropped:
                    continue  # never sent: a seed with dropped tensors refuses clients
                raise ValueError(f"no part digests that join to the digest of {spec.name}")
            self.parts[d] = tuple(mine)
        # What load_weights set besides tensors (``load_state``): served with them.
        self.state = state
        # Tensors whose loaded bytes this seed did not keep (``seed_cache``): meta
        # tensors stand in for them, and a seed with any refuses clients.
        self.dropped = dropped
        self.total_bytes = sum(spec.nbytes for spec in self.specs)
        self._fingerprint = value_fingerprint(self.specs, self.digests, state)

    @classmethod
    def capture(
        cls, model: nn.Module, digests: list[str] | None = None, state: LoadState = NO_STATE,
        parts: Parts | None = None,
    ) -> "LoadedWeights":
        """Views of ``model``'s tensors now; digests (and part digests) computed unless
        already known."""
        named = model_tensors(model)
        if digests is not None:
            return cls(named, digests, state, parts=parts)
        both = [digest_parts(t) for _, t in named]
        return cls(named, [d for d, _ in both], state, parts={d: p for d, p in both if p})

    def changed(self) -> list[str]:
        """Names of tensors whose bytes no longer match the digest taken at load."""
        return [
            spec.name
            for spec, t, d in zip(self.specs, self.tensors, self.digests, strict=True)
            if digest(t) != d
        ]

    def value_fingerprint(self) -> str:
        """One digest over every tensor's name and value digest, comparable with a disk load."""
        return self._fingerprint


def value_fingerprint(
    specs: Sequence[TensorSpec], digests: Sequence[str], state: LoadState = NO_STATE
) -> str:
    """sha256 over every tensor's name and value digest, in manifest order, then the
    load state's digest if the load set any (64 hex digits): equal fingerprints mean
    equal loaded weights, byte for byte, and equal state set while loading."""
    h = hashlib.sha256()
    for spec, d in zip(specs, digests, strict=True):
        h.update(f"{spec.name}:{d};".encode())
    state_digest = state.digest()
    if state_digest is not None:
        h.update(f"load_state:{state_digest};".encode())
    return h.hexdigest()
