"""Bad input stops early with a message that says what to change, never a traceback."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "dspspeech20-mini"


def fedspeaker(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedspeaker.cli", *args, "--set", f"cache-dir={cache}"],
                          capture_output=True, text=True, timeout=300)


def small_corpus(root: Path, speakers: int, per_speaker: int) -> Path:
    for spk in sorted(p for p in BUNDLED.iterdir() if p.is_dir())[:speakers]:
        (root / spk.name).mkdir(parents=True)
        for f in sorted(spk.glob("*.flac"))[:per_speaker]:
            shutil.copy(f, root / spk.name / f.name)
    return root


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_too_few_speakers_says_how_many_are_needed(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "c", speakers=3, per_speaker=4)
    result = fedspeaker("simulate", "--data-dir", str(corpus), cache=tmp_path / "cache")
    assert_clean_error(result, "3 speaker(s)", "at least 4")


def test_partition_leaving_a_client_empty_says_what_to_change(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "c", speakers=5, per_speaker=4)
    result = fedspeaker("simulate", "--data-dir", str(corpus), "--clients", "40", "--partition", "iid",
                        cache=tmp_path / "cache")
    assert_clean_error(result, "no data", "--clients")


def test_natural_partition_needs_one_client_per_speaker(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "c", speakers=6, per_speaker=4)
    result = fedspeaker("simulate", "--data-dir", str(corpus), "--partition", "natural",
                        "--clients", "3", cache=tmp_path / "cache")
    assert_clean_error(result, "--clients 4")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--clients", "0"], ["num-clients must be at least 1, got 0"]),
        (["--clients", "two"], ["--clients", "invalid int value"]),
        (["--alpha", "-1"], ["alpha must be greater than 0"]),
        (["--partition", "random"], ["partition must be one of iid"]),
        (["--set", "lr=fast"], ["lr must be float"]),
        (["--set", "features=wav2vec"], ["features must be one of fbank, mfcc"]),
        (["--set", "no-such-option=1"], ["unknown run-config option 'no-such-option'"]),
        (["--epsilon", "4", "--noise-multiplier", "1.0"], ["give either noise-multiplier", "or epsilon"]),
        (["--data-dir", "/no/such/corpus"], ["/no/such/corpus does not exist"]),
    ],
)
def test_bad_option_names_the_option(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_clean_error(fedspeaker("simulate", *args, cache=tmp_path / "cache"), *fragments)


@pytest.mark.parametrize(("flags", "options", "message"), [
    (["--delta", "1.5"], ["delta=1.5"], "delta must be between 0 and 1 (exclusive), got 1.5"),
    (["--noise-multiplier", "-1"], ["noise-multiplier=-1"], "noise-multiplier must be at least 0"),
    (["--epsilon-budget", "-1"], ["epsilon-budget=-1"], "epsilon-budget must be at least 0"),
    (["--epsilon", "0"], ["epsilon=0"], "epsilon must be greater than 0"),
    (["--rounds", "-1"], ["rounds=-1"], "rounds must be at least 0"),
    (["--local-epochs", "0"], ["local-epochs=0"], "local-epochs must be at least 1"),
    (["--clients", "0"], ["num-clients=0"], "num-clients must be at least 1"),
    (["--strategy", "fedsgd"], ["strategy=fedsgd"], "strategy must be one of fedavg"),
    (["--epsilon", "4", "--noise-multiplier", "1"], ["epsilon=4", "noise-multiplier=1"],
     "give either noise-multiplier"),
])
def test_a_flag_and_its_option_are_refused_with_one_message(
        capsys: pytest.CaptureFixture, flags: list[str], options: list[str], message: str) -> None:
    """Every rule lives in RunSettings: the flag, --set and a run config meet the same one."""
    from fedspeaker.cli.main import main
    from fedspeaker.config import RunSettings
    from fedspeaker.errors import ConfigError

    said = []
    for args in (flags, [a for o in options for a in ("--set", o)]):
        assert main(["simulate", *args]) == 2
        said.append(capsys.readouterr().err)
    assert said[0] == said[1] and message in said[0], said
    with pytest.raises(ConfigError) as info:
        RunSettings.from_run_config(dict(o.split("=") for o in options))
    assert said[0] == f"fedspeaker: error: {info.value}\n"


def test_identify_rejects_a_missing_model(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fedspeaker.cli", "identify", "--model",
                             str(tmp_path / "none.pt"), "x.wav"], capture_output=True, text=True)
    assert_clean_error(result, "no such model file")


def test_set_takes_the_old_names_of_device_level_dp_and_says_their_new_ones(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """`--set user-dp=...` still works, saying its new name; an old and a new name that
    disagree stop with one message naming both."""
    from fedspeaker import config
    from fedspeaker.cli.main import _parser, main
    from fedspeaker.cli.runs import _settings

    config._warn_once.cache_clear()  # another test may have said it already
    with pytest.warns(FutureWarning, match="'user-dp' is deprecated: use 'device-dp'"):
        settings = _settings(_parser().parse_args(["simulate", "--no-dp", "--set", "user-dp=server-fixed",
                                                   "--out", str(tmp_path)]))
    assert settings.device_dp == "server-fixed"
    assert main(["simulate", "--set", "user-dp=server-fixed", "--set", "device-dp=client-fixed"]) == 2
    assert "user-dp is the old name of device-dp, and they differ" in capsys.readouterr().err


def test_privacy_sweep_takes_its_old_user_noise_flag_and_says_the_new_one() -> None:
    """--user-noise sets --device-noise's list, hidden from --help."""
    from fedspeaker.cli.main import _parser

    with pytest.warns(FutureWarning, match="^--user-noise is deprecated: use --device-noise"):
        args = _parser().parse_args(["privacy-sweep", "--user-noise", "0.5,2"])
    assert args.device_noise == [0.5, 2.0]
    assert _parser().parse_args(["privacy-sweep"]).device_noise == [1.0, 4.0]
    sweep = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["privacy-sweep"]
    assert "--device-noise" in sweep.format_help() and "--user-noise" not in sweep.format_help()
