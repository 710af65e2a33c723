"""What a model is, for a seed and a client that must agree before any weight moves.

The identity names the model (config fingerprint, dtype, quantization, layout of
ranks and role), *what its weights are* (a fingerprint of the checkpoint files'
content), and the software that laid the tensors out (vLLM, torch, Netloader's
layout version): the seed sends vLLM's internal post-``load_weights`` layout,
which may change between versions.

The checkpoint fingerprint reads little: each file's name and size, a safetensors
file's whole header (every tensor's name, dtype, shape and offsets), and three
``SAMPLE_BYTES`` samples (start, middle, end) of every tensor's data; files of other
formats are sampled every ``_STRIDE_BYTES``. Two fine-tunes of one base have
equal headers and sizes but differ in every sampled tensor, so they differ here.
Two checkpoints that differ only in bytes no sample covers would fingerprint the
same; the value fingerprint (``manifest.value_fingerprint``, every byte) is what
pins a model exactly, and a client may require it (``EXPECTED_FINGERPRINT``).
"""

import glob
import json
import os
import struct
from typing import Any

import blake3

from vllm_ascend.model_loader.netloader.manifest import TARGET

# Version of what Netloader sends: the model's tensors in ``manifest.model_tensors``
# order, as loaded or as processed (``layout``), with the load state. 2: since
# ``load_state``; 3: since the processed layout and the expert/data-parallel fields.
# Bump it when that changes.
LAYOUT_VERSION = 3
SAMPLE_BYTES = 4096
_STRIDE_BYTES = 64 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")

# Fields a client and its seed must agree on, in the order they are reported.
# ``checkpoint`` and ``checkpoint_exact`` are compared only when both sides have one
# (see ``identity_difference``).
IDENTITY_FIELDS = (
    "model",
    "architectures",
    "config_sha256",
    "dtype",
    "quantization",
    "revision",
    "checkpoint",
    "checkpoint_exact",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel",
    "expert_parallel",
    "rank",
    "role",
    "vllm_version",
    "torch_version",
    "layout",
)

# Compared only where both sides have one: a node without weight files has no
# checkpoint fingerprint, and only a hub cache snapshot or a digested directory has an
# exact one (``exact_checkpoint``; an older release sends none).
_IF_BOTH_HAVE_ONE = ("checkpoint", "checkpoint_exact")

# How a seed's refusal of another model's (or layout's) client starts.
IDENTITY_DIFFERS = "model identity differs"

# How an instance splits the model (its layout), as opposed to what the model is: a
# client in another layout compares the rest (``model_difference``) and gathers its
# slices (``reshard``).
LAYOUT_FIELDS = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel",
    "expert_parallel",
    "rank",
)


class CheckpointError(Exception):
    """A checkpoint file cannot be read or is not what its name says."""


def model_identity(
    model_config: Any,
    parallel_config: Any,
    rank: int,
    name: str,
    role: str = TARGET,
    checkpoint: str | None = None,
    checkpoint_exact: str | None = None,
) -> dict[str, Any]:
    """The identity of rank ``rank``'s shard; ``checkpoint`` is
    ``checkpoint_fingerprint`` of its weight files (None: this node has none),
    ``checkpoint_exact`` their exact fingerprint where one exists
    (``exact_checkpoint``)."""
    import torch
    import vllm

    return {
        "model": name,
        "architectures": list(getattr(model_config.hf_config, "architectures", None) or []),
        "config_sha256": config_sha256(model_config.hf_config.to_dict()),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "quantization": model_config.quantization,
        "revision": model_config.revision,
        "checkpoint": checkpoint,
        "checkpoint_exact": checkpoint_exact,
        "tensor_parallel_size": parallel_config.tensor_parallel_size,
        "pipeline_parallel_size": parallel_config.pipeline_parallel_size,
        "data_parallel": data_parallel(parallel_config),
        "expert_parallel": expert_parallel(parallel_config, rank),
        "rank": rank,
        "role": role,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "layout": LAYOUT_VERSION,
    }


