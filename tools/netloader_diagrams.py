"""Draw the two images of the Netloader user guide.

    python -m tools.netloader_diagrams --phases .demo/phases.json \\
        --out docs/source/user_guide/feature_guide/images

``netloader_flow.png``: what a starting instance does, from its SOURCE list to serving.
``netloader_timing.png``: the measured start-up phases of a seed and a client, from
the JSON that ``examples/netloader/demo.py --phases-out`` writes (``make docs-images``
runs both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Patch, Polygon  # noqa: E402

STEP, DECISION, FAIL, END = "#dbe8f6", "#fff2c6", "#fde0c8", "#d7efd9"
KIND_COLORS = {
    "startup": "#b9c1cc",
    "build": "#8fb3d9",
    "disk": "#e8a33d",
    "manifest": "#e6d36a",
    "handshake": "#b55fc4",
    "transfer": "#3f9b67",
    "keep": "#9bd3a8",
    "post": "#5b83d6",
    "engine": "#86a9bf",
    "api": "#d5dde7",
    "serve": "#f1f4f8",
    "send": "#3f9b67",
}


# ----------------------------------------------------------------------------- flow


def _node(ax: Axes, x: float, y: float, w: float, h: float, text: str, color: str,
          diamond: bool = False) -> None:
    if diamond:
        ax.add_patch(Polygon([(x - w / 2, y), (x, y + h / 2), (x + w / 2, y), (x, y - h / 2)],
                             closed=True, facecolor=color, edgecolor="#444", lw=1.2))
    else:
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                    boxstyle="round,pad=0.02,rounding_size=0.15",
                                    facecolor=color, edgecolor="#444", lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=10, linespacing=1.35)


def _route(ax: Axes, points: list[tuple[float, float]], label: str = "",
           at: int = 0, offset: tuple[float, float] = (0.1, 0.12),
           ha: str = "left") -> None:
    """A line through ``points`` with an arrow head at the last one; ``label`` sits
    near ``points[at]``."""
    xs, ys = zip(*points, strict=True)
    ax.plot(xs[:-1], ys[:-1], color="#444", lw=1.2)
    ax.annotate("", xy=points[-1], xytext=points[-2],
                arrowprops={"arrowstyle": "-|>", "color": "#444", "lw": 1.2,
                            "shrinkA": 0, "shrinkB": 0})
    if label:
        x, y = points[at]
        ax.text(x + offset[0], y + offset[1], label, fontsize=9, ha=ha, va="bottom",
                color="#333", style="italic", linespacing=1.25)


def draw_flow(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(13, 16))
    ax.set_xlim(0, 13.6)
    ax.set_ylim(0.4, 16)
    ax.axis("off")
    main, mid, right = 3.4, 8.2, 11.6
    w = 5.8
    nodes = [
        (main, 15.1, w, 1.0, "Client instance starts: --load-format netloader\n"
         "vLLM builds the empty model (no weights yet)", END, False),
        (main, 13.5, 3.6, 1.5, "SOURCE lists seeds\nfor my rank?", DECISION, True),
        (main, 12.0, w, 0.7, "Take the next seed address", STEP, False),
        (main, 10.35, w, 1.75, "Handshake over TCP (TIMEOUT on every step)\n"
         "seed: challenge with a fresh nonce\n"
         "client: hello = proof of the shared secret (HMAC),\n"
         "model identity, tensor manifest\n"
         "seed: checks proof, identity and manifest", STEP, False),
        (main, 8.55, 3.0, 1.3, "accepted?", DECISION, True),
        (main, 6.85, w, 1.35, "Two-rank stateless group (gloo / nccl / hccl)\n"
         "seed sends the tensors as loaded, in BUCKET_MB buckets;\n"
         "client stages each bucket, checks each tensor's\n"
         "blake3 digest, copies only verified bytes into the model",
         STEP, False),
        (main, 5.15, 3.4, 1.4, "every digest\nverified?", DECISION, True),
        (main, 3.75, w, 0.8, "vLLM runs process_weights_after_loading\n"
         "(the same code as after a disk load)", STEP, False),
        (main, 2.5, w, 0.8, "Start my own seed listener on LISTEN_PORT + rank\n"
         "(address written to OUTPUT_PREFIX<rank>.txt)", STEP, False),
        (main, 1.3, w, 0.7, "Serve requests, and seed the next instances", END, False),
        (mid, 12.0, 2.6, 1.4, "another\naddress?", DECISION, True),
        (right, 6.85, 3.6, 1.35, "Load from disk into\nthe same model\n"
         "(vLLM's default loader)", FAIL, False),
    ]
    for x, y, nw, nh, text, color, diamond in nodes:
        _node(ax, x, y, nw, nh, text, color, diamond)
    # Main path, top to bottom.
    for top, bottom in [(14.6, 14.25), (12.75, 12.35), (11.65, 11.23), (9.47, 9.2),
                        (7.9, 7.53), (6.17, 5.85), (4.45, 4.15), (3.35, 2.9), (2.1, 1.65)]:
        _route(ax, [(main, top), (main, bottom)])
    ax.text(main + 0.12, 12.55, "yes", fontsize=9, style="italic")
    ax.text(main + 0.12, 7.62, "yes: digests and a rendezvous port,\n"
            "with the seed's own proof", fontsize=9, style="italic")
    ax.text(main + 0.12, 4.2, "yes", fontsize=9, style="italic")
    # No seed for this rank, or no address left: disk.
    _route(ax, [(main + 1.8, 13.5), (right, 13.5), (right, 7.53)], "no", at=0)
    _route(ax, [(mid + 1.3, 12.0), (right, 12.0)], "no", at=0)
    _route(ax, [(mid - 1.3, 12.0), (main + w / 2, 12.0)], "yes", at=0,
           offset=(-0.1, 0.08), ha="right")
    # Failed seeds try the next address.
    _route(ax, [(main + 1.5, 8.55), (mid, 8.55), (mid, 11.3)],
           "no: refused (other model, layout,\nrank or secret), unreachable,\n"
           "busy past TIMEOUT", at=0, offset=(0.15, 0.1))
    _route(ax, [(main + 1.7, 5.15), (mid, 5.15), (mid, 8.55)],
           "no: client says 'rejected',\ngroup destroyed; each tensor\n"
           "untouched or exactly the seed's", at=0, offset=(0.15, 0.1))
    # Disk joins the main path before post-processing.
    _route(ax, [(right, 6.17), (right, 3.75), (main + w / 2, 3.75)])
    ax.text(0.2, 0.55, "Every failed seed is logged with its reason. The secret itself "
            "never crosses the wire; the seed keeps serving its own traffic throughout.",
            fontsize=9, color="#555")
    ax.set_title("Netloader: how a starting instance gets its weights", fontsize=14, pad=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- timing


def _bars(ax: Axes, lanes: list[dict[str, Any]], x0: float = 0.0, scale: float = 1.0,
          window: tuple[float, float] | None = None, label_min: float = 0.0) -> None:
    """One row per lane; each phase a bar from its start to its end (in ``scale``
    units after ``x0``); bars wider than ``label_min`` carry their name."""
    for row, lane in enumerate(reversed(lanes)):
        for p in lane["phases"]:
            if window is not None and (p["end"] < window[0] or p["start"] > window[1]):
                continue
            start, width = (p["start"] - x0) * scale, (p["end"] - p["start"]) * scale
            send = p["kind"] == "send"
            height, y = (0.22, row + 0.42) if send else (0.6, row)
            ax.barh(y, width, left=start, height=height, color=KIND_COLORS[p["kind"]],
                    edgecolor="#555", lw=0.6, hatch="//" if p["kind"] == "serve" else None)
            inside = window is None or window[0] <= p["start"] and p["end"] <= window[1]
            if width >= label_min and inside and not send:
                ax.text(start + width / 2, row, p["phase"], ha="center", va="center",
                        fontsize=8.5, clip_on=True)
    ax.set_yticks(range(len(lanes)), [lane["name"] for lane in reversed(lanes)], fontsize=11)
    ax.set_ylim(-0.6, len(lanes) - 0.3)
    ax.grid(axis="x", color="#ddd", lw=0.6)
    ax.set_axisbelow(True)


def _phase(lanes: list[dict[str, Any]], lane: str, kind: str) -> dict[str, Any]:
    found = next(lane_ for lane_ in lanes if lane_["name"] == lane)
    return next(p for p in found["phases"] if p["kind"] == kind)


def draw_timing(phases: dict[str, Any], path: Path) -> None:
    lanes = phases["lanes"]
    fig, (top, key, bottom) = plt.subplots(3, 1, figsize=(13, 10), layout="constrained",
                                           gridspec_kw={"height_ratios": [1.2, 0.3, 1]})
    end = max(p["end"] for lane in lanes for p in lane["phases"])
    _bars(top, lanes, label_min=end * 0.08)
    top.set_xlim(0, end)
    top.set_xlabel("seconds since the seed process started")
    manifest = _phase(lanes, "client", "manifest")
    handshake = _phase(lanes, "client", "handshake")
    keep = _phase(lanes, "client", "keep")
    client_start = _phase(lanes, "client", "startup")["start"]
    top.axvline(client_start, color="#666", ls="--", lw=1)
    send = _phase(lanes, "seed", "send")
    top.text(send["end"] + end * 0.005, 1.45, "sends to the client", fontsize=9, va="center")
    top.text(client_start + end * 0.005, 0.45, "client started (SOURCE = the seed)",
             fontsize=9, va="center")
    load_ms = (keep["end"] - manifest["start"]) * 1e3
    top.annotate(f"weights loaded here: {load_ms:.0f} ms\n(enlarged below)",
                 (handshake["start"], -0.3), xytext=(handshake["start"] - end * 0.03, -0.52),
                 ha="right", fontsize=9, arrowprops={"arrowstyle": "->", "color": "#333"})
    kinds = {p["kind"]: p["phase"] for lane in lanes for p in lane["phases"]}
    key.axis("off")
    key.legend(handles=[Patch(facecolor=KIND_COLORS[k], edgecolor="#555", label=name,
                              hatch="//" if k == "serve" else None)
                        for k, name in kinds.items() if k != "send"],
               loc="center", ncol=4, fontsize=9, frameon=False)
    top.set_title(f"Netloader start-up, measured: a seed, then a client fetching "
                  f"{phases['bytes'] / 1e6:.1f} MB from it ({Path(phases['model']).name})",
                  fontsize=12)

    # The client's load_weights, in milliseconds from its connect to the seed.
    x0 = handshake["start"]
    span = keep["end"] - manifest["start"]
    window = (manifest["start"] - 0.12 * span, keep["end"] + 0.12 * span)
    _bars(bottom, lanes, x0=x0, scale=1e3, window=window,
          label_min=(window[1] - window[0]) * 1e3 * 0.12)
    bottom.set_xlim((window[0] - x0) * 1e3, (window[1] - x0) * 1e3)
    bottom.set_xlabel("milliseconds since the client connected to the seed")
    # Log timestamps have millisecond resolution.
    for p in (manifest, handshake, _phase(lanes, "client", "transfer"), keep):
        ms = (p["end"] - p["start"]) * 1e3
        bottom.text((p["start"] + p["end"] - 2 * x0) / 2 * 1e3, -0.42,
                    f"{ms:.0f} ms" if ms >= 1 else "< 1 ms", ha="center", fontsize=9)
    bottom.text((send["end"] - x0) * 1e3 + span * 1e3 * 0.01, 1.53, "seed: sending "
                f"({(send['end'] - send['start']) * 1e3:.0f} ms)", fontsize=9, va="center")
    bottom.set_title("The client's load_weights, enlarged (the seed keeps serving)",
                     fontsize=11)
    fig.supxlabel("Measured by `make docs-images`: wall-clock timestamps of the servers' own "
                  "log lines and the demo's /health polls (examples/netloader/demo.py "
                  "--phases-out).", fontsize=8, color="#555")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the Netloader user-guide images.")
    parser.add_argument("--phases", type=Path, required=True,
                        help="JSON written by examples/netloader/demo.py --phases-out")
    parser.add_argument("--out", type=Path,
                        default=Path("docs/source/user_guide/feature_guide/images"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    draw_flow(args.out / "netloader_flow.png")
    draw_timing(json.loads(args.phases.read_text()), args.out / "netloader_timing.png")
    print(f"wrote {args.out / 'netloader_flow.png'} and {args.out / 'netloader_timing.png'}")


if __name__ == "__main__":
    main()
