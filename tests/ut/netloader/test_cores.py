"""Where hashing and receiving run: never more hashing threads than the calling thread's
CPUs, one thread doing both on one core, the worker's cores for a load and the
thread's own affinity back afterwards, however the load ended."""

import functools
import os
import subprocess
import sys
import threading

import pytest
import torch

from tests.helpers.toy import fetch_for, make_toy, serving, verified_prefix
from tests.helpers.wire import tcp_pair
from vllm_ascend.model_loader.netloader import client as client_module
from vllm_ascend.model_loader.netloader import cores
from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    byte_view,
    digest,
    digest_parts,
    spec_of,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES
from vllm_ascend.model_loader.netloader.planes.stream import StreamLink
from vllm_ascend.model_loader.netloader.planes.transfer import recv_weights, send_weights

two_cpus = pytest.mark.skipif(len(cores.allowed_cpus()) < 2, reason="needs two CPUs")


def on_one_cpu(work, timeout_s: float = 60.0) -> None:
    """Run ``work()`` on a thread pinned to this process's first CPU, as a vLLM CPU
    worker's thread is; the pin is that thread's alone."""

    def pinned() -> None:
        os.sched_setaffinity(0, {min(cores.allowed_cpus())})
        work()

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join(timeout_s)


def bind_worker_to(cpus, monkeypatch) -> None:
    """The worker's OpenMP binding names ``cpus`` (as vLLM CPU sets it)."""
    monkeypatch.setenv("OMP_PLACES", "{" + ",".join(map(str, cpus)) + "}")

# A process pinned to one CPU hashes 3 tensors of 10 MiB in parts, then reports how
# many threads it ever had (it starts with one) and the digests.
_PINNED_HASHING = """
import os, sys
os.sched_setaffinity(0, {%d})
import torch
from vllm_ascend.model_loader.netloader.manifest import digest_parts
before = len(os.listdir("/proc/self/task"))
out = [digest_parts(torch.full((10 << 20,), i, dtype=torch.uint8))[0] for i in range(3)]
print(before, len(os.listdir("/proc/self/task")), *out)
"""


