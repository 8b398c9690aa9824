"""Evaluate model configurations on prompts with reference answers.

A configuration is a triple (base, tuned, reference) and a weight; one model alone is the same
file in all three roles (its delta is zero, and it is loaded once). Each reply is scored for
format following (a short answer that ends its turn) and factual accuracy (the reference
answer appears in it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..engine.eft import EFT, Chunk, Completion
from ..chat.prompt import check_messages
from ..core.deltas import Delta, as_delta
from ..core.errors import EFTError

MAX_WORDS = 16


@dataclass(frozen=True)
class Config:
    """One way of producing replies: ``base`` steered by ``deltas`` (a model alone: its own delta at weight 0)."""

    label: str
    base: str
    deltas: tuple[Delta, ...]


@dataclass
class ItemResult:
    prompt: str
    answer: str
    reply: str
    followed_format: bool
    correct: bool
    tokens: int
    seconds: float
    drafted: int = 0  # speculative decoding only
    accepted: int = 0


@dataclass
class ConfigResult:
    """Scores of one configuration over a data set (rates in percent).

    A partial result (a run stopped while this configuration ran) covers the first ``n`` of
    ``n_total`` items, and its label ends in ``(partial: n/n_total)``.
    """

    label: str
    n: int
    format_following: float
    accuracy: float
    mean_tokens: float
    tokens_per_second: float
    acceptance_rate: float | None = None  # percent of drafted tokens accepted, when speculative
    match_rate: float | None = None  # percent of replies matching --match
    n_total: int | None = None  # items the configuration was to reply to
    partial: bool = False
    items: list[ItemResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-item replies."""
        return {k: v for k, v in asdict(self).items() if k != "items"}

    @classmethod
    def from_items(cls, label: str, items: Sequence[ItemResult], n_total: int | None = None,
                   pattern: re.Pattern | None = None, wall_seconds: float | None = None) -> "ConfigResult":
        """Scores of scored replies; fewer than ``n_total`` of them make a partial result.

        tokens/s is generated tokens over ``wall_seconds`` (the configuration's whole run,
        prompts included, so that replies decoded together count once), else over the replies'
        own generation times.
        """
        n = len(items)
        if n == 0:
            raise EFTError(f"{label}: no replies to score")
        n_total = n if n_total is None else n_total
        partial = n < n_total
        tokens = sum(r.tokens for r in items)
        seconds = wall_seconds if wall_seconds is not None else sum(r.seconds for r in items)
        drafted = sum(r.drafted for r in items)
        return cls(
            label=f"{label} (partial: {n}/{n_total})" if partial else label,
            n=n,
            format_following=round(100 * sum(r.followed_format for r in items) / n, 1),
            accuracy=round(100 * sum(r.correct for r in items) / n, 1),
            mean_tokens=round(tokens / n, 1),
            tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
            acceptance_rate=round(100 * sum(r.accepted for r in items) / drafted, 1) if drafted else None,
            match_rate=round(100 * sum(bool(pattern.search(r.reply)) for r in items) / n, 1) if pattern else None,
            n_total=n_total,
            partial=partial,
            items=list(items),
        )


