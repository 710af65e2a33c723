"""What one load is, decided before any weight moves, and how it ended.

``plan_load`` builds a ``LoadPlan`` once per load, in the worker: its global rank and
role (the served model, or a speculative decoder's draft), the worker's device, the
model's identity (with the checkpoint fingerprint of the weight files on this node),
and what every rank of the instance shares (``spread_key``). ``LoadOutcome`` is how the
load ended: where the weights came from, how long it took, and why each seed that was
tried could not serve; a seed's ``info`` reports it.
"""

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import ModelConfig, VllmConfig
from vllm.platforms import current_platform

from vllm_ascend.model_loader.netloader.config import DRAFT_PORT_OFFSET, NetloaderConfig
from vllm_ascend.model_loader.netloader.exact_checkpoint import ExactFingerprint, exact_fingerprint
from vllm_ascend.model_loader.netloader.identity import (
    CheckpointError,
    checkpoint_fingerprint,
    model_identity,
    weight_files,
)
from vllm_ascend.model_loader.netloader.log import get_logger, who
from vllm_ascend.model_loader.netloader.manifest import DRAFT, TARGET
from vllm_ascend.model_loader.netloader.wire.messages import COLLECTIVE, LOADED, TCP

logger = get_logger(__name__)


@dataclass(frozen=True)
class LoadPlan:
    """One load of one rank's model, as decided before any weight moves."""

    config: NetloaderConfig
    rank: int
    role: str
    # The worker's device, read in the worker's own thread (where vLLM set it); seed
    # threads are handed this, never read it themselves.
    device: torch.device
    identity: dict[str, Any]
    # What every rank of one instance shares, and other instances do not: all ranks
    # order discovered seeds alike (``fleet.dns.spread``).
    spread_key: str
    # Whether the model loading now is the served model's own checkpoint (a target, or
    # the MTP layers a draft loads from it); it then takes MODEL and EXPECTED_FINGERPRINT.
    target_checkpoint: bool = True
    # This worker's ``layout.processing_signature``, once its model is built.
    processing: dict[str, str] | None = None
    # How many hosts the instance spans (vLLM's ``ParallelConfig.nnodes``): its ranks'
    # addresses follow from one rank's only on one host.
    hosts: int = 1

    @property
    def key(self) -> tuple[int, str]:
        """(global rank, role): one seed per key in a process."""
        return self.rank, self.role

    @property
    def who(self) -> str:
        """``Netloader rank 0 target``: how this load's log lines start."""
        return who(self.rank, self.role)

    @property
    def draft(self) -> bool:
        return self.role == DRAFT

    @property
    def listen_port(self) -> int:
        return listener_for(self.config, self.rank, self.role)[0]

    @property
    def output_prefix(self) -> str | None:
        return listener_for(self.config, self.rank, self.role)[1]

    def listen_setting(self) -> str:
        """The key that chose ``listen_port``, for a start-up error that names it."""
        if self.draft and self.config.draft_listen_port is not None:
            return f"DRAFT_LISTEN_PORT {self.config.draft_listen_port}"
        setting = f"LISTEN_PORT {self.config.listen_port}"
        return setting + (f" + {DRAFT_PORT_OFFSET} for a draft" if self.draft else "")

    def expected_fingerprint(self) -> str | None:
        """EXPECTED_FINGERPRINT for the target and for a draft that is the target's own
        checkpoint (MTP layers); DRAFT_EXPECTED_FINGERPRINT for any other draft."""
        if self.role == TARGET:
            return self.config.expected_fingerprint
        if self.config.draft_expected_fingerprint is not None:
            return self.config.draft_expected_fingerprint
        return self.config.expected_fingerprint if self.target_checkpoint else None

    def data_plane(self) -> str:
        """DATA_PLANE, else bulk data on the connection for host memory (CPU) and a
        collective group for device memory."""
        if self.config.data_plane is not None:
            return self.config.data_plane
        return TCP if current_platform.device_type == "cpu" else COLLECTIVE

    def holding(self, checkpoint: str | None) -> "LoadPlan":
        """This plan once the model holds ``checkpoint`` (a node without weight files
        that received a seed's): the seed it starts names that checkpoint."""
        if self.identity["checkpoint"] is not None or checkpoint is None:
            return self
        return dataclasses.replace(self, identity={**self.identity, "checkpoint": checkpoint})


