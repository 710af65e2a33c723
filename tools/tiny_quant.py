#!/usr/bin/env python
"""Write quantized checkpoints and a LoRA adapter of a tiny model, offline and deterministically.

Given a dense model directory written by ``tools/make_tiny_model.py`` (or, without
``--base``, one generated on the fly into a temporary directory), each kind below
quantizes the real dense weights (round-to-nearest, no calibration data) and writes
them in the on-disk layout the named quantizer produces, so vLLM loads them with
``load_format="auto"`` exactly as it would load the real thing:

* ``awq``:  AutoAWQ GEMM int4 (``qweight``/``qzeros``/``scales``), asymmetric.
* ``gptq``: AutoGPTQ int4 (``qweight``/``qzeros``/``scales``/``g_idx``), symmetric.
* ``w8a8``: compressed-tensors ``int-quantized`` W8A8 (int8 per-channel weights,
  dynamic per-token int8 activations), as llm-compressor writes it.
* ``lora``: a PEFT LoRA adapter (rank 8 on ``q_proj``/``v_proj``) for the dense model.

Only the decoder's linear layers are quantized; embeddings, norms, biases and
``lm_head`` stay in floating point, as the real tools leave them. Tokenizer and
generation config files are copied from the base. Running a kind twice with the same
base produces byte-identical files.

On vLLM 0.32's CPU build, awq and gptq load but cannot run on an AVX2-only host: the
forward needs ``torch.ops._C.cpu_gemm_wna16``, which only the AVX512 kernels library
(``_C_AVX512``/``_C``) has. w8a8 and lora run on AVX2.

Examples::

    python -m tools.tiny_quant awq /tmp/tiny-awq --base /tmp/tiny-qwen
    python -m tools.tiny_quant lora /tmp/tiny-lora          # generates a default base
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

try:
    from tools.make_tiny_model import DTYPES, MARKER_FILE, sha256, write_json
    from tools.make_tiny_model import main as make_tiny_model_main
except ImportError:  # run as a script: tools/ itself is on sys.path
    from make_tiny_model import DTYPES, MARKER_FILE, sha256, write_json  # type: ignore
    from make_tiny_model import main as make_tiny_model_main  # type: ignore

KINDS = ("awq", "gptq", "w8a8", "lora")
# Decoder linear layers that AutoAWQ / AutoGPTQ / llm-compressor quantize in a Qwen2 model.
QUANT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Files copied verbatim from the base directory (the ones that exist).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt")
# AutoAWQ's order of the 8 output columns inside one int32 (nibble i holds column
# AWQ_PACK_ORDER[i]); vLLM's auto_awq.py undoes it with _REVERSE_AWQ_PACK_ORDER.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
INT4_BITS = 4
PACK = 32 // INT4_BITS
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "v_proj")
SEED = 1234
CT_VERSION = "0.17.0"  # compressed-tensors release that vLLM 0.32 depends on


# --------------------------------------------------------------------------- helpers

def load_base(base: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (config.json as a dict, all tensors) of a dense model directory."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise SystemExit(f"{base}: no model*.safetensors")
    return config, tensors


def is_quantized_linear(name: str) -> bool:
    module = name.removesuffix(".weight")
    return module != name and ".layers." in module and module.endswith(QUANT_LINEARS)


def pack_int4(values: torch.Tensor, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack 4-bit values (0..15) into int32 along ``dim``, 8 per word, nibble i (bits
    4i..4i+3) holding element ``order[i]`` of each group of 8 (sequential if None)."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // PACK, PACK)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(0, 32, INT4_BITS, dtype=torch.int64)
    packed = (v << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in // group_size, group_size] in float32."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise SystemExit(f"input size {in_f} is not a multiple of group size {group_size}")
    return w.float().reshape(out_f, in_f // group_size, group_size)


def pick_group_size(tensors: dict[str, torch.Tensor], wanted: int) -> int:
    """``wanted`` if it divides every quantized layer's input size, else the largest of
    128/64/32 that does (the sizes vLLM's CPU WNA16 and Marlin kernels accept)."""
    ins = {t.shape[1] for n, t in tensors.items() if is_quantized_linear(n)}
    for g in (wanted, 128, 64, 32):
        if all(i % g == 0 for i in ins):
            return g
    raise SystemExit(f"no group size divides all input sizes {sorted(ins)}")


def write_checkpoint(base: Path, out: Path, config: dict, tensors: dict[str, torch.Tensor],
                     weights_name: str = "model.safetensors") -> None:
    """Write ``tensors`` (one file), ``config.json`` and the files copied from the base."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        old.unlink()
    for name in COPIED_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    if config:
        write_json(out / "config.json", config)
    path = out / weights_name
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates 0600 files


def quantize_model(base: Path, out: Path, config: dict, dense: dict[str, torch.Tensor],
                   dtype: torch.dtype, quant_config: dict,
                   quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
    """Replace every quantized linear's ``.weight`` by ``quantize(weight)`` (suffix ->
    tensor), cast the rest to ``dtype``, add ``quant_config`` to ``config`` and write."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in dense.items():
        if is_quantized_linear(name):
            prefix = name[: -len("weight")]
            for suffix, q in quantize(t).items():
                tensors[prefix + suffix] = q
        else:
            tensors[name] = t.to(dtype)
    config["quantization_config"] = quant_config
    config["torch_dtype"] = next(k for k, v in DTYPES.items() if v == dtype)
    write_checkpoint(base, out, config, tensors)


