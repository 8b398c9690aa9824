"""eval never loses finished work: early output checks, saving as configurations finish, Ctrl-C
and failures part way, and data lines that cannot be scored."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from eft_local import EFTError
from eft_local.evaluation import evaluate as ev
from eft_local.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
DATA = DEMO / "heldout.jsonl"
MODELS = ["-m", str(DEMO / "base.gguf"), "--tuned", str(DEMO / "tuned.gguf"), "--reference", str(DEMO / "reference.gguf"),
          "--threads", "1", "-n", "8"]
CONFIGS = ["--config", "base", "--config", "tuned", "--config", "eft"]


def eval_args(*extra: str, limit: int = 3, data: Path = DATA) -> list[str]:
    return ["eval", str(data), *MODELS, "--limit", str(limit), *extra]


def stop_at(monkeypatch, config_index: int, item_index: int, error: BaseException, before: bool = False) -> list:
    """Make eval raise ``error`` at one item of one configuration, as Ctrl-C or a failure would.

    The item counts as scored unless ``before``. Returns the labels of the configurations
    started, each with the output file's labels at that moment (None: no file yet).
    """
    real = ev.evaluate
    started = []

    def evaluate(config, items, *, on_item, **kwargs):
        started.append(config.label)
        seen = []

        def hook(result):
            seen.append(result)
            if len(started) == config_index and len(seen) == item_index:
                if before:
                    raise error
                on_item(result)
                raise error
            on_item(result)

        return real(config, items, on_item=hook, **kwargs)

    monkeypatch.setattr(ev, "evaluate", evaluate)
    return started


def labels(path: Path) -> list[str]:
    return [r["label"] for r in json.loads(path.read_text())]


def test_ctrl_c_keeps_finished_configurations_and_the_partial_one(monkeypatch, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    snapshots = []
    real = ev.Run.start
    # What the file holds whenever a configuration starts: every one finished before it.
    monkeypatch.setattr(ev.Run, "start", lambda self, label: (
        snapshots.append(labels(out) if out.exists() else None), real(self, label)))
    started = stop_at(monkeypatch, 2, 2, KeyboardInterrupt())
    result = CliRunner().invoke(main, eval_args(*CONFIGS, "-o", str(out), "--plot", str(png)))
    assert result.exit_code == 130, result.output
    assert started == ["base", "tuned"]  # eft never began
    assert snapshots == [None, ["base"]]
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: 1 finished configuration and 2/3 items of tuned, saved to {out}, {png}")
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved] == ["base", "tuned (partial: 2/3)"]
    assert [(r["n"], r["n_total"], r["partial"]) for r in saved] == [(3, 3, False), (2, 3, True)]
    prompts = [item["prompt"] for item in ev.load_items(DATA)[:3]]
    assert [i["prompt"] for i in saved[0]["items"]] == prompts
    assert [i["prompt"] for i in saved[1]["items"]] == prompts[:2]
    rows = result.stdout.strip().splitlines()
    assert rows[0].startswith("| configuration |")
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["base", "tuned (partial: 2/3)"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary files left


def test_ctrl_c_between_configurations_keeps_them_all_in_csv(monkeypatch, tmp_path):
    out = tmp_path / "r.csv"
    # Ctrl-C while the third configuration scores its first item: the first two are complete.
    stop_at(monkeypatch, 3, 1, KeyboardInterrupt(), before=True)
    result = CliRunner().invoke(main, eval_args(*CONFIGS, "-o", str(out), limit=2))
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == f"interrupted: 2 finished configurations, saved to {out}"
    rows = list(csv.DictReader(out.open()))
    assert [(r["label"], r["n"], r["n_total"], r["partial"]) for r in rows] == [
        ("base", "2", "2", "False"), ("tuned", "2", "2", "False")]


def test_ctrl_c_before_anything_finished_writes_nothing(monkeypatch, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    out.write_text("earlier results\n")
    stop_at(monkeypatch, 1, 1, KeyboardInterrupt(), before=True)
    result = CliRunner().invoke(main, eval_args(*CONFIGS, "-o", str(out), "--plot", str(png)))
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == "interrupted: nothing finished"
    assert result.stdout == ""
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_failure_in_the_middle_of_a_configuration_keeps_its_items(monkeypatch, tmp_path):
    out = tmp_path / "r.json"
    stop_at(monkeypatch, 2, 1, EFTError("context full: stand-in failure"))
    result = CliRunner().invoke(main, eval_args(*CONFIGS, "-o", str(out), limit=2))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == "error: context full: stand-in failure"
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1
    assert labels(out) == ["base", "tuned (partial: 1/2)"]


def test_a_later_configuration_that_cannot_load_keeps_the_finished_ones(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = eval_args("--config", "base", "--config", "tuned", "--config", f"broken={broken}",
                     "-o", str(out), "--plot", str(png), limit=2)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0]
    assert str(broken) in errors[0]
    saved = json.loads(out.read_text())
    assert [(r["label"], r["n"], r["partial"]) for r in saved] == [("base", 2, False), ("tuned", 2, False)]
    assert [row.split("|")[1].strip() for row in result.stdout.strip().splitlines()[2:]] == ["base", "tuned"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_first_configuration_leaves_an_existing_file_alone(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all")
    out = tmp_path / "r.json"
    out.write_text("earlier results\n")
    result = CliRunner().invoke(main, eval_args("--config", f"broken={broken}", "-o", str(out)))
    assert result.exit_code == 1, result.output
    assert result.stderr.count("error:") == 1 and result.stdout == ""
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "r.json"]


@pytest.fixture
def no_models(monkeypatch):
    """Records every model set eval tries to load (and loads none)."""
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ev, "EFT", refuse)
    return loads


def test_unwritable_outputs_fail_before_any_model_loads(no_models, tmp_path):
    (tmp_path / "d.json").mkdir()
    (tmp_path / "d.png").mkdir()
    (tmp_path / "file").write_text("a file, not a directory\n")
    cases = [
        (["-o", str(tmp_path / "d.json")], f"cannot write {tmp_path / 'd.json'}: it is a directory"),
        (["--plot", str(tmp_path / "d.png")], f"cannot write {tmp_path / 'd.png'}: it is a directory"),
        (["-o", str(tmp_path / "file" / "r.json")],
         f"cannot write {tmp_path / 'file' / 'r.json'}: {tmp_path / 'file'} is not a directory"),
        (["--plot", str(tmp_path / "no" / "r.png")],
         f"cannot write {tmp_path / 'no' / 'r.png'}: no such directory {tmp_path / 'no'}"),
    ]
    for extra, message in cases:
        start = time.monotonic()
        result = CliRunner().invoke(main, eval_args(*extra))
        assert result.exit_code == 1, (extra, result.output)
        assert result.stderr == f"error: {message}\n"
        assert time.monotonic() - start < 5
    assert no_models == []
    assert (tmp_path / "file").read_text() == "a file, not a directory\n"


@contextlib.contextmanager
def without_root():
    """Run the block as an ordinary user: root writes whatever the permissions say."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_permissions_fail_early_and_keep_the_existing_file(no_models):
    # Under /tmp itself: pytest's own temporary folders are closed to other users.
    tmp_path = Path(tempfile.mkdtemp(prefix="eft-perm-"))
    tmp_path.chmod(0o755)
    locked = tmp_path / "locked"
    locked.mkdir()
    old = locked / "r.json"
    old.write_text("earlier results\n")
    readonly = tmp_path / "readonly.csv"
    readonly.write_text("earlier,results\n")
    readonly.chmod(0o444)
    locked.chmod(0o555)
    try:
        for path in (old, readonly):
            with without_root():
                result = CliRunner().invoke(main, eval_args("-o", str(path)))
            assert result.exit_code == 1, result.output
            assert result.stderr == f"error: cannot write {path}: Permission denied\n"
    finally:
        locked.chmod(0o755)
    assert no_models == []
    assert old.read_text() == "earlier results\n" and readonly.read_text() == "earlier,results\n"
    assert sorted(p.name for p in locked.iterdir()) == ["r.json"]
    shutil.rmtree(tmp_path)


