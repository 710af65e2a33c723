"""What this instance's compile cache is called, where it lies, and the caps on it.

A client computes its own cache names (vLLM's recipe, one per KV cache layout it may
resolve to) and its host signature; a seed serves only what lies under those names.
"""

import functools
import hashlib
import json
import os
import platform
import subprocess
from typing import Any

from torch import nn

from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.wire.messages import MAX_CACHE_NAMES, CacheRequest

logger = get_logger(__name__)

# Where vLLM keeps AOT compile artifacts, under VLLM_CACHE_ROOT (decorators.py:568).
AOT_SUBDIR = ("torch_compile_cache", "torch_aot_compile")
INDUCTOR_DIR = "inductor_cache"
# The bundled artifact vLLM writes last, atomically: a cache without it is incomplete.
ARTIFACT = "model"
MAX_FILES = 4096
MAX_TOTAL_BYTES = 1 << 30
# Files are read, hashed and sent in pieces of this size.
CHUNK_BYTES = 4 << 20


class NoCache(Exception):
    """This instance asks for no compile cache, or the seed has none for it (not a fault)."""


class CacheRejected(Exception):
    """What the seed sent cannot be installed: too large, a digest mismatch, a listing
    this side cannot use."""


def aot_cache_dir(cache_root: str | None = None) -> str:
    """``<cache_root>/torch_compile_cache/torch_aot_compile`` (default root: vLLM's
    ``VLLM_CACHE_ROOT`` of this process)."""
    if cache_root is None:
        from vllm import envs

        cache_root = envs.VLLM_CACHE_ROOT
    return os.path.join(cache_root, *AOT_SUBDIR)


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules vLLM will compile (``@support_torch_compile`` classes whose
    ``do_not_compile`` is False: decorators.py:398-405), outermost first."""
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    return [
        m for m in model.modules()
        if isinstance(m, TorchCompileWithNoGuardsWrapper) and not getattr(m, "do_not_compile", True)
    ]


def module_hashes(module: nn.Module) -> list[str]:
    """The cache names (64-hex ``H``) vLLM will use for ``module``, one per KV cache
    layout it may still resolve to.

    The recipe is vLLM's own (decorators.py:563-567): sha256 of ``str`` of
    ``aot_compile_hash_factors(vllm_config)`` plus ``_model_hash_key(module.forward)``.
    ``vllm_config.compute_hash()`` includes ``cache_config.kv_cache_layout``, which is
    None at load time and resolved by the engine core before warm-up (vLLM
    v1/attention/backends/utils.py:247); it is set here to each ``KVCacheLayout`` in
    turn and put back to None afterwards (``record_kv_cache_layout`` raises if a
    different value is left)."""
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key
    from vllm.v1.kv_cache_layout import KVCacheLayout

    config: Any = module.vllm_config
    cache_config = config.cache_config
    current = cache_config.kv_cache_layout
    layouts = [current] if current is not None else [layout.name for layout in KVCacheLayout]
    hashes: list[str] = []
    try:
        for layout in layouts:
            # A plain attribute write: vLLM's config dataclasses may validate assignments.
            object.__setattr__(cache_config, "kv_cache_layout", layout)
            factors = aot_compile_hash_factors(config)
            factors.append(_model_hash_key(module.forward))
            name = hashlib.sha256(str(factors).encode()).hexdigest()
            if name not in hashes:
                hashes.append(name)
    finally:
        object.__setattr__(cache_config, "kv_cache_layout", current)
    return hashes


def cache_request(model: nn.Module) -> CacheRequest:
    """The names of ``model``'s compile cache on this instance (every compiled module,
    every layout it may resolve to), its rank directory and this host's signature.
    Raises ``NoCache`` when vLLM will not use a compile cache here."""
    from vllm import envs

    if not envs.VLLM_USE_AOT_COMPILE:
        raise NoCache("VLLM_USE_AOT_COMPILE is off: vLLM keeps no AOT compile cache")
    if envs.VLLM_DISABLE_COMPILE_CACHE:
        raise NoCache("VLLM_DISABLE_COMPILE_CACHE is set")
    modules = compiled_modules(model)
    if not modules:
        raise NoCache("nothing is compiled (--enforce-eager, or compilation off)")
    hashes: list[str] = []
    for module in modules:
        hashes.extend(h for h in module_hashes(module) if h not in hashes)
    if len(hashes) > MAX_CACHE_NAMES:
        logger.warning(
            "Netloader compile cache: %d names for %d compiled modules; asking for the "
            "first %d", len(hashes), len(modules), MAX_CACHE_NAMES,
        )
        hashes = hashes[:MAX_CACHE_NAMES]
    config: Any = modules[0].vllm_config
    parallel = config.parallel_config
    rank_dir = f"rank_{parallel.rank}_{parallel.data_parallel_index}"
    return CacheRequest(tuple(hashes), rank_dir, host_signature())


@functools.lru_cache(maxsize=1)
def host_signature() -> str:
    """sha256 of ``host_facts()``: a compile cache is only used on a host with the same."""
    facts = json.dumps(host_facts(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(facts.encode()).hexdigest()


def host_facts() -> dict[str, str]:
    """What decides whether this host can run code compiled on another one: the CPU
    (model and feature flags from /proc/cpuinfo: inductor builds with ``-march=native``),
    the vector ISA torch dispatches to (``torch.backends.cpu.get_cpu_capability()``,
    which honours ``ATEN_CPU_CAPABILITY``), the C++ compiler's version, the machine and
    torch's version. (Inductor's ``pick_vec_isa()`` would say the same for a given CPU
    and compiler, but builds test programs first: about 1 s on the client's start-up
    path.)"""
    import torch

    return {
        "machine": platform.machine(),
        "cpu": json.dumps(_cpu_facts(), sort_keys=True),
        "vec_isa": torch.backends.cpu.get_cpu_capability(),
        "compiler": _compiler_version(),
        "torch": torch.__version__,
    }


def _cpu_facts() -> dict[str, str]:
    """The first processor's model and feature lines (x86 and Arm field names)."""
    keys = {"vendor_id", "model name", "flags", "CPU implementer", "CPU part", "Features"}
    facts: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if facts:
                        break
                    continue
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    facts[key.strip()] = " ".join(sorted(value.split()))
    except OSError:
        facts["unreadable"] = platform.processor()
    return facts


def _compiler_version() -> str:
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    try:
        return str(get_compiler_version_info(get_cpp_compiler()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"none ({type(e).__name__})"
