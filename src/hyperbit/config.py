"""Model configuration: one validated dataclass, named presets and ``key=value`` overrides.

Every invalid option raises :class:`ConfigError` with the field name and the allowed values, so a
typo never silently builds a different model than the one asked for.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from .pathways import KINDS as PATHWAYS

LINEARS = ("fp", "bitnet")
FFNS = ("swiglu", "relu2", "moe")
ARCHS = ("lm", "vit")
POOLS = ("cls", "mean")
MHC_INITS = ("residual", "paper")
MHC_RES = ("sinkhorn", "permutations")
# Fields whose None means "derived from other fields" (see ModelConfig.resolved).
DERIVED = ("n_kv_heads", "ffn_hidden", "subln")
# Upper bounds: far above any model this library trains, low enough that a typo (an extra zero)
# fails at once instead of allocating for minutes.
MODEL_LIMITS = {"vocab_size": 2**32, "dim": 65536, "n_layers": 1024, "n_heads": 4096,
                "n_kv_heads": 4096, "ffn_hidden": 2**20, "max_seq_len": 2**20, "expansion_rate": 32,
                "frac_rate": 4096, "mhc_sinkhorn_iters": 1000, "moe_experts": 4096,
                "moe_top_k": 4096, "image_size": 4096, "patch_size": 4096, "channels": 4096,
                "n_classes": 2**20}


class ConfigError(ValueError):
    """A configuration value a user supplied is invalid. The message is one readable line."""


@dataclass
class ModelConfig:
    """What a model is, as specified. A field left at None is *derived* (the comment says from
    what); :meth:`resolved` fills every derived field in. The config holds nothing else, so
    ``dataclasses.replace``, :meth:`from_dict` and :func:`parse_overrides` give exactly the
    config that building it fresh with the same fields gives (``replace(cfg, linear="bitnet")``
    turns SubLN on unless ``subln`` was set). A model built from a config stores the resolved one.
    """

    # --- shape ---------------------------------------------------------------------------------
    vocab_size: int = 256  # byte-level tokenizer by default
    dim: int = 256  # hidden size d
    n_layers: int = 6  # transformer blocks L (2L branches: attention and FFN of each block)
    n_heads: int = 4  # query heads; head_dim = dim // n_heads
    n_kv_heads: int | None = None  # grouped-query attention; derived: n_heads (plain multi-head)
    ffn: str = "swiglu"  # "swiglu", "relu2" (squared-ReLU gate, BitNet b1.58 2B4T) or "moe"
    ffn_hidden: int | None = None  # derived: 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 256  # longest sequence RoPE tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # share the embedding matrix with the LM head
    init_std: float = 0.02  # std of every linear / embedding weight at init
    # --- residual pathway ----------------------------------------------------------------------
    pathway: str = "prenorm"  # one of PATHWAYS
    expansion_rate: int = 1  # n, the number of residual streams (1 for prenorm / postnorm)
    hc_dynamic: bool = True  # hc, frac: input-dependent connection weights (DHC) or static (SHC)
    hc_tanh: bool = True  # hc, frac: tanh on the dynamic projections
    mhc_init: str = "residual"  # mhc: "residual" (res ~ I, pre selects the home stream) or "paper"
    mhc_res: str = "sinkhorn"  # mhc: res by "sinkhorn" (stabilised, fp32) or "permutations"
    mhc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations
    frac_rate: int = 1  # frac: m, the hidden state split into m fractions of size dim / m
    # --- mixture of experts (ffn = "moe") ------------------------------------------------------
    moe_experts: int = 8  # SwiGLU experts per MoE layer (each of width ffn_hidden)
    moe_top_k: int = 2  # experts each token is routed to
    moe_capacity_factor: float | None = None  # tokens per expert <= factor * T * k / E; None: no drop
    moe_balance_coef: float = 0.01  # weight of the load-balancing loss
    moe_z_coef: float = 0.001  # weight of the router z-loss
    # --- vision transformer (arch = "vit": hyperbit.models.ViT; vocab_size is unused) ---------
    arch: str = "lm"  # "lm" (decoder-only language model) or "vit" (image classifier)
    image_size: int = 8  # vit: square images of image_size x image_size pixels
    patch_size: int = 2  # vit: square patches; image_size must be divisible by it
    channels: int = 1  # vit: input channels
    n_classes: int = 10  # vit: output classes
    pool: str = "cls"  # vit: "cls" (a class token) or "mean" (mean over the patch tokens)
    # --- linear layers -------------------------------------------------------------------------
    linear: str = "fp"  # "fp" (nn.Linear) or "bitnet" (BitLinear b1.58, W1.58 A8)
    subln: bool | None = None  # extra RMSNorm before attn out / FFN down; derived: linear == bitnet

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def derived_values(self) -> dict[str, Any]:
        """The value of every derived field: the field itself when set, else derived from the
        others."""
        return {"n_kv_heads": self.n_heads if self.n_kv_heads is None else self.n_kv_heads,
                "ffn_hidden": (64 * math.ceil(8 * self.dim / 3 / 64) if self.ffn_hidden is None
                               else self.ffn_hidden),
                "subln": self.linear == "bitnet" if self.subln is None else self.subln}

    def resolved(self) -> "ModelConfig":
        """The same config with every derived field filled in (what a model is built from)."""
        return dataclasses.replace(self, **self.derived_values())

    def validate(self) -> None:
        check_choice("pathway", self.pathway, PATHWAYS)
        check_choice("linear", self.linear, LINEARS)
        check_choice("ffn", self.ffn, FFNS)
        check_choice("arch", self.arch, ARCHS)
        check_choice("pool", self.pool, POOLS)
        if self.arch == "vit" and self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        check_choice("mhc_init", self.mhc_init, MHC_INITS)
        check_choice("mhc_res", self.mhc_res, MHC_RES)
        derived = self.derived_values()
        for name, upper in MODEL_LIMITS.items():
            value = derived.get(name, getattr(self, name))
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
            check_upper(name, value, 1, upper)
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % derived["n_kv_heads"]:
            raise ConfigError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={derived['n_kv_heads']}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for RoPE")
        if self.pathway in ("prenorm", "postnorm", "frac") and self.expansion_rate != 1:
            raise ConfigError(f"expansion_rate must be 1 for pathway={self.pathway!r} "
                              f"(got {self.expansion_rate}); use pathway='hc' for several streams")
        if self.frac_rate != 1 and self.pathway != "frac":
            raise ConfigError(f"frac_rate={self.frac_rate} needs pathway='frac' (got {self.pathway!r})")
        if self.dim % self.frac_rate:
            raise ConfigError(f"dim={self.dim} must be divisible by frac_rate={self.frac_rate}")
        if self.moe_top_k > self.moe_experts:
            raise ConfigError(f"moe_top_k={self.moe_top_k} must be <= moe_experts={self.moe_experts}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            raise ConfigError(f"moe_capacity_factor must be > 0 or none, got {self.moe_capacity_factor}")
        for name in ("moe_balance_coef", "moe_z_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pathway == "sequential" and self.expansion_rate != 2:
            raise ConfigError("expansion_rate must be 2 for pathway='sequential' (spec section 4), "
                              f"got {self.expansion_rate}")
        if self.pathway == "parallel" and self.expansion_rate < 2:
            raise ConfigError(f"expansion_rate must be >= 2 for pathway='parallel', got {self.expansion_rate}")
        if self.pathway == "mhc" and self.mhc_res == "permutations" and self.expansion_rate > 4:
            raise ConfigError(f"mhc_res='permutations' needs expansion_rate <= 4 (n! logits per branch), "
                              f"got {self.expansion_rate}; use mhc_res='sinkhorn'")

    # --- derived quantities --------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_branches(self) -> int:
        return 2 * self.n_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # A few thousand parameters per block: for unit tests.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    # The benchmark model: 6 blocks of width 256.
    "small": dict(dim=256, n_layers=6, n_heads=4, max_seq_len=256),
    # OLMo-1B's shape (d 2048, 16 blocks, 16 heads, SwiGLU 8192, vocab 50304, tied embeddings).
    # Only ever built on the meta device, to count parameters.
    "olmo-1b": dict(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, ffn_hidden=8192,
                    max_seq_len=2048, tie_embeddings=True),
    # OLMoE-1B-7B's shape (d 2048, 16 blocks, 16 heads, 64 SwiGLU experts of width 1024, top-8,
    # vocab 50304, untied embeddings): ~6.9B parameters, ~1.3B active per token. Meta device only.
    "olmoe-1b-7b": dict(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, ffn="moe",
                        ffn_hidden=1024, moe_experts=64, moe_top_k=8, max_seq_len=4096),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a preset, optionally with field overrides: ``preset("tiny", pathway="hc")``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def parse_overrides(cfg: ModelConfig, pairs: list[str]) -> ModelConfig:
    """Apply ``key=value`` strings (``dim=128``, ``pathway=hc``, ``n_kv_heads=none``).

    Derived fields (``n_kv_heads``, ``ffn_hidden``, ``subln`` left at None, or set to ``none``)
    follow the overridden values: ``linear=bitnet`` turns SubLN on, ``dim=512`` resizes the FFN,
    ``n_heads=8`` keeps plain multi-head attention.
    """
    hints = get_type_hints(ModelConfig)
    values = dataclasses.asdict(cfg)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().removeprefix("model.")
        if not sep:
            raise ConfigError(f"override {pair!r} must look like key=value")
        if key not in hints:
            raise ConfigError(f"unknown model config key {key!r}; allowed: {sorted(hints)}")
        values[key] = parse_value(key, raw.strip(), hints[key])
    return ModelConfig.from_dict(values)


def parse_value(key: str, raw: str, hint: Any) -> Any:
    text = str(hint)
    if raw.lower() == "none" and "None" in text:
        return None
    try:
        if "bool" in text:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {type_name(hint)}") from None
    return raw


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_upper(name: str, value: float, lower: float, upper: float) -> None:
    """A ConfigError naming the allowed range when ``value`` exceeds ``upper``."""
    if value > upper:
        raise ConfigError(f"{name} must be <= {upper} (allowed: {lower} .. {upper}), got {value}")


def check_types(cfg: Any, prefix: str = "") -> None:
    """Every field of the dataclass ``cfg`` has its annotated type, and no float is infinite
    (``inf`` parses as a float but is never a usable setting; NaN fails every range check)."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        value, text = getattr(cfg, f.name), str(hints[f.name])
        if value is None and "None" in text:
            continue
        ok = (isinstance(value, bool) if "bool" in text
              else isinstance(value, int) and not isinstance(value, bool) if "int" in text
              else isinstance(value, (int, float)) and not isinstance(value, bool) if "float" in text
              else isinstance(value, str))
        if not ok:
            raise ConfigError(f"{prefix}{f.name}={value!r} has the wrong type; expected "
                              f"{type_name(hints[f.name])}")
        if isinstance(value, float) and math.isinf(value):
            raise ConfigError(f"{prefix}{f.name}={value!r} must be a finite number")


def type_name(hint: Any) -> str:
    """``int`` for ``<class 'int'>``, ``int | None`` for unions."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
