"""``--load-format netloader``: fill the model from a seed, else from disk, then serve
it as a seed. This is the only place that decides to fall back to disk.

The template of vLLM's ``BaseModelLoader.load_model`` is kept (vllm/model_executor/
model_loader/base_loader.py): build the model, fill its weights (``load_weights``:
``fetch.fetch_weights``, else the disk), post-process; then this rank's seed starts
(``seed.running``). Before it, where LAYOUT allows, the processed layout is tried
(``processed``: the model built on the meta device, processing skipped); whatever fails
there, the template runs as if it had not been tried. What one load is lives in
``plan``; how a fetch goes, in ``fetch``.
"""

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.platforms import current_platform

from vllm_ascend.model_loader.netloader import load_state, metrics
from vllm_ascend.model_loader.netloader.client import Received
from vllm_ascend.model_loader.netloader.compile_cache.cpu_aot_shim import allow_cpu_aot_load
from vllm_ascend.model_loader.netloader.config import parse_config
from vllm_ascend.model_loader.netloader.fetch import Fetched, fetch_weights
from vllm_ascend.model_loader.netloader.layout import processing_signature
from vllm_ascend.model_loader.netloader.log import get_logger, who
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
from vllm_ascend.model_loader.netloader.plan import (
    LoadOutcome,
    LoadPlan,
    checkpoint_of,
    global_rank,
    model_role,
    plan_load,
)
from vllm_ascend.model_loader.netloader.processed import ProcessedLoad, load_processed
from vllm_ascend.model_loader.netloader.seed.preparing import PendingWeights
from vllm_ascend.model_loader.netloader.seed.running import SEEDS
from vllm_ascend.model_loader.netloader.seed.server import SeedServer
from vllm_ascend.model_loader.netloader.wire.messages import LOADED, PROCESSED

logger = get_logger(__name__)


@dataclass(frozen=True)
class _Filled:
    """What ``load_weights`` leaves for the seed ``load_model`` starts."""

    plan: LoadPlan
    weights: "LoadedWeights | PendingWeights"
    outcome: LoadOutcome
    # The relay whose fetch filled the model: it already holds the weights and digests.
    relay_seed: SeedServer | None


