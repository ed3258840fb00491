"""One typed place for every run setting.

Flower hands apps a flat run config (``[tool.flwr.app.config]`` in pyproject.toml,
overridden by ``--run-config``); the CLI builds the same dict from its flags. Both
go through :func:`RunSettings.from_run_config`, so a bad value gets one clear
message naming the option, whichever way it came in.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import warnings
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from fedspeaker.errors import ConfigError
from fedspeaker.recipes import parse_conditions, parse_families

CORPUS_NAME = "dspspeech20-mini"

MODELS = ("ge2e", "tdnn")
SCORE_NORMS = ("none", "s-norm")
PARTITIONS = ("iid", "dirichlet", "pathological", "natural", "power-law")
FEATURES = ("fbank", "mfcc")
ACCOUNTANTS = ("rdp", "prv")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
              "fedtrimmedavg", "krum", "multikrum", "bulyan", "qfedavg")
OPTIMIZERS = ("adam", "sgd")
DEVICE_DP = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
ATTACKS = ("sign-flip", "scale", "noise", "label-flip")
DROPOUT_MODES = ("raise", "silent")
DP_UNITS = ("utterance", "speaker")
CLIENT_SAMPLINGS = ("fixed", "poisson")
CLASS_VECTORS = ("shared", "own")
RELEASES = ("best", "last")
TDNN_ONLY = ("features", "n_mels", "crop_frames", "channels", "embedding_dim")  # fields the GE2E model ignores


@dataclass(frozen=True)
class RunSettings:
    """Settings of one run; field names are the run-config keys with '-' for '_'.

    A field's trailing comment is its help in docs/configuration.md; a comment line above
    fields, capitalised, opens a section there. After a change, regenerate the reference:
    ``.venv/bin/python -m fedspeaker.cli.reference`` (tests/test_docs.py checks it).
    """

    # Data
    data_dir: str = ""  # empty: the bundled corpus
    cache_dir: str = ""  # empty: $FEDSPEAKER_CACHE or ~/.cache/fedspeaker
    seed: int = 0  # the speaker split, client shards, initial model and scenario roles
    unseen_speakers: int = 0  # 0: a quarter of the speakers, at least 2
    test_fraction: float = 0.2  # share of a training speaker's utterances held out
    # Model: the pretrained GE2E encoder fine-tuned at the top, or a TDNN from scratch
    model: str = "ge2e"  # ge2e: the pretrained encoder; tdnn: the from-scratch network
    margin: float = 0.2  # GE2E: additive angular margin of the AAM-softmax loss (radians)
    scale: float = 30.0  # GE2E: scale of the cosine logits
    # GE2E: which class vectors a device trains against. shared: every training speaker's
    # (AAM-softmax, the others as negatives); own: only its own speakers' (FedAwS: a
    # positive-only loss on the device, the server spreading the class vectors apart)
    class_vectors: str = "shared"  # shared, or own (FedAwS)
    spreadout_cosine: float = 0.0  # own: the server pushes apart class vectors above this cosine
    # TDNN only: its features and size
    features: str = "fbank"  # Kaldi-compatible log-mel filterbanks, or MFCCs
    n_mels: int = 40  # mel bands
    crop_frames: int = 200  # frames in a training crop (10 ms each)
    channels: int = 128  # width of the TDNN's layers
    embedding_dim: int = 128  # size of the speaker embedding
    # Evaluation (verification trials on unseen speakers)
    max_trials: int = 0  # 0: every pair of unseen-speaker utterances; N: a seeded sample of N
    trial_list: str = ""  # a VoxCeleb-format list (label enrol test), paths under data-dir
    score_norm: str = "none"  # "s-norm": adaptive s-norm against training-speaker embeddings
    cohort_top: int = 100  # s-norm: the closest cohort scores each side is normalised by
    # degraded trials: the same trials with the test side degraded (evaluation/conditions.py):
    # "standard", or conditions such as babble5, white5, room0.3-0.9, room0.3-0.9+babble10
    test_conditions: str = ""
    # Decisions on a device: a voiceprint of enrol-recordings recordings against one; the
    # threshold meets operating-point ("eer" or "far:X") on validation trials
    operating_point: str = "far:0.01"  # far:X, at most a share X of false accepts; or eer
    enrol_recordings: int = 3  # recordings in a voiceprint
    release: str = "best"  # the model saved: the best round by validation, or the last
    # Evaluation on the devices, without central data (Flower's evaluate messages)
    fraction_evaluate: float = 0.0  # share of clients that score the model each round; 0: none
    cohort_size: int = 200  # impostor embeddings the server sends them (from its public cohort)
    # Federation
    strategy: str = "fedavg"  # one of Flower's strategies (flwr.serverapp.strategy)
    num_clients: int = 10  # clients the server waits for (Flower's local federation: 10 SuperNodes)
    rounds: int = 10  # 0: score the starting model (and its back end) only
    fraction_train: float = 1.0  # share of the clients sampled each round
    client_sampling: str = "fixed"  # fixed: that share, drawn without replacement (Flower's);
    # poisson: each client independently with probability fraction-train
    min_train_nodes: int = 1  # sample at least this many, whatever fraction-train says
    # Strategy hyperparameters (server/strategies.py says which strategy reads which)
    server_lr: float = 0.0  # 0: the strategy's own default
    server_momentum: float = 0.9  # fedavgm
    beta_1: float = 0.9  # fedadam, fedyogi
    beta_2: float = 0.99  # fedadam, fedyogi
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity
    proximal_mu: float = 0.01  # fedprox: the proximal term's weight
    trim_fraction: float = 0.2  # fedtrimmedavg: share cut at each end
    num_malicious: int = 0  # krum, multikrum, bulyan: attackers to tolerate
    krum_select: int = 1  # multikrum: updates kept
    q: float = 0.1  # qfedavg: fairness exponent
    # Scenarios (simulation only; client/scenarios.py)
    dropout: float = 0.0  # probability that a sampled client fails a round
    dropout_mode: str = "raise"  # raise: it fails; silent: it never answers in time
    round_timeout: float = 3600.0  # seconds the server waits for replies in a round
    straggler_fraction: float = 0.0  # share of clients that complete only straggler-steps
    straggler_steps: float = 0.25  # share of its local steps a straggler completes
    byzantine_fraction: float = 0.0  # share of clients that send poisoned updates
    attack: str = "sign-flip"  # what a byzantine client sends
    attack_scale: float = 10.0  # scale and noise attacks: how large
    partition: str = "dirichlet"  # how training utterances are split across clients
    alpha: float = 0.5  # dirichlet partition: concentration; smaller is more skewed
    speakers_per_client: int = 2  # pathological partition: speakers a client gets
    household_size: int = 1  # natural partition: speakers per device (1: one owner each)
    size_exponent: float = 1.0  # power-law partition: client k of n holds a share ~ k^-exponent
    # Local training
    local_epochs: int = 1  # a client's epochs over its data per round
    batch_size: int = 64  # expected batch (Poisson sampling under DP)
    optimizer: str = "sgd"  # momentum 0.9; under DP noise it learns where Adam stalls
    lr: float = 0.02  # learning rate (of the projection, for the pretrained encoder)
    head_lr: float = 1.0  # the classifier head's learning rate; 0: the same as lr
    # on-device augmentation (data/augment.py): "" (none), "standard" (babble, noise, room),
    # or families of babble, white, pink, brown, noise, room; augment-copies degraded copies
    # of each recording, made once, one of them (or the clean one) drawn for each example
    augment: str = ""
    augment_copies: int = 4
    # Differential privacy (sample level, Opacus DP-SGD)
    dp: bool = True  # DP-SGD in every client
    epsilon: float = 8.0  # target over the whole run; used when noise_multiplier is 0
    epsilon_budget: float = 0.0  # > 0: a client sits out a round that would take it past this
    # under client sampling, a client's noise is calibrated for the rounds it is expected to
    # train plus this many standard deviations; drawn more often, it sits out at the target
    plan_margin: float = 0.0
    delta: float = 1e-5  # DP delta
    noise_multiplier: float = 0.0  # > 0: this noise, instead of a target epsilon
    max_grad_norm: float = 1.0  # per-sample (or per-speaker) clipping norm
    accountant: str = "rdp"  # Opacus's accountant
    dp_unit: str = "utterance"  # what DP-SGD protects: one utterance, or one speaker's utterances
    # Scoring back end: the devices' in-domain mean embedding, asked for at round 0 and
    # after the last round, subtracted before cosine scoring (fedspeaker/model/backend.py)
    backend: bool = True  # compute and apply the back end
    backend_epsilon: float = 0.0  # under DP (sample- or device-level), the epsilon the back end's releases are calibrated to; 0: epsilon/8
    # the devices also release the scatter of their recordings' augmented copies (augment),
    # and the back end whitens it away: degradation's directions shrunk before cosine scoring
    backend_whiten: bool = False
    # simulation only: DP noise and sampling seeded from `seed`, so a run repeats bit for bit
    # (and the server could regenerate them); a deployed device always draws them from the
    # operating system's entropy, whatever this says
    seeded_noise: bool = True
    # Differential privacy (device level: all of a device's data; Flower's DP wrappers)
    device_dp: str = "off"  # where updates are clipped (server/client), fixed or adaptive norm
    device_noise_multiplier: float = 1.0  # noise std relative to device-clip-norm
    device_clip_norm: float = 1.0  # the fixed norm, or the adaptive one's starting value
    # Secure aggregation (Flower's SecAgg+): the server learns only the sum of the updates
    secagg: bool = False  # every round through SecAgg+
    secagg_shares: float = 1.0  # share of the sampled clients a client's key is split among
    secagg_threshold: float = 0.67  # share of those shares needed to rebuild a dropped client's mask
    # Deployment: the operator's ed25519 signature of the app bundle this run ships to the
    # devices (`fedspeaker sign-app`); a device checks it before it runs any of the app's code
    fab_signature: str = ""  # the signature `fedspeaker sign-app` prints
    # Output
    out_dir: str = ""  # the run's folder; empty: runs/<date-time>
    resume: bool = False  # go on from out-dir's checkpoint.pt, after the last finished round

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> "RunSettings":
        """Build settings from a Flower run config, rejecting unknown keys and bad values."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in current_options(config).items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"unknown run-config option '{key}'; known options: "
                    + ", ".join(sorted(n.replace("_", "-") for n in known))
                )
            values[name] = _coerce(key, raw, known[name].type)
        settings = cls(**values)
        settings.validate()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """The flat dict Flower carries to every app of the run."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunSettings":
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Every rule of every option, each checked here once: by concern, then the warning."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        self._validate_data()
        self._validate_model()
        self._validate_evaluation()
        self._validate_federation()
        self._validate_scenarios()
        self._validate_training()
        self._validate_privacy()
        self._validate_output()
        ignored = [name.replace("_", "-") for name in TDNN_ONLY if getattr(self, name) != getattr(RunSettings, name)]
        if self.model != "tdnn" and ignored:  # a warning, not an error: older run configs set them
            _warn_once(f"model={self.model} ignores {', '.join(ignored)}: they shape only the TDNN (model=tdnn)")

    def _validate_data(self) -> None:
        _at_least("unseen-speakers", self.unseen_speakers, 0)
        _open_unit("test-fraction", self.test_fraction)

    def _validate_model(self) -> None:
        _choice("model", self.model, MODELS)
        _at_least("margin", self.margin, 0.0)
        if self.margin >= math.pi / 2:
            raise ConfigError(f"margin must be below pi/2 radians, got {self.margin}")
        _positive("scale", self.scale)
        _choice("class-vectors", self.class_vectors, CLASS_VECTORS)
        if not -1.0 <= self.spreadout_cosine <= 1.0:
            raise ConfigError(f"spreadout-cosine must be in [-1, 1], got {self.spreadout_cosine}")
        if self.class_vectors == "own" and (self.model != "ge2e" or self.device_dp != "off" or self.secagg
                                            or (self.dp and self.dp_unit == "speaker")):
            raise ConfigError("class-vectors=own (FedAwS) needs model=ge2e; the server sees which "
                              "speakers' class vectors each client trained, so not with device-dp, "
                              "secagg or dp-unit=speaker, whose guarantees would hide that")
        _choice("features", self.features, FEATURES)
        _at_least("n-mels", self.n_mels, 8)
        _at_least("crop-frames", self.crop_frames, 20)
        _at_least("channels", self.channels, 4)
        _at_least("embedding-dim", self.embedding_dim, 2)

    def _validate_evaluation(self) -> None:
        _at_least("max-trials", self.max_trials, 0)
        _choice("score-norm", self.score_norm, SCORE_NORMS)
        _at_least("cohort-top", self.cohort_top, 2)
        parse_conditions(self.test_conditions)
        operating_far(self.operating_point)
        _at_least("enrol-recordings", self.enrol_recordings, 1)
        _choice("release", self.release, RELEASES)
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        _at_least("cohort-size", self.cohort_size, 1)

    def _validate_federation(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _at_least("num-clients", self.num_clients, 1)
        _at_least("rounds", self.rounds, 0)  # 0: the starting model (and its back end) only
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        _choice("client-sampling", self.client_sampling, CLIENT_SAMPLINGS)
        _at_least("min-train-nodes", self.min_train_nodes, 1)
        if self.min_train_nodes > self.num_clients:
            raise ConfigError(f"min-train-nodes ({self.min_train_nodes}) is more than num-clients "
                              f"({self.num_clients}): the server would wait forever")
        if self.client_sampling == "poisson" and (self.secagg or self.min_train_nodes > 1):
            raise ConfigError("client-sampling=poisson draws each client independently (and may "
                              "draw none): it cannot hold min-train-nodes above 1, and the secagg "
                              "workflow samples in its own way")
        for key in ("server-lr", "server-momentum", "tau", "proximal-mu", "num-malicious", "q"):
            _at_least(key, getattr(self, key.replace("-", "_")), 0)
        for key in ("beta-1", "beta-2"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key.replace('-', '_'))}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        _at_least("krum-select", self.krum_select, 1)

    def _validate_scenarios(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _choice("dropout-mode", self.dropout_mode, DROPOUT_MODES)
        _positive("round-timeout", self.round_timeout)
        for key in ("straggler-fraction", "byzantine-fraction"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key.replace('-', '_'))}")
        if not 0.0 < self.straggler_steps <= 1.0:
            raise ConfigError(f"straggler-steps must be in (0, 1], got {self.straggler_steps}")
        _choice("attack", self.attack, ATTACKS)
        _positive("attack-scale", self.attack_scale)
        _choice("partition", self.partition, PARTITIONS)
        _positive("alpha", self.alpha)
        _at_least("speakers-per-client", self.speakers_per_client, 1)
        _at_least("household-size", self.household_size, 1)
        _at_least("size-exponent", self.size_exponent, 0.0)

    def _validate_training(self) -> None:
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("lr", self.lr)
        _at_least("head-lr", self.head_lr, 0.0)
        parse_families(self.augment)
        _at_least("augment-copies", self.augment_copies, 1)

    def _validate_privacy(self) -> None:
        _at_least("noise-multiplier", self.noise_multiplier, 0.0)
        if self.dp and self.noise_multiplier and self.epsilon != RunSettings.epsilon:
            raise ConfigError(f"give either noise-multiplier ({self.noise_multiplier:g}: DP-SGD's noise, "
                              f"fixed) or epsilon ({self.epsilon:g}: the target its noise is calibrated "
                              "to), not both; the back end's share is backend-epsilon")
        # epsilon: DP-SGD's target and, unless backend-epsilon is set, the back end's share of it
        if self.dp or (self.backend and self.device_dp != "off" and not self.backend_epsilon):
            _positive("epsilon", self.epsilon)
        _at_least("epsilon-budget", self.epsilon_budget, 0.0)
        _at_least("plan-margin", self.plan_margin, 0.0)
        _open_unit("delta", self.delta)
        _positive("max-grad-norm", self.max_grad_norm)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _choice("dp-unit", self.dp_unit, DP_UNITS)
        _at_least("backend-epsilon", self.backend_epsilon, 0.0)
        if self.backend and self.dp and self.noise_multiplier == 0.0 and self.backend_epsilon >= self.epsilon:
            raise ConfigError(f"backend-epsilon ({self.backend_epsilon:g}) must be below epsilon "
                              f"({self.epsilon:g}): the rest is DP-SGD's")
        if self.backend_whiten and not (self.backend and self.augment and self.device_dp == "off"):
            raise ConfigError("backend-whiten whitens the scatter of each device's augmented copies: "
                              "it needs backend=true and augment, and not device-dp (each device's "
                              "statistics are noised on the device)")
        _choice("device-dp", self.device_dp, DEVICE_DP)
        _positive("device-noise-multiplier", self.device_noise_multiplier)
        _positive("device-clip-norm", self.device_clip_norm)
        for key in ("secagg-shares", "secagg-threshold"):
            if not 0.0 < getattr(self, key.replace("-", "_")) <= 1.0:
                raise ConfigError(f"{key} must be in (0, 1], got {getattr(self, key.replace('-', '_'))}")
        if self.secagg and (self.strategy != "fedavg" or self.device_dp != "off" or self.epsilon_budget):
            raise ConfigError("secagg (Flower's SecAgg+) gives the server only the sum of the updates: "
                              "use it with strategy fedavg, without device-dp and epsilon-budget")

    def _validate_output(self) -> None:
        if self.resume and self.secagg:
            raise ConfigError("resume is not available with secagg: Flower's SecAgg+ workflow "
                              "keeps its round state inside Flower")
        if self.resume and not self.out_dir:
            raise ConfigError("resume needs out-dir: the folder of the run to go on with")

    @property
    def backend_releases(self) -> int:
        """How often the devices release back-end statistics: at round 0 and after the last."""
        return 2 if self.rounds > 0 else 1

    @property
    def backend_share(self) -> float:
        """The epsilon the back end's releases alone are calibrated to (its share of the run's)."""
        return self.backend_epsilon or self.epsilon / 8

    @property
    def backend_privacy(self) -> float:
        """The epsilon the back end's releases spend under sample-level DP (0 without)."""
        if not (self.backend and self.dp and not self.secagg and self.device_dp == "off"):
            return 0.0
        return self.backend_share

    @property
    def dpsgd_epsilon(self) -> float:
        """The epsilon DP-SGD's noise is calibrated for: the run's, less the back end's."""
        return self.epsilon - self.backend_privacy

    @property
    def clients_per_round(self) -> int:
        """How many clients Flower samples each round (its own rule)."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_nodes)

    @property
    def corpus_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else bundled_corpus()

    @property
    def out_dir_path(self) -> Path:
        return Path(self.out_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()

    @property
    def feature_cache_dir(self) -> Path:
        import os

        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("FEDSPEAKER_CACHE")
        return Path(env) if env else Path.home() / ".cache" / "fedspeaker"


# Run-config keys renamed, old -> new: the old ones still work, with a warning (their one
# home: every way in goes through from_run_config or saved_run_config). pyproject.toml lists
# them as "" (not given) so that Flower lets `flwr run --run-config user-dp=...` through.
RENAMED_OPTIONS = {"user-dp": "device-dp", "user-noise-multiplier": "device-noise-multiplier",
                   "user-clip-norm": "device-clip-norm"}


def current_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with each renamed key under its new name, saying so once per process.

    A run config often carries every key at its default (Flower fills in pyproject.toml's,
    the CLI its own), so a new key at its default gives way to the old one; both set to
    different values is an error naming both.
    """
    current = {k: v for k, v in config.items() if k not in RENAMED_OPTIONS}
    for old, new in RENAMED_OPTIONS.items():
        value = config.get(old, "")
        if value == "":  # pyproject.toml's placeholder: not given
            continue
        _warn_once(f"run-config option '{old}' is deprecated: use '{new}' (the same option, renamed)",
                   FutureWarning)
        name = new.replace("-", "_")
        kind, default = RunSettings.__dataclass_fields__[name].type, getattr(RunSettings, name)
        if new in current and _coerce(new, current[new], kind) not in (default, _coerce(old, value, kind)):
            raise ConfigError(f"{old} is the old name of {new}, and they differ ({old}={value!r}, "
                              f"{new}={current[new]!r}): give only {new}")
        current[new] = value
    return current


