"""A toy seed or client as its own process, for tests that put the two in separate
network namespaces (``python -m tests.helpers.netns_peer seed|client ...``)."""

import json
import sys

from tests.helpers.toy import make_toy


def seed(host: str, seed_value: int, plane: str, port: int = 0) -> None:
    """Serve make_toy(seed_value) on ``host:port``; print the address; stop at stdin's
    EOF."""
    from tests.helpers.toy import serving

    with serving(seed_value, host=host, port=port, timeout_s=20.0, data_plane=plane) as server:
        print(server.address, flush=True)
        sys.stdin.read()


def client(address: str, seed_value: int, plane: str) -> None:
    """Fetch from ``address``; print whether every tensor equals make_toy(seed_value)."""
    import torch

    from tests.helpers.toy import fetch_for
    from vllm_ascend.model_loader.netloader.manifest import model_tensors

    model = make_toy(None)
    fetch = fetch_for(model, timeout_s=20.0, data_plane=plane)
    received = fetch.run((address,))
    want = dict(model_tensors(make_toy(seed_value)))
    equal = all(torch.equal(t, want[n]) for n, t in model_tensors(model))
    print(json.dumps({"received": received is not None, "equal": equal,
                      "reasons": fetch.reasons}), flush=True)


def dns_client(name: str, seed_value: int, spread_key: str) -> None:
    """Expand ``{"dns": name}`` for rank 0 as the loader does, fetch from the first
    candidate that serves; print the candidates, the source and whether every tensor
    equals make_toy(seed_value)."""
    import torch

    from tests.helpers.toy import fetch_for
    from vllm_ascend.model_loader.netloader.fleet.dns import DnsSource, expand
    from vllm_ascend.model_loader.netloader.manifest import model_tensors
    from vllm_ascend.model_loader.netloader.wire.addresses import parse_address

    candidates, notes = expand([DnsSource(*parse_address(name))], 0, spread_key)
    model = make_toy(None)
    fetch = fetch_for(model, timeout_s=20.0)
    received = fetch.run(candidates)
    want = dict(model_tensors(make_toy(seed_value)))
    equal = all(torch.equal(t, want[n]) for n, t in model_tensors(model))
    print(json.dumps({
        "candidates": candidates, "notes": notes, "equal": equal, "reasons": fetch.reasons,
        "source": received.source if received is not None else None,
    }), flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "dns-client":
        dns_client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        where, value, plane = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        port = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        {"seed": seed, "client": client}[role](where, value, plane, *([port] if port else []))
