"""A device's privacy policy: the least protection it accepts, owned by the device.

The run config is the server's (and unsigned): a run can ask for ``dp=false`` or
epsilon 1000. The policy is read from the device's own files (``privacy-policy`` in the
SuperNode's node config, or ``privacy-policy.toml`` in its state-dir) and never from the
run. A run that asks for less, or whose next round would take the device past its
lifetime cap, gets a refusal with the reason instead of an update.

An example ``privacy-policy.toml`` (these are the defaults, used where no file is given)::

    require-dp = true          # DP-SGD on the device; server-side noise does not count
    min-unit = "utterance"     # or "speaker": the smallest unit a run may protect
    max-epsilon = 8.0          # a run's epsilon on this device, at most
    max-delta = 1e-5
    max-clipping-norm = 0.0    # 0: any per-sample clipping norm
    lifetime-epsilon = 32.0    # every run ever on these recordings, composed
    backend-statistics = true  # whether it sends (noised) sums for the scoring back end
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from fedspeaker.config import DP_UNITS, RunSettings
from fedspeaker.errors import ConfigError
from fedspeaker.privacy.ledger import DPSteps, PrivacyLedger

POLICY_FILE = "privacy-policy.toml"


@dataclass(frozen=True)
class DevicePolicy:
    """What a device accepts of a run; field names are the file's keys with '-' for '_'."""

    require_dp: bool = True
    min_unit: str = "utterance"
    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    max_clipping_norm: float = 0.0
    lifetime_epsilon: float = 32.0
    backend_statistics: bool = True

    @classmethod
    def of(cls, values: Mapping[str, Any], where: str) -> "DevicePolicy":
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{where}: unknown privacy-policy key '{key}'; known: "
                                  + ", ".join(sorted(k.replace("_", "-") for k in known)))
            kind = type(getattr(cls, name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{where}: privacy-policy {key} must be {kind.__name__}, got {value!r}")
            kwargs[name] = value
        policy = cls(**kwargs)
        if policy.min_unit not in DP_UNITS:
            raise ConfigError(f"{where}: min-unit must be one of {', '.join(DP_UNITS)}, got {policy.min_unit!r}")
        for key in ("max_epsilon", "max_delta", "lifetime_epsilon"):
            if not getattr(policy, key) > 0:
                raise ConfigError(f"{where}: {key.replace('_', '-')} must be greater than 0")
        return policy

    @classmethod
    def load(cls, path: Path) -> "DevicePolicy":
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable privacy policy ({exc}); this device will not "
                              "train until it is fixed") from None
        return cls.of(values, str(path))

    def refusal(self, settings: RunSettings, ledger: PrivacyLedger, planned: DPSteps | None) -> str | None:
        """Why this device will not train this round for this run, or None: a reason
        starting with its kind (dp-off, unit, delta, clipping, epsilon, lifetime)."""
        if not settings.dp:
            return ("dp-off: the run asks for no DP-SGD on the device and this device's policy "
                    "requires it" if self.require_dp else None)
        if DP_UNITS.index(settings.dp_unit) < DP_UNITS.index(self.min_unit):
            return f"unit: the run protects {settings.dp_unit}s; this device requires at least {self.min_unit}s"
        if settings.delta > self.max_delta:
            return f"delta: the run asks delta={settings.delta:g}; this device accepts at most {self.max_delta:g}"
        if self.max_clipping_norm and settings.max_grad_norm > self.max_clipping_norm:
            return (f"clipping: the run clips at {settings.max_grad_norm:g}; this device accepts at "
                    f"most {self.max_clipping_norm:g}")
        if planned is None:
            return None
        run_eps = ledger.epsilon_after(planned, settings.delta)
        if run_eps > self.max_epsilon:
            return (f"epsilon: this round would take the run's epsilon on this device to "
                    f"{run_eps:.2f}; it accepts at most {self.max_epsilon:g} per run")
        life = ledger.lifetime_epsilon(settings.delta, planned)
        if life > self.lifetime_epsilon:
            return (f"lifetime: this round would take the device's lifetime epsilon to {life:.2f}; "
                    f"its cap is {self.lifetime_epsilon:g}")
        return None


    def backend_refusal(self, settings: RunSettings, ledger: PrivacyLedger, release: DPSteps | None) -> str | None:
        """Why this device will not send the scoring back end's statistics (``release``:
        their noise, None where the run adds none on the device), or None."""
        if not self.backend_statistics:
            return "backend: this device's policy sends no back-end statistics (backend-statistics = false)"
        return self.refusal(settings, ledger, release)


def device_policy(node_config: Mapping[str, Any], state_dir: Path | None) -> DevicePolicy:
    """The policy a device set for itself: the file named by node-config ``privacy-policy``,
    else ``privacy-policy.toml`` in its state-dir, else the defaults."""
    named = node_config.get("privacy-policy")
    if named:
        path = Path(str(named)).expanduser()
        if not path.is_file():
            raise ConfigError(f"node config privacy-policy={named}: no such file; this device will "
                              "not train without the policy it names")
        return DevicePolicy.load(path)
    if state_dir is not None and (state_dir / POLICY_FILE).is_file():
        return DevicePolicy.load(state_dir / POLICY_FILE)
    return DevicePolicy()
