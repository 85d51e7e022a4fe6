"""tritium: autotuned Triton kernels for Gemma 2, GLM-4, MVP, BigBird-Pegasus and
BertGeneration. The functional API lives here; the logic lives in `tritium.kernels`."""

from tritium import nf4
from tritium.kernels.attention import flash_attention
from tritium.kernels.attention_kvcache import flash_attention_with_kvcache
from tritium.kernels.block_sparse import bigbird_random_layout, block_sparse_attention
from tritium.kernels.loss import linear_cross_entropy
from tritium.kernels.mlp import gated_mlp, linear
from tritium.kernels.norm import layer_norm, rms_norm
from tritium.kernels.rope import apply_rotary

__all__ = [
    "apply_rotary",
    "bigbird_random_layout",
    "block_sparse_attention",
    "flash_attention",
    "flash_attention_with_kvcache",
    "gated_mlp",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "nf4",
    "rms_norm",
]
__version__ = "0.1.0"
