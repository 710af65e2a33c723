"""Fan-out: a starting instance passes on what it has verified while it still receives.

A starting instance binds its listener before its own fetch (``RelayListener``) and
names that port in its hello. Once a seed sends to RELAY_FANOUT clients, it sends each
further client to a relay below it that has been sent fewer than RELAY_FANOUT
(``RelayTree``): with fan-out 1, N clients form a chain seed -> 1st -> 2nd -> ...; with
fan-out k, a tree whose depth grows as log_k N. Once the fetch is accepted, ``begin``
starts a seed over the fetch's own targets that sends each byte only after the fetch
has verified it: a tensor once its digest matched, a tensor larger than
``manifest.PART_BYTES`` part by part as each part's digest matched (``RelayProgress``).
After the load that seed goes on as the instance's seed (``SeedServer.promote``).
"""

import itertools
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import torch

from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, TensorSpec
from vllm_ascend.model_loader.netloader.wire.addresses import format_address
from vllm_ascend.model_loader.netloader.wire.messages import Accept


class RelayStalled(Exception):
    """A relay cannot send what its own transfer has not (yet) verified."""


class RelayProgress:
    """How far (in manifest order) a relay's own fetch has verified, in tensors and in
    bytes, whether its bytes still arrive, or why it failed; what the relay's senders
    wait on. ``sizes``: each tensor's bytes, in manifest order.

    Bytes count from the first byte of tensor 0; a tensor larger than
    ``manifest.PART_BYTES`` becomes ready part by part as each part's digest matches
    (``verified_bytes``), so a relay passes a large tensor on without waiting for all
    of it; the others when they are whole (``verified``)."""

    def __init__(self, sizes: Sequence[int]):
        self._total = len(sizes)
        self._ends = list(itertools.accumulate(sizes))
        self._ready = 0
        self._ready_bytes = 0
        self._failure: str | None = None
        self._last_bytes = time.monotonic()
        self._cond = threading.Condition()

    def arrived(self, nbytes: int) -> None:
        """The fetch received ``nbytes`` more (called for every read: no lock taken)."""
        self._last_bytes = time.monotonic()

    def verified(self, count: int) -> None:
        """The first ``count`` tensors now hold bytes that matched their digests."""
        with self._cond:
            self._ready = max(self._ready, count)
            if count:
                self._ready_bytes = max(self._ready_bytes, self._ends[count - 1])
            self._last_bytes = time.monotonic()
            self._cond.notify_all()

    def verified_bytes(self, offset: int) -> None:
        """The first ``offset`` bytes now hold bytes that matched their (part) digests."""
        with self._cond:
            self._ready_bytes = max(self._ready_bytes, offset)
            self._last_bytes = time.monotonic()
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """The relay's own fetch failed: tensors not yet verified never will be, and
        the ones that were may be overwritten by the disk load."""
        with self._cond:
            self._failure = reason
            self._cond.notify_all()

    @property
    def complete(self) -> bool:
        with self._cond:
            return self._ready == self._total and self._failure is None

    @property
    def failure(self) -> str | None:
        with self._cond:
            return self._failure

    def wait_ready(
        self, offset: int, timeout_s: float, keepalive: Callable[[], None] = lambda: None
    ) -> None:
        """Block until the first ``offset`` bytes are verified, calling ``keepalive``
        about every ``timeout_s / 4`` while the fetch's bytes still arrive. Raises
        ``RelayStalled`` if the fetch failed, or no byte arrived for ``timeout_s``."""
        while True:
            with self._cond:
                if self._failure is not None:
                    raise RelayStalled(f"relay's own transfer failed: {self._failure}")
                if self._ready_bytes >= offset:
                    return
                self._cond.wait(timeout_s / 4)
                if self._failure is not None or self._ready_bytes >= offset:
                    continue
                silent = time.monotonic() - self._last_bytes
                if silent > timeout_s:
                    raise RelayStalled(
                        f"relay's own transfer made no progress for {silent:.0f} s "
                        f"({self._ready} of {self._total} tensors verified)"
                    )
            keepalive()  # outside the lock: it writes to a client


