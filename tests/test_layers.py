"""Imports point one way: fedspeaker.cli -> simulations -> server, client -> the core.

Every import counts, at the top of a file or inside a function: a late import is
still a dependency. A deployed client must load no simulation or server code.

Inside the core, packages (and top-level modules) import only those below them
(CORE_ORDER, lowest first): errors, files, wire -> recipes -> config -> data ->
evaluation -> model -> privacy -> training -> reporting -> device, deploy -> cli.
Evaluation sits below the models: it scores any speaker model through its interface
(embed, raw_embed, head), and a model's bundle records what evaluation fitted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fedspeaker", "server", "client", "simulations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (resolved to modules, not names in them)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> str:
    if module == "fedspeaker.cli" or module.startswith("fedspeaker.cli."):
        return "cli"
    return module.split(".")[0]


# which layers each layer may import
ALLOWED = {
    "cli": {"cli", "simulations", "server", "client", "fedspeaker"},
    "simulations": {"simulations", "server", "client", "fedspeaker"},
    "server": {"server", "fedspeaker"},
    "client": {"client", "fedspeaker"},
    "fedspeaker": {"fedspeaker"},
}


def test_imports_point_from_the_cli_down_to_the_core():
    wrong = sorted(f"{module} imports {target}" for module, targets in _graph().items()
                   for target in targets if _layer(target) not in ALLOWED[_layer(module)])
    assert not wrong, "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles():
    # the package __init__ a submodule's import passes through is not a dependency of it
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in _graph().items()}
    cycles = _cycles(edges)
    assert not cycles, "\n".join(cycles)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]


def _core_package(module: str) -> str | None:
    """The core node a module belongs to: ``fedspeaker.data.features`` -> ``data``, a
    top-level module (``fedspeaker.config``) its own node, ``fedspeaker`` itself ``""``;
    None outside the core."""
    parts = module.split(".")
    if parts[0] != "fedspeaker":
        return None
    return parts[1] if len(parts) > 1 else ""


def _package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        package = _core_package(module)
        if package is None:
            continue
        edges.setdefault(package, set()).update(
            t for t in map(_core_package, targets) if t is not None and t != package)
    return edges


def test_no_import_cycles_between_the_core_packages():
    cycles = _cycles(_package_graph())
    assert not cycles, "\n".join(cycles)


# the core's packages and top-level modules, lowest first; peers on a line import none
# of each other
CORE_ORDER = (
    ("",),  # fedspeaker/__init__.py: __version__
    ("errors", "files", "wire"),
    ("recipes",),  # the grammar of test-conditions and augment, which config checks
    ("config",),
    ("data",),
    ("evaluation",),
    ("model",),
    ("privacy",),
    ("training",),
    ("reporting",),
    ("device", "deploy"),
    ("cli",),  # the composition root: may import anything
)


def test_the_core_packages_import_only_lower_ones():
    level = {package: i for i, peers in enumerate(CORE_ORDER) for package in peers}
    edges = _package_graph()
    assert set(edges) <= set(level), f"place {sorted(set(edges) - set(level))} in CORE_ORDER"
    wrong = sorted(f"fedspeaker.{package} imports fedspeaker.{target}" for package, targets in edges.items()
                   for target in targets if level[target] >= level[package])
    assert not wrong, "\n".join(wrong)


def test_the_layering_test_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from simulations.launch import run_federation\n")
    assert _imports(bad, "fedspeaker.bad", set(_modules())) == {"simulations.launch"}


def test_a_deployed_client_loads_no_simulation_or_server_code():
    code = ("import sys, client.app; "
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('simulations', 'server') "
            "or m in ('client.scenarios', 'fedspeaker.data.partition', 'flwr_datasets', 'opacus')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == [], loaded
