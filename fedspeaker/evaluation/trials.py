"""Verification trials: which pairs of utterances are scored, and how.

By default every pair of unseen-speaker utterances is a trial. That grows as n², so a
large corpus takes a seeded sample instead (``max-trials``): up to half of them
same-speaker pairs, the rest different-speaker pairs, each drawn uniformly and without
repeats, never materialising the n² list. A user's own trial list in the VoxCeleb
format (``label enrol test`` per line, paths relative to the corpus root) is scored as
written. Scores are cosines, optionally with adaptive s-norm against a cohort of
training-speaker embeddings.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedspeaker.errors import ConfigError


MATRIX_UP_TO = 8192  # utterances scored through one all-pairs matrix (256 MB at most)
CHUNK = 65536  # trials scored at a time beyond that


@dataclass(frozen=True)
class Trials:
    """Pairs of utterance indices (into one list of embeddings) and whether each pair
    is one speaker."""

    enrol: np.ndarray
    test: np.ndarray
    target: np.ndarray  # bool
    source: str  # how the trials were chosen, for summaries

    def __len__(self) -> int:
        return len(self.target)


def all_pairs(speakers: list[str]) -> Trials:
    """Every pair of utterances."""
    ids = np.unique(np.asarray(speakers), return_inverse=True)[1]
    rows, cols = np.triu_indices(len(speakers), k=1)
    return Trials(rows, cols, ids[rows] == ids[cols], f"all {len(rows):,} pairs")


def sampled_pairs(speakers: list[str], max_trials: int, seed: int) -> Trials:
    """A seeded sample of ``max_trials`` pairs: same-speaker pairs drawn uniformly among all
    of them (up to half the trials), different-speaker pairs uniformly among theirs."""
    rng = random.Random(f"{seed}-trials")
    by_speaker: dict[str, list[int]] = {}
    for i, speaker in enumerate(speakers):
        by_speaker.setdefault(speaker, []).append(i)
    groups = [g for g in by_speaker.values() if len(g) > 1]
    n_target_pairs = sum(math.comb(len(g), 2) for g in groups)
    n = len(speakers)
    n_nontarget_pairs = math.comb(n, 2) - sum(math.comb(len(g), 2) for g in by_speaker.values())
    k_target = min(n_target_pairs, max_trials // 2)
    k_nontarget = min(n_nontarget_pairs, max_trials - k_target)
    chosen: set[tuple[int, int]] = set()
    weights = [math.comb(len(g), 2) for g in groups]
    while len(chosen) < k_target:
        group = rng.choices(groups, weights)[0]
        i, j = sorted(rng.sample(group, 2))
        chosen.add((i, j))
    targets = len(chosen)
    while len(chosen) < targets + k_nontarget:
        i, j = sorted(rng.sample(range(n), 2))
        if speakers[i] != speakers[j]:
            chosen.add((i, j))
    pairs = np.array(sorted(chosen), dtype=np.int64).reshape(-1, 2)
    same = np.array([speakers[i] == speakers[j] for i, j in pairs], dtype=bool)
    return Trials(pairs[:, 0], pairs[:, 1], same,
                  f"a seeded sample of {len(pairs):,} of the {math.comb(n, 2):,} pairs "
                  f"({int(same.sum()):,} same-speaker)")


def choose_trials(speakers: list[str], max_trials: int, seed: int) -> Trials:
    """All pairs, or (``max_trials`` > 0 and fewer than all) a seeded sample."""
    if max_trials and math.comb(len(speakers), 2) > max_trials:
        return sampled_pairs(speakers, max_trials, seed)
    return all_pairs(speakers)


def read_trial_list(path: Path, root: Path) -> tuple[list[Path], Trials]:
    """A VoxCeleb-format list (``1 enrol.wav test.wav``: 1 same speaker, 0 not), paths
    relative to ``root`` (or absolute). Returns the distinct files and the trials over them."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"trial-list {path}: cannot read ({exc.strerror})") from None
    files: dict[Path, int] = {}
    enrol, test, target = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ConfigError(f"trial-list {path}, line {number}: expected 'label enrol test' with "
                              f"label 1 (same speaker) or 0, got {line.strip()!r}")
        pair = []
        for name in parts[1:]:
            file = Path(name) if Path(name).is_absolute() else root / name
            if not file.is_file():
                raise ConfigError(f"trial-list {path}, line {number}: {file} not found")
            pair.append(files.setdefault(file, len(files)))
        enrol.append(pair[0])
        test.append(pair[1])
        target.append(parts[0] == "1")
    if not target or all(target) or not any(target):
        raise ConfigError(f"trial-list {path}: needs both same-speaker (1) and different-speaker "
                          "(0) trials")
    return list(files), Trials(np.array(enrol), np.array(test), np.array(target),
                               f"{len(target):,} trials from {path}")


def trial_scores(embeddings: torch.Tensor, trials: Trials, cohort: torch.Tensor | None = None,
                 top: int = 100, *, test_embeddings: torch.Tensor | None = None) -> np.ndarray:
    """Cosine score of each trial; with a cohort, adaptive s-norm: each side's score is
    standardised by its ``top`` closest cohort scores, and the two are averaged.
    ``test_embeddings``: the test side's own embeddings (a degraded copy of the same
    utterances), the enrolment side's staying ``embeddings``."""
    e = F.normalize(embeddings.float(), dim=1)
    t = e if test_embeddings is None else F.normalize(test_embeddings.float(), dim=1)
    enrol, test = torch.from_numpy(trials.enrol), torch.from_numpy(trials.test)
    if len(e) <= MATRIX_UP_TO:  # one matrix product, then a lookup: far faster than gathering
        scores = (e @ t.T)[enrol, test]
    else:
        scores = torch.cat([(e[enrol[i:i + CHUNK]] * t[test[i:i + CHUNK]]).sum(dim=1)
                            for i in range(0, len(enrol), CHUNK)])
    if cohort is None:
        return scores.numpy()
    c = F.normalize(cohort.float(), dim=1)

    def stats(side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        closest = (side @ c.T).topk(min(top, len(c)), dim=1).values
        return closest.mean(dim=1), closest.std(dim=1).clamp_min(1e-6)

    (e_mean, e_std), (t_mean, t_std) = stats(e), stats(t)
    normed = 0.5 * ((scores - e_mean[enrol]) / e_std[enrol] + (scores - t_mean[test]) / t_std[test])
    return normed.numpy()
