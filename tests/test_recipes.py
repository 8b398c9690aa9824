"""Recipes, pulls into the Hugging Face cache, offline resolution, and the pull/models commands.

Every download goes to a stand-in hub on 127.0.0.1 (tests/stand_in_hub.py); a guard fails any
test that tries to resolve or connect to another host.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from eft_local.hub import download as dl
from eft_local.hub import recipes as rc
from eft_local.cli.hub import models as models_cmd
from eft_local.cli.hub import pull as pull_cmd
from eft_local.core.errors import EFTError
from stand_in_hub import StandInHub, closed_port

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Fail the test if anything resolves or connects to a host other than this machine."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(str(address))
            raise OSError(f"test tried to connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(str(host))
            raise socket.gaierror(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A private Hugging Face home and cache; no offline mode, no models folder override."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "EFT_LOCAL_MODELS_DIR", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def hub(hf_home, monkeypatch):
    """A running stand-in hub that HF_ENDPOINT points at."""
    from huggingface_hub import constants

    server = StandInHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # huggingface-hub reads these once at import: patched so that what it does on its own (2.x
    # fetches an agent registry from ENDPOINT) stays on the stand-in and out of the real home.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(hf_home / "agents.json"), raising=False)
    # huggingface-hub writes a download in pieces of DOWNLOAD_CHUNK_SIZE (10 MB) and a dropped
    # connection loses the piece in flight; pieces of 16 bytes make the offsets asserted here exact.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16)
    yield server
    server.stop()


@pytest.fixture
def no_retry_wait(monkeypatch):
    """A pull (and huggingface-hub under it) pauses before asking again; tests need not."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def write_recipes(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipes.toml"
    path.write_text(text)
    return path


TRIPLE = """
[trio]
description = "three files on the stand-in hub"
verified = true
[trio.base]
repo = "org/base-GGUF"
file = "base.Q4_K_M.gguf"
quant = "Q4_K_M"
[trio.tuned]
repo = "org/tuned-GGUF"
file = "tuned.Q8_0.gguf"
[trio.reference]
repo = "org/reference-GGUF"
file = "reference.Q8_0.gguf"
"""


@pytest.fixture
def trio(hub, tmp_path) -> tuple[rc.Recipe, dict[str, bytes]]:
    """The TRIPLE recipe, with small random files for it on the stand-in hub."""
    data = {"base": os.urandom(300_000), "tuned": os.urandom(100_000), "reference": os.urandom(120_000)}
    recipe = rc.load_recipes(write_recipes(tmp_path / "models", TRIPLE))["trio"]
    for role, ref in recipe.models.items():
        hub.add(ref.repo, ref.file, data[role])
    return recipe, data


def snapshot_files(hf_home: Path, repo: str) -> list[Path]:
    snapshots = hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots"
    return [p for p in snapshots.rglob("*") if p.is_file() or p.is_symlink()] if snapshots.exists() else []


def blob_files(hf_home: Path, repo: str) -> list[str]:
    blobs = hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []


def partial_file(hf_home: Path, ref: rc.ModelRef, hub: StandInHub) -> Path:
    """Where a pull keeps the bytes of an unfinished download: ``blobs/<sha256>.incomplete``."""
    hosted = hub.files[(ref.repo, ref.file)]
    return hf_home / "hub" / ("models--" + ref.repo.replace("/", "--")) / "blobs" / (hosted.sha256 + ".incomplete")


def range_start(request) -> int | None:
    m = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
    return int(m[1]) if m else None


def fail_midway(recipe: rc.Recipe, role: str, hub: StandInHub, after: int) -> None:
    """A pull whose connection delivers ``after`` bytes of the file, then keeps dropping until the pull gives up."""
    ref = recipe.models[role]
    hosted = hub.files[(ref.repo, ref.file)]
    hosted.drops = [after] + [0] * 50
    with pytest.raises(EFTError, match=rf"^cannot download {re.escape(ref.file)} from {ref.repo}: cannot reach .*; "
                                       rf"kept {after} of {len(hosted.data)} bytes, run the pull again to resume$"):
        rc.pull(recipe, progress=False)
    hosted.drops.clear()


# ---------------------------------------------------------------------------------------------
# The recipes file


