"""Which seed rank fills which elements of a client's tensors, across layouts.

Given the client's ``Placement`` of each tensor (``slices.describe`` at its own shard)
and each seed rank's (the same at the seed's shards), ``plan_gather`` assigns every
element the client loads from a checkpoint to exactly one seed rank that holds the
same logical element; it marks the client's padding to be zeroed, and the tensors
each rank builds for its own layout (expert maps) to be left as built. The plan is
boxes (a start and a length per dimension) in both local tensors: a seed sends the box
of its tensor, the client writes it where its box says. ``apply`` runs a plan in memory
(the reference the tests compare transfers with).

Which holder fills a box: the first one that holds it among those with the fewest
elements assigned so far, so a client spreads its fetch over the seed ranks that
replicate a tensor (norms, replicated KV heads) instead of asking one rank for all.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vllm_ascend.model_loader.netloader.reshard.slices import Placement, Segment, TensorProblem


class Uncovered(TensorProblem):
    """No seed rank holds some elements of a client's tensor, or the two sides
    disagree about what the whole tensor is."""


@dataclass(frozen=True)
class Box:
    """Part of a local tensor: ``starts[d]`` to ``starts[d] + lengths[d]`` along each
    dimension ``d``."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for length in self.lengths:
            n *= length
        return n

    def index(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.starts, self.lengths, strict=True))


@dataclass(frozen=True)
class Copy:
    """Elements ``source`` (a seed rank, by its index in ``plan_gather``'s list) holds
    in ``src`` of its tensor ``name``, for ``dst`` of the client's."""

    source: int
    name: str
    src: Box
    dst: Box


@dataclass(frozen=True)
class Gather:
    """A cross-layout load: the copies and the client's boxes that are zeros."""

    copies: tuple[Copy, ...]
    zeros: tuple[tuple[str, Box], ...]
    # Tensors the client keeps as its build made them (``Placement.built``).
    kept: tuple[str, ...] = ()

    def elements_from(self, source: int) -> int:
        """Elements the plan takes from seed rank ``source``."""
        return sum(c.src.numel for c in self.copies if c.source == source)


_Range = tuple[int, int]  # [lo, hi) of logical indices


def plan_gather(mine: Mapping[str, Placement],
                holders: Sequence[Mapping[str, Placement]]) -> Gather:
    """Fill every tensor of ``mine`` (name to the client's placement) from
    ``holders`` (one mapping per seed rank, name to that rank's placement). Raises
    ``Uncovered`` where no holder has some elements, or where a holder's whole tensor
    has another shape than the client's (not the same model)."""
    copies: list[Copy] = []
    zeros: list[tuple[str, Box]] = []
    kept: list[str] = []
    assigned = [0] * len(holders)
    for name, placement in mine.items():
        if placement.built:
            kept.append(name)
            continue
        for j, theirs in enumerate(holders):
            if name in theirs and theirs[name].logical != placement.logical:
                raise Uncovered(name, f"the whole tensor is {placement.logical} here and "
                                      f"{theirs[name].logical} at seed rank {j}")
        for cell in placement.cells():
            if any(s.source is None for s in cell):
                zeros.append((name, _local(cell)))
                continue
            copies += _fill(name, cell, holders, assigned)
    return Gather(tuple(copies), tuple(zeros), tuple(kept))


def _fill(name: str, cell: tuple[Segment, ...], holders: Sequence[Mapping[str, Placement]],
          assigned: list[int]) -> list[Copy]:
    """Copies that fill one client cell (all of it real elements)."""
    remaining = [_span(cell)]
    copies: list[Copy] = []
    order = sorted((j for j, h in enumerate(holders) if name in h), key=lambda j: assigned[j])
    for j in order:
        for theirs in holders[j][name].cells():
            if any(s.source is None for s in theirs):
                continue
            box = _span(theirs)
            left: list[tuple[_Range, ...]] = []
            for want in remaining:
                common = _intersect(want, box)
                if common is None:
                    left.append(want)
                    continue
                copy = Copy(j, name, _at(theirs, common), _at(cell, common))
                copies.append(copy)
                assigned[j] += copy.src.numel
                left += _subtract(want, common)
            remaining = left
            if not remaining:
                return copies
    if remaining:
        lo = ", ".join(f"{a}:{b}" for a, b in remaining[0])
        raise Uncovered(name, f"no seed rank holds its elements [{lo}]")
    return copies


def _span(cell: tuple[Segment, ...]) -> tuple[_Range, ...]:
    """The logical box a cell of real elements holds."""
    return tuple((_source(s), _source(s) + s.length) for s in cell)


def _source(s: Segment) -> int:
    if s.source is None:
        raise AssertionError("a zero segment has no logical place")
    return s.source


def _local(cell: tuple[Segment, ...]) -> Box:
    return Box(tuple(s.start for s in cell), tuple(s.length for s in cell))


def _at(cell: tuple[Segment, ...], logical: tuple[_Range, ...]) -> Box:
    """The local box of ``cell``'s tensor that holds the logical box ``logical``."""
    return Box(tuple(s.start + lo - _source(s)
                     for s, (lo, _) in zip(cell, logical, strict=True)),
               tuple(hi - lo for lo, hi in logical))


def _intersect(a: tuple[_Range, ...], b: tuple[_Range, ...]) -> tuple[_Range, ...] | None:
    out = []
    for (alo, ahi), (blo, bhi) in zip(a, b, strict=True):
        lo, hi = max(alo, blo), min(ahi, bhi)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def _subtract(box: tuple[_Range, ...], inner: tuple[_Range, ...]) -> list[tuple[_Range, ...]]:
    """``box`` less ``inner`` (inside it) as disjoint boxes: along each dimension in
    turn, the slabs below and above ``inner``, then narrow to it."""
    pieces = []
    rest = list(box)
    for d, ((lo, hi), (ilo, ihi)) in enumerate(zip(box, inner, strict=True)):
        if lo < ilo:
            pieces.append(tuple([*rest[:d], (lo, ilo), *rest[d + 1:]]))
        if ihi < hi:
            pieces.append(tuple([*rest[:d], (ihi, hi), *rest[d + 1:]]))
        rest[d] = (ilo, ihi)
    return pieces


def apply(plan: Gather, sources: Sequence[Mapping[str, torch.Tensor]],
          into: Mapping[str, torch.Tensor]) -> None:
    """Run ``plan`` in memory: each copy from ``sources[copy.source][name]`` into
    ``into[name]``, the zero boxes zeroed (the reference a transfer must equal); the
    ``kept`` tensors are left alone."""
    for copy in plan.copies:
        into[copy.name][copy.dst.index()] = sources[copy.source][copy.name][copy.src.index()]
    for name, box in plan.zeros:
        into[name][box.index()] = 0
