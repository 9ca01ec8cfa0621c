"""Every shell command that README.md and docs/*.md show is checked against the project: the
command lines of fenced shell blocks (and inline code spans that are whole commands) are parsed
by the real argparse parsers of the CLIs they call, their `--config` names a shipped recipe or a
YAML path, their `--section.field=value` overrides name real config fields, and the scripts they
run exist. Nothing is trained: parsing only. A command this file does not know fails, so a new
CLI in the docs comes with its check (or an entry in ALLOWED with the reason).

`loretta-shards` commands are tests/test_data_docs.py's: skipped here."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from helpers import REPO

from loretta.config import load_config
from loretta.configlib import recipe_names
from loretta.errors import ConfigError

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {";", "&&", "||", "|"}
# Commands of other tools, shown in the docs but not ours to check: program -> reason.
ALLOWED = {
    "pip": "installs packages (pip's own CLI)",
    "rm": "coreutils: removes a file in a walk-through",
    "export": "shell built-in: sets an environment variable",
    "git": "git's own CLI",
    "mkdir": "coreutils",
    "cd": "shell built-in",
}
# `python -m X` modules that are not ours: module -> reason.
ALLOWED_MODULES = {
    "venv": "the standard library's venv",
    "pytest": "runs the test suite (pytest's own CLI)",
}
# Launchers shown with only their own flags (a mention of how to start one, no module to run).
LAUNCHERS = {"torchrun": "-m", "deepspeed": "--module", "sbatch": None}
# DeepSpeed writes zero_to_fp32.py into every checkpoint folder: its CLI is DeepSpeed's.
FOREIGN_SCRIPT = re.compile(r"(^|/)zero_to_fp32\.py$")
OVERRIDE = re.compile(r"^--[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+=")


@dataclass
class Command:
    where: str  # file:line
    words: list[str]
    env: dict[str, str]
    elided: bool = False  # `...` stood for more arguments: only the shown ones are checked

    def __str__(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.where}: {env + ' ' if env else ''}{shlex.join(self.words)}"


def split_commands(text: str, where: str) -> list[Command]:
    """One shell line (continuations joined) -> its commands (`;`, `&&`, `||`, `|` split),
    comments dropped, leading VAR=value words taken as the environment."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out = []
    current: list[str] = []
    for w in [*lexer, ";"]:
        if w in SEPARATORS:
            env: dict[str, str] = {}
            while current and re.match(r"^[A-Z_][A-Z0-9_]*=", current[0]):
                key, _, value = current.pop(0).partition("=")
                env[key] = value
            if current:
                out.append(Command(where, current, env))
            current = []
        else:
            current.append(w)
    return out


def fenced(name: str) -> list[Command]:
    """Commands of fenced blocks: every line of a shell block (one of a program this file does
    not know fails in check()); unlabelled blocks hold trees and diagrams too, so only their lines
    that start with a known program count. Blocks that open with a shebang are scripts shown
    whole, not commands to type: skipped (docs/slurm.md's launcher script is run as written
    by tests/test_slurm.py)."""
    out = []
    lines = (REPO / name).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\S*)", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        end = start
        while end < len(lines) and not lines[end].lstrip().startswith("```"):
            end += 1
        i = end + 1
        if lang not in SHELL or (start < end and lines[start].startswith("#!")):
            continue
        j = start
        while j < end:
            first, text = j, lines[j]
            while text.endswith("\\") and j + 1 < end:
                j += 1
                text = text[:-1] + " " + lines[j]
            j += 1
            try:
                commands = split_commands(text, f"{name}:{first + 1}")
            except (
                ValueError
            ) as e:  # unbalanced quotes: prose in a plain block, a bug in a shell one
                if lang:
                    raise ValueError(f"{name}:{first + 1}: {e}: {text}") from None
                continue
            out += [c for c in commands if lang or known(c)]
    return out


def inline(name: str) -> list[Command]:
    """Inline code spans outside fenced blocks that are whole commands: a known program and at
    least one argument (a bare `torchrun` or `loretta-demo` is a mention). `...` and the
    brackets of optional arguments (`[--repeat 3]`) are dropped."""
    out = []
    text = (REPO / name).read_text()
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for m in re.finditer(r"`([^`\n]+)`", prose):
        elided = "..." in m.group(1)
        span = m.group(1).replace("...", " ").replace("[", " ").replace("]", " ")
        if "<" in span:  # <placeholders> are prose
            continue
        line = prose.count("\n", 0, m.start()) + 1
        try:
            commands = split_commands(span, f"{name}:{line}")
        except ValueError:
            continue
        for c in commands:
            if len(c.words) >= 2 and known(c):
                c.elided = elided
                out.append(c)
    return out


