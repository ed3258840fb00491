"""The README and the guides stay true: the configuration reference is what the settings
generate, every `fedspeaker` command and option they name exists, every relative link
resolves. Nothing here launches a federation."""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
from pathlib import Path

import pytest

from fedspeaker.cli.main import _parser
from fedspeaker.cli.reference import DEFAULT_OUT, REGENERATE, render
from fedspeaker.config import RunSettings

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KEYS = set(RunSettings().to_run_config())


def _code(text: str) -> list[str]:
    """The shell commands in fenced code blocks (continuation lines joined) and inline spans."""
    commands: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        commands += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return commands + re.findall(r"`([^`\n]+)`", prose)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command.split(" # ")[0], comments=False)
    except ValueError:  # an inline span with an odd quote: split on spaces
        return command.split()


def _fedspeaker_calls(command: str) -> list[tuple[str, list[str]]]:
    """(subcommand, the words after it) for each `fedspeaker SUB ...` in a command."""
    calls = []
    words = _words(command)
    for i, word in enumerate(words):
        if re.fullmatch(r"(\S*/)?fedspeaker", word) and i + 1 < len(words):
            sub = words[i + 1]
            if re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", sub):
                rest = []
                for w in words[i + 2:]:
                    if w in ("&&", ";", "&", "||") or w.startswith("#"):
                        break
                    rest.append(w)
                calls += [(s, rest) for s in sub.split("|")]
    return calls


def _named_options(words: list[str]) -> list[str]:
    return [re.sub(r"[\]\[,.)]+$", "", w.lstrip("[").split("=")[0]) for w in words
            if w.lstrip("[").startswith("--")]


def _set_keys(command: str) -> list[str]:
    """Run-config keys given as `--set KEY=VALUE` or in `--run-config "k=v ..."`."""
    keys = re.findall(r"--set[ =]([a-z][a-z0-9-]*)=", command)
    for quoted in re.findall(r"--run-config\s+\"([^\"]*)\"", command):
        keys += re.findall(r"(?:^|\s)([a-z][a-z0-9-]*)=", quoted)
    return keys


def test_configuration_reference_is_generated_from_the_settings():
    expected = render()
    current = DEFAULT_OUT.read_text() if DEFAULT_OUT.exists() else ""
    diff = "".join(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                        "docs/configuration.md (committed)", "generated", n=1))
    assert current == expected, (f"docs/configuration.md differs from fedspeaker/config.py's settings; "
                                 f"regenerate it with: {REGENERATE}\n{diff[:3000]}")


def test_the_reference_lists_every_setting_once():
    text = render()
    for key in KEYS:
        assert text.count(f"| `{key}` |") == 1, key


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_fedspeaker_command_and_option_named_exists(doc: Path):
    subcommands = _subcommands()
    wrong = []
    for command in _code(doc.read_text()):
        for sub, rest in _fedspeaker_calls(command):
            if sub not in subcommands:
                wrong.append(f"`fedspeaker {sub}`: no such command (in `{command.strip()}`)")
                continue
            known = _options(subcommands[sub])
            wrong += [f"`fedspeaker {sub} {o}`: no such option (in `{command.strip()}`)"
                      for o in _named_options(rest) if o not in known]
        wrong += [f"`{key}`: no such run-config option (in `{command.strip()}`)"
                  for key in _set_keys(command) if key not in KEYS]
    assert not wrong, f"{doc.relative_to(REPO)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_option_named_alone_exists(doc: Path):
    """A span like `--epsilon-budget B` names a fedspeaker option, or one of another
    program's listed in FOREIGN_OPTIONS."""
    known = set().union(*(_options(p) for p in _subcommands().values()))
    wrong = []
    for span in _code(doc.read_text()):
        if span.startswith("--"):
            option = _named_options(_words(span))[0]
            if option not in known and option not in FOREIGN_OPTIONS:
                wrong.append(f"`{span}`")
    assert not wrong, f"{doc.relative_to(REPO)}: options no `fedspeaker` command has: " + ", ".join(wrong)


# Options of other programs that the guides name on their own, each with its program.
FOREIGN_OPTIONS = {
    "--run-config",  # flwr run
    "--node-config",  # flwr-supernode
    "--num-cpus",  # ray start
}


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M),
                              flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    wrong = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            wrong.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            wrong.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not wrong, f"{doc.relative_to(REPO)}:\n" + "\n".join(wrong)


def test_the_guides_are_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in DOCS[1:] if f"](docs/{p.name}" not in readme]
    assert not missing, f"README.md links to no guide {missing}"


def test_every_module_and_make_target_named_exists():
    """`python -m MODULE` of this project, and `make TARGET`, as the guides write them."""
    import importlib.util

    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    wrong = []
    for doc in DOCS:
        for command in _code(doc.read_text()):
            command = re.sub(r"\s#.*", "", command)  # a shell comment is prose
            for module in re.findall(r"python -m ((?:fedspeaker|simulations|server|client)[\w.]*)", command):
                if importlib.util.find_spec(module) is None:
                    wrong.append(f"{doc.relative_to(REPO)}: no module {module} (in `{command.strip()}`)")
            for target in re.findall(r"(?:^|[\s(])make ([a-z][a-z0-9-]*)", command):
                if target not in targets:
                    wrong.append(f"{doc.relative_to(REPO)}: no make target {target} (in `{command.strip()}`)")
    assert not wrong, "\n".join(wrong)
