"""Shipping vLLM's compile cache from a seed to a client (``COMPILE_CACHE``).

Without ``--enforce-eager`` a vLLM worker compiles its model during warm-up and keeps
the result under ``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<H>/``: an
``inductor_cache/`` and ``rank_<rank>_<dp index>/model``, the bundled artifact, written
last (vllm/compilation/decorators.py:547-585, vLLM 0.32). ``H`` is the sha256 of
vLLM's compile factors (environment, ``VllmConfig.compute_hash()``, inductor's
factors; compilation/caching.py:572) plus the compiled module's own key
(decorators.py:256). An instance that finds ``<H>/rank_x_y/model`` loads it instead of
compiling.

So a client that got its weights from a seed computes its own ``H`` names (it knows its
config at ``load_weights``), asks the same seed for exactly those, receives the files
with their digests, and moves them into its own cache root only once every byte is
verified. A seed sends only what lies under the requested ``<H>/inductor_cache/`` and
``<H>/<rank dir>/``, regular files only, never through a symlink.

The cache is code: pickles, Python files that are executed and shared objects that are
loaded (built with ``-march=native``). Receiving it runs the seed's code, so the policy
(``NetloaderConfig.compile_cache_enabled``) asks for a shared secret unless the
operator opted in, and a client refuses a cache built on a host that differs in CPU,
vector ISA or compiler (``host_signature``). Every failure here ends as a log line and
"no cache": the instance then compiles as it would have anyway.
"""

import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
from torch import nn
from vllm.logger import logger

from vllm_ascend.model_loader.netloader.addresses import AddressError, parse_address
from vllm_ascend.model_loader.netloader.auth import AuthError
from vllm_ascend.model_loader.netloader.handshake import SeedSide, ask_seed
from vllm_ascend.model_loader.netloader.protocol import (
    COMPILE_CACHE,
    DATA_HEADER_BYTES,
    DONE,
    MANIFEST_BYTES_PER_TENSOR,
    MAX_CACHE_NAMES,
    MAX_CACHE_PATH_DEPTH,
    MAX_REQUEST_BYTES,
    REFUSE,
    CacheFile,
    CacheRequest,
    Deadline,
    ProtocolError,
    check_cache_path,
    clean,
    compile_cache_reply,
    data_header,
    done,
    parse_compile_cache_reply,
    parse_data_header,
    parse_done,
    parse_refuse,
    recv_exact,
    recv_into,
    recv_msg,
    reply_cap,
    send_msg,
)

# Where vLLM keeps AOT compile artifacts, under VLLM_CACHE_ROOT (decorators.py:568).
AOT_SUBDIR = ("torch_compile_cache", "torch_aot_compile")
INDUCTOR_DIR = "inductor_cache"
# The bundled artifact vLLM writes last, atomically: a cache without it is incomplete.
ARTIFACT = "model"
MAX_FILES = 4096
MAX_TOTAL_BYTES = 1 << 30
# Compile caches a seed sends at once (each reads its files twice: digest, then send).
MAX_CONCURRENT_SENDS = 2
_CHUNK = 4 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# A FIFO swapped in for a listed file must not block open(), which no deadline covers
# (O_NONBLOCK changes nothing for a regular file).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_STAGING_PREFIX = ".netloader-staging-"
# What a peer's answer may make fail on the client, all ending as "no cache".
CACHE_ERRORS = (ProtocolError, AuthError, OSError, AddressError, UnicodeError, ValueError)


class NoCache(Exception):
    """This instance asks for no compile cache, or the seed has none for it (not a fault)."""


class CacheRefused(Exception):
    """The seed answered with a refusal (its reason is the message)."""


class CacheRejected(Exception):
    """What the seed sent cannot be installed: too large, a digest mismatch, a listing
    this side cannot use."""


# --- names: what this instance's cache is called --------------------------------------


