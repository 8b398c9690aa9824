"""The benchmark's random models: a base made of the reference plus no-op layers computes the
reference's function, whatever type its no-op layers are stored in."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from build import F32, Q4_0, Shape, write_random_llama  # noqa: E402

from eft_local.runtime.context import LocalBackend  # noqa: E402

SMALL = Shape(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
TEXT = "The history of the old city begins with"


def last_logits(path: Path) -> np.ndarray:
    b = LocalBackend(path, n_ctx=64, n_threads=1)
    try:
        b.eval(b.tokenize(TEXT))
        return b.logits().copy()
    finally:
        b.close()


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A folder to write models in, the reference model, and its logits after TEXT."""
    d = tmp_path_factory.mktemp("bench")
    ref = write_random_llama(d / "ref.gguf", SMALL, smollm2, seed=7)
    return d, ref, last_logits(ref)


@pytest.mark.parametrize("noop_qtype", [None, F32], ids=["q4_0", "f32"])
def test_noop_layers_keep_the_function(reference, smollm2, noop_qtype):
    d, ref, expected = reference
    base = write_random_llama(d / f"base-{noop_qtype}.gguf", SMALL, smollm2, seed=7, noop_layers=3,
                              noop_qtype=noop_qtype)
    assert base.stat().st_size > ref.stat().st_size
    got = last_logits(base)
    assert np.std(expected) > 0.1  # random weights give varied logits, not a constant row
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_other_seed_is_another_function(reference, smollm2):
    d, _, expected = reference
    other = write_random_llama(d / "other.gguf", SMALL, smollm2, seed=8, noop_layers=1, noop_qtype=F32)
    assert not np.allclose(last_logits(other), expected, atol=1e-2)


def test_f32_noop_layers_are_stored_as_f32(reference, smollm2):
    import gguf

    d, _, _ = reference
    base = write_random_llama(d / "typed.gguf", SMALL, smollm2, seed=7, noop_layers=1, noop_qtype=F32)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(base).tensors}
    assert types["blk.0.ffn_up.weight"] == Q4_0
    assert types["blk.2.ffn_up.weight"] == F32
    assert types["blk.2.ffn_down.weight"] == F32
