#!/usr/bin/env python
"""Write a small random-weight Qwen2 model directory, fully offline and deterministically.

The result is a real HuggingFace model directory (``config.json``,
``generation_config.json``, ``model*.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``) that vLLM and transformers load without network
access.  Running the script twice with the same arguments produces
byte-identical files.

Examples::

    python tools/make_tiny_model.py /tmp/tiny-qwen
    python tools/make_tiny_model.py /tmp/qwen-1gb --target-gb 1
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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


def tensor_specs(p: ModelParams) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """Yield (name, shape, init) in a fixed order; init is 'normal', 'ones' or 'zeros'."""
    h, inter = p.hidden_size, p.intermediate_size
    q, kv = p.heads * p.head_dim, p.kv_heads * p.head_dim
    yield "model.embed_tokens.weight", (p.vocab_size, h), "normal"
    for i in range(p.layers):
        pre = f"model.layers.{i}"
        yield f"{pre}.input_layernorm.weight", (h,), "ones"
        yield f"{pre}.self_attn.q_proj.weight", (q, h), "normal"
        yield f"{pre}.self_attn.q_proj.bias", (q,), "normal"
        yield f"{pre}.self_attn.k_proj.weight", (kv, h), "normal"
        yield f"{pre}.self_attn.k_proj.bias", (kv,), "normal"
        yield f"{pre}.self_attn.v_proj.weight", (kv, h), "normal"
        yield f"{pre}.self_attn.v_proj.bias", (kv,), "normal"
        yield f"{pre}.self_attn.o_proj.weight", (h, q), "normal"
        yield f"{pre}.post_attention_layernorm.weight", (h,), "ones"
        yield f"{pre}.mlp.gate_proj.weight", (inter, h), "normal"
        yield f"{pre}.mlp.up_proj.weight", (inter, h), "normal"
        yield f"{pre}.mlp.down_proj.weight", (h, inter), "normal"
    yield "model.norm.weight", (h,), "ones"
    yield "lm_head.weight", (p.vocab_size, h), "normal"


def write_weights(out: Path, p: ModelParams) -> list[str]:
    """Generate and save the weights; returns the safetensors file names."""
    dtype = DTYPES[p.dtype]
    gen = torch.Generator().manual_seed(p.seed)
    elem = torch.empty((), dtype=dtype).element_size()
    specs = list(tensor_specs(p))
    total = sum(math.prod(shape) for _, shape, _ in specs) * elem
    max_shard = int(p.max_shard_gb * 1e9)

    # Group tensors into shards (a single file unless the total exceeds the shard limit).
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * elem
        if total > max_shard and groups[-1] and size + nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes

    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape, init in group:
            if init == "normal":
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
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def is_up_to_date(out: Path, p: ModelParams) -> bool:
    try:
        marker = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("version") != MARKER_VERSION or marker.get("params") != asdict(p):
        return False
    files: dict[str, dict[str, object]] = marker.get("files", {})
    return bool(files) and all(
        (out / name).is_file() and (out / name).stat().st_size == info.get("size")
        for name, info in files.items())


def generate(out: Path, p: ModelParams) -> tuple[int, int]:
    """Write the model directory; returns (parameter count, bytes on disk)."""
    tok = train_tokenizer(p.vocab_size)
    tok_json = tok.to_str(pretty=True)
    if train_tokenizer(p.vocab_size).to_str(pretty=True) != tok_json:
        raise RuntimeError("tokenizer training is not deterministic")
    if tok.get_vocab_size() != p.vocab_size:
        print(f"note: tokenizer has {tok.get_vocab_size()} tokens, model vocab is "
              f"{p.vocab_size} (extra rows are unused)", file=sys.stderr)
    bos_id = tok.token_to_id(BOS_EOS_TOKEN)
    im_end_id = tok.token_to_id("<|im_end|>")

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)  # incomplete until the marker is rewritten
    for old in out.glob("model*.safetensors*"):
        old.unlink()

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
    })
    write_json(out / "config.json", {
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
        "bos_token_id": bos_id,
        "eos_token_id": bos_id,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    })
    write_json(out / "generation_config.json", {
        "bos_token_id": bos_id,
        "eos_token_id": [bos_id, im_end_id],
        "do_sample": False,
    })
    write_weights(out, p)

    paths = [f for f in sorted(out.iterdir()) if f.is_file() and f.name != MARKER_FILE]
    files = {f.name: {"size": f.stat().st_size, "sha256": sha256(f)} for f in paths}
    write_json(out / MARKER_FILE, {
        "version": MARKER_VERSION,
        "params": asdict(p),
        "num_parameters": p.num_parameters(),
        "files": files,
    })
    return p.num_parameters(), sum(f.stat().st_size for f in paths)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
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
    if not args.force and is_up_to_date(out, p):
        print(f"{out}: up to date ({p.num_parameters():,} parameters)")
        return 0
    n_params, n_bytes = generate(out, p)
    print(f"{out}: Qwen2ForCausalLM hidden={p.hidden_size} layers={p.layers} heads={p.heads}/"
          f"{p.kv_heads} intermediate={p.intermediate_size} vocab={p.vocab_size} {p.dtype}, "
          f"{n_params:,} parameters, {n_bytes:,} bytes on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
