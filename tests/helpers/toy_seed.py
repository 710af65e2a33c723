"""A real SeedServer of the toy model in a child process, for tests that kill it,
limit its descriptors or watch its memory."""

import contextlib
import multiprocessing as mp
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.helpers.toy import IDENTITY, SMALL_BUCKET, make_toy


def flip_one_byte_in_first_transfer() -> None:
    """Test seam at seed -> transfer: the first transfer sends a copy of the largest
    tensor with a single flipped bit, under the digests of the true values."""
    from vllm_ascend.model_loader.netloader.manifest import byte_view
    from vllm_ascend.model_loader.netloader.seed import server as seed

    send = seed.send_weights
    done: list[bool] = []

    def corrupted(link: Any, tensors: Any, *args: Any, **kwargs: Any) -> int:
        if not done:
            done.append(True)
            i = max(range(len(tensors)), key=lambda k: tensors[k].nbytes)
            bad = tensors[i].clone()
            byte_view(bad)[12345] ^= 1
            tensors = [*tensors[:i], bad, *tensors[i + 1 :]]
        return send(link, tensors, *args, **kwargs)

    seed.send_weights = corrupted  # type: ignore[assignment]


def die_after_buckets(n: int) -> None:
    """Test seam at seed -> transfer: the process exits (as if killed) when its first
    transfer is about to send bucket ``n``, once buckets 0 .. n-1 have left."""
    from vllm_ascend.model_loader.netloader.seed import server as seed

    send = seed.send_weights

    class Dying:
        def __init__(self, link: Any) -> None:
            self._link = link

        def send_bucket(self, index: int, *args: Any) -> None:
            if index == n:
                self._link.flush()
                os._exit(9)
            self._link.send_bucket(index, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._link, name)

    def dying(link: Any, *args: Any, **kwargs: Any) -> int:
        return send(Dying(link), *args, **kwargs)

    seed.send_weights = dying  # type: ignore[assignment]


def _serve(ready: Any, stop: Any, seed_value: int, options: dict[str, Any]) -> None:
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
    from vllm_ascend.model_loader.netloader.wire.addresses import listen

    if options.pop("corrupt_first"):
        flip_one_byte_in_first_transfer()
    die_after = options.pop("die_after")
    if die_after is not None:
        die_after_buckets(die_after)
    nofile = options.pop("nofile")
    host = options.pop("host")
    identity = options.pop("identity")
    weights = LoadedWeights.capture(make_toy(seed_value))
    server = SeedServer(
        weights, SeedSettings(identity, 0, host, **options), listen(host, 0)
    ).start()
    if nofile is not None:
        # From here on the worker is short of descriptors, as one that holds many files:
        # ``nofile`` more than it has open now.
        limit = len(os.listdir("/proc/self/fd")) + nofile
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    ready.put(server.address)
    stop.poll(600)
    server.stop()


@contextmanager
def toy_seed(
    seed: int = 0,
    identity: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    send_limit: float | None = None,
    secret: bytes | None = None,
    corrupt_first: bool = False,
    data_plane: str = "tcp",
    nofile: int | None = None,
    host: str = "127.0.0.1",
    die_after: int | None = None,
    fanout: int = 1,
) -> Iterator[tuple[str, mp.Process]]:
    """A seed process serving ``make_toy(seed)``; yields (address, process).
    ``nofile`` lowers its descriptor limit, once it listens, to that many more than it
    has open; with ``die_after`` the process exits once it sent that many buckets."""
    options = {
        "identity": identity or IDENTITY, "timeout_s": timeout_s, "bucket_bytes": SMALL_BUCKET,
        "send_limit_bytes_per_s": send_limit, "secret": secret, "corrupt_first": corrupt_first,
        "data_plane": data_plane, "nofile": nofile, "host": host, "die_after": die_after,
        "fanout": fanout,
    }
    with serving_process(_serve, seed, options) as started:
        yield started


@contextmanager
def serving_process(target: Any, *args: Any) -> Iterator[tuple[str, mp.Process]]:
    """``target(ready, stop, *args)`` in a spawned child that puts its address on
    ``ready`` and serves until ``stop`` (a pipe) says so; yields (address, process) and
    stops it (killed if it does not end within 15 s)."""
    ctx = mp.get_context("spawn")
    # A pipe, not an Event: setting an Event deadlocks once a waiter was SIGKILLed.
    ready, (stop_recv, stop_send) = ctx.Queue(), ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(ready, stop_recv, *args), daemon=True)
    proc.start()
    try:
        yield ready.get(timeout=120), proc
    finally:
        with contextlib.suppress(OSError):
            stop_send.send(None)
        proc.join(15)
        if proc.is_alive():
            proc.kill()


def relay_listener(
    timeout_s: float = 10.0, secret: bytes | None = None, min_rate: float = 1e6,
    fanout: int = 1,
) -> Any:
    """A starting instance's ``RelayListener`` whose relay seed serves the toy model's
    identity with ``fanout`` clients at once (RELAY_FANOUT)."""
    import socket

    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.seed.relay import RelayListener, RelayProgress
    from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
    from vllm_ascend.model_loader.netloader.wire.addresses import listen
    from vllm_ascend.model_loader.netloader.wire.messages import Accept

    settings = SeedSettings(
        IDENTITY, 0, "127.0.0.1", timeout_s, bucket_bytes=SMALL_BUCKET, secret=secret,
        min_rate_bytes_per_s=min_rate, fanout=fanout,
    )

    def make_seed(weights: LoadedWeights, progress: RelayProgress, sock: socket.socket,
                  accepted: Accept) -> SeedServer:
        assert accepted.checkpoint in (None, IDENTITY["checkpoint"])
        return SeedServer(weights, settings, sock, progress=progress).start()

    return RelayListener(listen("127.0.0.1", 0), make_seed)


def relay_forever(address: str, port: Any, fanout: int) -> None:
    """A starting instance process (to be killed): fetches the toy model from
    ``address`` offering a relay of ``fanout``, sends that relay's port on the pipe
    ``port`` first, and keeps relaying until killed."""
    import time

    from tests.helpers.toy import fetch_for

    relay = relay_listener(fanout=fanout)
    port.send(relay.port)
    fetch = fetch_for(make_toy(None), timeout_s=60.0)
    fetch.relay = relay
    fetch.run((address,))
    time.sleep(600)


def fetch_forever(address: str, receiving: Any) -> None:
    """A client process that fetches the toy model from ``address`` (and gets killed).

    It sends on the pipe ``receiving`` once the transfer starts, so the test kills it
    mid-transfer, not during the handshake."""
    from tests.helpers.toy import fetch_for
    from vllm_ascend.model_loader.netloader import client

    recv = client.recv_weights

    def announced(*args: Any, **kwargs: Any) -> int:
        receiving.send(True)
        return recv(*args, **kwargs)

    client.recv_weights = announced  # type: ignore[assignment]
    fetch_for(make_toy(None), timeout_s=60.0).run((address,))

