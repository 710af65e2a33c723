"""What this side says about what a peer sent: the error, and the peer's text made
safe for a log line or a refusal."""

import reprlib
from typing import Any

# A reason read from a peer, as it may appear in a log line; one this side sends stays
# far below the request cap even when every character needs a 6-byte JSON escape.
MAX_REASON_CHARS = 1000

_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 1024
_REPR.maxlist = _REPR.maxtuple = 16


class ProtocolError(Exception):
    """The peer sent something this side cannot accept, or went away."""


def clean(value: Any, limit: int = MAX_REASON_CHARS) -> str:
    """``value`` as printable ASCII of about ``limit`` characters: a string as it is,
    anything else through ``reprlib`` (bounded work for a large value, and it survives
    a ``__repr__`` that raises); cut to ``limit``, then every other character escaped
    (a peer's newlines, terminal escapes or lone surrogates never reach a log as such)."""
    raw = (value if isinstance(value, str) else _REPR.repr(value))[:limit]
    return "".join(c if c.isprintable() and c.isascii() else ascii(c)[1:-1] for c in raw)


def text(msg: dict[str, Any], name: str) -> str:
    """A free-text field of a peer's message (a reason), for logs: any type, cleaned."""
    return clean(msg.get(name))
