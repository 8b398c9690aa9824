"""Tiny random-weight llama GGUF models for tests.

The models are real llama-architecture networks (attention, RMS norms,
SwiGLU feed-forward) with a small SentencePiece-style vocabulary, so
llama.cpp loads, tokenizes, evaluates and samples them exactly like a
downloaded model, only in milliseconds.

Weights are drawn per tensor from a generator keyed on ``(seed, tensor
name)``.  Two consequences that tests can rely on:

* the same seed and shape always give the same file contents;
* ``vocab`` and ``n_pad`` do not change any weight of the real vocabulary:
  ``vocab="alt"`` only renames one token, and the ``n_pad`` extra rows of
  ``token_embd``/``output`` come from a separate stream.  The logits of a
  padded model over the first ``len(vocab_tokens())`` ids therefore equal
  those of the unpadded model with the same seed.
"""

from __future__ import annotations

import pathlib
import zlib

import gguf
import numpy as np

__all__ = [
    "ALT_DIFF_ID",
    "ALT_DIFF_TEXT",
    "BASE_DIFF_TEXT",
    "BOS_ID",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "IM_END_ID",
    "IM_START_ID",
    "N_VOCAB_BASE",
    "UNK_ID",
    "WORDS",
    "vocab_tokens",
    "write_tiny_llama",
]

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
IM_START_ID = 3
IM_END_ID = 4

_SPECIALS = [
    ("<unk>", gguf.TokenType.UNKNOWN),
    ("<s>", gguf.TokenType.CONTROL),
    ("</s>", gguf.TokenType.CONTROL),
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
]

# SentencePiece word-boundary marker; llama.cpp turns spaces into it.
_SPACE = "\u2581"

# Whole words the tokenizer merges into single tokens (with the leading
# space marker).  Role names are included because llama.cpp puts a space
# before text that follows a special token, so "<|im_start|>user" becomes
# <|im_start|> + "▁user".
WORDS = (
    "the", "a", "is", "of", "and", "to", "in", "it", "that", "was",
    "I", "you", "we", "The", "Hello", "world", "Paris", "France",
    "capital", "city", "cat", "dog", "yes", "no", "answer", "what",
    "user", "assistant", "system",
)

# The alternative vocabulary renames this word's token.  "▁car" is not a
# text of the base vocabulary, so the two vocabularies differ only here.
BASE_DIFF_TEXT = _SPACE + "cat"
ALT_DIFF_TEXT = _SPACE + "car"


