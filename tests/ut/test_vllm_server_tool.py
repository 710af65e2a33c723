"""tools.vllm_server: the helpers the tests and the demo start vLLM servers with.

free_port: ports a fixed listener can still bind when the server starts. A port from
``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range, where vLLM's
own ``get_open_port``, torch.distributed and ZeroMQ draw theirs: in CI a seed's fixed
DRAFT_LISTEN_PORT was taken that way before the seed bound it (EADDRINUSE)."""

import socket

from tools import vllm_server
from tools.vllm_server import VllmServer, free_port
from vllm_ascend.model_loader.netloader.config import DRAFT_PORT_OFFSET


def test_ports_lie_below_the_ephemeral_range_with_room_for_the_draft_offset():
    low = vllm_server._ephemeral_low()
    for _ in range(50):
        port = free_port()
        assert vllm_server._FIXED_PORT_LOW <= port
        assert port + DRAFT_PORT_OFFSET + 63 < low  # the draft default: LISTEN_PORT + offset + rank


def test_a_span_is_free_and_never_handed_out_twice():
    bases = [free_port(span=3) for _ in range(20)]
    spans = [set(range(base, base + 3)) for base in bases]
    assert len(set().union(*spans)) == 60
    for port in spans[0]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            other = probe.getsockname()[1]
        draws = iter([taken, other])

        class Draws:
            """Draws the busy port first, then one that was free."""

            def randrange(self, low: int, high: int) -> int:
                return next(draws)

        monkeypatch.setattr(vllm_server, "_ephemeral_low", lambda: 65536 + 10064 + 1)
        monkeypatch.setattr(vllm_server.random, "SystemRandom", Draws)
        assert free_port() == other


def test_a_failed_start_names_the_root_cause_logged_above_the_engine_traceback(tmp_path):
    log = tmp_path / "seed.log"
    log.write_text("\n".join([
        "(Worker pid=1) ERROR [executor.py:9] OSError: [Errno 98] Address already in use",
        "(Worker pid=1) ERROR [executor.py:9] RuntimeError: Netloader seed rank 0 "
        "cannot listen on 127.0.0.1:1 (LISTEN_PORT 1)",
        *(f'  File "engine.py", line {n}, in frame{n}' for n in range(200)),
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]))
    text = VllmServer("/model", log_path=log).failure_text(lines=5)
    cause = "RuntimeError: Netloader seed rank 0 cannot listen on 127.0.0.1:1 (LISTEN_PORT 1)"
    assert cause in text
    assert "OSError: [Errno 98] Address already in use" in text
    assert text.rstrip().endswith("Engine core initialization failed. See root cause above.")
