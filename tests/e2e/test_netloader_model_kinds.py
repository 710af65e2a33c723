"""The model kinds operators serve, each given the dense model's proof (the guide's
support matrix points here).

For each kind, three in-process vLLM CPU instances (tests/helpers/dump_instance.py):
an ``auto`` disk load (the reference), a Netloader seed that loaded from disk, and a
client whose model directory (and draft directory) has no weight files, so it can
only get them from the seed (EXPECTED_FINGERPRINT and DRAFT_EXPECTED_FINGERPRINT name
the seed's checkpoint fingerprints). The client's greedy
texts and per-token logprobs (embeddings, for a pooling model) equal the disk
load's, its runtime tensors after processing equal the disk load's bit for bit,
and what its load set besides tensors equals the seed's. Each kind moves in the
layout the guide's support matrix gives (the processed one with processing skipped,
or the loaded one, with the seed's reason why not), and every seed reports what it
keeps beyond the running model (``retained_bytes``), the figure the guide gives per
kind. The seeds' configs are written as vllm-ascend's are: lowercase keys, no
INT8_CACHE (its default, ``no``), except where the loaded layout needs a copy.
"""

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.e2e import (
    ServingDump,
    address_of,
    assert_equal_tensors,
    dump,
    dump_args,
    weightless_copy,
)
from tools.make_tiny_model import main as make_tiny_model
from vllm_ascend.model_loader.netloader.client import query_seed

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Kind:
    """How to make a model kind and run it: ``make`` arguments for
    tools/make_tiny_model.py, ``llm`` keyword arguments for vllm.LLM (a ``draft``
    kind's directory goes in the speculative config)."""

    make: tuple[str, ...]
    llm: dict = field(default_factory=dict)
    draft: tuple[str, ...] | None = None
    lora: tuple[str, ...] | None = None
    # The seed's own vllm.LLM arguments, where they differ (a seed without LoRA).
    seed_llm: dict | None = None
    image_prompt: str | None = None
    # False where vLLM CPU loads the model but cannot run it here (tensors only).
    generate: bool = True
    # The layout the client gets; a loaded-layout seed keeps its copies (INT8_CACHE hbm).
    layout: str = "processed"


EAGLE = {"speculative_config": {"method": "eagle", "num_speculative_tokens": 2}}
EAGLE3 = {"speculative_config": {"method": "eagle3", "num_speculative_tokens": 2}}
MTP = {"speculative_config": {"method": "mtp", "num_speculative_tokens": 1}}
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
LORA = {"enable_lora": True, "max_lora_rank": 8}
# Not here, with the reason in the guide's support matrix: expert parallelism (vLLM
# CPU's fused MoE kernel segfaults with --enable-expert-parallel), Qwen2-VL and other
# vision models whose vLLM code imports torchvision (no CPU build of it here).
KINDS: dict[str, Kind] = {
    "eagle": Kind((), EAGLE, draft=("--kind", "eagle")),
    "eagle3": Kind((), EAGLE3, draft=("--kind", "eagle3")),
    "mtp": Kind(("--kind", "mtp"), MTP),
    "moe": Kind(("--kind", "moe")),
    "moe-tp2": Kind(("--kind", "moe"), TP2),
    # CompressedTensorsLinearMethod, AWQ and GPTQ do not declare
    # supports_pre_processed_weights: the loaded layout.
    "w8a8": Kind(("--kind", "w8a8"), layout="loaded"),
    # vLLM CPU loads and processes int4 checkpoints here, but this CPU's build (AVX2)
    # has no cpu_gemm_wna16 kernel to run them: runtime tensors only.
    "awq": Kind(("--kind", "awq"), generate=False, layout="loaded"),
    "gptq": Kind(("--kind", "gptq"), generate=False, layout="loaded"),
    # A seed without LoRA serves a client with it, and the other way round (vLLM wraps
    # the layers for LoRA after loading: the adapter is not a weight).
    "lora": Kind((), LORA, lora=("--kind", "lora"), seed_llm={}),
    "lora-seed": Kind((), {}, seed_llm=LORA),
    "embed": Kind(("--kind", "embed"), {"runner": "pooling"}),
    "vl": Kind(("--kind", "vl"), {"limit_mm_per_prompt": {"image": 1}},
               image_prompt="User:<image>Describe it.<end_of_utterance>\nAssistant:"),
}


def build(workdir: Path, name: str, args: tuple[str, ...]) -> str:
    path = workdir / "kinds" / name
    make_tiny_model([str(path), *args])
    return str(path)


