"""One fetch into a built model: the checks before any seed is asked, the candidates,
this instance's relay, and a model as clean as before when it fails.

A failed fetch needs no rebuilt model: only digest-verified bytes ever reach it, so
every parameter holds either its initial value or exactly the seed's, and the disk
loader then writes every parameter (vLLM's own check: "Following weights were not
initialized from checkpoint"). Buffers the disk loader never writes (rotary caches) are
restored from a copy taken before the fetch, so the model equals a fresh disk load bit
for bit. With RELAY (the default) the listener opens before the fetch and already
passes verified tensors on to the clients seeds send here; a fetch that fails closes it.

A fetch in the processed layout (``processed``) fills tensors of its own instead of the
model's (a model built on the meta device has none) and finishes inside the fetch, so
that whatever fails there, after the last byte too, is a failed fetch like any other.

This module reports; the loader decides (``Fetched.received`` None: load from disk).
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vllm_ascend.model_loader.netloader import load_state, metrics
from vllm_ascend.model_loader.netloader.client import ClientSettings, Received, WeightFetch
from vllm_ascend.model_loader.netloader.compile_cache.fetching import (
    CacheFetch,
    install_from_seed,
)
from vllm_ascend.model_loader.netloader.fleet.candidates import Candidates, find_candidates
from vllm_ascend.model_loader.netloader.layout import LayoutError
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import model_tensors, spec_of
from vllm_ascend.model_loader.netloader.metrics import CLIENT, FAILED, OK, REFUSED
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.reshard.discover import Across, across_layouts
from vllm_ascend.model_loader.netloader.reshard.fetch import Gathered
from vllm_ascend.model_loader.netloader.reshard.shards import UnknownLayout, place_of
from vllm_ascend.model_loader.netloader.seed.running import RunningSeeds
from vllm_ascend.model_loader.netloader.seed.server import SeedServer
from vllm_ascend.model_loader.netloader.wire.messages import LOADED, PROCESSED

logger = get_logger(__name__)


@dataclass(frozen=True)
class Fetched:
    """How a fetch ended: what a seed delivered, or that the disk must load."""

    received: Received | None = None
    # Why each seed that was tried could not serve, and why discovery found none; also
    # kept when a later source served (the operator sees every failed seed).
    reasons: tuple[str, ...] = ()
    # Why the disk must load, for the fallbacks metric (None: no seed was asked for).
    fallback: str | None = None
    # The relay whose fetch filled the model: it goes on as this rank's seed.
    relay_seed: SeedServer | None = None
    # Whether a seed refused only the layout asked for: the other one is worth asking.
    layout_refused: bool = False
    # Seeds that refused this model's identity, or that the registry lists in other
    # layouts (one may serve it across layouts), and what such a seed delivered
    # (``reshard``) with its address.
    identity_refused: tuple[str, ...] = ()
    gathered: Gathered | None = None
    gathered_from: str | None = None


def fetch_weights(
    model: nn.Module, plan: LoadPlan, seeds: RunningSeeds, layout: str = LOADED,
    targets: Sequence[torch.Tensor] | None = None,
    finish: Callable[[Received], None] | None = None,
    across_only: Sequence[str] | None = None,
) -> Fetched:
    """What a seed delivered into ``model``, or why not (the model then holds exactly
    what it held before, buffers included).

    ``across_only``: ask only these seeds, in other layouts, and look for no other (the
    loader's second attempt, after this layout's seeds failed; ``loader._only_across``).

    The processed ``layout`` passes ``targets`` (one tensor per ``model_tensors`` entry,
    which the seed's bytes fill instead of the model's) and ``finish`` (run on what was
    received before the fetch counts as done; raising there fails it)."""
    config = plan.config
    entries = config.sources_for_rank(plan.rank, plan.draft)
    if not entries and config.registry is None:
        logger.info("%s has no %s and no REGISTRY: loading from disk",
                    plan.who, "DRAFT_SOURCE" if plan.draft else "SOURCE")
        return Fetched()
    if plan.identity["checkpoint"] is None and plan.expected_fingerprint() is None:
        logger.warning(
            "%s: no weight files on this node and no EXPECTED_FINGERPRINT, so no seed's "
            "weights can be told to be this model's; loading from disk", plan.who,
        )
        return Fetched(fallback="no_weight_files")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta and layout == LOADED:
        # vLLM's online quantization (e.g. --quantization fp8 over a bf16 checkpoint)
        # creates these in load_weights: there is nothing to receive into.
        reason = (f"{len(meta)} tensors are on the meta device until load_weights "
                  f"(quantization {plan.identity['quantization']}, e.g. {meta[0]}): "
                  "online quantization cannot be fetched")
        logger.warning("%s: %s; loading from disk", plan.who, reason)
        return Fetched(reasons=(reason,), fallback="meta_tensors")
    if not all(t.is_contiguous() for _, t in model_tensors(model, meta=True)):
        logger.warning("%s: model has non-contiguous tensors; loading from disk", plan.who)
        return Fetched(fallback="non_contiguous")
    if config.registry is not None:
        seeds.withdraw(plan.key)  # our own earlier record (a reload) must not be a candidate
    try:
        found = (Candidates([], frozenset(), [], tuple(across_only)) if across_only is not None
                 else find_candidates(plan, entries, seeds.own_addresses(plan)))
    except Exception as e:  # noqa: BLE001 - a registry's or resolver's answer must never keep the instance from starting
        logger.exception("%s: seed discovery failed", plan.who)
        found = Candidates([], frozenset(), [f"seed discovery failed: {type(e).__name__}: {e}"])
    if found.across:
        try:
            place_of(plan.identity)
        except UnknownLayout as e:
            logger.info("%s: not asking %d seed instance(s) in other layouts: this instance "
                        "cannot load across layouts (%s)", plan.who, len(found.across), e)
            found = dataclasses.replace(found, across=())
    if found.across and not found.addresses and layout != LOADED:
        # Seeds in other layouts serve the loaded layout: the loader asks again for it.
        logger.info("%s: no seed of this layout; asking %d in other layouts for the loaded "
                    "layout", plan.who, len(found.across))
        return Fetched(reasons=tuple(found.notes), fallback="no_seed_found",
                       identity_refused=found.across)
    if not found.addresses and not found.across:
        logger.warning("%s: no seed found (%s); loading from disk",
                       plan.who, "; ".join(found.notes))
        return Fetched(reasons=tuple(found.notes), fallback="no_seed_found")
    fetched = _from_seeds(model, plan, seeds, found, layout, targets, finish)
    if fetched.received is not None:
        _install_compile_cache(model, plan, fetched.received.source)
    return fetched


def client_settings(plan: LoadPlan, layout: str = LOADED) -> ClientSettings:
    """How this rank's client fetches ``layout``, from the config."""
    config = plan.config
    return ClientSettings(
        identity=plan.identity,
        timeout_s=config.timeout_s,
        secret=config.secret,
        expected_fingerprint=plan.expected_fingerprint(),
        data_plane=plan.data_plane(),
        device=plan.device,
        min_rate_bytes_per_s=config.min_rate_mb_per_s * 1e6,
        layout=layout,
        processing=plan.processing if layout == PROCESSED else None,
    )