def test_bundled_recipes_parse_and_name_three_roles(monkeypatch):
    monkeypatch.delenv("EFT_LOCAL_MODELS_DIR", raising=False)
    recipes = rc.load_recipes()
    assert {"demo", "smollm2", "qwen2.5", "llama3", "gemma3", "llama2"} <= set(recipes)
    for recipe in recipes.values():
        assert list(recipe.models)[:3] == list(rc.ROLES), recipe.name
        assert recipe.description
        for ref in recipe.models.values():
            assert (ref.path is not None) != (ref.repo is not None)
            if ref.repo is not None:
                assert ref.file.endswith(".gguf") and ref.quant
    assert rc.default_recipe() == "demo"
    assert [r.name for r in recipes.values() if r.default] == ["demo"]


def test_demo_recipe_resolves_to_the_bundled_folder(monkeypatch, hf_home):
    paths = rc.resolve("demo")  # local files: no cache lookup, no network
    demo = rc.DEFAULT_MODELS_DIR / "demo"
    assert paths == {
        "base": demo / "base.gguf", "tuned": demo / "tuned.gguf",
        "reference": demo / "reference.gguf", "oracle": demo / "oracle.gguf",
        "tuned_b": demo / "tuned_b.gguf",
    }
    assert rc.models_dir() == rc.DEFAULT_MODELS_DIR


def test_models_dir_can_be_moved(tmp_path, monkeypatch, hf_home):
    folder = tmp_path / "elsewhere"
    write_recipes(folder, '[mine]\ndefault = true\n[mine.base]\npath = "b.gguf"\n'
                          '[mine.tuned]\npath = "/abs/t.gguf"\n[mine.reference]\npath = "sub/r.gguf"\n')
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(folder))
    assert rc.default_recipe() == "mine"
    assert rc.resolve("mine") == {
        "base": folder.resolve() / "b.gguf", "tuned": Path("/abs/t.gguf"), "reference": folder.resolve() / "sub/r.gguf",
    }
    assert rc.status("mine") == {"base": False, "tuned": False, "reference": False}