def aot_cache_dir(cache_root: str | None = None) -> str:
    """``<cache_root>/torch_compile_cache/torch_aot_compile`` (default root: vLLM's
    ``VLLM_CACHE_ROOT`` of this process)."""
    if cache_root is None:
        from vllm import envs

        cache_root = envs.VLLM_CACHE_ROOT
    return os.path.join(cache_root, *AOT_SUBDIR)


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules vLLM will compile (``@support_torch_compile`` classes whose
    ``do_not_compile`` is False: decorators.py:398-405), outermost first."""
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    return [
        m for m in model.modules()
        if isinstance(m, TorchCompileWithNoGuardsWrapper) and not getattr(m, "do_not_compile", True)
    ]


def module_hashes(module: nn.Module) -> list[str]:
    """The cache names (64-hex ``H``) vLLM will use for ``module``, one per KV cache
    layout it may still resolve to.

    The recipe is vLLM's own (decorators.py:563-567): sha256 of ``str`` of
    ``aot_compile_hash_factors(vllm_config)`` plus ``_model_hash_key(module.forward)``.
    ``vllm_config.compute_hash()`` includes ``cache_config.kv_cache_layout``, which is
    None at load time and resolved by the engine core before warm-up (vLLM
    v1/attention/backends/utils.py:247); it is set here to each ``KVCacheLayout`` in
    turn and put back to None afterwards (``record_kv_cache_layout`` raises if a
    different value is left)."""
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key
    from vllm.v1.kv_cache_layout import KVCacheLayout

    config: Any = module.vllm_config
    cache_config = config.cache_config
    current = cache_config.kv_cache_layout
    layouts = [current] if current is not None else [layout.name for layout in KVCacheLayout]
    hashes: list[str] = []
    try:
        for layout in layouts:
            # A plain attribute write: vLLM's config dataclasses may validate assignments.
            object.__setattr__(cache_config, "kv_cache_layout", layout)
            factors = aot_compile_hash_factors(config)
            factors.append(_model_hash_key(module.forward))
            name = hashlib.sha256(str(factors).encode()).hexdigest()
            if name not in hashes:
                hashes.append(name)
    finally:
        object.__setattr__(cache_config, "kv_cache_layout", current)
    return hashes


def cache_request(model: nn.Module) -> CacheRequest:
    """The names of ``model``'s compile cache on this instance (every compiled module,
    every layout it may resolve to), its rank directory and this host's signature.
    Raises ``NoCache`` when vLLM will not use a compile cache here."""
    from vllm import envs

    if not envs.VLLM_USE_AOT_COMPILE:
        raise NoCache("VLLM_USE_AOT_COMPILE is off: vLLM keeps no AOT compile cache")
    if envs.VLLM_DISABLE_COMPILE_CACHE:
        raise NoCache("VLLM_DISABLE_COMPILE_CACHE is set")
    modules = compiled_modules(model)
    if not modules:
        raise NoCache("nothing is compiled (--enforce-eager, or compilation off)")
    hashes: list[str] = []
    for module in modules:
        hashes.extend(h for h in module_hashes(module) if h not in hashes)
    if len(hashes) > MAX_CACHE_NAMES:
        logger.warning(
            "Netloader compile cache: %d names for %d compiled modules; asking for the "
            "first %d", len(hashes), len(modules), MAX_CACHE_NAMES,
        )
        hashes = hashes[:MAX_CACHE_NAMES]
    config: Any = modules[0].vllm_config
    parallel = config.parallel_config
    rank_dir = f"rank_{parallel.rank}_{parallel.data_parallel_index}"
    return CacheRequest(tuple(hashes), rank_dir, host_signature())


@functools.lru_cache(maxsize=1)
def host_signature() -> str:
    """sha256 of ``host_facts()``: a compile cache is only used on a host with the same."""
    facts = json.dumps(host_facts(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(facts.encode()).hexdigest()


def host_facts() -> dict[str, str]:
    """What decides whether this host can run code compiled on another one: the CPU
    (model and feature flags from /proc/cpuinfo: inductor builds with ``-march=native``),
    the vector ISA torch dispatches to (``torch.backends.cpu.get_cpu_capability()``,
    which honours ``ATEN_CPU_CAPABILITY``), the C++ compiler's version, the machine and
    torch's version. (Inductor's ``pick_vec_isa()`` would say the same for a given CPU
    and compiler, but builds test programs first: about 1 s on the client's start-up
    path.)"""
    import torch

    return {
        "machine": platform.machine(),
        "cpu": json.dumps(_cpu_facts(), sort_keys=True),
        "vec_isa": torch.backends.cpu.get_cpu_capability(),
        "compiler": _compiler_version(),
        "torch": torch.__version__,
    }


def _cpu_facts() -> dict[str, str]:
    """The first processor's model and feature lines (x86 and Arm field names)."""
    keys = {"vendor_id", "model name", "flags", "CPU implementer", "CPU part", "Features"}
    facts: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if facts:
                        break
                    continue
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    facts[key.strip()] = " ".join(sorted(value.split()))
    except OSError:
        facts["unreadable"] = platform.processor()
    return facts


