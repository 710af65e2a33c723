#!/usr/bin/env python
"""Write a small random-weight model directory, fully offline and deterministically.

The result is a real HuggingFace model directory (``config.json``,
``generation_config.json``, ``model*.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``) that vLLM and transformers load without network
access.  Running the script twice with the same arguments produces
byte-identical files.

``--kind`` picks the architecture (see KINDS): ``dense`` (default, Qwen2), ``llama``,
``eagle`` / ``eagle3`` (draft heads for a dense/llama target made with the same shape
options), ``mtp`` (MiMo with one MTP layer), ``moe`` (Qwen3-MoE), ``embed`` (Qwen3
embedding, run with runner="pooling"), ``vl`` (Idefics3) and ``qwen2vl`` (Qwen2-VL, needs
torchvision in vLLM).  The dense output (marker included) is the same as before kinds
existed; other kinds record ``kind`` in the marker file.

Examples::

    python tools/make_tiny_model.py /tmp/tiny-qwen
    python tools/make_tiny_model.py /tmp/qwen-1gb --target-gb 1
    python tools/make_tiny_model.py /tmp/tiny-eagle --kind eagle
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

MARKER_FILE = "netloader_tiny_model.json"
MARKER_VERSION = 1  # bump whenever the generated content changes
KIND_VERSION = 1  # bump whenever a non-dense kind's content changes (keeps dense markers as-is)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_EOS_TOKEN = "<|endoftext|>"
MAX_POSITIONS = 4096
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FILLER_SYLLABLES = (
    "al", "an", "ar", "be", "ca", "con", "de", "di", "en", "er", "ex", "for", "ge", "in", "is",
    "ka", "la", "le", "li", "lo", "ma", "me", "mi", "mo", "na", "ne", "no", "or", "pa", "per",
    "pre", "pro", "ra", "re", "ri", "ro", "sa", "se", "si", "so", "ta", "te", "ti", "to", "tra",
    "un", "ver", "vi",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer, written for this script (no external data).
CORPUS = """\
The morning train left the station at 7:45, carrying commuters, students and a few tourists
who had come to see the old harbour. Most of them read newspapers or looked at their phones,
but an elderly man by the window watched the fields roll past and counted the cows.

Bread is one of the oldest prepared foods. People baked flat loaves from ground grain more than
10,000 years ago, long before anyone understood yeast. Today a simple loaf needs only flour,
water, salt and time; the rest is patience, warmth and a hot oven at about 230 degrees.

In mathematics, a prime number is a whole number greater than 1 that has no divisors other than
1 and itself. The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. Euclid proved, around
300 BC, that there are infinitely many of them; his argument still fits on a single page.

The river rises in the hills, runs through three small towns and reaches the sea after 120
kilometres. In spring the water is high and brown; in late summer it is low, clear and slow,
and children can walk across the shallow places without getting their knees wet.

A computer program is a list of instructions. The processor fetches each instruction from
memory, decodes it, and executes it, billions of times per second. Programs are written in
languages such as Python, C, Rust or Java, and then translated into machine code.

Doctors recommend that adults sleep for seven to nine hours each night. Regular exercise,
fresh vegetables, enough water and time spent with friends are good for both body and mind.
Stress, noise and bright screens late in the evening make it harder to fall asleep.

The library opens at nine o'clock on weekdays and at ten on Saturdays. Visitors may borrow up
to 12 books for three weeks. Maps, old letters and photographs can be read in the quiet room
on the second floor, but they must not leave the building.

Weather forecasts combine measurements from satellites, balloons, ships and ground stations.
The data are fed into models that divide the atmosphere into millions of small boxes and
compute how pressure, temperature, wind and moisture change from one minute to the next.

She planted tomatoes, beans, carrots and a row of sunflowers along the fence. By August the
garden was full: the beans climbed over the gate, the tomatoes turned red in the heat, and the
sunflowers, taller than the house, followed the sun from east to west every day.

Music is organised sound. A melody is a sequence of notes; harmony is what happens when notes
sound together; rhythm is the pattern of long and short beats in time. A song written in 1965
may still be sung today, because people remember tunes far longer than they remember facts.

The company reported revenue of $4.2 million for the quarter, an increase of 8% over the same
period last year. Costs rose as well, mostly because of new hires and higher energy prices, so
the profit margin stayed close to 15 percent.

Mountains are formed when the plates of the earth's crust push against each other. Over
millions of years the rock folds, breaks and rises. Wind, rain and ice then wear the peaks
down again, carrying sand and stones into valleys, rivers and finally the ocean.

To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves per person and
let it stand for three to five minutes. Some people add milk, others lemon or honey; a few
prefer it plain, strong and very hot, served in a thin white cup.

The history of writing begins with marks on clay and stone. Early scribes kept records of
grain, cattle and taxes. Over time the signs became letters, letters became alphabets, and
alphabets made it possible for ordinary people to read, write and keep their own accounts.

