"""``--load-format netloader``: fill the model from a seed, else from disk, then
serve it as a seed. This is the only place that decides to fall back to disk.

With RELAY (the default) the listener opens before the fetch and already passes
verified tensors on to clients the seed sends here; a fetch that fails closes it,
and the seed started after the disk load takes its port.

The template of ``BaseModelLoader.load_model`` is kept: build the model, fill its
weights (``load_weights`` below), post-process. A failed transfer needs no rebuilt
model: only digest-verified bytes ever reach it, so every tensor holds either its
initial value or exactly the seed's, and the disk loader then fills it as usual.
"""

import dataclasses
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.utils.network_utils import get_ip

from vllm_ascend.model_loader.netloader.client import WeightFetch
from vllm_ascend.model_loader.netloader.config import NetloaderConfig, parse_config
from vllm_ascend.model_loader.netloader.manifest import (
    DRAFT,
    TARGET,
    LoadedWeights,
    model_identity,
    model_tensors,
    spec_of,
)
from vllm_ascend.model_loader.netloader.server import RelayListener, SeedServer

# The seed of each (global rank, role) in this process; a reload replaces it. A draft
# model (role DRAFT) has a listener of its own (see ``listener_for``), its seeds in
# DRAFT_SOURCE, and an identity no target listener accepts: it never collides with, or
# is mistaken for, the target.
_SEEDS: dict[tuple[int, str], SeedServer] = {}
_Listener = TypeVar("_Listener", SeedServer, RelayListener)


class NetloaderModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.config = parse_config(load_config.model_loader_extra_config)
        self._disk = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )
        self._rank = 0
        self._role = TARGET
        self._identity: dict[str, Any] | None = None
        self._loaded: LoadedWeights | None = None
        # The relay whose fetch filled this model: it goes on as the seed.
        self._relay_seed: SeedServer | None = None
        # Where the last load_weights got its weights from, and how long it took.
        self.weights_source = "disk"
        self.load_seconds = 0.0
        # Why each seed that was tried could not serve (before another one or the disk did).
        self.fallback_reasons: tuple[str, ...] = ()

    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        self._rank = _global_rank()
        self._role = model_role(model_config)
        self.fallback_reasons = ()
        self._relay_seed = None
        # MODEL names the served model; a draft is always named by its own path.
        name = (self.config.model if self._role == TARGET else None) or model_config.model
        self._identity = model_identity(
            model_config, vllm_config.parallel_config, self._rank, name, self._role
        )
        model = super().load_model(vllm_config, model_config, prefix)
        self._start_seed()
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        start = time.perf_counter()
        digests = self._fetch(model)
        if digests is None:
            self._disk.load_weights(model, model_config)
            self.weights_source = "disk"
        # The relay whose fetch filled the model already holds its weights and digests.
        relay = self._relay_seed
        self._loaded = relay.weights if relay is not None else LoadedWeights.capture(model, digests)
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "Netloader rank %d %s loaded %d tensors (%.3f GB) from %s in %.3f s",
            self._rank, self._role, len(self._loaded.specs), self._loaded.total_bytes / 1e9,
            self.weights_source, self.load_seconds,
        )

    def _fetch(self, model: nn.Module) -> list[str] | None:
        """Digests of what a seed delivered into ``model``, or None to load from disk."""
        draft = self._role == DRAFT
        addresses = self.config.sources_for_rank(self._rank, draft)
        if not addresses or self._identity is None:
            logger.info(
                "Netloader rank %d %s has no %s: loading from disk",
                self._rank, self._role, "DRAFT_SOURCE" if draft else "SOURCE",
            )
            return None
        named = model_tensors(model)
        if not all(t.is_contiguous() for _, t in named):
            logger.warning(
                "Netloader rank %d: model has non-contiguous tensors; loading from disk",
                self._rank,
            )
            return None
        relay = self._open_relay() if self.config.relay else None
        fetch = WeightFetch(
            identity=self._identity,
            specs=[spec_of(n, t) for n, t in named],
            targets=[t for _, t in named],
            timeout_s=self.config.timeout_s,
            secret=self.config.secret,
            relay=relay,
        )
        try:
            received = fetch.run(addresses)
        finally:
            if relay is not None:
                self._relay_seed = relay.serving_complete()
                if self._relay_seed is None:
                    relay.close()
        # Also kept when a later source served: the operator sees every failed seed.
        self.fallback_reasons = tuple(fetch.reasons)
        if received is None:
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
        self.weights_source = f"seed {received.source}"
        return received.digests

    def _start_seed(self) -> None:
        loaded = self._loaded
        assert loaded is not None and self._identity is not None
        key = (self._rank, self._role)
        if self._relay_seed is not None:
            self._relay_seed.promote(self.weights_source, self.load_seconds, self.fallback_reasons)
            _SEEDS[key] = self._relay_seed
        else:
            _stop_seed(key)
            _SEEDS[key] = self._listening(
                lambda host, port: self._new_seed(loaded, host, port)
            ).start()
        self._relay_seed = None
        self._loaded = None

    def _open_relay(self) -> RelayListener:
        # A reload's relay needs the port of the seed that served the model before.
        _stop_seed((self._rank, self._role))
        return self._listening(
            lambda host, port: RelayListener(
                host, port, lambda weights, sock: self._new_seed(weights, host, port, sock)
            )
        )

    def _new_seed(
        self, weights: LoadedWeights, host: str, port: int, sock: socket.socket | None = None
    ) -> SeedServer:
        assert self._identity is not None
        limit = self.config.send_limit_mb_per_s
        return SeedServer(
            weights, self._identity, self._rank, host, port, self.config.timeout_s,
            listener_for(self.config, self._rank, self._role)[1],
            bucket_bytes=self.config.bucket_mb << 20,
            send_limit_bytes_per_s=limit * 1e6 if limit is not None else None,
            loaded_from="relaying its fetch" if sock is not None else self.weights_source,
            load_seconds=self.load_seconds, fallback_reasons=self.fallback_reasons,
            secret=self.config.secret, listen_socket=sock,
        )

    def _listening(self, bind: Callable[[str, int], _Listener]) -> _Listener:
        """``bind(host, port)`` on this rank's listener address; a port that is taken
        fails start-up with a message naming the setting."""
        host = get_ip()
        port = listener_for(self.config, self._rank, self._role)[0]
        try:
            return bind(host, port)
        except OSError as e:
            setting = (
                f"DRAFT_LISTEN_PORT {self.config.draft_listen_port}" if self._role == DRAFT
                else f"LISTEN_PORT {self.config.listen_port}"
            )
            raise RuntimeError(
                f"Netloader {self._role} seed rank {self._rank} cannot listen on "
                f"{host}:{port} ({setting}): {e}"
            ) from e


def _stop_seed(key: tuple[int, str]) -> None:
    old = _SEEDS.pop(key, None)
    if old is not None:
        old.stop()


def running_seeds() -> dict[tuple[int, str], SeedServer]:
    """The seeds this process serves, keyed by (global rank, role)."""
    return dict(_SEEDS)


def listener_for(config: NetloaderConfig, rank: int, role: str) -> tuple[int, str | None]:
    """(port, address-file prefix) of rank ``rank``'s listener for a ``role`` model.

    The target listens on LISTEN_PORT + rank and writes {OUTPUT_PREFIX}{rank}.txt; a
    draft on DRAFT_LISTEN_PORT + rank and writes {OUTPUT_PREFIX}draft{rank}.txt. Port 0
    (the key unset) asks the OS for a free port."""
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


def _global_rank() -> int:
    if not torch.distributed.is_initialized():
        return 0
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().rank
