"""Start-up phases of a seed and a client, read from their timestamped vLLM logs.

``make docs-images`` runs the demo with ``--phases-out``: both servers then log with
``LOG_FORMAT``, which stamps every line with the wall-clock time it was written, and
the demo itself notes when it started each server and when /health first answered.
Every phase boundary is one of those measured instants. A step that logs only its end
and its own duration (Netloader's "... in 0.036 s") starts that duration earlier.

The fetch is split where the seed's data plane starts: the seed logs the seconds from
right after its ``accept`` to the end of sending, so what comes before that in the
client's fetch is the handshake (connect, challenge, hello with identity and manifest,
the seed's checks, accept), and the rest is group setup, transfer and verification.
"""

import json
import re
from pathlib import Path
from typing import Any

LOG_FORMAT = (
    "%(created).3f (%(processName)s pid=%(process)d) %(levelname)s "
    "[%(filename)s:%(lineno)d] %(message)s"
)
_STAMPED = re.compile(r"^(\d{9,}\.\d{3}) (.*)$")

# Log lines that mark phase boundaries in every instance (the first match counts).
LOAD_MODEL = r"Starting to load model"
MODEL_BUILT = r"Initializing model took"
WEIGHTS_LOADED = r"Netloader rank 0 .*loaded \d+ tensors .* in (?P<s>[\d.]+) s"
LISTENING = r"Netloader seed rank 0 listening on"
ENGINE_READY = r"init engine .* took"
# Only in the client's log, and only in the seed's.
RECEIVED = (
    r"Netloader rank 0 received (?P<bytes>\d+) bytes from \S+ over \S+ in (?P<s>[\d.]+) s"
)
SENT = r"Netloader seed rank 0 sent to \S+ over \S+: (?P<bytes>\d+) bytes in (?P<s>[\d.]+) s"


class PhaseError(RuntimeError):
    """A log lacks a line that marks a phase boundary."""


def write_logging_config(path: Path) -> Path:
    """A vLLM logging config (``VLLM_LOGGING_CONFIG_PATH``) that stamps every line."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"stamped": {"format": LOG_FORMAT}},
        "handlers": {
            "vllm": {
                "class": "logging.StreamHandler", "formatter": "stamped",
                "level": "INFO", "stream": "ext://sys.stdout",
            },
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
    }
    path.write_text(json.dumps(config, indent=1))
    return path


def find(log: str, pattern: str) -> tuple[float, re.Match[str]]:
    """Time and match of the first stamped line matching ``pattern``."""
    regex = re.compile(pattern)
    for line in log.splitlines():
        stamped = _STAMPED.match(line)
        if stamped is None:
            continue
        match = regex.search(stamped.group(2))
        if match is not None:
            return float(stamped.group(1)), match
    raise PhaseError(f"no timestamped log line matches {pattern!r}")


def _phase(name: str, kind: str, start: float, end: float, origin: float) -> dict[str, Any]:
    return {"phase": name, "kind": kind,
            "start": round(start - origin, 3), "end": round(end - origin, 3)}


def instance_phases(
    log: str, started: float, healthy: float, origin: float, weights: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Phases of one server, from its start to /health; ``weights`` fills load_weights."""
    load_model, _ = find(log, LOAD_MODEL)
    built, _ = find(log, MODEL_BUILT)
    loaded, _ = find(log, WEIGHTS_LOADED)
    listening, _ = find(log, LISTENING)
    engine, _ = find(log, ENGINE_READY)
    return [
        _phase("vLLM start-up (API server, engine, worker)", "startup", started, load_model,
               origin),
        _phase("build empty model", "build", load_model, built, origin),
        *weights,
        _phase("process_weights_after_loading, seed listener", "post", loaded, listening,
               origin),
        _phase("engine init (KV cache, profiling)", "engine", listening, engine, origin),
        _phase("API server up", "api", engine, healthy, origin),
    ]


def demo_phases(
    seed_log: str, client_log: str, clock: dict[str, float], model: str
) -> dict[str, Any]:
    """Both servers' phases, in seconds since the seed process started.

    ``clock`` holds the demo's wall-clock measurements: ``seed_start``,
    ``seed_healthy``, ``client_start``, ``client_healthy``, ``end``."""
    origin = clock["seed_start"]
    seed_loaded, seed_match = find(seed_log, WEIGHTS_LOADED)
    seed_weights = [_phase("load from disk, digests", "disk", seed_loaded - float(seed_match["s"]),
                           seed_loaded, origin)]
    received, recv_match = find(client_log, RECEIVED)
    sent, sent_match = find(seed_log, SENT)
    fetch_start = received - float(recv_match["s"])
    data_start = sent - float(sent_match["s"])
    client_loaded, loaded_match = find(client_log, WEIGHTS_LOADED)
    client_weights = [
        # Also holds the attempts on seeds that failed before this one, if any.
        _phase("build manifest", "manifest", client_loaded - float(loaded_match["s"]),
               fetch_start, origin),
        _phase("fetch: handshake", "handshake", fetch_start, data_start, origin),
        _phase("fetch: group setup, transfer, verify", "transfer", data_start, received, origin),
        _phase("keep views for seeding", "keep", received, client_loaded, origin),
    ]
    seed = instance_phases(seed_log, clock["seed_start"], clock["seed_healthy"], origin,
                           seed_weights)
    seed.append(_phase("serving", "serve", clock["seed_healthy"], clock["end"], origin))
    seed.append(_phase("sending to the client", "send", data_start, sent, origin))
    client = instance_phases(client_log, clock["client_start"], clock["client_healthy"],
                             origin, client_weights)
    client.append(_phase("serving", "serve", clock["client_healthy"], clock["end"], origin))
    return {
        "model": model,
        "bytes": int(recv_match["bytes"]),
        "origin": "seed process start",
        "lanes": [{"name": "seed", "phases": seed}, {"name": "client", "phases": client}],
    }
