"""Which form of the weights moves: as loaded, or as processed (the runtime layout).

``process_weights_after_loading`` turns a model's loaded tensors into what its kernels
read: MoE experts prepacked for the CPU grouped GEMM, oneDNN handles built from linear
weights, int8 weights repacked by a quantization method. In the *loaded* layout the
seed sends the tensors as ``load_weights`` left them and the client runs the same
processing; a seed must then keep a loaded copy of every tensor processing replaced
(``seed.retention``: 75 % extra for Qwen3-MoE on CPU). In the *processed* layout the
seed keeps nothing extra: the client receives what processing starts from on its side
and runs vLLM's processing under ``weights_already_processed()``
(vllm/model_executor/utils.py), in which each quantization method that declares
``supports_pre_processed_weights`` skips its tensor transforms and rebuilds only its
kernels and Python-side state, as vLLM's own weight-cache IPC loader does
(vllm/model_executor/model_loader/weight_cache/ipc_loader.py).

What moves is the loaded manifest: the same names, shapes and dtypes, which the client
computes from its own model built on the meta device, so no peer ever chooses a shape
the client allocates or a kernel reads. Per tensor, the processed layout carries

- the running model's tensor where processing left one of that shape and dtype (a
  prepacked expert weight; most tensors, unchanged), or
- the loaded bytes where processing consumed the tensor into a kernel whose contents
  Netloader cannot read (vLLM CPU's linear layers: ``create_onednn_mm`` packs a copy
  into a C++ handle and leaves an empty weight; zeroing the source afterwards does not
  change the handle's outputs, measured here): the client's processing builds its
  kernel from the same bytes. Such *kernel inputs* are the processed layout's cost on
  the seed where the model itself no longer holds them (``Processed.kept``).

Exactness is checked, not assumed: the seed serves the ``state_signature`` of its
processed model, and the client computes its own after processing; a client whose
state differs (a method that skipped a transform the seed's ran, a kernel built from
other inputs) loads from disk.
"""

import dataclasses
import enum
import functools
import hashlib
import json
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_ascend.model_loader.netloader.log import get_logger
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights, digest_parts
from vllm_ascend.model_loader.netloader.wire.errors import clean

logger = get_logger(__name__)

# How deep ``state_signature`` follows objects below a module attribute (a quant method,
# its kernel, the kernel's experts object), and how many items of a container it shows.
_DEPTH = 4
_ITEMS = 64
# Where vLLM's layer and kernel code lives: the environment variables read there pick
# kernels and packings (``processing_signature``).
_KERNEL_SOURCES = ("model_executor/layers", "model_executor/kernels", "_custom_ops.py")
_ENV_READ = re.compile(r"envs\.(VLLM_[A-Z0-9_]+)")


class LayoutError(Exception):
    """The processed layout cannot be installed or does not reproduce the seed's model."""


# --- what a processed tensor is only valid under -----------------------------------------


def processing_signature(model: nn.Module) -> dict[str, str]:
    """What decides how ``process_weights_after_loading`` lays tensors out, beyond the
    identity's vLLM and torch versions: the platform and device (CPU: vector ISA, AMX,
    AVX512-BF16, oneDNN and zentorch; a GPU: its compute capability), the quantization
    methods and the kernels or backends they chose, and the vLLM environment variables
    that layer and kernel code reads. A processed tensor is only valid where all of these
    are equal. Every value is a short string (it travels in a hello)."""
    from vllm.platforms import current_platform

    return {
        "platform": str(current_platform.device_type),
        "device": _device_facts(),
        "methods": _sha(_method_facts(model)),
        "env": _sha(_kernel_env()),
    }


def signature_difference(mine: dict[str, str], theirs: Any) -> str | None:
    """Which fields of two processing signatures differ, or None if they are equal."""
    if not isinstance(theirs, dict):
        return "processing signature is not an object"
    fields = sorted(set(mine) | {k for k in theirs if isinstance(k, str)})
    diffs = [f"{clean(k, 32)} {clean(mine.get(k), 40)} here vs {clean(theirs.get(k), 40)} "
             f"there" for k in fields if mine.get(k) != theirs.get(k)]
    return "; ".join(diffs[:8]) or None