def data_parallel(parallel_config: Any) -> list[int]:
    """[data-parallel size, this engine's data-parallel rank, prefill context-parallel
    size]: with experts sharded over data-parallel ranks, equal shapes on equal world
    ranks hold different experts (vllm/config/parallel.py ``ParallelConfig``)."""
    return [
        int(getattr(parallel_config, "data_parallel_size", 1)),
        int(getattr(parallel_config, "data_parallel_rank", 0)),
        int(getattr(parallel_config, "prefill_context_parallel_size", 1)),
    ]


def expert_parallel(parallel_config: Any, rank: int) -> dict[str, Any] | None:
    """Where this rank's experts sit, or None without expert parallelism.

    vLLM shards experts over ``tp * pcp * dp`` ranks when ``enable_expert_parallel`` is
    set (``FusedMoEParallelConfig.make``, vllm/model_executor/layers/fused_moe/config.py):
    the size, this rank's place among them, how experts are placed on ranks
    (``expert_placement_strategy``), how many redundant experts EPLB adds and whether
    EPLB moves experts while serving (a seed whose placement moved refuses: see
    ``seed.server``)."""
    if not getattr(parallel_config, "enable_expert_parallel", False):
        return None
    dp_size, dp_rank, pcp = data_parallel(parallel_config)
    inner = int(parallel_config.tensor_parallel_size) * pcp
    eplb = getattr(parallel_config, "eplb_config", None)
    return {
        "size": inner * dp_size,
        "rank": dp_rank * inner + rank % inner,
        "placement": str(getattr(parallel_config, "expert_placement_strategy", "linear")),
        "redundant_experts": int(getattr(eplb, "num_redundant_experts", 0) or 0),
        "dynamic_eplb": bool(getattr(parallel_config, "enable_eplb", False)),
    }


