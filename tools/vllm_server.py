"""Start and drive real vLLM OpenAI-compatible servers on 127.0.0.1 (CPU build).

Used by the demo script and the end-to-end tests::

    with VllmServer("/tmp/tiny-qwen", cpu_bind="0") as server:
        print(server.complete(["Hello, my name is"]))
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

# Environment every CPU server needs on this machine (overridable through ``env``).
BASE_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; must be an integer
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}


# "SomeError: text" as Python prints an exception's last line (after any log prefix).
_EXCEPTION_LINE = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception): .*$")

# Ports this process has handed out; a second caller gets another one.
_GIVEN_PORTS: set[int] = set()
# Lowest fixed port to hand out (Ray's default worker ports are 10002-19999), and the room
# kept below the kernel's ephemeral range for ports derived from one (the draft listener
# defaults to LISTEN_PORT + 10000 + rank).
_FIXED_PORT_LOW = 20000
_DERIVED_PORT_ROOM = 10000 + 64


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (Linux ``ip_local_port_range``)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # the Linux default


def free_port(span: int = 1) -> int:
    """Return a TCP port P on 127.0.0.1 such that P .. P + span - 1 were free a moment ago.

    The port is drawn below the kernel's ephemeral range (and low enough that
    ``P + 10000 + rank`` stays below it too), so no process that asks the kernel for a
    port (vLLM's ``get_open_port``, torch.distributed, ZeroMQ) can be given it between
    this probe and the server's own bind: a port from ``bind(0)`` could, and a seed's
    fixed listener then failed with EADDRINUSE (seen in CI). Falls back to ``bind(0)``
    where the range below the ephemeral ports is too small.

    Raises:
        RuntimeError: when no free span turns up in 200 draws.
    """
    high = _ephemeral_low() - _DERIVED_PORT_ROOM - span
    rng = random.SystemRandom()
    for _ in range(200):
        if high > _FIXED_PORT_LOW:
            base = rng.randrange(_FIXED_PORT_LOW, high)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                base = int(s.getsockname()[1])
        ports = range(base, base + span)
        if any(port in _GIVEN_PORTS or not _bindable(port) for port in ports):
            continue
        _GIVEN_PORTS.update(ports)
        return base
    raise RuntimeError(f"no {span} consecutive free TCP port(s) on 127.0.0.1")


def _bindable(port: int) -> bool:
    """True when a listening socket could bind ``127.0.0.1:port`` just now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process (and its engine children)."""

    def __init__(
        self,
        model: str,
        port: int | None = None,
        *,
        load_format: str = "auto",
        extra_config: Mapping[str, object] | None = None,
        cpu_bind: str = "0",
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        served_model_name: str | None = None,
        max_model_len: int = 512,
        enforce_eager: bool = True,
    ) -> None:
        self.model = model
        self.port = port if port is not None else free_port()
        self.load_format = load_format
        self.extra_config = dict(extra_config) if extra_config is not None else None
        self.cpu_bind = cpu_bind
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path is not None else None
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--load-format", self.load_format,
            "--max-model-len", str(self.max_model_len),
        ]
        if self.extra_config is not None:
            cmd += ["--model-loader-extra-config", json.dumps(self.extra_config)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + self.extra_args

    def start(self) -> Self:
        if self.proc is not None:
            raise RuntimeError("server already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, **BASE_ENV, "VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind, **self.env}
        # Each instance counts its own transfers: a folder this process was given (the
        # plugin loaded here) would be shared by every server started from it.
        env.pop("NETLOADER_METRICS_DIR", None)
        cmd = self.command()
        logger.info("starting vLLM on port %d (cpus %s, log %s): %s",
                    self.port, self.cpu_bind, self.log_path, " ".join(cmd))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._started_at = time.monotonic()
        return self

    def health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 180) -> None:
        if self.proc is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server on port {self.port} exited with code "
                                   f"{self.proc.returncode}:\n{self.failure_text()}")
            if self.health_ok():
                self.startup_seconds = time.monotonic() - self._started_at
                logger.info("vLLM on port %d healthy after %.1f s", self.port, self.startup_seconds)
                return
            time.sleep(0.5)
        raise RuntimeError(f"vLLM server on port {self.port} not healthy after {timeout:.0f} s:\n"
                           f"{self.failure_text()}")

    def complete(self, prompts: list[str], max_tokens: int = 32, timeout: float = 120) -> list[str]:
        """Greedy completions, one text per prompt, in prompt order.

        One request per prompt, one after another: how vLLM batches prompts that arrive
        together depends on timing, and on a random-weight model the batch can change
        the greedy text, so two servers are only comparable prompt by prompt."""
        return [self.completion(p, max_tokens, timeout)["text"] for p in prompts]

    def completion(
        self, prompt: str, max_tokens: int = 32, timeout: float = 120, logprobs: int | None = None
    ) -> dict:
        """The one choice of a temperature-0 ``/v1/completions`` request for ``prompt``
        (with ``logprobs`` per token if given)."""
        request = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "seed": 0}
        if logprobs is not None:
            request["logprobs"] = logprobs
        req = urllib.request.Request(f"{self.url}/v1/completions",
                                     data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.load(resp)["choices"][0]
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"completion failed: HTTP {e.code}: {detail}") from e

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def failure_text(self, causes: int = 8, lines: int = 40) -> str:
        """What a failed start printed: the distinct exception lines first, then the tail.

        A worker's root cause is logged well above the engine's own traceback, which
        fills the tail alone; CI shows only the end of pytest's report."""
        seen: dict[str, None] = {}
        for line in self.log_text().splitlines():
            found = _EXCEPTION_LINE.search(line)
            if found:
                seen.setdefault(found.group(0).strip(), None)
        found_causes = list(seen)[-causes:]
        listed = "\n".join(found_causes)
        return (f"exceptions logged (last {len(found_causes)}):\n{listed}\n"
                f"log tail:\n{self.log_tail(lines)}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``timeout``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            logger.info("stopping vLLM on port %d (pid %d)", self.port, proc.pid)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break  # the whole group is gone
            if _wait_group_gone(proc, wait):
                break
        else:
            logger.warning("vLLM process group %d did not exit", proc.pid)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _wait_group_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until the leader is reaped and no process is left in its group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
