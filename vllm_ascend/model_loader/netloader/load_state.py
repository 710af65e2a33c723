"""What ``model.load_weights`` sets besides tensors, carried from a seed to its clients.

A fetch fills the model's tensors and never runs ``load_weights``, but some vLLM
models set plain attributes there. EAGLE-family heads set ``has_own_embed_tokens``
and ``has_own_lm_head`` when the checkpoint holds those weights
(``process_eagle_weight`` in vllm/model_executor/models/utils.py); the proposer
then shares the target's embedding and lm_head only where the flag is False
(vllm/v1/spec_decode/llm_base_proposer.py). MTP heads and others set such flags the
same way. Skipping them leaves a model with the right tensors that runs differently.

So the whole class is handled, not one model: a loader takes a ``snapshot`` of every
module's plain attributes before ``load_weights`` and after it, and the difference
(``changes``) is part of what a seed serves. The client checks that every change
applies to its own freshly built model (same module, same value before) before any
byte moves, and ``apply`` replays the changes once the tensors are verified. The
changes are also part of the value fingerprint, so resume, relays and
EXPECTED_FINGERPRINT pin them as they pin the tensors.

Snapshots compare plain values (None, bool, int, float, str, short tuples or lists
of those, and an empty dict), but only two kinds of change are carried, the kinds
vLLM's loads make: a flag that stays a flag (a bool on the instance, or one its class
declares and not as a ``ClassVar``) and a new empty table (a name neither the instance
nor its class has, set to ``{}``: the scratch tables some loads start, e.g.
DeepSeek-V2's ``_pending_indexer_wk_fp8``). Any other value could drive the client's
computation (a size, an epsilon, a loop bound, a layer name): a seed, even one that
holds the secret, could make the client crash or hang at its first forward, after the
loader returned and too late to fall back. A load that makes any other change (to
another value, an object, a tensor that is neither parameter nor buffer) makes state
Netloader cannot carry: such a seed refuses clients with that reason, and they load
from disk; a client refuses such a change from a seed before any byte moves. A change
may never name a parameter, buffer, submodule or what every torch module keeps: those
are tensors the fetch verifies, or structure the client built itself.
"""

import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_ascend.model_loader.netloader.wire.errors import clean

if TYPE_CHECKING:  # no torch at run time: ``protocol`` parses load states
    from torch import nn

# Bounds on what a seed may announce; a peer's state beyond them is malformed.
MAX_CHANGES = 1024
MAX_NAME_CHARS = 512
MAX_STR_CHARS = 256
MAX_ITEMS = 64
# Bytes a client reads for the changes in an accept, beyond its digests: room for
# MAX_CHANGES entries of flags and short names; a seed that needs more is refused.
WIRE_BYTES = 1 << 20
_SCALARS = (type(None), bool, int, float, str)
_TENSOR_SLOTS = ("_parameters", "_buffers", "_modules")


class LoadStateError(ValueError):
    """A peer's load state is malformed, or does not apply to this model."""


@dataclass(frozen=True)
class Change:
    """``module.attr`` went from ``before`` (``had`` False: not set on the instance)
    to ``after`` while the model loaded. ``module`` is a ``named_modules`` name."""

    module: str
    attr: str
    had: bool
    before: Any
    after: Any

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr

    def to_wire(self) -> list[Any]:
        return [self.module, self.attr, self.had, _wire(self.before), _wire(self.after)]

    @classmethod
    def from_wire(cls, item: Any) -> "Change":
        """Parse a peer's entry; raises LoadStateError if it is malformed (a change
        that changes nothing included)."""
        ok = (
            isinstance(item, list) and len(item) == 5
            and isinstance(item[0], str) and len(item[0]) <= MAX_NAME_CHARS
            and isinstance(item[1], str) and item[1].isidentifier()
            and not item[1].startswith("__") and len(item[1]) <= MAX_NAME_CHARS
            and isinstance(item[2], bool)
            and _is_plain(_unwire(item[3])) and _is_plain(_unwire(item[4]))
            and (item[2] or item[3] is None)
        )
        if not ok:
            raise LoadStateError(f"malformed load state entry {clean(item, 200)}")
        change = cls(item[0], item[1], item[2], _unwire(item[3]), _unwire(item[4]))
        if change.had and _same(change.before, change.after):
            raise LoadStateError(f"load state entry {clean(change.name, 200)} changes nothing")
        return change


