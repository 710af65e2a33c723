"""The seeds this process runs: one per (global rank, role), its registry record, and
stopping them.

A worker serves one seed per model it loaded: the target, and a speculative decoder's
draft (role DRAFT), which has a listener of its own, its seeds in DRAFT_SOURCE and an
identity no target listener accepts. A reload replaces a rank's seed; a relay that
filled the model goes on as it. ``SEEDS`` is this process's one ``RunningSeeds``; at
exit it withdraws every registry record, so clients are not offered a seed that is
gone until its record expires.
"""

import atexit
import dataclasses
import functools
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from torch import nn
from vllm.utils.network_utils import get_ip

from vllm_ascend.model_loader.netloader.compile_cache.naming import aot_cache_dir
from vllm_ascend.model_loader.netloader.compile_cache.serving import CacheServing
from vllm_ascend.model_loader.netloader.fleet.layouts import (
    announces_layout,
    layout_free_key,
    layout_record,
)
from vllm_ascend.model_loader.netloader.fleet.registry import (
    Announcer,
    SeedRecord,
    model_key,
    open_registry,
)
from vllm_ascend.model_loader.netloader.identity import expert_placement
from vllm_ascend.model_loader.netloader.layout import (
    ModelHolds,
    processed_weights,
    state_signature,
)
from vllm_ascend.model_loader.netloader.log import get_logger, who
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
from vllm_ascend.model_loader.netloader.plan import LoadOutcome, LoadPlan
from vllm_ascend.model_loader.netloader.seed.preparing import (
    PendingWeights,
    Preparation,
    prepare_in_background,
)
from vllm_ascend.model_loader.netloader.seed.relay import RelayListener, RelayProgress
from vllm_ascend.model_loader.netloader.seed.retention import (
    Retained,
    Retention,
    beyond_model,
    retain,
)
from vllm_ascend.model_loader.netloader.seed.server import Layouts, SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import format_address, listen
from vllm_ascend.model_loader.netloader.wire.messages import LOADED, PROCESSED, Accept

logger = get_logger(__name__)

_Key = tuple[int, str]
_Bound = TypeVar("_Bound", SeedServer, RelayListener[SeedServer])


