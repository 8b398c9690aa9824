"""The README is a front page, and the commands and links in it and in docs/ work as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from eft_local.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """The anchor a Markdown heading gets (GitHub's rule)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def commands(page: Path) -> list[list[str]]:
    """Every ``eft-local ...`` command of the page's sh blocks, as argument lists."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0].endswith("eft-local"):
                    found.append(words[1:])
    return found


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    assert {"docs/cli.md", "docs/python.md", "docs/server.md", "docs/benchmarks.md"} <= set(
        re.findall(r"\]\((docs/[\w.-]+)\)", "\n".join(lines)))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_to_a_file_and_a_heading_there(page):
    for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link}"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"(?m)^#+ (.+)$", target.read_text())
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {link}"


ALL = [(page, args) for page in PAGES for args in commands(page)]


def test_the_pages_show_commands():
    assert len(ALL) > 40 and {args[0] for _, args in ALL} >= {"generate", "chat", "eval", "serve", "explain", "pull"}


@pytest.mark.parametrize("page, args", ALL, ids=[f"{p.name}:{' '.join(a)[:60]}" for p, a in ALL])
def test_every_command_takes_its_options_as_written(page, args):
    # -h after the command's own words: click parses every option and argument before it, so an
    # option that does not exist (or was renamed) fails here.
    result = CliRunner().invoke(main, [*args, "-h"], prog_name="eft-local")
    assert result.exit_code == 0, f"{page.name}: eft-local {' '.join(args)}: {result.output}"


DEMO_RUNS = [args for _, args in ALL if args[0] in ("generate", "explain") and not any(
    w.endswith(".gguf") or w in ("--recipe", "--rpc", "--json") for w in args)]


@pytest.mark.parametrize("args", DEMO_RUNS, ids=[" ".join(a)[:60] for a in DEMO_RUNS])
def test_commands_on_the_demo_run_as_written(args):
    result = CliRunner().invoke(main, [*args, "-t", "1", "-n", "8"], input="Where was Patroul born?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