@dataclass(frozen=True)
class LoadState:
    """The plain attributes one load changed, sorted by module and attribute, and the
    attributes it changed that are not plain (``uncarried``, names only: a seed with
    any refuses)."""

    changes: tuple[Change, ...] = ()
    uncarried: tuple[str, ...] = ()

    def to_wire(self) -> list[Any]:
        return [c.to_wire() for c in self.changes]

    @classmethod
    def from_wire(cls, items: Any) -> "LoadState":
        """Parse a peer's list of changes (bounded, sorted, no name twice): one wire
        form per state, so equal states have equal digests. Raises LoadStateError."""
        if not isinstance(items, list) or len(items) > MAX_CHANGES:
            raise LoadStateError(f"load state is not a list of at most {MAX_CHANGES} changes")
        parsed = tuple(Change.from_wire(item) for item in items)
        keys = [(c.module, c.attr) for c in parsed]
        if keys != sorted(set(keys)):
            raise LoadStateError("load state entries are not sorted, or one appears twice")
        return cls(parsed)

    def digest(self) -> str | None:
        """sha256 of the changes' canonical wire form, or None when there are none."""
        if not self.changes:
            return None
        wire = json.dumps(self.to_wire(), separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(wire.encode()).hexdigest()

    def describe(self) -> list[str]:
        """``module.attr=value`` per change, for logs and ``info``."""
        return [f"{c.name}={c.after!r}" for c in self.changes]


NO_STATE = LoadState()
_ABSENT = object()


def snapshot(model: "nn.Module") -> dict[tuple[str, str], Any]:
    """Every module's instance attributes: copies of plain values, anything else as a
    marker of its identity (so a replaced object shows as changed)."""
    found: dict[tuple[str, str], Any] = {}
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in _TENSOR_SLOTS:
                continue
            found[(module_name, attr)] = _copy(value) if _is_plain(value) else _Opaque(value)
    return found


def changes(
    before: dict[tuple[str, str], Any], after: dict[tuple[str, str], Any], model: "nn.Module"
) -> LoadState:
    """What changed between two ``snapshot``s of ``model`` (new attributes included);
    attributes the load removed, replaced with objects, or set to values Netloader does
    not carry (see the module docstring) count as uncarried, with the reason."""
    carried: list[Change] = []
    uncarried: list[str] = []
    for key, value in sorted(after.items(), key=lambda item: item[0]):
        old = before.get(key, _ABSENT)
        if old is not _ABSENT and _same(old, value):
            continue
        module, attr = key
        name = f"{module}.{attr}" if module else attr
        if isinstance(value, _Opaque) or isinstance(old, _Opaque):
            uncarried.append(f"{name} ({_type_name(value)})")
        else:
            change = Change(module, attr, old is not _ABSENT,
                            None if old is _ABSENT else old, value)
            why = _not_carried(type(model.get_submodule(module)), change)
            if why:
                uncarried.append(f"{name} ({why})")
            else:
                carried.append(change)
    uncarried.extend(f"{m}.{a} (removed)" for m, a in before if (m, a) not in after)
    return LoadState(tuple(carried), tuple(uncarried))


def check(model: "nn.Module", state: LoadState) -> None:
    """Raise LoadStateError unless every change applies to ``model`` as it is now:
    the module exists (found through submodules only, never a property), the
    attribute is no parameter, buffer or submodule, it holds the change's ``before``
    (or is not set on the instance), an attribute the class defines keeps its type,
    and the change is one Netloader carries (``_not_carried``)."""
    for change in state.changes:
        module = _submodule(model, change.module)
        name = clean(change.name, 200)
        if change.attr in _module_machinery():
            # ``training``, ``_parameters``, hooks...: what every nn.Module keeps, which
            # no load sets (``snapshot`` skips the tensor tables; a peer may not).
            raise LoadStateError(f"load state names {name}, which every torch module keeps")
        if any(change.attr in getattr(module, slot, {}) for slot in _TENSOR_SLOTS):
            raise LoadStateError(f"load state names {name}, a parameter, buffer or module")
        own = vars(module)
        if change.had != (change.attr in own) or (
            change.had and not _same(own[change.attr], change.before)
        ):
            here = clean(own[change.attr], 60) if change.attr in own else "unset"
            there = clean(change.before, 60) if change.had else "unset"
            raise LoadStateError(f"load state of {name} starts from {there}, here {here}")
        inherited = getattr(type(module), change.attr, _ABSENT)
        if inherited is not _ABSENT and type(inherited) is not type(change.after):
            raise LoadStateError(
                f"load state sets {name} to a {type(change.after).__name__}, "
                f"its class holds a {type(inherited).__name__}"
            )
        why = _not_carried(type(module), change)
        if why:
            raise LoadStateError(
                f"load state sets {name} to {clean(change.after, 60)}, which Netloader "
                f"does not carry: {why}"
            )


def apply(model: "nn.Module", state: LoadState) -> None:
    """Replay ``state`` on ``model`` (``check`` it first): plain instance attributes,
    each a fresh copy, written as the load itself wrote them."""
    for change in state.changes:
        vars(_submodule(model, change.module))[change.attr] = _copy(change.after)


def _not_carried(owner: type, change: Change) -> str | None:
    """Why ``change`` to an instance of ``owner`` is no change Netloader carries, or
    None when it is: a bool where a bool was (on the instance, else declared by the
    class, not as a ``ClassVar``), or ``{}`` under a name neither has."""
    declared = getattr(owner, change.attr, _ABSENT)
    if type(change.after) is bool:
        was = change.before if change.had else declared
        if type(was) is not bool:
            return "a flag only where a flag was"
        if _class_var(owner, change.attr):
            return "a flag its class declares class-wide"
        return None
    if type(change.after) is dict and not change.had and declared is _ABSENT:
        return None  # a new empty table (_is_plain: only empty dicts are plain)
    return "only flags and new empty tables are carried"


def _class_var(owner: type, attr: str) -> bool:
    """Whether a class in ``owner``'s MRO annotates ``attr`` as a ``ClassVar``
    (a string annotation too, as ``from __future__ import annotations`` leaves it)."""
    for cls in owner.__mro__:
        annotation = vars(cls).get("__annotations__", {}).get(attr)
        if annotation is None:
            continue
        if isinstance(annotation, str):
            return annotation.split("[", 1)[0].strip() in ("ClassVar", "typing.ClassVar")
        return typing.get_origin(annotation) is typing.ClassVar or annotation is typing.ClassVar
    return False


@functools.cache
def _module_machinery() -> frozenset[str]:
    """What every ``torch.nn.Module`` keeps: a bare one's instance attributes, and the
    data (not methods) its class holds (``_version``, ``dump_patches``...)."""
    from torch import nn

    held = {name for name, value in vars(nn.Module).items()
            if not name.startswith("__") and not callable(value)
            and not isinstance(value, (property, staticmethod, classmethod))}
    return frozenset(vars(nn.Module())) | frozenset(held)


def _submodule(model: "nn.Module", path: str) -> "nn.Module":
    module = model
    for part in path.split(".") if path else ():
        child = vars(module).get("_modules", {}).get(part)
        if child is None:
            raise LoadStateError(f"load state names module '{clean(path, 100)}', "
                                 "which this model lacks")
        module = child
    return module


class _Opaque:
    """An attribute that is not a plain value, compared by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and other.value is self.value

    __hash__ = None  # type: ignore[assignment]


def _type_name(value: Any) -> str:
    return type(value.value if isinstance(value, _Opaque) else value).__name__


def _is_plain(value: Any) -> bool:
    kind = type(value)
    if kind in (tuple, list):
        return len(value) <= MAX_ITEMS and all(_is_scalar(v) for v in value)
    if kind is dict:
        return not value
    return _is_scalar(value)


def _is_scalar(value: Any) -> bool:
    kind = type(value)
    if kind not in _SCALARS:
        return False
    if kind is float:
        return math.isfinite(value)
    return kind is not str or len(value) <= MAX_STR_CHARS


def _copy(value: Any) -> Any:
    """A plain value that shares no list or dict with the model."""
    return type(value)(value) if type(value) in (list, dict) else value


def _same(a: Any, b: Any) -> bool:
    """Equal plain values of the same types, by their canonical wire form (True is not
    1, (1,) is not [1], -0.0 is not 0.0); opaque values by identity."""
    if isinstance(a, _Opaque) or isinstance(b, _Opaque):
        return a == b
    if type(a) is not type(b) or not (_is_plain(a) and _is_plain(b)):
        return False
    if type(a) is dict:
        return a == b  # both empty
    return json.dumps(_wire(a)) == json.dumps(_wire(b))


def _wire(value: Any) -> Any:
    """A tuple travels as {"tuple": [...]} so it comes back a tuple, not a list; an
    empty dict as {"dict": []}."""
    if type(value) is tuple:
        return {"tuple": list(value)}
    if type(value) is dict:
        return {"dict": []}
    return value


def _unwire(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("tuple"), list):
            return tuple(value["tuple"])
        if value == {"dict": []}:
            return {}
        return _ABSENT  # not plain: from_wire refuses it
    return value
