"""The one helper that runs a call under a deadline (DNS, registry, group set-up)."""

import threading
import time

import pytest

from vllm_ascend.model_loader.netloader.deadline import (
    CallTimedOut,
    Deadline,
    DeadlineExceeded,
    call_within,
)


def test_a_call_that_ends_in_time_gives_its_result_or_its_exception():
    assert call_within(lambda: 42, 5.0, "t") == 42

    def fails() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        call_within(fails, 5.0, "t")


def test_a_late_call_times_out_is_interrupted_and_its_late_result_is_discarded():
    release = threading.Event()
    interrupted = threading.Event()
    discarded: list[object] = []
    result = object()

    def slow() -> object:
        release.wait(5)
        return result

    start = time.monotonic()
    with pytest.raises(CallTimedOut):
        call_within(slow, 0.2, "slow-call", on_timeout=interrupted.set,
                    discard=discarded.append)
    assert time.monotonic() - start < 2
    assert interrupted.is_set() and discarded == []
    release.set()
    deadline = time.monotonic() + 5
    while not discarded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert discarded == [result]  # released by the helper, never handed to anyone


def test_a_deadline_counts_down_and_then_raises():
    deadline = Deadline(0.05, "the exchange")
    assert 0 < deadline.remaining() <= 0.05
    time.sleep(0.1)
    assert deadline.left_or_zero() == 0.0
    with pytest.raises(DeadlineExceeded, match="the exchange took longer than 0.05 s"):
        deadline.remaining()
