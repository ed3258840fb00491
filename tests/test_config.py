"""RunSettings: pyproject defaults, run-config parsing, coercion and validation."""

from __future__ import annotations

import dataclasses
import warnings
import tomllib

import pytest

from fedspeaker import config
from fedspeaker.config import RENAMED_OPTIONS, RunSettings, saved_run_config
from fedspeaker.errors import ConfigError, FedSpeakerError

from conftest import REPO


def _pyproject_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def _typed(d: dict) -> dict:
    # 1 == 1.0 == True in Python: compare types too, so an int default written as a
    # float in pyproject (or the other way round) is caught.
    return {k: (type(v).__name__, v) for k, v in d.items()}


def test_pyproject_defaults_equal_runsettings_defaults():
    pyproject = _pyproject_config()
    # then the renamed options' old keys, "" (not given), so that `flwr run --run-config` takes them
    defaults = {**RunSettings().to_run_config(), **{old: "" for old in RENAMED_OPTIONS}}
    assert list(pyproject) == list(defaults)  # same keys, same order
    assert _typed(pyproject) == _typed(defaults)


def test_pyproject_config_parses_to_default_settings():
    assert RunSettings.from_run_config(_pyproject_config()) == RunSettings()


def test_to_run_config_uses_kebab_case_and_round_trips():
    settings = RunSettings(seed=7, num_clients=4, partition="iid", dp=False)
    config = settings.to_run_config()
    assert config["num-clients"] == 4
    assert config["seed"] == 7
    assert config["dp"] is False
    assert not any("_" in key for key in config)
    assert RunSettings.from_run_config(config) == settings


def test_from_run_config_accepts_kebab_case_keys():
    settings = RunSettings.from_run_config(
        {"num-clients": 4, "local-epochs": 3, "crop-frames": 120, "fraction-train": 0.5}
    )
    assert (settings.num_clients, settings.local_epochs, settings.crop_frames) == (4, 3, 120)
    assert settings.fraction_train == 0.5
    # untouched fields keep their defaults
    assert settings.rounds == RunSettings().rounds


def test_from_run_config_coerces_strings():
    settings = RunSettings.from_run_config(
        {"rounds": "3", "seed": "11", "dp": "true", "alpha": "0.25", "partition": "iid"}
    )
    assert settings.rounds == 3 and type(settings.rounds) is int
    assert settings.seed == 11 and type(settings.seed) is int
    assert settings.dp is True
    assert settings.alpha == 0.25 and type(settings.alpha) is float
    assert RunSettings.from_run_config({"dp": "False"}).dp is False
    assert RunSettings.from_run_config({"dp": "TRUE"}).dp is True


def test_from_run_config_coerces_numbers_between_int_and_float():
    settings = RunSettings.from_run_config({"alpha": 2, "rounds": 4.0})
    assert settings.alpha == 2.0 and type(settings.alpha) is float
    assert settings.rounds == 4 and type(settings.rounds) is int


@pytest.mark.parametrize(
    "key, raw",
    [("rounds", "three"), ("rounds", 2.5), ("rounds", True), ("dp", "yes"), ("dp", 1),
     ("alpha", "much"), ("alpha", False)],
)
def test_from_run_config_rejects_values_of_the_wrong_type(key, raw):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        RunSettings.from_run_config({key: raw})


def test_unknown_key_raises_config_error_naming_the_key():
    with pytest.raises(ConfigError) as info:
        RunSettings.from_run_config({"rounds": 2, "num-rounds": 5})
    message = str(info.value)
    assert "'num-rounds'" in message
    assert "unknown" in message
    # it lists the known options to help the user
    assert "rounds" in message and "num-clients" in message


def test_unknown_snake_case_key_is_named_as_given():
    with pytest.raises(ConfigError, match="'learning_rate'"):
        RunSettings.from_run_config({"learning_rate": 0.1})


def test_config_error_is_a_fedspeaker_error():
    assert issubclass(ConfigError, FedSpeakerError)


@pytest.mark.parametrize(
    "key, raw",
    [
        ("partition", "foo"),
        ("rounds", -1),
        ("alpha", -1),
        ("alpha", 0),
        ("fraction-train", 1.5),
        ("fraction-train", 0.0),
        ("test-fraction", 1.0),
        ("test-fraction", 0.0),
        ("num-clients", 0),
        ("features", "spectrogram"),
        ("accountant", "gdp-typo"),
        ("delta", 1.0),
        ("n-mels", 4),
        ("batch-size", 0),
        ("noise-multiplier", -0.5),
        ("max-grad-norm", 0.0),
        ("unseen-speakers", -1),
    ],
)
def test_bad_values_raise_config_error_naming_the_option(key, raw):
    with pytest.raises(ConfigError) as info:
        RunSettings.from_run_config({key: raw})
    message = str(info.value)
    assert message.startswith(key + " "), message
    assert str(raw) in message


def test_epsilon_must_be_positive_wherever_it_is_used():
    with pytest.raises(ConfigError, match="^epsilon must be greater than 0"):
        RunSettings.from_run_config({"dp": True, "epsilon": 0.0})
    # the back end's share under device-level DP is epsilon/8 unless backend-epsilon says otherwise
    with pytest.raises(ConfigError, match="^epsilon must be greater than 0"):
        RunSettings.from_run_config({"dp": False, "device-dp": "server-fixed", "epsilon": 0.0})
    assert RunSettings.from_run_config({"dp": False, "device-dp": "server-fixed", "epsilon": 0.0,
                                        "backend-epsilon": 1.0}).epsilon == 0.0
    assert RunSettings.from_run_config({"epsilon": 0.0, "dp": False}).dp is False