def _compiler_version() -> str:
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    try:
        return str(get_compiler_version_info(get_cpp_compiler()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"none ({type(e).__name__})"


# --- vLLM 0.32 on CPU: loading an AOT artifact always fails ------------------------------


_shim_lock = threading.Lock()


def allow_cpu_aot_load() -> bool:
    """Make vLLM 0.32's AOT artifact loadable on CPU; True if this call changed anything.

    ``_try_load_aot_compiled_fn`` (vllm/compilation/decorators.py:315) calls
    ``finalize_loading(vllm_config)`` on the loaded function's ``compiled_fn``. On CPU
    (platforms/cpu.py:356-377: dynamo traces once, backend "inductor", no
    ``VllmBackend``) that object is torch's ``BundledAOTAutogradSerializableCallable``,
    which has no such method: every load fails ("Compiling model again due to a load
    failure") and the instance compiles again. ``finalize_loading`` only rebuilds a
    ``VllmBackend`` (compilation/caching.py:382), which CPU never uses, so a no-op is
    its exact CPU behaviour. Added to the torch class only while it lacks the method;
    upstream vLLM (PR #32037) turned AOT compile off on CPU instead."""
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled

    with _shim_lock:
        if hasattr(Bundled, "finalize_loading"):
            return False
        Bundled.finalize_loading = _no_finalize  # type: ignore[attr-defined]
    logger.info(
        "Netloader: vLLM's AOT compile artifacts are loadable on CPU from here on "
        "(a no-op finalize_loading for torch's BundledAOTAutogradSerializableCallable; "
        "vLLM 0.32 decorators.py:315)"
    )
    return True


def _no_finalize(self: Any, vllm_config: Any) -> None:
    """Nothing to finalize: no VllmBackend on CPU (see ``allow_cpu_aot_load``)."""


# --- the seed's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheServing:
    """How a seed serves its compile cache, built once from the config (``loader``).

    ``root`` is its ``torch_aot_compile`` directory; a transfer ends within
    ``timeout_s`` plus its size at ``min_rate_bytes_per_s``."""

    root: str
    timeout_s: float
    min_rate_bytes_per_s: float
    max_files: int = MAX_FILES
    max_bytes: int = MAX_TOTAL_BYTES
    host: Callable[[], str] = host_signature
    slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_CONCURRENT_SENDS),
        compare=False, repr=False,
    )


def serve(
    sock: socket.socket, side: SeedSide, serving: CacheServing | None, who: str, peer: str,
    deadline: Deadline,
) -> None:
    """Answer an authenticated compile cache request on ``sock``: a refusal with the
    reason, or the file list (proved with the secret, like every answer) followed by
    each file as a bulk-data bucket, then read the client's ``done``. Raises
    ``ProtocolError``/``OSError`` for the connection's log line."""
    request = side.request.cache
    assert request is not None  # a parsed compile cache request has one
    if serving is None:
        side.refuse("this seed does not serve its compile cache (COMPILE_CACHE)", False, deadline)
        return
    if request.host != serving.host():
        side.refuse("compile cache was built on a different host (CPU, vector ISA or "
                    "compiler): its native code may not run there", False, deadline)
        return
    if not serving.slots.acquire(blocking=False):
        side.refuse("seed is busy sending compile caches", True, deadline)
        return
    try:
        try:
            files = list_cache(serving.root, request, serving.max_files, serving.max_bytes)
        except CacheRejected as e:
            side.refuse(str(e), False, deadline)
            return
        side.answer(compile_cache_reply(files), deadline)
        total = sum(f.nbytes for f in files)
        start = time.perf_counter()
        send_files(sock, serving.root, files,
                   Deadline(serving.timeout_s + total / serving.min_rate_bytes_per_s,
                            f"compile cache to {peer}"))
        if files:
            ok, reason = parse_done(recv_msg(
                sock, Deadline(serving.timeout_s, f"'done' from {peer}"), MAX_REQUEST_BYTES,
                expect=DONE,
            ))
            log = logger.info if ok else logger.warning
            log("Netloader seed %s sent its compile cache to %s: %d files, %d bytes in %.3f s "
                "(%s), client %s", who, peer, len(files), total, time.perf_counter() - start,
                ", ".join(sorted({f.path.split("/")[0][:12] for f in files})),
                "installed it" if ok else f"rejected it: {reason}")
        else:
            logger.info("Netloader seed %s has no compile cache for %s's names", who, peer)
    finally:
        serving.slots.release()