Questions? Answers! Lists: one, two, three; pairs (a, b) and [x, y]; quotes "like this" and
'like that'; paths such as /usr/local/bin; e-mail: info@example.org; dates like 2024-05-17;
times like 12:30; sums like 3 + 4 = 7 and 6 * 7 = 42; ratios 1/2, 3/4 and 99.5%.

Birds migrate thousands of kilometres every year. Swallows leave Europe in autumn and spend
the winter in Africa, returning in April to the same barns and bridges. Scientists still study
how they find their way, using the sun, the stars and the magnetic field of the earth.

A good teacher listens as much as she speaks. She asks questions, waits for answers, and
explains the same idea in several different ways until every student in the room understands
it. Learning is slow at first and then, suddenly, it becomes easy.

The bridge was built in 1889 from iron and stone. It is 450 metres long and carries two lanes
of traffic, a railway line and a narrow path for people on foot. Every ten years engineers
inspect each bolt, paint the steel and replace the worn parts.

Cities grow around water, roads and markets. Shops open where people pass, houses appear near
the shops, and schools, hospitals and parks follow. A street that was empty fifty years ago
may now be busy with buses, bicycles, cafes and children walking home from school.

Chess is played on a board of 64 squares. Each player starts with sixteen pieces: one king,
one queen, two rooks, two bishops, two knights and eight pawns. The goal is to trap the other
king so that it cannot escape; this is called checkmate.

The ocean covers about 71 percent of the surface of the planet. Its deepest point lies almost
eleven kilometres below the waves. Whales, fish, coral and tiny plankton live in its waters,
and the currents move heat from the warm tropics toward the cold poles.
"""


@dataclass(frozen=True)
class ModelParams:
    """Everything that determines the generated files (stored in the marker file)."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    seed: int
    max_shard_gb: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    def validate(self) -> None:
        if self.hidden_size % self.heads:
            raise SystemExit(f"hidden size {self.hidden_size} not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise SystemExit(f"heads {self.heads} not divisible by kv heads {self.kv_heads}")
        if self.head_dim not in (64, 128):
            print(f"warning: head_dim={self.head_dim}; vLLM CPU attention prefers 64 or 128",
                  file=sys.stderr)
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise SystemExit("vocab size must be at least 259 (bytes + special tokens)")

    def num_parameters(self) -> int:
        h, kv, inter = self.hidden_size, self.kv_heads * self.head_dim, self.intermediate_size
        per_layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 3 * h * inter + 2 * h
        return 2 * self.vocab_size * h + self.layers * per_layer + h


HIDDEN_LADDER = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120)


