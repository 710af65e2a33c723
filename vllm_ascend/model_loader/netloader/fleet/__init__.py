"""Finding seeds without hand-typed addresses: DNS names and a registry.

Both produce *candidates* only. Whatever a DNS answer or a registry record says, the
handshake decides (identity, shared secret, manifest, digests), so a stale record, a
poisoned entry or another model's seed costs one refused attempt, never wrong weights.
And neither can keep an instance from starting: a name that does not resolve, a
registry that is down, slow or empty is a reason in the log, and the client goes on
with its other sources or the disk.

- ``dns``: ``{"dns": "name:port"}`` sources, and the order every rank tries them in;
- ``registry``: the Redis registry, seeds' records and their heartbeats;
- ``candidates``: the addresses one load tries, from SOURCE, DNS and the registry.
"""
