"""The centralised upper bound: the same model, data and epoch budget, in one place."""

from __future__ import annotations

import copy
import time

from client.backend import backend_statistics
from fedspeaker.config import RunSettings
from fedspeaker.model.backend import (
    encoder_fingerprint,
    install_backend,
    install_saved_backend,
    mean_of_sums,
    whitening_of_scatter,
)
from fedspeaker.data.augment import augmented_examples
from fedspeaker.data.features import FeatureSpec
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.training.local import LocalTrainer, round_seed
from fedspeaker.evaluation.release import released_row
from fedspeaker.evaluation.scoring import EvaluationSet, evaluate
from fedspeaker.model.bundle import model_bundle
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.evaluation.conditions import condition_columns
from fedspeaker.reporting.run_report import RunReport, progress_line, run_summary
from fedspeaker.data.partition import client_shards


def _adapt(settings: RunSettings, model, feats, labels, ledger: PrivacyLedger, copies=None) -> dict[str, float]:
    """The scoring back end from the one party's data, released and accounted as a device's."""
    if not settings.backend:
        return {}
    sums, metrics = backend_statistics(settings, model, feats, labels, ledger,
                                       copies=copies if settings.backend_whiten else None)
    if sums is None:
        return {}
    whiten = whitening_of_scatter(sums.scatter, sums.count, len(sums.total)) if sums.scatter is not None else None
    install_backend(model, mean_of_sums(sums.total, sums.count), encoder_fingerprint(model), sums.count, whiten)
    row = {"backend_devices": 1.0}
    if "epsilon" in metrics:
        row["epsilon_max"] = row["epsilon_mean"] = float(metrics["epsilon"])
    return row


def run_central(settings: RunSettings, on_round=print) -> dict:
    """Train on the union of the client shards for rounds x local-epochs epochs.

    One row per 'round' (local-epochs epochs), so its curves line up with a federated
    run of the same settings; under DP the noise covers the whole budget, as in clients.
    """
    data = load_speaker_data(settings)
    shards = client_shards(settings)
    indices = sorted(i for shard in shards for i in shard)
    feats, labels = data.train_examples(indices)
    train_feats = feats
    if settings.augment:  # one party holding every recording: babble from all its other speakers
        train_feats, _ = augmented_examples(settings.augment, settings.augment_copies, settings.seed,
                                            FeatureSpec.of(settings), settings.feature_cache_dir,
                                            [data.split.train[i] for i in indices], labels)
    evaluation = EvaluationSet.of(data, settings)
    trainer = LocalTrainer(settings, data.n_speakers)
    ledger = PrivacyLedger(settings.accountant)
    report = RunReport(settings.out_dir_path, extra_columns=condition_columns(settings),
                       run_config=settings.to_run_config())
    started = time.monotonic()
    adapted = _adapt(settings, trainer.model, feats, labels, ledger, train_feats)
    scores = evaluate(trainer.model, evaluation)
    row = {"round": 0, **scores, **adapted, "round_seconds": time.monotonic() - started,
           "seconds": time.monotonic() - started}  # the starting model
    # release=best: the best round's weights so far, with that round's own back end
    released = copy.deepcopy((trainer.model.state_dict(), trainer.model.backend.to_dict()))
    if settings.rounds:  # training changes the weights in place: the back end is theirs no more
        trainer.model.backend.clear()
    report.add_round(row)
    on_round(progress_line(row))
    for epoch_round in range(1, settings.rounds + 1):
        round_started = time.monotonic()
        loss = trainer.train(train_feats, labels, ledger, seed=round_seed(settings.seed, 0, epoch_round),
                             seeded_noise=settings.seeded_noise,
                             planned_epochs=settings.rounds * settings.local_epochs)
        train_seconds = time.monotonic() - round_started
        adapted = _adapt(settings, trainer.model, feats, labels, ledger, train_feats) if epoch_round == settings.rounds else {}
        scores = evaluate(trainer.model, evaluation)
        eps = ledger.epsilon(settings.delta) if settings.dp else float("nan")
        now = time.monotonic()
        row = {"round": epoch_round, **scores, "epsilon_max": eps, "epsilon_mean": eps,
               "train_loss": loss, "clients": 1, "client_train_seconds": train_seconds,
               "round_seconds": now - round_started, "seconds": now - started, **adapted}
        report.add_round(row)
        on_round(progress_line(row))
        if released_row(report.rows, settings.release) is row:
            released = copy.deepcopy((trainer.model.state_dict(), trainer.model.backend.to_dict()))
    trainer.model.load_state_dict(released[0])
    if released[1]:  # loading other weights dropped the last round's back end: the released round's
        install_saved_backend(trainer.model, released[1])
    scores = evaluate(trainer.model, evaluation)
    summary = run_summary(settings, data, report.rows, time.monotonic() - started, mode="central",
                          evaluation=evaluation)
    report.finish(summary, model_bundle(settings, data.split.speakers, trainer.model, scores, evaluation))
    return summary
