"""A market's own privacy policy, and its privacy ledger.

Decision record
---------------
* **Whose rules.** What a market will send is decided by the market, not by the server and not
  by whoever submits a run: a run config and every server message are untrusted input for it.
  The policy is read from the market's side only: the node config's ``privacy-policy`` (a TOML
  file set when the region is deployed or the market joins), else ``<state-dir>/<market>/
  policy.toml``, else the defaults below. The defaults are the private ones.
* **What it rules** (each checked by the client before it answers a message; a message that
  would break the policy is refused with a log line naming the rule, and the server sees that
  node drop out):

  - ``secure-aggregation-only`` (true): never answer a plain ``train`` message (an update in
    the clear), nor any train message of a run whose config says ``secagg = false``;
  - ``min-markets`` (3): every sum this market's update goes into holds at least this many
    markets (checked on the neighbour list at share-keys and on the survivor list at unmask: a
    sum of two markets hands each of them the other's update);
  - ``min-threshold`` (0.5): the Shamir threshold must be above this fraction of the
    neighbourhood, and always above half of it (two disjoint halves can never both
    reconstruct);
  - ``dp-noise`` / ``dp-clip`` (0 / 0): the market's noise floor: it clips its update to L2 norm
    ``dp-clip`` and adds Gaussian noise of std at least ``dp-noise * dp-clip / sqrt(min-markets)``
    whatever number of markets the server announces (the run may ask for more noise, never
    less);
  - ``epsilon-budget`` (inf) and ``dp-delta`` (1e-5): the market's own ledger
    (``privacy-ledger.json`` beside its heads) records every masked upload it made (each one
    can be decoded by the server once the other markets reveal their shares) with the noise
    multiplier of the sum under the distributed-DP assumption (``min-markets`` markets each
    adding at least this floor); once the next upload would take epsilon past the budget, the
    market stops contributing;
  - ``trusted-apps`` ("installed") and ``allowed-run-config`` ("default"): what code a run may
    make the region's node execute and which run-config keys a run's submitter may override
    (enforced by the node's executor before a run's app is installed or loaded, see
    ``simulations/deploy_exec.py``): ``trusted-apps`` lists the SHA-256 of the Flower app
    bundles (FABs) the node runs, comma separated; ``installed`` stands for the bundle that the
    storefed installed on the node builds itself (what ``storefed deploy run`` of the same
    version submits), ``any`` turns the check off. ``allowed-run-config`` lists run-config keys
    (kebab case); ``default`` is every run-config key except the node-local ones
    (``NODE_LOCAL_KEYS``: the state directory), ``any`` allows all;
  - ``share-evaluation`` (true): whether its evaluation summary (nDCG@10 / HR@10 overall and per
    category, on its held-out users) goes to the server. It says how good the model is for the
    market, nothing about an update or an interaction; a market that treats even that as
    confidential sets it to false and is reported as ``private`` in ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.dp import epsilon_spent
from storefed.shared.errors import ConfigError

POLICY_FILE = "policy.toml"
LEDGER_FILE = "privacy-ledger.json"
NODE_CONFIG_KEY = "privacy-policy"
# where the node keeps its private state: never the submitter's to choose (the node config's
# data-dir, dataset and device win over the run's, see client.node.node_settings)
NODE_LOCAL_KEYS = frozenset({"state-dir"})


class PolicyRefusedError(RuntimeError):
    """The market refuses a message because answering it would break its privacy policy."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """One market's rules (see module doc); defaults are the private ones."""

    secure_aggregation_only: bool = True
    min_markets: int = 3
    min_threshold: float = 0.5
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    dp_delta: float = 1e-5
    epsilon_budget: float = math.inf
    share_evaluation: bool = True
    trusted_markets: str = ""  # the markets whose identity keys it trusts (shared/identity.py)
    trusted_apps: str = "installed"  # FAB SHA-256s the node runs (deploy_exec.WarmExecutor)
    allowed_run_config: str = "default"  # run-config keys a submitter may override

    def __post_init__(self) -> None:
        if self.min_markets < 2:
            raise ConfigError(f"privacy policy: 'min-markets' must be >= 2 (a secure sum of one "
                              f"market is its update), got {self.min_markets}")
        if not 0.0 <= self.min_threshold < 1.0:
            raise ConfigError(f"privacy policy: 'min-threshold' must be in [0, 1), got "
                              f"{self.min_threshold}")
        if self.dp_noise < 0 or self.dp_clip < 0 or not 0 < self.dp_delta < 1:
            raise ConfigError("privacy policy: 'dp-noise' and 'dp-clip' must be >= 0 and "
                              "'dp-delta' in (0, 1)")
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ConfigError("privacy policy: 'dp-noise' > 0 needs 'dp-clip' > 0")
        if self.epsilon_budget <= 0:
            raise ConfigError("privacy policy: 'epsilon-budget' must be > 0 (inf = no budget)")
        for app in _items(self.trusted_apps):
            if app not in ("installed", "any") and not re.fullmatch(r"[0-9a-f]{64}", app):
                raise ConfigError(f"privacy policy: 'trusted-apps' entries are 'installed', "
                                  f"'any' or a SHA-256 in hex (64 characters), got {app!r}")
        known = set(RunConfig().to_mapping())
        for key in _items(self.allowed_run_config):
            if key not in ("default", "any") and key not in known:
                raise ConfigError(f"privacy policy: 'allowed-run-config' names {key!r}, which "
                                  f"is not a run-config key; known keys: "
                                  f"{', '.join(sorted(known))}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str) -> PrivacyPolicy:
        """Kebab-case keys; unknown keys and wrong types raise ``ConfigError`` naming them."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            f = by_key.get(key)
            if f is None:
                raise ConfigError(f"{source}: unknown privacy-policy key '{key}'; known keys: "
                                  f"{', '.join(sorted(by_key))}")
            want = str(f.type)
            if want == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
            if want == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
            if want == "str" and not isinstance(value, str):
                raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
            if want == "float":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
                value = float(value)
            values[f.name] = value
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def to_toml(self) -> str:
        lines = []
        for k, v in self.to_mapping().items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, float) and math.isinf(v):
                lines.append(f"{k} = inf")
            else:
                lines.append(f"{k} = {v!r}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ rules
    def min_shares(self, k: int) -> int:
        """The smallest Shamir threshold this market accepts in a neighbourhood of ``k``:
        above half of it (so no two disjoint sets of nodes can both rebuild a secret) and
        above ``min-threshold * k``."""
        return min(k, max(k // 2 + 1, math.floor(self.min_threshold * k) + 1, 2))

    def noise_std(self, run_multiplier: float, run_clip: float, announced: int) -> float:
        """Per-coordinate noise std this market adds: what the run asks for (calibrated on the
        number of markets the server announces), never below the policy's floor (calibrated on
        ``min-markets``, whatever the server announces)."""
        clip = self.clip(run_clip)
        run_std = run_multiplier * clip / math.sqrt(max(1, announced)) if clip > 0 else 0.0
        floor = self.dp_noise * clip / math.sqrt(self.min_markets) if clip > 0 else 0.0
        return max(run_std, floor)

    def trusts_app(self, fab_sha256: str, installed_sha256: Callable[[], str]) -> bool:
        """Whether the node may run the app bundle with this SHA-256 (``installed_sha256``
        is called only when the policy names ``installed``)."""
        apps = _items(self.trusted_apps)
        if "any" in apps or fab_sha256 in apps:
            return True
        return "installed" in apps and fab_sha256 == installed_sha256()

    def forbidden_overrides(self, keys: Iterable[str]) -> list[str]:
        """The run-config keys among ``keys`` (a run's overrides) the policy does not allow."""
        allowed = set(_items(self.allowed_run_config))
        if "any" in allowed:
            return []
        if "default" in allowed:
            allowed |= set(RunConfig().to_mapping()) - NODE_LOCAL_KEYS
        return sorted(k for k in keys if k not in allowed)

    def clip(self, run_clip: float) -> float:
        """The L2 clip applied: the tighter of the run's and the policy's (0 = no clip)."""
        clips = [c for c in (run_clip, self.dp_clip) if c > 0]
        return min(clips) if clips else 0.0


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def load_policy(node_config: Mapping[str, Any], market_dir: Path | None) -> PrivacyPolicy:
    """The market's policy: node config ``privacy-policy`` (a TOML file), else
    ``<market_dir>/policy.toml``, else the defaults. Never from the run config."""
    path: Path | None = None
    if node_config.get(NODE_CONFIG_KEY):
        path = Path(str(node_config[NODE_CONFIG_KEY]))
        if not path.is_file():
            raise ConfigError(f"node config '{NODE_CONFIG_KEY}': no file {path}")
    elif market_dir is not None and (market_dir / POLICY_FILE).is_file():
        path = market_dir / POLICY_FILE
    if path is None:
        return PrivacyPolicy()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the privacy policy: {exc}") from exc
    return PrivacyPolicy.from_mapping(raw, str(path))


def write_policy(market_dir: Path, policy: PrivacyPolicy) -> Path:
    """Write ``policy.toml`` into a market's state directory (atomically); returns its path."""
    path = market_dir / POLICY_FILE
    atomic_write_bytes(path, policy.to_toml().encode())
    return path


# ---------------------------------------------------------------------------- ledger
@dataclass
class PrivacyLedger:
    """Every release of this market's update (round, attempt, noise multiplier of the sum) and
    the epsilon they add up to; kept in ``<market_dir>/privacy-ledger.json`` (atomically)."""

    path: Path | None
    releases: list[dict[str, Any]]

    @classmethod
    def open(cls, market_dir: Path | None) -> PrivacyLedger:
        path = market_dir / LEDGER_FILE if market_dir is not None else None
        releases: list[dict[str, Any]] = []
        if path is not None and path.is_file():
            try:
                releases = list(json.loads(path.read_text())["releases"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}: unreadable privacy ledger ({exc}); it is the "
                                  f"market's record of what it released: restore it, do not "
                                  f"delete it") from exc
        return cls(path, releases)

    def epsilon(self, delta: float, extra: float | None = None) -> float:
        """Epsilon of the recorded releases (plus one of multiplier ``extra``)."""
        mults = [float(r["multiplier"]) for r in self.releases]
        if extra is not None:
            mults.append(extra)
        return float(epsilon_spent(mults, delta, 1)["epsilon"])

    def record(self, rnd: int, attempt: int, multiplier: float, delta: float) -> float:
        """Append one release, save, and return the epsilon spent so far."""
        self.releases.append({"round": rnd, "attempt": attempt, "multiplier": multiplier})
        eps = self.epsilon(delta)
        if self.path is not None:
            doc = {"releases": self.releases, "epsilon": eps, "delta": delta}
            atomic_write_bytes(self.path, json.dumps(doc, indent=1).encode())
        return eps
