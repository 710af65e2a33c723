"""Which tensors move, in which order, and how they are fingerprinted.

What moves is the model *as loaded*: every parameter and buffer right after
``load_weights`` and before ``process_weights_after_loading``. The client then
runs vLLM's own post-processing on it, exactly as a disk load would. Sending the
processed form instead does not work in general: on CPU, processing packs linear
weights into opaque oneDNN/sgl handles and leaves empty parameters behind, and
the lm_head keeps its weight *and* a packed copy that a receive would not update.

A seed therefore keeps detached views of the loaded tensors. Where processing
replaced a parameter (or swapped its ``.data``), the view keeps the loaded storage
alive. A tensor that processing modified in place no longer matches the digest
taken at load, so the client, which checks every tensor, rejects the transfer and
loads from disk. (The seed does not re-digest after processing itself: on vLLM CPU
that changed a 1 GB model's greedy outputs; ``LoadedWeights.changed`` stays for
tests and diagnosis.)
"""

import hashlib
import itertools
import json
import threading
from dataclasses import dataclass
from typing import Any

import blake3
import torch
from torch import nn

_THREADED_DIGEST_BYTES = 1 << 20
# Identity fields a client and its seed must agree on, in the order they are reported.
IDENTITY_FIELDS = (
    "model",
    "architectures",
    "config_sha256",
    "dtype",
    "quantization",
    "revision",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "rank",
    "role",
)
# What a model is to its instance: the served model, or the draft a speculative decoder
# loads beside it. Each has its own listener, and a listener only serves its own role.
TARGET = "target"
DRAFT = "draft"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_wire(self) -> list[Any]:
        return [self.name, list(self.shape), self.dtype, self.nbytes]

    @classmethod
    def from_wire(cls, item: Any) -> "TensorSpec":
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


def model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, each tensor object once (tied ones under their first name)."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    return [(name, t.detach()) for name, t in named if not t.is_meta]


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.nbytes)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor sharing its storage."""
    if not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


def digest(t: torch.Tensor) -> str:
    """blake3 of the tensor's bytes (host copy for device tensors)."""
    data = byte_view(t.contiguous()).cpu().numpy()
    threads = blake3.blake3.AUTO if data.nbytes >= _THREADED_DIGEST_BYTES else 1
    return blake3.blake3(data.data, max_threads=threads).hexdigest()


def first_difference(mine: list[TensorSpec], theirs: list[TensorSpec]) -> str | None:
    """Why two manifests differ (the first difference), or None if they are equal."""
    for a, b in zip(mine, theirs, strict=False):
        if a != b:
            return f"tensor differs: {a.to_wire()} here vs {b.to_wire()} there"
    if len(mine) != len(theirs):
        return f"{len(mine)} tensors here vs {len(theirs)} there"
    return None


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int) -> list[list[int]]:
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


class RelayStalled(Exception):
    """A relay cannot send what its own transfer has not (yet) verified."""


class LoadedWeights:
    """A model's tensors as loaded, with their digests: what a seed sends.

    A non-contiguous tensor is kept as a contiguous copy (so it can be sent as bytes),
    which an in-place change to the model's original no longer reaches. vLLM's loaded
    parameters are contiguous."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], digests: list[str]):
        if len(named) != len(digests):
            raise ValueError("one digest per tensor is needed")
        self.tensors = [t if t.is_contiguous() else t.contiguous() for _, t in named]
        self.specs = [spec_of(name, t) for name, t in named]
        self.digests = digests
        # How many leading tensors (in manifest order) hold their final bytes. A relay's
        # weights fill up while its own transfer runs; a captured model's are all there.
        self._ready = len(named)
        self._failure: str | None = None
        self._progress = threading.Condition()

    @classmethod
    def capture(cls, model: nn.Module, digests: list[str] | None = None) -> "LoadedWeights":
        """Views of ``model``'s tensors now; digests computed unless already known."""
        named = model_tensors(model)
        return cls(named, digests if digests is not None else [digest(t) for _, t in named])

    @classmethod
    def receiving(
        cls, named: list[tuple[str, torch.Tensor]], digests: list[str]
    ) -> "LoadedWeights":
        """A relay's weights: views of tensors its own transfer is still filling, to be
        verified against ``digests``; ``verified`` reports its progress."""
        weights = cls(named, digests)
        weights._ready = 0
        return weights

    def verified(self, count: int) -> None:
        """The first ``count`` tensors now hold bytes that matched their digests."""
        with self._progress:
            self._ready = max(self._ready, count)
            self._progress.notify_all()

    def fail(self, reason: str) -> None:
        """The relay's own transfer failed: tensors not yet verified never will be."""
        with self._progress:
            self._failure = reason
            self._progress.notify_all()

    @property
    def complete(self) -> bool:
        with self._progress:
            return self._ready == len(self.tensors)

    @property
    def failure(self) -> str | None:
        with self._progress:
            return self._failure

    def wait_ready(self, count: int, timeout_s: float) -> None:
        """Block until the first ``count`` tensors are verified. Raises ``RelayStalled``
        if the relay's own transfer failed first, or made no progress for ``timeout_s``."""
        with self._progress:
            while self._ready < count:
                if self._failure is not None:
                    raise RelayStalled(f"relay's own transfer failed: {self._failure}")
                before = self._ready
                self._progress.wait(timeout_s)
                if self._ready == before and self._failure is None:
                    raise RelayStalled(
                        f"relay's own transfer made no progress for {timeout_s:.0f} s "
                        f"({self._ready} of {len(self.tensors)} tensors verified)"
                    )

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)

    def changed(self) -> list[str]:
        """Names of tensors whose bytes no longer match the digest taken at load."""
        return [
            spec.name
            for spec, t, d in zip(self.specs, self.tensors, self.digests, strict=True)
            if digest(t) != d
        ]

    def value_fingerprint(self) -> str:
        """One digest over every tensor's name and value digest, comparable with a disk load."""
        return value_fingerprint(self.specs, self.digests)


def value_fingerprint(specs: list[TensorSpec], digests: list[str]) -> str:
    h = hashlib.sha256()
    for spec, d in zip(specs, digests, strict=True):
        h.update(f"{spec.name}:{d};".encode())
    return h.hexdigest()


def model_identity(
    model_config: Any, parallel_config: Any, rank: int, name: str, role: str = TARGET
) -> dict[str, Any]:
    """What a client and seed must agree on before any weight moves."""
    hf_config = model_config.hf_config
    config = {
        k: v
        for k, v in hf_config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    canonical = json.dumps(config, sort_keys=True, default=str)
    return {
        "model": name,
        "architectures": list(getattr(hf_config, "architectures", None) or []),
        "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "quantization": model_config.quantization,
        "revision": model_config.revision,
        "tensor_parallel_size": parallel_config.tensor_parallel_size,
        "pipeline_parallel_size": parallel_config.pipeline_parallel_size,
        "rank": rank,
        "role": role,
    }


def identity_difference(mine: dict[str, Any], theirs: Any) -> str | None:
    """Why two identities differ (every differing field), or None if they match."""
    if not isinstance(theirs, dict):
        return "identity is not an object"
    diffs = [
        f"{key}: {mine.get(key)!r} here vs {theirs.get(key)!r} there"
        for key in IDENTITY_FIELDS
        if mine.get(key) != theirs.get(key)
    ]
    return "; ".join(diffs) or None
