"""GGUF metadata reading and the vocabulary compatibility check, on tiny GGUF files."""

from __future__ import annotations

import dataclasses
import struct

import gguf
import numpy as np
import pytest
from tiny_gguf import (
    ALT_DIFF_ID, ALT_DIFF_TEXT, BASE_DIFF_TEXT, BOS_ID, CHATML_TEMPLATE, EOS_ID, IM_END_ID,
    N_VOCAB_BASE, vocab_tokens,
)

from eft_local.core.errors import EFTError
from eft_local.runtime.gguf import read_metadata
from eft_local.runtime.vocab import (
    TOKEN_TYPE_UNUSED, VocabInfo, check_pair, check_vocabularies, read_vocab,
)

TOKEN_TYPE_NORMAL = int(gguf.TokenType.NORMAL)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# -- read_metadata -----------------------------------------------------------------------------


def test_read_metadata_matches_gguf_reader(tiny):
    path = tiny["base"]
    meta = read_metadata(path)
    reader = gguf.GGUFReader(str(path))
    keys = {k for k in reader.fields if not k.startswith("GGUF.")}  # GGUF.* are reader pseudo-keys
    assert set(meta) == keys
    for key in keys:
        expected = reader.fields[key].contents()
        got = meta[key]
        if isinstance(expected, list) and expected and not isinstance(expected[0], str):
            np.testing.assert_array_equal(got, np.array(expected), err_msg=key)
        else:
            assert got == expected, key
    # A few values spelled out, so a reader bug shared with gguf-py would still show.
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 1024
    assert meta["llama.block_count"] == 4
    assert meta["tokenizer.ggml.tokens"] == vocab_tokens()
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eot_token_id"] == IM_END_ID


def test_read_metadata_padded_vocab(tiny):
    meta = read_metadata(tiny["padded"])
    assert meta["tokenizer.ggml.tokens"] == vocab_tokens(n_pad=64)
    types = meta["tokenizer.ggml.token_type"]
    assert isinstance(types, np.ndarray) and len(types) == N_VOCAB_BASE + 64
    assert (types[N_VOCAB_BASE:] == TOKEN_TYPE_UNUSED).all()


def test_read_metadata_missing_file(tmp_path):
    with pytest.raises(EFTError) as e:
        read_metadata(tmp_path / "nope.gguf")
    assert "not found" in one_line(e) and "nope.gguf" in str(e.value)


def test_read_metadata_directory(tmp_path):
    with pytest.raises(EFTError) as e:
        read_metadata(tmp_path)
    assert "directory" in one_line(e)


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04 not a model", b"\n" * 100])
def test_read_metadata_not_gguf(tmp_path, content):
    p = tmp_path / "model.gguf"
    p.write_bytes(content)
    with pytest.raises(EFTError) as e:
        read_metadata(p)
    assert "not a GGUF file" in one_line(e)


def test_read_metadata_unsupported_version(tmp_path):
    p = tmp_path / "v1.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(16))
    with pytest.raises(EFTError) as e:
        read_metadata(p)
    assert "version 1" in one_line(e)


@pytest.mark.parametrize("n_bytes", [4, 7, 8, 23, 24, 40, 200, 1000, 5000])
def test_read_metadata_truncated(tiny, tmp_path, n_bytes):
    # 200 bytes cuts a string key/value; the others cut the header and the token arrays.
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny["base"].read_bytes()[:n_bytes])
    with pytest.raises(EFTError) as e:
        read_metadata(p)
    assert str(p) in one_line(e)


def test_read_metadata_bad_value_type(tmp_path):
    # One key whose value type (99) the spec does not define.
    key = b"general.x"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 99)
    p = tmp_path / "bad.gguf"
    p.write_bytes(data + bytes(8))
    with pytest.raises(EFTError) as e:
        read_metadata(p)
    assert str(p) in one_line(e)


# -- read_vocab --------------------------------------------------------------------------------


def test_read_vocab_fields(tiny):
    v = read_vocab(tiny["tuned"])
    assert v.n_vocab == N_VOCAB_BASE == len(vocab_tokens())
    assert v.tokens == vocab_tokens()
    assert (v.bos_id, v.eos_id, v.add_bos) == (BOS_ID, EOS_ID, True)
    assert v.architecture == "llama" and v.tokenizer_model == "llama"
    assert v.pre is None
    assert v.chat_template == CHATML_TEMPLATE
    assert v.context_length == 1024
    assert v.name == "tuned.gguf" and v.path == str(tiny["tuned"])
    assert v.token_types is not None and len(v.token_types) == v.n_vocab


def test_read_vocab_without_chat_template(tiny):
    assert read_vocab(tiny["no_template"]).chat_template is None


def test_read_vocab_padded(tiny):
    v = read_vocab(tiny["padded"])
    assert v.n_vocab == N_VOCAB_BASE + 64
    assert all(v.is_padding(i) for i in range(N_VOCAB_BASE, v.n_vocab))
    assert not any(v.is_padding(i) for i in range(N_VOCAB_BASE))


def test_read_vocab_without_tokens(tmp_path):
    p = tmp_path / "notok.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint32("llama.context_length", 16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EFTError) as e:
        read_vocab(p)
    assert "tokenizer" in one_line(e)


def test_is_padding_by_text_or_type():
    info = VocabInfo(
        path="m.gguf", architecture="llama", tokenizer_model="llama", pre=None,
        tokens=["a", "[PAD7]", "<unused3>", "<|reserved_special_token_0|>", "<pad>", "odd", "[PAD]x"],
        token_types=None, bos_id=None, eos_id=None, add_bos=None, chat_template=None, context_length=None,
    )
    assert [info.is_padding(i) for i in range(7)] == [False, True, True, True, True, False, False]
    typed = dataclasses.replace(info, token_types=np.array([1, 1, 1, 1, 1, TOKEN_TYPE_UNUSED, 1]))
    assert typed.is_padding(5)


