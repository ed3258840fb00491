"""docs/configuration.md, generated from RunSettings so the reference cannot drift.

Run ``.venv/bin/python -m fedspeaker.cli.reference`` after adding or changing a setting;
tests/test_docs.py fails while the committed file differs from what this writes.

What it reads from fedspeaker/config.py, in source order:
- each field of ``RunSettings``: its run-config key, type and default, and its help: the
  field's ``metadata["help"]`` if it has one, else its trailing ``# comment``;
- a comment block above fields opens a section (its text up to the first ':' outside
  brackets is the heading) unless it starts in lower case: then it is the help of the field right
  below it, or, when that field has its own comment, the continuation of the field above;
- the bounds that ``RunSettings.validate`` and its ``_validate_*`` methods check with ``_choice``,
  ``_at_least``, ``_positive`` and ``_open_unit``;
- the ``fedspeaker simulate``/``central`` flag that sets the option, if any;
- the old names of renamed options (``RENAMED_OPTIONS``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspeaker import config
from fedspeaker.config import RunSettings

REGENERATE = ".venv/bin/python -m fedspeaker.cli.reference"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@dataclass
class Option:
    """One run-config option as the reference shows it."""

    key: str
    kind: str
    default: Any
    help: str = ""
    rule: str = ""
    flag: str = ""


@dataclass
class Section:
    heading: str
    text: str = ""
    options: list[Option] = field(default_factory=list)


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line, and which lines hold nothing but a comment."""
    text: dict[int, str] = {}
    alone: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = token.start[0]
            text[line] = token.string.lstrip("#").strip()
            if token.line.strip().startswith("#"):
                alone.add(line)
    return text, alone


def _rules(cls: ast.ClassDef) -> dict[str, str]:
    """What validate() and its per-concern _validate_* methods check of single options, by key."""
    rules: dict[str, str] = {}
    methods = [n for n in cls.body if isinstance(n, ast.FunctionDef) and "validate" in n.name]
    for node in (node for method in methods for node in ast.walk(method)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        key, name = node.args[0].value, node.func.id
        if name == "_choice" and len(node.args) == 3 and isinstance(node.args[2], ast.Name):
            rules[key] = "one of " + ", ".join(f"`{v}`" for v in getattr(config, node.args[2].id))
        elif name == "_at_least" and len(node.args) == 3 and isinstance(node.args[2], ast.Constant):
            rules[key] = f"at least {node.args[2].value:g}"
        elif name == "_positive":
            rules[key] = "greater than 0"
        elif name == "_open_unit":
            rules[key] = "between 0 and 1, exclusive"
    return rules


def _flags() -> dict[str, str]:
    """The `fedspeaker simulate` flag that sets each option (cli/runs.py maps them)."""
    from fedspeaker.cli.runs import _FLAG_OPTIONS

    flags = {key: "--" + attribute.replace("_", "-") for attribute, key in _FLAG_OPTIONS.items()}
    return {**flags, "dp": "--no-dp", "out-dir": "--out", "resume": "--resume"}


def sections() -> list[Section]:
    """RunSettings' options, in the sections and order of fedspeaker/config.py."""
    source = Path(config.__file__).read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "RunSettings")
    comments, alone = _comments(source)
    rules, flags = _rules(cls), _flags()
    by_name = {f.name: f for f in dataclasses.fields(RunSettings)}
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    result = [Section("Options")]
    previous_end = fields[0].lineno - 1
    while previous_end in alone:  # comments right above the first field belong to it
        previous_end -= 1
    last: Option | None = None
    for node in fields:
        name = node.target.id
        spec = by_name[name]
        key = name.replace("_", "-")
        inline = comments.get(node.lineno, "") if node.lineno not in alone else ""
        block = " ".join(comments[i] for i in range(previous_end + 1, node.lineno) if i in alone)
        default = spec.default
        if default is dataclasses.MISSING:
            default = spec.default_factory()  # type: ignore[misc]
        option = Option(key, str(spec.type), default, spec.metadata.get("help", inline),
                        rules.get(key, ""), flags.get(key, ""))
        if block and block[0].islower():
            if inline and last is not None:
                last.help = f"{last.help} {block}".strip()  # a comment running on below its field
            elif not option.help:
                option.help = block
        elif block:
            result.append(_section(block))
        result[-1].options.append(option)
        last, previous_end = option, node.end_lineno or node.lineno
    return [s for s in result if s.options]


def _section(block: str) -> Section:
    """A section from its comment: the heading up to the first ':' outside brackets, the
    rest as its text."""
    depth = 0
    for i, char in enumerate(block):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == ":" and depth == 0:
            rest = block[i + 1:].strip()
            return Section(block[:i].strip(), rest[:1].upper() + rest[1:])
    return Section(block)


def _literal(value: Any) -> str:
    """The default as a run config writes it (TOML: strings quoted, booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md."""
    count = len(dataclasses.fields(RunSettings))
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from fedspeaker/config.py (RunSettings); do not edit by hand. -->",
        f"<!-- Regenerate with: {REGENERATE} -->",
        "",
        f"Every run setting, {count} in all: its run-config key, type, default and meaning, taken",
        "from `RunSettings` in `fedspeaker/config.py`, where each is typed and checked once. Set",
        "one with `--set KEY=VALUE` on `fedspeaker simulate`, `central`, `compare` and",
        "`privacy-sweep` (several `--set` may be given), with the flag named in the table where",
        "there is one, with `--run-config \"KEY=VALUE ...\"` on `flwr run` (strings quoted, e.g.",
        "`strategy='fedprox'`), or in a comparison grid's TOML. The defaults are also in",
        "`[tool.flwr.app.config]` of `pyproject.toml`. A bad value, or a key not listed here,",
        "stops the run before it starts with a message naming the option.",
        "",
        "Which guide explains each in depth: [simulate and compare](simulate-and-compare.md),",
        "[privacy](privacy.md), [the model and its scoring](model-and-scoring.md),",
        "[deployment](deployment.md).",
    ]
    for section in sections():
        lines += ["", f"## {section.heading}", ""]
        if section.text:
            lines += [section.text, ""]
        lines += ["| option | type | default | flag | meaning |", "|---|---|---|---|---|"]
        for o in section.options:
            meaning = o.help + (f" ({o.rule})" if o.rule and o.help else o.rule)
            flag = f"`{o.flag}`" if o.flag else ""
            default = _cell(_literal(o.default))
            lines.append(f"| `{o.key}` | {o.kind} | `{default}` | {flag} | {_cell(meaning)} |")
    lines += ["", "## Old names", "",
              "Options renamed since. The old key still works wherever a key is taken, with a deprecation",
              "warning; both given, the new one away from its default, they must agree.", ""]
    lines += [f"- `{old}`: now `{new}`" for old, new in config.RENAMED_OPTIONS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedspeaker.cli.reference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="file to write (default docs/configuration.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(dataclasses.fields(RunSettings))} options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
