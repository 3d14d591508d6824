"""The one configuration schema of bpflb: the cni-cilium ModuleConfig's settings (pydantic, Deckhouse's
names and defaults), the validation the admission webhook and the operator share, the agents' ConfigMap
data written from a valid configuration, and that data read back by the agents, the node reports and the
lab (decode_agent_config). Every setting either acts or is refused; SETTING_EFFECTS says where each acts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bpflb.model.maglev import DEFAULT_SEED, SEED_MAX, TABLE_SIZES
from bpflb.model.messages import json_kind as _kind
from bpflb.model.messages import show as _show
from bpflb.model.types import AgentSettings, Algorithm, Mode, Problem
from bpflb.sources.base import config_object

MODULE_NAME = "cni-cilium"                 # the only ModuleConfig bpflb acts on
GROUP = "deckhouse.io"
VERSION = "v1alpha1"
PLURAL = "moduleconfigs"
SETTINGS_VERSIONS = (1,)                   # spec.version values whose settings schema bpflb knows
MAGLEV_TABLE_SIZES = TABLE_SIZES

ModeName = Literal["SNAT", "DSR", "Hybrid"]
TunnelName = Literal["Disabled", "VXLAN"]
AlgorithmName = Literal["Random", "Maglev"]
AccelerationName = Literal["Disabled", "Native", "BestEffort"]
MAINTENANCE_NO_RECONCILIATION = "NoResourceReconciliation"


class CiliumSettings(BaseModel):
    """spec.settings of the cni-cilium ModuleConfig, settings schema version 1.

    The first five and extraLoadBalancerAlgorithmsEnabled are Deckhouse's own cni-cilium settings (same
    names, types and defaults); the rest are bpflb's. Unknown keys are refused, and values are never coerced
    ("true" is not a boolean). The agents read the same fields back from their ConfigMap (AgentConfig).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    bpfLBMode: ModeName = "Hybrid"
    tunnelMode: TunnelName = "Disabled"
    svcSourceRangeCheck: bool = False
    createNodeRoutes: bool | None = None
    debugLogging: bool = False
    extraLoadBalancerAlgorithmsEnabled: bool = False
    lbAlgorithm: AlgorithmName = "Random"
    maglevTableSize: int = Field(default=16381)
    xdpAcceleration: AccelerationName = "Disabled"
    socketLB: bool = True

    @field_validator("maglevTableSize")
    @classmethod
    def _table_size(cls, value: int) -> int:
        if value not in TABLE_SIZES:
            raise ValueError(f"must be one of {', '.join(str(s) for s in TABLE_SIZES)}")
        return value


SETTING_NAMES = tuple(CiliumSettings.model_fields)
DEFAULTS = CiliumSettings()

# Where each field of the ModuleConfig takes effect (tests/unit/test_settings.py walks the CRD's schema and
# shows each of these happening). spec.* fields first, then spec.settings.*.
SETTING_EFFECTS: dict[str, str] = {
    "enabled": "operator: false tells every agent to uninstall (ConfigMap uninstall=true), then deletes the DaemonSet",
    "version": "webhook and operator: the settings schema version; unknown versions are refused",
    "settings": "webhook and operator: validated as CiliumSettings, then written to the agents' ConfigMap",
    "maintenance": "operator: NoResourceReconciliation leaves the agents' ConfigMap and DaemonSet alone",
    "updatePolicy": "operator: Deckhouse's module update policy; bpflb does not act on it and says so once",
    "source": "operator: Deckhouse's module source; bpflb does not act on it and says so once",
    "bpfLBMode": "agent: lb_config.mode of every node's datapath (new flows)",
    "tunnelMode": "agent: the VXLAN overlay or native routing, and lb_config.tunnel_mode",
    "svcSourceRangeCheck": "agent: LoadBalancer IPs and externalIPs admit only their Service's loadBalancerSourceRanges "
                           "(lb_src_ranges); false: ranges set on a Service are said once to be not enforced",
    "createNodeRoutes": "agent: routes to the other nodes' pod CIDRs (tunnelMode Disabled)",
    "debugLogging": "agent and operator: log level DEBUG instead of INFO",
    "extraLoadBalancerAlgorithmsEnabled": "agent: honour the service.cilium.io/lb-algorithm annotation",
    "lbAlgorithm": "agent: the cluster's default backend selection (Random or Maglev)",
    "maglevTableSize": "agent: the Maglev table size M (lb_maglev_cfg)",
    "xdpAcceleration": "agent: the XDP fast path in front of tc",
    "socketLB": "agent: the socket LB on the node's cgroup (--cgroup-root); false detaches it (clusters keeping kube-proxy)",
}


