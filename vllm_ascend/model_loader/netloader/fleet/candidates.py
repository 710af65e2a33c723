"""The seed addresses one load tries, in order: the registry's live seeds of this
model, least loaded first, then SOURCE with each DNS name expanded; and, from the
registry, the seed instances of this model in other layouts (``fleet.layouts``).

This rank's own listener is never a candidate. A registry or a resolver that fails,
however it fails, leaves the rest: its reason goes in ``Candidates.notes``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_ascend.model_loader.netloader.fleet.dns import DNS_TIMEOUT_S, DnsSource, expand
from vllm_ascend.model_loader.netloader.fleet.layouts import other_layout_candidates
from vllm_ascend.model_loader.netloader.fleet.registry import (
    RegistryError,
    open_registry,
    registry_candidates,
)
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.plan import LoadPlan

logger = get_logger(__name__)


@dataclass(frozen=True)
class Candidates:
    """Where one load looks for its seeds."""

    # Seed addresses to try, in order.
    addresses: list[str]
    # Those of them that discovery (DNS, registry) found, not the operator: they get
    # less time to answer (``client.DISCOVERED_CONNECT_S``).
    discovered: frozenset[str]
    # Why a discovery gave nothing (a name that did not resolve, a registry that failed).
    notes: list[str]
    # The first ranks of seed instances of this model in other layouts (registry), to
    # ask across layouts where no seed of this layout serves.
    across: tuple[str, ...] = ()


def find_candidates(
    plan: LoadPlan, entries: Sequence[str | DnsSource], own: Sequence[str]
) -> Candidates:
    """The candidates of ``plan``'s load from SOURCE ``entries`` (this rank's, DNS names
    included) and the registry (REGISTRY), leaving out ``own`` addresses."""
    registry = plan.config.registry
    found: list[str] = []
    across: list[str] = []
    notes: list[str] = []
    if registry is not None:
        try:
            store = open_registry(registry)
            found = registry_candidates(store, plan.identity, plan.spread_key, own)
            across = other_layout_candidates(store, plan.identity, plan.spread_key, own)
        except Exception as e:  # noqa: BLE001 - RegistryError, or a registry answer nobody foresaw
            notes.append(str(e) if isinstance(e, RegistryError)
                         else f"registry {registry}: {type(e).__name__}: {e}")
        else:
            logger.info("%s: registry %s lists %d live seed(s) of this model and layout%s%s",
                        plan.who, registry, len(found), ": " if found else "", ", ".join(found))
            if across:
                logger.info("%s: registry %s lists %d seed instance(s) of this model in "
                            "other layouts: %s", plan.who, registry, len(across),
                            ", ".join(across))
            if not found:
                notes.append(f"registry {registry}: no live seed of this model, role and rank"
                             f"{' in this layout' if across else ''}")
    more, dns_notes = expand(
        entries, plan.rank, plan.spread_key, own,
        timeout_s=min(DNS_TIMEOUT_S, plan.config.timeout_s),
    )
    notes.extend(dns_notes)
    static = {a for a in entries if isinstance(a, str)}
    discovered = frozenset(found) | {a for a in more if a not in static}
    return Candidates([*found, *(a for a in more if a not in found)], discovered, notes,
                      tuple(across))