class RunningSeeds:
    """The seed of each (global rank, role) in this process and its registry heartbeat
    (REGISTRY set); every change to either goes through here."""

    def __init__(self) -> None:
        self._seeds: dict[_Key, SeedServer] = {}
        self._announcers: dict[_Key, Announcer] = {}
        # Seeds still preparing: their digests, being computed (``seed.preparing``).
        self._pending: dict[_Key, PendingWeights] = {}
        self._lock = threading.RLock()

    def seeds(self) -> dict[_Key, SeedServer]:
        """The seeds this process serves, keyed by (global rank, role)."""
        with self._lock:
            return dict(self._seeds)

    def own_addresses(self, plan: LoadPlan) -> list[str]:
        """Where this rank's listener is or will be: never a seed to fetch from."""
        port = plan.listen_port
        own = [format_address(get_ip(), port)] if port else []
        seed = self.seeds().get(plan.key)
        if seed is not None:
            own.append(seed.address)
        return own

    def withdraw(self, key: _Key) -> None:
        """Stop ``key``'s registry heartbeat and withdraw its record (bounded, never
        raises): before a lookup, our own earlier record (a reload) must not send us
        to ourselves."""
        with self._lock:
            old = self._announcers.pop(key, None)
        if old is not None:
            old.stop()

    def stop(self, key: _Key) -> None:
        """Withdraw ``key``'s record and stop its seed (and its digests' child). All
        three leave together: a seed that finishes preparing meanwhile is not announced."""
        with self._lock:
            announcer = self._announcers.pop(key, None)
            old = self._seeds.pop(key, None)
            pending = self._pending.pop(key, None)
        if pending is not None:
            pending.cancel()
        if announcer is not None:
            announcer.stop()
        if old is not None:
            old.stop()

    def withdraw_all(self) -> None:
        for key in list(self._announcers):
            self.withdraw(key)

    def reloading(self, key: _Key, checkpoint: str | None, source: str) -> None:
        """A reload reads ``checkpoint`` from ``source``: ``key``'s seed goes on only if
        it serves that checkpoint (its views of the as-loaded tensors then hold the same
        values after the reload); otherwise it stops, as its identity would name the old
        weights and vLLM keeps no as-loaded copy of the new ones to send."""
        seed = self.seeds().get(key)
        if seed is None:
            return
        rank, role = key
        serving = seed.identity.get("checkpoint")
        if serving is not None and checkpoint == serving:
            logger.info("%s: reloading checkpoint %s from %s; the seed on %s goes on serving it",
                        who(rank, role), serving[:12], source, seed.address)
            return
        logger.warning(
            "%s: reloading from %s (checkpoint %s), not the checkpoint %s this rank's seed "
            "serves: the seed on %s stops", who(rank, role), source,
            checkpoint[:12] if checkpoint else "unknown", (serving or "unknown")[:12],
            seed.address,
        )
        self.stop(key)

    def open_relay(self, plan: LoadPlan) -> RelayListener[SeedServer]:
        """This rank's listener, bound before its fetch so that the seeds it asks can
        send the clients after it here (RELAY)."""
        # A reload's relay needs the port of the seed that served the model before.
        self.stop(plan.key)

        def make_relay(host: str, sock: socket.socket) -> RelayListener[SeedServer]:
            def start(w: LoadedWeights, p: RelayProgress, s: socket.socket,
                      accepted: Accept) -> SeedServer:
                # A node without weight files relays the checkpoint its seed named.
                relaying = LoadOutcome("relaying its fetch", None, ())
                layouts = (Layouts(w) if accepted.layout == LOADED else Layouts(
                    None, w, accepted.signature, "this relay receives the processed layout"))
                settings = seed_settings(plan.holding(accepted.checkpoint), host)
                return SeedServer(layouts, settings, s, relaying, p).start()

            return RelayListener(sock, start)

        return _bound(plan, make_relay)

    def start(
        self, plan: LoadPlan, model: nn.Module, outcome: LoadOutcome,
        loaded: LoadedWeights | PendingWeights | None = None, received: Layouts | None = None,
        relay_seed: SeedServer | None = None,
    ) -> SeedServer:
        """Serve this rank's model (processed by now): ``loaded``, its tensors as loaded
        (from disk, or a loaded-layout fetch), from which the processed layout is found
        (``layout``) and what processing replaced is kept as INT8_CACHE says
        (``retention``); or ``received``, what a processed-layout fetch delivered. The
        relay that filled the model goes on as the seed, else a new seed takes this
        rank's port. A disk load's ``PendingWeights`` start a seed that refuses as
        ``preparing`` until its digests are computed (``seed.preparing``)."""
        if isinstance(loaded, PendingWeights):
            if loaded.deferred and relay_seed is None:
                return self._start_preparing(plan, model, outcome, loaded)
            loaded = loaded.finish()
        retained = None
        if received is not None:
            layouts = received
            views = [w for w in (received.loaded, received.processed) if w is not None]
            tensors, nbytes = beyond_model([t for w in views for t in w.tensors])
            retained = Retained(plan.config.int8_cache, tensors, nbytes,
                                processed_bytes=nbytes if received.processed else 0)
        else:
            assert loaded is not None, "a seed serves what was loaded or what was received"
            layouts, retained = _layouts(plan, model, loaded)
        if relay_seed is not None:
            relay_seed.promote(outcome)
            relay_seed.keep(layouts, retained)
            seed = relay_seed
        else:
            self.stop(plan.key)
            seed = _bound(plan, lambda host, sock: SeedServer(
                layouts, seed_settings(plan, host), sock, outcome, retained=retained,
                placement=_placement(plan, model),
            )).start()
        with self._lock:
            self._seeds[plan.key] = seed
        self._announce(plan, seed)
        return seed

    def _start_preparing(
        self, plan: LoadPlan, model: nn.Module, outcome: LoadOutcome, pending: PendingWeights,
    ) -> SeedServer:
        """A seed that listens now and serves once its digests are computed in the
        background; it is announced in the registry only then."""
        self.stop(plan.key)
        preparation = Preparation(pending.specs, pending.deferred_bytes)
        seed = _bound(plan, lambda host, sock: SeedServer(
            Layouts(None), seed_settings(plan, host), sock, outcome,
            placement=_placement(plan, model), preparing=preparation,
        )).start()
        with self._lock:
            self._seeds[plan.key] = seed

        # What the processed model is and holds, read now: start-up goes on to set
        # attributes (the KV cache) that a client's freshly processed model lacks, to wrap
        # modules for LoRA (other slot names) and to run the model (use counts move).
        signature = state_signature(model)
        holds = ModelHolds(model, pending.tensors)

        def ready(weights: LoadedWeights) -> None:
            layouts = _layouts(plan, model, weights, signature, holds)
            with self._lock:  # a stop or reload meanwhile must not be undone
                if self._seeds.get(plan.key) is not seed:
                    return
                seed.keep(*layouts)
                self._announce(plan, seed)
                self._pending.pop(plan.key, None)

        def failed() -> None:
            with self._lock:
                if self._pending.get(plan.key) is pending:
                    del self._pending[plan.key]

        with self._lock:
            self._pending[plan.key] = pending
        prepare_in_background(pending, preparation, who(plan.rank, plan.role, seed=True), ready,
                              failed)
        return seed

    def _announce(self, plan: LoadPlan, seed: SeedServer) -> None:
        """Publish ``seed`` in the registry until it stops (REGISTRY set), unless it
        refuses every client (it dropped tensors, or its load set uncarried state)."""
        registry = plan.config.registry
        if registry is None:
            return
        name = who(plan.rank, plan.role, seed=True)
        layouts = seed.layouts

        def serves(weights: LoadedWeights | None) -> bool:
            return weights is not None and not weights.dropped and not weights.state.uncarried

        if not any(serves(w) for w in (layouts.loaded, layouts.processed)):
            logger.warning("%s: not announcing %s in registry %s: it refuses every client "
                           "(see its info)", name, seed.address, registry)
            return
        self.withdraw(plan.key)

        def record() -> SeedRecord:
            info = seed.describe()
            return SeedRecord(seed.address, plan.rank, plan.role, seed.identity.get("checkpoint"),
                              info["active_transfers"], info["relaying"])

        # An instance's first rank also announces itself to clients of other layouts
        # (``fleet.layouts``), where it can serve them.
        also = [(layout_free_key(seed.identity),
                 lambda: layout_record(record(), seed.identity))] if (
            announces_layout(seed.identity, seed.settings.rank_ports)
            and seed.settings.device.type == "cpu" and serves(layouts.loaded)
        ) else []
        announcer = Announcer(open_registry(registry), model_key(seed.identity), record,
                              also=also).start()
        with self._lock:
            self._announcers[plan.key] = announcer
        logger.info("%s: announcing %s in registry %s%s", name, seed.address, registry,
                    " (to clients of every layout too)" if also else "")


