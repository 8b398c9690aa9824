"""Model files that are not what they claim: not regular files, cut short, hostile headers,
files without an add-BOS key, and files llama.cpp itself refuses."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import struct
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import gguf
import llama_cpp
import pytest
from click.testing import CliRunner
from tiny_gguf import rewrite_tiny, write_tiny_llama

import eft_local.cli
from eft_local.runtime.context import LocalBackend
from eft_local.core.errors import EFTError
from eft_local.runtime.gguf import GGML_TYPE_SIZES, read_metadata
from eft_local.runtime.vocab import check_vocabularies, read_vocab

ROOT = Path(__file__).resolve().parents[1]
EFT_LOCAL = ROOT / ".venv" / "bin" / "eft-local"
DEMO = ROOT / "models" / "demo"
ADD_BOS = "tokenizer.ggml.add_bos_token"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # The debug switch prints llama.cpp's log; these tests check the default unless they set it.
    monkeypatch.delenv("EFT_LOCAL_DEBUG", raising=False)


def error_of(path) -> str:
    with pytest.raises(EFTError) as e:
        read_metadata(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def check_cli(base, tuned=DEMO / "tuned.gguf", reference=DEMO / "reference.gguf"):
    return CliRunner().invoke(eft_local.cli.main, ["check", "-m", str(base), "--tuned", str(tuned), "--reference", str(reference)])


# --- GGUF bytes written by hand -------------------------------------------------------------------


def kv_bytes(key: str, value) -> bytes:
    """One GGUF key/value: bool, uint32 or string."""
    k = key.encode()
    head = struct.pack("<Q", len(k)) + k
    if isinstance(value, bool):
        return head + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return head + struct.pack("<II", 4, value)
    v = value.encode()
    return head + struct.pack("<IQ", 8, len(v)) + v


def tensor_info(name: str, dims, ggml_type: int, offset: int) -> bytes:
    n = name.encode()
    return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def header(*, kvs=(("general.architecture", "llama"),), tensors=(), n_kv=None, n_tensors=None,
           raw_kvs: bytes = b"") -> bytes:
    """A GGUF v3 header up to the end of the tensor table (no alignment padding)."""
    body = b"".join(kv_bytes(k, v) for k, v in kvs) + raw_kvs
    n_kv = len(kvs) + (1 if raw_kvs else 0) if n_kv is None else n_kv
    infos = b"".join(tensor_info(*t) for t in tensors)
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, n_kv) + body + infos


def aligned(n: int, alignment: int = 32) -> int:
    return -(-n // alignment) * alignment


# --- header edits on real files -------------------------------------------------------------------


def _skip_value(buf, pos: int, vtype: int) -> int:
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in sizes:
        return pos + sizes[vtype]
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in sizes:
        return pos + count * sizes[etype]
    for _ in range(count):
        pos = _skip_value(buf, pos, etype)
    return pos


def edit_header(src: Path, dst: Path, *, drop=(), add=None) -> Path:
    """Copy a GGUF file without the keys in ``drop`` and with the key/values in ``add``.

    gguf.GGUFReader needs about 40 s for Gemma 3's 262,144-token vocabulary, so the header
    bytes are edited directly: other key/values and the tensor table are copied as they are,
    and the data section is copied after the new header, aligned again.
    """
    add = add or {}
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos, kvs, alignment = 24, [], 32
        for _ in range(n_kv):
            start = pos
            n = struct.unpack_from("<Q", buf, pos)[0]
            key = bytes(buf[pos + 8 : pos + 8 + n]).decode()
            vtype = struct.unpack_from("<I", buf, pos + 8 + n)[0]
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", buf, pos + 12 + n)[0]
            pos = _skip_value(buf, pos + 12 + n, vtype)
            if key not in drop and key not in add:
                kvs.append(bytes(buf[start:pos]))
        info_start = pos
        for _ in range(n_tensors):
            n = struct.unpack_from("<Q", buf, pos)[0]
            n_dims = struct.unpack_from("<I", buf, pos + 8 + n)[0]
            pos += 8 + n + 4 + 8 * n_dims + 4 + 8
        kvs += [kv_bytes(k, v) for k, v in add.items()]
        head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + bytes(buf[info_start:pos])
        with open(dst, "wb") as out, memoryview(buf) as view, view[aligned(pos, alignment):] as data:
            out.write(head + bytes(aligned(len(head), alignment) - len(head)))
            out.write(data)
    return dst


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("faults") / "tiny.gguf", seed=7)


def test_edit_header_keeps_everything_else(tiny_model, tmp_path):
    copy = edit_header(tiny_model, tmp_path / "copy.gguf", drop=(ADD_BOS,), add={"general.x": "y"})
    a, b = gguf.GGUFReader(str(tiny_model)), gguf.GGUFReader(str(copy))
    keys_a = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    keys_b = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    del keys_a[ADD_BOS]
    assert keys_b == {**keys_a, "general.x": "y"}
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in b.tensors
    ]
    assert tiny_model.read_bytes()[a.data_offset:] == copy.read_bytes()[b.data_offset:]


# --- only regular files -------------------------------------------------------------------------


def read_in_thread(path) -> tuple[bool, BaseException | None]:
    """(finished within 5 s, what it raised): a read that blocks must not hang the test run."""
    box: list[BaseException | None] = [None]

    def run():
        try:
            read_metadata(path)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    return not t.is_alive(), box[0]


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    finished, error = read_in_thread(fifo)
    if not finished:
        # Unblock the reader so the thread ends.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert finished
    assert isinstance(error, EFTError) and str(error) == f"not a regular file: {fifo}"


def test_symlink_to_fifo_is_refused(tmp_path):
    fifo = tmp_path / "blob"
    os.mkfifo(fifo)
    link = tmp_path / "model.gguf"
    link.symlink_to(fifo)
    finished, error = read_in_thread(link)
    if not finished:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert finished and str(error) == f"not a regular file: {link}"


def test_device_is_refused():
    assert error_of("/dev/null") == "not a regular file: /dev/null"


def test_symlink_to_a_model_is_read(tmp_path):
    # The Hugging Face cache names models by symlinks into its blob store.
    link = tmp_path / "snapshots" / "model.gguf"
    link.parent.mkdir()
    link.symlink_to(DEMO / "tuned.gguf")
    assert read_vocab(link).tokens == read_vocab(DEMO / "tuned.gguf").tokens


def test_missing_and_directory_messages_are_unchanged(tmp_path):
    dangling = tmp_path / "gone.gguf"
    dangling.symlink_to(tmp_path / "nothing")
    assert error_of(dangling) == f"model file not found: {dangling}"
    assert error_of(tmp_path) == f"model path is a directory, not a GGUF file: {tmp_path}"


# --- truncation -----------------------------------------------------------------------------------


REAL = ["demo-base", "demo-tuned", "demo-reference", "smollm2", "gemma3"]


def real_path(name: str, request) -> Path:
    if name.startswith("demo-"):
        return DEMO / f"{name[5:]}.gguf"
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name", REAL)
def test_intact_file_passes_and_a_cut_copy_fails(name, request, tmp_path):
    path = real_path(name, request)
    size = path.stat().st_size
    read_metadata(path)
    # The header claims exactly the file's size: one byte less is already too short.
    for keep in (size - 1, size // 2):
        cut = tmp_path / f"cut{keep}.gguf"
        shutil.copyfile(path, cut)
        os.truncate(cut, keep)
        assert error_of(cut) == f"{cut}: truncated: has {keep} bytes, header describes {size}"


def test_cut_file_through_the_cli(tmp_path):
    base = DEMO / "base.gguf"
    size = base.stat().st_size
    cut = tmp_path / "base.gguf"
    cut.write_bytes(base.read_bytes()[: size // 2])
    line = f"error: {cut}: truncated: has {size // 2} bytes, header describes {size}\n"
    result = check_cli(cut)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    assert result.stderr == line and result.stdout == ""
    # The tuned model too, and through generate, before anything is loaded.
    cut_tuned = tmp_path / "tuned.gguf"
    tuned = (DEMO / "tuned.gguf").read_bytes()
    cut_tuned.write_bytes(tuned[: len(tuned) // 2])
    result = CliRunner().invoke(eft_local.cli.main, ["generate", "Hi", "--tuned", str(cut_tuned), "--threads", "1"])
    assert result.exit_code == 1
    assert result.stderr == f"error: {cut_tuned}: truncated: has {len(tuned) // 2} bytes, header describes {len(tuned)}\n"


def test_cut_inside_the_tensor_table(tiny_model, tmp_path):
    data_offset = gguf.GGUFReader(str(tiny_model)).data_offset
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[: data_offset - 40])
    assert error_of(cut) == f"truncated or corrupt GGUF file: {cut}"


def test_table_matches_ggml():
    """Block sizes and bytes per block are those of the installed ggml, for every type gguf-py knows."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(p for p in sorted(lib_dir.glob("libggml-base.*")) if not p.is_symlink())))
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    lib.ggml_type_size.restype, lib.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    assert {int(t) for t in gguf.GGML_QUANT_SIZES} <= set(GGML_TYPE_SIZES)
    for t, (block, size) in GGML_TYPE_SIZES.items():
        assert (lib.ggml_blck_size(t), lib.ggml_type_size(t)) == (block, size), t


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_sizes_follow_type_alignment_and_offsets(tmp_path):
    # Q4_K (12): 256 elements in 144 bytes; 512 x 2 elements are 4 blocks = 576 bytes at offset 64.
    tensors = [("a", [512, 2], 12, 64), ("b", [3], 0, 0)]
    h = header(tensors=tensors)
    need = aligned(len(h)) + 64 + 576
    ok = write(tmp_path / "ok.gguf", h + bytes(need - len(h)))
    read_metadata(ok)
    short = write(tmp_path / "short.gguf", h + bytes(need - len(h) - 1))
    assert error_of(short) == f"{short}: truncated: has {need - 1} bytes, header describes {need}"
    # general.alignment moves the data section.
    h64 = header(kvs=(("general.architecture", "llama"), ("general.alignment", 256)), tensors=tensors)
    need64 = aligned(len(h64), 256) + 64 + 576
    short64 = write(tmp_path / "short64.gguf", h64 + bytes(need64 - len(h64) - 1))
    assert error_of(short64) == f"{short64}: truncated: has {need64 - 1} bytes, header describes {need64}"
    # A type this table predates counts only by its offset.
    hu = header(tensors=[("u", [1000, 1000], 99, 128)])
    needu = aligned(len(hu)) + 128
    read_metadata(write(tmp_path / "unknown.gguf", hu + bytes(needu - len(hu))))
    shortu = write(tmp_path / "unknown_short.gguf", hu + bytes(needu - len(hu) - 1))
    assert error_of(shortu) == f"{shortu}: truncated: has {needu - 1} bytes, header describes {needu}"


