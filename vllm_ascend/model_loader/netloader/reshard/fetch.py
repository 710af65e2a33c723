"""A client's cross-layout load: its tensors gathered from the seed ranks of an
instance in another layout, each piece verified before it is written.

``gather`` computes the client's placements and each seed rank's (``slices``), plans
which rank fills which elements (``gather.plan_gather``), splits each copy into pieces
of at most ``PIECE_BYTES``, and asks each seed rank for its pieces on one authenticated
connection (``wire.slices``): all ranks at once, one thread each, where the worker has
as many cores (``cores.worker_cores``), else one after the other. A seed answers with
a digest per piece. On one core (a vLLM CPU worker's receiving thread) each piece is
read on that thread straight where it lands when its box is one run of the client's
tensor, else into one staging buffer, and hashed right after each read; a piece that
fails its digest fails the gather. With more cores each bucket arrives in the link's
staging buffer (two buckets per rank at a time), and every piece in it is checked
against its digest before it is copied to its box. Padding is zeroed; tensors each
rank builds for its own layout (expert maps) are left as built.

Whatever fails raises ``CrossLayoutError`` naming the seed rank and why; the client's
tensors may then hold any mix of verified pieces and what they held before, and the
caller loads from disk (which writes every parameter) and restores its buffers.
"""