def test_noise_multiplier_or_epsilon_not_both():
    """A fixed noise replaces the target: a run config that sets both is refused (with
    epsilon 0 its back end would have gone out un-noised)."""
    for epsilon in (0.0, 4.0):
        with pytest.raises(ConfigError, match="^give either noise-multiplier .* or epsilon .* not both"):
            RunSettings.from_run_config({"noise-multiplier": 1.0, "epsilon": epsilon})
    assert RunSettings.from_run_config({"noise-multiplier": 1.0}).noise_multiplier == 1.0
    assert RunSettings.from_run_config({"noise-multiplier": 1.0, "epsilon": 4.0, "dp": False}).epsilon == 4.0


@pytest.mark.parametrize("key", ["noise-multiplier", "epsilon-budget"])
def test_zero_means_off_for_noise_multiplier_and_epsilon_budget(key):
    """0 is the default of both (calibrate to epsilon; no budget), so 0 is allowed everywhere."""
    assert getattr(RunSettings.from_run_config({key: 0}), key.replace("-", "_")) == 0.0
    with pytest.raises(ConfigError, match=f"^{key} must be at least 0"):
        RunSettings.from_run_config({key: -1})


def test_tdnn_only_options_on_the_ge2e_model_warn_once():
    with pytest.warns(UserWarning, match="^model=ge2e ignores crop-frames, channels: they shape only the TDNN"):
        RunSettings.from_run_config({"channels": 32, "crop-frames": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunSettings.from_run_config({"channels": 32, "crop-frames": 100})  # said already
        RunSettings.from_run_config({"channels": 32, "model": "tdnn"})
        RunSettings.from_run_config({})


@pytest.mark.parametrize("old, value, field", [("user-dp", "server-fixed", "device_dp"),
                                               ("user-noise-multiplier", "2", "device_noise_multiplier"),
                                               ("user-clip-norm", 0.5, "device_clip_norm")])
def test_an_old_option_name_still_works_and_says_its_new_one_once(old, value, field):
    config._warn_once.cache_clear()  # another test may have said it already
    with pytest.warns(FutureWarning, match=f"^run-config option '{old}' is deprecated: use '{RENAMED_OPTIONS[old]}'"):
        settings = RunSettings.from_run_config({old: value})
    assert getattr(settings, field) == getattr(RunSettings.from_run_config({RENAMED_OPTIONS[old]: value}), field)
    assert getattr(settings, field) != getattr(RunSettings(), field)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunSettings.from_run_config({old: value})  # said already


def test_an_old_option_name_works_through_flowers_run_config():
    """`flwr run --run-config user-dp=...`: Flower passes every pyproject key, the new one
    at its default, the old one as given (pyproject's "" where not given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunSettings.from_run_config(_pyproject_config()) == RunSettings()  # "": no warning
    config._warn_once.cache_clear()
    with pytest.warns(FutureWarning, match="'user-dp' is deprecated"):
        settings = RunSettings.from_run_config({**_pyproject_config(), "user-dp": "client-fixed",
                                                "user-noise-multiplier": 2})
    assert (settings.device_dp, settings.device_noise_multiplier) == ("client-fixed", 2.0)


def test_an_old_and_a_new_option_name_must_agree():
    with pytest.raises(ConfigError, match="^user-dp is the old name of device-dp, and they differ "
                                          r"\(user-dp='server-fixed', device-dp='client-fixed'\)"):
        RunSettings.from_run_config({"user-dp": "server-fixed", "device-dp": "client-fixed"})
    with pytest.raises(ConfigError, match="user-clip-norm.*device-clip-norm"):
        RunSettings.from_run_config({"device-clip-norm": 0.5, "user-clip-norm": "0.25"})
    agreed = RunSettings.from_run_config({"user-noise-multiplier": "2", "device-noise-multiplier": 2.0})
    assert agreed.device_noise_multiplier == 2.0


def test_a_saved_run_config_with_old_names_loads_silently():
    """A checkpoint, model bundle or comparison cell written before the rename."""
    old = {**RunSettings().to_run_config(), "user-dp": "server-fixed", "user-clip-norm": 0.5}
    for new in RENAMED_OPTIONS.values():
        del old[new]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = RunSettings.from_run_config(saved_run_config(old))
    assert (settings.device_dp, settings.device_clip_norm) == ("server-fixed", 0.5)
    assert not set(saved_run_config(old)) & set(RENAMED_OPTIONS)


def test_replace_validates():
    settings = RunSettings()
    assert settings.replace(rounds=2).rounds == 2
    with pytest.raises(ConfigError, match="^rounds"):
        settings.replace(rounds=-1)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunSettings().rounds = 3  # type: ignore[misc]


def test_cache_dir_resolution(tmp_path, monkeypatch):
    assert RunSettings(cache_dir=str(tmp_path / "c")).feature_cache_dir == tmp_path / "c"
    monkeypatch.setenv("FEDSPEAKER_CACHE", str(tmp_path / "env"))
    assert RunSettings().feature_cache_dir == tmp_path / "env"


def test_corpus_dir_defaults_to_bundled_corpus(tmp_path):
    assert RunSettings().corpus_dir.name == "dspspeech20-mini"
    assert RunSettings(data_dir=str(tmp_path)).corpus_dir == tmp_path


@pytest.mark.parametrize("key, raw", [("noise-multiplier", "nan"), ("epsilon", "inf")])
def test_non_finite_values_raise_config_error(key, raw):
    with pytest.raises(ConfigError, match=f"^{key}"):
        RunSettings.from_run_config({key: raw})