def _from_seeds(
    model: nn.Module, plan: LoadPlan, seeds: RunningSeeds, found: Candidates, layout: str,
    targets: Sequence[torch.Tensor] | None, finish: Callable[[Received], None] | None,
) -> Fetched:
    named = model_tensors(model, meta=layout == PROCESSED)
    buffers = [(t, t.clone()) for _, t in model.named_buffers() if not t.is_meta]
    relay = seeds.open_relay(plan) if plan.config.relay else None
    fetch = WeightFetch(
        settings=client_settings(plan, layout),
        specs=[spec_of(n, t) for n, t in named],
        targets=list(targets) if targets is not None else [t for _, t in named],
        relay=relay,
        reasons=list(found.notes),
        discovered=found.discovered,
        model=model,
    )
    metrics.METRICS.started(CLIENT)
    fallback = "seeds_failed"
    received: Received | None = None
    relay_seed: SeedServer | None = None
    across: Across | None = None
    try:
        received = fetch.run(found.addresses) if found.addresses else None
        others = _others(fetch, found) if received is None and layout == LOADED else ()
        if others:
            across = across_layouts(model, plan, others)
            fetch.reasons += across.reasons
            if across.gathered is not None:
                load_state.check(model, across.gathered.state)
                load_state.apply(model, across.gathered.state)
        if received is not None:
            # What the seed's load_weights set besides tensors: checked against this
            # model before the first byte, plain instance attributes now.
            load_state.apply(model, received.state)
            if finish is not None:
                finish(received)
    except LayoutError as e:
        logger.warning("%s: the processed layout from %s did not reproduce its model: %s",
                       plan.who, received.source if received else "?", e)
        fetch.reasons.append(f"processed layout not reproduced: {e}")
        fallback = "processed_layout"
        received = across = None
    except Exception as e:  # noqa: BLE001 - a peer's answer must never keep the instance from starting: disk is always right
        logger.exception("%s: fetch failed with an unexpected error", plan.who)
        fetch.reasons.append(f"unexpected error: {type(e).__name__}: {e}")
        fallback = "unexpected_error"
        received = across = None
    finally:
        metrics.METRICS.stopped(CLIENT)
        for reason in fetch.reasons[len(found.notes):]:
            metrics.METRICS.ended(CLIENT, REFUSED if " refused: " in reason else FAILED)
        if received is not None:
            metrics.METRICS.ended(CLIENT, OK, received.nbytes, received.seconds)
        if across is not None and across.gathered is not None:
            metrics.METRICS.ended(CLIENT, OK, sum(across.gathered.nbytes.values()),
                                  across.gathered.seconds)
        if relay is not None:
            # A relay goes on as the seed only of a model this fetch filled.
            relay_seed = relay.serving_complete() if received is not None else None
            if relay_seed is None:
                relay.close()
    reasons = tuple(fetch.reasons)
    if across is not None and across.gathered is not None:
        return Fetched(None, reasons, None, gathered=across.gathered,
                       gathered_from=across.source)
    if received is None:
        for buffer, before in buffers:
            buffer.copy_(before)
        logger.warning("%s: no seed could serve it (%s); loading from disk",
                       plan.who, "; ".join(reasons))
        # Those in other layouts serve the loaded layout: the loader asks again for it.
        return Fetched(None, reasons, fallback, layout_refused=fetch.layout_refused,
                       identity_refused=_others(fetch, found))
    if reasons:
        logger.warning("%s: %d source(s) failed before %s served (%s)",
                       plan.who, len(reasons), received.source, "; ".join(reasons))
    return Fetched(received, reasons, None, relay_seed)


def _others(fetch: WeightFetch, found: Candidates) -> tuple[str, ...]:
    """The seeds to ask across layouts: those that refused this identity, then the
    registry's instances in other layouts, each once."""
    refused = tuple(fetch.identity_refused)
    return (*refused, *(a for a in found.across if a not in refused))


def _install_compile_cache(model: nn.Module, plan: LoadPlan, address: str) -> None:
    """Install the compile cache of the seed that served the weights, for vLLM's
    warm-up to load instead of compiling (COMPILE_CACHE; ``compile_cache``)."""
    config = plan.config
    if not config.compile_cache_enabled():
        logger.info(
            "%s: not asking %s for its compile cache (COMPILE_CACHE %s%s)",
            plan.who, address, "false" if config.compile_cache is False else "auto",
            "" if config.compile_cache is False else " and no shared secret",
        )
        return
    install_from_seed(model, address, CacheFetch(
        timeout_s=config.timeout_s,
        min_rate_bytes_per_s=config.min_rate_mb_per_s * 1e6,
        secret=config.secret,
    ), plan.who)


