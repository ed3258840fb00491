"""Flower strategies by name, and the wrappers around them: the one place a new
strategy is added and the run's strategy is put together."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedspeaker.config import RunSettings
from fedspeaker import wire
from server.client_metrics import train_metrics
from server.device_dp import DeviceDP
from server.device_eval import CohortFn, CountsFn, DeviceEvaluation
from server.fedaws import OwnClassVectors
from server.outcomes import RoundOutcome, round_outcome, row_counts
# ClientSampling and DeviceDP are also here for checkpoints written before each piece
# kept its own state (ad8df77 and earlier): they pickled them under server.strategies
from server.sampling import ClientSampling, DrawnGrid
from server.screening import in_content_order, screen

# round, replies, their nodes, and the train metrics made of them
ReplyObserver = Callable[[int, list[RecordDict], list[int], MetricRecord], None]
TrainMetricsFn = Callable[[list[RecordDict], str], MetricRecord]  # Flower's train_metrics_aggr_fn
OutcomeObserver = Callable[[int, RoundOutcome], None]


def build_strategy(settings: RunSettings, on_replies: ReplyObserver | None = None,
                   on_outcome: OutcomeObserver | None = None, *, cohort: CohortFn | None = None,
                   on_counts: CountsFn | None = None, round_offset: int = 0) -> Strategy:
    """The run's strategy: Flower's strategy by name, weighted by examples, evaluated on
    the server, in the wrappers the run asks for (the one place they are put together),
    from the inside out: Flower's device-level DP, FedAwS (server/fedaws.py), the
    ScreenedStrategy, the devices' own evaluation (server/device_eval.py).

    Each strategy's own hyperparameters come from the run config; a server learning
    rate of 0 keeps the strategy's own default (FedAvgM 1.0, FedAdam and FedAdagrad
    0.1, FedYogi 0.01). ``cohort`` and ``on_counts`` serve the devices' evaluation
    (fraction-evaluate > 0); ``round_offset``: rounds done before a resume.
    """
    s = settings
    common: dict[str, Any] = dict(
        # ScreenedStrategy draws each round's training clients (seeded, fixed or Poisson)
        # and shows the strategy only those, so the strategy takes every one it is shown
        fraction_train=1.0,
        fraction_evaluate=s.fraction_evaluate,  # devices scoring it on their own held-out audio
        min_train_nodes=1,
        min_available_nodes=1,  # ScreenedStrategy waits for num-clients before it draws
        # under device-level DP every client counts the same, as its analysis assumes
        weighted_by_key=wire.NUM_EXAMPLES if s.device_dp == "off" else wire.UNIT_WEIGHT,
    )
    server_lr = {"eta": s.server_lr} if s.server_lr else {}
    fedopt = dict(common, eta_l=s.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **server_lr)
    strategies: dict[str, Callable[[], Strategy]] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=s.proximal_mu),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=s.server_lr or 1.0,
                                   server_momentum=s.server_momentum),
        "fedadam": lambda: FedAdam(**fedopt),
        "fedyogi": lambda: FedYogi(**fedopt),
        "fedadagrad": lambda: FedAdagrad(**{k: v for k, v in fedopt.items()
                                            if k not in ("beta_1", "beta_2")}),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=s.trim_fraction),
        "krum": lambda: Krum(**common, num_malicious_nodes=s.num_malicious),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=s.num_malicious,
                                       num_nodes_to_select=s.krum_select),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=s.num_malicious),
        "qfedavg": lambda: QFedAvg(client_learning_rate=s.lr, q=s.q, train_loss_key=wire.TRAIN_LOSS,
                                   **common),
    }
    wrapped = with_device_dp(strategies[s.strategy](), s)
    if s.class_vectors == "own":
        wrapped = OwnClassVectors(wrapped, ceiling=s.spreadout_cosine, timeout=s.round_timeout)
    strategy: Strategy = ScreenedStrategy(
        wrapped, on_replies, drop_unchanged=s.device_dp.startswith("server"), sampling=ClientSampling.of(s),
        device_dp=DeviceDP.of(s, wrapped), on_outcome=on_outcome, round_offset=round_offset,
        weighted_by_key=common["weighted_by_key"])
    if s.fraction_evaluate:  # devices also score the model on their own audio
        if cohort is None or on_counts is None:
            raise ValueError("fraction-evaluate > 0: the devices' evaluation needs cohort and on_counts")
        strategy = DeviceEvaluation(strategy, cohort=cohort, on_counts=on_counts)
    return strategy


def with_device_dp(strategy: Strategy, s: RunSettings) -> Strategy:
    """Wrap in Flower's device-level DP strategy the run asks for (or none).

    Flower's wrappers clip and add the noise. The epsilon is fedspeaker's (DeviceDP, for
    fixed clipping around FedAvg, crediting the sampling done), not Flower's accountant,
    which claims no amplification by sampling. Adaptive clipping is accounted by no one.
    """
    if s.device_dp == "off":
        return strategy
    noise, clients = s.device_noise_multiplier, expected_clients(s)
    if s.device_dp in ("server-fixed", "client-fixed"):
        wrapper = (DifferentialPrivacyServerSideFixedClipping if s.device_dp == "server-fixed"
                   else DifferentialPrivacyClientSideFixedClipping)
        return wrapper(strategy, noise, s.device_clip_norm, clients)
    wrapper = (DifferentialPrivacyServerSideAdaptiveClipping if s.device_dp == "server-adaptive"
               else DifferentialPrivacyClientSideAdaptiveClipping)
    # Flower's default noise on the clipped count (clients / 20) must exceed half the
    # noise multiplier; take at least the noise multiplier itself
    return wrapper(strategy, noise, clients, initial_clipping_norm=s.device_clip_norm,
                   clipped_count_stddev=max(clients / 20, noise))


def expected_clients(s: RunSettings) -> int:
    """Clients a round trains: Flower's rule for a fixed number, the expected number (at
    least 1) under Poisson sampling. Flower's DP wrappers divide their noise by it."""
    if s.client_sampling == "poisson":
        return max(1, round(s.num_clients * s.fraction_train))
    return s.clients_per_round


