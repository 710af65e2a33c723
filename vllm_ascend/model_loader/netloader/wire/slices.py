"""The messages of a cross-layout load (``reshard``): a client asks one seed rank for
boxes of its loaded tensors. No torch.

The request (kind ``slices``) is as small as any other: the client's identity, the
seed's place as the client computed it (``reshard.shards.RankPlace``), and how many
pieces it asks for, how many bytes they hold, in how many plan frames, and the sha256
of the plan. The plan follows in frames of at most ``frames.MAX_REQUEST_BYTES`` each
(so a seed still never reads a larger frame), each a list of pieces ``[name, starts,
lengths]``. The seed reads them only once the request is authenticated, checks their
sha256 against the request's (which its proved answer covers) and every piece against
its own tensors before it hashes a byte.
"""

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, clean

SLICES = "slices"
SLICE_PLAN = "slice_plan"
# The most pieces one request may ask for (each a tensor's box): a 64-layer model at
# a tensor-parallel ratio of 8 asks a seed rank for a few thousand.
MAX_PIECES = 1 << 16
MAX_PLAN_FRAMES = 4096
# The most bytes one piece may hold: a box that is not contiguous is copied whole on the
# seed before it is sent, so this bounds that copy.
MAX_PIECE_BYTES = 64 << 20
MAX_DIMS = 8
_MAX_NAME = 512
_PLACE_FIELDS = {"tp_size": int, "tp_rank": int, "pp_size": int, "pp_rank": int,
                 "dp_size": int, "dp_rank": int, "expert_parallel": bool,
                 "expert_placement": str, "redundant_experts": int}


@dataclass(frozen=True)
class Piece:
    """A box of the seed's tensor ``name``: ``starts[d]`` to ``starts[d] + lengths[d]``
    along each dimension."""

    name: str
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    def to_wire(self) -> list[Any]:
        return [self.name, list(self.starts), list(self.lengths)]


@dataclass(frozen=True)
class SliceAsk:
    """What a ``slices`` request asks of one seed rank (see the module docstring)."""

    place: dict[str, Any]
    pieces: int
    nbytes: int
    frames: int
    plan_sha256: str

    def to_wire(self) -> dict[str, Any]:
        return {"place": self.place, "pieces": self.pieces, "bytes": self.nbytes,
                "frames": self.frames, "plan_sha256": self.plan_sha256}

    @classmethod
    def from_wire(cls, value: Any) -> "SliceAsk":
        """Raises ``ProtocolError`` for anything but the fields above, in bounds."""
        if not isinstance(value, dict):
            raise ProtocolError("slices field 'slices' is not an object")
        place = value.get("place")
        if not isinstance(place, dict) or set(place) != set(_PLACE_FIELDS) or not all(
                type(place[k]) is kind for k, kind in _PLACE_FIELDS.items()):
            raise ProtocolError("slices field 'place' is not a rank's place")
        if len(place["expert_placement"]) > 32:
            raise ProtocolError("slices place names an over-long expert placement")
        counts = [value.get(k) for k in ("pieces", "bytes", "frames")]
        if not all(type(c) is int for c in counts):
            raise ProtocolError("slices counts are not integers")
        pieces, nbytes, frames = (int(c) for c in counts)  # type: ignore[arg-type]
        if not (0 < pieces <= MAX_PIECES and 0 < frames <= MAX_PLAN_FRAMES
                and 0 < nbytes < 1 << 50):
            raise ProtocolError(f"slices asks for {clean(pieces, 20)} pieces of "
                                f"{clean(nbytes, 20)} bytes in {clean(frames, 20)} frames")
        sha = value.get("plan_sha256")
        if not isinstance(sha, str) or len(sha) != 64 or not all(
                c in "0123456789abcdef" for c in sha):
            raise ProtocolError("slices field 'plan_sha256' is not a sha256")
        return cls(place, pieces, nbytes, frames, sha)


def slices_request(identity: dict[str, Any], ask: SliceAsk) -> dict[str, Any]:
    return {"type": SLICES, "identity": identity, "slices": ask.to_wire(),
            "data_planes": ["tcp"]}


def plan_frames(pieces: list[Piece], max_bytes: int) -> list[dict[str, Any]]:
    """The plan as frames of at most ``max_bytes`` JSON each, in order."""
    frames: list[dict[str, Any]] = []
    batch: list[list[Any]] = []
    size = 64
    for piece in pieces:
        wire = piece.to_wire()
        n = len(json.dumps(wire)) + 2
        if batch and size + n > max_bytes:
            frames.append({"type": SLICE_PLAN, "pieces": batch})
            batch, size = [], 64
        batch.append(wire)
        size += n
    if batch:
        frames.append({"type": SLICE_PLAN, "pieces": batch})
    return frames


def plan_sha256(pieces: list[Piece]) -> str:
    """sha256 of the plan's canonical form (what the request pins)."""
    return hashlib.sha256(json.dumps([p.to_wire() for p in pieces],
                                     separators=(",", ":")).encode()).hexdigest()


def parse_plan_frame(msg: dict[str, Any], room: int) -> list[Piece]:
    """The pieces of one plan frame, at most ``room`` of them. Raises
    ``ProtocolError`` for anything but ``[name, starts, lengths]`` entries with
    non-negative starts and positive lengths in at most ``MAX_DIMS`` dimensions."""
    entries = msg.get("pieces")
    if not isinstance(entries, list) or not 0 < len(entries) <= room:
        raise ProtocolError("a plan frame holds no pieces or more than were announced")
    pieces = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and 0 < len(entry[0]) <= _MAX_NAME and isinstance(entry[1], list)
                and isinstance(entry[2], list) and len(entry[1]) == len(entry[2])
                and len(entry[1]) <= MAX_DIMS):
            raise ProtocolError("a plan piece is not [name, starts, lengths]")
        starts, lengths = entry[1], entry[2]
        if not all(type(v) is int and 0 <= v < 1 << 40 for v in starts) or not all(
                type(v) is int and 0 < v < 1 << 40 for v in lengths):
            raise ProtocolError(f"plan piece {clean(entry[0], 80)} has a bad box")
        pieces.append(Piece(entry[0], tuple(starts), tuple(lengths)))
    return pieces