# --------------------------------------------------------------------------- kinds

def write_awq(base: Path, out: Path, group_size: int = 128) -> None:
    """AutoAWQ GEMM checkpoint (``version: gemm``), 4-bit with zero points, fp16.

    Follows AutoAWQ's ``WQLinear_GEMM.from_linear`` and what vLLM 0.32 reads in
    ``vllm/model_executor/layers/quantization/auto_awq.py`` (``AutoAWQConfig``;
    on CPU ``AutoAWQMarlinLinearMethod`` converts to the GPTQ layout in
    ``_convert_awq_to_standard_format`` and hands it to ``CPUWNA16LinearKernel``):

    * ``qweight`` int32 ``[in, out // 8]``: packed along the output dim, nibble i of
      each word holds column ``AWQ_PACK_ORDER[i]`` of its group of 8;
    * ``qzeros``  int32 ``[in // group, out // 8]``: integer zero points, same packing;
    * ``scales``  fp16  ``[in // group, out]``;
    * dequantized weight = ``(q - zero) * scale``.

    Weights are AWQ's asymmetric min/max round-to-nearest (``pseudo_quantize_tensor``
    with ``zero_point=True``) without the activation-aware search, which needs data.
    """
    config, dense = load_base(base)
    g = pick_group_size(dense, group_size)

    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        x = group_view(w, g)
        wmax, wmin = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
        scales = ((wmax - wmin).clamp(min=1e-5) / 15).half()
        s = scales.float()
        zeros = (-torch.round(wmin / s)).clamp(0, 15)
        q = (torch.round(x / s) + zeros).clamp(0, 15)
        q = q.reshape(w.shape)  # [out, in]
        return {
            "qweight": pack_int4(q.t(), dim=1, order=AWQ_PACK_ORDER),
            "qzeros": pack_int4(zeros.squeeze(-1).t(), dim=1, order=AWQ_PACK_ORDER),
            "scales": scales.squeeze(-1).t().contiguous(),
        }

    quantize_model(base, out, config, dense, torch.float16, {
        "quant_method": "awq",
        "bits": INT4_BITS,
        "group_size": g,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }, quantize)


