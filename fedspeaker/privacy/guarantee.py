"""The privacy guarantee of a run, in plain words, for summaries and the README."""

from __future__ import annotations

import math

from fedspeaker.config import RunSettings


def guarantee_sentence(settings: RunSettings, epsilon: float, user_epsilon: float = math.nan) -> str:
    """One plain sentence per kind of DP the run used."""
    sentences = []
    if settings.dp:
        sentences.append(
            f"Each client's training utterances are protected by sample-level "
            f"(epsilon={epsilon:.2f}, delta={settings.delta:g}) differential privacy over the "
            f"whole run (Opacus DP-SGD, {settings.accountant.upper()} accountant, clipping norm "
            f"{settings.max_grad_norm:g}); the bound is the largest any client spent"
            + (f", and no client trained past its budget of epsilon={settings.epsilon_budget:g}."
               if settings.epsilon_budget else "."))
    if settings.user_dp != "off":
        how = (f"Flower's {settings.user_dp.replace('-', '-side ', 1)} clipping wrapper, noise "
               f"multiplier {settings.user_noise_multiplier:g}, clipping norm {settings.user_clip_norm:g}")
        if math.isnan(user_epsilon):
            sentences.append(f"Each client's whole contribution gets user-level DP noise ({how}); "
                             "flwr 1.41 accounts epsilon only for fixed clipping around FedAvg, so "
                             "no epsilon is claimed for this run.")
        else:
            sentences.append(f"Each client's whole contribution is protected by user-level "
                             f"(epsilon={user_epsilon:.2f}, delta={settings.delta:g}) differential "
                             f"privacy over the run ({how}; Flower's RDP accountant, no sampling "
                             "amplification claimed).")
    return " ".join(sentences) or "no differential privacy"