def expert_placement(model: Any) -> str:
    """sha256 (hex) of where this rank's experts sit now: every tensor of the model whose
    name holds an expert map (vLLM's ``expert_map``, EPLB's logical/physical maps), as a
    parameter, buffer or module attribute. Dynamic EPLB rewrites them when it moves
    experts (vllm/distributed/eplb/)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, module in model.named_modules():
        for attr, value in sorted(vars(module).items()):
            tensors = value.items() if attr in ("_parameters", "_buffers") else [(attr, value)]
            for leaf, t in tensors:
                if (isinstance(t, torch.Tensor) and not t.is_meta
                        and any(k in leaf for k in _EXPERT_MAPS)):
                    h.update(f"{name}.{leaf}:".encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_EXPERT_MAPS = ("expert_map", "logical_to_physical", "physical_to_logical")


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of an HF config as a dict, without private keys and the transformers
    version that wrote it (neither changes the model)."""
    import hashlib

    kept = {
        k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def identity_difference(mine: dict[str, Any], theirs: Any) -> str | None:
    """Why two identities differ (every differing field), or None if they match.

    A side without a checkpoint fingerprint (no weight files on its node) does not
    compare it: such a client names the weights it accepts by ``EXPECTED_FINGERPRINT``
    and checks the seed's answer itself."""
    if not isinstance(theirs, dict):
        return "identity is not an object"
    diffs = []
    for key in IDENTITY_FIELDS:
        a, b = mine.get(key), theirs.get(key)
        if key in _IF_BOTH_HAVE_ONE and (a is None or b is None):
            continue
        if a != b:
            diffs.append(f"{key}: {_short(a)} here vs {_short(b)} there")
    return "; ".join(diffs) or None


def only_layout_differs(refusal: str) -> bool:
    """Whether a seed's refusal (``IDENTITY_DIFFERS: key: ... here vs ... there; ...``,
    as ``identity_difference`` words it) names layout fields only: that seed may serve
    across layouts. Anything else (or a wording this side cannot read): False."""
    if not refusal.startswith(f"{IDENTITY_DIFFERS}: "):
        return False
    fields = [part.split(":", 1)[0].strip()
              for part in refusal.removeprefix(f"{IDENTITY_DIFFERS}: ").split("; ")]
    return bool(fields) and all(field in LAYOUT_FIELDS for field in fields)


def model_difference(mine: dict[str, Any], theirs: Any) -> str | None:
    """``identity_difference`` over what the model is, whatever the layout
    (``LAYOUT_FIELDS`` left out): a seed in any layout holds slices of the same model."""
    if not isinstance(theirs, dict):
        return "identity is not an object"
    strip = dict.fromkeys(LAYOUT_FIELDS)
    return identity_difference({**mine, **strip}, {**theirs, **strip})


def _short(value: Any) -> str:
    """``repr(value)``, cut to 100 characters: a peer's value goes into logs."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def weight_files(
    model_path: str, revision: str | None = None, cache_dir: str | None = None
) -> list[str]:
    """The checkpoint files vLLM's default loader would read for ``model_path``, found
    on this node only (never downloaded); [] when there are none.

    A local directory is searched as vLLM does (safetensors first, filtered by the
    index; else .bin/.pt without training state); a hub id is looked up in the hub
    cache the default loader uses (``--download-dir``, else the default cache)."""
    folder = (
        model_path if os.path.isdir(model_path)
        else _cached_snapshot(model_path, revision, cache_dir)
    )
    if folder is None:
        return []
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if not files:
            continue
        if pattern == "*.safetensors":
            return _in_safetensors_index(files, folder)
        return [f for f in files if not f.endswith(_NOT_WEIGHTS)]
    return []


def checkpoint_fingerprint(files: list[str]) -> str:
    """blake3 over each file's name, size and sampled content (see the module doc),
    as 64 hex digits. Raises ``CheckpointError`` for an unreadable or malformed file."""
    h = blake3.blake3(b"netloader-checkpoint-v1\0")
    for path in sorted(files, key=os.path.basename):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{os.path.basename(path)}\0{size}\0".encode())
                if path.endswith(".safetensors"):
                    _hash_safetensors(f.fileno(), size, h, path)
                else:
                    for start in range(0, size, _STRIDE_BYTES):
                        _hash_range(f.fileno(), start, min(size, start + SAMPLE_BYTES), h)
                    _hash_range(f.fileno(), max(0, size - SAMPLE_BYTES), size, h)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
    return h.hexdigest()


def _hash_safetensors(fd: int, size: int, h: Any, path: str) -> None:
    if size < 8:
        raise CheckpointError(f"{path} is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
        raise CheckpointError(f"{path} has a safetensors header of {header_len} bytes")
    header = os.pread(fd, header_len, 8)
    h.update(header)
    try:
        entries = json.loads(header)
        ranges = sorted(
            tuple(info["data_offsets"]) for key, info in entries.items() if key != "__metadata__"
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} has a malformed safetensors header: {e}") from e
    base = 8 + header_len
    for begin, end in ranges:
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path} has malformed data offsets {begin}, {end}")
        _sample_tensor(fd, base + begin, min(size, base + end), h)


def _sample_tensor(fd: int, begin: int, end: int, h: Any) -> None:
    length = end - begin
    if length <= 3 * SAMPLE_BYTES:
        _hash_range(fd, begin, end, h)
        return
    middle = begin + (length - SAMPLE_BYTES) // 2
    for start in (begin, middle, end - SAMPLE_BYTES):
        _hash_range(fd, start, start + SAMPLE_BYTES, h)


def _hash_range(fd: int, begin: int, end: int, h: Any) -> None:
    if end > begin:
        h.update(os.pread(fd, end - begin, begin))


def _in_safetensors_index(files: list[str], folder: str) -> list[str]:
    """Only the files the index names, when there is an index (vLLM's rule: a folder
    may also hold a consolidated copy of the same weights)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return files
    try:
        with open(index, encoding="utf-8") as f:
            named = {os.path.join(folder, v) for v in json.load(f)["weight_map"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from e
    return [f for f in files if f in named]


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
        ))
    except (ImportError, OSError, ValueError):
        # Not in the local cache (LocalEntryNotFoundError is both), or not a hub id.
        return None
