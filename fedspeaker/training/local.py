"""One party's training: plain or DP-SGD, used by each client and by `central`.

Under DP-SGD the unit protected is one utterance (dp-unit=utterance: one Opacus sample
is one utterance crop) or one speaker (dp-unit=speaker: one Opacus sample is one speaker,
a fixed number of random windows of it, its loss averaged over them, its gradient
clipped as a whole; the ledger then counts speakers)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from fedspeaker.config import RunSettings
from fedspeaker.errors import ConfigError, FedSpeakerError
from fedspeaker.model import build_model
from fedspeaker.privacy.dpsgd import calibrate_noise, dp_sgd
from fedspeaker.privacy.ledger import DPSteps, PrivacyLedger
from fedspeaker.privacy.noise import noise_generator
from fedspeaker.training.loops import (
    PerSpeaker,
    fold_per_speaker,
    make_loader,
    per_speaker_loss,
    train_epochs,
    windows_per_speaker,
)


def dp_plan(settings: RunSettings, n_examples: int, *, epochs: int | None = None,
            planned_epochs: int | None = None, step_fraction: float = 1.0,
            speakers: int | None = None) -> DPSteps:
    """One party's DP-SGD for one ``train`` call on ``n_examples`` utterances (of
    ``speakers`` speakers): noise multiplier, Poisson sample rate and steps, over the unit
    the run protects (utterances, or under dp-unit=speaker, speakers).

    Args:
        epochs: passes over the data (default: the run's local epochs).
        planned_epochs: the noise keeps this many epochs within the target epsilon
            (default: the rounds the party is expected to train, ``planned_rounds``).
        step_fraction: < 1 stops after that share of the steps, as a slow device would.
        speakers: the party's speakers; needed under dp-unit=speaker, whose steps and
            sample rate count speakers.
    """
    s = settings
    epochs = epochs or s.local_epochs
    units = n_examples
    if s.dp and s.dp_unit == "speaker":
        if speakers is None:
            raise ConfigError("dp-unit=speaker: the DP-SGD plan counts speakers, and this caller gave "
                              "only the number of utterances (pass speakers=...); the privacy budget "
                              "check (epsilon-budget) needs it")
        units = speakers
    batches = math.ceil(units / min(s.batch_size, units))
    steps = epochs * batches
    if step_fraction < 1:
        steps = min(steps, max(1, math.ceil(step_fraction * steps)))
    sample_rate = 1 / batches  # what Opacus's Poisson loader uses
    noise = 0.0
    if s.dp:
        noise = s.noise_multiplier or calibrate_noise(
            s.dpsgd_epsilon, s.delta, sample_rate, planned_epochs or planned_rounds(s) * s.local_epochs,
            s.accountant)
    return DPSteps(noise, sample_rate, steps)


def planned_rounds(settings: RunSettings) -> int:
    """The rounds a client's DP-SGD noise is calibrated for: every round where every
    client trains every round; under client sampling, the rounds it is expected to be
    drawn in plus ``plan-margin`` standard deviations (a binomial count over the run),
    so that its noise is not that of ~1/fraction as many steps as it takes. A client
    drawn more often sits out once its next round would pass the target (``spend_cap``).
    SecAgg+ rounds cannot take a reply without weights: they plan for every round."""
    s = settings
    share = s.clients_per_round / s.num_clients if s.client_sampling == "fixed" else s.fraction_train
    if share >= 1 or s.secagg:
        return s.rounds
    expected = s.rounds * share
    spread = math.sqrt(s.rounds * share * (1 - share))
    return min(s.rounds, max(1, math.ceil(expected + s.plan_margin * spread)))


def spend_cap(settings: RunSettings) -> float:
    """The epsilon a client never passes in a run (0: none enforced): ``epsilon-budget``,
    else, where its noise is planned for fewer rounds than the run has, the target."""
    s = settings
    if s.epsilon_budget:
        return s.epsilon_budget
    planned_for_fewer = s.dp and not s.noise_multiplier and planned_rounds(s) < s.rounds
    return s.epsilon if planned_for_fewer else 0.0


def round_seed(seed: int, party: int, server_round: int) -> int:
    """One seed per party (client) and round: its crops, in a simulated attack its
    noise, and where the simulation keeps seeded noise its DP noise, all repeat with the
    run's seed."""
    return seed * 1_000_003 + party * 1_009 + server_round


class LocalTrainer:
    def __init__(self, settings: RunSettings, n_speakers: int) -> None:
        self.settings = settings
        self.model = build_model(settings, n_speakers)
        # class-vectors=own: where a client is not sent one of its own rows, it starts from
        # the run's seeded initial head (the same on every party), never from its data
        self.initial_class_vectors = (self.model.head.weight.detach().clone()
                                      if settings.class_vectors == "own" else None)

    def train(self, feats: list[torch.Tensor], labels: list[int], ledger: PrivacyLedger, *,
              seed: int, seeded_noise: bool = False, epochs: int | None = None,
              planned_epochs: int | None = None, proximal_mu: float = 0.0,
              step_fraction: float = 1.0) -> float:
        """Train ``self.model`` in place; return the mean training loss.

        Args:
            feats, labels: this party's utterances (features) and their speaker labels.
            ledger: this party's privacy ledger; under DP it gains this call's steps.
            seed: seeds the crops and the batches of this call.
            seeded_noise: DP noise and Poisson sampling from ``seed`` too (a simulation's
                bit-exact repeats); by default from the operating system's entropy, so
                that nobody holding the run config can regenerate them.
            epochs: passes over the data (default: the run's local epochs).
            planned_epochs: under DP, the noise is calibrated so that this many epochs
                stay within the target epsilon (default: every round of the run).
            proximal_mu: > 0 adds FedProx's pull towards the starting (global) weights.
            step_fraction: < 1 stops after that share of the steps, as a slow device would.
        """
        s = self.settings
        epochs = epochs or s.local_epochs
        torch.default_generator.manual_seed(seed)  # the CPU's alone, as build_model does
        self.model.train()  # evaluation in between rounds leaves it in eval mode
        per_speaker = s.dp and s.dp_unit == "speaker"
        own = s.class_vectors == "own"
        model_loss = self.model.positive_loss if own else self.model.loss
        speakers = len(set(labels))
        windows = windows_per_speaker(speakers, s.batch_size) if per_speaker else 0
        loader = make_loader(feats, labels, self.model.train_frames, s.batch_size, seed, windows=windows)
        groups = self._parameter_groups()
        if s.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=s.lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(groups, lr=s.lr)
        after_step = _in_turn(self._proximal_step(proximal_mu) if proximal_mu > 0 else None,
                              self._keep_others_class_vectors(labels) if own else None)
        plan = dp_plan(self.settings, len(feats), epochs=epochs, planned_epochs=planned_epochs,
                       step_fraction=step_fraction, speakers=speakers)
        max_steps = None if step_fraction >= 1 else plan.steps
        model, loss_fn, after_backward = self.model, model_loss, None
        if per_speaker:  # one Opacus sample = one speaker's windows, clipped together (hooks, not ghost)
            model, loss_fn = PerSpeaker(self.model, windows), per_speaker_loss(model_loss, windows)
            after_backward = fold_per_speaker([p for p in self.model.parameters() if p.requires_grad], windows)
        run = dict(after_step=after_step, max_steps=max_steps, after_backward=after_backward)
        if not s.dp:
            loss = train_epochs(model, loader, optimizer, epochs, loss_fn=loss_fn, **run)
        else:
            with dp_sgd(model, optimizer, loader, loss_fn, ledger=ledger, unit=s.dp_unit,
                        noise_multiplier=plan.noise_multiplier, max_grad_norm=s.max_grad_norm,
                        generator=noise_generator(seed if seeded_noise else None)) as private:
                loss = train_epochs(private.model, private.loader, private.optimizer, epochs,
                                    loss_fn=private.loss_fn, **run)
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FedSpeakerError("local training diverged (NaN or infinite weights); lower the "
                                  "learning rate (--set lr=...)")
        return loss

    def _parameter_groups(self) -> list[dict]:
        """The classifier head at ``head-lr`` (when set), everything else at ``lr``: a
        pretrained embedding wants gentle steps, a new head larger ones."""
        head = [p for name, p in self.model.named_parameters() if name.startswith("head.")]
        rest = [p for name, p in self.model.named_parameters() if not name.startswith("head.")]
        if not self.settings.head_lr:
            return [{"params": head + rest}]
        return [{"params": rest}, {"params": head, "lr": self.settings.head_lr}]

    def _keep_others_class_vectors(self, labels: list[int]) -> Callable[[], None]:
        """class-vectors=own: own rows the server did not send (zero) start from the
        seeded initial head; after each step, every class vector but this party's own
        speakers' goes back to what the server sent. Their gradient is zero under the
        positive-only loss; under DP-SGD this drops the noise Opacus added to them (what is
        released is then a function of the noisy step, so the guarantee holds)."""
        weight = self.model.head.weight
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[sorted(set(labels))] = False
        with torch.no_grad():
            not_sent = ~others & (weight.norm(dim=1) == 0)
            weight[not_sent] = self.initial_class_vectors[not_sent]
        sent = weight.detach()[others].clone()

        @torch.no_grad()
        def step() -> None:
            weight[others] = sent

        return step

    def _proximal_step(self, mu: float) -> Callable[[], None]:
        """FedProx's term (mu/2)||w - w_global||^2, applied as its own gradient step.

        Applied after the optimizer step rather than through the loss, so that under
        DP-SGD it is neither clipped nor noised (it depends on no data) and Opacus's
        per-sample gradients stay those of the data loss alone.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params]
        lr = self.settings.lr

        @torch.no_grad()
        def step() -> None:
            for p, a in zip(params, anchor):
                p.sub_(lr * mu * (p - a))

        return step


def _in_turn(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """One callback running the given ones in order; None when none is given."""
    given = [step for step in steps if step is not None]
    if not given:
        return None

    def run() -> None:
        for step in given:
            step()

    return run