SEEDS = RunningSeeds()
atexit.register(SEEDS.withdraw_all)


def running_seeds() -> dict[_Key, SeedServer]:
    """The seeds this process serves, keyed by (global rank, role)."""
    return SEEDS.seeds()


def _placement(plan: LoadPlan, model: nn.Module) -> Callable[[], str] | None:
    """Where the model's experts sit now, for a seed under dynamic EPLB (else None)."""
    if (plan.identity.get("expert_parallel") or {}).get("dynamic_eplb"):
        return functools.partial(expert_placement, model)
    return None


def _layouts(
    plan: LoadPlan, model: nn.Module, loaded: LoadedWeights, signature: str | None = None,
    holds: ModelHolds | None = None,
) -> tuple[Layouts, Retained]:
    """What a seed whose model was loaded serves: the processed layout where every
    quantization method takes it (unless LAYOUT is loaded), and the loaded one with what
    INT8_CACHE keeps (unless LAYOUT is processed); and what both cost beyond the running
    model. The processed layout is found first: it tells the loaded tensors the model
    still holds by their storages' use counts. ``signature``: the processed model's
    ``state_signature`` where it was read earlier (a preparing seed's, at start), and
    ``holds`` what the model held then (``layout.ModelHolds``; read now where None)."""
    layout = plan.config.layout
    if holds is None:
        holds = ModelHolds(model, loaded.tensors)
    found, why = (None, "LAYOUT is loaded") if layout == LOADED else processed_weights(
        model, loaded, holds)
    processed = found.weights if found is not None else None
    if processed is None:
        signature = None
    elif signature is None:
        signature = state_signature(model)
    name = who(plan.rank, plan.role, seed=True)
    if layout == PROCESSED:
        kept, retained = None, Retained("no", 0, 0)
    else:
        kept, retained = retain(loaded, Retention(plan.config.int8_cache,
                                                  plan.config.int8_cache_name), holds)
        if processed is not None and kept.dropped:
            kept, retained = _from_processed(kept, processed, retained)
    views = [*(kept.tensors if kept is not None else ()),
             *(processed.tensors if processed is not None else ())]
    tensors, nbytes = beyond_model(views, holds)
    retained = dataclasses.replace(retained, tensors=tensors, nbytes=nbytes,
                                   processed_bytes=found.kept_bytes if found else 0)
    serves = [n for n, w in ((LOADED, kept), (PROCESSED, processed))
              if w is not None and not w.dropped]
    (logger.info if serves else logger.warning)(
        "%s serves the %s layout; keeps %d tensor(s), %.3f GB, beyond the running model "
        "(INT8_CACHE %s%s)%s%s", name, " and ".join(serves) or "no", retained.tensors,
        retained.nbytes / 1e9, retained.mode,
        f"; {len(found.kept)} kernel input(s), {found.kept_bytes / 1e9:.3f} GB, for the "
        f"processed layout, e.g. {found.kept[0]}" if found and found.kept else "",
        f"; the loaded layout lacks {len(retained.dropped)} tensor(s) processing replaced, "
        f"e.g. {retained.dropped[0]}" if retained.dropped else "",
        "" if processed is not None else f"; not the processed layout: {why}",
    )
    not_loaded = "LAYOUT is processed" if kept is None else ""
    return Layouts(kept, processed, signature, not_loaded or "", why), retained


