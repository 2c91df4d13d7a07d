"""hyperbit: transformers with swappable, tested residual pathways and BitNet b1.58 linears."""

from ._version import __version__
from .config import ConfigError, ModelConfig, preset
from .models import TransformerLM, build_model, count_params
from .nn import BitLinear, PackedBitLinear, convert_to_bitlinear
from .pathways import HyperConnection, expand_streams, make_pathway, reduce_streams
from .runs import load_trained
from .train import make_optimizer, param_groups
from .interop.hf_register import install as _install_hf

_install_hf()  # AutoConfig / AutoModelForCausalLM know model_type "hyperbit" (lazily)

__all__ = ["BitLinear", "ConfigError", "HyperConnection", "ModelConfig", "PackedBitLinear", "TransformerLM",
           "__version__", "build_model", "convert_to_bitlinear", "count_params", "expand_streams",
           "load_trained", "make_optimizer", "make_pathway", "param_groups", "preset",
           "reduce_streams"]
