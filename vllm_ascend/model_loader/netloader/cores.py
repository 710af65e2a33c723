"""Where Netloader's own threads run: the CPUs a thread may use, the cores the worker
was given, and hashing sized to them.

vLLM CPU pins a worker to the cores ``VLLM_CPU_OMP_THREADS_BIND`` gives it, one OpenMP
thread per core, its main thread to the first (vllm/utils/ompmultiprocessing.py sets
``OMP_PLACES`` and ``OMP_PROC_BIND``); a thread the main thread starts inherits the
main thread's one core. Measured in a vLLM CPU worker receiving 1 GB (perf, one pinned
core; the guide's Performance section): the receiving thread spent 85 % of the core
faulting fresh pages in and blake3 9 %; the 1.25 s that ``verify_s`` showed was mostly
the hashing thread waiting for that core, and blake3's automatic thread pool handed
every piece to a second thread on the same core. So:

- ``hash_threads``: a hashing pool never has more threads than the calling thread's
  allowed CPUs (``os.sched_getaffinity(0)``); on one core blake3 hashes on the calling
  thread itself.
- ``single_core``: whether the receiving side should receive and hash on one thread
  (``planes.transfer``), each piece right after it lands, while it is in cache.
- ``worker_cores``: for the length of a transfer, the calling thread may use every
  core the worker was given (its OpenMP binding: ``OMP_PLACES``, ``GOMP_CPU_AFFINITY``
  or ``KMP_AFFINITY``); nothing else runs in the worker while it loads. The affinity is
  restored afterwards, however the transfer ends; only threads that end with it start
  meanwhile.

Every call here is best effort: a platform without ``sched_getaffinity`` (macOS), or a
kernel that refuses a mask, leaves threads where they are.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from vllm_ascend.model_loader.netloader.log import get_logger

logger = get_logger(__name__)

# Linux numbers CPUs below NR_CPUS, at most 8192 (arch/x86/Kconfig): a list naming more
# is a mistake, and is not built as a set.
_MAX_CPU_ID = 8192
_PLACE = re.compile(r"\{([0-9,\s:-]+)\}")


def allowed_cpus() -> frozenset[int]:
    """The CPUs the calling thread may run on (all of ``os.cpu_count`` where the
    platform cannot tell)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def hash_threads() -> int:
    """How many threads a hashing pool of the calling thread may use: its allowed
    CPUs, at least 1."""
    return max(1, len(allowed_cpus()))


def single_core() -> bool:
    """Whether the calling thread may run on one CPU only."""
    return len(allowed_cpus()) <= 1


def worker_cpus() -> frozenset[int]:
    """The cores this worker was given, as its OpenMP binding names them:
    ``OMP_PLACES`` written as explicit places (what vLLM CPU sets), else
    ``GOMP_CPU_AFFINITY`` or ``KMP_AFFINITY``'s ``proclist`` (vLLM's libgomp and libiomp
    paths). The calling thread's own CPUs where none is set or a form is not understood
    (strides, exclusions, abstract names): then nothing is widened. Never the masks of
    other threads, which may predate the binding."""
    env = os.environ
    named = (_omp_places(env.get("OMP_PLACES", ""))
             or _cpu_list(env.get("GOMP_CPU_AFFINITY", "").replace(" ", ","))
             or _cpu_list(_proclist(env.get("KMP_AFFINITY", ""))))
    online = os.cpu_count() or 1
    if not named or any(not 0 <= c < online for c in named):
        return allowed_cpus()
    return frozenset(named)


def _omp_places(value: str) -> frozenset[int]:
    """The CPUs of ``OMP_PLACES`` written as explicit places (``{0,1,2}``, ``{0},{1}``,
    ``{0:4}``, ``{0-3}``); none for any other form."""
    places = _PLACE.findall(value)
    if not places or _PLACE.sub("", value).strip(" ,"):
        return frozenset()  # an abstract name, an exclusion or a stride between places
    cpus: set[int] = set()
    for place in places:
        got = _cpu_list(place)
        if not got:
            return frozenset()
        cpus |= got
    return frozenset(cpus)


def _proclist(value: str) -> str:
    """The ``proclist=[...]`` of a ``KMP_AFFINITY`` value, or ""."""
    m = re.search(r"proclist=\[([0-9,\s-]+)\]", value)
    return m[1] if m else ""


def _cpu_list(value: str) -> frozenset[int]:
    """``0,2-4`` or ``3:2`` (start:length) as CPUs; none if any item is another form."""
    cpus: set[int] = set()
    for item in filter(None, (i.strip() for i in value.split(","))):
        m = re.fullmatch(r"(\d+)(?:(-|:)(\d+))?", item)
        if m is None:
            return frozenset()
        first = int(m[1])
        last = first if m[2] is None else int(m[3]) if m[2] == "-" else first + int(m[3]) - 1
        if last >= _MAX_CPU_ID:
            return frozenset()  # no kernel numbers a CPU so: not a binding to follow
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def _set(cpus: frozenset[int]) -> bool:
    try:
        os.sched_setaffinity(0, cpus)
        return True
    except (AttributeError, OSError, ValueError):
        return False


@contextmanager
def worker_cores(who: str) -> Iterator[frozenset[int]]:
    """Let the calling thread, and the threads it starts meanwhile, run on every core
    the worker was given (``worker_cpus``) for the length of the block; its affinity
    before is restored on leaving, whatever the block raised. Yields the CPUs the
    thread may use inside."""
    before = allowed_cpus()
    given = worker_cpus()
    widened = given > before and _set(given)
    if widened:
        logger.info("%s: receiving and hashing on the worker's cores %s for this load "
                    "(the thread was pinned to %s)", who, _ranges(given), _ranges(before))
    try:
        yield given if widened else before
    finally:
        if widened and not _set(before):
            logger.warning("%s: could not restore this thread's CPU affinity to %s",
                           who, _ranges(before))


def _ranges(cpus: frozenset[int]) -> str:
    """``0-3,6``: a CPU set the way taskset prints it."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)
