"""The compile cache between a real seed and a client over real sockets: the client
installs exactly the seed's files; whatever a seed does wrong (traversal, symlinks,
oversize, digest mismatch, another host, dripping, closing) ends as "no cache" with
nothing written into the client's cache root."""

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest

from tests.helpers.toy import serving
from vllm_ascend.model_loader.netloader.compile_cache.fetching import (
    CACHE_ERRORS,
    CacheFetch,
    CacheRefused,
    fetch,
)
from vllm_ascend.model_loader.netloader.compile_cache.naming import (
    CacheRejected,
    NoCache,
    host_signature,
)
from vllm_ascend.model_loader.netloader.compile_cache.serving import CacheServing, list_cache
from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.wire.auth import AuthError
from vllm_ascend.model_loader.netloader.wire.frames import data_header
from vllm_ascend.model_loader.netloader.wire.handshake import open_as_seed
from vllm_ascend.model_loader.netloader.wire.messages import CacheFile, CacheRequest

H = "a" * 64
H2 = "b" * 64
SECRET = b"compile cache secret 0123456789"


def make_cache(root: Path, name: str = H) -> dict[str, bytes]:
    files = {
        f"{name}/rank_0_0/model": os.urandom(5000),
        f"{name}/inductor_cache/fm/cfm.py": b"x = 1\n",
        f"{name}/inductor_cache/xx/cxx.main.so": os.urandom(70000),
        f"{name}/inductor_cache/empty": b"",
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / name / "inductor_cache" / "locks").mkdir()
    (root / name / "inductor_cache" / "locks" / "cxx.lock").write_bytes(b"")
    return files


