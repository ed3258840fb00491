"""The lock file is what installs; these checks keep it honest (make test also runs uv lock --check)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _locked_versions() -> dict[str, set[str]]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        versions.setdefault(package["name"], set()).add(package["version"])
    return versions


def test_torch_and_torchaudio_are_locked_to_the_same_release():
    # torchaudio's compiled extension loads only against the torch release it was built for
    # (torchaudio 2.11.1 with torch 2.11.0: undefined symbol), so the two move together.
    versions = _locked_versions()
    assert len(versions["torch"]) == 1 and versions["torch"] == versions["torchaudio"], versions


def test_every_locked_package_is_hashed():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    for package in lock["package"]:
        if package["source"].get("editable") or package["source"].get("virtual"):
            continue  # the project itself
        artifacts = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        assert artifacts and all(a.get("hash", "").startswith("sha256:") for a in artifacts), package["name"]
