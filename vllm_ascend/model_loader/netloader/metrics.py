"""Netloader's Prometheus metrics, on the instance's own ``/metrics``.

Transfers happen in the worker processes, and ``/metrics`` is served by vLLM's API
server process from prometheus_client's default registry (vllm/entrypoints/serve/
instrumentator/metrics.py, one API server). So each process keeps its counts in memory
and, after every change, writes them to ``$NETLOADER_METRICS_DIR/<pid>.json``
(atomically); ``NetloaderCollector``, registered in every process by ``register()``,
sums the files when scraped. The first process that loads the plugin (the API server)
creates the folder and the variable, which the engine and worker processes inherit,
and deletes the folder when it exits.

Metrics (names per the Prometheus naming conventions, labels of bounded cardinality):

- ``netloader_transfers_total{role, result}``: role ``client`` (this instance fetching),
  ``seed`` or ``relay`` (sending); result ``ok``, ``failed`` or ``refused``.
- ``netloader_transfer_bytes_total{role}``: bytes of the transfers that ended ``ok``.
- ``netloader_transfer_duration_seconds{role}``: histogram of those transfers' times.
- ``netloader_fallbacks_total{reason}``: loads that went to disk, by why.
- ``netloader_refusals_total{reason}``: clients a seed refused, by why.
- ``netloader_relay_hops_total``: redirects this instance's clients followed to a relay.
- ``netloader_active_transfers{role}``: transfers running now, in live processes.
"""

import atexit
import bisect
import glob
import json
import os
import shutil
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from vllm_ascend.model_loader.netloader.log import get_logger

logger = get_logger(__name__)


METRICS_DIR_ENV = "NETLOADER_METRICS_DIR"
# Seconds; a tiny model moves in well under 1 s, a large one over a slow link in minutes.
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CLIENT, SEED, RELAY = "client", "seed", "relay"
OK, FAILED, REFUSED = "ok", "failed", "refused"
_MAX_FILE_BYTES = 1 << 20


