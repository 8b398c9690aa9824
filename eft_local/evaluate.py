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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .engine import EFT, Completion
from .errors import EFTError

MAX_WORDS = 16


@dataclass(frozen=True)
class Config:
    """One way of producing replies: ``base + weight * (tuned - reference)``."""

    label: str
    base: str
    tuned: str
    reference: str
    weight: float = 1.0
    more: tuple[tuple[str, str, float], ...] = ()  # further (tuned, reference, weight) deltas


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
    """Scores of one configuration over a data set (rates in percent)."""

    label: str
    n: int
    format_following: float
    accuracy: float
    mean_tokens: float
    tokens_per_second: float
    acceptance_rate: float | None = None  # percent of drafted tokens accepted, when speculative
    match_rate: float | None = None  # percent of replies matching --match
    items: list[ItemResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-item replies."""
        return {k: v for k, v in asdict(self).items() if k != "items"}


def load_items(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a JSONL file of ``{"prompt": ..., "answer": ...}`` lines."""
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
        items.append({"prompt": item["prompt"], "answer": item["answer"]})
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

    name, at, w = body.partition("@")
    if name == "eft":
        w_value = _weight(w, spec) if at else weight
        return Config(label, models["base"], models["tuned"], models["reference"], w_value)
    parts = body.split(",")
    if len(parts) == 1:
        path = model(parts[0])
        return Config(label, path, path, path, 0.0)
    if len(parts) in (3, 4):
        w_value = _weight(parts[3], spec) if len(parts) == 4 else weight
        return Config(label, model(parts[0]), model(parts[1]), model(parts[2]), w_value)
    if len(parts) >= 7 and (len(parts) - 1) % 3 == 0:
        groups = [parts[i : i + 3] for i in range(1, len(parts), 3)]
        deltas = tuple((model(t), model(r), _weight(w, spec)) for t, r, w in groups)
        (t, r, w), more = deltas[0], deltas[1:]
        return Config(label, model(parts[0]), t, r, w, more)
    raise EFTError(f"bad --config {spec!r}: expected NAME, eft@W or LABEL=BASE,TUNED,REFERENCE[,W]")


def compile_match(pattern: str | None) -> re.Pattern | None:
    """The --match pattern, compiled (None when not given)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise EFTError(f"bad --match pattern {pattern!r}: {e}") from None


def _weight(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EFTError(f"bad --config {spec!r}: weight {text!r} is not a number") from None


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
    with EFT(config.base, config.tuned, config.reference, weight=config.weight, deltas=config.more,
             **(engine_options or {})) as eft:
        for item in items:
            reply = eft.chat([{"role": "user", "content": item["prompt"]}], temperature=0, max_tokens=max_tokens,
                             speculative=speculative)
            followed, correct = score(reply, item["answer"], max_words)
            result = ItemResult(
                item["prompt"], item["answer"], reply.text, followed, correct,
                reply.stats["generated_tokens"], reply.stats["generate_seconds"],
                reply.stats.get("drafted", 0), reply.stats.get("accepted", 0),
            )
            results.append(result)
            if on_item:
                on_item(result)
    n = len(results)
    tokens = sum(r.tokens for r in results)
    seconds = sum(r.seconds for r in results)
    drafted = sum(r.drafted for r in results)
    return ConfigResult(
        label=config.label,
        n=n,
        format_following=round(100 * sum(r.followed_format for r in results) / n, 1),
        accuracy=round(100 * sum(r.correct for r in results) / n, 1),
        mean_tokens=round(tokens / n, 1),
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        acceptance_rate=round(100 * sum(r.accepted for r in results) / drafted, 1) if drafted else None,
        match_rate=round(100 * sum(bool(pattern.search(r.reply)) for r in results) / n, 1) if pattern else None,
        items=results,
    )


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
    """Fail before a long run, not after it, when its results could not be written."""
    path = Path(path)
    if path.suffix not in suffixes:
        raise EFTError(f"{path.name}: the file name must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise EFTError(f"cannot write {path}: no such directory {path.parent}")


def write_results(results: Sequence[ConfigResult], path: str | os.PathLike) -> None:
    """JSON (summaries and every reply) or CSV (summaries), chosen by the file's extension."""
    path = Path(path)
    check_output(path, (".json", ".csv"))
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
    # A failed write must not leave a half-written results file where an old one stood.
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EFTError(f"cannot write {path}: {e.strerror or e}") from None