def test_a_data_file_out_of_reach_is_one_line(no_models):
    tmp_path = Path(tempfile.mkdtemp(prefix="eft-perm-"))
    tmp_path.chmod(0o755)
    closed = tmp_path / "closed"
    closed.mkdir()
    shutil.copy(DATA, closed / "data.jsonl")
    closed.chmod(0o700)
    try:
        with without_root():
            result = CliRunner().invoke(main, eval_args(data=closed / "data.jsonl"))
        assert result.exit_code == 1, result.output
        assert result.stderr == f"error: cannot read {closed / 'data.jsonl'}: Permission denied\n"
    finally:
        shutil.rmtree(tmp_path)
    assert no_models == []


def test_the_early_check_leaves_an_existing_file_as_it_was(no_models, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("earlier results\n")
    out.chmod(0o640)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Q?", "answer": "A"}\n{"prompt": "Q?", "answer": ""}\n')
    result = CliRunner().invoke(main, ["eval", str(data), *MODELS, "-o", str(out)])
    assert result.stderr == f'error: {data}:2: empty "answer"\n'
    assert out.read_text() == "earlier results\n"
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "r.json"]
    assert no_models == []


def test_results_never_overwrite_the_data(no_models, tmp_path):
    data = tmp_path / "items.json"
    text = '{"prompt": "Q?", "answer": "A"}\n'
    data.write_text(text)
    result = CliRunner().invoke(main, ["eval", str(data), *MODELS, "-o", str(data)])
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot write {data}: it is the data file\n"
    assert data.read_text() == text


