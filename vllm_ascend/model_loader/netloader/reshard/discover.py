"""Finding the seed ranks of an instance in another layout, and loading from them.

A client whose seeds refused its identity asks each of them what it is (``info``, on
an authenticated connection): a seed of the same model (``identity.model_difference``)
in another layout serves it across layouts. Naming one rank is enough where the seed
instance listens at LISTEN_PORT + rank on one host (its ``info`` says ``rank_ports``):
the other ranks' addresses follow. A seed instance split over pipeline stages says
which tensors each rank holds in its manifest, asked of each rank.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from vllm_ascend.model_loader.netloader.client import SOURCE_ERRORS, ask_once, query_seed
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.identity import model_difference
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import TensorSpec, model_tensors
from vllm_ascend.model_loader.netloader.plan import LoadPlan
from vllm_ascend.model_loader.netloader.reshard.fetch import (
    CrossLayoutError,
    Gathered,
    GatherSettings,
    SeedRank,
    gather,
)
from vllm_ascend.model_loader.netloader.reshard.shards import RankPlace, UnknownLayout, place_of
from vllm_ascend.model_loader.netloader.wire.addresses import format_address, parse_address
from vllm_ascend.model_loader.netloader.wire.frames import MANIFEST_BYTES_PER_TENSOR, reply_cap
from vllm_ascend.model_loader.netloader.wire.messages import field, manifest_request

logger = get_logger(__name__)

# How long a seed that refused this client's identity gets to say what it is, and its
# instance's ranks what they hold.
_INFO_S = 10.0
# The most ranks a seed instance may say it has: a hostile answer must not make this
# side describe, or connect to, millions of them.
MAX_RANKS = 1024


@dataclass(frozen=True)
class Across:
    """How a cross-layout attempt ended: what it gathered and from which named seed
    (None: nothing), and why each seed could not serve."""

    gathered: Gathered | None
    source: str | None
    reasons: tuple[str, ...]


def across_layouts(model: nn.Module, plan: LoadPlan, addresses: Sequence[str]) -> Across:
    """Load ``model`` (built in ``plan``'s layout, the loaded layout) from the first of
    ``addresses`` whose instance serves this model in another layout."""
    reasons: list[str] = []
    try:
        own = place_of(plan.identity)
    except UnknownLayout as e:
        return Across(None, None, (f"this instance cannot load across layouts: {e}",))
    config = plan.config
    settings = GatherSettings(plan.identity, config.secret, config.timeout_s,
                              config.min_rate_mb_per_s * 1e6, plan.expected_fingerprint())
    for address in addresses:
        try:
            seeds = _instance(address, plan, own, len(model_tensors(model)))
            gathered = gather(model, own.shard, seeds, settings, plan.who)
            return Across(gathered, address, tuple(reasons))
        except (CrossLayoutError, UnknownLayout, *SOURCE_ERRORS, ValueError) as e:
            reason = f"{address} across layouts: {e}"
            reasons.append(reason)
            logger.warning("%s: no model across layouts from %s (%s)", plan.who, address, e)
    return Across(None, None, tuple(reasons))


def _instance(address: str, plan: LoadPlan, own: RankPlace, tensors: int) -> list[SeedRank]:
    """Every rank of the seed instance ``address`` belongs to, with its place and (at
    more than one pipeline stage) the names it holds. Raises ``CrossLayoutError``."""
    secret = plan.config.secret
    info = query_seed(address, min(plan.config.timeout_s, _INFO_S), secret)
    identity = info.get("identity")
    if not isinstance(identity, dict):
        raise CrossLayoutError("its info carries no identity")
    difference = model_difference(plan.identity, identity)
    if difference is not None:
        raise CrossLayoutError(f"another model ({difference})")
    place = place_of(identity)
    if place == own:
        raise CrossLayoutError("the same layout as this instance (it refused otherwise)")
    size = place.shard.tp_size * place.pp_size
    rank = int(identity["rank"])
    if size > MAX_RANKS:
        raise CrossLayoutError(f"its instance says it has {size} ranks (at most {MAX_RANKS})")
    if size > 1 and info.get("rank_ports") is not True:
        raise CrossLayoutError(
            f"its instance has {size} ranks and does not listen at LISTEN_PORT + rank: "
            f"their addresses are unknown here")
    host, port = parse_address(address, key="source")
    if not (port - rank >= 1 and port - rank + size - 1 <= 65535):
        raise CrossLayoutError(f"its rank {rank} at port {port} puts its ranks outside the "
                               f"port range")
    # One deadline for every rank's manifest: a seed instance that answers slowly on each
    # of its ports holds this side no longer than one answer would.
    deadline = Deadline(_INFO_S, f"the manifests of {address}'s ranks")
    seeds = []
    for r in range(size):
        where = format_address(host, port - rank + r)
        names = _names(where, secret, tensors, deadline) if place.pp_size > 1 else None
        seeds.append(SeedRank(where, place_of({**identity, "rank": r}), names))
    return seeds


def _names(address: str, secret: bytes | None, tensors: int,
           deadline: Deadline) -> frozenset[str]:
    """The names of the tensors seed rank ``address`` holds (its manifest)."""
    reply = ask_once(address, manifest_request(), secret, deadline.remaining(),
                     reply_cap(4 * tensors + 64, MANIFEST_BYTES_PER_TENSOR))
    entries: list[Any] = field(reply, "tensors", list)
    return frozenset(TensorSpec.from_wire(item).name for item in entries)