def list_cache(
    root: str, request: CacheRequest, max_files: int = MAX_FILES,
    max_bytes: int = MAX_TOTAL_BYTES,
) -> list[CacheFile]:
    """Every file of the requested caches under ``root`` that is complete (its
    ``<H>/<rank dir>/model`` exists), with size and blake3 digest: regular files under
    ``<H>/inductor_cache/`` (not its ``locks/``, no ``*.lock``) and ``<H>/<rank dir>/``,
    reached without following a symlink. Names that a client would not accept are
    skipped. Raises ``CacheRejected`` past ``max_files`` or ``max_bytes``."""
    files: list[CacheFile] = []
    total = 0

    def add(found: Iterator[tuple[str, int, str]]) -> None:
        nonlocal total
        for path, nbytes, digest_ in found:
            files.append(CacheFile(path, nbytes, digest_))
            total += nbytes
            if len(files) > max_files or total > max_bytes:
                raise CacheRejected(
                    f"compile cache exceeds this seed's caps ({max_files} files, "
                    f"{max_bytes} bytes)"
                )

    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return files  # no cache here at all
    try:
        for name in request.hashes:
            with _opened_dir(root_fd, name) as h_fd:
                if h_fd is None:
                    continue
                with _opened_dir(h_fd, request.rank_dir) as rank_fd:
                    if rank_fd is None or not _is_regular(rank_fd, ARTIFACT):
                        continue
                    add(_walk(rank_fd, f"{name}/{request.rank_dir}"))
                with _opened_dir(h_fd, INDUCTOR_DIR) as ind_fd:
                    if ind_fd is not None:
                        add(_walk(ind_fd, f"{name}/{INDUCTOR_DIR}"))
    finally:
        os.close(root_fd)
    for f in files:
        check_cache_path(f.path, request)  # _walk only yields such names
    return files