def write_gptq(base: Path, out: Path, group_size: int = 128) -> None:
    """AutoGPTQ int4 checkpoint (``checkpoint_format: gptq``), symmetric, fp16.

    Follows AutoGPTQ's ``QuantLinear.pack`` and what vLLM 0.32 reads in
    ``vllm/model_executor/layers/quantization/auto_gptq.py`` (``AutoGPTQConfig``,
    quant type ``uint4b8``; ``CPUWNA16LinearKernel`` on CPU):

    * ``qweight`` int32 ``[in // 8, out]``: packed along the input dim, nibble i holds
      input row ``8k + i``;
    * ``qzeros``  int32 ``[in // group, out // 8]``: ``zero - 1`` (AutoGPTQ's v1 quirk),
      i.e. 7 for every group, packed sequentially along the output dim; vLLM ignores
      it for ``sym: true`` and uses the fixed bias 8;
    * ``scales``  fp16  ``[in // group, out]``;
    * ``g_idx``   int32 ``[in]`` = ``i // group`` (``desc_act: false``; vLLM drops it);
    * dequantized weight = ``(q - 8) * scale``.

    Round-to-nearest with AutoGPTQ's symmetric min/max scale (``2 * absmax / 15``);
    the GPTQ error-feedback pass needs calibration data and is skipped.
    """
    config, dense = load_base(base)
    g = pick_group_size(dense, group_size)

    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        x = group_view(w, g)
        absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        scales = (2 * absmax / 15).half()
        q = (torch.round(x / scales.float()) + 8).clamp(0, 15).reshape(w.shape)
        out_f, in_f = w.shape
        zeros = torch.full((in_f // g, out_f), 8 - 1, dtype=torch.int64)
        return {
            "qweight": pack_int4(q.t(), dim=0),
            "qzeros": pack_int4(zeros, dim=1),
            "scales": scales.squeeze(-1).t().contiguous(),
            "g_idx": (torch.arange(in_f, dtype=torch.int32) // g),
        }

    quantize_model(base, out, config, dense, torch.float16, {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": INT4_BITS,
        "group_size": g,
        "desc_act": False,
        "sym": True,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "model_file_base_name": None,
        "model_name_or_path": None,
    }, quantize)


def _ct_args(strategy: str, dynamic: bool, observer: str | None) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic,
            "actorder": None, "observer": observer, "observer_kwargs": {}}


def write_w8a8(base: Path, out: Path) -> None:
    """compressed-tensors W8A8 int8 checkpoint (``format: int-quantized``), as
    llm-compressor's ``W8A8`` preset writes it.

    Follows vLLM 0.32's ``vllm/model_executor/layers/quantization/compressed_tensors/
    compressed_tensors.py`` (``CompressedTensorsConfig.from_config``:
    ``config_groups.*.{targets,weights,input_activations}`` validated as
    ``QuantizationArgs``, ``format``, ``ignore``; ``_is_dynamic_token_w8a8`` selects
    ``schemes/compressed_tensors_w8a8_int8.py``, kernel ``CPUInt8ScaledMMLinearKernel``):

    * ``weight``       int8 ``[out, in]``, symmetric per output channel;
    * ``weight_scale`` ``[out, 1]`` in the model dtype (bf16), ``absmax / 127``;
    * activations: dynamic, per token, symmetric int8 (no tensors on disk).
    """
    config, dense = load_base(base)
    dtype = next(t.dtype for n, t in dense.items() if is_quantized_linear(n))

    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        absmax = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
        scale = (absmax / 127).to(dtype)
        q = torch.round(w.float() / scale.float()).clamp(-128, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale}

    quantize_model(base, out, config, dense, dtype, {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _ct_args("channel", False, "minmax"),
                "input_activations": _ct_args("token", True, None),
                "output_activations": None,
                "format": "int-quantized",
            },
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }, quantize)


def write_lora(base: Path, out: Path, rank: int = LORA_RANK, seed: int = SEED) -> None:
    """PEFT LoRA adapter for the dense model: ``adapter_config.json`` +
    ``adapter_model.safetensors`` (fp32, as PEFT saves adapters of a bf16 model).

    Follows PEFT's ``LoraConfig`` / ``get_peft_model_state_dict`` naming
    (``base_model.model.<module>.lora_A.weight`` ``[r, in]``, ``lora_B.weight``
    ``[out, r]``) and what vLLM 0.32 parses in ``vllm/lora/peft_helper.py``
    (required ``r``, ``lora_alpha``, ``target_modules``) and ``vllm/lora/lora_model.py``.
    Rank ``rank`` on ``q_proj`` and ``v_proj``, ``lora_alpha = 2 * rank``; both A and B
    are random (B is non-zero, unlike a fresh PEFT init) so the adapter changes outputs.
    """
    _, dense = load_base(base)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(dense, key=_layer_order):
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and module.endswith(LORA_TARGETS)):
            continue
        out_f, in_f = dense[name].shape
        a = torch.empty(rank, in_f).normal_(0.0, 1.0 / in_f**0.5, generator=gen)
        b = torch.empty(out_f, rank).normal_(0.0, 0.05, generator=gen)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    write_checkpoint(base, out, {}, tensors, weights_name="adapter_model.safetensors")
    write_json(out / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    })


def _layer_order(name: str) -> tuple[int, str]:
    """Sort key: layer index numerically, then name (so layer 10 follows layer 9)."""
    parts = name.split(".")
    idx = next((int(p) for p in parts if p.isdigit()), -1)
    return idx, name


WRITERS: dict[str, Callable[[Path, Path], None]] = {
    "awq": write_awq, "gptq": write_gptq, "w8a8": write_w8a8, "lora": write_lora,
}


def write_kind(kind: str, out: Path, base: Path | None = None, group_size: int = 128) -> Path:
    """Write ``kind`` into ``out``; without ``base`` a default tiny model is generated
    (with ``tools/make_tiny_model.py``'s defaults) into a temporary directory.
    ``group_size`` applies to awq and gptq only."""
    if kind not in WRITERS:
        raise SystemExit(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    out = out.resolve()

    def write(b: Path) -> None:
        if kind in ("awq", "gptq"):
            (write_awq if kind == "awq" else write_gptq)(b, out, group_size)
        else:
            WRITERS[kind](b, out)

    if base is not None:
        write(base.resolve())
        return out
    with tempfile.TemporaryDirectory(prefix="tiny-quant-base-") as tmp:
        make_tiny_model_main([tmp])
        write(Path(tmp))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--base", type=Path, default=None,
                    help="dense model directory from make_tiny_model.py (default: generate "
                         "one with its defaults in a temporary directory)")
    ap.add_argument("--group-size", type=int, default=128,
                    help="awq/gptq quantization group size (falls back to 128/64/32 when it "
                         "does not divide every input size)")
    args = ap.parse_args(argv)
    out = write_kind(args.kind, args.out_dir, args.base, args.group_size)
    files = sorted(f for f in out.iterdir() if f.is_file() and f.name != MARKER_FILE)
    total = sum(f.stat().st_size for f in files)
    print(f"{out}: {args.kind}, {len(files)} files, {total:,} bytes")
    for f in files:
        print(f"  {sha256(f)[:16]}  {f.stat().st_size:>10,}  {f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
