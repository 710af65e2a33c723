"""vLLM 0.32 on CPU cannot load any AOT compile artifact: the one class Netloader patches.

vLLM leaves no other way: the artifact is loaded by vLLM's own
``_try_load_aot_compiled_fn`` (vllm/compilation/decorators.py:315) on the worker, after
``load_model``; the first point where Netloader runs in that worker and knows its
configuration (COMPILE_CACHE) is the loader's construction, which calls
``allow_cpu_aot_load`` once per process.
"""

import threading
from typing import Any

from vllm_ascend.model_loader.netloader.log import get_logger

logger = get_logger(__name__)

_shim_lock = threading.Lock()


def allow_cpu_aot_load() -> bool:
    """Make vLLM 0.32's AOT artifact loadable on CPU; True if this call changed anything.

    ``_try_load_aot_compiled_fn`` (vllm/compilation/decorators.py:315) calls
    ``finalize_loading(vllm_config)`` on the loaded function's ``compiled_fn``. On CPU
    (platforms/cpu.py:356-377: dynamo traces once, backend "inductor", no
    ``VllmBackend``) that object is torch's ``BundledAOTAutogradSerializableCallable``,
    which has no such method: every load fails ("Compiling model again due to a load
    failure") and the instance compiles again. ``finalize_loading`` only rebuilds a
    ``VllmBackend`` (compilation/caching.py:382), which CPU never uses, so a no-op is
    its exact CPU behaviour. Added to the torch class only while it lacks the method;
    upstream vLLM (PR #32037) turned AOT compile off on CPU instead."""
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled

    with _shim_lock:
        if hasattr(Bundled, "finalize_loading"):
            return False
        Bundled.finalize_loading = _no_finalize  # type: ignore[attr-defined]
    logger.info(
        "Netloader: vLLM's AOT compile artifacts are loadable on CPU from here on "
        "(a no-op finalize_loading for torch's BundledAOTAutogradSerializableCallable; "
        "vLLM 0.32 decorators.py:315)"
    )
    return True


def _no_finalize(self: Any, vllm_config: Any) -> None:
    """Nothing to finalize: no VllmBackend on CPU (see ``allow_cpu_aot_load``)."""
