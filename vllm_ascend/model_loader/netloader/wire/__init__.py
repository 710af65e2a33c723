"""The wire: what crosses a connection before any weight does. No torch.

- ``frames``: control frames and bulk-data frames, with their caps;
- ``messages``: every message type, built by one function and parsed by one;
- ``errors``: ``ProtocolError`` and how a peer's text reaches a log line;
- ``auth``: the shared secret's proofs (pure functions);
- ``handshake``: both sides of a connection's opening;
- ``addresses``: strict ``host:port`` parsing, and binding a listener.
"""
