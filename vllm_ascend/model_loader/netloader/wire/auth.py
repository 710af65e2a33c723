"""The optional shared secret: challenge-response proofs, no I/O.

The secret itself never crosses the wire. Each side proves it knows the secret by
an HMAC-SHA256 over both sides' fresh nonces, so a recorded proof is worthless on
another connection. The seed's proof also covers the client's request and the body
of its answer (the digest list and the rendezvous port of an ``accept``), so a
client that checked it knows that a holder of the secret answered *its* request
with the digests it verifies the weights against.
"""

import hashlib
import hmac
import json
import secrets
from typing import Any

SECRET_ENV = "NETLOADER_SECRET"
MIN_SECRET_BYTES = 16
_CLIENT = b"netloader-client-v1"
_SEED = b"netloader-seed-v1"


class AuthError(Exception):
    """A peer could not prove it knows the shared secret, or no secret is shared."""


def new_nonce() -> str:
    """A fresh 128-bit nonce as 32 hex digits."""
    return secrets.token_hex(16)


def client_proof(secret: bytes, seed_nonce: str, client_nonce: str) -> str:
    """The client's proof: HMAC-SHA256 over both nonces, as 64 hex digits."""
    return _mac(secret, _CLIENT, seed_nonce, client_nonce)


def seed_proof(
    secret: bytes, seed_nonce: str, request: dict[str, Any], body: dict[str, Any]
) -> str:
    """Proof over the seed's nonce, the client's request as the seed read it (the
    client's nonce, identity and manifest; without its ``proof``) and ``body`` (the
    answer without its ``proof``). Covering the request means a man in the middle
    cannot rewrite the client's identity so that a seed of another model answers."""
    return _mac(secret, _SEED, seed_nonce, _sha256(request), _sha256(body))


def proof_matches(expected: str, given: Any) -> bool:
    """Constant-time comparison; anything but an ASCII string never matches."""
    return (
        isinstance(given, str) and given.isascii()
        and hmac.compare_digest(expected.encode(), given.encode())
    )


def _sha256(msg: dict[str, Any]) -> str:
    unproved = {k: v for k, v in msg.items() if k != "proof"}
    canonical = json.dumps(unproved, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def _mac(secret: bytes, role: bytes, *parts: str) -> str:
    msg = role + b"\0" + b"\0".join(p.encode() for p in parts)
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()