def load_items(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file of ``{"prompt": ..., "answer": ...}`` lines; a line's optional
    ``"history"`` (a list of {role, content} messages) is the chat the prompt continues."""
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EFTError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EFTError(f"{path} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise EFTError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(item.get("answer"), str):
            raise EFTError(f"{path}:{n}: each line needs string fields \"prompt\" and \"answer\"")
        # An empty answer is "in" every reply and would count as correct.
        for name in ("prompt", "answer"):
            if not item[name].strip():
                raise EFTError(f"{path}:{n}: empty \"{name}\"")
        items.append({"prompt": item["prompt"], "answer": item["answer"]})
        if item.get("history"):
            if not isinstance(item["history"], list):
                raise EFTError(f"{path}:{n}: \"history\" must be a list of messages")
            try:
                check_messages(item["history"])
            except EFTError as e:
                raise EFTError(f"{path}:{n}: \"history\": {e}") from None
            items[-1]["history"] = item["history"]
    if not items:
        raise EFTError(f"{path} has no items")
    return items


def score(reply: Completion, answer: str, max_words: int = MAX_WORDS) -> tuple[bool, bool]:
    """(format followed, answer correct) for one reply.

    Format: the model ended its turn itself and the reply is a non-empty short answer.
    Correct: the reference answer appears in the reply, ignoring case.
    """
    words = reply.text.split()
    followed = reply.finish_reason == "stop" and 0 < len(words) <= max_words
    return followed, answer.casefold() in reply.text.casefold()


def parse_config(spec: str, models: Mapping[str, str], weight: float = 1.0) -> Config:
    """Parse ``NAME``, ``eft``, ``eft@W``, ``LABEL=NAME`` or ``LABEL=BASE,TUNED,REFERENCE[,W]``.

    NAME is a model of the current set (base, tuned, reference, and extras such as oracle) or
    a GGUF path; ``eft`` is the current triple at ``weight``. Several deltas:
    ``LABEL=BASE,TUNED,REFERENCE,W,TUNED2,REFERENCE2,W2,...``.
    """
    label, _, body = spec.partition("=")
    if not body:
        label, body = spec, spec
    label, body = label.strip(), body.strip()
    if not label or not body:
        raise EFTError(f"bad --config {spec!r}: expected NAME, eft@W or LABEL=BASE,TUNED,REFERENCE[,W]")

    def model(name: str) -> str:
        name = name.strip()
        if name in models:
            return models[name]
        if os.path.exists(name):
            return name
        known = ", ".join(sorted(models))
        raise EFTError(f"bad --config {spec!r}: {name!r} is neither a model of this set ({known}) nor a file")

    def delta(tuned: str, reference: str, *weight_given: Any) -> Delta:
        pair = (model(tuned), model(reference))
        try:
            return as_delta(pair + (weight_given or (weight,)))
        except EFTError as e:
            raise EFTError(f"bad --config {spec!r}: {e}") from None

    name, at, w = body.partition("@")
    if name == "eft":
        return Config(label, models["base"], (delta("tuned", "reference", *([w] if at else [])),))
    parts = body.split(",")
    if len(parts) == 1:
        return Config(label, model(parts[0]), (delta(parts[0], parts[0], 0.0),))
    if len(parts) in (3, 4):
        return Config(label, model(parts[0]), (delta(*parts[1:]),))
    if len(parts) >= 7 and (len(parts) - 1) % 3 == 0:
        return Config(label, model(parts[0]), tuple(delta(*parts[i : i + 3]) for i in range(1, len(parts), 3)))
    raise EFTError(f"bad --config {spec!r}: expected NAME, eft@W or LABEL=BASE,TUNED,REFERENCE[,W]")


def compile_match(pattern: str | None) -> re.Pattern | None:
    """The --match pattern, compiled (None when not given)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise EFTError(f"bad --match pattern {pattern!r}: {e}") from None


def evaluate(
    config: Config,
    items: Sequence[Mapping[str, str]],
    *,
    max_tokens: int = 32,
    max_words: int = MAX_WORDS,
    engine_options: Mapping[str, Any] | None = None,
    speculative: int | str | None = None,
    match: str | None = None,
    on_item: Callable[[ItemResult], None] | None = None,
) -> ConfigResult:
    """Greedy replies of one configuration to every item, scored.

    ``match``: a regular expression; the result then reports the share of replies it matches
    (a style, say, when mixing deltas).
    """
    pattern = compile_match(match)
    results = []
    with EFT(config.base, deltas=config.deltas, **(engine_options or {})) as eft:

        def ask(item: Mapping[str, Any]) -> Iterator[Chunk]:
            return eft.stream_chat([*item.get("history", []), {"role": "user", "content": item["prompt"]}],
                                   temperature=0, max_tokens=max_tokens, speculative=speculative)

        start = time.perf_counter()
        # With parallel N every question is queued at once and N are decoded together; the
        # replies are read, and scored, in the data's order either way.
        streams = [ask(item) for item in items] if eft.parallel > 1 and not speculative else None
        try:
            for i, item in enumerate(items):
                reply = Completion.from_chunks(streams[i] if streams else ask(item))
                followed, correct = score(reply, item["answer"], max_words)
                result = ItemResult(
                    item["prompt"], item["answer"], reply.text, followed, correct,
                    reply.stats["completion_tokens"], reply.stats["generate_seconds"],
                    reply.stats.get("drafted", 0), reply.stats.get("accepted", 0),
                )
                results.append(result)
                if on_item:
                    on_item(result)
        finally:
            for stream in streams or ():
                stream.close()  # replies not read yet give up their place at once
        wall = time.perf_counter() - start
    return ConfigResult.from_items(config.label, results, len(items), pattern, wall_seconds=wall)


class Run:
    """The results of a run of several configurations so far, saved as each one finishes.

    Call ``start`` before a configuration, ``add`` for each reply it scores (evaluate's
    ``on_item``) and ``finish`` with its result, which rewrites ``output`` with every finished
    configuration. After a failure or Ctrl-C, ``finished`` and ``keep`` still have the replies of
    the configuration that was running, as a partial result.
    """

    def __init__(self, n_items: int, output: str | os.PathLike | None = None, match: str | None = None):
        self.n_items = n_items
        self.output = output
        self.pattern = compile_match(match)
        self.results: list[ConfigResult] = []
        self._label: str | None = None
        self._items: list[ItemResult] = []
        self._output_failed = False

    def start(self, label: str) -> None:
        """A configuration begins."""
        self._label, self._items = label, []

    def add(self, item: ItemResult) -> None:
        """One reply of the running configuration is scored."""
        self._items.append(item)

    def finish(self, result: ConfigResult) -> None:
        """The running configuration is done: keep its result and rewrite the output file."""
        self.results.append(result)
        self._label, self._items = None, []
        if self.output:
            self._save(self.results)

    def finished(self) -> list[ConfigResult]:
        """Finished configurations, then the replies of the running one as a partial result."""
        if self._label is None or not self._items:
            return list(self.results)
        return [*self.results, ConfigResult.from_items(self._label, self._items, self.n_items, self.pattern)]

    def describe(self) -> str:
        """What finished, in words: "1 finished configuration and 2/5 items of eft"."""
        n = len(self.results)
        parts = [f"{n} finished configuration{'s' if n != 1 else ''}"] if n else []
        if self._label is not None and self._items:
            parts.append(f"{len(self._items)}/{self.n_items} items of {self._label}")
        return " and ".join(parts) or "nothing finished"

    def keep(self, plot_path: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
        """Write what finished to the output file and the plot, after a failure or Ctrl-C.

        Nothing is written when nothing finished. Returns the paths written and the problems
        that stopped a write (one line each), so that the first error still gets reported.
        """
        done = self.finished()
        written: list[str] = []
        problems: list[str] = []
        if not done:
            return written, problems
        # A write that already failed is the error being reported; trying again adds nothing.
        if self.output and not self._output_failed:
            try:
                self._save(done)
                written.append(str(self.output))
            except EFTError as e:
                problems.append(str(e))
        if plot_path:
            try:
                plot(done, plot_path)
                written.append(str(plot_path))
            except Exception as e:  # noqa: BLE001 - reported next to the error that stopped the run
                problems.append(str(e) if isinstance(e, EFTError) else f"cannot plot: {type(e).__name__}: {e}")
        return written, problems

    def _save(self, results: Sequence[ConfigResult]) -> None:
        try:
            write_results(results, self.output)
        except EFTError:
            # Only a failed write counts: one cut short by Ctrl-C left the old file in place,
            # and keep() writes it again.
            self._output_failed = True
            raise
        self._output_failed = False


def table(results: Sequence[ConfigResult]) -> str:
    """A markdown table of the summaries."""
    rows = ["| configuration | format following % | factual accuracy % | mean tokens | tokens/s |", "|---|---|---|---|---|"]
    extra = [(name, key) for name, key in (("draft acceptance %", "acceptance_rate"), ("matches %", "match_rate"))
             if any(getattr(r, key) is not None for r in results)]
    rows = [rows[0] + "".join(f" {name} |" for name, _ in extra), rows[1] + "---|" * len(extra)]
    for r in results:
        row = f"| {r.label} | {r.format_following:.1f} | {r.accuracy:.1f} | {r.mean_tokens:.1f} | {r.tokens_per_second:.1f} |"
        for _, key in extra:
            value = getattr(r, key)
            row += f" {'-' if value is None else f'{value:.1f}'} |"
        rows.append(row)
    return "\n".join(rows)


def check_output(path: str | os.PathLike, suffixes: Sequence[str]) -> None:
    """Fail before a long run, not after it, when its results could not be written.

    Opens an existing file for writing without truncating it and creates (then removes) a
    temporary file next to it, the way results are written; the file itself is left as it is.
    """
    path = Path(path)
    _check_suffix(path, suffixes)
    if path.is_dir():
        raise EFTError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise EFTError(f"cannot write {path}: {path.parent} is not a directory")
        raise EFTError(f"cannot write {path}: no such directory {path.parent}")
    try:
        if path.exists():
            if not path.is_file():
                raise EFTError(f"cannot write {path}: not a regular file")
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise EFTError(f"cannot write {path}: {e.strerror or e}") from None


def check_plot(path: str | os.PathLike) -> None:
    """check_output for --plot, and that matplotlib is there to draw it."""
    check_output(path, (".png",))
    if find_spec("matplotlib") is None:
        raise EFTError("--plot needs matplotlib: pip install 'eft-local[plot]'")


def _check_suffix(path: Path, suffixes: Sequence[str]) -> None:
    if path.suffix not in suffixes:
        raise EFTError(f"{path.name}: the file name must end in {' or '.join(suffixes)}")


def write_results(results: Sequence[ConfigResult], path: str | os.PathLike) -> None:
    """JSON (summaries and every reply) or CSV (summaries), chosen by the file's extension.

    The file is replaced in one step: it holds either the old contents or all of the new.
    """
    path = Path(path)
    _check_suffix(path, (".json", ".csv"))
    if path.suffix == ".json":
        text = json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False)
    elif path.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(results[0].summary()))
        writer.writeheader()
        for r in results:
            writer.writerow(r.summary())
        text = buf.getvalue()
    _write_atomic(path, text.encode("utf-8"))