def program(c: Command) -> str:
    return Path(c.words[0]).name


def known(c: Command) -> bool:
    p = program(c)
    return (
        p.startswith(("loretta-", "python"))
        or p in LAUNCHERS
        or p in ALLOWED
        or (p == "bash" and len(c.words) > 1)
    )


def all_commands() -> list[Command]:
    out = []
    for name in DOCS:
        out += fenced(name) + inline(name)
    return [c for c in out if program(c) != "loretta-shards"]  # tests/test_data_docs.py's


# ---- checks ----


class DocError(Exception):
    pass


def strict(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser (and its subcommands' parsers) with error() raising instead of exiting."""

    def error(message: str, ap: argparse.ArgumentParser = ap) -> NoReturn:
        raise DocError(f"{ap.prog}: {message}")

    ap.error = error  # type: ignore[method-assign]
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)
    return ap


def check_overrides(overrides: list[str], config: str | None) -> None:
    """Every override is --section.field=value and names a config field. With a shipped recipe
    the whole config must load (values too); with a YAML path (a placeholder) the field names
    are checked on the tiny recipe."""
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    if bad:
        raise DocError(f"not a --section.field=value override: {bad}")
    recipe = config in recipe_names()
    try:
        load_config(config if recipe and config else "tiny", overrides)
    except ConfigError as e:
        problems = [
            p for p in e.problems if recipe or "unknown field" in p or p.startswith("override")
        ]
        if problems:
            raise DocError("; ".join(problems)) from None


def check_config_name(config: str) -> None:
    if config not in recipe_names() and not config.endswith((".yaml", ".yml")):
        raise DocError(f"config {config!r}: neither a shipped recipe {recipe_names()} nor a YAML")


def check_pretrain(args: list[str]) -> None:
    from loretta.pretrain import build_parser

    a, extra = strict(build_parser()).parse_known_args(args)
    check_config_name(a.config)
    check_overrides(extra, a.config)


def check_convert(args: list[str]) -> None:
    from loretta.checkpoint.cli import build_parser

    ap, rest = build_parser(args)
    strict(ap).parse_args(rest)


def check_eval(args: list[str]) -> None:
    from loretta.eval import build_parser

    strict(build_parser()).parse_args(args)


def check_demo(args: list[str]) -> None:
    from loretta.demo.pipeline import build_parser

    _, extra = strict(build_parser()).parse_known_args(args)
    check_overrides(extra, None)


def check_shards(args: list[str]) -> None:
    from loretta.data.tools import build_parser

    strict(build_parser()).parse_args(args)


def script_flags(path: Path) -> tuple[set[str], bool]:
    """The option strings of a script's argparse parser, read from its source (not run), and
    whether it accepts unknown flags (parse_known_args)."""
    tree = ast.parse(path.read_text())
    flags: set[str] = set()
    known_args = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "add_argument":
                flags |= {
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("-")
                }
            known_args |= node.func.attr == "parse_known_args"
    return flags, known_args


def check_script(script: str, args: list[str]) -> None:
    path = REPO / script
    if not path.is_file():
        raise DocError(f"{script}: no such file")
    if script == "tools/convert_checkpoint.py":
        return check_convert(args)
    if script == "tools/shards.py":
        return check_shards(args)
    if path.suffix != ".py":
        return
    flags, known_args = script_flags(path)
    used = {a.split("=", 1)[0] for a in args if a.startswith("-") and a != "-"}
    unknown = sorted(f for f in used - flags if not (known_args and OVERRIDE.match(f + "=")))
    if unknown:
        raise DocError(f"{script}: no option {unknown} (it has {sorted(flags)})")


def check_sbatch(c: Command) -> None:
    scripts = [i for i, w in enumerate(c.words) if w.endswith(".sh")]
    if not scripts:
        return  # `sbatch --wait`: a mention of sbatch's own flag
    i = scripts[0]
    script, args = c.words[i], c.words[i + 1 :]
    if not (REPO / script).is_file():
        raise DocError(f"{script}: no such file")
    if "CONFIG" in c.env:
        check_config_name(c.env["CONFIG"])
    config = c.env.get("CONFIG", "tiny")
    if script == "slurm/pretrain.sh":
        check_overrides(shlex.split(c.env.get("OVERRIDES", "")) + args, config)
    elif script == "slurm/convert.sh":
        check_convert(args if "--to" in " ".join(args) else [*args, "--to", "hf"])
    elif script == "slurm/prepare_data.sh":
        check_overrides(shlex.split(c.env.get("OVERRIDES", "")), config)


def after(words: list[str], flag: str) -> tuple[str, list[str]] | None:
    """The module after `flag` (-m / --module) and its arguments."""
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1], words[i + 2 :]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1], words[i + 1 :]
    return None