def test_unknown_recipe_lists_the_known_ones(monkeypatch):
    monkeypatch.delenv("EFT_LOCAL_MODELS_DIR", raising=False)
    with pytest.raises(EFTError, match=r"unknown recipe 'nope'; known recipes: demo, .*llama2"):
        rc.resolve("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[a\nb = 1\n", r"invalid TOML"),
        ('[x]\n[x.base]\npath = "b"\n[x.tuned]\npath = "t"\n', r"recipe 'x' has no reference model"),
        ('[x]\n[x.base]\npath = "b"\nrepo = "o/n"\nfile = "f"\n[x.tuned]\npath = "t"\n[x.reference]\npath = "r"\n',
         r"either path or repo \+ file"),
        ('[x]\n[x.base]\nrepo = "o/n"\nfiel = "f"\n[x.tuned]\npath = "t"\n[x.reference]\npath = "r"\n',
         r"unknown key 'fiel'"),
        ('[x]\n[x.base]\nrepo = "nameonly"\nfile = "f"\n[x.tuned]\npath = "t"\n[x.reference]\npath = "r"\n',
         r"not an owner/name repo id"),
        ('[x]\ncolour = "red"\n', r"unknown key 'colour'"),
        ('[x]\ndefault = true\n[x.base]\npath="b"\n[x.tuned]\npath="t"\n[x.reference]\npath="r"\n'
         '[y]\ndefault = true\n[y.base]\npath="b"\n[y.tuned]\npath="t"\n[y.reference]\npath="r"\n',
         r"more than one recipe has default = true"),
    ],
    ids=["toml", "no-reference", "path-and-repo", "typo", "repo-id", "unknown-key", "two-defaults"],
)
def test_malformed_recipes_name_the_file(tmp_path, text, message):
    path = write_recipes(tmp_path, text)
    with pytest.raises(EFTError, match=message) as info:
        rc.load_recipes(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_recipes_file(tmp_path):
    with pytest.raises(EFTError, match="recipe file .*nothere.toml not found"):
        rc.load_recipes(tmp_path / "nothere.toml")


# ---------------------------------------------------------------------------------------------
# Pull, resolve, status


def test_pull_downloads_every_model_with_its_content(trio, hub, hf_home):
    recipe, data = trio
    assert rc.status(recipe) == {"base": False, "tuned": False, "reference": False}
    paths = rc.pull(recipe, progress=False)
    assert set(paths) == set(rc.ROLES)
    for role, path in paths.items():
        assert path.read_bytes() == data[role]
        assert path.name == recipe.models[role].file
        assert (hf_home / "hub") in path.parents  # huggingface-hub's normal cache
    assert len(hub.gets()) == 3
    assert rc.status(recipe) == {"base": True, "tuned": True, "reference": True}


def test_second_pull_downloads_nothing(trio, hub):
    recipe, _ = trio
    first = rc.pull(recipe)
    gets = len(hub.gets())
    assert rc.pull(recipe, progress=False) == first
    assert len(hub.gets()) == gets


def test_resolve_after_pull_works_offline_with_the_hub_gone(trio, hub, monkeypatch):
    recipe, data = trio
    pulled = rc.pull(recipe, progress=False)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert rc.resolve(recipe) == pulled
    assert rc.pull(recipe) == pulled  # offline, a complete recipe is just looked up
    assert {role: p.read_bytes() for role, p in rc.resolve(recipe).items()} == data


def test_resolve_before_pull_says_how_to_pull(trio, hub):
    recipe, _ = trio
    with pytest.raises(EFTError, match=r"recipe 'trio': base \(org/base-GGUF/base.Q4_K_M.gguf\), tuned .* "
                                       r"not downloaded; run: eft-local pull trio"):
        rc.resolve(recipe)
    assert hub.file_requests() == []


def test_dropped_connection_resumes_with_a_range_request(trio, hub, hf_home, no_retry_wait):
    recipe, data = trio
    ref = recipe.models["base"]
    half = len(data["base"]) // 2
    hub.files[(ref.repo, ref.file)].drops = [half]  # the first GET stops after half the bytes
    paths = rc.pull(recipe, progress=False)
    assert paths["base"].read_bytes() == data["base"]
    gets = hub.gets(ref.file)
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert range_start(gets[1]) == half  # every byte received was kept
    assert not [b for b in blob_files(hf_home, ref.repo) if b.endswith(".incomplete")]


def test_failed_pull_keeps_the_partial_file_and_the_next_pull_resumes(trio, hub, hf_home, no_retry_wait):
    recipe, data = trio
    ref = recipe.models["base"]
    half = len(data["base"]) // 2
    fail_midway(recipe, "base", hub, half)
    partial = partial_file(hf_home, ref, hub)
    assert partial.read_bytes() == data["base"][:half]
    assert snapshot_files(hf_home, ref.repo) == []
    assert rc.status(recipe)["base"] is False
    with pytest.raises(EFTError, match="not downloaded"):
        rc.resolve(recipe)

    before = len(hub.gets(ref.file))
    paths = rc.pull(recipe, progress=False)
    assert paths["base"].read_bytes() == data["base"]
    gets = hub.gets(ref.file)[before:]
    assert [range_start(g) for g in gets] == [half]  # one request, for the rest only
    assert not partial.exists()
    assert not [b for b in blob_files(hf_home, ref.repo) if "incomplete" in b]


class InterruptingBar:
    """A progress bar that acts like Ctrl-C once ``after`` bytes have been written."""

    def __init__(self, after: int) -> None:
        self.n, self.after = 0, after

    def update(self, k: int = 1) -> None:
        if self.n >= self.after:  # counted bytes are written by the time the next piece is counted
            raise KeyboardInterrupt
        self.n += k

    def __enter__(self) -> "InterruptingBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_ctrl_c_keeps_the_partial_file_and_the_next_pull_resumes(trio, hub, hf_home, monkeypatch):
    recipe, data = trio
    ref = recipe.models["base"]
    real_bar = dl._progress_bar
    monkeypatch.setattr(dl, "_progress_bar", lambda desc, total, initial, enabled: InterruptingBar(100_000))
    with pytest.raises(KeyboardInterrupt):
        rc.pull(recipe, progress=False)
    partial = partial_file(hf_home, ref, hub)
    kept = partial.stat().st_size
    assert 100_000 <= kept < len(data["base"])
    assert partial.read_bytes() == data["base"][:kept]
    assert snapshot_files(hf_home, ref.repo) == []

    monkeypatch.setattr(dl, "_progress_bar", real_bar)
    before = len(hub.gets(ref.file))
    paths = rc.pull(recipe)  # progress on: the bar starts at the resumed offset
    assert paths["base"].read_bytes() == data["base"]
    assert [range_start(g) for g in hub.gets(ref.file)[before:]] == [kept]
    assert not partial.exists()


def test_a_server_that_ignores_range_still_gives_the_right_file(trio, hub, hf_home, no_retry_wait):
    recipe, data = trio
    ref = recipe.models["base"]
    hosted = hub.files[(ref.repo, ref.file)]
    fail_midway(recipe, "base", hub, 50_000)
    hosted.honours_range = False
    hosted.drops = [200_000]  # and it drops again: the retry asks for a range and again gets it all
    before = len(hub.gets(ref.file))
    paths = rc.pull(recipe, progress=False)
    assert paths["base"].read_bytes() == data["base"]
    assert [range_start(g) for g in hub.gets(ref.file)[before:]] == [50_000, 200_000]
    assert not partial_file(hf_home, ref, hub).exists()


def test_a_busy_server_is_asked_again(trio, hub, no_retry_wait):
    recipe, data = trio
    base, tuned = recipe.models["base"], recipe.models["tuned"]
    hub.files[(base.repo, base.file)].statuses = [503, 429]  # busy twice, then fine
    hub.files[(tuned.repo, tuned.file)].statuses = [503] * 10  # down for longer than a pull waits
    with pytest.raises(EFTError, match=r"^cannot download tuned.Q8_0.gguf from org/tuned-GGUF: HTTP 503"):
        rc.pull(recipe, progress=False)
    assert len(hub.gets(base.file)) == 3 and len(hub.gets(tuned.file)) == dl._RETRIES
    assert rc.status(recipe)["base"] is True
    hub.files[(tuned.repo, tuned.file)].statuses.clear()
    assert rc.pull(recipe, progress=False)["tuned"].read_bytes() == data["tuned"]


def test_a_server_error_once_is_asked_again(trio, hub, hf_home, no_retry_wait, monkeypatch):
    recipe, data = trio
    ref = recipe.models["reference"]
    hub.files[(ref.repo, ref.file)].statuses = [500]  # one failing answer, then fine
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    assert rc.pull(recipe, progress=False)["reference"].read_bytes() == data["reference"]
    assert [range_start(g) for g in hub.gets(ref.file)] == [None, None]
    assert 0 < sum(waits) <= 2  # a short pause, not the minutes a stuck pull would take
    assert blob_files(hf_home, ref.repo) == [hub.files[(ref.repo, ref.file)].sha256]


def test_a_server_error_that_persists_is_one_line_and_keeps_what_came(trio, hub, tmp_path, monkeypatch, no_retry_wait,
                                                                      capfd):
    recipe, data = trio
    ref = recipe.models["base"]
    hosted = hub.files[(ref.repo, ref.file)]
    half = len(data["base"]) // 2
    hosted.drops = [half]  # half the file arrives, then the connection drops
    hosted.statuses = [None] + [502] * 20  # and the server fails from then on (None: the first GET is fine)
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(cli(), ["pull", "trio", "-q"])
    assert result.exit_code == 1 and result.stdout == ""
    assert re.fullmatch(rf"error: cannot download base.Q4_K_M.gguf from org/base-GGUF: HTTP 502: [^\n]*; "
                        rf"kept {half} of {len(data['base'])} bytes, run the pull again to resume\n", result.stderr)
    # huggingface-hub's own retry notices stay quiet too (they would go to the real stderr).
    assert capfd.readouterr().err == ""
    hosted.statuses.clear()
    before = len(hub.gets(ref.file))
    assert rc.pull(recipe, progress=False)["base"].read_bytes() == data["base"]
    assert [range_start(g) for g in hub.gets(ref.file)[before:]] == [half]


def test_a_corrupted_partial_file_is_caught_and_removed(trio, hub, hf_home, no_retry_wait):
    recipe, data = trio
    ref = recipe.models["tuned"]
    fail_midway(recipe, "tuned", hub, 40_000)
    partial = partial_file(hf_home, ref, hub)
    partial.write_bytes(os.urandom(40_000))  # right length, wrong bytes: only sha256 can tell
    with pytest.raises(EFTError, match=r"^tuned.Q8_0.gguf from org/tuned-GGUF does not match what .* reports "
                                       r"\(content hash .*; it resumed a partial download of 40000 bytes\); "
                                       r"removed it, run the pull again$"):
        rc.pull(recipe, progress=False)
    assert not partial.exists()
    assert blob_files(hf_home, ref.repo) == [] and snapshot_files(hf_home, ref.repo) == []
    before = len(hub.gets(ref.file))
    assert rc.pull(recipe, progress=False)["tuned"].read_bytes() == data["tuned"]
    assert [range_start(g) for g in hub.gets(ref.file)[before:]] == [None]  # from the start


def test_a_partial_file_longer_than_the_hub_file_is_started_over(trio, hub, hf_home):
    recipe, data = trio
    ref = recipe.models["tuned"]
    partial = partial_file(hf_home, ref, hub)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * (len(data["tuned"]) + 10))
    assert rc.pull(recipe, progress=False)["tuned"].read_bytes() == data["tuned"]
    assert [range_start(g) for g in hub.gets(ref.file)] == [None]


