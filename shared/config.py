"""The run configuration: every tunable of a storefed run, read once into a frozen dataclass.

Keys are the kebab-case keys of ``[tool.flwr.app.config]`` in ``pyproject.toml``; each maps to
the snake_case field of the same name. Unknown keys and wrong types raise ``ConfigError`` naming
the key, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from storefed.shared.errors import ConfigError

LOSSES = ("bce", "bpr", "softmax", "full-softmax")
HISTORY_MODES = ("causal", "bag")
MTL_MODES = ("shared-bottom", "mmoe", "single-task")
AGGREGATIONS = ("rowwise", "fedavg")
NEGATIVE_POOLS = ("market", "catalog")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    """Everything tunable. Defaults here equal ``[tool.flwr.app.config]`` (a test checks it)."""

    dataset: str = "synthetic"
    data_dir: str = ""
    markets: str = ""  # comma-separated; empty = every market found
    num_rounds: int = 5
    local_epochs: int = 2
    seed: int = 0
    lr: float = 0.003
    encoder_lr_scale: float = 1.0  # encoder lr = lr * scale (join fine-tuning uses < 1)
    weight_decay: float = 0.0
    batch_size: int = 512
    embedding_dim: int = 64
    max_history: int = 50
    train_negatives: int = 4
    eval_negatives: int = 99
    loss: str = "full-softmax"  # softmax over the market's items (sampled above 2048)
    train_history: str = "causal"  # causal: a positive's input is the items before it
    mtl: str = "shared-bottom"
    num_experts: int = 4
    aggregation: str = "rowwise"  # rowwise: item rows averaged over the markets that hold them
    # where training negatives come from: the market's own items, or the whole public catalog
    # (then every market's update moves every item row: no released row is one market's alone)
    negative_pool: str = "catalog"
    proximal_mu: float = 0.0
    device: str = "auto"
    torch_threads: int = 0  # 0 = torch default; simulate sets cores / concurrent clients
    state_dir: str = ""  # client private state; empty = <out-dir>/state
    out_dir: str = "runs/latest"
    fraction_train: float = 1.0
    min_nodes: int = 2
    round_timeout: float = 3600.0
    secagg: bool = True  # SecAgg+ by default; needs >= 2 markets per round
    resume: bool = False  # server: continue from <out-dir>/encoder.pt if present
    # SecAgg+ (server/secagg.py, shared/secagg.py): neighbourhood size (0 = automatic),
    # reconstruction threshold as a fraction of it, fixed-point clip/levels, restarts per round
    secagg_shares: int = 0
    secagg_threshold: float = 0.5
    secagg_clip_range: float = 1048576.0
    secagg_quant_range: int = 4503599627370496  # 2**52 levels over [-clip, clip]
    secagg_retries: int = 2
    # what one market can do to the encoder under SecAgg+: its encoder delta is clipped to this
    # L2 norm and its weight (example count) capped; the server rejects a decoded sum that
    # markets within both bounds could not produce
    update_clip: float = 100.0
    secagg_max_weight: int = 100000
    secagg_timeout: float = 300.0  # seconds per light protocol stage
    # client-level DP over SecAgg+ (shared/dp.py): noise multiplier, L2 clip, target delta
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    dp_delta: float = 1e-5
    # Reptile-style server step (shared/transfer.py): global += server-lr * mean update
    # (1.0 = plain FedAvg); a meta-learned initialisation for markets that join later
    server_lr: float = 1.0
    # private item-kNN (shared/itemsim.py): add the market's own item-item cosine score to the
    # logits at scoring time, its weight picked on the market's validation split
    item_knn: bool = True
    # self-attention blocks over the history inside the shared encoder (0 = pooled sum only)
    history_layers: int = 0
    history_dropout: float = 0.4  # training: drop each input history item with this probability
    # XMRec markets also train on train.tsv beside train_5core.tsv (shared/data/xmrec.py); the
    # server and every market must agree (the catalog's fingerprint checks it)
    xmrec_extra_train: bool = True

    def __post_init__(self) -> None:
        _choice("loss", self.loss, LOSSES)
        _choice("train-history", self.train_history, HISTORY_MODES)
        _choice("mtl", self.mtl, MTL_MODES)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("negative-pool", self.negative_pool, NEGATIVE_POOLS)
        _choice("device", self.device, DEVICES)
        for name in ("num_rounds", "local_epochs", "batch_size", "embedding_dim", "max_history",
                     "train_negatives", "eval_negatives", "num_experts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run-config key '{_key(name)}' must be >= 1, "
                                  f"got {getattr(self, name)!r}")
        for name in ("lr", "encoder_lr_scale", "weight_decay", "proximal_mu", "round_timeout",
                     "server_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run-config key '{_key(name)}' must be >= 0, "
                                  f"got {getattr(self, name)!r}")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ConfigError(f"run-config key 'history-dropout' must be in [0, 1), "
                              f"got {self.history_dropout!r}")
        if self.history_layers < 0:
            raise ConfigError(f"run-config key 'history-layers' must be >= 0, "
                              f"got {self.history_layers!r}")
        _check_secagg(self)
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"run-config key 'fraction-train' must be in (0, 1], "
                              f"got {self.fraction_train!r}")

    @property
    def market_list(self) -> list[str]:
        """The selected markets, in order (empty = all markets found)."""
        return [m.strip() for m in self.markets.split(",") if m.strip()]

    @classmethod
    def keys(cls) -> list[str]:
        """The kebab-case keys accepted in ``[tool.flwr.app.config]``."""
        return [_key(f.name) for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Build from kebab-case keys; reject unknown keys and wrong types, naming the key."""
        by_key = {_key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            f = by_key.get(key)
            if f is None:
                near = [k for k in by_key if k.replace("-", "") == key.replace("_", "").replace(
                    "-", "")]
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"{source}: unknown key '{key}'{hint}; known keys: "
                                  f"{', '.join(sorted(by_key))}")
            values[f.name] = _coerce(key, value, f.type, source)
        return cls(**values)

    def to_mapping(self) -> dict[str, bool | int | float | str]:
        """Kebab-case mapping, the inverse of ``from_mapping`` (what Flower's run config holds)."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields (snake_case names) changed, validated again."""
        return dataclasses.replace(self, **changes)


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _check_secagg(c: RunConfig) -> None:
    bad = None
    if c.secagg_shares < 0 or c.secagg_retries < 0:
        bad = "secagg-shares and secagg-retries must be >= 0"
    elif not 0.0 < c.secagg_threshold <= 1.0:
        bad = f"secagg-threshold must be in (0, 1], got {c.secagg_threshold!r}"
    elif c.secagg_clip_range <= 0 or c.secagg_timeout <= 0:
        bad = "secagg-clip-range and secagg-timeout must be > 0"
    elif c.update_clip <= 0 or c.secagg_max_weight < 1:
        bad = "update-clip must be > 0 and secagg-max-weight >= 1"
    elif not 2 <= c.secagg_quant_range <= 2**62:
        bad = f"secagg-quant-range must be in [2, 2**62], got {c.secagg_quant_range!r}"
    elif c.dp_noise < 0 or c.dp_clip < 0 or not 0.0 < c.dp_delta < 1.0:
        bad = "dp-noise and dp-clip must be >= 0 and dp-delta in (0, 1)"
    elif c.dp_noise > 0 and c.dp_clip <= 0:
        bad = "dp-noise > 0 needs dp-clip > 0 (the noise is scaled to the clipping norm)"
    elif (c.dp_noise > 0 or c.dp_clip > 0) and not c.secagg:
        bad = "dp-noise/dp-clip need secagg = true (the noise is calibrated for the secure sum)"
    if bad:
        raise ConfigError(f"run-config: {bad}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"run-config key '{name}' must be one of {', '.join(allowed)}; "
                          f"got {value!r}")


