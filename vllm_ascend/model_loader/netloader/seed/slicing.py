"""A seed's side of a cross-layout load: boxes of its loaded tensors, for a client in
another tensor-, pipeline- or expert-parallel layout (``reshard``).

The client names the model it loads (its identity: every field but the layout must
be this seed's, ``identity.model_difference``), the place it computed for this rank
(it must be this rank's, ``reshard.shards.place_of`` of this seed's identity), and a
plan of pieces (``wire.slices``). The seed checks every piece against its own loaded
tensors (a name it holds whole, a box inside the tensor, at most
``MAX_PIECE_BYTES``, no more bytes in all than it holds) before it reads a byte for it; then it
hashes each piece (a box that is not contiguous is copied, one piece at a time),
answers with the digests, and sends the pieces in buckets on the same connection as a
same-layout transfer does. What that costs the seed: nothing before the first byte for
a piece that is a run of whole 4 MiB parts of its tensor (the whole tensor, most
often: its load-time digests serve); for any other piece one read of the bytes it comes
from and one hash of it before the first byte goes out; a copy of each piece whose box
is not contiguous (at most a bucket's worth at a time) while sending; a transfer slot.
"""

import math
import time
from collections.abc import Sequence
from typing import Any

import blake3
import torch

from vllm_ascend.model_loader.netloader import metrics
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.identity import IDENTITY_DIFFERS, model_difference
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    TensorSpec,
    byte_view,
    digest,
)
from vllm_ascend.model_loader.netloader.metrics import FAILED, OK, SEED
from vllm_ascend.model_loader.netloader.parts import PART_BYTES, join_parts
from vllm_ascend.model_loader.netloader.planes.progress import (
    Pacer,
    TransferError,
    transfer_deadline_s,
)
from vllm_ascend.model_loader.netloader.planes.stream import StreamLink
from vllm_ascend.model_loader.netloader.planes.transfer import send_weights
from vllm_ascend.model_loader.netloader.reshard.shards import UnknownLayout, place_of
from vllm_ascend.model_loader.netloader.seed.listener import Connection
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, clean
from vllm_ascend.model_loader.netloader.wire.frames import MAX_REQUEST_BYTES, recv_msg
from vllm_ascend.model_loader.netloader.wire.handshake import SeedSide
from vllm_ascend.model_loader.netloader.wire.messages import DONE, LOADED, TCP, accept, parse_done
from vllm_ascend.model_loader.netloader.wire.slices import (
    MAX_PIECE_BYTES,
    SLICE_PLAN,
    Piece,
    SliceAsk,
    parse_plan_frame,
    plan_sha256,
)

logger = get_logger(__name__)


class PlanRefused(Exception):
    """A plan this seed will not serve (``reason`` goes back to the client)."""


def serve(server: Any, conn: Connection, side: SeedSide, deadline: Deadline) -> None:
    """Serve one cross-layout request on ``conn`` (``server``: the rank's
    ``SeedServer``). Refusals go back to the client by name (after its plan frames are
    read and dropped, so that it reads the reason); a malformed plan raises
    ``ProtocolError`` (the connection ends, logged by the caller)."""
    settings = server.settings
    request = side.request
    ask = request.slices
    assert ask is not None  # a parsed slices request has one
    weights = server.layouts.loaded  # once: ``keep`` may replace the layouts meanwhile
    kind, reason = _refusal(server, weights, request.identity, ask)
    with server.slot() as completed:
        if not kind and completed is None:
            kind, reason = "busy", "seed is busy"
        if kind:
            _drain(conn, ask.frames, deadline)
        else:
            # Read only with a transfer slot: at most ``max_transfers`` plans at once.
            pieces = _read_plan(conn, ask, deadline)
            try:
                specs, index = _resolve(pieces, weights, ask.nbytes)
            except PlanRefused as e:
                kind, reason = "plan", str(e)
        if kind:
            metrics.METRICS.refusal(kind)
            logger.warning("%s refused cross-layout client %s: %s", settings.who, conn.peer,
                           reason)
            side.refuse(reason, retry=kind in ("busy", "preparing"), deadline=deadline)
            return
        if _send(server, conn, side, weights, specs, index):
            assert completed is not None
            completed()


def _drain(conn: Connection, frames: int, deadline: Deadline) -> None:
    """Read and drop a refused client's plan frames (each at most MAX_REQUEST_BYTES)."""
    for _ in range(frames):
        recv_msg(conn.sock, deadline, MAX_REQUEST_BYTES, expect=SLICE_PLAN)


