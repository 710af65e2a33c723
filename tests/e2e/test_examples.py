"""The user guide's commands, run the way the tutorial tells users to run them.

docs/source/user_guide/feature_guide/netloader.md walks through examples/netloader/
seed.sh and client.sh, the query CLI, a curl completion and scale_out.py. These tests
run the same command lines from the repository root, with the virtual environment on
PATH (as after ``source .venv/bin/activate``), free ports in place of 8000/8001 and
TMPDIR in the test's directory (where the scripts' address files go by default).
They check what the tutorial promises: the client's weights came from the seed (its
own ``info`` answer says so) and its greedy outputs equal the seed's.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.e2e import REPO
from tools.vllm_server import free_port

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, in a data center far away,"
CURL = (
    "curl -s http://127.0.0.1:{port}/v1/completions -H 'Content-Type: application/json' "
    "-d '{{\"model\": \"{model}\", \"prompt\": \"{prompt}\", \"max_tokens\": 16, "
    "\"temperature\": 0}}'"
)
LISTENING = re.compile(r"^netloader: rank 0 seed listening on (\S+)$", re.M)


def shell_env(**extra: str) -> dict[str, str]:
    """The caller's environment with the virtual environment first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "NETLOADER_SECRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def sh(command: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


class ScriptRun:
    """A long-running tutorial command in its own process group, stopped as a whole."""

    def __init__(self, command: str, env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", command], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 300) -> str:
        """The rank-0 seed address the script printed once the server was healthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "netloader: serving" in text:
                found = LISTENING.search(text)
                assert found, text[-3000:]
                return found.group(1)
            assert self.proc.poll() is None, f"script exited early:\n{text[-3000:]}"
            time.sleep(1)
        raise AssertionError(f"not ready after {timeout:.0f} s:\n{text[-3000:]}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)


def completion(port: int, model: str) -> str:
    done = sh(CURL.format(port=port, model=model, prompt=PROMPT), shell_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["choices"][0]["text"]


def test_seed_and_client_scripts_with_failover_and_secret(model, tmp_path):
    """seed.sh with SECRET_FILE; client.sh with $NETLOADER_SECRET and two addresses, the
    first of which is dead; then the query CLI (both forms) and curl on both."""
    secret_file = tmp_path / "netloader.secret"
    made = sh(f"openssl rand -hex 32 > {secret_file} && chmod 600 {secret_file}", shell_env())
    assert made.returncode == 0, made.stderr
    seed_port, client_port, dead_port = free_port(), free_port(), free_port()
    seed = ScriptRun(
        f"SECRET_FILE={secret_file} examples/netloader/seed.sh {model}",
        shell_env(PORT=str(seed_port), TMPDIR=str(tmp_path)), tmp_path / "seed.out",
    )
    client = None
    try:
        seed_address = seed.wait_ready()
        client = ScriptRun(
            f"NETLOADER_SECRET=$(cat {secret_file}) examples/netloader/client.sh "
            f"127.0.0.1:{dead_port},{seed_address} {model}",
            shell_env(PORT=str(client_port), TMPDIR=str(tmp_path)), tmp_path / "client.out",
        )
        client_address = client.wait_ready()

        query = sh(f"NETLOADER_SECRET=$(cat {secret_file}) "
                   f"python -m vllm_ascend.model_loader.netloader.query {client_address}",
                   shell_env())
        assert query.returncode == 0, query.stdout + query.stderr
        info = json.loads(query.stdout)
        assert info["loaded_from"] == f"seed {seed_address}"
        assert [r.split()[0] for r in info["fallback_reasons"]] == [f"127.0.0.1:{dead_port}"]
        query = sh(f"netloader-query --secret-file {secret_file} {seed_address}", shell_env())
        assert query.returncode == 0, query.stdout + query.stderr
        seed_info = json.loads(query.stdout)
        assert seed_info["loaded_from"] == "disk" and seed_info["completed_transfers"] == 1
        assert seed_info["value_fingerprint"] == info["value_fingerprint"]
        assert sh(f"netloader-query {seed_address}", shell_env()).returncode == 1

        seed_text = completion(seed_port, model)
        assert seed_text and completion(client_port, model) == seed_text
    finally:
        if client is not None:
            client.stop()
        seed.stop()
    assert secret_file.read_text().strip() not in (tmp_path / "seed.out").read_text()


def test_scale_out_script(model, tmp_path):
    """scale_out.py with two clients: each from the seed or through the other's relay,
    the model sent once per client, outputs identical."""
    workdir = tmp_path / "scale-out"
    proc = subprocess.Popen(
        ["bash", "-c", f"python -m examples.netloader.scale_out --model {model} --clients 2 "
                       f"--workdir {workdir}"],
        cwd=REPO, env=shell_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()  # scale_out stops its servers on SIGTERM
            proc.wait(60)
        _kill_servers_mentioning(str(workdir))
    assert proc.returncode == 0, out[-5000:]
    summary = json.loads(out.strip().splitlines()[-1])
    seed = summary["seed"]
    clients = summary["clients"]
    assert seed["loaded_from"] == "disk" and len(clients) == 2
    assert seed["completed_transfers"] + sum(c["completed_transfers"] for c in clients) == 2
    for client in clients:
        others = [seed["address"], *(c["address"] for c in clients if c is not client)]
        assert client["loaded_from"] in [f"seed {a}" for a in others]
        assert client["identical_outputs"] and client["same_fingerprint"]
        assert client["load_s"] > 0


def _kill_servers_mentioning(marker: str) -> None:
    """Last resort if scale_out.py could not stop its servers: kill the process group
    of every process whose command line mentions ``marker``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                group = os.getpgid(int(cmdline.parent.name))
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
        except OSError:
            continue
