"""Shared pieces of the end-to-end tests: real vLLM servers and in-process instances."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from tools.vllm_server import VllmServer
from vllm_ascend.model_loader.netloader.wire.auth import new_nonce

PROMPTS = [
    "The quickest way to start a new server is",
    "Once upon a time, in a data center far away,",
    "1, 2, 3, 4,",
]
REPO = Path(__file__).resolve().parents[2]
# A repeated prompt would hit the prefix cache and take another numeric path; without
# it, every request is computed the same way and logprobs can be compared exactly.
SERVER_ARGS = ["--no-enable-prefix-caching"]


def greedy(server: VllmServer, prompts: list[str] = PROMPTS) -> list[tuple[str, list[float]]]:
    """Text and per-token logprobs of a temperature-0 completion per prompt.

    One request per prompt, one after another: how vLLM batches prompts that arrive
    together depends on timing, and the batch can change the numerics."""
    choices = [server.completion(prompt, max_tokens=24, logprobs=1) for prompt in prompts]
    return [(c["text"], c["logprobs"]["token_logprobs"]) for c in choices]


def start_all(*servers: VllmServer) -> None:
    """Start servers together (one per core) and wait until all are healthy."""
    for s in servers:
        s.start()
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.wait_healthy(240), servers))


def address_of(prefix: Path | str, rank: int = 0, timeout_s: float = 60.0) -> str:
    """The ``ip:port`` that rank ``rank``'s seed wrote to ``{OUTPUT_PREFIX}{rank}.txt``,
    once a seed on this host is done preparing (a disk-loaded seed hashes its large
    tensors after start-up; its ``info`` has no value fingerprint until then). A seed
    this host cannot ask (another namespace, a secret) is returned as it is."""
    address = Path(f"{prefix}{rank}.txt").read_text().strip()
    if not address.startswith(("127.0.0.1:", "[::1]:")):
        return address
    from vllm_ascend.model_loader.netloader.client import query_seed

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if "preparing" not in query_seed(address, timeout_s=5.0):
                break
        except Exception:  # noqa: BLE001 - a seed that cannot be asked is the test's to judge
            break
        time.sleep(0.2)
    return address


def netloader_server(
    model: str, workdir: Path, name: str, cpu: str, sources: list[str] | None = None,
    keys: dict | None = None, env: dict[str, str] | None = None,
) -> VllmServer:
    """A netloader server writing its address to ``{workdir}/{name}-0.txt``; ``keys``
    adds extra-config keys."""
    extra: dict = {"OUTPUT_PREFIX": f"{workdir}/{name}-", **(keys or {})}
    if sources is not None:
        extra["SOURCE"] = [{"device_id": 0, "sources": sources}]
    return VllmServer(
        model, load_format="netloader", cpu_bind=cpu, extra_config=extra,
        log_path=workdir / f"{name}.log", extra_args=SERVER_ARGS, env=env,
    )


def dump_command(model: str, out: Path, load_format: str, extra: dict, *more: str) -> list[str]:
    """The command line of an in-process instance (tests/helpers/dump_instance.py)."""
    return [sys.executable, "-m", "tests.helpers.dump_instance",
            *dump_args(model, out, load_format, extra, *more)]


def dump_args(model: str, out: Path, load_format: str, extra: dict, *more: str) -> list[str]:
    """dump_instance's arguments (also what a ``--then-file`` holds)."""
    return [model, str(out), "--load-format", load_format, "--extra", json.dumps(extra), *more]


DUMP_ENV = {
    "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1",
}


def dump(
    model: str, out: Path, load_format: str, extra: dict, *more: str,
    env: dict[str, str] | None = None,
) -> tuple[dict, dict]:
    """Runtime tensors of an in-process instance, and its report (tensor count, seeds);
    ``env`` overrides DUMP_ENV."""
    done = subprocess.run(
        dump_command(model, out, load_format, extra, *more), cwd=REPO,
        env={**os.environ, **DUMP_ENV, **(env or {})}, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = [line for line in done.stdout.splitlines() if line.startswith("DUMP ")][-1]
    return load_file(str(out)), json.loads(report.removeprefix("DUMP "))


def assert_equal_tensors(tensors: dict, expected: dict) -> None:
    """Two dumps hold the same runtime tensors, bit for bit (buffers included)."""
    assert tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name


def seed_hello(address: str, **fields: object) -> dict:
    """A hello that matches the seed at ``address`` exactly (what a peer without the
    secret learns from an open seed's ``info`` and ``manifest``), with ``fields``
    replaced."""
    from vllm_ascend.model_loader.netloader.client import ask_once, query_seed
    from vllm_ascend.model_loader.netloader.manifest import TensorSpec, manifest_sha256
    from vllm_ascend.model_loader.netloader.wire.messages import (
        TCP,
        ManifestSummary,
        hello,
        manifest_request,
    )

    entries = ask_once(address, manifest_request(), None, 30, 1 << 24)["tensors"]
    specs = [TensorSpec.from_wire(e) for e in entries]
    summary = ManifestSummary(len(specs), sum(s.nbytes for s in specs), manifest_sha256(specs))
    body = hello(query_seed(address)["identity"], summary, None, False, (TCP,))
    return {**body, "nonce": new_nonce(), **fields}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json",
                   ".bin.index.json")


def weightless_copy(model: str, out: Path) -> str:
    """``model``'s directory without its weight files: a node that has the config and
    tokenizer but must get the weights from a seed."""
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            (out / f.name).write_bytes(f.read_bytes())
    return str(out)


class ServingDump:
    """An in-process instance (tests/helpers/dump_instance.py) started in the background
    that dumps its tensors and report and then, with ``serve``, serves as a seed until
    ``stop``; its output goes to ``{out}.log``."""

    def __init__(self, model: str, out: Path, extra: dict, *more: str,
                 env: dict[str, str] | None = None, load_format: str = "netloader",
                 serve: bool = True):
        self.out = out
        self.log = Path(f"{out}.log")
        command = dump_command(model, out, load_format, extra, *more,
                               *(["--serve"] if serve else []))
        with open(self.log, "w") as log:
            self._proc = subprocess.Popen(
                command, cwd=REPO, env={**os.environ, **DUMP_ENV, **(env or {})},
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
            )

    def report(
        self, timeout_s: float = 300, index: int = 0, out: Path | None = None
    ) -> tuple[dict, dict]:
        """Its tensors and report, once it printed them (it goes on serving); with
        ``--then-file``, ``index`` 1 and ``out`` name the second instance's."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            exited = self._proc.poll() is not None
            lines = [x for x in self.log.read_text().splitlines() if x.startswith("DUMP ")]
            if len(lines) > index:
                report = json.loads(lines[index].removeprefix("DUMP "))
                return load_file(str(out or self.out)), report
            assert not exited, self.log.read_text()[-6000:]
            time.sleep(0.5)
        raise AssertionError(f"no report within {timeout_s} s: {self.log.read_text()[-3000:]}")

    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
