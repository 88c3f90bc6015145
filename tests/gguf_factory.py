"""A tiny random Llama written as a GGUF file with the `gguf` package's writer, for tests.

    expected = write_tiny_llama_gguf(path, seed=0)

writes llama.cpp's layout: tensor names `token_embd`, `blk.{i}.attn_q`, ..., `output_norm`,
`output` (untied only); the rows of attn_q / attn_k in llama.cpp's rotary order (the permutation
its converter applies, which readers undo); a mix of storage types (Q8_0 for the embedding,
attn_v and ffn_down, F16 for attn_output, F32 for the rest); the architecture as `llama.*`
metadata; and a byte-level BPE tokenizer (trained here on a few lines of text) as
`tokenizer.ggml.*` metadata. Returns `TinyGGUF`: the Hugging Face tensors the file must convert
to (each stored tensor dequantised, q/k in Hugging Face row order), the architecture, and the
`tokenizers.Tokenizer` whose vocabulary and merges the file holds.

Weights use O(1)-activation scales (as tests/hf_factory.py): Linear N(0, 1/fan_in), embeddings
N(0, 1), norms 1 + N(0, 0.2^2).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

TINY_ARCH = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # unk / bos, eos = pad
TRAIN_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
]
# GGUF tensor -> (Hugging Face tensor, storage type)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm", "F32"),
    "attn_q": ("self_attn.q_proj", "F32"),
    "attn_k": ("self_attn.k_proj", "F32"),
    "attn_v": ("self_attn.v_proj", "Q8_0"),
    "attn_output": ("self_attn.o_proj", "F16"),
    "ffn_norm": ("post_attention_layernorm", "F32"),
    "ffn_gate": ("mlp.gate_proj", "F32"),
    "ffn_up": ("mlp.up_proj", "F32"),
    "ffn_down": ("mlp.down_proj", "Q8_0"),
}


@dataclasses.dataclass
class TinyGGUF:
    hf_tensors: dict[str, np.ndarray]
    arch: dict
    tokenizer: object  # tokenizers.Tokenizer
    vocab_size: int
    tie_word_embeddings: bool


def train_tokenizer(vocab_size: int = 300):
    """Byte-level BPE (GPT-2 pre-tokenisation) with SPECIAL_TOKENS at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    return tok


def llama_cpp_rotary_order(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k weight [heads*d, in] in llama.cpp's order: within each head, the two rotary
    halves interleaved (what llama.cpp's converter does; GGUF readers undo it)."""
    return (
        w_oi.reshape(n_head, 2, w_oi.shape[0] // n_head // 2, *w_oi.shape[1:])
        .swapaxes(1, 2)
        .reshape(w_oi.shape)
    )


def _store(writer, name: str, w: np.ndarray, kind: str) -> np.ndarray:
    """Adds tensor `name` in storage type `kind`; returns what a reader dequantises it to."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    data = quants.quantize(w.astype(np.float32), qtype)
    if kind == "F32":
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    return quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32)


def write_tiny_llama_gguf(
    path,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    architecture: str = "llama",
    rope_freqs: bool = False,
) -> TinyGGUF:
    """Writes the file (see module docstring) and returns what it must convert to.
    rope_freqs: also the tensor of RoPE frequency factors that llama.cpp writes for Llama
    3.1/3.2's llama3 scaling."""  # fmt: skip
    from gguf import GGUFWriter

    a = TINY_ARCH
    tok = train_tokenizer()
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    v, d, f = len(tokens), a["hidden_size"], a["intermediate_size"]
    nh, nkv, hd = a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    rng = np.random.default_rng(seed)

    def linear(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)

    def norm():
        return 1.0 + 0.2 * rng.standard_normal(d)

    w = GGUFWriter(str(path), architecture)
    w.add_name("tiny-random-llama")
    w.add_context_length(a["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(a["num_hidden_layers"])
    w.add_feed_forward_length(f)
    w.add_rope_dimension_count(hd)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(a["rms_norm_eps"])
    w.add_rope_freq_base(a["rope_theta"])
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, hd // 2, dtype=np.float32))
    embedding = _store(w, "token_embd.weight", rng.standard_normal((v, d)), "Q8_0")
    hf = {"model.embed_tokens.weight": embedding}
    for i in range(a["num_hidden_layers"]):
        shapes = {
            "attn_q": (nh * hd, d),
            "attn_k": (nkv * hd, d),
            "attn_v": (nkv * hd, d),
            "attn_output": (d, nh * hd),
            "ffn_gate": (f, d),
            "ffn_up": (f, d),
            "ffn_down": (d, f),
        }
        for gguf_name, (hf_name, kind) in _LAYER_TENSORS.items():
            full = f"model.layers.{i}.{hf_name}.weight"
            if gguf_name.endswith("norm"):
                hf[full] = _store(w, f"blk.{i}.{gguf_name}.weight", norm(), kind)
                continue
            weight = linear(*shapes[gguf_name]).astype(np.float32)
            heads = {"attn_q": nh, "attn_k": nkv}.get(gguf_name)
            stored = weight if heads is None else llama_cpp_rotary_order(weight, heads)
            back = _store(w, f"blk.{i}.{gguf_name}.weight", stored, kind)
            # q/k are stored exactly (F32): the reader's reordering must give `weight` back
            hf[full] = back if heads is None else weight
    hf["model.norm.weight"] = _store(w, "output_norm.weight", norm(), "F32")
    if not tie_word_embeddings:
        hf["lm_head.weight"] = _store(w, "output.weight", linear(v, d), "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(hf, dict(a), tok, v, tie_word_embeddings)
