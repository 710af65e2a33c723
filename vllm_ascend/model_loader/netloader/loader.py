"""``--load-format netloader``: fill the model from a seed, else from disk, then
serve it as a seed. This is the only place that decides to fall back to disk.

The template of ``BaseModelLoader.load_model`` is kept: build the model, fill its
weights (``load_weights`` below), post-process. A failed fetch needs no rebuilt
model: only digest-verified bytes ever reach it, so every parameter holds either
its initial value or exactly the seed's, and the disk loader then writes every
parameter (vLLM's own check: "Following weights were not initialized from
checkpoint"). Buffers the disk loader never writes (rotary caches) are restored from
a copy taken before the fetch, so the model equals a fresh disk load bit for bit.

With RELAY (the default) the listener opens before the fetch and already passes
verified tensors on to clients the seed sends here; a fetch that fails closes it,
and the seed started after the disk load takes its port.
"""

import atexit
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.platforms import current_platform
from vllm.utils.network_utils import get_ip

from vllm_ascend.model_loader.netloader import load_state, metrics
from vllm_ascend.model_loader.netloader.client import ClientSettings, Received, WeightFetch
from vllm_ascend.model_loader.netloader.compile_cache import cpu_aot_shim, fetching, naming, serving
from vllm_ascend.model_loader.netloader.config import (
    DRAFT_PORT_OFFSET,
    NetloaderConfig,
    parse_config,
)
from vllm_ascend.model_loader.netloader.fleet.dns import DNS_TIMEOUT_S, expand
from vllm_ascend.model_loader.netloader.fleet.registry import (
    Announcer,
    Registry,
    RegistryError,
    SeedRecord,
    model_key,
    open_registry,
    registry_candidates,
)
from vllm_ascend.model_loader.netloader.identity import (
    CheckpointError,
    checkpoint_fingerprint,
    model_identity,
    weight_files,
)
from vllm_ascend.model_loader.netloader.manifest import (
    DRAFT,
    TARGET,
    LoadedWeights,
    model_tensors,
    spec_of,
)
from vllm_ascend.model_loader.netloader.metrics import CLIENT, FAILED, OK, REFUSED
from vllm_ascend.model_loader.netloader.seed.relay import RelayListener, RelayProgress
from vllm_ascend.model_loader.netloader.seed.retention import Retention, retain
from vllm_ascend.model_loader.netloader.seed.server import Provenance, SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import format_address, listen
from vllm_ascend.model_loader.netloader.wire.messages import COLLECTIVE, TCP

# The seed of each (global rank, role) in this process; a reload replaces it. A draft
# model (role DRAFT) has a listener of its own (see ``listener_for``), its seeds in
# DRAFT_SOURCE, and an identity no target listener accepts: it never collides with, or
# is mistaken for, the target.
_SEEDS: dict[tuple[int, str], SeedServer] = {}
# The registry heartbeat of each of those seeds (REGISTRY set).
_ANNOUNCERS: dict[tuple[int, str], Announcer] = {}
_Bound = TypeVar("_Bound", SeedServer, RelayListener)


