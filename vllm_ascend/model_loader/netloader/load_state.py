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

Only plain values are carried (None, bool, int, float, str, and short tuples or
lists of those). A load that replaces any other attribute (an object, a tensor
that is not a parameter or buffer) makes state Netloader cannot carry: such a seed
refuses clients with that reason, and they load from disk.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
        """Parse a peer's entry; raises LoadStateError if it is malformed."""
        ok = (
            isinstance(item, list) and len(item) == 5
            and isinstance(item[0], str) and len(item[0]) <= MAX_NAME_CHARS
            and isinstance(item[1], str) and item[1].isidentifier()
            and not item[1].startswith("__") and len(item[1]) <= MAX_NAME_CHARS
            and isinstance(item[2], bool)
            and _is_plain(_unwire(item[3])) and _is_plain(_unwire(item[4]))
        )
        if not ok:
            raise LoadStateError(f"malformed load state entry {str(item)[:200]}")
        return cls(item[0], item[1], item[2], _unwire(item[3]), _unwire(item[4]))


@dataclass(frozen=True)
class LoadState:
    """The plain attributes one load changed, in module order, and the attributes it
    changed that are not plain (``uncarried``, names only: a seed with any refuses)."""

    changes: tuple[Change, ...] = ()
    uncarried: tuple[str, ...] = ()

    def to_wire(self) -> list[Any]:
        return [c.to_wire() for c in self.changes]

    @classmethod
    def from_wire(cls, items: Any) -> "LoadState":
        """Parse a peer's list of changes (bounded); raises LoadStateError."""
        if not isinstance(items, list) or len(items) > MAX_CHANGES:
            raise LoadStateError("load state is not a list of at most "
                                 f"{MAX_CHANGES} changes")
        return cls(tuple(Change.from_wire(item) for item in items))

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
    """Every module's instance attributes: plain values as they are, anything else
    as a marker of its identity (so a replaced object shows as changed)."""
    found: dict[tuple[str, str], Any] = {}
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            found[(module_name, attr)] = value if _is_plain(value) else _Opaque(value)
    return found


def changes(before: dict[tuple[str, str], Any], after: dict[tuple[str, str], Any]) -> LoadState:
    """What changed between two ``snapshot``s of one model (new attributes included;
    attributes the load removed count as uncarried)."""
    carried: list[Change] = []
    uncarried: list[str] = []
    for key, value in after.items():
        old = before.get(key, _ABSENT)
        if old is not _ABSENT and _same(old, value):
            continue
        module, attr = key
        name = f"{module}.{attr}" if module else attr
        if isinstance(value, _Opaque) or isinstance(old, _Opaque):
            uncarried.append(f"{name} ({_type_name(value)})")
        else:
            carried.append(Change(module, attr, old is not _ABSENT,
                                  None if old is _ABSENT else old, value))
    uncarried.extend(f"{m}.{a} (removed)" for m, a in before if (m, a) not in after)
    return LoadState(tuple(carried), tuple(uncarried))


def check(model: "nn.Module", state: LoadState) -> None:
    """Raise LoadStateError unless every change applies to ``model`` as it is now:
    the module exists, the attribute holds the change's ``before`` (or is not set on
    the instance), and an attribute the class defines keeps its type."""
    for change in state.changes:
        try:
            module = model.get_submodule(change.module)
        except AttributeError as e:
            raise LoadStateError(f"load state names module '{change.module[:100]}', "
                                 "which this model lacks") from e
        own = vars(module)
        if change.had != (change.attr in own) or (
            change.had and not _same(own[change.attr], change.before)
        ):
            raise LoadStateError(
                f"load state of {change.name[:200]} starts from "
                f"{change.before if change.had else 'unset'!r}, here "
                f"{own.get(change.attr, 'unset')!r}"
            )
        inherited = getattr(type(module), change.attr, _ABSENT)
        if inherited is not _ABSENT and type(inherited) is not type(change.after):
            raise LoadStateError(
                f"load state sets {change.name[:200]} to a {type(change.after).__name__}, "
                f"its class holds a {type(inherited).__name__}"
            )


def apply(model: "nn.Module", state: LoadState) -> None:
    """Replay ``state`` on ``model`` (``check`` it first)."""
    for change in state.changes:
        setattr(model.get_submodule(change.module), change.attr, change.after)


class _Opaque:
    """An attribute that is not a plain value, compared by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and other.value is self.value

    __hash__ = None  # type: ignore[assignment]


def _is_plain(value: Any) -> bool:
    if type(value) in (tuple, list):
        return len(value) <= MAX_ITEMS and all(_is_scalar(v) for v in value)
    return _is_scalar(value)


def _is_scalar(value: Any) -> bool:
    kind = type(value)
    if kind not in _SCALARS:
        return False
    if kind is float:
        return math.isfinite(value)
    return kind is not str or len(value) <= MAX_STR_CHARS


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types (True is not 1, (1,) is not [1])."""
    if isinstance(a, _Opaque) or isinstance(b, _Opaque):
        return a == b
    if type(a) is not type(b):
        return False
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _wire(value: Any) -> Any:
    """A tuple travels as {"tuple": [...]} so it comes back a tuple, not a list."""
    return {"tuple": list(value)} if type(value) is tuple else value


def _unwire(value: Any) -> Any:
    if isinstance(value, dict):
        items = value.get("tuple")
        if len(value) == 1 and isinstance(items, list):
            return tuple(items)
        return _ABSENT  # not plain: from_wire refuses it
    return value


def _type_name(value: Any) -> str:
    return type(value.value if isinstance(value, _Opaque) else value).__name__