def _base_entries() -> list[tuple[str, float, int]]:
    """(text, score, token type) of the base vocabulary, in id order."""
    entries: list[tuple[str, float, int]] = [(t, 0.0, int(tt)) for t, tt in _SPECIALS]
    # Byte fallback: anything the pieces below cannot spell (newlines,
    # non-ASCII) is emitted as <0xXX> tokens, as in Llama-2's vocabulary.
    entries += [(f"<0x{b:02X}>", 0.0, int(gguf.TokenType.BYTE)) for b in range(256)]

    pieces = [_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    # llama.cpp's SPM tokenizer only merges two adjacent symbols when their
    # concatenation is itself a token, so every prefix "▁H", "▁He", ...
    # of a word must exist for "▁Hello" to be reachable.
    seen = set(pieces)
    for word in WORDS:
        full = _SPACE + word
        for end in range(2, len(full) + 1):
            prefix = full[:end]
            if prefix not in seen:
                seen.add(prefix)
                pieces.append(prefix)
    # Scores act as merge priorities (higher first); real SPM vocabularies
    # use decreasing log-frequencies, which a descending ramp imitates.
    entries += [(p, -float(i), int(gguf.TokenType.NORMAL)) for i, p in enumerate(pieces)]
    return entries


_BASE = _base_entries()
N_VOCAB_BASE = len(_BASE)
ALT_DIFF_ID = next(i for i, e in enumerate(_BASE) if e[0] == BASE_DIFF_TEXT)


def _entries(vocab: str, n_pad: int) -> list[tuple[str, float, int]]:
    if vocab not in ("base", "alt"):
        raise ValueError(f"vocab must be 'base' or 'alt', not {vocab!r}")
    if n_pad < 0:
        raise ValueError("n_pad must be >= 0")
    entries = list(_BASE)
    if vocab == "alt":
        _, score, ttype = entries[ALT_DIFF_ID]
        entries[ALT_DIFF_ID] = (ALT_DIFF_TEXT, score, ttype)
    n = len(entries)
    # Padding rows like Qwen's: present in the matrices, never produced by
    # the tokenizer.
    entries += [(f"[PAD{n + i}]", 0.0, int(gguf.TokenType.UNUSED)) for i in range(n_pad)]
    return entries


def vocab_tokens(vocab: str = "base", n_pad: int = 0) -> list[str]:
    """Token texts by id, as written by write_tiny_llama with the same arguments."""
    return [t for t, _, _ in _entries(vocab, n_pad)]


def _rng(seed: int, name: str) -> np.random.Generator:
    # One stream per tensor, so adding padding rows or changing one tensor's
    # shape leaves the other tensors' values unchanged.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    a = _rng(seed, name).standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    return a


def _norm_weight(seed: int, name: str, n: int) -> np.ndarray:
    # Near one, like trained RMSNorm gains; the jitter keeps models with
    # different seeds different even in the norms.
    return (1.0 + _normal(seed, name, (n,), 0.1)).astype(np.float32)


def _vocab_matrix(seed: int, name: str, n_real: int, n_pad: int, n_embd: int,
                  std: float, quiet_std: float, quiet_ids: range) -> np.ndarray:
    """(n_real + n_pad, n_embd) matrix; pad rows drawn from their own stream."""
    m = _normal(seed, name, (n_real, n_embd), std)
    # Rows of tokens that a text model rarely produces (specials, raw bytes)
    # get a smaller norm, so greedy text is made of word pieces and does not
    # stop or emit invalid UTF-8 straight away.
    m[quiet_ids.start:quiet_ids.stop] *= np.float32(quiet_std / std)
    if n_pad:
        pad = _normal(seed, name + ".pad", (n_pad, n_embd), quiet_std)
        m = np.concatenate([m, pad], axis=0)
    return m


def write_tiny_llama(path, *, seed: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                     n_head_kv: int | None = None, n_ff: int = 128, n_ctx: int = 1024,
                     vocab: str = "base", n_pad: int = 0,
                     chat_template: str | None = CHATML_TEMPLATE,
                     logit_scale: float = 3.5) -> pathlib.Path:
    """Write a random-weight F32 llama GGUF to ``path`` and return the path.

    ``logit_scale`` is roughly the standard deviation of the next-token
    logits over normal tokens; larger values give more peaked distributions.
    """
    if n_head_kv is None:
        n_head_kv = n_head
    if n_embd % n_head:
        raise ValueError("n_embd must be divisible by n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be divisible by n_head_kv")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head dimension must be even for RoPE")
    kv_dim = head_dim * n_head_kv

    path = pathlib.Path(path)
    entries = _entries(vocab, n_pad)
    n_real = N_VOCAB_BASE
    n_vocab = len(entries)

    w = gguf.GGUFWriter(str(path), "llama")
    arch = "llama"
    w.add_name(f"tiny-llama-s{seed}-l{n_layer}-e{n_embd}-{vocab}-p{n_pad}")
    w.add_uint32(f"{arch}.context_length", n_ctx)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
    w.add_uint32(f"{arch}.attention.head_count", n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))

    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in entries])
    w.add_token_scores([s for _, s, _ in entries])
    w.add_token_types([tt for _, _, tt in entries])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    # Written by key name: older gguf releases lack a helper for it.  It marks
    # <|im_end|> as end-of-generation, as ChatML models do.
    w.add_uint32("tokenizer.ggml.eot_token_id", IM_END_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    # Rows 0..260 are specials and byte tokens (see _base_entries).
    quiet = range(0, len(_SPECIALS) + 256)
    # Unit-variance embeddings; every block below then adds an O(1) update,
    # so the residual stream keeps both token identity and context.
    w.add_tensor("token_embd.weight",
                 _vocab_matrix(seed, "token_embd.weight", n_real, n_pad, n_embd, 1.0, 1.0, quiet))

    def lin(name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        # numpy (n_out, n_in) is ggml's {n_in, n_out}: the matrix maps n_in -> n_out.
        w.add_tensor(name, _normal(seed, name, (n_out, n_in), gain / np.sqrt(n_in)))

    for i in range(n_layer):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", _norm_weight(seed, f"{p}.attn_norm.weight", n_embd))
        # Larger q/k gains make attention patterns content-dependent instead
        # of near-uniform averaging.
        lin(f"{p}.attn_q.weight", n_embd, n_embd, 2.0)
        lin(f"{p}.attn_k.weight", kv_dim, n_embd, 2.0)
        lin(f"{p}.attn_v.weight", kv_dim, n_embd)
        lin(f"{p}.attn_output.weight", n_embd, n_embd)
        w.add_tensor(f"{p}.ffn_norm.weight", _norm_weight(seed, f"{p}.ffn_norm.weight", n_embd))
        lin(f"{p}.ffn_gate.weight", n_ff, n_embd, 2.0)
        lin(f"{p}.ffn_up.weight", n_ff, n_embd)
        lin(f"{p}.ffn_down.weight", n_embd, n_ff, 2.0)

    w.add_tensor("output_norm.weight", _norm_weight(seed, "output_norm.weight", n_embd))
    # After the final RMS norm the hidden state has unit RMS, so rows with
    # std logit_scale/sqrt(n_embd) give logits with std ~ logit_scale.
    std_out = logit_scale / np.sqrt(n_embd)
    w.add_tensor("output.weight",
                 _vocab_matrix(seed, "output.weight", n_real, n_pad, n_embd,
                               std_out, 0.25 * std_out, quiet))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rewrite_tiny(src: pathlib.Path, dst: pathlib.Path, *, arch: str | None = None, drop_tensors=()) -> pathlib.Path:
    """Copy a GGUF file through gguf.GGUFReader and GGUFWriter, optionally breaking it."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
