"""Netloader: load a vLLM model's weights from a running instance of the same model.

This module only registers the load format; vLLM calls ``register`` through the
``vllm.general_plugins`` entry point in every process, possibly several times.
"""

_REGISTERED = False


def register() -> None:
    """Register ``--load-format netloader``. Idempotent and cheap."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from vllm_ascend.model_loader.netloader.loader import NetloaderModelLoader

    register_model_loader("netloader")(NetloaderModelLoader)
    _REGISTERED = True