def plot(results: Sequence[ConfigResult], path: str | os.PathLike) -> None:
    """A PNG bar chart of format following and accuracy per configuration (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EFTError("--plot needs matplotlib: pip install 'eft-local[plot]'") from None
    labels = [r.label for r in results]
    bars = [("format following %", [r.format_following for r in results]),
            ("factual accuracy %", [r.accuracy for r in results])]
    if any(r.match_rate is not None for r in results):
        bars.append(("matches --match %", [r.match_rate or 0.0 for r in results]))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(results)), 3.6))
    for j, (name, values) in enumerate(bars):
        offset = (j - (len(bars) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(results))], values, width, label=name)
    ax.set_xticks(list(range(len(results))), labels, rotation=15)
    # Headroom above 100 keeps the legend off the bars.
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncol=len(bars), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _write_atomic(Path(path), buf.getvalue())


def _write_atomic(path: Path, data: bytes) -> None:
    # A failed or interrupted write must not leave a half-written results file where an old one
    # stood. The temporary name is unique, so no file of the user's is overwritten by it.
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates files readable by their owner only; results get the usual mode.
        os.chmod(tmp, _mode(path))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise EFTError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _mode(path: Path) -> int:
    """The permission bits of the file at ``path``, or of a new file (umask applied)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