def test_hashing_on_one_cpu_starts_no_thread():
    cpu = min(cores.allowed_cpus())
    torch.set_num_threads(1)
    done = subprocess.run([sys.executable, "-c", _PINNED_HASHING % cpu], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    before, after, *digests = done.stdout.split()
    # blake3's automatic pool handed each part to a thread of its own on that one CPU.
    assert int(after) == int(before)
    assert digests == [digest_parts(torch.full((10 << 20,), i, dtype=torch.uint8))[0]
                       for i in range(3)]


@two_cpus
def test_a_hashing_pool_never_has_more_threads_than_the_thread_may_use():
    seen: list[int] = []
    data = memoryview(bytes(range(256)) * (40 << 12))  # 10 MiB

    def hash_it() -> None:
        seen.append(cores.hash_threads())
        from vllm_ascend.model_loader.netloader.parts import new_hasher

        seen.append(new_hasher(len(data)).update(data).digest() is not None)

    on_one_cpu(hash_it)
    assert seen == [1, True]
    assert cores.hash_threads() == len(cores.allowed_cpus())


def test_the_worker_cpus_are_what_its_openmp_binding_names(monkeypatch):
    assert cores._omp_places("{0,1,2}") == {0, 1, 2}
    assert cores._omp_places("{4},{5},{7}") == {4, 5, 7}
    assert cores._omp_places("{2:3}") == {2, 3, 4}
    for unknown in ("cores", "{x}", "{0:4:2}", "!{1}", "{0},!{1}", "{0}:4"):
        assert cores._omp_places(unknown) == set(), unknown
    assert cores._cpu_list("0 2-3".replace(" ", ",")) == {0, 2, 3}
    assert cores._proclist("granularity=fine,explicit,proclist=[0,1,3]") == "0,1,3"
    for name in ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"):
        monkeypatch.delenv(name, raising=False)
    assert cores.worker_cpus() == cores.allowed_cpus()
    monkeypatch.setenv("GOMP_CPU_AFFINITY", "0")
    assert cores.worker_cpus() == {0}
    monkeypatch.setenv("OMP_PLACES", f"{{{os.cpu_count()}}}")  # a CPU this host lacks
    assert cores.worker_cpus() == cores.allowed_cpus()
    monkeypatch.delenv("GOMP_CPU_AFFINITY")
    monkeypatch.setenv("OMP_PLACES", "{0:1000000000}")  # never built as a set
    assert cores.worker_cpus() == cores.allowed_cpus()


@two_cpus
def test_a_thread_started_before_the_binding_does_not_widen_the_worker(monkeypatch):
    """The cores of other threads are not the worker's: one that predates the binding
    still has every CPU."""
    for name in ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"):
        monkeypatch.delenv(name, raising=False)
    cpus = sorted(cores.allowed_cpus())
    inside: list[frozenset[int]] = []

    def load() -> None:
        with cores.worker_cores("test"):
            inside.append(cores.allowed_cpus())

    on_one_cpu(load)
    assert inside == [frozenset({cpus[0]})]


@two_cpus
def test_worker_cores_widen_a_pinned_thread_and_restore_it_when_the_load_raises(monkeypatch):
    cpus = sorted(cores.allowed_cpus())
    bind_worker_to(cpus, monkeypatch)
    inside: list[frozenset[int]] = []
    after: list[frozenset[int]] = []

    def load() -> None:
        try:
            with cores.worker_cores("test"):
                inside.append(cores.allowed_cpus())
                raise RuntimeError("half-way")
        except RuntimeError:
            pass
        after.append(cores.allowed_cpus())

    on_one_cpu(load)
    assert inside == [frozenset(cpus)]
    assert after == [frozenset({cpus[0]})]


@two_cpus
def test_a_fetch_that_fails_half_way_leaves_the_thread_on_its_own_core(monkeypatch):
    cpus = sorted(cores.allowed_cpus())
    bind_worker_to(cpus, monkeypatch)
    during: list[frozenset[int]] = []
    real = client_module.recv_weights

    def recording(*args, **kwargs):
        during.append(cores.allowed_cpus())
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "recv_weights", recording)
    result: list[object] = []
    after: list[frozenset[int]] = []

    def fetch_thread(address: str) -> None:
        model = make_toy(None)
        fetch = fetch_for(model)
        result.append(fetch.run((address,)))
        result.append(fetch.reasons)
        verified_prefix(model, 2, fetch.held)
        after.append(cores.allowed_cpus())

    # The seed's digests are those of make_toy(3): the first tensor that differs fails.
    with serving(seed=2) as server:
        server.layouts.loaded.digests = (  # type: ignore[union-attr, misc]
            LoadedWeights.capture(make_toy(3)).digests)
        on_one_cpu(functools.partial(fetch_thread, server.address))
    assert result[0] is None and "digest mismatch" in str(result[1])
    assert during == [frozenset(cpus)]
    assert after == [frozenset({cpus[0]})]


def test_on_one_cpu_the_receiving_thread_reads_and_hashes_every_piece_itself():
    tensors = [torch.arange(n, dtype=torch.int32) * (i + 3)
               for i, n in enumerate([10, 3 * PART_BYTES // 4 + 17, 70_000, 0])]
    specs = [spec_of(f"t{i}", t) for i, t in enumerate(tensors)]
    parts = {d: p for d, p in map(digest_parts, tensors) if p}
    digests = [digest(t) for t in tensors]
    targets = [torch.empty_like(t) for t in tensors]
    helpers: list[list[str]] = []
    verified: list[int] = []

    def on_verified(n: int) -> None:
        verified.append(n)
        helpers.append([t.name for t in threading.enumerate() if t.name.startswith("netloader")])

    def receive(sock) -> None:
        os.sched_setaffinity(0, {min(cores.allowed_cpus())})
        recv_weights(StreamLink(sock, 10.0, sum(s.nbytes for s in specs)), targets, specs,
                     digests, 1 << 20, on_verified=on_verified, parts=parts)

    a, b = tcp_pair()
    with a, b:
        sender = threading.Thread(target=send_weights,
                                  args=(StreamLink(a, 10.0, sum(s.nbytes for s in specs)),
                                        tensors, specs, 1 << 20))
        sender.start()
        receiver = threading.Thread(target=receive, args=(b,))
        receiver.start()
        receiver.join(60)
        sender.join(60)
    assert verified == [1, 2, 3, 4]
    for got, want in zip(targets, tensors, strict=True):
        assert torch.equal(byte_view(got), byte_view(want))
    # No reader thread and no page-faulting helper took turns with it on its core.
    assert helpers and all(h == [] for h in helpers)