def _refusal(server: Any, weights: LoadedWeights | None, identity: Any,
             ask: SliceAsk) -> tuple[str, str]:
    """(kind, reason) why this seed serves no slices to this client, or ("", "")."""
    difference = model_difference(server.identity, identity)
    if difference is not None:
        return "identity", f"{IDENTITY_DIFFERS}: {difference}"
    try:
        mine = place_of(server.identity).to_wire()
    except UnknownLayout as e:
        return "layout", f"this seed cannot serve other layouts: {e}"
    if ask.place != mine:
        return "layout", (f"the client computed another place for this rank "
                          f"({clean(ask.place, 200)} vs {mine})")
    if server.settings.device.type != "cpu":
        return "layout", "this seed holds its weights in device memory: it serves other " \
                         "layouts only from host memory"
    not_now = server.not_serving()
    if not_now is not None:
        return not_now
    if weights is None:
        return "layout", "this seed serves the processed layout only (LAYOUT processed)"
    if weights.state.uncarried:
        return "load_state", "this seed's load set state Netloader cannot carry"
    specs = len(weights.specs)
    if ask.pieces > 4 * specs + weights.total_bytes // MAX_PIECE_BYTES + 64:
        return "plan", f"{ask.pieces} pieces asked of a rank of {specs} tensors"
    return "", ""


def _read_plan(conn: Connection, ask: SliceAsk, deadline: Deadline) -> list[Piece]:
    """The plan's frames, each at most ``MAX_REQUEST_BYTES``, checked against the
    request's counts and sha256. Raises ``ProtocolError``."""
    pieces: list[Piece] = []
    for _ in range(ask.frames):
        msg = recv_msg(conn.sock, deadline, MAX_REQUEST_BYTES, expect=SLICE_PLAN)
        pieces += parse_plan_frame(msg, ask.pieces - len(pieces))
    if len(pieces) != ask.pieces or plan_sha256(pieces) != ask.plan_sha256:
        raise ProtocolError("the plan is not the one the request announced")
    return pieces


def _resolve(pieces: Sequence[Piece], weights: LoadedWeights,
             announced: int) -> tuple[list[TensorSpec], list[tuple[int, tuple[slice, ...]]]]:
    """Each piece as a spec (its shape, dtype, bytes) and (tensor index, box). Raises
    ``PlanRefused`` for a tensor this seed does not hold whole, a box outside its
    tensor or over ``MAX_PIECE_BYTES``, a piece asked twice, or a total other than
    announced or over what it holds."""
    where = {spec.name: i for i, spec in enumerate(weights.specs)}
    specs: list[TensorSpec] = []
    index: list[tuple[int, tuple[slice, ...]]] = []
    seen: set[Piece] = set()
    total = 0
    for piece in pieces:
        i = where.get(piece.name)
        if i is None or weights.tensors[i].is_meta:
            raise PlanRefused(f"this seed holds no loaded tensor {clean(piece.name, 120)}")
        t = weights.tensors[i]
        box = tuple(zip(piece.starts, piece.lengths, strict=True))
        if len(box) != t.dim() or any(s + n > size for (s, n), size in zip(box, t.shape,
                                                                          strict=True)):
            raise PlanRefused(f"a box outside {piece.name} {tuple(t.shape)}")
        if piece in seen:
            raise PlanRefused(f"a piece of {piece.name} asked twice")
        seen.add(piece)
        nbytes = math.prod(piece.lengths) * t.element_size()
        if nbytes > MAX_PIECE_BYTES:
            raise PlanRefused(f"a piece of {nbytes} bytes is over {MAX_PIECE_BYTES}")
        total += nbytes
        specs.append(TensorSpec(piece.name, piece.lengths, str(t.dtype).removeprefix(
            "torch."), nbytes))
        index.append((i, tuple(slice(s, s + n) for s, n in box)))
    if total != announced or total > weights.total_bytes:
        raise PlanRefused(f"the plan holds {total} bytes, {announced} announced, "
                          f"{weights.total_bytes} held")
    return specs, index


def _byte_range(t: torch.Tensor, box: tuple[slice, ...]) -> tuple[int, int]:
    """[first, last + 1) byte offsets of ``box`` in contiguous ``t`` (a seed's loaded
    tensors are made contiguous when captured)."""
    assert t.is_contiguous(), "loaded tensors are captured contiguous"
    first = sum(s.start * st for s, st in zip(box, t.stride(), strict=True))
    last = sum((s.stop - 1) * st for s, st in zip(box, t.stride(), strict=True))
    return first * t.element_size(), (last + 1) * t.element_size()