def check_module(module: str, args: list[str]) -> None:
    if module == "loretta.pretrain":
        return check_pretrain(args)
    if module == "loretta.data.tools":
        return check_shards(args)
    if module == "loretta.checkpoint.cli":
        return check_convert(args)
    if module == "loretta.eval":
        return check_eval(args)
    if module == "loretta.demo.pipeline":
        return check_demo(args)
    if module in ALLOWED_MODULES:
        return None
    raise DocError(f"python -m {module}: no check for this module (add one, or to ALLOWED)")


def check(c: Command) -> None:
    p, args = program(c), c.words[1:]
    if p == "loretta-shards":
        return  # tests/test_data_docs.py
    if p == "loretta-pretrain":
        return check_pretrain(args)
    if p == "loretta-convert":
        return check_convert(args)
    if p == "loretta-eval":
        return check_eval(args)
    if p == "loretta-demo":
        return check_demo(args)
    if p.startswith("loretta-"):
        raise DocError(f"{p}: not a console script of pyproject.toml")
    if p.startswith("python"):
        if args and args[0] == "-c":
            ast.parse(args[1])  # inline Python: it must at least compile
            return None
        if c.elided and len(args) == 1:
            return check_script(args[0], []) if not (REPO / args[0]).is_file() else None
        if args and args[0] == "-m":
            return check_module(args[1], args[2:])
        if args and FOREIGN_SCRIPT.search(args[0]):
            return None
        if args:
            return check_script(args[0], args[1:])
        raise DocError("python without a script")
    if p in ("torchrun", "deepspeed"):
        flag = LAUNCHERS[p]
        assert flag is not None
        found = after(args, flag)
        if found is None:
            return None  # the launcher's own flags, shown in passing
        return check_module(*found)
    if p == "sbatch":
        return check_sbatch(c)
    if p == "bash":
        return check_script(args[0], args[1:])
    if p in ALLOWED:
        return None
    raise DocError(f"{p}: a command this test does not know (add a check, or to ALLOWED)")


COMMANDS = all_commands()


def test_found_the_commands() -> None:
    """The extraction sees the commands it is meant to (a regex gone wrong checks nothing)."""
    programs = {program(c) for c in COMMANDS}
    assert {"loretta-pretrain", "loretta-eval", "loretta-demo", "torchrun", "sbatch"} <= programs
    assert sum(program(c).startswith("python") for c in COMMANDS) >= 15
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_doc_command(command: Command) -> None:
    try:
        check(command)
    except DocError as e:
        pytest.fail(f"{command}\n  -> {e}", pytrace=False)


def test_prose_overrides_name_config_fields() -> None:
    """Overrides quoted in the prose (`--data.sources.0.path=data/pairs`, `checkpoint.verify=size`)
    name real config fields; `--section.field=value` is the generic form."""
    from loretta.config import TrainConfig

    sections = "|".join(TrainConfig.__dataclass_fields__)
    found, wrong = 0, []
    for name in DOCS:
        text = (REPO / name).read_text()
        for m in re.finditer(rf"`(?:--)?((?:{sections})(?:\.\w+)+=[^`\s]*)`", text):
            found += 1
            try:
                check_overrides(["--" + m.group(1)], None)
            except DocError as e:
                wrong.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}: {e}")
    assert found >= 5
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "line",
    [
        "loretta-pretrain --config tiny --dryrun",
        "loretta-pretrain --config tiny --optim.lrr=3e-4",
        "loretta-pretrain --config nosuch",
        "loretta-eval probe runs/x --train A",
        "loretta-convert inspect runs/x --checksums",
        "loretta-demo --preset nosuch",
        "loretta-demo --run.stepz=3",
        "python bench/data_throughput.py --repeats 3",
        "python tools/nosuch.py",
        "CONFIG=nosuch sbatch slurm/pretrain.sh",
        "sbatch slurm/pretrain.sh --optim.lrr=1",
        "torchrun --nproc_per_node 2 -m loretta.nosuch",
        "loretta-nosuch --x",
        "curl https://example.com",
    ],
)
def test_wrong_commands_fail(line: str) -> None:
    (c,) = split_commands(line, "test")
    with pytest.raises(DocError):
        check(c)