HOSTILE = {
    "tensor count": (dict(n_tensors=2**62), "4611686018427387904 tensors cannot fit in {size} bytes"),
    "key count": (dict(n_kv=2**62), "4611686018427387904 key/values cannot fit in {size} bytes"),
    "dimensions": (dict(tensors=[("w", [2] * 7, 0, 0)]), "tensor 'w' has 7 dimensions (at most 4)"),
    "shape overflow": (dict(tensors=[("w", [2**40, 2**40], 0, 0)]),
                       "tensor 'w' has an impossible shape [1099511627776, 1099511627776]"),
    "negative dim": (dict(tensors=[("w", [2**64 - 1], 0, 0)]), "tensor 'w' has an impossible shape [18446744073709551615]"),
    "row not in blocks": (dict(tensors=[("w", [33, 2], 2, 0)]),
                          "tensor 'w' has 33 elements per row, not a multiple of its type's block of 32"),
    "alignment": (dict(kvs=(("general.alignment", 48),)), "general.alignment 48 is not a power of 2"),
    "repeated tensor": (dict(tensors=[("w", [1], 0, 0), ("w", [1], 0, 32)]), "tensor 'w' appears twice"),
    "repeated key": (dict(kvs=(("a", "x"), ("a", "y"))), "key 'a' is empty or repeated"),
    "string array count": (dict(raw_kvs=kv_bytes("t", "")[:-12] + struct.pack("<IIQ", 9, 8, 2**62)), None),
    "string length": (dict(raw_kvs=struct.pack("<Q", 2**62) + b"key"), None),
    "u8 array count": (dict(raw_kvs=kv_bytes("t", "")[:-12] + struct.pack("<IIQ", 9, 0, 2**62)), None),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_counts_fail_fast_and_small(case, tmp_path):
    fields, detail = HOSTILE[case]
    p = write(tmp_path / "hostile.gguf", header(**fields) + bytes(4096))
    size = p.stat().st_size
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = error_of(p)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    expected = f"truncated or corrupt GGUF file: {p}"
    assert msg == (expected if detail is None else f"{expected}: {detail.format(size=size)}")
    assert elapsed < 0.2 and peak < 1_000_000, (elapsed, peak)


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_hostile_count_in_a_large_zero_filled_file(field, tmp_path):
    # 1 GiB, sparse: a count that does fit the file must still stop at the second entry.
    p = tmp_path / "big.gguf"
    h = header(**{field: 2**25})
    with open(p, "wb") as f:
        f.write(h)
        f.truncate(2**30)
    start = time.perf_counter()
    msg = error_of(p)
    assert time.perf_counter() - start < 0.5
    what = "tensor ''" if field == "n_tensors" else "key ''"
    assert msg.startswith(f"truncated or corrupt GGUF file: {p}: {what}")


# --- files without an add-BOS key ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyless(smollm2, gemma3, tiny_model, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (original, copy without the add-BOS key)."""
    d = tmp_path_factory.mktemp("keyless")
    out = {}
    for name, src in (("smollm2", smollm2), ("gemma3", gemma3), ("tiny", tiny_model)):
        out[name] = (src, edit_header(src, d / f"{name}.gguf", drop=(ADD_BOS,)))
    # A BPE vocabulary whose pre-tokenizer makes llama.cpp add BOS, unlike BPE's usual default.
    out["smollm2-llama-bpe"] = (smollm2, edit_header(
        smollm2, d / "smollm2-llama-bpe.gguf", drop=(ADD_BOS,), add={"tokenizer.ggml.pre": "llama-bpe"}
    ))
    return out


def llama_cpp_adds_bos(path: Path) -> bool:
    """What llama.cpp really does with "Hello" and its own BOS rule."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(b"Hello", add_bos=True)[0] == llm.token_bos()
    finally:
        llm.close()


def test_originals_have_the_key(keyless):
    # Which the default replaces: SmolLM2 (gpt2, smollm) says False, Gemma 3 and the tiny llama True.
    have = {name: read_metadata(orig).get(ADD_BOS) for name, (orig, _) in keyless.items()}
    assert have == {"smollm2": False, "gemma3": True, "tiny": True, "smollm2-llama-bpe": False}
    assert all(ADD_BOS not in read_metadata(copy) for _, copy in keyless.values())


@pytest.mark.parametrize("name, expected", [
    ("smollm2", False), ("gemma3", True), ("tiny", True), ("smollm2-llama-bpe", True),
])
def test_missing_key_means_what_llama_cpp_does(keyless, name, expected, capfd):
    _, copy = keyless[name]
    capfd.readouterr()
    assert read_vocab(copy).add_bos is expected
    # The vocabulary-only load asks llama.cpp quietly.
    assert capfd.readouterr() == ("", "")
    assert llama_cpp_adds_bos(copy) is expected


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "tiny"])
def test_keyless_copy_matches_its_original(keyless, name):
    orig, copy = keyless[name]
    report = check_vocabularies({"base": read_vocab(orig), "tuned": read_vocab(copy)})
    assert report.n_shared == len(read_vocab(orig).tokens)


def test_real_difference_is_still_an_error(keyless, tmp_path):
    orig, copy = keyless["smollm2"]
    adds = edit_header(orig, tmp_path / "adds.gguf", add={ADD_BOS: True})
    with pytest.raises(EFTError) as e:
        check_vocabularies({"base": read_vocab(copy), "tuned": read_vocab(adds)})
    assert str(e.value) == f"incompatible vocabularies: {copy} and {adds}: different add-BOS rules (False vs True)"
    # The llama-bpe copy adds BOS by llama.cpp's default, so it differs from the original.
    with pytest.raises(EFTError, match=r"different add-BOS rules \(False vs True\)"):
        check_vocabularies({"base": read_vocab(orig), "tuned": read_vocab(keyless["smollm2-llama-bpe"][1])})


@pytest.mark.parametrize("name, expected", [("tiny", True), ("smollm2", False)])
def test_default_when_llama_cpp_refuses_the_file(keyless, name, expected, tmp_path):
    # An unknown architecture stops llama.cpp's vocabulary-only load; the tokenizer's default stands.
    _, copy = keyless[name]
    odd = edit_header(copy, tmp_path / "odd.gguf", add={"general.architecture": "nonsense"})
    assert read_vocab(odd).add_bos is expected


# --- files llama.cpp refuses -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused(tiny_model, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Files that pass the header checks but not llama.cpp's loader, with llama.cpp's reason."""
    d = tmp_path_factory.mktemp("refused")
    return {
        "architecture": (rewrite_tiny(tiny_model, d / "arch.gguf", arch="nonsense"),
                         "unknown model architecture: 'nonsense'"),
        "tensor": (rewrite_tiny(tiny_model, d / "no_norm.gguf", drop_tensors=("output_norm.weight",)),
                   "check_tensor_dims: tensor 'output_norm.weight' not found"),
    }


@pytest.mark.parametrize("case", ["architecture", "tensor"])
def test_load_error_says_what_llama_cpp_said(refused, case):
    path, reason = refused[case]
    read_vocab(path)  # our checks pass
    with pytest.raises(EFTError) as e:
        LocalBackend(path, n_ctx=64, n_threads=1)
    assert str(e.value) == f"cannot load {path}: llama.cpp: {reason}"


def test_each_load_reports_its_own_reason(refused, tiny_model):
    for case in ("tensor", "architecture", "tensor"):
        path, reason = refused[case]
        with pytest.raises(EFTError, match=f"^cannot load {path}: llama.cpp: {reason}$"):
            LocalBackend(path, n_ctx=64, n_threads=1)
        LocalBackend(tiny_model, n_ctx=64, n_threads=1).close()


def test_load_error_through_the_cli(refused, tiny_model):
    path, reason = refused["architecture"]
    args = ["generate", "Hello", "-m", str(tiny_model), "--tuned", str(path), "--reference", str(tiny_model), "--threads", "1"]
    result = CliRunner().invoke(eft_local.cli.main, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    assert result.stderr == f"error: cannot load {path}: llama.cpp: {reason}\n"


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_llama_cpp_load_log(refused, tiny_model, debug):
    path, reason = refused["tensor"]
    env = {k: v for k, v in os.environ.items() if k != "EFT_LOCAL_DEBUG"}
    if debug:
        env["EFT_LOCAL_DEBUG"] = "1"
    proc = subprocess.run(
        [str(EFT_LOCAL), "generate", "Hello", "-m", str(tiny_model), "--tuned", str(path), "--reference", str(tiny_model),
         "--threads", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    error = f"error: cannot load {path}: llama.cpp: {reason}"
    if debug:
        # llama.cpp's own load log, including its reason and the file's metadata dump.
        assert lines.count(error) == 1
        assert f"llama_model_loader: loaded meta data with 25 key-value pairs and 20 tensors from {path}" in proc.stderr
        assert f"llama_model_load: error loading model: {reason}" in lines
        assert "Traceback" not in proc.stderr
    else:
        assert lines == [error]