class _opened_dir:
    """``os.open(name, dir_fd=parent)`` as a directory, never through a symlink; the
    context value is None if there is no such directory."""

    def __init__(self, parent_fd: int, name: str):
        self._parent, self._name = parent_fd, name
        self._fd: int | None = None

    def __enter__(self) -> int | None:
        try:
            self._fd = os.open(self._name, _DIR_FLAGS, dir_fd=self._parent)
        except OSError:
            self._fd = None
        return self._fd

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _is_regular(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _walk(dir_fd: int, prefix: str) -> Iterator[tuple[str, int, str]]:
    """(path, size, digest) of every regular file below ``dir_fd``, sorted, whose path
    ``prefix/...`` a client accepts (depth, plain names); symlinks, lock files and
    other kinds of file are skipped."""
    if prefix.count("/") + 2 > MAX_CACHE_PATH_DEPTH:
        return
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = f"{prefix}/{entry.name}"
        if entry.name.startswith(".") or entry.is_symlink() or not _plain_name(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            if entry.name == "locks":
                continue
            with _opened_dir(dir_fd, entry.name) as sub:
                if sub is not None:
                    yield from _walk(sub, path)
        elif entry.is_file(follow_symlinks=False) and not entry.name.endswith(".lock"):
            digested = _digest_file(dir_fd, entry.name)
            if digested is not None:
                yield (path, *digested)


def _plain_name(name: str) -> bool:
    try:
        check_cache_path(f"{'0' * 64}/{INDUCTOR_DIR}/{name}",
                         CacheRequest(("0" * 64,), "rank_0_0", "0" * 64))
    except ProtocolError:
        return False
    return True


def _digest_file(dir_fd: int, name: str) -> tuple[int, str] | None:
    """(size, blake3) of a regular file, opened without following a symlink."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        h, n = blake3.blake3(), 0
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def send_files(sock: socket.socket, root: str, files: list[CacheFile], deadline: Deadline) -> None:
    """Each file as bucket ``i`` (``protocol.data_header``) of exactly its listed size,
    read again without following a symlink. A file that changed since it was listed
    raises ``OSError`` (the client then sees the connection end, or a digest mismatch)."""
    for index, f in enumerate(files):
        fd = _open_path(root, f.path)
        with os.fdopen(fd, "rb") as src:
            _send_all(sock, data_header(index, f.nbytes), deadline)
            left = f.nbytes
            while left:
                chunk = src.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(f"compile cache file {f.path} shrank while being sent")
                _send_all(sock, chunk, deadline)
                left -= len(chunk)


def _open_path(root: str, path: str) -> int:
    """An fd of the regular file ``root/path``, each component opened without
    following a symlink."""
    parts = path.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
        file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise OSError(f"compile cache file {path} is no longer a regular file")
    return file_fd


def _send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    # Since Python 3.5, a socket timeout bounds a whole sendall: this is a deadline.
    sock.settimeout(deadline.remaining())
    sock.sendall(data)


# --- the client's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheFetch:
    """How a client fetches a compile cache (``loader``): the shared secret, the
    handshake's and each read's deadline (``timeout_s``), the minimum average rate of
    the bytes, and where the cache goes (None: this process's VLLM_CACHE_ROOT)."""

    timeout_s: float
    min_rate_bytes_per_s: float
    secret: bytes | None = field(default=None, repr=False)
    root: str | None = None
    max_files: int = MAX_FILES
    max_bytes: int = MAX_TOTAL_BYTES


@dataclass(frozen=True)
class Installed:
    """What a fetch put into the cache root: cache names installed, names that were
    already there (left alone), files and bytes received."""

    hashes: tuple[str, ...]
    present: tuple[str, ...]
    files: int
    nbytes: int
    seconds: float


def fetch(address: str, request: CacheRequest, settings: CacheFetch) -> Installed:
    """Ask the seed at ``address`` for the caches ``request`` names that this root does
    not hold yet, verify every file, then move each cache directory into place.

    Raises ``NoCache`` (nothing to fetch, or the seed has none), ``CacheRefused``,
    ``CacheRejected`` or one of ``CACHE_ERRORS``; nothing becomes visible in the cache
    root unless every file of it arrived and matched its digest."""
    root = aot_cache_dir() if settings.root is None else settings.root
    present = tuple(h for h in request.hashes if os.path.lexists(os.path.join(root, h)))
    wanted = tuple(h for h in request.hashes if h not in present)
    if not wanted:
        raise NoCache(f"every cache name is already in {root}")
    request = CacheRequest(wanted, request.rank_dir, request.host)
    start = time.perf_counter()
    host, port = parse_address(address, key="source")
    with socket.create_connection((host, port), timeout=settings.timeout_s) as conn:
        reply = ask_seed(
            conn, request.to_wire(), settings.secret,
            Deadline(settings.timeout_s, f"compile cache request to {address}"),
            reply_cap(settings.max_files, MANIFEST_BYTES_PER_TENSOR),
        )
        if reply["type"] == REFUSE:
            raise CacheRefused(parse_refuse(reply)[0])
        if reply["type"] != COMPILE_CACHE:
            raise ProtocolError(f"expected '{COMPILE_CACHE}', got '{clean(reply['type'], 40)}'")
        files = parse_compile_cache_reply(reply, request, settings.max_files, settings.max_bytes)
        if not files:
            raise NoCache(f"seed {address} has no compile cache for this configuration")
        complete = {f.path.split("/")[0] for f in files
                    if f.path.split("/")[1:] == [request.rank_dir, ARTIFACT]}
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root)
        try:
            total = sum(f.nbytes for f in files)
            deadline = Deadline(settings.timeout_s + total / settings.min_rate_bytes_per_s,
                                f"compile cache from {address}")
            try:
                receive_files(conn, staging, files, deadline)
            except (*CACHE_ERRORS, CacheRejected) as e:
                _say_done(conn, False, f"{type(e).__name__}: {e}")
                raise
            _say_done(conn, True, None)
            installed = _move_into_place(staging, root, sorted(complete))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    moved = [f for f in files if f.path.split("/")[0] in installed]
    return Installed(tuple(installed), present + tuple(sorted(complete - set(installed))),
                     len(moved), sum(f.nbytes for f in moved), time.perf_counter() - start)


def receive_files(
    sock: socket.socket, staging: str, files: list[CacheFile], deadline: Deadline
) -> None:
    """Read bucket ``i`` of exactly ``files[i].nbytes`` into ``staging/<path>`` for each
    file, and check its blake3 digest (``CacheRejected`` on a mismatch). ``staging``
    is a fresh directory only this side writes; paths were checked by the parser."""
    for index, f in enumerate(files):
        while True:
            header = recv_exact(sock, DATA_HEADER_BYTES, deadline)
            if not parse_data_header(header, index, f.nbytes, sock, deadline):
                break  # keepalives (never sent for a cache) only cost the deadline
        target = os.path.join(staging, *f.path.split("/"))
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        h = blake3.blake3()
        with os.fdopen(fd, "wb") as out:
            buf = bytearray(min(f.nbytes, _CHUNK))
            left = f.nbytes
            while left:
                view = memoryview(buf)[: min(left, len(buf))]
                recv_into(sock, view, deadline)
                h.update(view)
                out.write(view)
                left -= len(view)
        if h.hexdigest() != f.digest:
            raise CacheRejected(f"digest mismatch for compile cache file {f.path}")


def _move_into_place(staging: str, root: str, names: list[str]) -> list[str]:
    """Rename each complete ``staging/<H>`` to ``root/<H>`` unless one exists; the
    names moved. A cache without its artifact (``<H>/<rank dir>/model``) stays out."""
    moved: list[str] = []
    for name in names:
        dest = os.path.join(root, name)
        if os.path.lexists(dest):
            continue  # never overwrite: vLLM (or another rank) got there first
        os.rename(os.path.join(staging, name), dest)
        moved.append(name)
    return moved


def _say_done(sock: socket.socket, ok: bool, reason: str | None) -> None:
    try:
        send_msg(sock, done(ok, reason), Deadline(1.0, "sending 'done'"))
    except (ProtocolError, OSError):
        pass  # the seed may be gone; the outcome is this side's log line


def install_from_seed(
    model: nn.Module, address: str, settings: CacheFetch, who: str
) -> Installed | None:
    """The loader's hook: fetch ``model``'s compile cache from the seed that just
    served its weights, and log what happened; never raises for anything the seed
    sends or any state of this host (the instance then compiles itself)."""
    start = time.perf_counter()
    try:
        request = cache_request(model)
        installed = fetch(address, request, settings)
    except NoCache as e:
        logger.info("Netloader %s: no compile cache installed: %s", who, e)
        return None
    except CacheRefused as e:
        logger.warning("Netloader %s: seed %s refused its compile cache: %s", who, address, e)
        return None
    except (*CACHE_ERRORS, CacheRejected) as e:
        logger.warning(
            "Netloader %s: compile cache from %s not installed after %.3f s (%s: %s); vLLM "
            "compiles the model itself", who, address, time.perf_counter() - start,
            type(e).__name__, e,
        )
        return None
    except Exception:  # noqa: BLE001 - vLLM internals (the names) may change: compiling is always right
        logger.exception("Netloader %s: compile cache fetch from %s failed", who, address)
        return None
    logger.info(
        "Netloader %s installed the compile cache from seed %s: %s (%d files, %d bytes) "
        "in %.3f s%s", who, address, ", ".join(installed.hashes) or "nothing new",
        installed.files, installed.nbytes, installed.seconds,
        f"; already here: {', '.join(installed.present)}" if installed.present else "",
    )
    return installed