def device_dp_of(strategy: Strategy | None) -> DeviceDP | None:
    """The run's device-level DP (held by the ScreenedStrategy under its wrappers), if any."""
    while strategy is not None and not isinstance(strategy, ScreenedStrategy):
        strategy = getattr(strategy, "strategy", None)
    return strategy.device_dp if strategy is not None else None


def device_epsilon_of(strategy: Strategy | None) -> float:
    """Device-level epsilon so far, for the sampling done; NaN where nothing is accounted."""
    device_dp = device_dp_of(strategy)
    return device_dp.epsilon() if device_dp is not None else math.nan


class ScreenedStrategy(Strategy):
    """Wraps a strategy: each round's training clients are drawn here (``sampling``; the
    wrapped strategy sees only those), their replies are put in content order and
    screened (server/screening.py), and under device-level DP the round is released and
    accounted (``device_dp``, server/device_dp.py).

    The round's train metrics are ``train_metrics_aggr_fn`` (Flower's hook) over every
    reply received, where a strategy's own hook sees only those it selects (Krum,
    Bulyan) and none without weights: a client's privacy spend and upload count whether
    or not it was selected. With them, who trained and why the others did not
    (server/outcomes.py). They go to ``on_replies`` with the replies, and to Flower as
    the round's train metrics (the wrapped strategy's are not used); the outcome itself
    goes to ``on_outcome``.

    Args:
        strategy: the strategy that aggregates what is kept.
        on_replies: sees every reply of a round, the node that sent each, and the
            round's train metrics.
        drop_unchanged: leave out updates that did not change the model (Flower's
            server-side clipping divides by the change).
        sampling: draws each round's clients; None: the wrapped strategy samples, as
            Flower's do.
        device_dp: releases and accounts the rounds under device-level DP.
        on_outcome: sees who trained in each round.
        round_offset: rounds done before a resume (Flower counts from 1 again).
        train_metrics_aggr_fn: Flower's train-metrics hook, called with every reply
            (server/client_metrics.py's by default).
        weighted_by_key: the metric that weights a client's update, for that hook.
    """

    def __init__(self, strategy: Strategy, on_replies: ReplyObserver | None = None,
                 drop_unchanged: bool = False, *, sampling: ClientSampling | None = None,
                 device_dp: DeviceDP | None = None, on_outcome: OutcomeObserver | None = None,
                 round_offset: int = 0, train_metrics_aggr_fn: TrainMetricsFn = train_metrics,
                 weighted_by_key: str = wire.NUM_EXAMPLES) -> None:
        super().__init__()
        self.strategy = strategy
        self.on_replies = on_replies
        self.on_outcome = on_outcome
        self.drop_unchanged = drop_unchanged
        self.sampling = sampling
        self.device_dp = device_dp
        self.round_offset = round_offset
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.weighted_by_key = weighted_by_key
        # within a round only: the train messages sent, the arrays sent, (sampled, connected)
        self.asked = 0
        self.sent: ArrayRecord | None = None
        self.drawn: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """What it carries from round to round: the nodes' partitions and the releases."""
        return {**(self.sampling.state_dict() if self.sampling else {}),
                **(self.device_dp.state_dict() if self.device_dp else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.sampling:
            self.sampling.load_state_dict(state)
        if self.device_dp:
            self.device_dp.load_state_dict(state)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        server_round += self.round_offset
        if self.sampling is None:
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        else:
            nodes, connected = self.sampling.draw(grid, server_round)
            self.drawn = (len(nodes), connected)
            # a Poisson draw can be empty; under device-level DP it still releases
            messages = list(self.strategy.configure_train(server_round, arrays, config, DrawnGrid(grid, nodes))
                            ) if nodes else []
        self.asked = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord]:
        server_round += self.round_offset
        replies = in_content_order(replies)
        kept, dropped = screen(replies, self.sent, drop_unchanged=self.drop_unchanged,
                               server_round=server_round)
        outcome = round_outcome(self.asked, replies, dropped)
        answered = [r for r in replies if r.has_content()]
        contents = [r.content for r in answered]
        metrics = MetricRecord({**self.train_metrics_aggr_fn(contents, self.weighted_by_key),
                                **row_counts(outcome)})
        if self.on_replies:
            self.on_replies(server_round, contents, [r.metadata.src_node_id for r in answered], metrics)
        if self.on_outcome:
            self.on_outcome(server_round, outcome)
        sent, drawn, self.sent, self.drawn = self.sent, self.drawn, None, None
        if self.device_dp is None or drawn is None or sent is None:
            if drawn is not None and drawn[0] == 0:
                return None, metrics  # nobody was drawn: the model stays
            arrays, _ = self.strategy.aggregate_train(server_round, kept)
        else:
            arrays, _ = self.device_dp.release(self.strategy, server_round, kept, sent, drawn)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.round_offset, replies)