# Options added after runs were saved whose older behaviour is not the new default:
# before the pretrained GE2E encoder, every run trained the TDNN, head and body at one lr.
_OLDER_BEHAVIOUR = {"model": "tdnn", "head-lr": 0.0}


def saved_run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config saved by this or an older fedspeaker (a checkpoint, a model bundle, a
    comparison cell), complete: every option it lacks at the value its run used, and any
    renamed one under its new name (silently: the file says what ran, nobody typed it)."""
    known = {**RunSettings().to_run_config(), **_OLDER_BEHAVIOUR}
    return {**known, **{RENAMED_OPTIONS.get(k, k): v for k, v in config.items()}}


def operating_far(text: str) -> float | None:
    """The target false-accept rate an ``operating-point`` names (``far:X``, X in (0, 1)),
    None for ``eer``. The grammar lives with the settings that check it; scoring's
    OperatingPoint (evaluation/operating_point.py) is built from it."""
    if text == "eer":
        return None
    kind, _, value = text.partition(":")
    try:
        far = float(value)
    except ValueError:
        far = -1.0
    if kind != "far" or not 0.0 < far < 1.0:
        raise ConfigError(f"operating-point must be 'eer' or 'far:X' with X in (0, 1), e.g. "
                          f"far:0.01; got {text!r}")
    return far


def bundled_corpus() -> Path:
    """The corpus shipped in the repository's data/ folder.

    `flwr run` executes a copy of the code without the audio (Flower app bundles hold
    source only), so fall back to the checkout that pip installed in editable mode.
    """
    here = Path(__file__).resolve().parent.parent / "data" / CORPUS_NAME
    if here.is_dir() and any(p.is_dir() for p in here.iterdir()):
        return here
    try:
        url = json.loads(importlib.metadata.distribution("fedspeaker").read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        url = {}
    source = url.get("url", "").removeprefix("file://")
    return Path(source) / "data" / CORPUS_NAME if source else here


def _coerce(key: str, raw: Any, annotation: Any) -> Any:
    kind = {"str": str, "int": int, "float": float, "bool": bool}[str(annotation)]
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
    elif not isinstance(raw, bool):
        if isinstance(raw, kind):
            return raw
        if kind is float and isinstance(raw, int):
            return float(raw)
        if kind is int and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return kind(raw)
            except ValueError:
                pass
    raise ConfigError(f"{key} must be {kind.__name__}, got {raw!r}")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str, category: type[Warning] = UserWarning) -> None:
    """Once per process: settings are rebuilt for every message a client handles.

    A renamed option warns with FutureWarning: Python shows it to a command's user, where
    it hides DeprecationWarning raised outside __main__."""
    warnings.warn(message, category, stacklevel=2)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be greater than 0, got {value}")


def _open_unit(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{key} must be between 0 and 1 (exclusive), got {value}")