def installed(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def request(*names: str) -> CacheRequest:
    return CacheRequest(names or (H,), "rank_0_0", host_signature())


def settings(root: Path, secret: bytes | None = None, **more) -> CacheFetch:
    return CacheFetch(timeout_s=3.0, min_rate_bytes_per_s=1e6, secret=secret, root=str(root),
                      **more)


@contextlib.contextmanager
def cache_seed(root: Path, secret: bytes | None = None, offer: bool = True, **serving_args
               ) -> Iterator[str]:
    cache = CacheServing(str(root), 3.0, 1e6, **serving_args) if offer else None
    with serving(secret=secret, compile_cache=cache) as seed:
        yield seed.address


# --- a real seed ------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, SECRET])
def test_client_installs_exactly_the_seeds_files(tmp_path, secret):
    seed_root, client_root = tmp_path / "seed", tmp_path / "client"
    files = make_cache(seed_root)
    make_cache(seed_root, H2)  # not asked for
    with cache_seed(seed_root, secret) as address:
        result = fetch(address, request(H), settings(client_root, secret))
    assert result.hashes == (H,) and result.files == len(files)
    assert result.nbytes == sum(map(len, files.values()))
    assert installed(client_root) == files  # no lock files, no other cache, no staging


def test_existing_cache_is_never_overwritten(tmp_path):
    seed_root, client_root = tmp_path / "seed", tmp_path / "client"
    make_cache(seed_root)
    make_cache(seed_root, H2)
    (client_root / H).mkdir(parents=True)
    (client_root / H / "mine").write_bytes(b"keep")
    with cache_seed(seed_root) as address:
        result = fetch(address, request(H, H2), settings(client_root))
        assert result.hashes == (H2,) and result.present == (H,)
        assert installed(client_root / H) == {"mine": b"keep"}
        with pytest.raises(NoCache):
            fetch(address, request(H, H2), settings(client_root))


def test_seed_without_the_cache_or_not_offering_it_gives_no_cache(tmp_path):
    client_root = tmp_path / "client"
    with cache_seed(tmp_path / "empty") as address, pytest.raises(NoCache):
        fetch(address, request(), settings(client_root))
    make_cache(tmp_path / "seed")
    with cache_seed(tmp_path / "seed", offer=False) as address, pytest.raises(CacheRefused):
        fetch(address, request(), settings(client_root))
    assert installed(client_root) == {}


def test_other_host_signature_is_refused(tmp_path):
    make_cache(tmp_path / "seed")
    other = CacheRequest((H,), "rank_0_0", "f" * 64)
    with cache_seed(tmp_path / "seed") as address, pytest.raises(CacheRefused, match="host"):
        fetch(address, other, settings(tmp_path / "client"))
    assert not (tmp_path / "client").exists() or installed(tmp_path / "client") == {}


def test_secret_is_required_both_ways(tmp_path):
    make_cache(tmp_path / "seed")
    client_root = tmp_path / "client"
    with cache_seed(tmp_path / "seed", SECRET) as address:
        with pytest.raises(AuthError):
            fetch(address, request(), settings(client_root))
        with pytest.raises(CacheRefused, match="wrong shared secret"):
            fetch(address, request(), settings(client_root, b"wrong secret 0123456789abc"))
    with cache_seed(tmp_path / "seed") as address, pytest.raises(AuthError):
        fetch(address, request(), settings(client_root, SECRET))
    assert not client_root.exists() or installed(client_root) == {}


def test_seed_over_its_caps_refuses(tmp_path):
    make_cache(tmp_path / "seed")
    with cache_seed(tmp_path / "seed", max_files=2) as address, pytest.raises(CacheRefused):
        fetch(address, request(), settings(tmp_path / "client"))


# --- hostile seeds ----------------------------------------------------------------------------


Behaviour = Callable[[socket.socket, CacheRequest, list[CacheFile], dict[str, bytes]], None]


@contextlib.contextmanager
def hostile_seed(files: dict[str, bytes], behave: Behaviour,
                 listing: list[CacheFile] | None = None) -> Iterator[str]:
    """A seed that authenticates like a real one, answers ``listing`` (default: the
    true listing of ``files``), then lets ``behave`` send the bytes."""
    server = socket.create_server(("127.0.0.1", 0))
    true = [CacheFile(p, len(d), blake3.blake3(d).hexdigest()) for p, d in files.items()]

    def run() -> None:
        with contextlib.suppress(OSError), server:
            conn, _ = server.accept()
            with conn:
                side = open_as_seed(conn, None, Deadline(5, "test"))
                assert side.request.cache is not None
                entries = true if listing is None else listing
                side.answer({"type": "compile_cache",
                             "files": [f.to_wire() for f in entries]}, Deadline(5, "test"))
                behave(conn, side.request.cache, entries, files)
                time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        thread.join(10)


def send_true(conn, req, entries, files):
    for i, f in enumerate(entries):
        conn.sendall(data_header(i, f.nbytes) + files.get(f.path, b"\0" * min(f.nbytes, 64)))


def flip_last_file(conn, req, entries, files):
    for i, f in enumerate(entries):
        data = bytearray(files[f.path])
        if i == len(entries) - 1:
            data[-1] ^= 1
        conn.sendall(data_header(i, f.nbytes) + bytes(data))


def wrong_length(conn, req, entries, files):
    conn.sendall(data_header(0, entries[0].nbytes + 1) + b"\0" * (entries[0].nbytes + 1))


def close_midway(conn, req, entries, files):
    f = entries[0]
    conn.sendall(data_header(0, f.nbytes) + files[f.path][: f.nbytes // 2])


def drip(conn, req, entries, files):
    f = entries[0]
    conn.sendall(data_header(0, f.nbytes))
    for b in files[f.path][:40]:
        conn.sendall(bytes([b]))
        time.sleep(0.25)


FILES = {
    f"{H}/rank_0_0/model": os.urandom(3000),
    f"{H}/inductor_cache/fm/cfm.py": b"y = 2\n",
}
DIGEST = "0" * 64


@pytest.mark.parametrize(("listing", "behave", "error"), [
    (None, flip_last_file, CacheRejected),                        # digest mismatch
    (None, wrong_length, CACHE_ERRORS),                           # header off the plan
    (None, close_midway, CACHE_ERRORS),
    (None, drip, CACHE_ERRORS),                                   # deadline, not per-read
    ([CacheFile(f"{H}/rank_0_0/../../../../escape", 4, DIGEST)], send_true, CACHE_ERRORS),
    ([CacheFile(f"/tmp/{H}/rank_0_0/model", 4, DIGEST)], send_true, CACHE_ERRORS),
    ([CacheFile(f"{H}/rank_0_0/model", 1 << 40, DIGEST)], send_true, CACHE_ERRORS),  # oversize
    ([CacheFile(f"{H}/rank_9_9/model", 4, DIGEST)], send_true, CACHE_ERRORS),
    ([CacheFile(f"{H2}/rank_0_0/model", 4, DIGEST)], send_true, CACHE_ERRORS),
], ids=["digest", "length", "close", "drip", "traversal", "absolute", "oversize",
        "other-rank", "unasked-name"])
def test_hostile_seed_ends_as_no_cache_with_nothing_written(tmp_path, listing, behave, error):
    client_root = tmp_path / "client"
    start = time.monotonic()
    with hostile_seed(FILES, behave, listing) as address, pytest.raises(error):
        fetch(address, request(), settings(client_root, max_bytes=1 << 20))
    assert time.monotonic() - start < 10
    assert not client_root.exists() or installed(client_root) == {}
    assert not (tmp_path / "escape").exists()


def test_seed_swapping_a_file_for_a_symlink_after_listing_sends_nothing_else(tmp_path):
    """The seed re-opens each file without following links when it sends."""
    seed_root = tmp_path / "seed"
    files = make_cache(seed_root)
    listing = list_cache(str(seed_root), request())
    target = seed_root / f"{H}/inductor_cache/fm/cfm.py"
    target.unlink()
    secret = tmp_path / "outside"
    secret.write_bytes(b"x = 1\n")
    target.symlink_to(secret)
    from vllm_ascend.model_loader.netloader.compile_cache.serving import send_files

    a, b = socket.socketpair()
    with a, b, pytest.raises(OSError) as raised:
        send_files(a, str(seed_root), listing, Deadline(5, "test"))
    assert not isinstance(raised.value, TimeoutError)
    assert files


def test_seed_swapping_a_file_for_a_fifo_after_listing_fails_at_once(tmp_path):
    """Before: open() of a FIFO blocked with no deadline, so the seed's thread and its
    compile cache slot were lost for good."""
    seed_root = tmp_path / "seed"
    make_cache(seed_root)
    listing = list_cache(str(seed_root), request())
    target = seed_root / f"{H}/inductor_cache/fm/cfm.py"
    target.unlink()
    os.mkfifo(target)
    from vllm_ascend.model_loader.netloader.compile_cache.serving import send_files

    a, b = socket.socketpair()
    result: list[BaseException] = []

    def send() -> None:
        try:
            send_files(a, str(seed_root), listing, Deadline(2, "test"))
        except OSError as e:
            result.append(e)

    def drain() -> None:
        while b.recv(1 << 20):
            pass

    worker = threading.Thread(target=send, daemon=True)
    with a, b:
        threading.Thread(target=drain, daemon=True).start()
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "open() of the FIFO blocked the sender"
    assert result and "no longer a regular file" in str(result[0])