@dataclass(frozen=True)
class ModuleSpec:
    """A validated cni-cilium ModuleConfig spec."""

    enabled: bool
    version: int
    settings: CiliumSettings
    maintenance: str | None = None            # NoResourceReconciliation: the operator leaves the agents alone
    not_acted_on: tuple[str, ...] = ()        # "spec.updatePolicy: ...": Deckhouse fields bpflb does not act on


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
    if error.get("type") == "value_error":
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        return f"{where}: {message}; got {_show(value)}"
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
    maintenance = spec.get("maintenance")
    if maintenance is not None and maintenance != MAINTENANCE_NO_RECONCILIATION:
        problems.append(f"spec.maintenance: must be {MAINTENANCE_NO_RECONCILIATION} (or unset); got {_show(maintenance)}")
    ignored = tuple(f"spec.{key}: {_show(spec[key])} is Deckhouse's module {what}; bpflb does not act on it"
                    for key, what in (("updatePolicy", "update policy"), ("source", "source"))
                    if spec.get(key) is not None)
    if problems:
        raise Invalid(problems)
    return ModuleSpec(enabled=bool(enabled), version=int(version), settings=settings,
                      maintenance=maintenance, not_acted_on=ignored)


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
    if settings.extraLoadBalancerAlgorithmsEnabled:      # only when set: the generation of older configs holds
        data["extraLoadBalancerAlgorithmsEnabled"] = "true"
    if not settings.socketLB:                            # only when off: the generation of older configs holds
        data["socketLB"] = "false"
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


# ---------------------------------------------------------------------------------------------------------
# The agents' side: the same schema read back from the ConfigMap's string data.

CONFIG_OBJECT = config_object()              # where it is when nothing says otherwise (decode_agent_config's obj)
MAGLEV_SEED_KEY = "maglevHashSeed"            # agent-only: every node of a cluster must use the same seed


@dataclass(frozen=True)
class AgentConfig:
    """The agents' ConfigMap, decoded: the module settings, the agent-only keys and the generation."""

    settings: CiliumSettings = DEFAULTS
    maglev_seed: int = DEFAULT_SEED
    uninstall: bool = False
    generation: str = ""

    def agent_settings(self) -> AgentSettings:
        """The model's typed view of what the datapath runs."""
        return AgentSettings(mode=Mode.parse(self.settings.bpfLBMode),
                             algorithm=Algorithm.MAGLEV if self.settings.lbAlgorithm == "Maglev" else Algorithm.RANDOM,
                             maglev_table_size=self.settings.maglevTableSize, maglev_seed=self.maglev_seed,
                             algorithm_annotation=self.settings.extraLoadBalancerAlgorithmsEnabled,
                             source_range_check=self.settings.svcSourceRangeCheck)


def _decode_value(key: str, raw: Any) -> Any:
    """A ConfigMap string as the setting's JSON type: booleans and integers from their text, strings as is.
    A hand-written file may hold a real boolean or integer: taken as the user wrote it."""
    annotation = CiliumSettings.model_fields[key].annotation
    if not isinstance(raw, str):
        return raw
    if annotation in (bool, bool | None) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if annotation is int and raw.strip().isascii() and raw.strip().isdigit():
        return int(raw.strip())
    return raw


def decode_agent_config(config: Mapping[str, Any] | None,
                        obj: str = CONFIG_OBJECT) -> tuple[AgentConfig, list[Problem]]:
    """Read the agents' ConfigMap data with the module settings' own validation. An absent ConfigMap (None)
    means the defaults; an invalid value keeps its default and comes back as a Problem naming the ConfigMap
    (obj: "ConfigMap <bpflb's namespace>/bpflb-agent"), the key, what was expected, what was given and the
    default used. Unknown keys are left alone (other components may read them)."""
    problems: list[Problem] = []
    if config is None:
        return AgentConfig(), problems
    if not isinstance(config, Mapping):
        problems.append(Problem(obj, "data", f"must be a mapping of strings; got {_show(config)}"))
        return AgentConfig(), problems
    values: dict[str, Any] = {}
    for key in SETTING_NAMES:
        raw = config.get(key)
        if raw is None:
            continue
        value = _decode_value(key, raw)
        try:
            CiliumSettings.model_validate({key: value})
        except ValidationError as exc:
            default = getattr(DEFAULTS, key)
            reason = _settings_problem(exc.errors()[0], {key: raw}).split(": ", 1)[1]
            reason = reason.split("; got ")[0] + f"; got {_show(raw)}"
            if isinstance(default, int) and not isinstance(default, bool):
                reason += f"; the default {default} is used"
            elif isinstance(default, bool):
                reason += f"; {str(default).lower()} is used"
            problems.append(Problem(obj, f"data.{key}", reason))
            continue
        values[key] = value
    seed = DEFAULT_SEED
    raw_seed = config.get(MAGLEV_SEED_KEY)
    if raw_seed is not None:
        text = str(raw_seed).strip() if isinstance(raw_seed, str | int) and not isinstance(raw_seed, bool) else ""
        if text.isascii() and text.isdigit() and 0 <= int(text) <= SEED_MAX:
            seed = int(text)
        else:
            problems.append(Problem(obj, f"data.{MAGLEV_SEED_KEY}", f"must be an integer in "
                                    f"0..{SEED_MAX}; got {_show(raw_seed)}; the default {DEFAULT_SEED} is used"))
    uninstall = str(config.get(UNINSTALL_KEY, "")).lower() == "true"
    return AgentConfig(CiliumSettings.model_validate(values), seed, uninstall,
                       str(config.get(CONFIG_GENERATION_KEY, ""))), problems


def agent_configmap_data(settings: CiliumSettings, *, maglev_seed: int | None = None,
                         uninstall: bool = False) -> dict[str, str]:
    """The ConfigMap data for settings, with the agent-only seed when one is set (the lab's file source)."""
    data = agent_config_data(settings, uninstall=uninstall)
    if maglev_seed is not None:
        data[MAGLEV_SEED_KEY] = str(maglev_seed)
        data[CONFIG_GENERATION_KEY] = config_generation(data)
    return data