@dataclass(frozen=True)
class LoadOutcome:
    """How a load ended, for the log and a seed's ``info``."""

    # "disk", "seed <address>", or what a relay serves meanwhile ("relaying its fetch").
    loaded_from: str = "disk"
    load_seconds: float | None = None
    # Why each seed that was tried could not serve (before another one or the disk did).
    fallback_reasons: tuple[str, ...] = ()
    # Bytes a resumed fetch kept from a source that failed (not sent again).
    reused_bytes: int = 0
    # The layout the weights arrived in ("processed": processing was skipped).
    layout: str = LOADED


def plan_load(
    config: NetloaderConfig, vllm_config: VllmConfig, model_config: ModelConfig,
    download_dir: str | None,
) -> LoadPlan:
    """The plan of the load ``model_config`` is about to go through on this worker.

    MODEL names the served model and a draft that is its own checkpoint (MTP layers);
    any other draft is named by its own path."""
    rank, role = global_rank(), model_role(model_config)
    target_path = _target_path(vllm_config)
    target_checkpoint = role == TARGET or model_config.model == target_path
    name = (config.model if target_checkpoint else None) or model_config.model
    checkpoint, exact = checkpoint_ids(model_config, download_dir, who(rank, role))
    identity = model_identity(
        model_config, vllm_config.parallel_config, rank, name, role, checkpoint, exact
    )
    return LoadPlan(config, rank, role, _worker_device(), identity,
                    _spread_key(vllm_config), target_checkpoint,
                    hosts=int(getattr(vllm_config.parallel_config, "nnodes", 1) or 1))


def checkpoint_of(model_config: ModelConfig, download_dir: str | None, who: str) -> str | None:
    """The sampled checkpoint fingerprint of the model's weight files on this node
    (None: it has none, or one cannot be read); see ``checkpoint_ids``."""
    return checkpoint_ids(model_config, download_dir, who)[0]


def checkpoint_ids(
    model_config: ModelConfig, download_dir: str | None, who: str
) -> tuple[str | None, str | None]:
    """(sampled, exact) checkpoint fingerprints of the model's weight files on this
    node: ``identity.checkpoint_fingerprint`` (None: no weight files, or one cannot be
    read), and the exact one where a hub cache snapshot or a fresh digest manifest gives
    every file's sha256 (``exact_checkpoint``; None elsewhere). Both go in the identity:
    the sampled one is what every peer release compares, the exact one is compared
    where both sides have one."""
    files = weight_files(model_config.model, model_config.revision, download_dir)
    if not files:
        return None, None
    sampled = None
    t0 = time.perf_counter()
    try:
        sampled = checkpoint_fingerprint(files)
    except CheckpointError as e:
        # The disk loader will say what is wrong with the file, if it is used.
        logger.warning("%s: no checkpoint fingerprint: %s", who, e)
    exact = exact_fingerprint(files, sampled) if sampled is not None else "no sampled one"
    if isinstance(exact, ExactFingerprint):
        how = f"exact {exact.value} from {exact.source}"
    else:
        how = f"no exact one: {exact}"
    logger.info("%s checkpoint fingerprint %s (%s; %d files, %.3f s)",
                who, sampled, how, len(files), time.perf_counter() - t0)
    return sampled, exact.value if isinstance(exact, ExactFingerprint) else None


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


def global_rank() -> int:
    """This worker's rank in vLLM's world group (0 before it exists)."""
    if not torch.distributed.is_initialized():
        return 0
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().rank


def _worker_device() -> torch.device:
    if current_platform.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(current_platform.device_type, torch.accelerator.current_device_index())


def _spread_key(vllm_config: VllmConfig) -> str:
    """The multi-node rendezvous address when the instance spans hosts (each node
    builds its own config, and vLLM sets ``instance_id`` from the clock), else the
    instance id."""
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
