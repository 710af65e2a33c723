"""``make docs-images`` without servers: phases from stamped logs, then both images."""

import json
from pathlib import Path

import pytest

from examples.netloader.phases import PhaseError, demo_phases, find, write_logging_config
from tools.netloader_diagrams import main as draw

T0 = 1_700_000_000.0


def stamped(*lines: tuple[float, str]) -> str:
    return "\n".join(f"{T0 + t:.3f} (Worker pid=1) INFO [x.py:1] {text}" for t, text in lines)


SEED_LOG = stamped(
    (20.0, "Starting to load model /m..."),
    (20.2, "Initializing model took 0.2 seconds"),
    (20.5, "Netloader rank 0 target loaded 48 tensors (0.009 GB) from disk in 0.300 s"),
    (21.0, "Netloader seed rank 0 listening on 127.0.0.1:7000: 48 tensors, 0.009 GB"),
    (22.0, "init engine (profile, create kv cache, warmup model) took 1.00 s"),
    (60.1, "Netloader seed rank 0 sent to 127.0.0.1:5555 over tcp: 8921664 bytes in 0.030 s "
           "(0.30 GB/s)"),
) + "\nINFO:     127.0.0.1:50998 - \"GET /health HTTP/1.1\" 200 OK"
CLIENT_LOG = stamped(
    (59.0, "Starting to load model /m..."),
    (60.0, "Initializing model took 1.0 seconds"),
    (60.12, "Netloader rank 0 received 8921664 bytes from 127.0.0.1:7000 over tcp in 0.100 s"),
    (60.13, "Netloader rank 0 target loaded 48 tensors (0.009 GB) from seed 127.0.0.1:7000 "
            "in 0.130 s"),
    (61.0, "Netloader seed rank 0 listening on 127.0.0.1:7001: 48 tensors, 0.009 GB"),
    (62.0, "init engine (profile, create kv cache, warmup model) took 1.00 s"),
)
CLOCK = {"seed_start": T0, "seed_healthy": T0 + 23, "client_start": T0 + 30,
         "client_healthy": T0 + 63, "end": T0 + 64}


def test_phases_follow_the_logs_and_the_images_are_drawn(tmp_path: Path):
    phases = demo_phases(SEED_LOG, CLIENT_LOG, CLOCK, "/m")
    seed, client = ({p["kind"]: p for p in lane["phases"]} for lane in phases["lanes"])
    assert seed["disk"]["start"] == 20.2 and seed["disk"]["end"] == 20.5
    assert seed["send"] == {"phase": "sending to the client", "kind": "send",
                            "start": 60.07, "end": 60.1}
    # The fetch splits where the seed's data plane starts.
    assert client["handshake"]["start"] == 60.02 and client["handshake"]["end"] == 60.07
    assert client["transfer"]["start"] == 60.07 and client["transfer"]["end"] == 60.12
    assert client["manifest"]["start"] == 60.0 and client["api"]["end"] == 63.0
    assert phases["bytes"] == 8921664
    path = tmp_path / "phases.json"
    path.write_text(json.dumps(phases))
    draw(["--phases", str(path), "--out", str(tmp_path / "images")])
    for name in ("netloader_flow.png", "netloader_timing.png"):
        assert (tmp_path / "images" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_missing_boundary_names_its_pattern():
    with pytest.raises(PhaseError, match="received"):
        demo_phases(SEED_LOG, CLIENT_LOG.replace("received", "got"), CLOCK, "/m")


def test_logging_config_stamps_every_line(tmp_path: Path):
    config = json.loads(write_logging_config(tmp_path / "logging.json").read_text())
    fmt = config["formatters"]["stamped"]["format"]
    assert fmt.startswith("%(created).3f ")
    assert find(stamped((1.5, "Starting to load model x")), "Starting to load")[0] == T0 + 1.5
