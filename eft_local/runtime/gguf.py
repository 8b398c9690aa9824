"""Read the metadata (key/value) section of a GGUF file without loading any weights.

The vocabulary check runs before three models are loaded, so it reads only the header:
for a multi-gigabyte model this is a few megabytes of tokenizer arrays. The tensor table
that follows it is read too, to tell a file cut short (an interrupted download) before
llama.cpp is asked to load it.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import Any

import numpy as np

from ..core.errors import EFTError

GGUF_MAGIC = b"GGUF"

# GGUF value types (gguf spec): scalar struct formats and numpy dtypes.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING = 8
_ARRAY = 9

# The fewest bytes one key/value, array element or tensor entry can take: a hostile count
# fails at once instead of looping over the rest of the file.
_MIN_KV = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_ITEM = {_STRING: 8, _ARRAY: 4 + 8}
_MIN_TENSOR = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

GGML_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32
_INT64_MAX = 2**63 - 1

# ggml type id -> (elements per block, bytes per block), as ggml defines them; copied here
# because gguf-py, whose GGML_QUANT_SIZES lists them, is only a test dependency. A type missing
# here is one this table predates: such a tensor counts only by its offset.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
    42: (64, 18),  # Q2_0
}


class _Corrupt(Exception):
    """A header field no valid GGUF file has; the message says which."""


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        # Checked before slicing, so a hostile length never copies the rest of the file.
        if n > len(self.buf) - self.pos:
            raise EOFError
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def expect(self, count: int, min_size: int) -> None:
        """Raise EOFError unless ``count`` items of at least ``min_size`` bytes can still follow."""
        if count * min_size > len(self.buf) - self.pos:
            raise EOFError

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype not in _SCALARS and etype not in _MIN_ITEM:
                raise ValueError(f"unknown GGUF value type {etype}")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise EOFError
                arr = np.frombuffer(self.buf[self.pos : end], dtype=dtype).copy()
                self.pos = end
                return arr
            self.expect(count, _MIN_ITEM[etype])
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the GGUF key/value metadata of ``path`` (arrays as numpy arrays or lists).

    Raises EFTError with a one-line message when the file is missing, not a regular file, not
    a GGUF file, or shorter than its own tensor table says (a download cut short).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EFTError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise EFTError(f"model path is a directory, not a GGUF file: {path}")
    try:
        # Checked before opening: opening a FIFO blocks until someone writes to it. stat
        # follows symlinks, so the Hugging Face cache's links to its blobs pass.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise EFTError(f"not a regular file: {path}")
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise EFTError(f"not a GGUF file: {path}")
            f.seek(0)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    return _parse(view, path)
                finally:
                    # The mmap cannot close while a view of it is alive.
                    view.release()
    except EFTError:
        raise
    except (OSError, ValueError) as e:
        raise EFTError(f"cannot read {path}: {e}") from None


def _parse(buf: memoryview, path: str) -> dict[str, Any]:
    cur = _Cursor(buf)
    try:
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise EFTError(f"unsupported GGUF version {version} in {path}")
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        if n_kv * _MIN_KV > len(buf) - cur.pos:
            raise _Corrupt(f"{n_kv} key/values cannot fit in {len(buf)} bytes")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            # llama.cpp refuses these too; checking them stops a zero-filled header early.
            if not key or key in meta:
                raise _Corrupt(f"key {key!r} is empty or repeated")
            meta[key] = cur.value(cur.unpack("<I"))
        needed = _data_end(cur, n_tensors, meta)
    except (EOFError, struct.error):
        raise EFTError(f"truncated or corrupt GGUF file: {path}") from None
    except _Corrupt as e:
        raise EFTError(f"truncated or corrupt GGUF file: {path}: {e}") from None
    if needed > len(buf):
        raise EFTError(f"{path}: truncated: has {len(buf)} bytes, header describes {needed}")
    return meta


def _data_end(cur: _Cursor, n_tensors: int, meta: dict[str, Any]) -> int:
    """Read the tensor table at the cursor; return the file size it implies.

    That is the aligned start of the data section plus the furthest tensor end. Only the
    header is read, so this costs the same on a multi-gigabyte file as on a tiny one.
    """
    if n_tensors * _MIN_TENSOR > len(cur.buf) - cur.pos:
        raise _Corrupt(f"{n_tensors} tensors cannot fit in {len(cur.buf)} bytes")
    alignment = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment!r} is not a power of 2")
    end = 0
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string()
        if name in names:
            raise _Corrupt(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.unpack("<I")
        if n_dims > GGML_MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        n_elements = 1
        for d in dims:
            n_elements *= d
            # Dimensions are int64 in ggml; a product past that is what corrupt files look like.
            if d > _INT64_MAX or n_elements > _INT64_MAX:
                raise _Corrupt(f"tensor {name!r} has an impossible shape {dims}")
        ggml_type = cur.unpack("<I")
        offset = cur.unpack("<Q")
        n_bytes = 0
        if ggml_type in GGML_TYPE_SIZES:
            block, block_bytes = GGML_TYPE_SIZES[ggml_type]
            if dims and dims[0] % block:
                raise _Corrupt(
                    f"tensor {name!r} has {dims[0]} elements per row, not a multiple of its "
                    f"type's block of {block}"
                )
            n_bytes = n_elements // block * block_bytes
        end = max(end, offset + n_bytes)
    if n_tensors == 0:
        return cur.pos
    data_start = -(-cur.pos // alignment) * alignment
    return data_start + end
