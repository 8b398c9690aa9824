"""Vocabulary alignment: all models must index one token space before their logits are combined.

Checked from GGUF metadata alone, so an incompatible set fails before any weights are loaded.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..core.errors import EFTError
from .gguf import read_metadata

_log = logging.getLogger("eft_local.vocab")  # the name the README documents

TOKEN_TYPE_UNUSED = 5

# llama.cpp's add-BOS default per tokenizer model where a file has no add_bos_token key and
# llama.cpp itself cannot be asked (SentencePiece and WordPiece add BOS; the rest do not).
_DEFAULT_ADD_BOS = {"llama": True, "bert": True}

# Names converters give to rows that pad an embedding matrix past the real tokenizer
# (Qwen's "[PAD151665]", Gemma's "<unused12>", "<|reserved_special_token_3|>", "<pad>").
_PAD_TEXT = re.compile(r"^(\[PAD\d+\]|<unused\d+>|<\|reserved_special_token_\d+\|>|<\|?pad\|?>|<\|?PAD\|?>)$")


@dataclass(frozen=True)
class VocabInfo:
    """The tokenizer facts of one GGUF file."""

    path: str
    architecture: str
    tokenizer_model: str
    pre: str | None
    tokens: list[str]
    token_types: np.ndarray | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool | None
    chat_template: str | None
    context_length: int | None

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def is_padding(self, token_id: int) -> bool:
        """True for rows that exist only to pad the vocabulary (never real tokens)."""
        if self.token_types is not None and int(self.token_types[token_id]) == TOKEN_TYPE_UNUSED:
            return True
        return bool(_PAD_TEXT.match(self.tokens[token_id]))


def read_vocab(path: str | os.PathLike) -> VocabInfo:
    """Read the tokenizer section of a GGUF file (no weights are loaded)."""
    path = os.fspath(path)
    meta = read_metadata(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise EFTError(f"{path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    arch = str(meta.get("general.architecture", "unknown"))
    types = meta.get("tokenizer.ggml.token_type")

    def opt_int(key: str) -> int | None:
        value = meta.get(key)
        return None if value is None else int(value)

    tokenizer_model = str(meta.get("tokenizer.ggml.model", "unknown"))
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = default_add_bos(path, tokenizer_model)
    return VocabInfo(
        path=path,
        architecture=arch,
        tokenizer_model=tokenizer_model,
        pre=meta.get("tokenizer.ggml.pre"),
        tokens=list(tokens),
        token_types=None if types is None else np.asarray(types),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        add_bos=bool(add_bos),
        chat_template=meta.get("tokenizer.chat_template"),
        context_length=opt_int(f"{arch}.context_length"),
    )


def default_add_bos(path: str, tokenizer_model: str) -> bool:
    """Whether llama.cpp puts BOS in front of a prompt for a file without an add_bos_token key.

    The default depends on the tokenizer and, for BPE, on the pre-tokenizer, so llama.cpp is
    asked with a vocabulary-only load (no weights). Where it refuses the file, its
    per-tokenizer default stands in.
    """
    from .model import Model  # llama.cpp itself, only for these older files

    try:
        model = Model(path, vocab_only=True)
    except EFTError:
        return _DEFAULT_ADD_BOS.get(tokenizer_model, False)
    try:
        return model.add_bos
    finally:
        model.close()


@dataclass(frozen=True)
class VocabReport:
    """What the check found: the shared range and notes worth showing a user."""

    n_shared: int
    notes: tuple[str, ...] = ()


def check_pair(a: VocabInfo, b: VocabInfo) -> list[str]:
    """Raise EFTError if ``a`` and ``b`` do not share one token space; return notes otherwise."""
    n = min(a.n_vocab, b.n_vocab)
    problems = []
    if a.tokenizer_model != b.tokenizer_model:
        problems.append(f"different tokenizers ({a.tokenizer_model!r} vs {b.tokenizer_model!r})")
    if a.bos_id != b.bos_id and (a.add_bos or b.add_bos):
        # BOS only matters where a model puts it in front of every prompt.
        problems.append(f"different BOS ids ({a.bos_id} vs {b.bos_id})")
    if a.add_bos != b.add_bos:
        problems.append(f"different add-BOS rules ({a.add_bos} vs {b.add_bos})")
    if a.tokens[:n] != b.tokens[:n]:
        first = next(i for i in range(n) if a.tokens[i] != b.tokens[i])
        problems.append(
            f"first differing token id {first}: {a.tokens[first]!r} in {a.name} vs {b.tokens[first]!r} in {b.name}"
        )
    if problems:
        raise EFTError(f"incompatible vocabularies: {a.path} and {b.path}: " + "; ".join(problems))
    longer = a if a.n_vocab > b.n_vocab else b
    real = [i for i in range(n, longer.n_vocab) if not longer.is_padding(i)]
    if real:
        shorter = b if longer is a else a
        raise EFTError(
            f"incompatible vocabularies: {longer.path} has {len(real)} real tokens beyond the "
            f"{n} of {shorter.path} (first: id {real[0]} {longer.tokens[real[0]]!r})"
        )
    notes = []
    if a.n_vocab != b.n_vocab:
        notes.append(f"{a.name} has {a.n_vocab} ids and {b.name} {b.n_vocab}: the extra ids are padding")
    if a.bos_id != b.bos_id and not problems:
        notes.append(f"BOS ids differ ({a.name}: {a.bos_id}, {b.name}: {b.bos_id}); neither model adds BOS")
    if a.eos_id != b.eos_id:
        # Instruct models often mark their end-of-turn token as EOS; ids still mean the same text.
        notes.append(f"EOS ids differ ({a.name}: {a.eos_id}, {b.name}: {b.eos_id}); the tuned model's end tokens stop generation")
    if a.pre != b.pre:
        notes.append(f"pre-tokenizers differ ({a.name}: {a.pre}, {b.name}: {b.pre})")
    return notes


def check_vocabularies(infos: Mapping[str, VocabInfo], *, log_notes: bool = True) -> VocabReport:
    """Check that every model shares the first model's token space.

    ``infos`` maps a role name to its vocabulary. Returns the shared range ``[0, n_shared)``
    over which logits are combined; ids beyond it are never sampled. Each note is also logged
    as a warning (logger ``eft_local.vocab``) unless ``log_notes`` is false.
    """
    items = list(infos.values())
    first = items[0]
    notes: list[str] = []
    for other in items[1:]:
        if other.path == first.path:
            continue
        for note in check_pair(first, other):
            if note not in notes:
                notes.append(note)
    if log_notes:
        for note in notes:
            _log.warning(note)
    return VocabReport(n_shared=min(v.n_vocab for v in items), notes=tuple(notes))
