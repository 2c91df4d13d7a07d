"""Building blocks: norms, rotary embeddings, attention, FFNs and BitNet b1.58 linears."""

from .attention import Attention
from .bitlinear import BitLinear, convert_to_bitlinear, quantize_activation, quantize_weight
from .branch import output_projections
from .ffn import FeedForward
from .linear import make_linear
from .norm import RMSNorm, rms_norm
from .rope import RotaryEmbedding

__all__ = ["Attention", "BitLinear", "FeedForward", "RMSNorm", "RotaryEmbedding",
           "convert_to_bitlinear", "make_linear", "output_projections", "quantize_activation",
           "quantize_weight", "rms_norm"]