class RelayTree:
    """Where a seed sends the clients that arrive while it is sending: its relays, in
    the order their clients joined, how many clients each was sent, and under which
    relay each joined (None: the seed served it).

    A client that offers a relay joins the tree; the seed serves ``fanout`` clients
    itself and sends each further one to the first relay that has fewer than
    ``fanout``, so relays fill breadth first. With ``fanout`` 1 that is the chain's
    tail. A relay's address comes from the connection (never from what a peer names).
    At most ``MAX_RELAYS`` are kept, the oldest forgotten first: a peer that offers many
    relay ports cannot grow a seed's memory, nor keep later relays out. Not
    thread-safe: the seed calls it under its own lock."""

    MAX_RELAYS = 1024

    def __init__(self, fanout: int):
        if fanout < 1:
            raise ValueError(f"a relay tree's fan-out is at least 1, got {fanout}")
        self.fanout = fanout
        self._under: dict[str, str | None] = {}  # relay -> the relay it joined under
        self._room: dict[str, int] = {}  # relays with room -> clients sent to each

    def parent(self, client_relay: str | None = None) -> str | None:
        """The relay to send the next client to, counted as sent, never the client's
        own (``client_relay``); None if no other relay has room."""
        for relay, count in self._room.items():
            if relay == client_relay:
                continue
            if count + 1 < self.fanout:
                self._room[relay] = count + 1
            else:
                del self._room[relay]
            return relay
        return None

    def join(self, relay: str, under: str | None) -> None:
        """``relay`` (a client served by the seed, ``under`` None, or sent to the relay
        ``under``) can take clients of its own."""
        if relay in self._under:
            return
        if len(self._under) >= self.MAX_RELAYS:
            oldest = next(iter(self._under))
            del self._under[oldest]
            self._room.pop(oldest, None)
        self._under[relay] = under
        self._room[relay] = 0

    def drop(self, relay: str) -> None:
        """``relay``'s own transfer failed: neither it nor the relays that joined under
        it (their fetches came from it) can pass the model on."""
        below: dict[str | None, list[str]] = {}
        for joined, under in self._under.items():
            below.setdefault(under, []).append(joined)
        # Breadth first from ``relay``, which may itself have been forgotten (or have
        # joined again after the relays below it): order of joining proves nothing.
        gone, todo = {relay}, [relay]
        while todo:
            for joined in below.get(todo.pop(), ()):
                if joined not in gone:
                    gone.add(joined)
                    todo.append(joined)
        for joined in gone:
            self._under.pop(joined, None)
            self._room.pop(joined, None)

    def clear(self) -> None:
        """The seed is idle: the next client starts a new tree (the old relays may be
        gone)."""
        self._under.clear()
        self._room.clear()

    def __len__(self) -> int:
        """Relays kept (with room or not)."""
        return len(self._under)


class RelaySeed(Protocol):
    """What ``RelayListener`` needs of the seed it starts (``server.SeedServer``)."""

    def stop(self) -> None: ...


_Seed = TypeVar("_Seed", bound=RelaySeed)
# (weights, progress, bound listening socket, the upstream seed's accept: its layout,
# checkpoint fingerprint and processed signature) -> a started seed over them
MakeRelaySeed = Callable[[LoadedWeights, RelayProgress, socket.socket, Accept], _Seed]


class RelayListener(Generic[_Seed]):
    """A starting instance's listening socket, bound before its fetch so that its port
    can go in the hello, and the relay seed that ``begin`` starts on it."""

    def __init__(self, sock: socket.socket, make_seed: MakeRelaySeed[_Seed]):
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._make_seed = make_seed
        self.seed: _Seed | None = None
        self.progress: RelayProgress | None = None

    def begin(
        self, specs: Sequence[TensorSpec], targets: Sequence[torch.Tensor], accepted: Accept,
    ) -> RelayProgress:
        """Serve ``targets`` (views the fetch is filling) as they are verified, as the
        weights, load state, layout and checkpoint the upstream seed's proved
        ``accepted`` named: a relay serves the layout it receives, never the other."""
        weights = LoadedWeights([(s.name, t) for s, t in zip(specs, targets, strict=True)],
                                accepted.digests, accepted.state, parts=accepted.parts)
        self.progress = RelayProgress([s.nbytes for s in specs])
        self.seed = self._make_seed(weights, self.progress, self._sock, accepted)
        return self.progress

    def serving_complete(self) -> _Seed | None:
        """The relay's seed if its fetch delivered every tensor, else None."""
        if self.seed is not None and self.progress is not None and self.progress.complete:
            return self.seed
        return None

    def close(self) -> None:
        if self.progress is not None and not self.progress.complete:
            self.progress.fail("the relay closed")
        if self.seed is not None:
            self.seed.stop()
        else:
            self._sock.close()


def relay_address(sock: socket.socket, relay_port: int | None) -> str | None:
    """Where a client's relay listens: the port its hello names, on the address the
    client came from (never a host the client names, so no one can make a seed send
    other clients to a third party)."""
    if relay_port is None:
        return None
    return format_address(sock.getpeername()[0], relay_port)
