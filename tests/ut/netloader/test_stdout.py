"""Group setup must not lose the process's stdout (vLLM's suppress_stdout is not
thread-safe; a seed sets up one group per concurrent client)."""

import os
import threading

from vllm.utils.system_utils import suppress_stdout

from vllm_ascend.model_loader.netloader.transport import _stdout_kept


def overlapping_suppressions(keep: bool) -> tuple[int, int]:
    """A enters, B enters (and saves A's /dev/null as "stdout"), A leaves, B leaves."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def guarded(body):
        if keep:
            with _stdout_kept():
                body()
        else:
            body()

    def a() -> None:
        with suppress_stdout():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with suppress_stdout():
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=guarded, args=(f,)) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    st = os.fstat(1)
    return st.st_dev, st.st_ino


def test_overlapping_group_setups_keep_stdout():
    before = os.fstat(1)
    assert overlapping_suppressions(keep=True) == (before.st_dev, before.st_ino)


def test_the_hazard_is_real_without_the_guard():
    before = os.fstat(1)
    saved = os.dup(1)
    try:
        lost = overlapping_suppressions(keep=False)
        assert lost != (before.st_dev, before.st_ino)
        assert lost == (os.stat(os.devnull).st_dev, os.stat(os.devnull).st_ino)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