def test_a_416_answer_drops_the_partial_file(trio, hub, hf_home):
    recipe, data = trio
    ref = recipe.models["tuned"]
    hosted = hub.files[(ref.repo, ref.file)]
    partial = partial_file(hf_home, ref, hub)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data["tuned"][:50_000])
    hosted.served = data["tuned"][:30_000]  # the server has less than the partial file holds
    with pytest.raises(EFTError, match=r"^cannot download tuned.Q8_0.gguf from org/tuned-GGUF: "
                                       r"the server offers 30000 bytes, the hub reports size 100000$"):
        rc.pull(recipe, progress=False)
    assert [range_start(g) for g in hub.gets(ref.file)] == [50_000, None]
    assert not partial.exists()


def test_a_resumed_pull_is_in_huggingface_hubs_cache_layout(trio, hub, hf_home, monkeypatch, no_retry_wait):
    from huggingface_hub import try_to_load_from_cache

    recipe, data = trio
    ref = recipe.models["base"]
    hosted = hub.files[(ref.repo, ref.file)]
    fail_midway(recipe, "base", hub, 123_456)
    paths = rc.pull(recipe, progress=False)
    repo_dir = hf_home / "hub" / "models--org--base-GGUF"
    commit = hub.commits[ref.repo]
    assert paths["base"] == repo_dir / "snapshots" / commit / ref.file
    assert os.readlink(paths["base"]) == f"../../blobs/{hosted.sha256}"
    assert (repo_dir / "refs" / "main").read_text() == commit
    assert blob_files(hf_home, ref.repo) == [hosted.sha256]

    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert rc.resolve(recipe)["base"] == paths["base"]
    found = try_to_load_from_cache(ref.repo, ref.file, cache_dir=hf_home / "hub")
    assert found == str(paths["base"])
    assert Path(found).read_bytes() == data["base"]


