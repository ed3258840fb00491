"""The degradations a run names: ``test-conditions`` (degraded trial conditions) and
``augment`` (on-device augmentation), read into recipes.

A recipe names what is done, e.g. ``room0.3-0.9+babble10``: the room first, then each
noise at its SNR (data/degrade.py does it). The grammar is a leaf of its own so that
settings (config.py) check these options without loading the signal processing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedspeaker.errors import ConfigError

_NOISE = re.compile(r"^(babble|white|pink|brown)(-?\d+(?:\.\d+)?)$")
_ROOM = re.compile(r"^room(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Recipe:
    """One degradation: an optional room (RT60 drawn uniformly in ``rt60``) and noises
    (kind, SNR in dB) added after it."""

    name: str
    rt60: tuple[float, float] | None = None
    noises: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str, *, option: str = "test-conditions") -> "Recipe":
        """``room0.3-0.9``, ``babble5``, ``white-5``, ``pink10``, ``brown0``, joined by ``+``."""
        rt60, noises = None, []
        for part in text.strip().split("+"):
            if m := _NOISE.match(part):
                snr = float(m.group(2))
                if not -20.0 <= snr <= 60.0:
                    raise ConfigError(f"{option}: {text!r}: SNR {snr:g} dB is outside -20..60 dB")
                noises.append((m.group(1), snr))
            elif m := _ROOM.match(part):
                low = float(m.group(1))
                high = float(m.group(2) or low)
                if rt60 is not None:
                    raise ConfigError(f"{option}: {text!r}: at most one room per condition")
                if not 0.1 <= low <= high <= 2.0:
                    raise ConfigError(f"{option}: {text!r}: RT60 range must be within 0.1..2.0 s, "
                                      "low first")
                rt60 = (low, high)
            else:
                raise ConfigError(
                    f"{option}: cannot read {part!r} in {text!r}; a condition is parts joined by '+': "
                    "babbleSNR, whiteSNR, pinkSNR, brownSNR (SNR in dB, e.g. babble5) or "
                    "roomLOW-HIGH (RT60 range in seconds, e.g. room0.3-0.9)")
        return cls(text.strip(), rt60, tuple(noises))

    @property
    def babble(self) -> bool:
        return any(kind == "babble" for kind, _ in self.noises)


# the four conditions of issue 23's table: babble at 5 dB, a room of RT60 0.3-0.9 s, the
# room with babble at 10 dB, white noise at 5 dB
STANDARD_CONDITIONS = ("babble5", "room0.3-0.9", "room0.3-0.9+babble10", "white5")
# what on-device augmentation draws from (data/augment.py); noise: white, pink or brown
FAMILIES = ("babble", "white", "pink", "brown", "room")


def parse_conditions(text: str) -> tuple[Recipe, ...]:
    """``test-conditions``: empty or ``none`` (no degraded trials), ``standard``, or a
    comma-separated list of conditions (``standard`` may be one of them)."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part in ("", "none"):
            continue
        names.extend(STANDARD_CONDITIONS if part == "standard" else [part])
    recipes = [Recipe.parse(name) for name in names]
    if len({r.name for r in recipes}) != len(recipes):
        raise ConfigError(f"test-conditions: {text!r} names a condition twice")
    return tuple(recipes)


def parse_families(text: str) -> tuple[str, ...]:
    """``augment``: empty or ``none`` (off), ``standard`` (all of them), or a comma-separated
    list of babble, white, pink, brown, noise (the three stationary ones), room."""
    families: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part in ("", "none"):
            continue
        expanded = {"standard": FAMILIES, "noise": ("white", "pink", "brown")}.get(part, (part,))
        for family in expanded:
            if family not in FAMILIES:
                raise ConfigError(f"augment: unknown family {part!r} in {text!r}; use standard, or "
                                  f"a comma-separated list of {', '.join(FAMILIES)}, noise")
            if family not in families:
                families.append(family)
    return tuple(families)
