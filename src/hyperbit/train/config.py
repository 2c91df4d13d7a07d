"""Run configuration: model + training + data, with run presets and ``section.key=value`` overrides.

A run directory stores the resolved configuration as ``config.json``::

    {"model": {...ModelConfig...}, "train": {...TrainConfig...}, "data": {...DataConfig...}}

A run directory, as training lays it out (:mod:`hyperbit.runs` reads it)::

    config.json      the RunConfig             checkpoints/   hyperbit.train.checkpoint
    metrics.jsonl    one JSON object a record  data/          token shards, unless data.path is
                                                              a prepared directory
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import (ConfigError, ModelConfig, check_choice, check_types, check_upper, parse_overrides,
                      parse_value)
from ..data import DataConfig
from ..data.shards import META_FILE
from .precision import PRECISIONS
from .schedule import SCHEDULES, Schedule

RUN_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
DATA_DIR = "data"


# Upper bounds on what allocates or loops: a typo (an extra few zeros) fails at once instead of
# running out of memory or time. A ratio above 1 has no meaning.
TRAIN_LIMITS = {"steps": 10**9, "batch_size": 2**20, "seq_len": 2**20, "grad_accum": 2**20,
                "eval_batches": 10**6, "keep_last": 10**4, "min_lr_ratio": 1.0}


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (split over grad_accum micro-batches)
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"  # one of SCHEDULES
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global grad norm; 0 = off
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 where native, else fp32), "bf16", "fp16" or "fp32"
    compile: bool = False  # torch.compile each block (regional compile, hyperbit.models.fast)
    activation_checkpointing: bool = False  # recompute each block's forward in backward (less memory)
    deterministic: bool = False  # deterministic kernels: bit-exact reruns and resumes on CUDA (slower)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp2" (fully_shard per block, then root)
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    save_every: int = 100  # 0 = only at the end
    monitor_every: int = 100  # log composite gain and collapse every k steps (0 = off)
    keep_last: int = 2
    check_wiring: bool = True  # run the wiring check on the model before the first step

    def __post_init__(self) -> None:
        check_types(self, "train.")
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("train.distributed", self.distributed, ("ddp", "fsdp2"))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "log_every", "eval_every", "save_every", "monitor_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                              f"train.grad_accum={self.grad_accum}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.steps={self.steps}")
        for name, upper in TRAIN_LIMITS.items():
            check_upper(f"train.{name}", getattr(self, name), 0, upper)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "clip", "min_lr_ratio", "beta1", "beta2"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be < 1 (allowed: 0 .. <1), got {getattr(self, name)}")

    def schedule_obj(self) -> Schedule:
        return Schedule(self.schedule, lr=self.lr, max_steps=self.steps,
                        warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                        weight_decay=self.weight_decay)


@dataclass
class RunConfig:
    """Model, training and data. A run records the model it builds, so ``model`` is held resolved
    (:meth:`ModelConfig.resolved`): ``config.json`` names every size."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        self.model = self.model.resolved()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; raise model.max_seq_len or shorten train.seq_len")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(d) - {"model", "train", "data"})
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; allowed: ['data', 'model', 'train']")
        return cls(model=ModelConfig.from_dict(d.get("model", {})),
                   train=_section(TrainConfig, "train", d.get("train", {})),
                   data=_section(DataConfig, "data", d.get("data", {})))

    def prepared_data_dir(self, run_dir: str | Path) -> Path:
        """The token shards a run reads: ``data.path`` when it is a directory made by
        ``hyperbit prepare``, else ``<run_dir>/data`` (where training tokenises the corpus once)."""
        source = Path(self.data.path)
        if source.is_dir() and (source / META_FILE).exists():
            return source
        return Path(run_dir) / DATA_DIR

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read run config {path}: {e}") from None


RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The main job: a DHC x4 byte-level model on 4 MB of the Python standard library (README: time).
    "demo": {"model": dict(dim=128, n_layers=4, n_heads=4, max_seq_len=128, pathway="hc",
                           expansion_rate=4),
             "train": dict(steps=1500, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=100,
                           eval_every=500, save_every=500),
             "data": dict(path="pystdlib", max_bytes=4_000_000)},
    # Deep and narrow, where the residual pathway matters: 16 blocks (32 branches) of width 64.
    # About 2-4 min per run on 2 cores; `hyperbit compare --preset deep` is docs/results.md.
    "deep": {"model": dict(dim=64, n_layers=16, n_heads=4, max_seq_len=128),
             "train": dict(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=60,
                           eval_every=200, eval_batches=8, save_every=100, monitor_every=50),
             "data": dict(path="pystdlib", max_bytes=4_000_000)},
    # A vision transformer on scikit-learn's 8x8 digits (1,437 train / 360 test images): 16
    # patches of 2x2 plus a class token; about a minute on 2 cores. Reports test accuracy.
    "vit-digits": {"model": dict(arch="vit", dim=64, n_layers=4, n_heads=4, image_size=8,
                                 patch_size=2, n_classes=10, max_seq_len=32),
                   "train": dict(steps=600, batch_size=64, seq_len=17, lr=2e-3, warmup_steps=50,
                                 eval_every=100, eval_batches=8, save_every=200, monitor_every=100),
                   "data": dict(path="digits")},
    # Seconds: for tests and smoke runs.
    "tiny": {"model": dict(dim=32, n_layers=2, n_heads=4, max_seq_len=64),
             "train": dict(steps=20, batch_size=4, seq_len=32, warmup_steps=2, log_every=5,
                           eval_every=10, eval_batches=2, save_every=10),
             "data": dict(path="pystdlib", max_bytes=200_000)},
    # A mixture of experts (8 SwiGLU experts of width 128, top-2): about a minute of CPU time.
    "moe-tiny": {"model": dict(dim=64, n_layers=4, n_heads=4, max_seq_len=128, ffn="moe",
                               ffn_hidden=128, moe_experts=8, moe_top_k=2),
                 "train": dict(steps=200, batch_size=16, seq_len=64, warmup_steps=20, log_every=10,
                               eval_every=100, eval_batches=4, save_every=100, monitor_every=100),
                 "data": dict(path="pystdlib", max_bytes=1_000_000)},
}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dim": 64}}`` -> ``{"model.dim": 64}``: a config dict by its override names."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_run_config(preset_name: str | None, overrides: list[str]) -> RunConfig:
    """A run preset (or the defaults) plus ``section.key=value`` overrides, validated."""
    if preset_name is not None and preset_name not in RUN_PRESETS:
        raise ConfigError(f"unknown run preset {preset_name!r}; allowed: {sorted(RUN_PRESETS)}")
    return _build(RUN_PRESETS.get(preset_name, {}) if preset_name else {}, overrides)


def override_run_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` with ``section.key=value`` overrides on top, validated (``cfg`` is not changed)."""
    return _build(cfg.to_dict(), overrides)


def _build(base: dict[str, dict[str, Any]], overrides: list[str]) -> RunConfig:
    by_section: dict[str, list[str]] = {"model": [], "train": [], "data": []}
    for pair in overrides:
        key = pair.partition("=")[0].strip()
        section, dot, name = key.partition(".")
        if not dot or section not in by_section:
            raise ConfigError(f"override {pair!r} must look like section.key=value with section one of "
                              "['data', 'model', 'train'] (e.g. model.pathway=hc, train.lr=3e-3)")
        by_section[section].append(pair if section == "model" else f"{name}={pair.partition('=')[2]}")
    model = parse_overrides(ModelConfig.from_dict(dict(base.get("model", {}))), by_section["model"])
    train = _apply(TrainConfig, "train", dict(base.get("train", {})), by_section["train"])
    data = _apply(DataConfig, "data", dict(base.get("data", {})), by_section["data"])
    return RunConfig(model=model, train=train, data=data)


def _section(cls, section: str, values: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} config key(s) {[f'{section}.{k}' for k in unknown]}; "
                          f"allowed: {sorted(known)}")
    return cls(**values)


def _apply(cls, section: str, values: dict[str, Any], pairs: list[str]):
    hints = {f.name: f.type for f in fields(cls)}
    types = {name: type(getattr(cls(), name)) for name in hints}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        key = key.strip()
        if key not in hints:
            raise ConfigError(f"unknown {section} config key '{section}.{key}'; allowed: {sorted(hints)}")
        values[key] = parse_value(f"{section}.{key}", raw.strip(), types[key])
    return _section(cls, section, values)