def _unchanged(weights: LoadedWeights, i: int, lo: int, hi: int) -> bool:
    """Whether bytes [lo, hi) of tensor ``i`` still hash to what was taken at the load:
    its digest (a tensor of up to PART_BYTES) or the parts that cover them."""
    data = memoryview(byte_view(weights.tensors[i]).numpy())  # type: ignore[arg-type]
    d = weights.digests[i]
    parts = weights.parts.get(d)
    if not parts:
        return digest(byte_view(weights.tensors[i])) == d
    for k in range(lo // PART_BYTES, -(-hi // PART_BYTES)):
        part = data[k * PART_BYTES:(k + 1) * PART_BYTES]
        if k >= len(parts) or blake3.blake3(part).hexdigest() != parts[k]:
            return False
    return True


class _Pieces(Sequence[torch.Tensor]):
    """The pieces as contiguous tensors, made when asked for (a box that is not
    contiguous is copied then): ``send_weights`` asks for one bucket's at a time."""

    def __init__(self, weights: LoadedWeights, index: list[tuple[int, tuple[slice, ...]]]):
        self._weights = weights
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        tensor, box = self._index[i]
        return self._weights.tensors[tensor][box].contiguous()


def _send(server: Any, conn: Connection, side: SeedSide, weights: LoadedWeights,
          specs: list[TensorSpec], index: list[tuple[int, tuple[slice, ...]]]) -> bool:
    """Answer and send the pieces; True if the client verified every one."""
    settings = server.settings
    pieces = _Pieces(weights, index)
    total = sum(s.nbytes for s in specs)
    rate = min(settings.min_rate_bytes_per_s,
               settings.send_limit_bytes_per_s or settings.min_rate_bytes_per_s)
    # Hashing first takes its own time: at most what sending the bytes may take.
    hashing = Deadline(transfer_deadline_s(total, settings.timeout_s, rate),
                       f"hashing pieces for {conn.peer}")
    start = time.perf_counter()
    try:
        digests = _digests(weights, index, pieces, hashing)
    except TransferError as e:
        metrics.METRICS.refusal("changed")
        logger.warning("%s refused cross-layout client %s: %s", settings.who, conn.peer, e)
        side.refuse(str(e), retry=False, deadline=hashing)
        return False
    hashed_s = time.perf_counter() - start
    bucket_bytes = min(settings.bucket_bytes, MAX_PIECE_BYTES)
    side.answer(accept(digests, bucket_bytes, TCP, server.identity.get("checkpoint"),
                       0, weights.state, LOADED), hashing)
    link = StreamLink(conn.sock, settings.timeout_s, total,
                      Pacer(settings.send_limit_bytes_per_s),
                      transfer_deadline_s(total, settings.timeout_s, rate))
    metrics.METRICS.started(SEED)
    verified = False
    try:
        sent = send_weights(link, pieces, specs, bucket_bytes)
        done = recv_msg(conn.sock, Deadline(settings.timeout_s, f"'done' from {conn.peer}"),
                        MAX_REQUEST_BYTES, expect=DONE)
        verified, reason = parse_done(done)
    finally:
        metrics.METRICS.stopped(SEED)
        metrics.METRICS.ended(SEED, OK if verified else FAILED, total,
                              time.perf_counter() - start)
    (logger.info if verified else logger.warning)(
        "%s sent %d piece(s) of its tensors to cross-layout client %s: %d bytes in %.3f s "
        "(checking and hashing them first: %.3f s), client %s", settings.who, len(specs),
        conn.peer, sent, time.perf_counter() - start, hashed_s,
        "verified all digests" if verified else f"rejected: {reason}")
    return verified


def _digests(weights: LoadedWeights, index: list[tuple[int, tuple[slice, ...]]],
             pieces: "_Pieces", deadline: Deadline) -> list[str]:
    """Each piece's digest. A piece that is a run of its tensor's bytes starting and
    ending on its 4 MiB parts (the whole tensor, most often) takes the digests taken at
    the load: nothing to hash, and the client checks the bytes against them as a
    same-layout client does (a tensor changed since fails there, not here). Every other
    piece is hashed now, once the bytes it comes from are checked against the load-time
    digests (a tensor changed since, in place or by a reload, raises ``TransferError``);
    the deadline is checked between them."""
    found: list[str | None] = [_known(weights, i, box) for i, box in index]
    ranges: dict[int, tuple[int, int]] = {}
    for (i, box), known in zip(index, found, strict=True):
        if known is None:
            lo, hi = _byte_range(weights.tensors[i], box)
            was = ranges.get(i, (lo, hi))
            ranges[i] = (min(lo, was[0]), max(hi, was[1]))
    for i, (lo, hi) in ranges.items():
        deadline.remaining()
        if not _unchanged(weights, i, lo, hi):
            raise TransferError(f"{weights.specs[i].name} changed since it was loaded: "
                                f"this seed serves it to no client in another layout")
    digests = []
    for k, known in enumerate(found):
        if known is None:
            deadline.remaining()
            known = digest(pieces[k].reshape(-1).view(torch.uint8))
        digests.append(known)
    return digests


def _known(weights: LoadedWeights, i: int, box: tuple[slice, ...]) -> str | None:
    """The load-time digest of the piece ``box`` of tensor ``i``, where its bytes are
    one run from a part boundary to a part boundary (or the tensor's end), else None."""
    t = weights.tensors[i]
    lo, hi = _byte_range(t, box)
    if hi - lo != math.prod(s.stop - s.start for s in box) * t.element_size():
        return None  # not one run of bytes
    d = weights.digests[i]
    if lo == 0 and hi == t.nbytes:
        return d
    parts = weights.parts.get(d)
    if not parts or lo % PART_BYTES or (hi % PART_BYTES and hi != t.nbytes):
        return None
    covered = parts[lo // PART_BYTES:-(-hi // PART_BYTES)]
    return covered[0] if len(covered) == 1 else join_parts(covered)
