"""The Hugging Face ``bitnet`` checkpoint format (``BitNetForCausalLM``), both ways.

Conventions, read in the installed ``transformers`` (5.24) rather than assumed:

* ``transformers/integrations/bitnet.py``, ``replace_with_bitnet_linear``: with
  ``quantization_config = {"quant_method": "bitnet"}`` and the default ``linear_class="bitlinear"``
  every ``nn.Linear`` but the LM head becomes a ``BitLinear`` holding ``weight`` (uint8, shape
  ``(out/4, in)``) and ``weight_scale`` (shape ``(1,)``, the model dtype).
* same file, ``pack_weights`` / ``unpack_weights``: code ``c`` in {-1, 0, 1} stored as ``c + 1``;
  byte row ``i`` holds original rows ``i, i+R, i+2R, i+3R`` (``R = out/4``) at bit offsets 0, 2, 4,
  6 -- the layout of :func:`hyperbit.nn.packed.pack_ternary`.
* same file, ``BitLinear.forward`` / ``post_quant_process``: ``y = (x_q @ codes^T) / (s *
  weight_scale)`` with ``s = 127 / max|x|`` per token: the scale **divides**, so a checkpoint
  stores ``weight_scale = 1 / gamma`` (``gamma = mean|W|``, hyperbit's multiplying scale).
  ``AutoBitLinear`` (``linear_class="autobitlinear"``) differs: offline it **multiplies**
  (``output * weight_scale``, ``weight_scale = gamma``; the weight packed or unpacked, see
  ``BitNetDeserialize``), online it stores the latent full-precision weights. Both are read here.
* ``models/bitnet/modeling_bitnet.py``: Pre-Norm blocks (``input_layernorm``,
  ``post_attention_layernorm``), ``attn_sub_norm`` before ``o_proj``, ``ffn_sub_norm`` before
  ``down_proj``: ``down(sub_norm(act(gate x) * up x))`` with ``act = ACT2FN[hidden_act]``
  (``relu2`` = squared ReLU; ``silu`` = SwiGLU); one ``rms_norm_eps`` for every norm; RoPE by
  ``rotate_half`` on the two halves of each head (hyperbit's convention: no permutation of q/k);
  no biases used here (``attention_bias`` must be false). For fp32 models its RMSNorm and
  activation quantisation compute what hyperbit's do (measured: logits within ~3e-6 of ours, from
  rounding in another order); in bf16 they do not compute in fp32 (``activation_quant`` takes
  ``max|x|`` in the input dtype, ``BitNetRMSNorm`` multiplies by its weight after the cast), so
  bf16 logits agree only to bf16 precision.

Only what the format holds is exported: ``pathway="prenorm"``, ``linear="bitnet"`` with SubLN,
``ffn`` ``relu2`` or ``swiglu``, every projection's output width a multiple of 4. Anything else is
refused with one ConfigError line before a file is written. Importing rebuilds the latent weights
of a ``BitLinear`` from ``(codes, gamma)`` as ``codes * gamma * N / k`` (``N`` weights, ``k``
nonzero): absmean quantisation of that tensor gives back exactly those codes and ``gamma`` (to fp32
round-off), so the imported model computes what the checkpoint does and trains on from there.
Nothing here imports ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..data import Tokenizer
from ..models import build_model
from ..nn import BitLinear
from ..nn.bitlinear import quantize_weight
from ..nn.packed import pack_ternary, unpack_ternary
from ..train.errors import CheckpointError, first_line
from .hf_tokenizer import write_hf_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ACT_OF_FFN = {"relu2": "relu2", "swiglu": "silu"}
FFN_OF_ACT = {"relu2": "relu2", "silu": "swiglu", "swish": "swiglu"}
# BitNetConfig's defaults (models/bitnet/configuration_bitnet.py) for keys a config.json may omit
DEFAULTS = {"vocab_size": 128256, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
            "num_attention_heads": 20, "hidden_act": "relu2", "max_position_embeddings": 2048,
            "initializer_range": 0.02, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_theta": 500000.0}

__all__ = ["bitnet_config", "check_bitnet_exportable", "hf_name", "read_bitnet", "write_bitnet"]


def hf_name(key: str) -> str:
    """A hyperbit Pre-Norm ``state_dict`` key -> its ``BitNetForCausalLM`` name."""
    parts = key.split(".")
    if parts[0] == "embed":
        return "model.embed_tokens.weight"
    if parts[0] == "final_norm":
        return "model.norm.weight"
    if parts[0] == "head":
        return "lm_head.weight"
    i, where, rest = parts[1], parts[2], ".".join(parts[3:])
    if where == "attn_path":
        return f"model.layers.{i}.input_layernorm.{parts[-1]}"
    if where == "ffn_path":
        return f"model.layers.{i}.post_attention_layernorm.{parts[-1]}"
    return f"model.layers.{i}.{'self_attn' if where == 'attn' else 'mlp'}.{rest}"


def check_bitnet_exportable(cfg: ModelConfig) -> None:
    """One ConfigError line naming the first setting the ``bitnet`` format cannot hold."""
    cfg = cfg.resolved()
    if cfg.pathway != "prenorm":
        raise ConfigError(f"model.pathway={cfg.pathway!r} cannot be written in the bitnet format; "
                          "allowed: ['prenorm'] (BitNetForCausalLM is a Pre-Norm model)")
    if cfg.linear != "bitnet":
        raise ConfigError(f"model.linear={cfg.linear!r} cannot be written in the bitnet format; allowed: "
                          "['bitnet'] (use --format hf for full-precision models)")
    if not cfg.subln:
        raise ConfigError("model.subln=False cannot be written in the bitnet format; allowed: [True] "
                          "(BitNetForCausalLM always has attn_sub_norm and ffn_sub_norm)")
    if cfg.ffn not in ACT_OF_FFN:
        raise ConfigError(f"model.ffn={cfg.ffn!r} cannot be written in the bitnet format; allowed: "
                          f"{sorted(ACT_OF_FFN)}")
    widths = {"dim": cfg.dim, "n_kv_heads * head_dim": cfg.n_kv_heads * cfg.head_dim,
              "ffn_hidden": cfg.ffn_hidden}
    for name, width in widths.items():
        if width % 4:
            raise ConfigError(f"model.{name}={width} is not a multiple of 4; the bitnet format packs "
                              "four weight rows per byte")


def bitnet_config(cfg: ModelConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The ``config.json`` of a ``BitNetForCausalLM`` with hyperbit's resolved config ``cfg``."""
    cfg = cfg.resolved()
    eot = tokenizer.eot_id if tokenizer is not None else None
    return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "hidden_act": ACT_OF_FFN[cfg.ffn],
            "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.norm_eps, "use_cache": True, "pad_token_id": None, "bos_token_id": None,
            "eos_token_id": eot, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "rope_theta": cfg.rope_theta,  # where transformers 4.x reads it
            "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                    "quantization_mode": "offline", "use_rms_norm": False},
            "dtype": "float32"}


