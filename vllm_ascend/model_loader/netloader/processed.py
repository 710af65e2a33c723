"""A load in the processed layout (``layout``): the model is built on the meta device,
so the loaded layout is never allocated, and the seed's runtime tensors are received
into tensors of exactly the loaded manifest's shapes, which this side computed itself.

Once every byte is verified (inside the fetch, so that any failure is a failed fetch):
the tensors go into the model (``layout.install``, ties kept), the seed's load state is
replayed, ``process_weights_after_loading`` runs under ``weights_already_processed()``
(vllm/model_executor/utils.py), and the model's ``layout.state_signature`` must equal
the seed's and no tensor may be left on the meta device. Whatever fails, the model
built here is dropped, with what it registered in vLLM's compilation config (its
attention layers' names), and the loader loads as if this had not been tried: from a
seed that keeps the loaded layout, else from disk, into a model built as ``auto``
builds it.
"""

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.model_executor.model_loader.utils import (
    initialize_model,
    process_weights_after_loading,
)
from vllm.model_executor.utils import weights_already_processed
from vllm.utils.torch_utils import set_default_torch_dtype

from vllm_ascend.model_loader.netloader.client import Received
from vllm_ascend.model_loader.netloader.fetch import Fetched, fetch_weights
from vllm_ascend.model_loader.netloader.layout import (
    LayoutError,
    install,
    meta_tensors,
    processing_signature,
    state_signature,
    unsupported_methods,
)
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, model_tensors
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.seed.running import RunningSeeds
from vllm_ascend.model_loader.netloader.seed.server import Layouts
from vllm_ascend.model_loader.netloader.wire.messages import PROCESSED

logger = get_logger(__name__)


@contextmanager
def _own_rope_cache() -> Iterator[dict[Any, nn.Module]]:
    """vLLM shares rotary embedding modules between the models a process builds
    (``get_rope``'s ``_ROPE_DICT``, model_executor/layers/rotary_embedding): one built
    here on the meta device must not be handed to the model the loader builds if this
    load fails, nor may this build take (and install a peer's tensors into) a module
    that a serving model holds. So the build gets a cache of its own, which it yields;
    ``_share_ropes`` shares them as vLLM would once the model is verified."""
    from vllm.model_executor.layers import rotary_embedding

    shared = rotary_embedding._ROPE_DICT
    own: dict[Any, Any] = {}
    rotary_embedding._ROPE_DICT = own
    try:
        yield own
    finally:
        rotary_embedding._ROPE_DICT = shared


def _share_ropes(model: nn.Module, own: dict[Any, nn.Module]) -> None:
    """Share the verified model's rotary embeddings as vLLM's cache would have: where
    the process already holds one of the same parameters (a target, when this is its
    draft), the model takes that one, if it holds the same values (else
    ``LayoutError``); otherwise this one joins the cache."""
    from vllm.model_executor.layers import rotary_embedding

    shared: dict[Any, Any] = rotary_embedding._ROPE_DICT
    for key, mine in own.items():
        theirs = shared.get(key)
        if theirs is None:
            shared[key] = mine
            continue
        ours, others = dict(mine.named_buffers()), dict(theirs.named_buffers())
        if ours.keys() != others.keys() or not all(
            torch.equal(ours[k], others[k].to(ours[k].device)) for k in ours
        ):
            raise LayoutError("a rotary embedding differs from this process's own of the "
                              "same parameters")
        for parent in model.modules():
            for name, child in list(parent._modules.items()):
                if child is mine:
                    parent._modules[name] = theirs