# -- check_vocabularies ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabs(tiny) -> dict[str, VocabInfo]:
    return {name: read_vocab(path) for name, path in tiny.items()}


def test_compatible_triple(vocabs):
    report = check_vocabularies({r: vocabs[r] for r in ("base", "tuned", "reference")})
    assert report.n_shared == N_VOCAB_BASE
    assert report.notes == ()


def test_same_file_for_every_role(vocabs):
    report = check_vocabularies({"base": vocabs["base"], "tuned": vocabs["base"], "reference": vocabs["base"]})
    assert report.n_shared == N_VOCAB_BASE


@pytest.mark.parametrize("padded_role", ["base", "tuned"])
def test_padded_model_shares_the_unpadded_range(vocabs, padded_role):
    infos = {r: vocabs[r] for r in ("base", "tuned", "reference")}
    infos[padded_role] = vocabs["padded"]
    report = check_vocabularies(infos)
    assert report.n_shared == N_VOCAB_BASE
    # One note per pair with different sizes (two when the padded model is the base).
    assert len(report.notes) == (2 if padded_role == "base" else 1)
    for note in report.notes:
        assert "padding" in note and "padded.gguf" in note and str(N_VOCAB_BASE + 64) in note


def test_renamed_token_is_an_error_naming_both_files_and_the_token(tiny, vocabs):
    with pytest.raises(EFTError) as e:
        check_vocabularies({"base": vocabs["base"], "tuned": vocabs["alt"], "reference": vocabs["reference"]})
    msg = one_line(e)
    for part in (str(tiny["base"]), str(tiny["alt"]), f"id {ALT_DIFF_ID}", BASE_DIFF_TEXT, ALT_DIFF_TEXT):
        assert part in msg


def test_extra_real_tokens_are_an_error(vocabs):
    # Two extra ids past the shared range; the first is a real token, the second padding.
    t = vocabs["tuned"]
    longer = dataclasses.replace(
        t, path="/models/longer.gguf",
        tokens=t.tokens + ["\u2581extra", f"[PAD{N_VOCAB_BASE + 1}]"],
        token_types=np.append(t.token_types, [TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNUSED]),
    )
    for infos in ({"base": longer, "tuned": t}, {"base": t, "tuned": longer}):
        with pytest.raises(EFTError) as e:
            check_vocabularies(infos)
        msg = one_line(e)
        assert "1 real tokens" in msg and "/models/longer.gguf" in msg and f"id {N_VOCAB_BASE}" in msg


def test_extra_padding_only_by_name_is_fine(vocabs):
    # Without token types, "[PADn]"-style names alone mark padding.
    t = dataclasses.replace(vocabs["tuned"], token_types=None)
    longer = dataclasses.replace(t, path="/models/longer.gguf", tokens=t.tokens + ["<unused0>", "<unused1>"])
    assert check_vocabularies({"base": longer, "tuned": t}).n_shared == N_VOCAB_BASE


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(tokenizer_model="gpt2"), "tokenizers"),
        (dict(bos_id=EOS_ID), "BOS ids"),
        (dict(bos_id=None), "BOS ids"),
        (dict(add_bos=False), "add-BOS"),
    ],
)
def test_tokenizer_rule_differences_are_errors(vocabs, change, words):
    base = vocabs["base"]
    other = dataclasses.replace(vocabs["tuned"], **change)
    with pytest.raises(EFTError) as e:
        check_vocabularies({"base": base, "tuned": other})
    msg = one_line(e)
    assert words in msg and base.path in msg and other.path in msg


def test_several_problems_in_one_message(vocabs):
    other = dataclasses.replace(vocabs["alt"], tokenizer_model="gpt2", add_bos=False)
    with pytest.raises(EFTError) as e:
        check_pair(vocabs["base"], other)
    msg = one_line(e)
    assert "tokenizers" in msg and "add-BOS" in msg and f"id {ALT_DIFF_ID}" in msg


def test_different_eos_is_only_a_note(vocabs):
    # Instruct models often mark their end-of-turn token as EOS.
    tuned = dataclasses.replace(vocabs["tuned"], eos_id=IM_END_ID)
    report = check_vocabularies({"base": vocabs["base"], "tuned": tuned, "reference": vocabs["reference"]})
    assert report.n_shared == N_VOCAB_BASE
    assert len(report.notes) == 1
    assert "EOS" in report.notes[0] and str(IM_END_ID) in report.notes[0]


def test_different_bos_is_only_a_note_when_no_model_adds_it(vocabs):
    # SmolLM2's instruct GGUF marks <|im_start|> as BOS, its base <|endoftext|>; neither adds BOS.
    base = dataclasses.replace(vocabs["base"], add_bos=False)
    tuned = dataclasses.replace(vocabs["tuned"], add_bos=False, bos_id=IM_END_ID)
    report = check_vocabularies({"base": base, "tuned": tuned})
    assert len(report.notes) == 1 and "BOS" in report.notes[0]
    with pytest.raises(EFTError, match="BOS ids"):
        check_vocabularies({"base": vocabs["base"], "tuned": dataclasses.replace(vocabs["tuned"], bos_id=IM_END_ID)})


def test_notes_are_not_repeated(vocabs):
    tuned = dataclasses.replace(vocabs["tuned"], pre="llama-bpe")
    ref = dataclasses.replace(vocabs["reference"], pre="llama-bpe", path=vocabs["tuned"].path)
    report = check_vocabularies({"base": vocabs["base"], "tuned": tuned, "reference": ref})
    assert len(report.notes) == 1 and "pre-tokenizers" in report.notes[0]
