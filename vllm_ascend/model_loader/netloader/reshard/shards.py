"""A rank's ``slices.Shard`` from what its identity says of its layout.

Every seed's identity (``identity.model_identity``) carries its layout: tensor- and
pipeline-parallel sizes, its global rank (vLLM orders ranks tensor-parallel first:
``rank = pp_rank * tp_size + tp_rank``, vllm/distributed/parallel_state.py), the
data-parallel size and rank, and where its experts sit. A client computes what a seed
rank holds from that, and the seed checks that the client computed it for its own.
"""

from dataclasses import dataclass
from typing import Any

from vllm_ascend.model_loader.netloader.reshard.slices import Shard


class UnknownLayout(ValueError):
    """An identity whose layout a cross-layout load cannot state exactly."""


@dataclass(frozen=True)
class RankPlace:
    """A rank's ``Shard`` and its pipeline stage (``pp_size`` stages)."""

    shard: Shard
    pp_rank: int
    pp_size: int

    def to_wire(self) -> dict[str, Any]:
        s = self.shard
        return {"tp_size": s.tp_size, "tp_rank": s.tp_rank, "pp_size": self.pp_size,
                "pp_rank": self.pp_rank, "dp_size": s.dp_size, "dp_rank": s.dp_rank,
                "expert_parallel": s.expert_parallel, "expert_placement": s.expert_placement,
                "redundant_experts": s.redundant_experts}


def place_of(identity: dict[str, Any]) -> RankPlace:
    """The place of the rank ``identity`` describes. Raises ``UnknownLayout`` for an
    identity that lacks a field, or whose expert placement is configured round-robin
    (vLLM falls back to linear placement for models without grouped routing, and the
    identity holds what was configured, not what the layers use)."""
    try:
        tp = int(identity["tensor_parallel_size"])
        pp = int(identity["pipeline_parallel_size"])
        rank = int(identity["rank"])
        dp_size, dp_rank = (int(v) for v in identity["data_parallel"][:2])
        experts = identity.get("expert_parallel")
    except (KeyError, TypeError, ValueError) as e:
        raise UnknownLayout(f"the identity does not state its layout ({e})") from None
    if not (tp > 0 and pp > 0 and 0 <= rank < tp * pp):
        raise UnknownLayout(f"rank {rank} outside tensor {tp} x pipeline {pp}")
    try:
        if experts is not None:
            placement = str(experts.get("placement", "linear"))
            if placement != "linear":
                raise UnknownLayout(f"expert placement {placement[:20]!r}: vLLM may place "
                                    f"experts otherwise than configured")
            shard = Shard(tp, rank % tp, dp_size, dp_rank, True, placement,
                          int(experts.get("redundant_experts", 0)))
        else:
            shard = Shard(tp, rank % tp, dp_size, dp_rank)
    except (AttributeError, TypeError, ValueError) as e:
        raise UnknownLayout(f"the identity's layout is not one ({e})") from None
    return RankPlace(shard, rank // tp, pp)
