"""The privacy guarantee of a run, in plain words, for summaries and the README: for each
kind of DP the run used, the unit protected (an utterance, a speaker, a device), epsilon,
delta, the accountant and the sampling it credits."""

from __future__ import annotations

import math

from fedspeaker.config import RunSettings
from fedspeaker.privacy.accounting import GroupBound, accountant_words
from fedspeaker.privacy.backend_stats import device_backend_noise_multiplier


def guarantee_sentence(settings: RunSettings, epsilon: float, device_epsilon: float = math.nan, *,
                       group: GroupBound | None = None, simulated: bool = True,
                       lifetime_epsilon: float = math.nan) -> str:
    """One plain sentence per kind of DP the run used.

    Args:
        epsilon: the largest sample-level epsilon any client spent (DP-SGD).
        device_epsilon: the device-level epsilon (DP-FedAvg), NaN where none is accounted.
        group: under utterance-level DP-SGD, the bound for the speaker with the most
            utterances in one client (None: not known).
        simulated: a simulation (False: real devices, whose noise is never seeded).
        lifetime_epsilon: the largest epsilon a device reported over every run on its
            recordings (its lifetime ledger); NaN where none reported one.
    """
    sentences = []
    if settings.dp:
        sentences.append(_sample_level(settings, epsilon, group))
        if settings.backend_privacy:
            sentences.append(_backend_split(settings))
        sentences.append(_noise_source(settings, simulated))
        if not math.isnan(lifetime_epsilon):
            sentences.append(f"Over every run ever on their recordings, the devices reported a "
                             f"lifetime epsilon of at most {lifetime_epsilon:.2f} (delta={settings.delta:g}).")
    if settings.device_dp != "off":
        sentences.append(_device_level(settings, device_epsilon))
        if settings.backend and not settings.secagg:
            sentences.append("That epsilon includes the scoring back end's releases (one vector of "
                             "norm at most 1 per device, Gaussian noise of std "
                             f"{device_backend_noise_multiplier(settings):.2f} added once by the server "
                             f"to their sum, calibrated so that they alone spend epsilon "
                             f"{settings.backend_share:g}).")
        sentences.append("The server draws that noise itself (NumPy's generator, in Flower's wrapper): "
                         "the guarantee holds against whoever sees the released models, not against "
                         "the server.")
    return " ".join(sentences) or "no differential privacy"


def _sample_level(s: RunSettings, epsilon: float, group: GroupBound | None) -> str:
    budget = (f", and no client trained past its budget of epsilon={s.epsilon_budget:g}"
              if s.epsilon_budget else "")
    if s.dp_unit == "speaker":
        return (f"Each client's speakers are protected by speaker-level (epsilon={epsilon:.2f}, "
                f"delta={s.delta:g}) differential privacy over the whole run: the unit is one "
                f"speaker, all of that speaker's utterances in the client (Opacus DP-SGD with each "
                f"speaker's gradient clipped to norm {s.max_grad_norm:g} per step, "
                f"{s.accountant.upper()} accountant, Poisson sampling of the client's speakers); the "
                f"bound is the largest any client spent{budget}.")
    text = (f"Each client's training utterances are protected by sample-level (epsilon={epsilon:.2f}, "
            f"delta={s.delta:g}) differential privacy over the whole run: the unit is one utterance "
            f"(Opacus DP-SGD, {s.accountant.upper()} accountant, Poisson sampling of utterances, "
            f"clipping norm {s.max_grad_norm:g}); the bound is the largest any client spent{budget}.")
    if s.class_vectors == "own":
        text += (" With class-vectors=own the server also sees which speakers' class vectors each "
                 "client trained (its speakers, as FedAwS assumes the server knows); the guarantee "
                 "is for utterances given that set.")
    if group is not None and group.size > 1:
        text += (f" A speaker is a group of utterances: the speaker with the most utterances in one "
                 f"client ({group.size} utterances) is protected only at epsilon={group.epsilon:.2f} "
                 f"(delta={group.delta:g}; group-level DP-SGD bound of Ganesh 2024, arXiv:2401.10294, "
                 f"dp_accounting's PLD accountant for a mixture of Gaussians, as if that client "
                 f"trained in every round it could).")
    return text


def _backend_split(s: RunSettings) -> str:
    if s.rounds == 0:
        return ("No round trained: the epsilon above is that of the scoring back end's one release "
                "alone (each client's sum of clipped embeddings and their count, Gaussian noise "
                "added on the client, one step at sample rate 1 in its ledger).")
    releases = "one release" if s.backend_releases == 1 else f"{s.backend_releases} releases"
    scatter = (f", with backend-whiten the sum of each {s.dp_unit}'s clipped scatter of its augmented "
               "copies too" if s.backend_whiten else "")
    return (f"The run's epsilon={s.epsilon:g} is split: {s.backend_privacy:g} for the scoring back end's "
            f"{releases} (each client's sum of clipped {s.dp_unit} embeddings and their count{scatter}, Gaussian "
            f"noise added on the client, accounted as steps at sample rate 1 in the same ledger and "
            f"accountant) and {s.dpsgd_epsilon:g} for DP-SGD, whose noise is calibrated for it; the "
            f"epsilon above composes both.")
def _noise_source(s: RunSettings, simulated: bool) -> str:
    if simulated and s.seeded_noise:
        return ("The DP-SGD noise and sampling, and the back end's noise, were seeded from the run "
                "config (seeded-noise, for repeatable simulations): whoever holds the run config can "
                "regenerate them; a deployed device never seeds them.")
    return ("Each client drew its DP-SGD noise and sampling, and its back-end noise, from its "
            "operating system's entropy: "
            "nobody holding the run config can regenerate them.")


def _device_level(s: RunSettings, device_epsilon: float) -> str:
    how = (f"Flower's {s.device_dp.replace('-', '-side ', 1)} clipping wrapper, noise multiplier "
           f"{s.device_noise_multiplier:g}, clipping norm {s.device_clip_norm:g}")
    if math.isnan(device_epsilon):
        return (f"Each client's whole contribution gets device-level DP noise ({how}); epsilon is "
                "accounted only for fixed clipping around FedAvg, so no epsilon is claimed for "
                "this run.")
    if s.client_sampling == "poisson":
        sampling = f"each of {s.num_clients} devices drawn independently with probability {s.fraction_train:g} a round"
    else:
        sampling = f"{s.clients_per_round} of {s.num_clients} devices a round, drawn without replacement"
    return (f"Each device's whole contribution is protected by device-level (epsilon={device_epsilon:.2f}, "
            f"delta={s.delta:g}) differential privacy over the rounds run: the unit is one device, all "
            f"of its speakers (DP-FedAvg: {how}; {sampling}; {accountant_words(s.client_sampling, s.accountant)}).")
