"""Host memory ready before the data: huge pages, and faulting pages in ahead of the bytes.

The first write to fresh anonymous memory costs a page fault per 4 KiB page; on this
project's VM that, not the network, bounds a load (0.45 GB/s at 4 KiB pages; the
issue's measurement). ``prepare`` asks the kernel for transparent huge pages on a
tensor's memory (``madvise(MADV_HUGEPAGE)``; THP is often in ``madvise`` mode) and
``Populator`` faults the next tensors in on a helper thread, ahead of the receiver and
at most ``LOOKAHEAD_BYTES`` ahead (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14+;
without it the receiver's own writes fault the pages in, as before). Measured here on
a 1 GiB tensor: first write 1.24 s; with both, the populate 0.12 s and the write
after it 0.035 s (``benchmarks.netloader_transfer`` reports the figures).

None of this changes what a tensor holds: a kernel that refuses (an old kernel, a
platform without ``madvise``, memory that is not anonymous) costs one log line and the
transfer goes on. Device memory needs none of it (the device allocator owns its pages):
only host tensors are prepared.
"""

import ctypes
import ctypes.util
import errno
import mmap
import threading
from collections.abc import Callable, Sequence

import torch

from vllm_ascend.model_loader.netloader.log import get_logger

logger = get_logger(__name__)

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14 (include/uapi/asm-generic/mman-common.h)
LOOKAHEAD_BYTES = 512 << 20
_PAGE = mmap.PAGESIZE
_warned: set[str] = set()
_warn_lock = threading.Lock()


def _load_madvise() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


# The seam tests replace to make the kernel refuse.
madvise: Callable[[int, int, int], int] | None = _load_madvise()


def _pages(t: torch.Tensor) -> tuple[int, int]:
    """The whole pages inside ``t``'s bytes: (start address, length)."""
    begin = t.data_ptr()
    start = -(-begin // _PAGE) * _PAGE
    end = (begin + t.nbytes) // _PAGE * _PAGE
    return start, max(0, end - start)


def _advise(t: torch.Tensor, advice: int, what: str) -> bool:
    """``madvise`` over ``t``'s whole pages; False (logged once per kind) if refused."""
    start, length = _pages(t)
    if length == 0 or t.device.type != "cpu":
        return True
    fn = madvise
    err = errno.ENOSYS
    if fn is not None:
        if fn(start, length, advice) == 0:
            return True
        err = ctypes.get_errno()
    with _warn_lock:
        first = what not in _warned
        _warned.add(what)
    if first:
        logger.info("Netloader: the kernel does not %s (%s); receiving without it",
                    what, errno.errorcode.get(err, err))
    return False


def prepare(targets: Sequence[torch.Tensor]) -> None:
    """Ask for transparent huge pages on every host tensor in ``targets`` (before the
    first write, which is when the kernel picks the page size)."""
    for t in targets:
        if t.device.type == "cpu" and t.nbytes >= 2 * _PAGE:
            if not _advise(t, MADV_HUGEPAGE, "give huge pages (MADV_HUGEPAGE)"):
                return


def populate(t: torch.Tensor) -> bool:
    """Fault ``t``'s pages in for writing (``MADV_POPULATE_WRITE``), leaving its bytes
    as they are; False if the kernel refused. No touch loop instead: the receiver may
    write the same pages at the same time, and a read-then-write could undo its bytes."""
    if t.device.type != "cpu" or t.nbytes == 0:
        return True
    return _advise(t, MADV_POPULATE_WRITE, "populate ahead (MADV_POPULATE_WRITE)")


class Populator:
    """Faults ``targets`` in, in order, on a helper thread, never more than
    ``lookahead`` bytes ahead of what the receiver reported (``reached``). ``stop``
    ends it; it never raises into the receiver."""

    def __init__(self, targets: Sequence[torch.Tensor], lookahead: int = LOOKAHEAD_BYTES):
        self._targets = [t for t in targets if t.device.type == "cpu" and t.nbytes]
        self._lookahead = lookahead
        self._reached = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="netloader-populate",
                                         daemon=True)

    def start(self) -> "Populator":
        if self._targets:
            self._thread.start()
        return self

    def reached(self, nbytes: int) -> None:
        """The receiver has written the first ``nbytes`` of the targets."""
        with self._cond:
            self._reached = nbytes
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        done = 0
        try:
            for t in self._targets:
                with self._cond:
                    while not self._stopped and done - self._reached > self._lookahead:
                        self._cond.wait(0.5)
                    if self._stopped:
                        return
                if not populate(t):
                    return  # refused once: refused for every tensor
                done += t.nbytes
        except Exception:  # noqa: BLE001 - thread top level: faulting ahead is an optimisation
            logger.exception("Netloader: faulting pages in ahead failed; receiving without it")
