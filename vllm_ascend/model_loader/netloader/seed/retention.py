"""What a seed keeps beyond its running model, and where (INT8_CACHE, INT8_CACHE_NAME).

In the loaded layout (``layout``) a seed sends the model as loaded. Where
``process_weights_after_loading`` replaced a tensor (CPU oneDNN packing, the CPU MoE
prepack, Ascend NZ layouts, int8 weights repacked by a quantization method), the
running model no longer holds the loaded bytes: only the seed's view keeps them alive,
and that copy is the seed's memory cost. vllm-ascend's netloader names the same choice
with ``INT8_CACHE`` (``hbm`` / ``dram`` / ``no``) and ``INT8_CACHE_NAME`` (which
parameters it covers); here they mean, for the loaded layout:

- ``no`` (the default, as in vllm-ascend): keep nothing beyond the running model and
  the processed layout's kernel inputs. The loaded layout is then served only where
  processing replaced no other tensor; otherwise a client asking for it is refused,
  with the tensors the seed lacks.
- ``hbm``: keep the loaded copy where it was loaded, in device memory.
- ``dram``: move it to host memory after processing (on CPU the same as ``hbm``); the
  device data plane copies each bucket to the device as it sends.
- ``INT8_CACHE_NAME``: a list of name fragments; only replaced tensors whose name
  contains one are kept (as ``INT8_CACHE`` says). A replaced tensor outside it is
  dropped like ``no``, with the same refusal.

``beyond_model`` counts what a seed holds beyond the running model, in both layouts.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_ascend.model_loader.netloader.layout import ModelHolds, counted, storage_key
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights

HBM, DRAM, NO = "hbm", "dram", "no"
CACHE_MODES = (HBM, DRAM, NO)


@dataclass(frozen=True)
class Retention:
    """Where the loaded copies go (``mode``) and which names they cover (None: all)."""

    mode: str = HBM  # what retain() falls back to when called without a config
    names: tuple[str, ...] | None = None

    def covers(self, name: str) -> bool:
        return self.mode != NO and (self.names is None or any(n in name for n in self.names))


@dataclass(frozen=True)
class Retained:
    """What the seed keeps beyond the running model, for ``info`` and the guide's
    per-model figures. ``dropped``: tensors it can no longer send."""

    mode: str
    tensors: int
    nbytes: int
    dropped: tuple[str, ...] = ()
    # Of ``nbytes``, the kernel inputs the processed layout keeps (``layout.Processed``).
    processed_bytes: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "int8_cache": self.mode,
            "retained_tensors": self.tensors,
            "retained_bytes": self.nbytes,
            "retained_for_processed_bytes": self.processed_bytes,
            "dropped_tensors": len(self.dropped),
        }


def retain(
    weights: LoadedWeights, retention: Retention, holds: ModelHolds | None = None,
) -> tuple[LoadedWeights, Retained]:
    """``weights`` as this seed keeps them once the model is processed: each loaded
    tensor nothing else uses any more stays, moves to host memory, or is dropped (a
    meta tensor of the same shape stands in, so the manifest is unchanged).

    "Nothing else" is ``holds`` (``layout.ModelHolds``, read right after processing;
    from the use counts now where None): a storage held by more than the seed's own
    views is still the running model's, wherever the model keeps it (parameters,
    buffers, attributes, lists, kernel closures)."""
    if holds is None:
        holds = ModelHolds(None, weights.tensors)
    kept: list[torch.Tensor] = []
    dropped: list[str] = []
    count = nbytes = 0
    for spec, t in zip(weights.specs, weights.tensors, strict=True):
        if not counted(t) or holds.holds(t):
            kept.append(t)
        elif not retention.covers(spec.name):
            kept.append(torch.empty(t.shape, dtype=t.dtype, device="meta"))
            dropped.append(spec.name)
        else:
            kept.append(t.to("cpu") if retention.mode == DRAM else t)
            count += 1
            nbytes += t.nbytes
    named = [(spec.name, t) for spec, t in zip(weights.specs, kept, strict=True)]
    return (
        LoadedWeights(named, list(weights.digests), weights.state, tuple(dropped),
                      weights.parts),
        Retained(retention.mode, count, nbytes, tuple(dropped)),
    )


def beyond_model(
    views: Sequence[torch.Tensor], holds: ModelHolds | None = None,
) -> tuple[int, int]:
    """(storages, bytes) that only ``views`` (the seed's) hold: what a seed costs beyond
    its running model, each storage counted once. ``holds``: as in ``retain``."""
    if holds is None:
        holds = ModelHolds(None, views)
    sizes = {storage_key(t): t.untyped_storage().nbytes() for t in views
             if counted(t) and not holds.holds(t)}
    return len(sizes), sum(sizes.values())