class NetloaderModelLoader(BaseModelLoader):
    """Loads from the seeds in SOURCE (DRAFT_SOURCE for a draft model), else from disk,
    then serves the loaded weights as a seed; see the user guide for every key."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.config = parse_config(load_config.model_loader_extra_config)
        self._disk = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )
        self._rank = 0
        self._role = TARGET
        # The served model's path, when a speculative decoder loads a draft beside it,
        # and whether the model loading now is that checkpoint (a target, or MTP layers).
        self._target_path: str | None = None
        self._target_checkpoint = False
        self._parallel_config: Any = None
        self._identity: dict[str, Any] | None = None
        self._device = torch.device("cpu")
        self._loaded: LoadedWeights | None = None
        # The relay whose fetch filled this model: it goes on as the seed.
        self._relay_seed: SeedServer | None = None
        # Where the last load_weights got its weights from, and how long it took.
        self.weights_source = "disk"
        self.load_seconds = 0.0
        # Bytes the last fetch kept from a source that failed mid-transfer (resumed).
        self.reused_bytes = 0
        # Why each seed that was tried could not serve (before another one or the disk did).
        self.fallback_reasons: tuple[str, ...] = ()
        # All ranks of one instance order discovered seeds alike (discovery.spread).
        self._spread_key = ""
        self._registry: Registry | None = None
        # Why the last fetch went to disk, for the fallbacks metric (None: not asked to).
        self._fallback_kind: str | None = None
        if current_platform.device_type == "cpu" and self.config.compile_cache is not False:
            # Without it vLLM 0.32 on CPU cannot load any compile cache (see there).
            cpu_aot_shim.allow_cpu_aot_load()

    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def get_all_weights(
        self, model_config: ModelConfig, model: nn.Module
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's weights, read from disk exactly as ``auto`` reads them:
        what vLLM's ``reload_weights`` (vllm/model_executor/model_loader/reload/
        inplace.py, reached by ``collective_rpc("reload_weights")``) loads into a
        running model. A reload is always from disk; no seed is asked.

        This rank's seed goes on serving only if the reload reads the checkpoint it
        serves: its views of the as-loaded tensors then hold the same values after
        the reload. A reload from another checkpoint stops it (its identity would
        name the old weights; vLLM keeps no as-loaded copy of the new ones to send),
        and the instance serves as a seed again after its next start."""
        self._rank = _global_rank()
        self._role = model_role(model_config)
        self._stop_seed_unless_same_checkpoint(model_config)
        return self._disk.get_all_weights(model_config, model)

    def _stop_seed_unless_same_checkpoint(self, model_config: ModelConfig) -> None:
        key = (self._rank, self._role)
        seed = _SEEDS.get(key)
        if seed is None:
            return
        serving = seed.identity.get("checkpoint")
        reloading = self._checkpoint_of(model_config)
        if serving is not None and reloading == serving:
            logger.info(
                "Netloader rank %d %s: reloading checkpoint %s from %s; the seed on %s "
                "goes on serving it", self._rank, self._role, serving[:12], model_config.model,
                seed.address,
            )
            return
        logger.warning(
            "Netloader rank %d %s: reloading from %s (checkpoint %s), not the checkpoint "
            "%s this rank's seed serves: the seed on %s stops",
            self._rank, self._role, model_config.model,
            reloading[:12] if reloading else "unknown", (serving or "unknown")[:12],
            seed.address,
        )
        _stop_seed(key)

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        self._rank = _global_rank()
        self._role = model_role(model_config)
        self._parallel_config = vllm_config.parallel_config
        self._device = _worker_device()
        self._spread_key = _spread_key(vllm_config)
        self._target_path = _target_path(vllm_config)
        self.fallback_reasons = ()
        self._relay_seed = None
        model = super().load_model(vllm_config, model_config, prefix)
        self._start_seed()
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        start = time.perf_counter()
        self._identity = self._identity_of(model_config)
        self._fallback_kind = None
        self.reused_bytes = 0
        before = load_state.snapshot(model)
        received = self._fetch(model)
        if received is None:
            if self._fallback_kind is not None:
                metrics.METRICS.fallback(self._fallback_kind)
            self._disk.load_weights(model, model_config)
            self.weights_source = "disk"
            digests = None
        else:
            self.weights_source = f"seed {received.source}"
            self.reused_bytes = received.reused_bytes
            digests = received.digests
            if self._identity["checkpoint"] is None:
                # A node without weight files now holds the seed's checkpoint.
                self._identity = {**self._identity, "checkpoint": received.checkpoint}
            self._fetch_compile_cache(model, received.source)
        state = load_state.changes(before, load_state.snapshot(model), model)
        if state.changes or state.uncarried:
            logger.info(
                "Netloader rank %d %s: loading set %s%s", self._rank, self._role,
                ", ".join(state.describe()) or "no plain state",
                f"; state Netloader cannot carry: {', '.join(state.uncarried)}"
                if state.uncarried else "",
            )
        # The relay whose fetch filled the model already holds its weights and digests.
        relay = self._relay_seed
        self._loaded = (relay.weights if relay is not None
                        else LoadedWeights.capture(model, digests, state))
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "Netloader rank %d %s loaded %d tensors (%.3f GB) from %s in %.3f s%s",
            self._rank, self._role, len(self._loaded.specs), self._loaded.total_bytes / 1e9,
            self.weights_source, self.load_seconds,
            f" ({self.reused_bytes} bytes reused from a source that failed)"
            if self.reused_bytes else "",
        )

    def _identity_of(self, model_config: ModelConfig) -> dict[str, Any]:
        # MODEL names the served model, and a draft that is its own checkpoint (MTP
        # layers); any other draft is named by its own path.
        self._target_checkpoint = model_config.model == self._target_path
        names_model = self._role == TARGET or self._target_checkpoint
        name = (self.config.model if names_model else None) or model_config.model
        checkpoint = self._checkpoint_of(model_config)
        return model_identity(
            model_config, self._parallel_config, self._rank, name, self._role, checkpoint
        )

    def _checkpoint_of(self, model_config: ModelConfig) -> str | None:
        """``checkpoint_fingerprint`` of the model's weight files (None: it has none,
        or one cannot be read)."""
        files = weight_files(
            model_config.model, model_config.revision, self.load_config.download_dir
        )
        if not files:
            return None
        checkpoint = None
        t0 = time.perf_counter()
        try:
            checkpoint = checkpoint_fingerprint(files)
        except CheckpointError as e:
            # The disk loader will say what is wrong with the file, if it is used.
            logger.warning("Netloader rank %d: no checkpoint fingerprint: %s", self._rank, e)
        logger.info(
            "Netloader rank %d %s checkpoint fingerprint %s (%d files, %.3f s)",
            self._rank, self._role, checkpoint, len(files), time.perf_counter() - t0,
        )
        return checkpoint

    def _fetch(self, model: nn.Module) -> Received | None:
        """What a seed delivered into ``model``, or None to load from disk (the model
        then holds exactly what it held before, buffers included)."""
        assert self._identity is not None
        draft = self._role == DRAFT
        entries = self.config.sources_for_rank(self._rank, draft)
        if not entries and self.config.registry is None:
            logger.info(
                "Netloader rank %d %s has no %s and no REGISTRY: loading from disk",
                self._rank, self._role, "DRAFT_SOURCE" if draft else "SOURCE",
            )
            return None
        if self._identity["checkpoint"] is None and self._expected_fingerprint() is None:
            self._fallback_kind = "no_weight_files"
            logger.warning(
                "Netloader rank %d %s: no weight files on this node and no "
                "EXPECTED_FINGERPRINT, so no seed's weights can be told to be this model's; "
                "loading from disk", self._rank, self._role,
            )
            return None
        meta = [n for n, t in _parameters_and_buffers(model) if t.is_meta]
        if meta:
            # vLLM's online quantization (e.g. --quantization fp8 over a bf16
            # checkpoint) creates these in load_weights: there is nothing to receive into.
            self._fallback_kind = "meta_tensors"
            self.fallback_reasons = (
                f"{len(meta)} tensors are on the meta device until load_weights "
                f"(quantization {self._identity['quantization']}, e.g. {meta[0]}): "
                "online quantization cannot be fetched",
            )
            logger.warning(
                "Netloader rank %d %s: %s; loading from disk", self._rank, self._role,
                self.fallback_reasons[0],
            )
            return None
        named = model_tensors(model)
        if not all(t.is_contiguous() for _, t in named):
            self._fallback_kind = "non_contiguous"
            logger.warning(
                "Netloader rank %d: model has non-contiguous tensors; loading from disk",
                self._rank,
            )
            return None
        try:
            addresses, discovered, notes = self._candidates(entries)
        except Exception as e:  # noqa: BLE001 - a registry's or resolver's answer must never keep the instance from starting
            logger.exception("Netloader rank %d: seed discovery failed", self._rank)
            addresses, discovered = [], set()
            notes = [f"seed discovery failed: {type(e).__name__}: {e}"]
        if not addresses:
            self._fallback_kind = "no_seed_found"
            self.fallback_reasons = tuple(notes)
            logger.warning(
                "Netloader rank %d %s: no seed found (%s); loading from disk",
                self._rank, self._role, "; ".join(notes),
            )
            return None
        buffers = [(t, t.clone()) for _, t in model.named_buffers() if not t.is_meta]
        relay = self._open_relay() if self.config.relay else None
        fetch = WeightFetch(
            settings=self._client_settings(),
            specs=[spec_of(n, t) for n, t in named],
            targets=[t for _, t in named],
            relay=relay,
            reasons=list(notes),
            discovered=frozenset(discovered),
            model=model,
        )
        metrics.METRICS.started(CLIENT)
        self._fallback_kind = "seeds_failed"
        try:
            received = fetch.run(addresses)
            if received is not None:
                # What the seed's load_weights set besides tensors: checked against
                # this model before the first byte, plain instance attributes now.
                load_state.apply(model, received.state)
        except Exception as e:  # noqa: BLE001 - a peer's answer must never keep the instance from starting: disk is always right
            logger.exception("Netloader rank %d: fetch failed with an unexpected error", self._rank)
            fetch.reasons.append(f"unexpected error: {type(e).__name__}: {e}")
            self._fallback_kind = "unexpected_error"
            received = None
        finally:
            metrics.METRICS.stopped(CLIENT)
            for reason in fetch.reasons[len(notes):]:
                metrics.METRICS.ended(CLIENT, REFUSED if " refused: " in reason else FAILED)
            if received is not None:
                metrics.METRICS.ended(CLIENT, OK, received.nbytes, received.seconds)
            if relay is not None:
                # A relay goes on as the seed only of a model this fetch filled.
                self._relay_seed = relay.serving_complete() if received is not None else None
                if self._relay_seed is None:
                    relay.close()
        # Also kept when a later source served: the operator sees every failed seed.
        self.fallback_reasons = tuple(fetch.reasons)
        if received is None:
            for buffer, before in buffers:
                buffer.copy_(before)
            logger.warning(
                "Netloader rank %d %s: no seed could serve it (%s); loading from disk",
                self._rank, self._role, "; ".join(fetch.reasons),
            )
            return None
        if fetch.reasons:
            logger.warning(
                "Netloader rank %d %s: %d source(s) failed before %s served (%s)",
                self._rank, self._role, len(fetch.reasons), received.source,
                "; ".join(fetch.reasons),
            )
        return received

    def _fetch_compile_cache(self, model: nn.Module, address: str) -> None:
        """Install the compile cache of the seed that served the weights, for vLLM's
        warm-up to load instead of compiling (COMPILE_CACHE; ``compile_cache``)."""
        who = f"rank {self._rank} {self._role}"
        if not self.config.compile_cache_enabled():
            logger.info(
                "Netloader %s: not asking %s for its compile cache (COMPILE_CACHE %s%s)",
                who, address, "false" if self.config.compile_cache is False else "auto",
                "" if self.config.compile_cache is False else " and no shared secret",
            )
            return
        fetching.install_from_seed(model, address, fetching.CacheFetch(
            timeout_s=self.config.timeout_s,
            min_rate_bytes_per_s=self.config.min_rate_mb_per_s * 1e6,
            secret=self.config.secret,
        ), who)

    def _candidates(self, entries: tuple[Any, ...]) -> tuple[list[str], set[str], list[str]]:
        """(seed addresses to try, in order; those of them that discovery found; why a
        discovery gave none): the registry's live seeds of this model, least loaded
        first, then SOURCE with each DNS name expanded. This rank's own listener is
        never a candidate. A registry that fails, however it fails, leaves SOURCE."""
        assert self._identity is not None
        own = self._own_addresses()
        found: list[str] = []
        notes: list[str] = []
        if self.config.registry is not None:
            # Our own earlier record (a reload) must not send us to ourselves.
            _stop_announcer((self._rank, self._role))
            try:
                found = registry_candidates(
                    self._registry_client(), self._identity, self._spread_key, own
                )
            except Exception as e:  # noqa: BLE001 - RegistryError, or a registry answer nobody foresaw
                notes.append(str(e) if isinstance(e, RegistryError)
                             else f"registry {self.config.registry}: {type(e).__name__}: {e}")
            else:
                logger.info(
                    "Netloader rank %d %s: registry %s lists %d live seed(s) of this model: %s",
                    self._rank, self._role, self.config.registry, len(found), ", ".join(found),
                )
                if not found:
                    notes.append(
                        f"registry {self.config.registry}: no live seed of this model, "
                        f"role and rank"
                    )
        more, dns_notes = expand(
            entries, self._rank, self._spread_key, own,
            timeout_s=min(DNS_TIMEOUT_S, self.config.timeout_s),
        )
        notes.extend(dns_notes)
        static = {a for a in entries if isinstance(a, str)}
        discovered = set(found) | {a for a in more if a not in static}
        return [*found, *(a for a in more if a not in found)], discovered, notes

    def _own_addresses(self) -> list[str]:
        """Where this rank's listener is or will be: never a seed to fetch from."""
        port = listener_for(self.config, self._rank, self._role)[0]
        own = [format_address(get_ip(), port)] if port else []
        seed = _SEEDS.get((self._rank, self._role))
        if seed is not None:
            own.append(seed.address)
        return own

    def _registry_client(self) -> Registry:
        assert self.config.registry is not None
        if self._registry is None:
            self._registry = open_registry(self.config.registry)
        return self._registry

    def _announce(self, seed: SeedServer) -> None:
        """Publish ``seed`` in the registry until it stops (REGISTRY set), unless it
        refuses every client (it dropped tensors, or its load set uncarried state)."""
        if self.config.registry is None:
            return
        if seed.weights.dropped or seed.weights.state.uncarried:
            logger.warning(
                "Netloader seed rank %d %s: not announcing %s in registry %s: it refuses "
                "every client (see its info)", self._rank, self._role, seed.address,
                self.config.registry,
            )
            return
        key = (self._rank, self._role)
        _stop_announcer(key)

        def record() -> SeedRecord:
            info = seed.describe()
            return SeedRecord(
                seed.address, self._rank, self._role, seed.identity.get("checkpoint"),
                info["active_transfers"], info["relaying"],
            )

        _ANNOUNCERS[key] = Announcer(
            self._registry_client(), model_key(seed.identity), record
        ).start()
        logger.info(
            "Netloader seed rank %d %s: announcing %s in registry %s",
            self._rank, self._role, seed.address, self.config.registry,
        )

    def _client_settings(self) -> ClientSettings:
        assert self._identity is not None
        return ClientSettings(
            identity=self._identity,
            timeout_s=self.config.timeout_s,
            secret=self.config.secret,
            expected_fingerprint=self._expected_fingerprint(),
            data_plane=self._data_plane(),
            device=self._device,
            min_rate_bytes_per_s=self.config.min_rate_mb_per_s * 1e6,
        )

    def _expected_fingerprint(self) -> str | None:
        """EXPECTED_FINGERPRINT for the target and for a draft that is the target's own
        checkpoint (MTP layers); DRAFT_EXPECTED_FINGERPRINT for any other draft."""
        if self._role == TARGET:
            return self.config.expected_fingerprint
        if self.config.draft_expected_fingerprint is not None:
            return self.config.draft_expected_fingerprint
        return self.config.expected_fingerprint if self._target_checkpoint else None

    def _seed_settings(self, host: str) -> SeedSettings:
        assert self._identity is not None
        limit = self.config.send_limit_mb_per_s
        return SeedSettings(
            identity=self._identity,
            rank=self._rank,
            host=host,
            timeout_s=self.config.timeout_s,
            bucket_bytes=self.config.bucket_mb << 20,
            send_limit_bytes_per_s=limit * 1e6 if limit is not None else None,
            secret=self.config.secret,
            output_prefix=listener_for(self.config, self._rank, self._role)[1],
            data_plane=self._data_plane(),
            device=self._device,
            min_rate_bytes_per_s=self.config.min_rate_mb_per_s * 1e6,
            compile_cache=serving.CacheServing(
                naming.aot_cache_dir(), self.config.timeout_s,
                self.config.min_rate_mb_per_s * 1e6,
            ) if self.config.compile_cache_enabled() else None,
        )

    def _data_plane(self) -> str:
        """DATA_PLANE, else bulk data on the connection for host memory (CPU) and a
        collective group for device memory."""
        if self.config.data_plane is not None:
            return self.config.data_plane
        return TCP if current_platform.device_type == "cpu" else COLLECTIVE

    def _start_seed(self) -> None:
        """Serve the loaded weights, keeping what processing replaced as INT8_CACHE
        says (``seed_cache``; the model is processed by now)."""
        assert self._loaded is not None and self._identity is not None
        retention = Retention(self.config.int8_cache, self.config.int8_cache_name)
        loaded, retained = retain(self._loaded, retention)
        log = logger.warning if retained.dropped else logger.info
        log(
            "Netloader seed rank %d %s keeps %d loaded tensor(s), %.3f GB, beyond the "
            "running model (INT8_CACHE %s)%s", self._rank, self._role, retained.tensors,
            retained.nbytes / 1e9, retained.mode,
            f"; dropped {len(retained.dropped)} (e.g. {retained.dropped[0]}), so it refuses "
            "every client" if retained.dropped else "",
        )
        key = (self._rank, self._role)
        provenance = Provenance(self.weights_source, self.load_seconds, self.fallback_reasons,
                                self.reused_bytes)
        if self._relay_seed is not None:
            self._relay_seed.promote(provenance)
            self._relay_seed.keep(loaded, retained)
            _SEEDS[key] = self._relay_seed
        else:
            _stop_seed(key)
            _SEEDS[key] = self._bound(
                lambda host, sock: SeedServer(loaded, self._seed_settings(host), sock, provenance,
                                              retained=retained)
            ).start()
        self._announce(_SEEDS[key])
        self._relay_seed = None
        self._loaded = None

    def _open_relay(self) -> RelayListener:
        # A reload's relay needs the port of the seed that served the model before.
        _stop_seed((self._rank, self._role))

        def make_seed(host: str, sock: socket.socket) -> RelayListener:
            def start(
                w: LoadedWeights, p: RelayProgress, s: socket.socket, checkpoint: str | None
            ) -> SeedServer:
                settings = self._seed_settings(host)
                if settings.identity["checkpoint"] is None:
                    # A node without weight files relays the checkpoint its seed named.
                    identity = {**settings.identity, "checkpoint": checkpoint}
                    settings = dataclasses.replace(settings, identity=identity)
                relaying = Provenance("relaying its fetch", None, ())
                return SeedServer(w, settings, s, relaying, p).start()

            return RelayListener(sock, start)

        return self._bound(make_seed)

    def _bound(self, make: Callable[[str, socket.socket], _Bound]) -> _Bound:
        """``make(host, sock)`` with a socket bound on this rank's listener address; a
        port that is taken fails start-up with a message naming the setting."""
        host = get_ip()
        port = listener_for(self.config, self._rank, self._role)[0]
        try:
            sock = listen(host, port)
        except OSError as e:
            setting = f"LISTEN_PORT {self.config.listen_port}"
            if self._role == DRAFT and self.config.draft_listen_port is not None:
                setting = f"DRAFT_LISTEN_PORT {self.config.draft_listen_port}"
            elif self._role == DRAFT:
                setting += f" + {DRAFT_PORT_OFFSET} for a draft"
            raise RuntimeError(
                f"Netloader {self._role} seed rank {self._rank} cannot listen on "
                f"{host}:{port} ({setting}): {e}"
            ) from e
        return make(host, sock)