class NetloaderModelLoader(BaseModelLoader):
    """Loads from the seeds in SOURCE (DRAFT_SOURCE for a draft model), else from disk,
    then serves the loaded weights as a seed; see the user guide for every key.

    Raises ``NetloaderConfigError`` (naming the key) for a bad extra config, and
    ``RuntimeError`` when this rank's listener port is taken."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.config = parse_config(load_config.model_loader_extra_config)
        self._disk = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )
        self._plan: LoadPlan | None = None
        self._filled: _Filled | None = None
        # How the processed layout's attempt ended, for the load after it.
        self._earlier = Fetched()
        # How the last load ended (a seed's ``info`` reports it too).
        self.outcome = LoadOutcome()
        if current_platform.device_type == "cpu" and self.config.compile_cache is not False:
            allow_cpu_aot_load()  # the one class patched; see compile_cache/cpu_aot_shim.py

    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def get_all_weights(
        self, model_config: ModelConfig, model: nn.Module
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's weights, read from disk exactly as ``auto`` reads them:
        what vLLM's ``reload_weights`` (vllm/model_executor/model_loader/reload/
        inplace.py, reached by ``collective_rpc("reload_weights")``) loads into a
        running model. A reload is always from disk; no seed is asked. This rank's
        seed goes on serving only if the reload reads the checkpoint it serves
        (``RunningSeeds.reloading``); the instance serves as a seed again after its
        next start otherwise."""
        rank, role = global_rank(), model_role(model_config)
        checkpoint = checkpoint_of(model_config, self.load_config.download_dir, who(rank, role))
        SEEDS.reloading((rank, role), checkpoint, model_config.model)
        return self._disk.get_all_weights(model_config, model)

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        start = time.perf_counter()
        plan = plan_load(self.config, vllm_config, model_config, self.load_config.download_dir)
        self._plan, self._filled, self._earlier = plan, None, Fetched()
        seeds_named = plan.config.sources_for_rank(plan.rank, plan.draft) or self.config.registry
        if self.config.layout != LOADED and seeds_named:
            tried = load_processed(vllm_config, model_config, plan, SEEDS, prefix)
            if isinstance(tried, ProcessedLoad):
                received = tried.fetched.received
                assert received is not None
                self.outcome = dataclasses.replace(
                    self._outcome(received, tried.fetched.reasons, start), layout=PROCESSED)
                self._log_loaded(tried.plan, tried.layouts.primary)
                self._log_whole(plan, start)
                SEEDS.start(tried.plan, tried.model, self.outcome, received=tried.layouts,
                            relay_seed=tried.fetched.relay_seed)
                return tried.model
            self._earlier = tried
        try:
            model = super().load_model(vllm_config, model_config, prefix)
        except BaseException:
            # Processing failed after the load: a seed's hashing child must not outlive it.
            if self._filled is not None and isinstance(self._filled.weights, PendingWeights):
                self._filled.weights.cancel()
            raise
        self._log_whole(plan, start)
        filled = self._filled
        assert filled is not None, "vLLM's load_model template calls load_weights"
        SEEDS.start(filled.plan, model, filled.outcome, loaded=filled.weights,
                    relay_seed=filled.relay_seed)
        self._filled = None
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        plan = self._plan
        assert plan is not None, "load_weights runs inside load_model"
        start = time.perf_counter()
        if self.config.layout != LOADED:
            # Read before processing, as a client reads it on its meta-built model.
            plan = dataclasses.replace(plan, processing=processing_signature(model))
        before = load_state.snapshot(model)
        earlier = self._earlier
        fetched = (fetch_weights(model, plan, SEEDS, across_only=_only_across(earlier))
                   if _ask_again(earlier) else earlier)
        received, gathered = fetched.received, fetched.gathered
        if received is None and gathered is None:
            if fetched.fallback is not None:
                metrics.METRICS.fallback(fetched.fallback)
            self._disk.load_weights(model, model_config)
        else:
            # A node without weight files now holds the seed's checkpoint.
            plan = plan.holding(received.checkpoint if received is not None
                                else gathered.checkpoint if gathered is not None else None)
        state = load_state.changes(before, load_state.snapshot(model), model)
        if state.changes or state.uncarried:
            logger.info(
                "%s: loading set %s%s", plan.who, ", ".join(state.describe()) or "no plain state",
                f"; state Netloader cannot carry: {', '.join(state.uncarried)}"
                if state.uncarried else "",
            )
        relay = fetched.relay_seed
        weights: LoadedWeights | PendingWeights
        if relay is not None:
            weights = relay.layouts.primary
        elif received is not None:
            weights = LoadedWeights.capture(model, received.digests, state, received.parts)
        else:  # from disk or across layouts: the large tensors are hashed from a snapshot
            limit = self.config.digest_limit_mb_per_s
            weights = PendingWeights(model, state, limit * 1e6 if limit is not None else None,
                                     defer=plan.device.type == "cpu")
        # The same refusal from one seed for both layouts counts once.
        reasons = fetched.reasons if fetched is earlier else tuple(
            dict.fromkeys((*earlier.reasons, *fetched.reasons)))
        self.outcome = self._outcome(received, reasons, start)
        if fetched.gathered_from is not None:
            self.outcome = dataclasses.replace(
                self.outcome, loaded_from=f"seed {fetched.gathered_from} (across layouts)")
        self._log_loaded(plan, weights)
        self._filled = _Filled(plan, weights, self.outcome, relay)

    @staticmethod
    def _outcome(received: Received | None, reasons: tuple[str, ...], start: float) -> LoadOutcome:
        return LoadOutcome(
            f"seed {received.source}" if received is not None else "disk",
            time.perf_counter() - start, reasons,
            received.reused_bytes if received is not None else 0,
        )

    def _log_whole(self, plan: LoadPlan, start: float) -> None:
        """The model's whole load: built, filled, processed (or its kernels rebuilt)."""
        logger.info("%s: model ready in %.3f s (built, weights from %s in the %s layout, "
                    "processed)", plan.who, time.perf_counter() - start,
                    self.outcome.loaded_from, self.outcome.layout)

    def _log_loaded(self, plan: LoadPlan, weights: "LoadedWeights | PendingWeights") -> None:
        """The line the demo's phase parser reads (examples/netloader/phases.py)."""
        outcome = self.outcome
        logger.info(
            "%s loaded %d tensors (%.3f GB) from %s in %.3f s%s", plan.who, len(weights.specs),
            weights.total_bytes / 1e9, outcome.loaded_from, outcome.load_seconds,
            f" ({outcome.reused_bytes} bytes reused from a source that failed)"
            if outcome.reused_bytes else "",
        )


def _ask_again(earlier: Fetched) -> bool:
    """Whether the seeds are worth asking for the loaded layout after the processed
    layout's attempt ended as ``earlier``: only where a seed refused the processed
    layout itself (not this model), or served one that did not reproduce its model, or
    where the processed layout was not tried at all. Every other way (no seed found, a
    seed of another model, seeds that failed without answering) would end the same
    again, at the cost of the seeds' timeouts twice."""
    if earlier.fallback in (None, "processed_layout", "unexpected_error"):
        return True
    if earlier.identity_refused:  # a seed in another layout serves the loaded one
        return True
    return earlier.fallback == "seeds_failed" and earlier.layout_refused


def _only_across(earlier: Fetched) -> tuple[str, ...] | None:
    """The seeds in other layouts to ask, alone, for the loaded layout, where the
    processed attempt ended as ``earlier`` without one of this layout's seeds refusing
    only the processed layout: those seeds would end the same again (``_ask_again``).
    None: ask every seed."""
    if (earlier.identity_refused and not earlier.layout_refused
            and earlier.fallback in ("seeds_failed", "no_seed_found")):
        return earlier.identity_refused
    return None