def _coerce(key: str, value: Any, type_name: Any, source: str) -> Any:
    expected = str(type_name)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(expected)
    if ok is None:  # pragma: no cover - guards new field types
        raise ConfigError(f"{source}: key '{key}' has unsupported field type {expected}")
    if not ok:
        raise ConfigError(f"{source}: key '{key}' must be {expected}, got "
                          f"{type(value).__name__} {value!r}")
    return float(value) if expected == "float" else value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Run-config overrides as Flower's ``--run-config`` takes them -> typed values.

    Each item is a TOML file (``overrides.toml``: ``key = value`` lines), or one or more
    ``KEY=VALUE`` pairs separated by spaces (``"num-rounds=3 lr=0.001"``; values in TOML syntax,
    bare words are strings). Later items win."""
    out: dict[str, Any] = {}
    for item in items:
        path = Path(item)
        if "=" not in item and path.suffix == ".toml":
            out.update(_toml_file(path))
            continue
        try:
            pairs = shlex.split(item)
        except ValueError as exc:
            raise ConfigError(f"--run-config {item!r}: {exc}") from None
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"--run-config {pair!r}: expected KEY=VALUE (or a .toml file)")
            key, raw = pair.split("=", 1)
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw
            out[key.strip()] = value
    return out


def _toml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--run-config {path}: no such file")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--run-config {path}: not valid TOML ({exc})") from None
    nested = [k for k, v in doc.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"--run-config {path}: expected flat 'key = value' lines, found "
                          f"table(s) {', '.join(nested)}")
    return doc