def _device_facts() -> str:
    from vllm.platforms import current_platform

    if current_platform.device_type != "cpu":
        capability = current_platform.get_device_capability()
        name = current_platform.get_device_name()
        return f"{name} {capability}"[:120]
    from vllm import _custom_ops as ops

    zentorch = getattr(torch.ops, "zentorch", None)
    facts = [
        torch.backends.cpu.get_cpu_capability(),
        f"amx={torch.cpu._is_amx_tile_supported()}",
        f"avx512bf16={torch.cpu._is_avx512_bf16_supported()}",
        f"onednn={bool(getattr(ops, '_supports_onednn', False))}",
        f"zen={current_platform.is_zen_cpu()}",
        f"zentorch={zentorch is not None and hasattr(zentorch, 'zentorch_linear_unary')}",
    ]
    return " ".join(facts)


def _method_facts(model: nn.Module) -> list[str]:
    """Each distinct quantization method in the model, with the backend and kernel
    classes it chose when the model was built (enum values, classes, the class of an
    attribute named like a kernel). Both sides read it before processing, which builds
    more kernels on one side only."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    facts: set[str] = set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if not isinstance(method, QuantizeMethodBase):
            continue
        parts = [type(method).__qualname__]
        for attr, value in sorted(vars(method).items()):
            if isinstance(value, enum.Enum):
                parts.append(f"{attr}={value}")
            elif isinstance(value, type):
                parts.append(f"{attr}={value.__qualname__}")
            elif "kernel" in attr and value is not None:
                parts.append(f"{attr}={type(value).__qualname__}")
        facts.add(" ".join(parts))
    return sorted(facts)


@functools.cache
def _kernel_env_names() -> tuple[str, ...]:
    """Every ``envs.VLLM_*`` name vLLM's layer and kernel source reads (read once per
    process from the installed vLLM: a newer vLLM's new switches count by themselves)."""
    import vllm

    root = os.path.dirname(vllm.__file__)
    names: set[str] = set()
    for part in _KERNEL_SOURCES:
        path = os.path.join(root, part)
        files = [path] if path.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")
        ]
        for file in files:
            with open(file, encoding="utf-8", errors="replace") as f:
                names.update(_ENV_READ.findall(f.read()))
    return tuple(sorted(names))


