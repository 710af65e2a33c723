"""The seed side: what a worker runs to serve its weights to starting instances.

- ``server``: one rank's seed (handshake, refusals, sending);
- ``listener``: the bounded accept loop under it;
- ``relay``: a starting instance that passes on what it has verified;
- ``retention``: what a seed keeps beyond its running model (INT8_CACHE);
- ``running``: the seeds this process runs, their registry records, stopping them.
"""