def params_for_target(target_gb: float, vocab_size: int, dtype: str, seed: int,
                      max_shard_gb: float) -> ModelParams:
    """Pick a Qwen2 shape whose weights total about ``target_gb`` GB (1e9 bytes).

    Takes the widest hidden size from HIDDEN_LADDER that still gets at least
    ``hidden // 128`` layers (so the shape stays plausible), then fine-tunes the
    intermediate size (a multiple of 64, between 2x and 4x hidden) to hit the target.
    """
    bytes_per_param = torch.empty((), dtype=DTYPES[dtype]).element_size()
    target = target_gb * 1e9 / bytes_per_param

    def shape(hidden: int, layers: int, inter: int) -> ModelParams:
        heads = hidden // (64 if hidden < 1024 else 128)
        return ModelParams(hidden, layers, heads, heads // 2, inter, vocab_size, dtype, seed,
                           max_shard_gb)

    hidden, layers = HIDDEN_LADDER[0], 1
    for h in HIDDEN_LADDER:
        fixed = shape(h, 0, 3 * h).num_parameters()
        per_layer = shape(h, 1, 3 * h).num_parameters() - fixed
        n = round((target - fixed) / per_layer)
        if n >= max(2, h // 128) or h == HIDDEN_LADDER[0]:
            hidden, layers = h, max(1, n)
    # Solve for the intermediate size: each unit of it costs 3 * hidden * layers parameters.
    no_mlp = shape(hidden, layers, 0).num_parameters()
    inter = round((target - no_mlp) / (3 * hidden * layers) / 64) * 64
    return shape(hidden, layers, min(4 * hidden, max(2 * hidden, inter)))


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the embedded corpus."""
    # Same normalizer/pre-tokenizer as the real Qwen2 tokenizer, so the result encodes
    # identically whether it is loaded as PreTrainedTokenizerFast or as Qwen2Tokenizer
    # (transformers 5 picks the latter from config.json's model_type).
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def corpus_lines() -> Iterator[str]:
    # The prose is repeated so that its words win over the filler in the merge order.
    for _ in range(100):
        yield from CORPUS.splitlines(keepends=True)
    # Deterministic filler of made-up words so that larger vocab sizes (up to ~32k) are
    # reachable: all 2- and 3-syllable combinations of FILLER_SYLLABLES.
    words = ["".join(w) for n in (2, 3) for w in itertools.product(FILLER_SYLLABLES, repeat=n)]
    for i in range(0, len(words), 12):
        yield " ".join(words[i:i + 12]) + "\n"


# --------------------------------------------------------------------------------------
# Tensor specs.  A spec is (name, shape, init): init is 'normal' (N(0, 0.02), drawn from the
# kind's generator in spec order), 'ones', 'zeros', or a ready tensor that is stored as is.
# --------------------------------------------------------------------------------------

Spec = tuple[str, tuple[int, ...], "str | torch.Tensor"]


def mlp_specs(pre: str, hidden: int, inter: int) -> Iterator[Spec]:
    yield f"{pre}.gate_proj.weight", (inter, hidden), "normal"
    yield f"{pre}.up_proj.weight", (inter, hidden), "normal"
    yield f"{pre}.down_proj.weight", (hidden, inter), "normal"


def layer_specs(pre: str, p: ModelParams, *, qkv_bias: bool = True, qk_norm: bool = False,
                input_norm: bool = True, attn_in: int | None = None,
                mlp: bool = True) -> Iterator[Spec]:
    """One HF Llama/Qwen-style decoder layer (``{pre}.self_attn.*``, ``{pre}.mlp.*``)."""
    h = p.hidden_size
    widths = {"q": p.heads * p.head_dim, "k": p.kv_heads * p.head_dim,
              "v": p.kv_heads * p.head_dim}
    if input_norm:
        yield f"{pre}.input_layernorm.weight", (h,), "ones"
    for proj, width in widths.items():
        yield f"{pre}.self_attn.{proj}_proj.weight", (width, attn_in or h), "normal"
        if qkv_bias:
            yield f"{pre}.self_attn.{proj}_proj.bias", (width,), "normal"
    yield f"{pre}.self_attn.o_proj.weight", (h, widths["q"]), "normal"
    if qk_norm:
        yield f"{pre}.self_attn.q_norm.weight", (p.head_dim,), "ones"
        yield f"{pre}.self_attn.k_norm.weight", (p.head_dim,), "ones"
    yield f"{pre}.post_attention_layernorm.weight", (h,), "ones"
    if mlp:
        yield from mlp_specs(f"{pre}.mlp", h, p.intermediate_size)


def causal_lm_specs(p: ModelParams, *, prefix: str = "model.", qkv_bias: bool = True,
                    qk_norm: bool = False, lm_head: bool = True,
                    moe: tuple[int, int] | None = None, vocab: int | None = None,
                    ) -> Iterator[Spec]:
    """embed_tokens, p.layers decoder layers, norm and lm_head; ``moe`` = (experts, inter)."""
    h, vocab = p.hidden_size, vocab or p.vocab_size
    yield f"{prefix}embed_tokens.weight", (vocab, h), "normal"
    for i in range(p.layers):
        pre = f"{prefix}layers.{i}"
        yield from layer_specs(pre, p, qkv_bias=qkv_bias, qk_norm=qk_norm, mlp=moe is None)
        if moe is not None:
            experts, inter = moe
            yield f"{pre}.mlp.gate.weight", (experts, h), "normal"
            for e in range(experts):
                yield from mlp_specs(f"{pre}.mlp.experts.{e}", h, inter)
    yield f"{prefix}norm.weight", (h,), "ones"
    if lm_head:
        yield "lm_head.weight", (vocab, h), "normal"


def tensor_specs(p: ModelParams) -> Iterator[Spec]:
    """The dense Qwen2ForCausalLM tensors, in file order."""
    return causal_lm_specs(p)


# --------------------------------------------------------------------------------------
# Kinds.  Each generator returns the config and tensors of one HF model directory; the
# tokenizer, generation config, weights and marker are written by ``generate``.
# --------------------------------------------------------------------------------------


@dataclass
class TokInfo:
    tok: Tokenizer
    bos_id: int
    im_end_id: int


@dataclass
class KindFiles:
    architecture: str
    config: dict[str, object]
    specs: list[Spec]
    files: dict[str, object] = field(default_factory=dict)  # extra JSON files (relative)
    tokenizer_config: dict[str, object] = field(default_factory=dict)  # extra keys
    generation_config: bool = True


def qwen2_config(p: ModelParams, t: TokInfo, **extra: object) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": p.layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": p.dtype,
        "vocab_size": p.vocab_size,
        "bos_token_id": t.bos_id,
        "eos_token_id": t.bos_id,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    config.update(extra)
    return config


def llama_config(p: ModelParams, t: TokInfo, **extra: object) -> dict[str, object]:
    config = qwen2_config(p, t, architectures=["LlamaForCausalLM"], model_type="llama",
                          attention_bias=False, mlp_bias=False, pretraining_tp=1)
    for key in ("max_window_layers", "sliding_window", "use_sliding_window"):
        del config[key]
    config.update(extra)
    return config


def qwen3_config(p: ModelParams, t: TokInfo, **extra: object) -> dict[str, object]:
    config = qwen2_config(p, t, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                          attention_bias=False)
    config.update(extra)
    return config


def kind_dense(p: ModelParams, t: TokInfo) -> KindFiles:
    """Qwen2ForCausalLM (vllm/model_executor/models/qwen2.py); the default kind."""
    return KindFiles("Qwen2ForCausalLM", qwen2_config(p, t), list(tensor_specs(p)))


def kind_llama(p: ModelParams, t: TokInfo) -> KindFiles:
    """LlamaForCausalLM (models/llama.py): a Llama-shaped target, the native EAGLE pairing."""
    return KindFiles("LlamaForCausalLM", llama_config(p, t),
                     list(causal_lm_specs(p, qkv_bias=False)))


def kind_eagle(p: ModelParams, t: TokInfo) -> KindFiles:
    """EAGLE-1 draft head for the dense/llama target of the same shape.

    Follows models/llama_eagle.py (EagleLlamaForCausalLM) and the layout of the
    yuhuili/EAGLE-* checkpoints: config says ``LlamaForCausalLM`` (vLLM's EAGLEConfig
    prefixes ``Eagle``), tensors have no ``model.`` prefix, one decoder layer without
    input_layernorm, ``fc`` (hidden x 2*hidden) and no final norm.  The head carries its own
    ``embed_tokens`` (different from the target's, so vLLM keeps it: has_own_embed_tokens);
    EagleLlamaForCausalLM has no lm_head module, so the target's lm_head is always shared.
    Use with ``speculative_config={"method": "eagle", "model": DIR}``.
    """
    h = p.hidden_size
    specs: list[Spec] = [("embed_tokens.weight", (p.vocab_size, h), "normal")]
    specs += layer_specs("layers.0", p, qkv_bias=False, input_norm=False)
    specs.append(("fc.weight", (h, 2 * h), "normal"))
    return KindFiles("EagleLlamaForCausalLM", llama_config(p, t, num_hidden_layers=1), specs)


def kind_eagle3(p: ModelParams, t: TokInfo) -> KindFiles:
    """EAGLE-3 draft head for the dense/llama target of the same shape.

    Follows models/llama_eagle3.py (Eagle3LlamaForCausalLM, registry name
    ``LlamaForCausalLMEagle3``) and the yuhuili/EAGLE3-* layout: ``midlayer.*`` (qkv take
    2*hidden, extra ``hidden_norm``), ``fc`` over 3 target hidden states (layer ids in
    ``eagle_config``, so ``--layers`` must match the target's), ``norm``, its own
    ``lm_head`` over a reduced draft vocabulary (every other target token) with the
    ``d2t`` (int64 offsets) / ``t2d`` (bool mask) tables, and its own ``embed_tokens``.
    Use with ``speculative_config={"method": "eagle3", "model": DIR}``.
    """
    h, vocab = p.hidden_size, p.vocab_size
    draft_vocab = vocab // 2
    # Target layers whose outputs feed ``fc``; explicit, because vLLM's default
    # (2, L // 2, L - 3) collapses to fewer than 3 distinct layers for small targets.
    aux = sorted({min(1, p.layers - 1), p.layers // 2, p.layers - 1})
    if len(aux) < 3:
        aux = list(range(min(p.layers, 3)))
    specs: list[Spec] = [("embed_tokens.weight", (vocab, h), "normal"),
                         ("midlayer.input_layernorm.weight", (h,), "ones"),
                         ("midlayer.hidden_norm.weight", (h,), "ones")]
    specs += layer_specs("midlayer", p, qkv_bias=False, input_norm=False, attn_in=2 * h)
    specs += [
        ("fc.weight", (h, len(aux) * h), "normal"),
        ("norm.weight", (h,), "ones"),
        ("lm_head.weight", (draft_vocab, h), "normal"),
        ("d2t", (draft_vocab,), torch.arange(draft_vocab, dtype=torch.int64)),
        ("t2d", (vocab,), torch.arange(vocab) % 2 == 0),
    ]
    config = llama_config(p, t, architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1,
                          draft_vocab_size=draft_vocab, target_hidden_size=h,
                          eagle_config={"eagle_aux_hidden_state_layer_ids": aux,
                                        "use_aux_hidden_state": True})
    return KindFiles("Eagle3LlamaForCausalLM", config, specs)


def kind_mtp(p: ModelParams, t: TokInfo) -> KindFiles:
    """MiMo (models/mimo.py + models/mimo_mtp.py): a Qwen2 model with one MTP layer.

    Layout of XiaomiMiMo/MiMo-7B: the target checkpoint carries ``model.mtp_layers.0.*``
    (token/hidden layernorms, ``input_proj`` 2*hidden -> hidden, a Qwen2 decoder layer,
    ``final_layernorm``).  ``model_type`` is ``qwen2`` instead of the hub's remote-code
    ``mimo`` so that no trust_remote_code is needed.  Use the directory itself as target
    with ``speculative_config={"method": "mtp", "num_speculative_tokens": 1}``.
    """
    h = p.hidden_size
    specs = list(causal_lm_specs(p))
    pre = "model.mtp_layers.0"
    specs += [(f"{pre}.token_layernorm.weight", (h,), "ones"),
              (f"{pre}.hidden_layernorm.weight", (h,), "ones"),
              (f"{pre}.input_proj.weight", (h, 2 * h), "normal")]
    specs += layer_specs(pre, p)
    specs.append((f"{pre}.final_layernorm.weight", (h,), "ones"))
    config = qwen2_config(p, t, architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    return KindFiles("MiMoForCausalLM", config, specs)


MOE_EXPERTS, MOE_TOP_K = 8, 2


def kind_moe(p: ModelParams, t: TokInfo) -> KindFiles:
    """Qwen3MoeForCausalLM (models/qwen3_moe.py): every layer sparse, 8 experts, top-2.

    Per-expert tensors ``mlp.experts.{e}.{gate,up,down}_proj`` and router ``mlp.gate``, as
    in Qwen/Qwen3-30B-A3B; expert width is ``intermediate_size // 3``, rounded to 64.
    """
    inter = max(64, p.intermediate_size // 3 // 64 * 64)
    config = qwen3_config(p, t, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          moe_intermediate_size=inter, num_experts=MOE_EXPERTS,
                          num_experts_per_tok=MOE_TOP_K, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[],
                          output_router_logits=False, router_aux_loss_coef=0.001)
    specs = causal_lm_specs(p, qkv_bias=False, qk_norm=True, moe=(MOE_EXPERTS, inter))
    return KindFiles("Qwen3MoeForCausalLM", config, list(specs))


def kind_embed(p: ModelParams, t: TokInfo) -> KindFiles:
    """Qwen3 text embedding model in the Qwen/Qwen3-Embedding-0.6B layout.

    ``Qwen3ForCausalLM`` config with tied embeddings, tensors without the ``model.``
    prefix and no lm_head, sentence-transformers files for last-token pooling + normalize.
    vLLM (models/qwen3.py via models/adapters.py as_embedding_model) runs it with
    ``runner="pooling"``.
    """
    config = qwen3_config(p, t, tie_word_embeddings=True)
    specs = causal_lm_specs(p, prefix="", qkv_bias=False, qk_norm=True, lm_head=False)
    files: dict[str, object] = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": p.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
        "config_sentence_transformers.json": {
            "prompts": {"query": "Instruct: Given a query, find relevant passages\nQuery:",
                        "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }
    return KindFiles("Qwen3ForCausalLM (pooling)", config, list(specs), files,
                     tokenizer_config={"padding_side": "left"}, generation_config=False)


VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VL_EMBED_DIM, VL_DEPTH, VL_HEADS, VL_MERGE, VL_PATCH = 128, 2, 2, 2, 14
VL_MIN_PIXELS, VL_MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28  # at most 64 image tokens


def kind_qwen2vl(p: ModelParams, t: TokInfo) -> KindFiles:
    """Qwen2VLForConditionalGeneration (models/qwen2_vl.py), Qwen/Qwen2-VL-2B-Instruct layout.

    Needs torchvision at run time: vLLM's qwen2_vl.py imports transformers'
    image_processing_qwen2_vl, which imports torchvision unconditionally (the CPU-only dev
    machine has none, so this kind is not run there; ``vl`` is).

    Adds the vision special tokens to the tokenizer (vocab grows to the next multiple of
    64), a 2-block vision tower (embed 128, patch 14, merge 2) with its ``visual.*`` tensors,
    M-RoPE, and the image/video processor configs (at most 64 image tokens per image).
    """
    t.tok.add_special_tokens(list(VL_TOKENS))
    ids = {s: t.tok.token_to_id(s) for s in VL_TOKENS}
    vocab = max(p.vocab_size, -(-t.tok.get_vocab_size() // 64) * 64)
    h, ed = p.hidden_size, VL_EMBED_DIM
    merged = ed * VL_MERGE ** 2
    hd2 = p.head_dim // 2  # mrope sections (temporal, height, width) sum to head_dim / 2
    section = [hd2 - 2 * (3 * hd2 // 8), 3 * hd2 // 8, 3 * hd2 // 8]
    config = qwen2_config(
        p, t, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
        vocab_size=vocab, rope_scaling={"type": "mrope", "mrope_section": section},
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|image_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": VL_DEPTH, "embed_dim": ed, "num_heads": VL_HEADS,
                       "mlp_ratio": 4, "hidden_size": h, "hidden_act": "quick_gelu",
                       "in_channels": 3, "patch_size": VL_PATCH,
                       "spatial_merge_size": VL_MERGE, "temporal_patch_size": 2})
    specs: list[Spec] = [("visual.patch_embed.proj.weight", (ed, 3, 2, VL_PATCH, VL_PATCH),
                          "normal")]
    for i in range(VL_DEPTH):
        pre = f"visual.blocks.{i}"
        for name, shape, init in [("norm1", (ed,), "ones"), ("norm2", (ed,), "ones"),
                                  ("attn.qkv", (3 * ed, ed), "normal"),
                                  ("attn.proj", (ed, ed), "normal"),
                                  ("mlp.fc1", (4 * ed, ed), "normal"),
                                  ("mlp.fc2", (ed, 4 * ed), "normal")]:
            specs += [(f"{pre}.{name}.weight", shape, init),
                      (f"{pre}.{name}.bias", shape[:1], "zeros")]
    for name, shape, init in [("ln_q", (ed,), "ones"), ("mlp.0", (merged, merged), "normal"),
                              ("mlp.2", (h, merged), "normal")]:
        specs += [(f"visual.merger.{name}.weight", shape, init),
                  (f"visual.merger.{name}.bias", shape[:1], "zeros")]
    specs += causal_lm_specs(p, vocab=vocab)
    processor = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255, "resample": 3,
        "min_pixels": VL_MIN_PIXELS, "max_pixels": VL_MAX_PIXELS,
        "size": {"shortest_edge": VL_MIN_PIXELS, "longest_edge": VL_MAX_PIXELS},
        "patch_size": VL_PATCH, "temporal_patch_size": 2, "merge_size": VL_MERGE,
        "processor_class": "Qwen2VLProcessor",
    }
    vl_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
        "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    files: dict[str, object] = {
        "preprocessor_config.json": {**processor, "image_processor_type": "Qwen2VLImageProcessor"},
        "video_preprocessor_config.json": {**processor,
                                           "video_processor_type": "Qwen2VLVideoProcessor"},
        "chat_template.json": {"chat_template": vl_template},
    }
    return KindFiles("Qwen2VLForConditionalGeneration", config, specs, files,
                     tokenizer_config={"chat_template": vl_template})


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
VL_TILE, VL_VISION_HIDDEN, VL_VISION_LAYERS, VL_SCALE = 56, 128, 2, 2  # 4 tokens per tile


def siglip_specs(pre: str, width: int, layers: int, image_size: int,
                 patch: int) -> Iterator[Spec]:
    """A SigLIP-style vision encoder (models/siglip.py, models/idefics2_vision_model.py)."""
    yield f"{pre}.embeddings.patch_embedding.weight", (width, 3, patch, patch), "normal"
    yield f"{pre}.embeddings.patch_embedding.bias", (width,), "zeros"
    yield f"{pre}.embeddings.position_embedding.weight", ((image_size // patch) ** 2, width), \
        "normal"
    for i in range(layers):
        for name, shape, init in [("layer_norm1", (width,), "ones"),
                                  ("layer_norm2", (width,), "ones"),
                                  *((f"self_attn.{proj}", (width, width), "normal")
                                    for proj in ("q_proj", "k_proj", "v_proj", "out_proj")),
                                  ("mlp.fc1", (4 * width, width), "normal"),
                                  ("mlp.fc2", (width, 4 * width), "normal")]:
            yield f"{pre}.encoder.layers.{i}.{name}.weight", shape, init
            yield f"{pre}.encoder.layers.{i}.{name}.bias", shape[:1], "zeros"
    yield f"{pre}.post_layernorm.weight", (width,), "ones"
    yield f"{pre}.post_layernorm.bias", (width,), "zeros"


def kind_vl(p: ModelParams, t: TokInfo) -> KindFiles:
    """Idefics3ForConditionalGeneration (models/idefics3.py, idefics2_vision_model.py, llama.py).

    Layout of HuggingFaceM4/Idefics3-8B-Llama3: SigLIP-style vision tower under
    ``model.vision_model.*`` (2 layers, width 128, 56x56 tiles in 14x14 patches),
    pixel-shuffle connector ``model.connector.modality_projection.proj`` (scale 2, so 4
    image tokens per tile), Llama LM under ``model.text_model.*`` and ``lm_head``.  Images
    are split into at most 2x2 tiles of 56 px plus a global view (<= 20 image tokens).
    The tokenizer gains Idefics3's image/row-col special tokens (vocab rounded up to a
    multiple of 64).  Chosen because it runs on vLLM CPU without torchvision (transformers
    falls back to Idefics3ImageProcessorPil); Qwen2-VL and the CLIP/SigLIP-based LLaVA and
    PaliGemma need torchvision in vLLM 0.32 (see ``qwen2vl``).
    """
    t.tok.add_special_tokens(IDEFICS3_TOKENS)
    image_id = t.tok.token_to_id("<image>")
    vocab = max(p.vocab_size, -(-t.tok.get_vocab_size() // 64) * 64)
    h, vh = p.hidden_size, VL_VISION_HIDDEN
    tokens_per_tile = (VL_TILE // VL_PATCH) ** 2 // VL_SCALE ** 2
    text = llama_config(p, t, vocab_size=vocab, pad_token_id=t.bos_id)
    del text["architectures"]
    config = {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": image_id,
        "scale_factor": VL_SCALE,
        "tie_word_embeddings": False,
        "torch_dtype": p.dtype,
        "vocab_size": vocab,
        "pad_token_id": t.bos_id,
        "text_config": text,
        "vision_config": {
            "model_type": "idefics3_vision", "hidden_size": vh, "intermediate_size": 4 * vh,
            "num_hidden_layers": VL_VISION_LAYERS, "num_attention_heads": vh // 64,
            "image_size": VL_TILE, "patch_size": VL_PATCH, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "num_channels": 3,
        },
    }
    specs = list(siglip_specs("model.vision_model", vh, VL_VISION_LAYERS, VL_TILE, VL_PATCH))
    specs.append(("model.connector.modality_projection.proj.weight",
                  (h, vh * VL_SCALE ** 2), "normal"))
    specs += causal_lm_specs(p, prefix="model.text_model.", qkv_bias=False, vocab=vocab)
    template = (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'] is string %}: {{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}: {{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    files: dict[str, object] = {
        "preprocessor_config.json": {
            "image_processor_type": "Idefics3ImageProcessor",
            "processor_class": "Idefics3Processor",
            "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True,
            "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "max_image_size": {"longest_edge": VL_TILE}, "resample": 1,
            "rescale_factor": 1 / 255, "size": {"longest_edge": 2 * VL_TILE},
        },
        "processor_config.json": {"image_seq_len": tokens_per_tile,
                                  "processor_class": "Idefics3Processor"},
        "chat_template.json": {"chat_template": template},
    }
    return KindFiles("Idefics3ForConditionalGeneration", config, specs, files)


KINDS: dict[str, Callable[[ModelParams, TokInfo], KindFiles]] = {
    "dense": kind_dense,
    "llama": kind_llama,
    "eagle": kind_eagle,
    "eagle3": kind_eagle3,
    "mtp": kind_mtp,
    "moe": kind_moe,
    "embed": kind_embed,
    "vl": kind_vl,
    "qwen2vl": kind_qwen2vl,
}


def kind_seed(kind: str, seed: int) -> int:
    """The dense kind uses ``seed`` itself; others get their own stream (so e.g. an EAGLE
    head's embed_tokens differs from its target's)."""
    return seed if kind == "dense" else seed + zlib.crc32(kind.encode())


def write_weights(out: Path, p: ModelParams, specs: list[Spec] | None = None,
                  seed: int | None = None) -> list[str]:
    """Generate and save the weights; returns the safetensors file names."""
    dtype = DTYPES[p.dtype]
    gen = torch.Generator().manual_seed(p.seed if seed is None else seed)
    specs = list(tensor_specs(p)) if specs is None else specs

    def nbytes(spec: Spec) -> int:
        init = spec[2]
        elem = (init.element_size() if isinstance(init, torch.Tensor)
                else torch.empty((), dtype=dtype).element_size())
        return math.prod(spec[1]) * elem

    total = sum(nbytes(spec) for spec in specs)
    max_shard = int(p.max_shard_gb * 1e9)

    # Group tensors into shards (a single file unless the total exceeds the shard limit).
    groups: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if total > max_shard and groups[-1] and size + nbytes(spec) > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes(spec)

    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape, init in group:
            if isinstance(init, torch.Tensor):
                tensors[name] = init.reshape(shape).contiguous()
            elif init == "normal":
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
                tensors[name] = t.to(dtype)
            else:
                tensors[name] = (torch.ones if init == "ones" else torch.zeros)(shape, dtype=dtype)
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors creates 0600 files
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out / "model.safetensors.index.json", index)
    return names


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_marker(out: Path) -> dict[str, object]:
    try:
        marker = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def is_up_to_date(out: Path, p: ModelParams, kind: str = "dense") -> bool:
    marker = read_marker(out)
    if (marker.get("version") != MARKER_VERSION or marker.get("params") != asdict(p)
            or marker.get("kind", "dense") != kind
            or marker.get("kind_version") != (None if kind == "dense" else KIND_VERSION)):
        return False
    files = marker.get("files", {})
    return isinstance(files, dict) and bool(files) and all(
        (out / name).is_file() and (out / name).stat().st_size == info.get("size")
        for name, info in files.items())


def generate(out: Path, p: ModelParams, kind: str = "dense") -> tuple[int, int]:
    """Write the model directory of ``kind``; returns (parameter count, bytes on disk)."""
    tok = train_tokenizer(p.vocab_size)
    tok_json = tok.to_str(pretty=True)
    if train_tokenizer(p.vocab_size).to_str(pretty=True) != tok_json:
        raise RuntimeError("tokenizer training is not deterministic")
    if tok.get_vocab_size() != p.vocab_size:
        print(f"note: tokenizer has {tok.get_vocab_size()} tokens, model vocab is "
              f"{p.vocab_size} (extra rows are unused)", file=sys.stderr)
    t = TokInfo(tok, tok.token_to_id(BOS_EOS_TOKEN), tok.token_to_id("<|im_end|>"))
    built = KINDS[kind](p, t)
    tok_json = tok.to_str(pretty=True)  # a kind may have added special tokens

    out.mkdir(parents=True, exist_ok=True)
    old_files = read_marker(out).get("files", {})
    (out / MARKER_FILE).unlink(missing_ok=True)  # incomplete until the marker is rewritten
    root = out.resolve()
    for old in [*out.glob("model*.safetensors*"),
                *(out / name for name in (old_files if isinstance(old_files, dict) else {}))]:
        if old.resolve().parent.is_relative_to(root) and old.is_file():
            old.unlink()
            if old.resolve().parent != root and not any(old.parent.iterdir()):
                old.parent.rmdir()  # e.g. an embed kind's 1_Pooling/

    written = ["tokenizer.json", "tokenizer_config.json", "config.json"]
    (out / "tokenizer.json").write_text(tok_json + "\n", encoding="utf-8")
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_EOS_TOKEN,
        "eos_token": BOS_EOS_TOKEN,
        "pad_token": BOS_EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
        **built.tokenizer_config,
    })
    write_json(out / "config.json", built.config)
    if built.generation_config:
        write_json(out / "generation_config.json", {
            "bos_token_id": t.bos_id,
            "eos_token_id": [t.bos_id, t.im_end_id],
            "do_sample": False,
        })
        written.append("generation_config.json")
    for name, obj in built.files.items():
        write_json(out / name, obj)
        written.append(name)
    written += write_weights(out, p, built.specs, kind_seed(kind, p.seed))
    if (out / "model.safetensors.index.json").is_file():
        written.append("model.safetensors.index.json")

    n_params = sum(math.prod(shape) for _, shape, _ in built.specs)
    paths = sorted(out / name for name in written)
    files = {f.relative_to(out).as_posix(): {"size": f.stat().st_size, "sha256": sha256(f)}
             for f in paths}
    marker: dict[str, object] = {
        "version": MARKER_VERSION,
        "params": asdict(p),
        "num_parameters": n_params,
        "files": files,
    }
    if kind != "dense":  # absent for dense, so its marker is unchanged from before kinds
        marker |= {"kind": kind, "kind_version": KIND_VERSION,
                   "architecture": built.architecture}
    write_json(out / MARKER_FILE, marker)
    return n_params, sum(f.stat().st_size for f in paths)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--kind", choices=[*KINDS, *QUANT_KINDS], default="dense",
                    help="model kind (architecture) to write; see KINDS")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=768)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-gb", type=float, default=None,
                    help="choose hidden size/layers/heads/intermediate size so the weights "
                         "total about this many GB (overrides the shape options)")
    ap.add_argument("--max-shard-gb", type=float, default=2.0,
                    help="shard weights into files of at most this size when larger")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return ap.parse_args(argv)


# Kinds written by tools/tiny_quant.py from a dense model of the given shape: quantized
# checkpoints (AWQ, GPTQ, compressed-tensors W8A8) and a LoRA adapter for the dense model.
QUANT_KINDS = ("awq", "gptq", "w8a8", "lora")


def quantized(kind: str, out: Path, p: ModelParams) -> int:
    """Write ``kind`` (one of QUANT_KINDS) into ``out`` from a dense model of shape ``p``
    generated in a temporary directory (a few seconds; always regenerated)."""
    import tempfile

    try:
        from tools.tiny_quant import write_kind
    except ImportError:  # run as a script: tools/ itself is on sys.path
        from tiny_quant import write_kind  # type: ignore[no-redef]

    with tempfile.TemporaryDirectory(prefix="tiny-base-") as tmp:
        generate(Path(tmp), p, "dense")
        write_kind(kind, out, Path(tmp))
    print(f"{out}: {kind} of the dense model hidden={p.hidden_size} layers={p.layers}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.target_gb is not None:
        p = params_for_target(args.target_gb, args.vocab_size, args.dtype, args.seed,
                              args.max_shard_gb)
    else:
        p = ModelParams(args.hidden_size, args.layers, args.heads, args.kv_heads,
                        args.intermediate_size, args.vocab_size, args.dtype, args.seed,
                        args.max_shard_gb)
    p.validate()
    out: Path = args.out_dir.resolve()
    if args.kind in QUANT_KINDS:
        return quantized(args.kind, out, p)
    if not args.force and is_up_to_date(out, p, args.kind):
        n_params = read_marker(out).get("num_parameters", 0)
        print(f"{out}: up to date ({args.kind}, {n_params:,} parameters)")
        return 0
    n_params, n_bytes = generate(out, p, args.kind)
    arch = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"{out}: {args.kind} {arch} hidden={p.hidden_size} layers={p.layers} heads={p.heads}/"
          f"{p.kv_heads} intermediate={p.intermediate_size} vocab={p.vocab_size} {p.dtype}, "
          f"{n_params:,} parameters, {n_bytes:,} bytes on disk")
    return 0

if __name__ == "__main__":
    sys.exit(main())