def _from_processed(
    kept: LoadedWeights, processed: LoadedWeights, retained: Retained
) -> tuple[LoadedWeights, Retained]:
    """``kept`` with each tensor INT8_CACHE dropped taken from the processed layout where
    that holds the same bytes (a kernel input it keeps anyway): the loaded layout then
    costs nothing more for them."""
    tensors = list(kept.tensors)
    for i, spec in enumerate(kept.specs):
        if spec.name in kept.dropped and processed.digests[i] == kept.digests[i]:
            tensors[i] = processed.tensors[i]
    still = tuple(n for n, t in zip((s.name for s in kept.specs), tensors, strict=True)
                  if t.is_meta)
    named = [(spec.name, t) for spec, t in zip(kept.specs, tensors, strict=True)]
    return (LoadedWeights(named, list(kept.digests), kept.state, still, kept.parts),
            dataclasses.replace(retained, dropped=still))


def seed_settings(plan: LoadPlan, host: str) -> SeedSettings:
    """How this rank's seed serves, from the config (``host``: where it listens)."""
    config = plan.config
    limit = config.send_limit_mb_per_s
    return SeedSettings(
        identity=plan.identity,
        rank=plan.rank,
        host=host,
        timeout_s=config.timeout_s,
        bucket_bytes=config.bucket_mb << 20,
        send_limit_bytes_per_s=limit * 1e6 if limit is not None else None,
        secret=config.secret,
        output_prefix=plan.output_prefix,
        data_plane=plan.data_plane(),
        device=plan.device,
        min_rate_bytes_per_s=config.min_rate_mb_per_s * 1e6,
        compile_cache=CacheServing(
            aot_cache_dir(), config.timeout_s, config.min_rate_mb_per_s * 1e6,
        ) if config.compile_cache_enabled() else None,
        processing=plan.processing,
        fanout=config.relay_fanout,
        # Every rank at LISTEN_PORT + rank of one host: one rank's address gives the
        # others' (an instance over several hosts has as many addresses as hosts).
        rank_ports=plan.listen_port != 0 and plan.hosts == 1,
    )


def _bound(plan: LoadPlan, make: Callable[[str, socket.socket], _Bound]) -> _Bound:
    """``make(host, sock)`` with a socket bound on this rank's listener address; a port
    that is taken fails start-up with a message naming the setting."""
    host = get_ip()
    port = plan.listen_port
    try:
        sock = listen(host, port)
    except OSError as e:
        raise RuntimeError(
            f"Netloader {plan.role} seed rank {plan.rank} cannot listen on "
            f"{host}:{port} ({plan.listen_setting()}): {e}"
        ) from e
    return make(host, sock)


