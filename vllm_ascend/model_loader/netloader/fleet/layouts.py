"""Seed instances of this model in other parallel layouts, found in a registry.

Besides its record under its own ``model_key`` (which holds the layout: TP/PP sizes,
data and expert parallelism, rank), the first rank of a seed instance that can serve
across layouts publishes one more under ``layout_free_key``: the same identity without
``identity.LAYOUT_FIELDS``, so every layout of one model shares it. The record carries
its layout's key (``layout_key``: ``model_key`` with the rank's place in the expert-
parallel group left out), which lets a client skip instances of its own layout (those
it found under its own key). A client whose layout
no seed serves asks the first of the others across layouts (``reshard.discover``):
that rank's authenticated ``info`` names the instance's other ranks. A record is a
hint, never trusted: ``info`` and the slices' digests decide.
"""

from typing import Any

from vllm_ascend.model_loader.netloader.fleet.dns import MAX_CANDIDATES
from vllm_ascend.model_loader.netloader.fleet.registry import (
    MAX_RECORDS_READ,
    Registry,
    SeedRecord,
    least_loaded,
    model_key,
)
from vllm_ascend.model_loader.netloader.identity import LAYOUT_FIELDS

# The rank of an instance that announces it to other layouts: a client learns the
# others from its ``info`` (``rank_ports``), so one record per instance is enough.
ANNOUNCING_RANK = 0


def layout_free_key(identity: dict[str, Any]) -> str:
    """``model_key`` of ``identity`` without its layout fields: every seed instance of
    one model and software shares it, whatever its layout."""
    return model_key({k: v for k, v in identity.items() if k not in LAYOUT_FIELDS})


def layout_key(identity: dict[str, Any]) -> str:
    """``model_key`` of ``identity`` with its expert-parallel rank left out: every rank
    of one instance (of one data-parallel engine) shares it, and instances of other
    sizes, placements or data-parallel ranks do not."""
    ep = identity.get("expert_parallel")
    if isinstance(ep, dict):
        identity = {**identity, "expert_parallel": {k: v for k, v in ep.items() if k != "rank"}}
    return model_key(identity)


def announces_layout(identity: dict[str, Any], rank_ports: bool) -> bool:
    """Whether a seed of ``identity`` announces its instance to other layouts: it is
    the instance's first rank, and a client can find the others (one rank in all, or
    every rank at LISTEN_PORT + rank)."""
    if identity.get("rank") != ANNOUNCING_RANK:
        return False
    ranks = int(identity.get("tensor_parallel_size") or 1) * int(
        identity.get("pipeline_parallel_size") or 1)
    return ranks == 1 or rank_ports


def layout_record(record: SeedRecord, identity: dict[str, Any]) -> SeedRecord:
    """``record`` as published under ``layout_free_key``: with its layout's key."""
    return SeedRecord(record.address, record.rank, record.role, record.checkpoint,
                      record.active_transfers, record.relaying, layout_key(identity))


def other_layout_candidates(
    registry: Registry, identity: dict[str, Any], spread_key: str, exclude: Any = (),
) -> list[str]:
    """Addresses of the first ranks of live seed instances of ``identity``'s model and
    role in any other layout, least loaded first (``registry.least_loaded``), at most
    ``MAX_CANDIDATES``; records without a layout key, or of this layout, are left out.
    Every layout shares the index: the freshest ``MAX_RECORDS_READ`` are read, so that
    instances of this client's own layout or checkpoint do not crowd the others out.
    Raises ``RegistryError``."""
    mine = layout_key(identity)
    records = [r for r in registry.find(layout_free_key(identity), identity["role"],
                                        ANNOUNCING_RANK, most=MAX_RECORDS_READ)
               if r.layout_key is not None and r.layout_key != mine]
    return least_loaded(records, identity.get("checkpoint"), spread_key,
                        exclude)[:MAX_CANDIDATES]
