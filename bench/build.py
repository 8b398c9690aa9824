"""Random-weight GGUF models with real shapes and a real tokenizer, for benchmarks.

Weights are random Q4_0 or Q8_0 blocks written directly (no quantisation pass), so a 1.7B-parameter
file takes seconds to write. Each tensor's bytes come from a generator keyed on (seed, tensor
name): two models with the same seed share every tensor they both have, which is how a
"reference + no-op layers" base computes exactly the reference's function.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

Q4_0 = gguf.GGMLQuantizationType.Q4_0
Q8_0 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_theta: float = 10000.0


# SmolLM2 shapes (HuggingFaceTB/SmolLM2-135M and -1.7B configs).
SMOLLM2_135M = Shape(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, rope_theta=100000.0)
SMOLLM2_1_7B = Shape(n_layer=24, n_embd=2048, n_head=32, n_head_kv=32, n_ff=8192, rope_theta=130000.0)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _blocks(qtype: gguf.GGMLQuantizationType, rng: np.random.Generator, n_out: int, n_in: int,
            zero: bool = False) -> np.ndarray:
    """Random Q4_0 or Q8_0 rows (per block of 32 an f16 scale, then 4-bit or 8-bit values) or F32."""
    if qtype == F32:
        if zero:
            return np.zeros((n_out, n_in), dtype=np.float32)
        return rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = n_in // block
    out = np.zeros((n_out, blocks, block_bytes), dtype=np.uint8)
    if not zero:
        # Values are uniform (nibbles in [0, 16) centred at 8: std ~4.6; int8: std ~74); the
        # scale gives weights of std 1/sqrt(n_in), keeping activations in range.
        spread = 4.6 if qtype == Q4_0 else 74.0
        scale = np.float16(1.0 / (spread * np.sqrt(n_in)))
        out[:, :, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
        out[:, :, 2:] = rng.integers(0, 256, size=(n_out, blocks, block_bytes - 2), dtype=np.uint8)
    return out.reshape(n_out, blocks * block_bytes)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copy every tokenizer.* key of ``source`` into ``writer``; return the vocabulary size."""
    reader = gguf.GGUFReader(source)
    n_vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            etype = field.types[1]
            if etype == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, value)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    return n_vocab


def write_random_llama(path: Path, shape: Shape, tokenizer_from: Path, *, seed: int,
                       noop_layers: int = 0, qtype: gguf.GGMLQuantizationType = Q4_0,
                       noop_qtype: gguf.GGMLQuantizationType | None = None) -> Path:
    """A llama GGUF of ``shape`` with random Q4_0/Q8_0 weights and ``tokenizer_from``'s tokenizer.

    ``noop_layers`` more layers (weights of ``noop_qtype``, default ``qtype``) are appended whose
    output projections are zero: they cost a full layer's work and leave the residual stream,
    and so the logits, unchanged.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    n_vocab = _copy_tokenizer(w, tokenizer_from)
    n_layer = shape.n_layer + noop_layers
    head_dim = shape.n_embd // shape.n_head
    w.add_name(f"random-{shape.n_embd}x{n_layer}")
    w.add_context_length(8192)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)

    def mat(name: str, n_out: int, n_in: int, zero: bool = False, qt: gguf.GGMLQuantizationType = qtype) -> None:
        data = _blocks(qt, _rng(seed, name), n_out, n_in, zero)
        if qt == F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qt)

    ones = np.ones(shape.n_embd, dtype=np.float32)
    # Tied embeddings (no output.weight), as SmolLM2 has.
    mat("token_embd.weight", n_vocab, shape.n_embd)
    kv = shape.n_head_kv * head_dim
    for i in range(n_layer):
        noop = i >= shape.n_layer
        qt = noop_qtype if noop and noop_qtype is not None else qtype
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", ones)
        mat(f"{p}.attn_q.weight", shape.n_embd, shape.n_embd, qt=qt)
        mat(f"{p}.attn_k.weight", kv, shape.n_embd, qt=qt)
        mat(f"{p}.attn_v.weight", kv, shape.n_embd, qt=qt)
        mat(f"{p}.attn_output.weight", shape.n_embd, shape.n_embd, zero=noop, qt=qt)
        w.add_tensor(f"{p}.ffn_norm.weight", ones)
        mat(f"{p}.ffn_gate.weight", shape.n_ff, shape.n_embd, qt=qt)
        mat(f"{p}.ffn_up.weight", shape.n_ff, shape.n_embd, qt=qt)
        mat(f"{p}.ffn_down.weight", shape.n_embd, shape.n_ff, zero=noop, qt=qt)
    w.add_tensor("output_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
