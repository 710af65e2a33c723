"""The data planes: how a seed's buckets reach a client.

- ``transfer``: what both planes share (buckets, verifying before a byte is used);
- ``progress``: what bounds a transfer in time (no-progress window, deadline, pace);
- ``stream``: the host plane, bulk data on the authenticated connection;
- ``collective``: the device plane, a two-rank stateless process group.
"""
