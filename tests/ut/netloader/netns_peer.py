"""A toy seed or client as its own process, for tests that put the two in separate
network namespaces (``python -m tests.ut.netloader.netns_peer seed|client ...``)."""

import json
import sys

from tests.ut.netloader.toy_seed import IDENTITY, make_toy


def seed(host: str, seed_value: int) -> None:
    """Serve make_toy(seed_value) on ``host``; print the address; stop at stdin's EOF."""
    from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
    from vllm_ascend.model_loader.netloader.server import SeedServer

    server = SeedServer(
        LoadedWeights.capture(make_toy(seed_value)), IDENTITY, 0, host, 0, 20.0
    ).start()
    server.ready.wait(30)
    print(server.address, flush=True)
    sys.stdin.read()
    server.stop()


def client(address: str, seed_value: int) -> None:
    """Fetch from ``address``; print whether every tensor equals make_toy(seed_value)."""
    import torch

    from vllm_ascend.model_loader.netloader.client import WeightFetch
    from vllm_ascend.model_loader.netloader.manifest import model_tensors, spec_of

    named = model_tensors(make_toy(None))
    fetch = WeightFetch(IDENTITY, [spec_of(n, t) for n, t in named], [t for _, t in named], 20.0)
    received = fetch.run((address,))
    want = dict(model_tensors(make_toy(seed_value)))
    equal = all(torch.equal(t, want[n]) for n, t in named)
    print(json.dumps({"received": received is not None, "equal": equal,
                      "reasons": fetch.reasons}), flush=True)


if __name__ == "__main__":
    role, where, value = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"seed": seed, "client": client}[role](where, value)
