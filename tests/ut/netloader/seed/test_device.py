"""Seed threads use the worker's device. A fresh thread's current device is device 0
on every rank of a multi-device host, so the seed is handed the device where it is
created and every connection thread makes it current before it touches a tensor.
(No accelerator here: the seam between seed and transfer records what each thread
asks for; the CPU path never needs a device.)"""

import threading

import torch

from tests.helpers.toy import fetch_for, make_toy, serving
from vllm_ascend.model_loader.netloader.client import query_seed
from vllm_ascend.model_loader.netloader.seed import server as seed_module


def test_every_connection_thread_makes_the_captured_device_current(monkeypatch):
    asked: list[tuple[torch.device, str]] = []
    monkeypatch.setattr(
        seed_module, "use_device",
        lambda device: asked.append((device, threading.current_thread().name)),
    )
    worker_device = torch.device("cuda", 3)  # what the loader captured in the worker
    with serving(seed=1, device=worker_device) as seed:
        query_seed(seed.address)
        fetch = fetch_for(make_toy(None))
        assert fetch.run((seed.address,)) is not None, fetch.reasons
    assert len(asked) == 2
    assert all(device == worker_device for device, _ in asked)
    assert all(name != threading.current_thread().name for _, name in asked)
