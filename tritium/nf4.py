"""NF4 (4-bit NormalFloat) weights, as bitsandbytes stores them: the public face.

    from tritium.nf4 import quantize, matmul, NF4Linear

`quantize(weight, blocksize=64, double_quant=False)` packs a float weight bit-identically
to bitsandbytes' `quantize_4bit(..., quant_type="nf4")`; `dequantize(w)` and the fused
dequant-matmul `matmul(x, w, bias=None, path="auto")` read the packed weight; `NF4Linear`
is an nn.Linear with a frozen NF4 weight that loads and saves transformers'
BitsAndBytesConfig(load_in_4bit=True) checkpoints. The kernels live in
tritium/kernels/nf4.py, the module in tritium/models/nf4_linear.py.
"""

from tritium.kernels.nf4 import BLOCKSIZES, PATHS, NF4Weight, dequantize, dynamic_map, matmul, nf4_code, quantize
from tritium.models.nf4_linear import NF4Linear, weight_from_state_dict, weight_state_dict

__all__ = [
    "BLOCKSIZES", "PATHS", "NF4Linear", "NF4Weight", "dequantize", "dynamic_map", "matmul", "nf4_code", "quantize",
    "weight_from_state_dict", "weight_state_dict",
]