import math
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader import load_state
from vllm_ascend.model_loader.netloader.cores import single_core, worker_cores
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.load_state import LoadState
from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import (
    TensorSpec,
    byte_view,
    digest,
    model_tensors,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES, PartHasher
from vllm_ascend.model_loader.netloader.planes import memory
from vllm_ascend.model_loader.netloader.planes.progress import TransferError, transfer_deadline_s
from vllm_ascend.model_loader.netloader.planes.stream import StreamLink
from vllm_ascend.model_loader.netloader.planes.transfer import plan_from
from vllm_ascend.model_loader.netloader.reshard.gather import Box, Uncovered, plan_gather
from vllm_ascend.model_loader.netloader.reshard.shards import RankPlace
from vllm_ascend.model_loader.netloader.reshard.slices import Indescribable, Shard, describe
from vllm_ascend.model_loader.netloader.wire.addresses import AddressError, parse_address
from vllm_ascend.model_loader.netloader.wire.auth import AuthError
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError, text
from vllm_ascend.model_loader.netloader.wire.frames import (
    MAX_REQUEST_BYTES,
    REFUSE,
    reply_cap,
    send_msg,
)
from vllm_ascend.model_loader.netloader.wire.handshake import ask_seed
from vllm_ascend.model_loader.netloader.wire.messages import ACCEPT, TCP, done, parse_accept
from vllm_ascend.model_loader.netloader.wire.slices import (
    MAX_PIECE_BYTES,
    Piece,
    SliceAsk,
    plan_frames,
    plan_sha256,
    slices_request,
)

logger = get_logger(__name__)

# A bucket of a seed's pieces may be this large: a seed sends buckets of at most one
# piece's bound (``seed.slicing``), and the link keeps two of them per seed rank.
_MAX_BUCKET_BYTES = MAX_PIECE_BYTES


class CrossLayoutError(Exception):
    """Why a cross-layout load did not complete (a seed rank's refusal or failure, a
    tensor no description states, elements no seed rank holds)."""


@dataclass(frozen=True)
class SeedRank:
    """One rank of a seed instance: where it listens, its place in its layout, and
    the names of the tensors it holds (its manifest; None: every name)."""

    address: str
    place: RankPlace
    names: frozenset[str] | None = None


@dataclass(frozen=True)
class GatherSettings:
    """How the client asks: its identity, the shared secret, TIMEOUT, the slowest rate
    a transfer may run at (MIN_RATE_MB_PER_S), the checkpoint it pins."""

    identity: dict[str, Any]
    secret: bytes | None
    timeout_s: float
    min_rate_bytes_per_s: float
    expected_checkpoint: str | None = None
    piece_bytes: int = MAX_PIECE_BYTES


@dataclass(frozen=True)
class Gathered:
    """What a cross-layout load delivered: bytes per seed rank address, seconds, and
    the load state the seeds' ``load_weights`` set (equal on every rank)."""

    nbytes: dict[str, int]
    seconds: float
    state: LoadState
    checkpoint: str | None


@dataclass(frozen=True)
class _Ask:
    """One piece asked of a seed rank: the box there and where it lands here."""

    name: str
    src: Box
    dst: Box


def gather(model: nn.Module, own: Shard, seeds: Sequence[SeedRank],
           settings: GatherSettings, who: str = "Netloader") -> Gathered:
    """Fill ``model``'s tensors (built at ``own``) from ``seeds``. Raises
    ``CrossLayoutError``."""
    if not (settings.identity.get("checkpoint") or settings.expected_checkpoint):
        raise CrossLayoutError("no checkpoint fingerprint to compare the seeds' with (no "
                               "weight files here and no EXPECTED_FINGERPRINT)")
    start = time.perf_counter()
    tensors = dict(model_tensors(model))
    try:
        mine = {n: p for n, p in describe(model, own).items() if n in tensors}
        holders = [{n: p for n, p in describe(model, s.place.shard).items()
                    if s.names is None or n in s.names} for s in seeds]
        plan = plan_gather(mine, holders)
    except (Indescribable, Uncovered) as e:
        raise CrossLayoutError(f"cannot load across layouts: {e}") from e
    # Huge pages for the client's tensors before the first byte lands (``memory``).
    memory.prepare([tensors[name] for name in mine])
    asks: list[list[_Ask]] = [[] for _ in seeds]
    for copy in plan.copies:
        itemsize = tensors[copy.name].element_size()
        for offsets, lengths in pieces_of(copy.src.lengths, itemsize, settings.piece_bytes):
            asks[copy.source].append(_Ask(copy.name, _shift(copy.src, offsets, lengths),
                                          _shift(copy.dst, offsets, lengths)))
    active = [(seed, ask) for seed, ask in zip(seeds, asks, strict=True) if ask]
    links = _Links()

    # One deadline for the whole gather, as one transfer of all its bytes would have: a
    # seed instance that drips on every rank holds this side no longer.
    total = sum(math.prod(a.src.lengths) * tensors[a.name].element_size()
                for ask in asks for a in ask)
    overall = Deadline(transfer_deadline_s(total, settings.timeout_s,
                                           settings.min_rate_bytes_per_s), "the gather")

    def one(job: tuple[SeedRank, list[_Ask]]) -> tuple[str, int, LoadState, str | None]:
        seed, ask = job
        try:
            return _from_seed(seed, ask, tensors, settings, links, model, overall)
        except BaseException as e:
            # The other ranks' transfers end now, not at their deadlines.
            links.fail(e if isinstance(e, CrossLayoutError) else CrossLayoutError(
                f"seed rank {seed.address}: {type(e).__name__}: {e}"))
            raise

    # Every rank at once where the worker has the cores (widened as for a same-layout
    # receive); one after the other on one core, where threads would only take turns.
    with worker_cores(who) as cpus, ThreadPoolExecutor(
            max_workers=max(1, min(len(active), len(cpus))),
            thread_name_prefix="netloader-gather") as pool:
        try:
            results = list(pool.map(one, active))
        except Exception as e:  # noqa: BLE001 - re-raised as the cause, whatever it is
            raise (links.first or CrossLayoutError(f"{type(e).__name__}: {e}")) from None
    states = {repr(r[2].to_wire()) for r in results}
    checkpoints = {r[3] for r in results}
    if len(states) > 1 or len(checkpoints) > 1:
        raise CrossLayoutError("the seed ranks disagree about the load state or checkpoint")
    with torch.no_grad():
        for name, box in plan.zeros:
            tensors[name][box.index()] = 0
    seconds = time.perf_counter() - start
    nbytes = {r[0]: r[1] for r in results}
    logger.info("%s gathered %d bytes across layouts from %d seed rank(s) in %.3f s "
                "(%s); %d box(es) of padding zeroed, %d tensor(s) kept as built",
                who, sum(nbytes.values()), len(results), seconds,
                ", ".join(f"{a}: {n}" for a, n in nbytes.items()), len(plan.zeros),
                len(plan.kept))
    return Gathered(nbytes, seconds, results[0][2] if results else load_state.NO_STATE,
                    results[0][3] if results else None)


def pieces_of(lengths: tuple[int, ...], itemsize: int,
              limit: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A box of ``lengths`` cut into pieces of at most ``limit`` bytes (at least one
    element): (offsets, lengths) in the box, in row-major order. The trailing
    dimensions that fit stay whole; the one before is cut in runs; those before it go
    one index at a time; runs are whole 4 MiB parts where they can be."""
    n = len(lengths)
    inner, d = itemsize, n
    while d > 0 and inner * lengths[d - 1] <= limit:
        inner *= lengths[d - 1]
        d -= 1
    if d == 0:
        yield (0,) * n, tuple(lengths)
        return
    k = d - 1
    step = max(1, limit // inner)
    # Runs of whole 4 MiB parts where they fit: a seed then has the load-time digests of
    # a piece cut from the start of its tensor and hashes nothing (``seed.slicing``).
    aligned = math.lcm(inner, PART_BYTES) // inner
    if aligned <= step:
        step -= step % aligned
    outer: list[tuple[int, ...]] = [()]
    for size in lengths[:k]:
        outer = [(*o, i) for o in outer for i in range(size)]
    for head in outer:
        for s in range(0, lengths[k], step):
            yield ((*head, s, *([0] * (n - k - 1))),
                   (*([1] * k), min(step, lengths[k] - s), *lengths[k + 1:]))


class _Links:
    """The connections of one gather: the first that fails shuts the others down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        # What ended the first failed rank (None: none failed yet).
        self.first: CrossLayoutError | None = None

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)
            failed = self.first is not None
        if failed:
            sock.shutdown(socket.SHUT_RDWR)

    def fail(self, why: CrossLayoutError) -> None:
        """``why`` ended one rank's transfer: end the others (keep the first cause)."""
        with self._lock:
            if self.first is None:
                self.first = why
            both = list(self._open)
        for sock in both:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already


def _shift(box: Box, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> Box:
    return Box(tuple(s + o for s, o in zip(box.starts, offsets, strict=True)), lengths)


def _from_seed(seed: SeedRank, asks: list[_Ask], tensors: dict[str, torch.Tensor],
               settings: GatherSettings, links: _Links, model: nn.Module,
               overall: Deadline | None = None) -> tuple[str, int, LoadState, str | None]:
    """Ask one seed rank for its pieces and write each into ``tensors`` once its digest
    matched. Raises ``CrossLayoutError``."""
    pieces = [Piece(a.name, a.src.starts, a.src.lengths) for a in asks]
    specs = [TensorSpec(a.name, a.src.lengths, str(tensors[a.name].dtype).removeprefix(
        "torch."), math.prod(a.src.lengths) * tensors[a.name].element_size()) for a in asks]
    frames = plan_frames(pieces, MAX_REQUEST_BYTES - 512)
    total = sum(s.nbytes for s in specs)
    ask = SliceAsk(seed.place.to_wire(), len(pieces), total, len(frames), plan_sha256(pieces))
    # The seed checks and hashes the pieces before it answers: as long as sending them
    # may take (and no longer than the whole gather has left).
    answer_s = transfer_deadline_s(total, settings.timeout_s, settings.min_rate_bytes_per_s)
    try:
        if overall is not None:
            answer_s = min(answer_s, overall.remaining())
        host, port = parse_address(seed.address, key="source")
        with socket.create_connection((host, port), timeout=settings.timeout_s) as conn:
            links.add(conn)
            reply = ask_seed(conn, slices_request(settings.identity, ask), settings.secret,
                             Deadline(answer_s, f"answer of {seed.address}"),
                             reply_cap(len(specs)) + load_state.WIRE_BYTES, follow=frames)
            if reply["type"] == REFUSE:
                raise CrossLayoutError(f"seed rank {seed.address} refused: "
                                       f"{text(reply, 'reason')}")
            if reply["type"] != ACCEPT:
                raise ProtocolError(f"expected '{ACCEPT}', got another answer")
            accepted = parse_accept(reply, len(specs), (TCP,), _MAX_BUCKET_BYTES)
            mine = settings.identity.get("checkpoint") or settings.expected_checkpoint
            if accepted.checkpoint != mine:
                raise CrossLayoutError(f"seed rank {seed.address} serves checkpoint "
                                       f"{accepted.checkpoint}, not {mine}")
            load_state.check(model, accepted.state)
            _receive(conn, asks, specs, accepted.digests, accepted.bucket_bytes, tensors,
                     settings, overall.remaining() if overall is not None else None)
            send_msg(conn, done(True), Deadline(settings.timeout_s, "'done'"))
    except CrossLayoutError:
        raise
    except (AddressError, AuthError, OSError, ProtocolError, TransferError, ValueError,
            load_state.LoadStateError) as e:
        raise CrossLayoutError(f"seed rank {seed.address}: {type(e).__name__}: {e}") from e
    return seed.address, total, accepted.state, accepted.checkpoint


def _receive(conn: socket.socket, asks: list[_Ask], specs: list[TensorSpec],
             digests: list[str], bucket_bytes: int, tensors: dict[str, torch.Tensor],
             settings: GatherSettings, left_s: float | None = None) -> None:
    total = sum(s.nbytes for s in specs)
    deadline_s = transfer_deadline_s(total, settings.timeout_s, settings.min_rate_bytes_per_s)
    link = StreamLink(conn, settings.timeout_s, total,
                      deadline_s=min(deadline_s, left_s) if left_s is not None else deadline_s)
    buckets = plan_from(specs, bucket_bytes, 0)
    # Reading in place needs host memory (a device model stages every piece).
    if single_core() and all(tensors[a.name].device.type == "cpu" for a in asks):
        _receive_inline(link, buckets, asks, specs, digests, tensors)
        return
    arrivals = link.receive([sum(specs[i].nbytes for i in b) for b in buckets])
    try:
        for bucket in buckets:
            staging = next(arrivals)
            offset = 0
            for i in bucket:
                chunk = staging[offset:offset + specs[i].nbytes]
                offset += specs[i].nbytes
                if digest(chunk) != digests[i]:
                    raise TransferError(f"digest mismatch for a piece of {asks[i].name} "
                                        f"({specs[i].nbytes} bytes)")
                _place(tensors[asks[i].name], asks[i].dst, chunk)
    finally:
        arrivals.close()


def _receive_inline(link: StreamLink, buckets: list[list[int]], asks: list[_Ask],
                    specs: list[TensorSpec], digests: list[str],
                    tensors: dict[str, torch.Tensor]) -> None:
    """On one core (a vLLM CPU worker): each piece read on this thread straight where it
    lands when its box is one run of the client's tensor, else into one staging buffer
    and copied once its digest matched, hashed right after each read while in cache
    (as a same-layout receive on one core). A piece that fails its digest after it
    landed fails the gather: the caller's disk load rewrites every parameter."""
    views = [tensors[a.name][a.dst.index()] for a in asks]
    staged = [not v.is_contiguous() for v in views]
    staging = torch.empty(max((s.nbytes for s, st in zip(specs, staged, strict=True) if st),
                              default=0), dtype=torch.uint8)
    targets = [staging[:specs[i].nbytes] if staged[i] else byte_view(views[i])
               for i in range(len(asks))]
    order = [i for b in buckets for i in b]
    arrivals = link.receive_into([[targets[i] for i in b] for b in buckets], inline=True)
    hasher: PartHasher | None = None
    try:
        for position, piece in arrivals:
            i = order[position]
            if piece is not None:
                hasher = hasher or PartHasher(specs[i].nbytes, 1)
                hasher.update(piece)
                continue
            if hasher is None or hasher.hexdigest() != digests[i]:
                raise TransferError(f"digest mismatch for a piece of {asks[i].name} "
                                    f"({specs[i].nbytes} bytes)")
            hasher = None
            if staged[i]:
                _place(tensors[asks[i].name], asks[i].dst, targets[i])
    finally:
        arrivals.close()


def _place(target: torch.Tensor, box: Box, data: torch.Tensor) -> None:
    """Write ``data`` (the piece's bytes, uint8) into ``box`` of ``target``."""
    values = data.clone() if data.storage_offset() % target.element_size() else data
    with torch.no_grad():
        target[box.index()] = values.view(target.dtype).view(box.lengths)
