"""Both sides of a connection's opening: the seed's challenge, the client's request
with its proof, and the seed's answer with its own proof.

The checks themselves are pure functions in ``auth``; this module does the I/O,
each exchange under one wall-clock ``Deadline``. The seed reads at most
``MAX_REQUEST_BYTES`` and authenticates the client before it looks at anything
else in the request: an unauthenticated peer learns only that it was refused.
"""

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_ascend.model_loader.netloader.deadline import Deadline
from vllm_ascend.model_loader.netloader.wire.auth import (
    AuthError,
    client_proof,
    new_nonce,
    proof_matches,
    seed_proof,
)
from vllm_ascend.model_loader.netloader.wire.frames import (
    MAX_REQUEST_BYTES,
    REFUSE,
    recv_msg,
    send_last,
    send_msg,
)
from vllm_ascend.model_loader.netloader.wire.messages import (
    CHALLENGE,
    Request,
    challenge,
    parse_challenge,
    parse_request,
    refuse,
)


@dataclass
class SeedSide:
    """The seed's end of a connection whose client has been authenticated (or that
    needs no secret). ``answer`` adds the seed's proof over the request and the body."""

    conn: socket.socket
    secret: bytes | None
    seed_nonce: str
    request: Request

    def answer(self, body: dict[str, Any], deadline: Deadline) -> None:
        send_msg(self.conn, self._proved(body), deadline)

    def answer_last(self, body: dict[str, Any], deadline: Deadline) -> None:
        """Answer, then close the connection's writing side (see ``send_last``)."""
        send_last(self.conn, self._proved(body), deadline)

    def refuse(
        self, reason: str, retry: bool, deadline: Deadline, other_layout: bool = False
    ) -> None:
        self.answer_last(refuse(reason, retry, other_layout), deadline)

    def _proved(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.secret is None:
            return body
        return {**body, "proof": seed_proof(self.secret, self.seed_nonce, self.request.wire, body)}


def open_as_seed(conn: socket.socket, secret: bytes | None, deadline: Deadline) -> SeedSide:
    """Challenge, read one request of at most ``MAX_REQUEST_BYTES``, authenticate it.

    Raises ``ProtocolError`` for a malformed request or a missed deadline and
    ``AuthError`` for a missing or wrong proof; the caller answers both with a bare
    refusal."""
    seed_nonce = new_nonce()
    send_msg(conn, challenge(seed_nonce, secret is not None), deadline)
    request = parse_request(recv_msg(conn, deadline, MAX_REQUEST_BYTES))
    authenticate(secret, seed_nonce, request)
    return SeedSide(conn, secret, seed_nonce, request)


def authenticate(secret: bytes | None, seed_nonce: str, request: Request) -> None:
    """Raise ``AuthError`` unless the client proved it knows ``secret`` (if one is set)."""
    if secret is None:
        return
    if request.proof is None:
        raise AuthError("authentication required: this seed needs the shared secret")
    if not proof_matches(client_proof(secret, seed_nonce, request.nonce), request.proof):
        raise AuthError("authentication failed: wrong shared secret")


def ask_seed(
    conn: socket.socket,
    body: dict[str, Any],
    secret: bytes | None,
    deadline: Deadline,
    reply_cap: int,
    follow: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Answer the seed's challenge with ``body``, send the ``follow`` frames (a
    cross-layout plan, which the seed reads before it answers) and return its reply (at
    most ``reply_cap`` bytes).

    With a secret, the request carries this side's proof and every reply but a
    plain refusal must carry the seed's proof over the request and the reply; a seed
    that does not ask for the secret is not trusted at all. Without one, a seed that
    asks for it is refused here, before the request leaves this host."""
    seed_nonce, seed_wants_secret = parse_challenge(
        recv_msg(conn, deadline, MAX_REQUEST_BYTES, expect=CHALLENGE)
    )
    if secret is None and seed_wants_secret:
        raise AuthError("seed requires the shared secret, and this side has none")
    if secret is not None and not seed_wants_secret:
        raise AuthError("seed does not require the shared secret; not trusting it")
    nonce = new_nonce()
    request = {**body, "nonce": nonce}
    if secret is not None:
        request["proof"] = client_proof(secret, seed_nonce, nonce)
    send_msg(conn, request, deadline)
    for frame in follow:
        send_msg(conn, frame, deadline)
    reply = recv_msg(conn, deadline, reply_cap)
    # A plain refusal may come without a proof: the seed refuses a wrong secret
    # without one, and it tells the client nothing it could act on but "go elsewhere".
    if secret is not None and reply["type"] != REFUSE:
        expected = seed_proof(secret, seed_nonce, request, reply)
        if not proof_matches(expected, reply.get("proof")):
            raise AuthError("seed's answer does not carry a valid proof of the shared secret")
    reply.pop("proof", None)
    return reply