def hide_weights(model: Path) -> None:
    """Move the weight files out of ``model``'s directory (to its ``hidden`` sibling)."""
    hidden = model.with_name(model.name + "-hidden")
    hidden.mkdir(exist_ok=True)
    for f in model.glob("*.safetensors"):
        f.rename(hidden / f.name)


def wait_for_seeds(
    seed: ServingDump, prefix: Path, ranks: int, draft: bool, timeout_s: float = 300
) -> dict[str, list[dict]]:
    """``seeds_of`` once every rank's address file is there (the seed listens)."""
    tags = ["", "draft"] if draft else [""]
    deadline = time.monotonic() + timeout_s
    while not all(Path(f"{prefix}{tag}{r}.txt").exists() for tag in tags for r in range(ranks)):
        assert seed.running() and time.monotonic() < deadline, seed.log.read_text()[-6000:]
        time.sleep(0.5)
    return seeds_of(prefix, ranks, draft)


def seeds_of(prefix: Path, ranks: int, draft: bool) -> dict[str, list[dict]]:
    """Each role's per-rank seed ``info``, found through OUTPUT_PREFIX address files
    (the seeds of TP ranks live in worker processes)."""
    roles = {"target": ""} | ({"draft": "draft"} if draft else {})
    return {
        role: [query_seed(address_of(f"{prefix}{tag}", r)) for r in range(ranks)]
        for role, tag in roles.items()
    }


