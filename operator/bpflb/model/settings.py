"""The cni-cilium ModuleConfig: its settings model (pydantic), the validation shared by the admission
webhook and the operator, and the agents' ConfigMap data derived from a valid configuration."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bpflb.model.messages import json_kind as _kind
from bpflb.model.messages import show as _show

MODULE_NAME = "cni-cilium"                 # the only ModuleConfig bpflb acts on
GROUP = "deckhouse.io"
VERSION = "v1alpha1"
PLURAL = "moduleconfigs"
SETTINGS_VERSIONS = (1,)                   # spec.version values whose settings schema bpflb knows
MAGLEV_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)

Mode = Literal["SNAT", "DSR", "Hybrid"]
Tunnel = Literal["Disabled", "VXLAN"]
Algorithm = Literal["Random", "Maglev"]
Acceleration = Literal["Disabled", "Native", "BestEffort"]


class CiliumSettings(BaseModel):
    """spec.settings of the cni-cilium ModuleConfig, settings schema version 1.

    The first five are Deckhouse's own cni-cilium settings (same names, types and defaults); the rest are
    bpflb's. Unknown keys are refused, and values are never coerced ("true" is not a boolean).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    bpfLBMode: Mode = "Hybrid"
    tunnelMode: Tunnel = "Disabled"
    svcSourceRangeCheck: bool = False
    createNodeRoutes: bool | None = None
    debugLogging: bool = False
    extraLoadBalancerAlgorithmsEnabled: bool = False
    lbAlgorithm: Algorithm = "Random"
    maglevTableSize: int = Field(default=16381)
    xdpAcceleration: Acceleration = "Disabled"


SETTING_NAMES = tuple(CiliumSettings.model_fields)


@dataclass(frozen=True)
class ModuleSpec:
    """A validated cni-cilium ModuleConfig spec."""

    enabled: bool
    version: int
    settings: CiliumSettings


@dataclass
class Invalid(Exception):
    """A ModuleConfig that cannot be applied: one 'field: what is wrong; got what' line per problem."""

    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(self.problems)


def _choices(name: str) -> tuple[str, ...] | None:
    annotation = CiliumSettings.model_fields[name].annotation
    args = getattr(annotation, "__args__", None)
    if args and all(isinstance(a, str) for a in args):
        return tuple(args)
    return None


def _settings_problem(error: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    """Turn one pydantic error into 'spec.settings.<key>: <expectation>; got <value>'."""
    loc = error.get("loc") or ()
    key = str(loc[0]) if loc else ""
    where = f"spec.settings.{key}" if key else "spec.settings"
    value = raw.get(key) if key else raw
    if error.get("type") == "extra_forbidden":
        return f"{where}: unknown setting; known settings are {', '.join(SETTING_NAMES)}"
    choices = _choices(key) if key in CiliumSettings.model_fields else None
    if choices is not None:
        return f"{where}: must be one of {', '.join(choices)}; got {_show(value)}"
    annotation = CiliumSettings.model_fields[key].annotation if key in CiliumSettings.model_fields else None
    if annotation in (bool, bool | None):
        return f"{where}: must be true or false; got {_show(value)} ({_kind(value)})"
    return f"{where}: {error.get('msg', 'invalid')}; got {_show(value)} ({_kind(value)})"


def validate_spec(spec: Any) -> ModuleSpec:
    """Check a cni-cilium ModuleConfig spec; raise Invalid listing every problem, else return it.

    spec.enabled is a boolean (absent: enabled, as the module is on by default in Deckhouse bundles);
    spec.version is required when spec.settings is set and must be a known settings schema version;
    spec.settings follows CiliumSettings.
    """
    problems: list[str] = []
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise Invalid([f"spec: must be a mapping; got {_show(spec)} ({_kind(spec)})"])

    enabled = spec.get("enabled", True)
    if enabled is None:
        enabled = True
    if not isinstance(enabled, bool):
        problems.append(f"spec.enabled: must be true or false; got {_show(enabled)} ({_kind(enabled)})")

    raw_settings = spec.get("settings")
    version = spec.get("version")
    known = ", ".join(str(v) for v in SETTINGS_VERSIONS)
    if version is None:
        if raw_settings is not None:
            problems.append(f"spec.version: required when spec.settings is set; expected {known}")
        version = SETTINGS_VERSIONS[-1]
    elif isinstance(version, bool) or not isinstance(version, int | float) or version != int(version):
        problems.append(f"spec.version: must be an integer; got {_show(version)} ({_kind(version)})")
    elif int(version) not in SETTINGS_VERSIONS:
        problems.append(f"spec.version: unsupported settings schema version {int(version)}; expected {known}")

    settings = CiliumSettings()
    if raw_settings is not None and not isinstance(raw_settings, dict):
        problems.append(f"spec.settings: must be a mapping; got {_show(raw_settings)} ({_kind(raw_settings)})")
    elif raw_settings:
        try:
            settings = CiliumSettings.model_validate(raw_settings)
        except ValidationError as exc:
            problems.extend(_settings_problem(e, raw_settings) for e in exc.errors())
        else:
            if settings.maglevTableSize not in MAGLEV_TABLE_SIZES:
                sizes = ", ".join(str(s) for s in MAGLEV_TABLE_SIZES)
                problems.append(f"spec.settings.maglevTableSize: must be one of {sizes}; "
                                f"got {settings.maglevTableSize}")
    if problems:
        raise Invalid(problems)
    return ModuleSpec(enabled=bool(enabled), version=int(version), settings=settings)


# ---------------------------------------------------------------------------------------------------------
# The agents' ConfigMap (kube-system/bpflb-agent): what the operator writes and the agents read.

CONFIG_GENERATION_KEY = "configGeneration"     # hash of the settings below; agents report the one they run
UNINSTALL_KEY = "uninstall"                    # "true": detach the programs and remove the pinned maps


def agent_config_data(settings: CiliumSettings, *, uninstall: bool = False) -> dict[str, str]:
    """The ConfigMap data for a valid configuration: every value a string, plus its generation hash."""
    data = {
        "bpfLBMode": settings.bpfLBMode,
        "tunnelMode": settings.tunnelMode,
        "lbAlgorithm": settings.lbAlgorithm,
        "maglevTableSize": str(settings.maglevTableSize),
        "xdpAcceleration": settings.xdpAcceleration,
        "svcSourceRangeCheck": json.dumps(settings.svcSourceRangeCheck),
        "debugLogging": json.dumps(settings.debugLogging),
        UNINSTALL_KEY: json.dumps(uninstall),
    }
    if settings.createNodeRoutes is not None:
        data["createNodeRoutes"] = json.dumps(settings.createNodeRoutes)
    data[CONFIG_GENERATION_KEY] = config_generation(data)
    return data


def config_generation(data: Mapping[str, str]) -> str:
    """A short stable hash of the configuration data (the generation key itself excluded)."""
    payload = json.dumps({k: v for k, v in sorted(data.items()) if k != CONFIG_GENERATION_KEY})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def wants_uninstall(config: Mapping[str, str] | None) -> bool:
    """True when the agents' ConfigMap tells them to remove the datapath."""
    return bool(config) and str((config or {}).get(UNINSTALL_KEY, "")).lower() == "true"