def test_huggingface_hub_uses_a_pulled_file_without_downloading(trio, hub, hf_home):
    from huggingface_hub import hf_hub_download

    recipe, _ = trio
    ref = recipe.models["reference"]
    pulled = rc.pull(recipe, progress=False)["reference"]
    gets = len(hub.gets())
    assert hf_hub_download(ref.repo, ref.file, cache_dir=hf_home / "hub", endpoint=hub.url) == str(pulled)
    assert len(hub.gets()) == gets


def test_pinned_revision_and_no_symlinks(hub, hf_home, tmp_path, monkeypatch):
    from huggingface_hub import constants, try_to_load_from_cache

    data = os.urandom(20_000)
    hub.add("org/pinned", "m.gguf", data)
    commit = hub.commits["org/pinned"]
    path = write_recipes(tmp_path, f'[p]\n[p.base]\nrepo = "org/pinned"\nfile = "m.gguf"\nrevision = "{commit}"\n'
                                   '[p.tuned]\npath = "t"\n[p.reference]\npath = "r"\n')
    (tmp_path / "t").write_bytes(b"t")
    (tmp_path / "r").write_bytes(b"r")
    monkeypatch.setenv("HF_HUB_DISABLE_SYMLINKS", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_SYMLINKS", True)  # huggingface-hub reads it at import
    pulled = rc.pull(rc.load_recipes(path)["p"], progress=False)["base"]
    assert not pulled.is_symlink() and pulled.read_bytes() == data  # the file itself, where links are off
    assert blob_files(hf_home, "org/pinned") == []  # moved there, not copied: one copy on disk
    assert not (hf_home / "hub" / "models--org--pinned" / "refs").exists()  # a commit needs no ref
    assert try_to_load_from_cache("org/pinned", "m.gguf", cache_dir=hf_home / "hub", revision=commit) == str(pulled)
    assert rc.resolve(rc.load_recipes(path)["p"])["base"] == pulled


def test_missing_file_names_repo_and_file_and_writes_nothing(trio, hub, hf_home):
    recipe, _ = trio
    ref = recipe.models["reference"]
    del hub.files[(ref.repo, ref.file)]  # the repo exists, the file does not: 404 EntryNotFound
    with pytest.raises(EFTError) as info:
        rc.pull(recipe, progress=False)
    assert str(info.value) == "cannot download reference.Q8_0.gguf from org/reference-GGUF: file not found in the repository"
    assert snapshot_files(hf_home, ref.repo) == []
    assert rc.status(recipe)["reference"] is False


def test_missing_repo_and_missing_revision(hub, hf_home, tmp_path):
    path = write_recipes(tmp_path, TRIPLE + '[rev]\n[rev.base]\nrepo = "org/base-GGUF"\nfile = "base.Q4_K_M.gguf"\n'
                                           'revision = "v9"\n[rev.tuned]\npath = "t"\n[rev.reference]\npath = "r"\n')
    recipes = rc.load_recipes(path)
    with pytest.raises(EFTError, match=r"^cannot download base.Q4_K_M.gguf from org/base-GGUF: repository not found"):
        rc.pull(recipes["trio"], progress=False)
    hub.add("org/base-GGUF", "base.Q4_K_M.gguf", b"x" * 10)
    (tmp_path / "t").write_bytes(b"t")
    (tmp_path / "r").write_bytes(b"r")
    with pytest.raises(EFTError, match=r"from org/base-GGUF \(revision v9\): revision 'v9' not found"):
        rc.pull(recipes["rev"], progress=False)


def test_gated_repo_says_what_to_do(trio, hub):
    recipe, _ = trio
    hub.gated.add("org/base-GGUF")
    with pytest.raises(EFTError, match=r"^cannot download base.Q4_K_M.gguf from org/base-GGUF: the repository is gated: "
                                       r"accept its licence on the hub and log in"):
        rc.pull(recipe, progress=False)


def test_content_that_does_not_match_the_hub_is_rejected_and_removed(trio, hub, hf_home):
    recipe, data = trio
    ref = recipe.models["tuned"]
    hosted = hub.files[(ref.repo, ref.file)]
    hosted.served = os.urandom(len(data["tuned"]))  # right size, wrong bytes: only sha256 can tell
    with pytest.raises(EFTError, match=r"tuned.Q8_0.gguf from org/tuned-GGUF does not match what .* reports "
                                       r"\(content hash .*\); removed it, run the pull again"):
        rc.pull(recipe, progress=False)
    assert snapshot_files(hf_home, ref.repo) == []
    assert blob_files(hf_home, ref.repo) == []
    with pytest.raises(EFTError, match="not downloaded"):
        rc.resolve(recipe)
    hosted.served = None
    assert rc.pull(recipe, progress=False)["tuned"].read_bytes() == data["tuned"]


def test_content_of_the_wrong_size_is_rejected(trio, hub, hf_home):
    recipe, data = trio
    ref = recipe.models["tuned"]
    hub.files[(ref.repo, ref.file)].served = data["tuned"][:-100]  # the hub's HEAD still says the full size
    with pytest.raises(EFTError, match=r"^cannot download tuned.Q8_0.gguf from org/tuned-GGUF: .*size") as info:
        rc.pull(recipe, progress=False)
    assert "\n" not in str(info.value)
    assert snapshot_files(hf_home, ref.repo) == []


def test_a_cached_file_damaged_on_disk_is_downloaded_again(trio, hub):
    recipe, data = trio
    path = rc.pull(recipe, progress=False)["reference"]
    with open(os.path.realpath(path), "r+b") as f:
        f.truncate(1000)
    gets = len(hub.gets())
    assert rc.pull(recipe, progress=False)["reference"].read_bytes() == data["reference"]
    assert len(hub.gets()) == gets + 1


def test_network_down(trio, hub, monkeypatch):
    recipe, _ = trio
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(EFTError, match=r"^cannot download base.Q4_K_M.gguf from org/base-GGUF: cannot reach http://127.0.0.1:\d+"):
        rc.pull(recipe, progress=False)


def test_a_pulled_recipe_is_used_when_the_hub_is_unreachable(trio, hub, monkeypatch):
    recipe, _ = trio
    pulled = rc.pull(recipe, progress=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert rc.pull(recipe, progress=False) == pulled


def test_offline_mode_refuses_to_download(trio, hub, monkeypatch):
    recipe, _ = trio
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EFTError, match=r"^cannot download base.Q4_K_M.gguf from org/base-GGUF: offline mode is on"):
        rc.pull(recipe, progress=False)
    assert hub.file_requests() == []


def test_local_models_are_checked_not_downloaded(hub, tmp_path):
    folder = tmp_path / "models"
    path = write_recipes(folder, '[loc]\n[loc.base]\npath = "b.gguf"\n[loc.tuned]\npath = "t.gguf"\n'
                                 '[loc.reference]\npath = "r.gguf"\n')
    with pytest.raises(EFTError, match=r"recipe 'loc': base model .*b.gguf is missing"):
        rc.pull(rc.load_recipes(path)["loc"])
    for name in ("b", "t", "r"):
        (folder / f"{name}.gguf").write_bytes(b"GGUF")
    assert rc.pull(rc.load_recipes(path)["loc"]) == {
        "base": folder / "b.gguf", "tuned": folder / "t.gguf", "reference": folder / "r.gguf",
    }
    assert hub.file_requests() == []


def test_hub_settings_are_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    assert rc.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert rc.hub_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert rc.hub_endpoint() == "http://mirror.example"
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert rc.hub_offline()


# ---------------------------------------------------------------------------------------------
# The commands, registered on a throwaway group as cli.py registers them on `main`


def cli() -> click.Group:
    group = click.Group()
    group.add_command(pull_cmd)
    group.add_command(models_cmd)
    return group


def test_pull_command_prints_the_paths(trio, hub, tmp_path, monkeypatch):
    recipe, data = trio
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(cli(), ["pull", "trio"])  # progress bars on (hf hides them off a terminal)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["base", "tuned", "reference"]
    for line in lines:
        role, path = line.split(maxsplit=1)
        assert Path(path).read_bytes() == data[role]


def test_pull_command_errors_are_one_line(trio, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(tmp_path / "models"))
    for args, message in ((["pull", "nope", "-q"], "error: unknown recipe 'nope'; known recipes: trio"),
                          (["pull", "trio"], "error: cannot download base.Q4_K_M.gguf from org/base-GGUF: "
                                             "file not found in the repository")):
        if args[1] == "trio":
            hub.files.clear()
        result = CliRunner().invoke(cli(), args)
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [message]
        assert result.stdout == ""


def test_models_command_lists_recipes_and_what_is_present(trio, hub, tmp_path, monkeypatch):
    recipe, _ = trio
    folder = tmp_path / "models"
    text = (folder / "recipes.toml").read_text()
    write_recipes(folder, text + '[local]\ndefault = true\n[local.base]\npath = "b.gguf"\n[local.tuned]\npath = "t.gguf"\n'
                                 '[local.reference]\npath = "r.gguf"\n')
    (folder / "b.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(folder))
    rc.pull(recipe, progress=False)
    result = CliRunner().invoke(cli(), ["models"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "trio: three files on the stand-in hub" in out
    assert "local (default, unverified)" in out
    assert re.search(r"base\s+org/base-GGUF base.Q4_K_M.gguf\s+present", out)
    assert re.search(r"base\s+b.gguf\s+present", out)
    assert re.search(r"tuned\s+t.gguf\s+missing", out)


def test_models_command_reports_a_broken_recipes_file(tmp_path, monkeypatch):
    write_recipes(tmp_path, "[oops\n")
    monkeypatch.setenv("EFT_LOCAL_MODELS_DIR", str(tmp_path))
    result = CliRunner().invoke(cli(), ["models"])
    assert result.exit_code == 1
    assert re.fullmatch(r"error: .*recipes.toml: invalid TOML: .*\n", result.stderr)


@pytest.mark.parametrize("order", [("cli.hub", "cli"), ("cli", "cli.hub")])
def test_cli_and_its_hub_commands_import_in_either_order(order):
    # The cli package registers the commands of its modules; neither order may cycle.
    code = "; ".join(f"import eft_local.{name}" for name in order) + "; import eft_local.cli.hub as m; m.pull, m.models"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(autouse=True)
def no_overlay(tmp_path, monkeypatch):
    """The user's own recipes file (tests/test_overlay.py) stays out of these tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