def _stop_seed(key: tuple[int, str]) -> None:
    _stop_announcer(key)
    old = _SEEDS.pop(key, None)
    if old is not None:
        old.stop()


def _stop_announcer(key: tuple[int, str]) -> None:
    old = _ANNOUNCERS.pop(key, None)
    if old is not None:
        old.stop()  # bounded, and never raises


@atexit.register
def _withdraw_all() -> None:
    """A worker that exits withdraws its records (each within the registry's deadline),
    so clients are not offered a seed that is gone until its record expires."""
    for key in list(_ANNOUNCERS):
        _stop_announcer(key)


def _spread_key(vllm_config: VllmConfig) -> str:
    """What every rank of one instance shares, and other instances do not: the
    multi-node rendezvous address when the instance spans hosts (each node builds its
    own config, and vLLM sets ``instance_id`` from the clock), else the instance id."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "nnodes", 1) > 1:
        return f"{parallel.master_addr}:{parallel.master_port}"
    return vllm_config.instance_id or str(os.getpid())


def _target_path(vllm_config: VllmConfig) -> str | None:
    """The served model's path when the instance runs a speculative decoder
    (vLLM's ``SpeculativeConfig.target_model_config``), else None."""
    spec = getattr(vllm_config, "speculative_config", None)
    target = getattr(spec, "target_model_config", None)
    return getattr(target, "model", None)


def running_seeds() -> dict[tuple[int, str], SeedServer]:
    """The seeds this process serves, keyed by (global rank, role)."""
    return dict(_SEEDS)


def listener_for(config: NetloaderConfig, rank: int, role: str) -> tuple[int, str | None]:
    """(port, address-file prefix) of rank ``rank``'s listener for a ``role`` model.

    The target listens on LISTEN_PORT + rank and writes {OUTPUT_PREFIX}{rank}.txt; a
    draft on DRAFT_LISTEN_PORT + rank (unset: LISTEN_PORT + 10000 + rank) and writes
    {OUTPUT_PREFIX}draft{rank}.txt. Port 0 (neither key set) asks the OS for a free
    port."""
    draft = role == DRAFT
    prefix = config.output_prefix
    return (
        config.listen_port_for_rank(rank, draft),
        prefix + DRAFT if draft and prefix is not None else prefix,
    )


def model_role(model_config: ModelConfig) -> str:
    """DRAFT for a speculative decoder's draft model, TARGET for the served model.

    vLLM loads the draft with the target's load config (so through this loader, with
    the same extra config and in the same worker) but with the draft's own ModelConfig,
    which ``SpeculativeConfig`` builds with ``runner="draft"``. The prefix vLLM passes
    does not tell: an EAGLE head loads with the same empty prefix as the target."""
    return DRAFT if model_config.runner_type == "draft" else TARGET


def _worker_device() -> torch.device:
    """The device this worker runs on, read in the worker's own thread (where vLLM set
    it); seed threads are handed this, never read it themselves."""
    if current_platform.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(current_platform.device_type, torch.accelerator.current_device_index())


def _parameters_and_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _global_rank() -> int:
    if not torch.distributed.is_initialized():
        return 0
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().rank
