"""What bounds a transfer in time, on either data plane. No torch.

"No progress" is the bulk data's timeout: a transfer fails once ``timeout_s``
passes without ``PROGRESS_BYTES`` moving (or the rest of the transfer, if less is
left). A slow link with a huge tensor keeps going; a peer that drips is cut off. And
every transfer has a wall-clock deadline, ``transfer_deadline_s``: ``timeout_s`` plus
its size at the minimum average rate (MIN_RATE_MB_PER_S), so a peer that moves just
enough to count as progress still cannot hold a transfer (or a seed's slot) for long.
A sender's rate is capped by its ``Pacer`` (SEND_LIMIT_MB_PER_S).
"""

import time

PROGRESS_BYTES = 1 << 20
DEFAULT_MIN_RATE_BYTES_PER_S = 1e6


class TransferError(Exception):
    """The bulk transfer failed, stalled, or delivered bytes that do not match their digest."""


class Pacer:
    """Keeps a sender at or below ``bytes_per_s`` on average (None: no cap); callers
    report each chunk sent, and ``sent`` sleeps as long as the sender is ahead."""

    def __init__(self, bytes_per_s: float | None):
        self.rate = bytes_per_s
        self._start = time.monotonic()
        self._sent = 0

    def sent(self, nbytes: int) -> float:
        """Account for ``nbytes`` sent; returns the seconds slept to keep the rate."""
        self._sent += nbytes
        if self.rate is None:
            return 0.0
        pause = max(0.0, self._start + self._sent / self.rate - time.monotonic())
        time.sleep(pause)
        return pause


def transfer_deadline_s(total_bytes: int, timeout_s: float, min_rate_bytes_per_s: float) -> float:
    """The wall-clock bound of a transfer of ``total_bytes``: ``timeout_s`` plus the
    time it takes at the minimum average rate."""
    return timeout_s + total_bytes / min_rate_bytes_per_s


class Progress:
    """The "no progress for ``timeout_s``" rule for one direction of one transfer, and
    its wall-clock deadline (``deadline_s`` from now; None: none).

    Only time spent blocked on the peer counts (``waited``: inside a socket call),
    never time this side spends on itself (a paced sender's sleeps, a relay waiting
    for its own fetch, a receiver verifying). Each ``timeout_s`` of such waiting must
    move ``PROGRESS_BYTES``, or everything still left. ``alive`` starts afresh when the
    peer says it waits on a transfer of its own that still moves (a keepalive)."""

    def __init__(
        self, timeout_s: float, total_bytes: int, what: str, deadline_s: float | None = None
    ):
        self.timeout_s = timeout_s
        self._left = total_bytes
        self._what = what
        self._deadline_s = deadline_s
        self._end = None if deadline_s is None else time.monotonic() + deadline_s
        self.alive()

    def alive(self) -> None:
        self._waited = 0.0
        self._needed = min(PROGRESS_BYTES, self._left)

    def time_left(self) -> float:
        """How long the next socket call may block (> 0). Raises ``TransferError`` past
        the deadline, or once a window of waiting moved too little (else it opens the
        next one)."""
        if self._end is not None and time.monotonic() >= self._end:
            raise TransferError(
                f"{self._what}: not done within {self._deadline_s:.0f} s (TIMEOUT plus the "
                f"size at MIN_RATE_MB_PER_S; {self._left} bytes still to move)"
            )
        if self._waited >= self.timeout_s:
            if self._needed > 0:
                raise TransferError(
                    f"{self._what}: no progress for {self.timeout_s:g} s "
                    f"({self._left} bytes still to move)"
                )
            self.alive()
        left = self.timeout_s - self._waited
        if self._end is not None:
            left = min(left, self._end - time.monotonic())
        return max(left, 1e-3)

    def waited(self, seconds: float) -> None:
        self._waited += seconds

    def moved(self, nbytes: int) -> None:
        self._left -= nbytes
        self._needed -= nbytes
