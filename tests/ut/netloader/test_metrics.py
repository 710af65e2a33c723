"""Netloader's metrics: counts kept per process, summed by the collector the API
server's /metrics scrapes, and what a real seed and client count."""

import json
import multiprocessing as mp
import os
import threading

import pytest

from tests.helpers.toy import IDENTITY, count_metrics, fetch_for, make_toy, scrape, serving
from vllm_ascend.model_loader.netloader.metrics import (
    CLIENT,
    METRICS_DIR_ENV,
    OK,
    SEED,
    ProcessMetrics,
)


def _worker(folder: str, seconds: float, hold: bool, ready, release) -> None:
    os.environ[METRICS_DIR_ENV] = folder
    m = ProcessMetrics()
    m.ended(SEED, OK, 1000, seconds)
    m.refusal("identity")
    m.started(SEED)
    if not hold:
        m.stopped(SEED)
    ready.set()
    release.wait(30)


def test_processes_counts_are_summed_and_only_live_ones_are_active(tmp_path):
    ctx = mp.get_context("spawn")
    release = ctx.Event()
    readies = [ctx.Event(), ctx.Event()]
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path), s, True, r, release))
        for s, r in zip((0.2, 7.0), readies, strict=True)
    ]
    for p in procs:
        p.start()
    try:
        for r in readies:
            assert r.wait(60)
        live = scrape(tmp_path)
        assert live[("netloader_transfers_total", (("result", "ok"), ("role", "seed")))] == 2
        assert live[("netloader_transfer_bytes_total", (("role", "seed"),))] == 2000
        assert live[("netloader_refusals_total", (("reason", "identity"),))] == 2
        assert live[("netloader_active_transfers", (("role", "seed"),))] == 2
        bucket = ("netloader_transfer_duration_seconds_bucket", (("le", "0.25"), ("role", "seed")))
        assert live[bucket] == 1
        assert live[("netloader_transfer_duration_seconds_count", (("role", "seed"),))] == 2
        assert live[("netloader_transfer_duration_seconds_sum", (("role", "seed"),))] == 7.2
    finally:
        release.set()
        for p in procs:
            p.join(30)
    # Dead processes' transfers still count; their "active" ones are not running.
    after = scrape(tmp_path)
    assert after[("netloader_transfers_total", (("result", "ok"), ("role", "seed")))] == 2
    assert after[("netloader_active_transfers", (("role", "seed"),))] == 0


def test_files_that_are_not_ours_are_skipped_and_never_break_the_scrape(tmp_path):
    """A folder shared by mistake or written by someone else: every odd file is skipped,
    the good one still counts, and the scrape neither raises (vLLM's own metrics share
    the registry) nor blocks (a FIFO) nor reads without end (a link to /dev/zero)."""
    good = ProcessMetrics()
    os.environ[METRICS_DIR_ENV] = str(tmp_path)
    try:
        good.relay_hop()
    finally:
        del os.environ[METRICS_DIR_ENV]
    for i, text in enumerate([
        "{not json", "[" * 5000, '{"bytes": {"seed": "many"}, "pid": 1}',
        '{"relay_hops": "x", "pid": 1}', '{"pid": 1180591620717411303424}',
        '{"pid": 1, "transfers": [["seed", "ok"]]}', '{"pid": 1, "buckets": []}',
        '{"pid": 1, "buckets": {"seed": [1]}}', '{"pid": 1, "fallbacks": {"x": -5}}',
    ]):
        (tmp_path / f"odd{i}.json").write_text(text)
    (tmp_path / "big.json").write_bytes(b" " * (2 << 20))
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    samples = scrape(tmp_path)
    assert samples[("netloader_relay_hops_total", ())] == 1
    assert samples[("netloader_active_transfers", (("role", "seed"),))] == 0


def _end_many(m: ProcessMetrics, n: int) -> None:
    threads = [threading.Thread(target=m.ended, args=(SEED, OK, 1, 0.1)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_the_last_write_holds_every_count(tmp_path, monkeypatch):
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    for trial in range(100):
        m = ProcessMetrics()
        _end_many(m, 8)
        on_disk = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
        assert on_disk["transfers"] == [["seed", "ok", 8]], trial


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """This process's counts go to a fresh folder and start from zero."""
    count_metrics(tmp_path, monkeypatch)
    return tmp_path


def test_a_seed_counts_what_it_sent_and_whom_it_refused(counted):
    with serving(seed=4) as seed:
        model = make_toy(None)
        assert fetch_for(model).run([seed.address]) is not None
        other = {**IDENTITY, "model": "someone-else"}
        assert fetch_for(make_toy(None), identity=other).run([seed.address]) is None
        nbytes = seed.weights.total_bytes
    seen = scrape(counted)
    assert seen[("netloader_transfers_total", (("result", "ok"), ("role", "seed")))] == 1
    assert seen[("netloader_transfer_bytes_total", (("role", "seed"),))] == nbytes
    assert seen[("netloader_refusals_total", (("reason", "identity"),))] == 1
    assert seen[("netloader_active_transfers", (("role", "seed"),))] == 0
    assert ("netloader_transfers_total", (("result", "ok"), ("role", CLIENT))) not in seen
