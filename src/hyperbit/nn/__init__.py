"""Building blocks: norms, rotary embeddings, attention, FFNs (dense and mixture-of-experts) and
BitNet b1.58 linears."""

from .attention import Attention
from .bitlinear import BitLinear, convert_to_bitlinear, quantize_activation, quantize_weight
from .branch import output_projections
from .ffn import FeedForward
from .linear import fused_linear, make_linear
from .loss import cross_entropy
from .moe import ExpertLinear, MoEFeedForward
from .norm import RMSNorm, rms_norm
from .packed import PackedBitLinear, pack_ternary, unpack_ternary
from .rope import RotaryEmbedding

__all__ = ["Attention", "BitLinear", "ExpertLinear", "FeedForward", "MoEFeedForward", "PackedBitLinear",
           "RMSNorm", "RotaryEmbedding", "convert_to_bitlinear", "cross_entropy", "fused_linear", "make_linear", "output_projections",
           "pack_ternary", "quantize_activation", "quantize_weight", "rms_norm", "unpack_ternary"]
