"""The shared secret reaches every worker under vLLM's Ray executors.

vLLM CPU refuses Ray ("current platform cpu does not support ray"), so this is proven
below vLLM: with vLLM's own functions that choose what its executors hand to their
workers, and in a real Ray worker process (a local Ray head on 127.0.0.1, started and
stopped here) that applies those variables as vLLM's workers do and then parses the
loader's config.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.vllm_server import free_port
from vllm_ascend.model_loader.netloader import RAY_EXTRA_VARS, carry_secret_to_ray_workers
from vllm_ascend.model_loader.netloader.wire.auth import SECRET_ENV

SECRET = "ray-test-secret-0123456789abcdef"
RAY = Path(sys.executable).with_name("ray")


def older_executor_env() -> dict[str, str]:
    """What ``RayDistributedExecutor`` (vllm/v1/executor/ray_executor.py) and the Ray
    engine-core actors hand to their workers: ``get_env_vars_to_copy``."""
    from vllm.ray.ray_env import get_env_vars_to_copy
    from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS

    names = get_env_vars_to_copy(exclude_vars=WORKER_SPECIFIC_ENV_VARS, destination="workers")
    return {n: os.environ[n] for n in names if n in os.environ}


def newer_executor_env() -> dict[str, str]:
    """What ``ray_executor_v2`` hands to its workers: the driver's whole environment."""
    from vllm.v1.executor.ray_env_utils import get_driver_env_vars
    from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS

    return get_driver_env_vars(WORKER_SPECIFIC_ENV_VARS)


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.delenv(RAY_EXTRA_VARS, raising=False)


def test_vllms_older_ray_executor_drops_the_secret_on_its_own(secret_env):
    # The reason for the fix below: vLLM copies registered names and known prefixes only.
    assert SECRET_ENV not in older_executor_env()


def test_with_netloader_registered_both_ray_executors_hand_over_the_secret(secret_env):
    from vllm_ascend.model_loader.netloader import register

    register()
    assert older_executor_env()[SECRET_ENV] == SECRET
    assert newer_executor_env()[SECRET_ENV] == SECRET


def test_an_operators_own_extra_variables_are_kept_and_nothing_is_added_twice(
    secret_env, monkeypatch
):
    monkeypatch.setenv(RAY_EXTRA_VARS, "MY_VAR, OTHER")
    carry_secret_to_ray_workers()
    carry_secret_to_ray_workers()
    assert os.environ[RAY_EXTRA_VARS] == f"MY_VAR,OTHER,{SECRET_ENV}"


def test_without_a_secret_nothing_changes(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(RAY_EXTRA_VARS, raising=False)
    carry_secret_to_ray_workers()
    assert RAY_EXTRA_VARS not in os.environ


# --- a real Ray worker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    if not RAY.exists():
        pytest.skip("ray is not installed (make setup installs it)")
    port = free_port()
    # The head, and so every worker it starts, has no secret in its environment: a worker
    # gets one only from what the driver hands it.
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, RAY_EXTRA_VARS)}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    start = [
        str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree("/tmp/ray/session_latest", ignore_errors=True)


def secret_seen_by_a_ray_worker(address: str, handed: dict[str, str], fill_only: bool) -> str:
    """sha256 of the secret that the loader's config finds in a Ray worker after it
    applied ``handed`` (overwriting, like the older executor's workers; or only filling
    in, like the newer one's), or "" if none."""
    import ray

    @ray.remote(num_cpus=0)
    def worker(env: dict[str, str], fill_only: bool) -> str:
        from vllm.utils.system_utils import update_environment_variables

        from vllm_ascend.model_loader.netloader.config import parse_config

        if fill_only:
            for key, value in env.items():
                os.environ.setdefault(key, value)
        else:
            update_environment_variables(env)
        secret = parse_config({}, os.environ).secret
        return hashlib.sha256(secret).hexdigest() if secret else ""

    ray.init(address=address, log_to_driver=False)
    try:
        return ray.get(worker.remote(handed, fill_only), timeout=120)
    finally:
        ray.shutdown()


def test_a_real_ray_worker_gets_the_secret_only_through_the_fix(ray_head, secret_env):
    want = hashlib.sha256(SECRET.encode()).hexdigest()
    assert secret_seen_by_a_ray_worker(ray_head, older_executor_env(), False) == ""
    carry_secret_to_ray_workers()
    assert secret_seen_by_a_ray_worker(ray_head, older_executor_env(), False) == want
    assert secret_seen_by_a_ray_worker(ray_head, newer_executor_env(), True) == want