def _runs_on(model: nn.Module, device: torch.device) -> None:
    """What a model built on the meta device needs to run on ``device``, as one built
    there would: vLLM's reload metadata names the device a reload restores layers on
    (``record_metadata_for_reloading`` took the meta device), and an attention layer's
    KV cache placeholder (which the engine replaces) is an empty tensor there."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    for module in model.modules():
        get_layerwise_info(module).restore_device = device
        cache = vars(module).get("kv_cache")
        if isinstance(cache, torch.Tensor) and cache.is_meta:
            module.kv_cache = torch.tensor([], device=device)


@dataclass(frozen=True)
class ProcessedLoad:
    """A model filled in the processed layout, and what its seed serves."""

    model: nn.Module
    plan: LoadPlan
    fetched: Fetched
    layouts: Layouts


def load_processed(
    vllm_config: VllmConfig, model_config: ModelConfig, plan: LoadPlan, seeds: RunningSeeds,
    prefix: str = "",
) -> ProcessedLoad | Fetched:
    """The model in the processed layout from a seed, or (``Fetched``) why not: the
    reasons, and the fallback kind for the metrics (None: nobody was asked)."""
    context = vllm_config.compilation_config
    registered = (set(context.static_forward_context), len(context.static_all_moe_layers))
    try:
        dtype = cast(torch.dtype, model_config.dtype)  # resolved by vLLM's ModelConfig
        with set_default_torch_dtype(dtype), torch.device("meta"), _own_rope_cache() as ropes:
            model = initialize_model(vllm_config=vllm_config, model_config=model_config,
                                     prefix=prefix)
        result = _fetch_into(model, vllm_config, model_config, plan, seeds, ropes)
    except Exception as e:  # noqa: BLE001 - building on meta is vLLM's business: the loaded path is always right
        logger.exception("%s: the processed layout could not be tried", plan.who)
        result = Fetched(reasons=(f"processed layout: {type(e).__name__}: {e}",),
                         fallback="processed_layout")
    if isinstance(result, Fetched):
        added = set(context.static_forward_context) - registered[0]
        for name in added:
            del context.static_forward_context[name]
        del context.static_all_moe_layers[registered[1]:]
    return result


def _fetch_into(
    model: nn.Module, vllm_config: VllmConfig, model_config: ModelConfig, plan: LoadPlan,
    seeds: RunningSeeds, ropes: dict[Any, nn.Module],
) -> ProcessedLoad | Fetched:
    # Where the processed layout does not apply, nobody is asked and nothing failed.
    unsupported = unsupported_methods(model)
    online = [type(m.quant_method).__name__ for m in model.modules()
              if getattr(getattr(m, "quant_method", None), "uses_meta_device", False)]
    if unsupported or online:
        logger.info("%s: no processed layout for this model (%s); asking for the loaded one",
                    plan.who, f"not every quantization method takes it: {unsupported[0]}"
                    if unsupported else f"online quantization: {online[0]}")
        return Fetched()
    plan = dataclasses.replace(plan, processing=processing_signature(model))
    named = model_tensors(model, meta=True)
    device = plan.device
    targets = [torch.empty(t.shape, dtype=t.dtype, device=device) for _, t in named]
    target_device = torch.device(str(vllm_config.device_config.device))

    def finish(received: Received) -> None:
        t0 = time.perf_counter()
        install(model, [(name, t) for (name, _), t in zip(named, targets, strict=True)])
        _runs_on(model, target_device)
        with weights_already_processed():
            process_weights_after_loading(model, model_config, target_device)
        left = meta_tensors(model)
        if left:
            raise LayoutError(f"tensors still on the meta device after processing: {left}")
        mine = state_signature(model)
        if mine != received.signature:
            raise LayoutError(
                f"this model's state after processing ({mine[:12]}) is not the seed's "
                f"({(received.signature or '')[:12]})"
            )
        _share_ropes(model, ropes)
        logger.info(
            "%s: processing skipped: %d runtime tensors received, kernels rebuilt under "
            "weights_already_processed in %.3f s, state signature %s equals the seed's",
            plan.who, len(targets), time.perf_counter() - t0, mine[:12],
        )

    fetched = fetch_weights(model, plan, seeds, PROCESSED, targets, finish)
    received = fetched.received
    if received is None:
        return fetched
    weights = LoadedWeights([(name, t) for (name, _), t in zip(named, targets, strict=True)],
                            received.digests, received.state, parts=received.parts)
    layouts = Layouts(None, weights, received.signature,
                      "this instance received the processed layout")
    return ProcessedLoad(model.eval(), plan.holding(received.checkpoint), fetched, layouts)
