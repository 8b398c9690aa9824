"""Read the metadata (key/value) section of a GGUF file without loading any weights.

The vocabulary check runs before three models are loaded, so it reads only the header:
for a multi-gigabyte model this is a few megabytes of tokenizer arrays.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np

from .errors import EFTError

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
        raw = bytes(self.buf[self.pos : self.pos + n])
        if len(raw) != n:
            raise EOFError
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise EOFError
                arr = np.frombuffer(self.buf[self.pos : end], dtype=dtype).copy()
                self.pos = end
                return arr
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the GGUF key/value metadata of ``path`` (arrays as numpy arrays or lists).

    Raises EFTError with a one-line message when the file is missing or not a GGUF file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EFTError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise EFTError(f"model path is a directory, not a GGUF file: {path}")
    try:
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
        cur.unpack("<Q")  # tensor count: not needed
        n_kv = cur.unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        return meta
    except (EOFError, struct.error):
        raise EFTError(f"truncated or corrupt GGUF file: {path}") from None