def _kernel_env() -> dict[str, str]:
    import vllm.envs as envs

    values = {}
    for name in _kernel_env_names():
        try:
            values[name] = str(getattr(envs, name))
        except (AttributeError, ValueError):
            values[name] = "?"
    return values


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def unsupported_methods(model: nn.Module) -> list[str]:
    """Layers whose quantization method does not declare
    ``supports_pre_processed_weights`` (vLLM's own rule for pre-processed weights,
    ``check_ipc_quant_support``), as "layer: Method"; at most 5."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    found = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase) and not method.supports_pre_processed_weights:
            found.append(f"{name or '<root>'}: {type(method).__name__}")
            if len(found) == 5:
                break
    return found


# --- the seed's side -------------------------------------------------------------------


@dataclass(frozen=True)
class Processed:
    """A seed's processed layout: the weights (with digests) and the names of the
    kernel inputs among them that only the seed keeps (the model packed them into
    kernels it holds instead), and their bytes."""

    weights: LoadedWeights
    kept: tuple[str, ...]
    kept_bytes: int


class ModelHolds:
    """What a processed model holds, read once: its parameter and buffer slots by name,
    its quantization methods that take no pre-processed weights, and the storages it
    holds (its slots', and those of the seed's loaded views that anything besides the
    seed's own views keeps: a kernel, a closure, a list).

    A preparing seed computes its layouts after start-up went on (vLLM wraps modules for
    LoRA, runs the model, fills attributes): read then, the slots have other names and
    the use counts move with every forward pass. Read right after processing, they are
    what a disk load in this process holds, as in a seed that serves at once.

    A storage's holders are its use count (``torch._C._storage_Use_Count``, torch 2.x)
    less the reference taken to ask; the model holds it where that exceeds the seed's own
    views of it."""

    def __init__(self, model: nn.Module | None, views: Sequence[torch.Tensor]):
        self.slots = _slots(model) if model is not None else {}
        self.unsupported = tuple(unsupported_methods(model)) if model is not None else ()
        own: dict[tuple[str, int], int] = {}
        for t in views:
            if counted(t):
                own[storage_key(t)] = own.get(storage_key(t), 0) + 1
        held = {storage_key(t) for t in self.slots.values() if counted(t)}
        for t in views:
            if counted(t) and _holders(t) > own[storage_key(t)]:
                held.add(storage_key(t))
        self._held = frozenset(held)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether the model holds ``t``'s storage (an empty or meta tensor: no)."""
        return counted(t) and storage_key(t) in self._held


def counted(t: torch.Tensor) -> bool:
    """Whether ``t`` has bytes of its own to hold (not meta, not empty)."""
    return not t.is_meta and t.nbytes > 0


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """(device, address) of ``t``'s storage: equal for every view of one storage."""
    return str(t.device), t.untyped_storage().data_ptr()


def _holders(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    return int(torch._C._storage_Use_Count(storage._cdata)) - 1


def processed_weights(
    model: nn.Module, loaded: LoadedWeights, holds: ModelHolds | None = None,
) -> tuple[Processed | None, str]:
    """The processed layout of ``model`` (processed by now) whose loaded tensors are
    ``loaded`` (views the seed took before processing): (``Processed``, "") or (None,
    why it cannot move this way). ``holds``: the model as read right after processing
    (read now where None)."""
    if holds is None:
        holds = ModelHolds(model, loaded.tensors)
    if holds.unsupported:
        return None, (f"quantization method does not take pre-processed weights "
                      f"({', '.join(holds.unsupported)})")
    if loaded.dropped:
        return None, f"the loaded tensors are not all here ({loaded.dropped[0]})"
    named: list[tuple[str, torch.Tensor]] = []
    digests: list[str] = []
    parts = dict(loaded.parts)
    kept: list[str] = []
    kept_bytes = 0
    for spec, was, loaded_digest in zip(loaded.specs, loaded.tensors, loaded.digests,
                                        strict=True):
        now = holds.slots.get(spec.name)
        if (now is not None and not now.is_meta and tuple(now.shape) == spec.shape
                and now.dtype == was.dtype and now.is_contiguous()):
            same = (now.untyped_storage().data_ptr() == was.untyped_storage().data_ptr()
                    and now.data_ptr() == was.data_ptr())
            named.append((spec.name, now.detach()))
            if same:
                digests.append(loaded_digest)
            else:
                d, p = digest_parts(now)
                digests.append(d)
                if p:
                    parts[d] = p
            continue
        # Consumed into a kernel: the bytes it was built from move instead.
        named.append((spec.name, was))
        digests.append(loaded_digest)
        if not holds.holds(was):
            kept.append(spec.name)
            kept_bytes += was.nbytes
    weights = LoadedWeights(named, digests, loaded.state, parts=parts)
    return Processed(weights, tuple(kept), kept_bytes), ""


def _slots(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer slot by name, tied ones under each of their names."""
    return {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }


# --- what both sides compare after processing -------------------------------------------


def state_signature(model: nn.Module) -> str:
    """sha256 (hex) of what the processed model is besides the bytes of its tensors:
    every module's attributes (plain values; tensors by class, dtype, shape and device;
    functions by name and what their closures hold; quantization methods, kernels and
    other Python objects followed ``_DEPTH`` levels down; C++ objects by type only).
    Two processes whose processing built the same model have the same signature; a
    kernel handle's address is not part of it (an int below a module attribute counts
    by its type), its inputs are (digest-verified tensors)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, module in model.named_modules():
        entries = [["tensors", [[k, _describe(t, 1, seen)] for k, t in sorted(
            [*module._parameters.items(), *module._buffers.items()])]]]
        for attr, value in sorted(vars(module).items()):
            if attr in _MODULE_MACHINERY or attr in _RUNTIME:
                continue
            entries.append([attr, _describe(value, 0, seen)])
        h.update(json.dumps([name, entries], default=str).encode())
    return h.hexdigest()


_MODULE_MACHINERY = frozenset(vars(nn.Module())) | {"_parameters", "_buffers", "_modules"}


def _describe(value: Any, depth: int, seen: set[int], captured: bool = False) -> Any:
    """``captured``: a value a closure or a partial holds, where an int is a kernel
    handle's address as often as a size (compared by type there)."""
    if value is None or isinstance(value, (bool, float, str)):
        return value if not isinstance(value, str) else value[:256]
    if isinstance(value, int):
        return "int" if captured else value
    if isinstance(value, torch.Tensor):
        return ["tensor", type(value).__name__, str(value.dtype), list(value.shape),
                list(value.stride()), value.storage_offset(), value.device.type]
    if isinstance(value, nn.Module):
        return ["module", type(value).__qualname__]
    if isinstance(value, (enum.Enum, torch.dtype, torch.device, torch.Size)):
        return str(value)
    if isinstance(value, type):
        return ["type", value.__qualname__]
    if isinstance(value, functools.partial):
        return ["partial", _describe(value.func, depth + 1, seen),
                [_describe(a, depth + 1, seen, True) for a in value.args[:_ITEMS]],
                [[k, _describe(v, depth + 1, seen, True)]
                 for k, v in sorted(value.keywords.items())[:_ITEMS]]]
    if isinstance(value, types.MethodType):
        return ["method", value.__func__.__qualname__]
    if isinstance(value, types.FunctionType):
        cells = [c.cell_contents for c in value.__closure__ or () if _filled(c)]
        cells += list(value.__defaults__ or ()) + list((value.__kwdefaults__ or {}).values())
        return ["function", value.__qualname__,
                [_describe(c, depth + 1, seen, True) for c in cells[:_ITEMS]]]
    if isinstance(value, (list, tuple)):
        return [len(value), [_describe(v, depth + 1, seen, captured) for v in value[:_ITEMS]]]
    if isinstance(value, (set, frozenset)):
        return ["set", len(value), sorted(str(_describe(v, depth + 1, seen, captured))
                                          for v in list(value)[:_ITEMS])]
    if isinstance(value, dict):
        return [len(value), [[str(k)[:64], _describe(v, depth + 1, seen, captured)]
                             for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                             [:_ITEMS]]]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A config (the identity covers it); the tensors it holds (a MoE quant
        # config's biases) are the model's, described.
        return ["dataclass", type(value).__qualname__,
                [[f.name, _describe(getattr(value, f.name), depth + 1, seen)]
                 for f in dataclasses.fields(value)
                 if isinstance(getattr(value, f.name, None), torch.Tensor)]]
    attrs = getattr(value, "__dict__", None)
    if not isinstance(attrs, dict):
        slots = [s for c in type(value).__mro__ for s in getattr(c, "__slots__", ())
                 if isinstance(s, str) and hasattr(value, s)]
        if not slots or depth >= _DEPTH:
            return ["opaque", type(value).__qualname__]
        attrs = {s: getattr(value, s) for s in slots}
    if depth >= _DEPTH or id(value) in seen:
        return ["object", type(value).__qualname__]
    seen.add(id(value))
    return ["object", type(value).__qualname__,
            [[k, _describe(v, depth + 1, seen)] for k, v in sorted(attrs.items())[:_ITEMS]]]


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


# --- the client's side ------------------------------------------------------------------


def install(model: nn.Module, targets: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Put each received tensor into ``model`` (built on the meta device) in place of
    its slot's meta tensor, keeping the parameter's class and attributes (vLLM's
    ``weight_loader`` and the like) and every tie: a tensor tied under several names is
    one object again. Raises ``LayoutError`` for a name the model lacks."""
    slots = _slots(model)
    aliases: dict[int, list[str]] = {}
    for name, t in slots.items():
        aliases.setdefault(id(t), []).append(name)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, data in targets:
        old = slots.get(name)
        if old is None:
            raise LayoutError(f"the model has no tensor {name}")
        new = _like(old, data)
        for alias in aliases[id(old)]:
            owner, _, leaf = alias.rpartition(".")
            module = modules[owner]
            table = module._parameters if leaf in module._parameters else module._buffers
            table[leaf] = new


def _like(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    if not isinstance(old, nn.Parameter):
        return data
    new = torch.Tensor._make_subclass(type(old), data, False)
    new.__dict__.update(old.__dict__)
    return new


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of tensors still on the meta device: parameters, buffers and tensors held
    as module attributes (at most 5)."""
    found = [n for n, t in _slots(model).items() if t.is_meta]
    for name, module in model.named_modules():
        found += [f"{name}.{a}" for a, v in vars(module).items()
                  if isinstance(v, torch.Tensor) and v.is_meta and a not in _RUNTIME]
    return found[:5]


# Module attributes the engine fills after loading (the KV cache: vLLM's bind_kv_cache).
_RUNTIME = ("kv_cache",)
