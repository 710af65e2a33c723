"""Netloader: load a vLLM model's weights from a running instance of the same model.

This module only registers the load format; vLLM calls ``register`` through the
``vllm.general_plugins`` entry point in every process, possibly several times.
"""

import os

_REGISTERED = False
# vLLM's Ray executor (and its Ray engine-core actors) copy to their workers only the
# variables vLLM registers, those with known prefixes (VLLM_, NCCL_, HF_...) and the
# names listed here (vllm/ray/ray_env.py ``get_env_vars_to_copy``).
RAY_EXTRA_VARS = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"


def register() -> None:
    """Register ``--load-format netloader``. Idempotent and cheap."""
    global _REGISTERED
    carry_secret_to_ray_workers()
    if _REGISTERED:
        return
    from vllm_ascend.model_loader.netloader.metrics import install

    install()
    from vllm.model_executor.model_loader import register_model_loader

    from vllm_ascend.model_loader.netloader.loader import NetloaderModelLoader

    register_model_loader("netloader")(NetloaderModelLoader)
    _REGISTERED = True


def carry_secret_to_ray_workers() -> None:
    """If ``$NETLOADER_SECRET`` is set, add its *name* to ``$VLLM_RAY_EXTRA_ENV_VARS_TO_COPY``
    so that vLLM's Ray executors hand it to every worker, as the multiprocessing
    executor does by inheritance. vLLM loads plugins in the driver and in the engine
    core before it builds an executor, so this runs before the variables are copied."""
    from vllm_ascend.model_loader.netloader.wire.auth import SECRET_ENV

    if SECRET_ENV not in os.environ:
        return
    names = [n.strip() for n in os.environ.get(RAY_EXTRA_VARS, "").split(",") if n.strip()]
    if SECRET_ENV not in names:
        os.environ[RAY_EXTRA_VARS] = ",".join([*names, SECRET_ENV])