def prove(workdir: Path, name: str, kind: Kind) -> dict:
    """Run the kind's three instances; assert the client equals the disk load and
    return the seeds' ``info`` (for figures)."""
    model = build(workdir, name, kind.make)
    llm = json.loads(json.dumps(kind.llm))
    ranks = llm.get("tensor_parallel_size", 1)
    spec = llm.get("speculative_config")
    if kind.draft is not None:
        spec["model"] = build(workdir, f"{name}-draft", kind.draft)
    run = ["--generate"] if kind.generate else []
    if kind.lora is not None:
        run += ["--lora", build(workdir, f"{name}-lora", kind.lora)]
    if kind.image_prompt is not None:
        run += ["--image-prompt", kind.image_prompt]
    more = ["--llm", json.dumps(llm), *run]
    seed_more = more if kind.seed_llm is None else [
        "--llm", json.dumps(kind.seed_llm), *(["--generate"] if kind.generate else [])]
    out = workdir / "kinds" / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"} if (
        ranks > 1) else {}
    # MODEL names the model alike on both sides (the paths differ). The seed and the
    # `auto` reference start together; the client starts once the seed listens and
    # `auto` is done, in the same process as `auto` (one import of vLLM less) at TP=1.
    seed_extra = {"model": name, "output_prefix": f"{out}/{name}-seed-"}
    if kind.layout == "loaded":
        seed_extra["int8_cache"] = "hbm"
    seed = ServingDump(model, out / f"{name}-seed.safetensors", seed_extra, *seed_more,
                       env=env or {"VLLM_CPU_OMP_THREADS_BIND": "0"})
    then = out / f"{name}-client.json"
    client_out = out / f"{name}-client.safetensors"
    disk_run = ServingDump(model, out / f"{name}-auto.safetensors", {}, *more,
                           *(["--then-file", str(then)] if ranks == 1 else []),
                           env=env or {"VLLM_CPU_OMP_THREADS_BIND": "1"},
                           load_format="auto", serve=False)
    started: ServingDump | None = None
    try:
        seeds = wait_for_seeds(seed, out / f"{name}-seed-", ranks, spec is not None)
        extra = {
            "MODEL": name, "OUTPUT_PREFIX": f"{out}/{name}-client-",
            # The checkpoint fingerprint: one for every rank and role of this model.
            "EXPECTED_FINGERPRINT": seeds["target"][0]["identity"]["checkpoint"],
        }
        for role, key in (("target", "SOURCE"), ("draft", "DRAFT_SOURCE")):
            if role in seeds:
                extra[key] = [{"device_id": r, "sources": [s["address"]]}
                              for r, s in enumerate(seeds[role])]
        bare = weightless_copy(model, out / f"{name}-bare")
        reference, disk = disk_run.report()
        if kind.draft is not None:
            # A draft is named by its own path, so the client's is the seed's, with its
            # weight files taken away now that the seed and `auto` have loaded them.
            extra["DRAFT_EXPECTED_FINGERPRINT"] = seeds["draft"][0]["identity"]["checkpoint"]
            hide_weights(Path(spec["model"]))
        # A serving instance too: its seeds (in worker processes at TP > 1) answer
        # ``info`` until it stops.
        if ranks == 1:
            argv = dump_args(bare, client_out, "netloader", extra, *more, "--serve")
            tmp = then.with_suffix(".tmp")
            tmp.write_text(json.dumps(argv))
            tmp.rename(then)
            received, client = disk_run.report(index=1, out=client_out)
        else:
            started = ServingDump(bare, client_out, extra, *more, env=env)
            received, client = started.report()
        seed_tensors, served = seed.report()
        clients = seeds_of(out / f"{name}-client-", ranks, spec is not None)
    finally:
        for running in (started, disk_run, seed):
            if running is not None:
                running.stop()
    for role, infos in seeds.items():
        for mine, theirs in zip(clients[role], infos, strict=True):
            assert mine["loaded_from"] == f"seed {theirs['address']}"
            assert mine["loaded_layout"] == kind.layout
            # The processed layout's values, or the loaded ones (the top level: a seed
            # with INT8_CACHE no keeps their digests, not all their bytes).
            key = (("layouts", "processed", "value_fingerprint") if kind.layout == "processed"
                   else ("value_fingerprint",))
            assert _at(mine, key) == _at(theirs, key)
            assert mine["load_state"] == theirs["load_state"]
            if kind.layout == "processed":
                # All a seed keeps is the kernel inputs its model packed away
                # (vLLM CPU's oneDNN linears); INT8_CACHE no keeps no loaded copy.
                assert theirs["retained_bytes"] == theirs["retained_for_processed_bytes"]
            else:
                assert "pre-processed" in theirs["layouts"]["processed"]["unavailable"]
    if kind.layout == "processed":
        log = (started or disk_run).log.read_text(errors="replace")
        assert log.count("processing skipped") == ranks * len(seeds), log[-3000:]
    assert_equal_tensors(received, reference)
    if kind.generate:
        assert client["outputs"] == disk["outputs"]
        assert client["draft"] == disk["draft"]
        # Draft tokens proposed and accepted (vLLM's spec_decode counters, as /metrics
        # shows them): the same on the client as on the disk load and the seed.
        assert client["spec"] == disk["spec"]
        if spec is not None:
            # Random heads may have none accepted (EAGLE-3 here); all propose.
            assert disk["spec"]["drafted"] > 0
            assert served["spec"] == disk["spec"]
        # Not vacuous: every prompt generated tokens (or an embedding).
        assert all(v for v in disk["outputs"].values())
    if kind.seed_llm is None:
        assert_equal_tensors(seed_tensors, reference)
        assert served.get("outputs") == disk.get("outputs")
    elif kind.generate:
        assert served["outputs"]["greedy"] == disk["outputs"]["greedy"]
    print(f"KIND {name}: " + json.dumps({
        role: [{k: s[k] for k in ("bytes", "retained_bytes", "retained_tensors",
                                  "retained_for_processed_bytes", "load_state")}
               for s in infos]
        for role, infos in seeds.items()
    }))
    return seeds


def _at(info: dict, path: tuple[str, ...]) -> object:
    for key in path:
        info = info[key]
    return info


@pytest.mark.parametrize("name", sorted(KINDS))
def test_client_of_each_model_kind_equals_a_disk_load(workdir, name):
    prove(workdir, name, KINDS[name])


def test_online_quantization_is_refused_before_any_handshake_and_loads_from_disk(
    model, workdir
):
    """`fp8_per_channel` over the bf16 checkpoint keeps linear weights on the meta
    device until load_weights: nothing to receive into. The client says so and loads
    from disk without connecting to its SOURCE, and equals an `auto` instance."""
    llm = ["--llm", json.dumps({"quantization": "fp8_per_channel"})]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        source = f"127.0.0.1:{listener.getsockname()[1]}"
        received, report = dump(
            model, workdir / "online-fp8.safetensors", "netloader",
            {"SOURCE": [{"device_id": 0, "sources": [source]}]}, *llm,
        )
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    (own,) = report["seeds"]
    assert own["loaded_from"] == "disk"
    (reason,) = own["fallback_reasons"]
    assert "on the meta device until load_weights" in reason
    assert "online quantization cannot be fetched" in reason
    reference, _ = dump(model, workdir / "online-fp8-auto.safetensors", "auto", {}, *llm)
    assert_equal_tensors(received, reference)