@torch.no_grad()
def bitnet_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The checkpoint tensors of a Pre-Norm BitNet model: every BitLinear packed with
    ``weight_scale = 1 / gamma``; everything else fp32; a tied LM head stored once (as the embedding)."""
    tensors: dict[str, Tensor] = {}
    linears = {name for name, m in model.named_modules() if isinstance(m, BitLinear)}
    for key, value in model.state_dict().items():
        if key == "head.weight" and model.cfg.tie_embeddings:
            continue
        name = hf_name(key)
        if key.removesuffix(".weight") in linears:
            codes, gamma = quantize_weight(value)
            tensors[name] = pack_ternary(codes).cpu()
            tensors[name.replace(".weight", ".weight_scale")] = (1.0 / gamma).reshape(1).float().cpu()
        else:
            tensors[name] = value.detach().float().cpu().contiguous()
    return tensors


def write_bitnet(model: nn.Module, run_config, tokenizer: Tokenizer, info: dict[str, Any],
                 out_dir: str | Path) -> None:
    """Writer of the ``bitnet`` export format: ``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the tokenizer (:mod:`.hf_tokenizer`) into ``out_dir``.
    Everything is checked and computed before the first file is written."""
    cfg = run_config.model
    check_bitnet_exportable(cfg)
    if any(isinstance(m, BitLinear) and m.quant_strength < 1.0 for m in model.modules()):
        raise ConfigError("the model is in a quantisation warm-up (quant_strength < 1); only a fully "
                          "ternary model can be written in the bitnet format")
    config = bitnet_config(cfg, tokenizer)
    tensors = bitnet_tensors(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"eos_token_id": tokenizer.eot_id, "bos_token_id": None, "pad_token_id": None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    write_hf_tokenizer(tokenizer, out_dir, cfg.max_seq_len)


# ================================================================================================
# reading
# ================================================================================================

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def model_config_of(config: dict[str, Any], where: str) -> tuple[ModelConfig, dict[str, Any]]:
    """A BitNet ``config.json`` -> hyperbit's ModelConfig and its ``quantization_config`` ({} for
    an unquantised checkpoint). What hyperbit cannot represent is one ConfigError line."""
    if config.get("model_type") != "bitnet":
        raise ConfigError(f"{where}: model_type={config.get('model_type')!r} is not supported; allowed: ['bitnet']")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    quant = config.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "bitnet":
        raise ConfigError(f"{where}: quantization_config.quant_method={quant.get('quant_method')!r} is not "
                          "supported; allowed: ['bitnet']")
    if quant.get("linear_class", "bitlinear") not in ("bitlinear", "autobitlinear"):
        raise ConfigError(f"{where}: quantization_config.linear_class={quant.get('linear_class')!r}; "
                          "allowed: ['autobitlinear', 'bitlinear']")
    if quant.get("quantization_mode", "offline") not in ("offline", "online"):
        raise ConfigError(f"{where}: quantization_config.quantization_mode={quant.get('quantization_mode')!r}; "
                          "allowed: ['offline', 'online']")
    if quant.get("use_rms_norm"):
        raise ConfigError(f"{where}: quantization_config.use_rms_norm=true (an RMSNorm inside every "
                          "BitLinear) is not supported; allowed: [false] (hyperbit uses SubLN)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConfigError(f"{where}: {key}=true is not supported; allowed: [false] (hyperbit has no biases)")
    act = c["hidden_act"]
    if act not in FFN_OF_ACT:
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported; allowed: {sorted(FFN_OF_ACT)}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{where}: rope_type={rope.get('rope_type', rope.get('type'))!r} is not "
                          "supported; allowed: ['default']")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise ConfigError(f"{where}: head_dim={c['head_dim']} is not supported; allowed: "
                          f"[hidden_size / num_attention_heads = {c['hidden_size'] // heads}]")
    try:
        cfg = ModelConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                          n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
                          ffn=FFN_OF_ACT[act], ffn_hidden=c["intermediate_size"],
                          max_seq_len=c["max_position_embeddings"],
                          rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
                          norm_eps=float(c["rms_norm_eps"]), tie_embeddings=bool(c["tie_word_embeddings"]),
                          init_std=float(c["initializer_range"]), pathway="prenorm",
                          linear="bitnet" if quant else "fp", subln=True)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg.resolved(), quant


def _read_tensors(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of ``model.safetensors`` (or the shards its index names); safetensors only."""
    if (hf_dir / WEIGHTS_FILE).is_file():
        files = [hf_dir / WEIGHTS_FILE]
    elif (hf_dir / INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{hf_dir / INDEX_FILE}: no 'weight_map'")
        names = sorted(set(weight_map.values()))
        if any(Path(n).name != n for n in names):
            raise CheckpointError(f"{hf_dir / INDEX_FILE}: shard names must be plain file names")
        files = [hf_dir / n for n in names]
    else:
        raise CheckpointError(f"no {WEIGHTS_FILE} in {hf_dir} (only safetensors checkpoints are read)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{f} is not a readable safetensors file ({first_line(e)})") from None
    return tensors


def latent_weight(codes: Tensor, gamma: float) -> Tensor:
    """fp32 latent weights whose absmean quantisation is ``(codes, gamma)``: ``codes * gamma * N/k``."""
    nonzero = int(codes.count_nonzero())
    if nonzero == 0:
        return torch.zeros(codes.shape, dtype=torch.float32)
    return codes.float() * (gamma * codes.numel() / nonzero)


def _linear_weight(tensors: dict[str, Tensor], name: str, shape: tuple[int, int], quant: dict[str, Any],
                   where: str) -> Tensor:
    """The latent fp32 weight of one BitLinear from its stored form."""
    weight = tensors[name]
    if quant.get("linear_class", "bitlinear") == "autobitlinear" and quant.get("quantization_mode") == "online":
        if tuple(weight.shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(weight.shape)}, expected {shape}")
        return weight.float()  # latent weights, quantised on the fly as hyperbit's BitLinear does
    scale_name = name.replace(".weight", ".weight_scale")
    scale = tensors.get(scale_name)
    if scale is None or scale.numel() != 1:
        raise CheckpointError(f"{where}: {scale_name} is missing or not a single number")
    if weight.dtype == torch.uint8 and tuple(weight.shape) == (shape[0] // 4, shape[1]):
        codes = unpack_ternary(weight)
    elif quant.get("linear_class") == "autobitlinear" and tuple(weight.shape) == shape:
        codes = weight.float()
        if not bool(((codes == -1) | (codes == 0) | (codes == 1)).all()):
            raise CheckpointError(f"{where}: {name} is not ternary (values outside {{-1, 0, 1}})")
    else:
        raise CheckpointError(f"{where}: {name} is {weight.dtype} {tuple(weight.shape)}, expected packed "
                              f"uint8 {(shape[0] // 4, shape[1])}")
    if bool((codes.to(torch.int8) == 2).any()):  # the never-written pattern 3 unpacks to 2
        raise CheckpointError(f"{where}: {name} holds the unused 2-bit pattern 3")
    s = float(scale.double().item())
    if not s > 0 or s == float("inf"):
        raise CheckpointError(f"{where}: {scale_name} = {s} must be a positive finite number")
    divides = quant.get("linear_class", "bitlinear") == "bitlinear"
    return latent_weight(codes, 1.0 / s if divides else s)


def read_bitnet(hf_dir: str | Path) -> tuple[ModelConfig, nn.Module]:
    """Read a ``bitnet`` checkpoint directory: ``(model_config, model)`` with a hyperbit
    :class:`~hyperbit.models.TransformerLM` (fp32, eval mode) computing what the checkpoint does.
    Every problem is one ConfigError (what hyperbit cannot hold) or CheckpointError line."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no {CONFIG_FILE})")
    cfg, quant = model_config_of(_read_json(hf_dir / CONFIG_FILE), str(hf_dir / CONFIG_FILE))
    where = str(hf_dir)
    stored = _read_tensors(hf_dir)
    model = build_model(cfg)
    expected = model.state_dict()
    linears = {name for name, m in model.named_modules() if isinstance(m, BitLinear)}
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, ref in expected.items():
        name = hf_name(key)
        if key == "head.weight" and cfg.tie_embeddings:
            continue
        if name not in stored:
            raise CheckpointError(f"{where}: the checkpoint has no tensor {name!r} (needed for {key})")
        used.add(name)
        if key.removesuffix(".weight") in linears:
            used.add(name.replace(".weight", ".weight_scale"))
            state[key] = _linear_weight(stored, name, tuple(ref.shape), quant, where)
        else:
            if tuple(stored[name].shape) != tuple(ref.shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(stored[name].shape)}, "
                                      f"expected {tuple(ref.shape)}")
            state[key] = stored[name].float()
    extra = sorted(k for k in set(stored) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]!r} has no place in a hyperbit model "
                              f"({len(extra)} unexpected in all)")
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    return cfg, model.eval()