class ProcessMetrics:
    """This process's counts; every method is thread-safe and never raises (a metrics
    problem must not touch a transfer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Snapshot and replace under one lock: an older snapshot never lands last.
        self._write_lock = threading.Lock()
        self._transfers: Counter[tuple[str, str]] = Counter()
        self._bytes: Counter[str] = Counter()
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._fallbacks: Counter[str] = Counter()
        self._refusals: Counter[str] = Counter()
        self._relay_hops = 0
        self._active: Counter[str] = Counter()

    def started(self, role: str) -> None:
        """A transfer of ``role`` is running (pair with ``stopped``)."""
        with self._lock:
            self._active[role] += 1
        self._write()

    def stopped(self, role: str) -> None:
        with self._lock:
            self._active[role] = max(0, self._active[role] - 1)
        self._write()

    def ended(self, role: str, result: str, nbytes: int = 0, seconds: float = 0.0) -> None:
        """A transfer attempt of ``role`` ended with ``result``; ``nbytes`` and
        ``seconds`` count for ``ok`` ones."""
        with self._lock:
            self._transfers[(role, result)] += 1
            if result == OK:
                self._bytes[role] += nbytes
                self._sums[role] = self._sums.get(role, 0.0) + seconds
                buckets = self._buckets.setdefault(role, [0] * (len(DURATION_BUCKETS_S) + 1))
                buckets[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        self._write()

    def fallback(self, reason: str) -> None:
        self._bump(self._fallbacks, reason)

    def refusal(self, reason: str) -> None:
        self._bump(self._refusals, reason)

    def _bump(self, counter: Counter[str], reason: str) -> None:
        with self._lock:
            counter[reason] += 1
        self._write()

    def relay_hop(self) -> None:
        with self._lock:
            self._relay_hops += 1
        self._write()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pid": os.getpid(),
                "transfers": [[r, s, n] for (r, s), n in self._transfers.items()],
                "bytes": dict(self._bytes),
                "buckets": {r: list(b) for r, b in self._buckets.items()},
                "sums": dict(self._sums),
                "fallbacks": dict(self._fallbacks),
                "refusals": dict(self._refusals),
                "relay_hops": self._relay_hops,
                "active": dict(self._active),
            }

    def _write(self) -> None:
        folder = os.environ.get(METRICS_DIR_ENV)
        if not folder:
            return
        path = os.path.join(folder, f"{os.getpid()}.json")
        tmp = f"{path}.tmp"
        with self._write_lock:
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(self.snapshot(), f)
                os.replace(tmp, path)
            except OSError:
                pass  # the folder is gone (the API server exited): nothing to report to


METRICS = ProcessMetrics()
_said_broken = threading.Event()


class NetloaderCollector:
    """A prometheus_client collector summing every process's file in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder

    def collect(self) -> Iterator[Any]:
        """The families, or none at all if anything in the folder is not what this
        module writes: vLLM's own metrics are served by the same registry, and a
        collector that raises would take them down too."""
        try:
            families = list(self._families())
        except Exception:  # noqa: BLE001 - see above; said once per process
            if not _said_broken.is_set():
                _said_broken.set()
                logger.exception("Netloader metrics folder %s cannot be read", self.folder)
            families = []
        yield from families

    def _families(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshots = list(self._snapshots())
        transfers = CounterMetricFamily(
            "netloader_transfers", "Netloader weight transfers, by role and result.",
            labels=["role", "result"],
        )
        total: Counter[tuple[str, str]] = Counter()
        for s in snapshots:
            for role, result, n in s.get("transfers", []):
                total[(str(role), str(result))] += n
        for (role, result), n in sorted(total.items()):
            transfers.add_metric([role, result], n)
        yield transfers

        nbytes = CounterMetricFamily(
            "netloader_transfer_bytes", "Bytes moved by Netloader transfers that ended ok.",
            labels=["role"],
        )
        for role, n in sorted(_summed(snapshots, "bytes").items()):
            nbytes.add_metric([role], n)
        yield nbytes

        duration = HistogramMetricFamily(
            "netloader_transfer_duration_seconds",
            "Wall time of Netloader transfers that ended ok.", labels=["role"],
        )
        sums = _summed(snapshots, "sums")
        buckets: dict[str, list[float]] = {}
        for s in snapshots:
            for role, counts in s.get("buckets", {}).items():
                acc = buckets.setdefault(role, [0.0] * (len(DURATION_BUCKETS_S) + 1))
                for i, n in enumerate(counts[: len(acc)]):
                    acc[i] += n
        for role, counts in sorted(buckets.items()):
            cumulative: list[tuple[str, float]] = []
            running = 0.0
            for le, n in zip([*map(str, DURATION_BUCKETS_S), "+Inf"], counts, strict=True):
                running += n
                cumulative.append((le, running))
            duration.add_metric([role], cumulative, sums.get(role, 0.0))
        yield duration

        for name, key, text in (
            ("netloader_fallbacks", "fallbacks", "Loads that went to disk, by reason."),
            ("netloader_refusals", "refusals", "Clients a seed refused, by reason."),
        ):
            family = CounterMetricFamily(name, text, labels=["reason"])
            for reason, n in sorted(_summed(snapshots, key).items()):
                family.add_metric([reason], n)
            yield family

        hops = CounterMetricFamily(
            "netloader_relay_hops", "Redirects to a relay that this instance's fetches followed."
        )
        hops.add_metric([], sum(int(s.get("relay_hops", 0)) for s in snapshots))
        yield hops

        active = GaugeMetricFamily(
            "netloader_active_transfers", "Netloader transfers running now.", labels=["role"]
        )
        live = [s for s in snapshots if _alive(s.get("pid"))]
        for role in (CLIENT, SEED, RELAY):
            active.add_metric([role], _summed(live, "active").get(role, 0))
        yield active

    def _snapshots(self) -> Iterator[dict[str, Any]]:
        for path in glob.glob(os.path.join(self.folder, "*.json")):
            data = _read_snapshot(path)
            if data is not None:
                yield data


def _read_snapshot(path: str) -> dict[str, Any] | None:
    """One process's counts, or None for anything that is not a small regular file of
    well-formed counts (a link, a FIFO, a file being replaced, another program's file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        return None
    try:
        raw = json.loads(data)
    except Exception:  # noqa: BLE001 - RecursionError, UnicodeDecodeError...: not ours
        return None
    return _well_formed(raw)


def _well_formed(raw: Any) -> dict[str, Any] | None:
    """``raw`` if every field has the shape ``ProcessMetrics.snapshot`` writes."""
    def counts(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _number(v) for k, v in value.items()
        )

    if not isinstance(raw, dict) or not (isinstance(raw.get("pid"), int)
                                         and 0 < raw["pid"] < 2**31):
        return None
    transfers = raw.get("transfers", [])
    buckets = raw.get("buckets", {})
    ok = (
        isinstance(transfers, list)
        and all(isinstance(t, list) and len(t) == 3 and isinstance(t[0], str)
                and isinstance(t[1], str) and _number(t[2]) for t in transfers)
        and all(counts(raw.get(k, {})) for k in ("bytes", "sums", "fallbacks", "refusals",
                                                 "active"))
        and _number(raw.get("relay_hops", 0))
        and isinstance(buckets, dict)
        and all(isinstance(r, str) and isinstance(b, list)
                and len(b) == len(DURATION_BUCKETS_S) + 1 and all(map(_number, b))
                for r, b in buckets.items())
    )
    return raw if ok else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _summed(snapshots: list[dict[str, Any]], key: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in snapshots:
        values = s.get(key, {})
        if isinstance(values, dict):
            for name, n in values.items():
                if isinstance(n, (int, float)):
                    total[str(name)] = total.get(str(name), 0) + n
    return total


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_installed = False


def install() -> None:
    """Create the metrics folder if this is the first process (and remove it when this
    process exits), and register the collector on the default registry once."""
    global _installed
    if _installed:
        return
    _installed = True
    folder = os.environ.get(METRICS_DIR_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="netloader-metrics-")
        os.environ[METRICS_DIR_ENV] = folder
        atexit.register(shutil.rmtree, folder, True)
    elif not os.path.isdir(folder):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as e:
            logger.warning("Netloader metrics: cannot create %s=%s (%s); no counts on "
                           "/metrics", METRICS_DIR_ENV, folder, e)
    from prometheus_client import REGISTRY

    REGISTRY.register(NetloaderCollector(folder))  # type: ignore[arg-type]
