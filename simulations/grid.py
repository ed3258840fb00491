"""A comparison grid: strategies x partitions x scenarios x seeds, read from a TOML file.

Grids live in ``simulations/grids/`` (``default.toml`` says how a file is laid out).
Every cell is an ordinary run: its settings are RunSettings built from run-config
options, checked for every cell before the first one starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspeaker.config import RunSettings, current_options
from fedspeaker.errors import ConfigError, FedSpeakerError

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
CENTRAL = "central"  # the strategy name of the centralised baseline's cells
_KEYS = {"description", "strategies", "seeds", "central", "options", "partitions", "scenarios",
         "strategy-options"}


def shipped_grids() -> list[str]:
    """The names of the grids in simulations/grids/, for `fedspeaker compare GRID`."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    strategy: str  # a Flower strategy, or CENTRAL
    partition: str
    scenario: str  # CENTRAL cells have no scenario: ""
    seed: int

    @property
    def key(self) -> str:
        """Its folder name under the comparison's cells/."""
        return "__".join((self.partition, self.scenario or "-", self.strategy, f"seed{self.seed}"))

    @property
    def label(self) -> str:
        return " / ".join(x for x in (self.partition, self.scenario, self.strategy,
                                      f"seed {self.seed}") if x)


@dataclass(frozen=True)
class ComparisonGrid:
    name: str
    description: str
    strategies: list[str]
    seeds: list[int]
    central: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    partitions: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    scenarios: dict[str, dict[str, Any]] = field(default_factory=lambda: {"clean": {}})
    strategy_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str) -> "ComparisonGrid":
        """A grid by name (a file in simulations/grids/) or by path."""
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = GRIDS_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(shipped_grids())
            raise ConfigError(f"no grid {name_or_path!r}: give a TOML file or one of: {known}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"grid file {path} is not valid TOML: {exc}") from None
        unknown = set(raw) - _KEYS
        if unknown:
            raise ConfigError(f"grid file {path}: unknown key(s) {sorted(unknown)}; "
                              f"known: {sorted(_KEYS)}")
        grid = cls(
            name=path.stem,
            description=str(raw.get("description", "")),
            strategies=list(raw.get("strategies", ["fedavg"])),
            seeds=[int(s) for s in raw.get("seeds", [0])],
            central=bool(raw.get("central", True)),
            options=dict(raw.get("options", {})),
            partitions=dict(raw.get("partitions", {"default": {}})),
            scenarios=dict(raw.get("scenarios", {"clean": {}})),
            strategy_options=dict(raw.get("strategy-options", {})),
        )
        grid.check(path)
        return grid

    def check(self, source: Path | str = "grid") -> None:
        for what, entries in (("strategies", self.strategies), ("seeds", self.seeds),
                              ("partitions", self.partitions), ("scenarios", self.scenarios)):
            if not entries:
                raise ConfigError(f"{source}: {what} is empty")
            if len(set(entries)) != len(entries):
                raise ConfigError(f"{source}: {what} has repeated entries")
        for table in ({"[options]": self.options}, self.partitions, self.scenarios,
                      self.strategy_options):
            for name, options in table.items():
                if not isinstance(options, dict):
                    raise ConfigError(f"{source}: {name!r} must be a table of run-config options")
                nested = [k for k, v in options.items() if isinstance(v, (dict, list))]
                if nested:
                    raise ConfigError(f"{source}: {name!r} option(s) {nested} must be plain values "
                                      "(quote names that hold a dot: \"dirichlet-0.3\" = {...})")
                if any(k in options for k in ("strategy", "seed", "out-dir")):
                    raise ConfigError(f"{source}: {name!r} may not set strategy, seed or out-dir: "
                                      "the grid sets them per cell")

    def cells(self) -> list[Cell]:
        """Central cells first: a federated cell's rounds-to-90 % needs its baseline."""
        cells = [Cell(CENTRAL, p, "", s) for p in self.partitions for s in self.seeds] \
            if self.central else []
        cells += [Cell(strategy, p, scenario, s) for p in self.partitions for scenario in self.scenarios
                  for strategy in self.strategies for s in self.seeds]
        return cells

    @property
    def reference_scenario(self) -> str:
        """The scenario the others are measured against (the first listed)."""
        return next(iter(self.scenarios))

    def settings(self, cell: Cell, overrides: dict[str, Any], out_dir: Path) -> RunSettings:
        """options, then partition, scenario, strategy options, then the command line's: a
        later layer wins, whichever name (old or new, config.RENAMED_OPTIONS) each gives."""
        layers = [self.options, self.partitions[cell.partition]]
        if cell.strategy != CENTRAL:
            layers += [self.scenarios[cell.scenario], self.strategy_options.get(cell.strategy, {}),
                       {"strategy": cell.strategy}]
        layers += [overrides, {"seed": cell.seed, "out-dir": str(out_dir)}]
        try:
            config: dict[str, Any] = {}
            for layer in layers:
                config |= current_options(layer)
            return RunSettings.from_run_config(config)
        except FedSpeakerError as exc:
            raise ConfigError(f"grid {self.name}, cell {cell.label}: {exc}") from None
