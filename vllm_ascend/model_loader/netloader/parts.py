"""Tensor digests in parts, without torch: what a client checks an accept's part
digests with before any tensor exists (``wire.messages``).

A tensor of up to ``PART_BYTES`` has the blake3 of its bytes as its digest; a larger
one is hashed in parts of ``PART_BYTES`` (the last one shorter), and its digest is
``join_parts`` of the parts' digests. A seed announces the part digests with the
tensor digests, so a receiver checks each part as it lands and a relay passes a part
on once it matched, instead of waiting for the whole tensor (``seed.relay``); the
tensor digest, and with it the value fingerprint, commits to every part.
"""

from collections.abc import Sequence
from typing import Any

import blake3

from vllm_ascend.model_loader.netloader.cores import hash_threads

# The size of a part: the relay benchmark's 16 MiB tensors cost a 37.5 MB/s hop 0.45 s
# whole, 0.11 s in parts (benchmarks/netloader_fanout.py). The stream plane reads and
# sends 4 MiB pieces aligned to a tensor's first byte, so a piece is within a part.
PART_BYTES = 4 << 20
_THREADED_DIGEST_BYTES = 1 << 20
# blake3's key-derivation context for a digest over part digests: it never equals the
# plain blake3 of any bytes (the BLAKE3 specification: plain hashing and key
# derivation set different domain-separation flags in every compression).
_PARTS_CONTEXT = "netloader 2026-12-05 tensor digest over 4 MiB part digests"


def part_count(nbytes: int) -> int:
    """How many part digests a tensor of ``nbytes`` has (0 up to ``PART_BYTES``)."""
    return 0 if nbytes <= PART_BYTES else -(-nbytes // PART_BYTES)


def join_parts(parts: Sequence[str]) -> str:
    """The digest (64 hex digits) of a tensor larger than ``PART_BYTES`` from its
    parts' digests (64 hex digits each): keyed blake3 over their 32-byte values, so
    that it commits to every part. Raises ValueError on a digest that is not hex."""
    hasher = blake3.blake3(derive_key_context=_PARTS_CONTEXT)
    for p in parts:
        hasher.update(bytes.fromhex(p))
    return str(hasher.hexdigest())


def new_hasher(nbytes: int, threads: int | None = None) -> Any:
    """A blake3 hasher for ``nbytes`` of data: fed piece by piece, it gives the same
    digest as fed at once. From 1 MiB on it hashes on as many threads as the calling
    thread has CPUs (``cores.hash_threads``), never blake3's automatic pool: that one
    is sized to the machine once, and on a worker pinned to one core it handed every
    piece to a second thread on that core (``cores``). On one CPU it hashes on the
    calling thread. ``threads`` caps it lower (a receiver whose reader thread has a
    core of its own)."""
    most = hash_threads() if threads is None else max(1, min(threads, hash_threads()))
    threads = most if nbytes >= _THREADED_DIGEST_BYTES else 1
    return blake3.blake3(max_threads=threads)


class PartHasher:
    """The digest of a tensor of ``nbytes`` fed its bytes in order, piece by piece:
    plain blake3 up to ``PART_BYTES``, else each part hashed as it completes (``parts``)
    and ``join_parts`` of them. Pieces may straddle parts. Feeding all at once gives
    ``manifest.digest``; the receiver compares each part as it completes. ``threads``:
    as ``new_hasher``."""

    def __init__(self, nbytes: int, threads: int | None = None):
        self.nbytes = nbytes
        self.parted = part_count(nbytes) > 0
        self._threads = threads
        self._hasher = new_hasher(PART_BYTES if self.parted else nbytes, threads)
        self.parts: list[str] = []  # digests of the parts complete so far
        self._in_part = 0  # bytes of the current part hashed so far
        self.seen = 0

    def update(self, piece: memoryview) -> int:
        """Hash ``piece``, the tensor's next bytes; returns how many parts it completed
        (their digests end ``parts``)."""
        if not self.parted:
            self._hasher.update(piece)
            self.seen += len(piece)
            return 0
        completed = 0
        while len(piece):
            take = min(len(piece), PART_BYTES - self._in_part)
            self._hasher.update(piece[:take])
            piece = piece[take:]
            self._in_part += take
            self.seen += take
            if self._in_part == PART_BYTES or self.seen == self.nbytes:
                self.parts.append(str(self._hasher.hexdigest()))
                self._hasher = new_hasher(PART_BYTES, self._threads)
                self._in_part = 0
                completed += 1
        return completed

    def hexdigest(self) -> str:
        """The digest of the bytes fed so far (the tensor's, once all were)."""
        return join_parts(self.parts) if self.parted else str(self._hasher.hexdigest())
