"""Every `loretta-shards` command that README.md and docs/data.md show exists with those exact
flags (checked against the real argparse parser), and the README's data commands run end to end
on a temporary folder."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from loretta.data.tools import build_parser, main

pytestmark = pytest.mark.usefixtures("private_tmpdir")  # streaming's file locks

DOCS = ("README.md", "docs/data.md")
RUNNABLE = {"layout", "write", "inspect", "verify", "to-mds", "from-mds", "synth"}


def fenced_commands(text: str) -> list[list[str]]:
    """`loretta-shards ...` command lines inside fenced code blocks (`;`-separated ones split,
    comments dropped), as argument lists without the program name."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            at = line.find("loretta-shards ")
            if at < 0:
                continue
            words = shlex.split(line[at:], comments=True)
            command: list[str] = []
            for w in [*words, ";"]:
                if w in (";", "&&"):
                    if command:
                        assert command[0] == "loretta-shards", (line, command)
                        out.append(command[1:])
                    command = []
                else:
                    command.append(w)
    return out


def inline_commands(text: str) -> list[list[str]]:
    """`loretta-shards ...` in inline code spans outside fenced blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [shlex.split(c)[1:] for c in re.findall(r"`(loretta-shards [^`]+)`", prose)]


def parses(args: list[str]) -> tuple[bool, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as e:
        return e.code == 0 and "--help" in args, err.getvalue()
    return True, ""


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_shown_parses(doc: str) -> None:
    text = (REPO / doc).read_text()
    commands = fenced_commands(text) + inline_commands(text)
    assert len(commands) >= 4, doc
    bad = [(shlex.join(c), why) for c in commands for ok, why in [parses(c)] if not ok]
    assert not bad, f"{doc}: commands the parser refuses: {bad}"


def test_the_command_table_uses_real_flags() -> None:
    """docs/data.md's table: each command's flags are options of that command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = re.findall(r"^\| `([a-z-]+) ([^`]*)` \|", (REPO / "docs/data.md").read_text(), re.M)
    assert {r[0] for r in rows} >= RUNNABLE | {"index"}
    for name, usage in rows:
        known = set(sub.choices[name]._option_string_actions)
        flags = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage))
        assert flags <= known, (name, flags - known)


def samples_for(layout_file: Path, n: int = 5) -> str:
    """JSON lines that fit the layout (fixed lengths respected)."""
    layout = json.loads(layout_file.read_text())
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        s: dict[str, object] = {"key": f"{i:06d}", "meta": {"i": i}}
        for m in layout["modalities"]:
            length = m.get("fixed_length") or int(rng.integers(1, 20))
            s[m["name"]] = rng.integers(0, m["size"], length).tolist()
        lines.append(json.dumps(s))
    return "\n".join(lines) + "\n"


def test_readme_data_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Data", 1)[1].split("\n## ", 1)[0]
    commands = fenced_commands(section)
    ran = [c[0] for c in commands if c[0] in RUNNABLE]
    assert ran[:4] == ["layout", "write", "inspect", "verify"], ran
    monkeypatch.chdir(tmp_path)
    for args in commands:
        if args[0] not in RUNNABLE:
            continue  # `index` needs data written by another tool (tests/test_data_sources.py)
        if args[0] == "write" and not Path(args[1]).exists():
            Path(args[1]).write_text(samples_for(Path(args[args.index("--layout") + 1])))
        quiet = ["--quiet"] if args[0] in ("write", "synth", "to-mds", "from-mds") else []
        assert main([*args, *quiet]) == 0, args
    assert (tmp_path / "data/pairs/manifest.json").exists()
