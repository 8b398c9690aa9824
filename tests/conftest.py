"""Shared fixtures: tiny GGUF models written at test time, and real models from PyPI packages."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

# One thread per model: with every core each, llama.cpp's spinning worker threads slow runs
# many times over whenever anything else shares the machine.
os.environ.setdefault("EFT_LOCAL_THREADS", "1")
# A shell that starts the tests in the background passes SIGINT on as ignored, and an ignored
# signal stays ignored in every child: the Ctrl-C tests need it delivered.
signal.signal(signal.SIGINT, signal.default_int_handler)
# The tests see only the bundled recipes, never an overlay file of whoever runs them.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="eft-local-test-config-")

import real_models
from tiny_gguf import write_tiny_llama


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A compatible triple (larger base), plus models that break or stretch the vocabulary."""
    d = tmp_path_factory.mktemp("tiny")
    return {
        "base": write_tiny_llama(d / "base.gguf", seed=1, n_layer=4, n_embd=128, n_ff=256),
        "tuned": write_tiny_llama(d / "tuned.gguf", seed=2),
        "reference": write_tiny_llama(d / "reference.gguf", seed=3),
        "alt": write_tiny_llama(d / "alt.gguf", seed=4, vocab="alt"),
        "padded": write_tiny_llama(d / "padded.gguf", seed=5, n_layer=4, n_embd=128, n_ff=256, n_pad=64),
        "no_template": write_tiny_llama(d / "no_template.gguf", seed=6, chat_template=None),
    }


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return real_models.smollm2()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return real_models.gemma3()
