"""Test helpers: independent re-computation of what the engine should produce."""

from __future__ import annotations

import shutil
from pathlib import Path

import llama_cpp
import numpy as np


def copy_model(path: Path, dest: Path) -> Path:
    """A second file with the same weights: loaded as its own model, with its own context."""
    shutil.copyfile(path, dest)
    return dest


class Fresh:
    """Reference evaluation: a model's logits after evaluating a token list from scratch."""

    def __init__(self, path: Path, n_ctx: int = 1024):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        self.llm.eval(tokens)
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def close(self) -> None:
        self.llm.close()


def recompute(fresh: dict[str, Fresh], prompts: dict[str, list[int]], weight: float, n_shared: int) -> np.ndarray:
    """EFT distribution from each model's own fresh evaluation, in plain NumPy."""
    lp = {role: _log_softmax(f.logits(prompts[role])) for role, f in fresh.items()}
    total = lp["base"][:n_shared] + weight * (lp["tuned"][:n_shared] - lp["reference"][:n_shared])
    return _log_softmax(total)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())