def test_plot_without_matplotlib_fails_before_the_run(no_models, monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "find_spec", lambda name: None)
    result = CliRunner().invoke(main, eval_args("--plot", str(tmp_path / "r.png")))
    assert result.exit_code == 1
    assert result.stderr == "error: --plot needs matplotlib: pip install 'eft-local[plot]'\n"
    assert no_models == []


def test_empty_prompts_and_answers_are_refused_with_their_line(tmp_path):
    cases = {
        # Blank lines still count, so the number is the line an editor shows.
        '{"prompt": "Q?", "answer": "A"}\n\n{"prompt": "Q?", "answer": ""}\n': ':3: empty "answer"',
        '{"prompt": "Q?", "answer": " \\t "}\n': ':1: empty "answer"',
        '{"prompt": "Q?", "answer": "A"}\n{"prompt": "", "answer": "A"}\n': ':2: empty "prompt"',
        '{"prompt": " \\n ", "answer": ""}\n': ':1: empty "prompt"',
    }
    for i, (text, message) in enumerate(cases.items()):
        data = tmp_path / f"data{i}.jsonl"
        data.write_text(text)
        with pytest.raises(EFTError) as e:
            ev.load_items(data)
        assert str(e.value) == f"{data}{message}"
        result = CliRunner().invoke(main, ["eval", str(data), *MODELS])
        assert result.exit_code == 1
        assert result.stderr == f"error: {data}{message}\n"


def item(prompt: str, correct: bool) -> ev.ItemResult:
    return ev.ItemResult(prompt, "a", "a reply" if correct else "no", True, correct, 4, 0.5)


def test_run_saves_each_finished_configuration_and_the_partial_one(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("earlier results\n")
    run = ev.Run(3, out)
    run.start("one")
    assert run.finished() == [] and run.describe() == "nothing finished"
    assert run.keep() == ([], []) and out.read_text() == "earlier results\n"
    first = ev.ConfigResult.from_items("one", [item("q1", True), item("q2", False), item("q3", True)], 3)
    run.finish(first)
    assert labels(out) == ["one"]
    run.start("two")
    run.add(item("q1", False))
    assert run.describe() == "1 finished configuration and 1/3 items of two"
    partial = run.finished()[1]
    assert (partial.label, partial.n, partial.n_total, partial.partial, partial.accuracy) == (
        "two (partial: 1/3)", 1, 3, True, 0.0)
    assert labels(out) == ["one"]  # a running configuration is only saved when the run stops
    assert run.keep() == ([str(out)], [])
    assert labels(out) == ["one", "two (partial: 1/3)"]
    # The directory is gone: the problem is reported, not raised over the error being handled.
    run = ev.Run(3, tmp_path / "gone" / "r.json")
    run.start("one")
    run.add(item("q1", True))
    written, problems = run.keep()
    assert written == [] and len(problems) == 1 and problems[0].startswith(f"cannot write {tmp_path / 'gone'}")


def test_results_replace_the_file_in_one_step(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("earlier results\n")
    out.chmod(0o640)
    # A file of the user's with the name a fixed temporary name would take is not touched.
    (tmp_path / "r.json.tmp").write_text("mine\n")
    result = ev.ConfigResult.from_items("one", [item("q1", True)])
    ev.write_results([result], out)
    assert labels(out) == ["one"] and json.loads(out.read_text())[0]["partial"] is False
    assert out.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "r.json.tmp").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.json.tmp"]


def test_sigint_to_a_real_eval_keeps_the_finished_configurations(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the process once two configurations finished."""
    out = tmp_path / "out.json"
    exe = Path(sys.executable).with_name("eft-local")
    limit = 120  # the third configuration runs for a second or more: Ctrl-C lands inside it
    env = {**os.environ, "EFT_LOCAL_THREADS": "1"}
    proc = subprocess.Popen([str(exe), *eval_args(*CONFIGS, "-o", str(out), limit=limit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Without a terminal the progress shows each configuration's label as it starts, and
        # the file is rewritten before the next one starts.
        lines = []
        while (line := proc.stderr.readline()) and line.strip() != "eft":
            lines.append(line)
        assert line.strip() == "eft", "".join(lines)
        time.sleep(0.3)  # past its model loading, into its replies
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    note = stderr.splitlines()[-1]
    assert note.startswith("interrupted: 2 finished configurations") and note.endswith(f"saved to {out}")
    saved = json.loads(out.read_text())
    assert [(r["label"], r["n"], r["partial"]) for r in saved[:2]] == [("base", limit, False), ("tuned", limit, False)]
    # The third configuration had not finished: it is there only as a partial result.
    assert len(saved) <= 3
    for r in saved[2:]:
        assert r["label"] == f"eft (partial: {r['n']}/{limit})" and r["partial"] and 0 < r["n"] < limit
    assert "Traceback" not in stderr
    assert [row.split("|")[1].strip() for row in stdout.strip().splitlines()[2:]] == [r["label"] for r in saved]
