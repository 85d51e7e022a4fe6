"""How the attention kernels are tuned, as data: the problem bucket, the config spaces,
the predicates that prune configs a GPU cannot run, and the heuristic defaults."""

from __future__ import annotations

import torch

from tritium.autotune import Config
from tritium.kernels.online_softmax import head_block
from tritium.runtime import pow2

INTERPRETER = Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
FWD_SPACE = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
BWD_SPACE = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3)}
SHARED_MEMORY = 227 * 1024  # Hopper's per-block maximum; the tuner skips what fails anyway
ACC_REGISTERS = 128  # float32 accumulator values per thread before the kernel spills


def attention_bucket(
    *, head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int, window_left: int, window_right: int,
    softcap: float, group: int, pack: int = 1,
) -> dict:
    """The bucket of an attention problem: problems in one bucket share a tuned config.
    Sequence lengths and window sizes go by powers of two."""
    if window_left < 0 and window_right < 0:
        mask = "full"
    elif window_left < 0 and window_right == 0:
        mask = "causal"
    else:
        mask = "window"
    return {
        "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""), "mask": mask,
        "window": pow2(window_left, 1, 1 << 20) if window_left >= 0 else 0,
        "softcap": softcap > 0, "seqlen_q": pow2(seqlen_q, 16, 1 << 17),
        "seqlen_k": pow2(seqlen_k, 16, 1 << 17), "gqa": group, "pack": pack,
    }


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def fwd_fits(config: Config, bucket: dict) -> bool:
    """Tiles no larger than the rows there are, q plus pipelined K/V tiles in shared
    memory, the output accumulator in registers."""
    block_m, block_n = config.meta["BLOCK_M"], config.meta["BLOCK_N"]
    block_d = head_block(bucket["head_dim"])
    rows = bucket["seqlen_q"] * bucket["pack"]
    if block_m > max(16, rows) or (rows >= 256 and block_m < 64):
        return False
    smem = (block_m + 2 * config.num_stages * block_n) * block_d * _itemsize(bucket["dtype"])
    return smem <= SHARED_MEMORY and block_m * block_d <= ACC_REGISTERS * 32 * config.num_warps


def bwd_fits(config: Config, bucket: dict) -> bool:
    """dK/dV (or dQ) accumulators in registers, the streamed tiles in shared memory."""
    block_m, block_n = config.meta["BLOCK_M"], config.meta["BLOCK_N"]
    block_d = head_block(bucket["head_dim"])
    smem = config.num_stages * 2 * max(block_m, block_n) * block_d * _itemsize(bucket["dtype"])
    acc = 2 * max(block_m, block_n) * block_d
    return smem <= SHARED_MEMORY and acc <= ACC_REGISTERS * 32 * config.num_warps


def fwd_default(*, head_dim: int, dtype: str, pack: int, **_) -> Config:
    """Heuristic forward tiles per head_dim (float32 tiles are twice as wide in bytes).
    bfloat16/float16 on sm_90: 8 warps (two warpgroups), 64 keys per step; 128 query rows
    and 3 stages up to head_dim 128; at 256, 64 rows and 2 stages (128 rows spill 16 bytes
    with softcap on Triton 3.6). `python -m benchmarks.compile_check` shows each without
    spills, with wgmma and cp.async, on Triton 3.6 and 3.9. Measured on a GPU, `tritium
    tune` has the last word."""
    if pack > 1:  # decode: few rows per kv head, the key loop is all that matters
        return Config({"BLOCK_M": 16 if pack <= 16 else 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    if dtype == "float32":
        if head_dim <= 64:
            return Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3)
        if head_dim <= 128:
            return Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=3)
        return Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2)
    if head_dim <= 128:
        return Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    return Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2)


def dq_default(*, head_dim: int, dtype: str, **_) -> Config:
    """Heuristic dQ tiles (BLOCK_M queries per program, BLOCK_N keys per step). 16-bit: at
    least 64 query rows, so every product is a wgmma on sm_90, pipelined over 2 stages; the
    key step shrinks as head_dim grows to keep the dQ accumulator and the K and V tiles in
    registers (no spills on Triton 3.6 and 3.9, `python -m benchmarks.compile_check`)."""
    if dtype == "float32":
        return Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    if head_dim <= 128:
        return Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    return Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2)


def dkdv_default(*, head_dim: int, dtype: str, **_) -> Config:
    """Heuristic dK/dV tiles (BLOCK_N keys per program, BLOCK_M queries per step). 16-bit up
    to head_dim 128: at least 64 key rows (wgmma on sm_90), 2 stages, a short query step so
    the dK and dV accumulators stay in registers. At 256 every 64-key tile spills on sm_90
    (the accumulators and the K and V operands of one warpgroup exceed its registers, in
    one pass or split into dV and dK passes; compile_check on Triton 3.6 and 3.9): 32 x 32
    mma.sync tiles, unpipelined, are the spill-free choice until the kernel is restructured."""
    if dtype == "float32":
        return Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2)
    if head_dim <= 128:
        return Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    return Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1)
