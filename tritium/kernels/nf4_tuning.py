"""How the NF4 kernels are tuned, as data: which path each token count takes, the problem
bucket, the config spaces, the predicates that prune configs a GPU cannot run (or that
would leave the fast one-scale-per-row tile path), and the heuristic defaults.

Two matmul paths: the GEMV (few rows: every program streams a slab of the packed weight
once and multiplies it into all rows with FMAs, split over K so enough programs keep the
memory system busy) and the tiled GEMM (dequantized weight tiles fed to tl.dot).
"""

from __future__ import annotations

import torch

from tritium.autotune import Config
from tritium.runtime import pow2

# Token counts (M, by powers of two) that run the GEMV path; larger ones run the GEMM.
GEMV_BUCKETS = (1, 2, 4, 8, 16)
SMS = 132  # H100 SXM; programs per wave the defaults aim to fill
SHARED_MEMORY = 227 * 1024  # Hopper's per-block maximum; the tuner skips what fails anyway
ACC_REGISTERS = 128  # float32 values per thread a tile may hold before the kernel spills
GEMV_ACC_REGISTERS = 64  # the GEMV's accumulator, which lives beside the x tile and the decoded weights

DEQUANTIZE_INTERPRETER = Config({"BLOCK": 4096}, num_warps=4, num_stages=1)
DEQUANTIZE_SPACE = {"BLOCK": (512, 1024, 2048, 4096), "num_warps": (4, 8), "num_stages": (1,)}

# The interpreter configs split K in two so the CPU tests run the split-K reduction.
GEMV_INTERPRETER = Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4, num_stages=1)
GEMV_SPACE = {
    "BLOCK_N": (8, 16, 32, 64, 128), "BLOCK_K": (8, 16, 32, 64, 128, 256), "SPLIT_K": (1, 2, 4, 8, 16),
    "num_warps": (4, 8), "num_stages": (1,),
}
GEMM_INTERPRETER = Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 4},
                          num_warps=4, num_stages=1)
GEMM_SPACE = {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128, 256), "BLOCK_K": (32, 64, 128), "SPLIT_K": (1, 2, 4),
    "GROUP_M": (8,), "num_warps": (4, 8), "num_stages": (2, 3, 4),
}


def path(m: int) -> str:
    """"gemv" or "gemm": the path a problem of m rows takes."""
    return "gemv" if pow2(m, 1, 1 << 30) in GEMV_BUCKETS else "gemm"


def dequantize_bucket(*, numel: int, dtype: torch.dtype) -> dict:
    return {"numel": pow2(numel, 1 << 16, 1 << 30), "dtype": str(dtype).replace("torch.", "")}


def dequantize_default(**_) -> Config:
    return Config({"BLOCK": 1024}, num_warps=4, num_stages=1)


def matmul_bucket(*, m: int, n: int, k: int, dtype: torch.dtype, blocksize: int) -> dict:
    """Token count m by powers of two; the weight's sizes exactly (a model has few); the
    block size, which bounds BLOCK_K (see `_aligned`)."""
    return {"m": pow2(m, 1, 1 << 16), "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
            "blocksize": blocksize}


def _aligned(config: Config, bucket: dict) -> bool:
    """A K tile within one quantization block gets one scale per weight row; a wider one
    needs a scale per byte. Only when in_features is a multiple of the block size (else
    every tile takes a scale per byte anyway) does that rule configs out."""
    return bucket["k"] % bucket["blocksize"] != 0 or bucket["blocksize"] % config.meta["BLOCK_K"] == 0


def _split_fits(config: Config, bucket: dict) -> bool:
    return config.meta["SPLIT_K"] * config.meta["BLOCK_K"] <= bucket["k"]


def gemv_fits(config: Config, bucket: dict) -> bool:
    """The float32 (rows, BLOCK_N, BLOCK_K / 2) product accumulator, held across the K
    loop, takes at most GEMV_ACC_REGISTERS registers a thread."""
    rows = pow2(bucket["m"], 1, 16)
    acc = rows * config.meta["BLOCK_N"] * config.meta["BLOCK_K"] // 2
    return _aligned(config, bucket) and _split_fits(config, bucket) and acc <= GEMV_ACC_REGISTERS * 32 * config.num_warps


def gemm_fits(config: Config, bucket: dict) -> bool:
    """No tile taller than the rows there are; x and packed tiles pipelined in shared
    memory plus the dequantized tile staged for tl.dot; the accumulator in registers."""
    block_m, block_n, block_k = (config.meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    m = bucket["m"]
    if block_m > max(16, m) or (m >= 256 and block_m < 64):
        return False
    itemsize = 4 if bucket["dtype"] == "float32" else 2
    smem = config.num_stages * (block_m * itemsize + block_n // 2) * block_k + block_n * block_k * itemsize
    regs = block_m * block_n + block_n * block_k  # accumulator + the dequantized tile
    return (_aligned(config, bucket) and _split_fits(config, bucket) and smem <= SHARED_MEMORY
            and regs <= ACC_REGISTERS * 32 * config.num_warps)


def _split(tiles: int, k: int, block_k: int, most: int, waves: int) -> int:
    """Split K until about `waves` waves of programs run, keeping >= 4 K steps per split."""
    split = 1
    while split < most and tiles * split < waves * SMS and k // (2 * split * block_k) >= 4:
        split *= 2
    return split


def gemv_warps(m: int) -> int:
    """num_warps of the GEMV default: 4 for one row, 8 for more (room for the x tile)."""
    return 4 if m == 1 else 8


def gemv_default(*, m: int, n: int, k: int, dtype: str, blocksize: int, **_) -> Config:
    """Each thread streams one weight row's bytes along K (16 bytes a step where BLOCK_K
    allows), and the x tile (rows, BLOCK_K) and the BLOCK_N scales of a step hold fewer
    elements than the program has threads: Triton then loads them straight in the weight
    tile's layout (smaller loads are not layout anchors), so the loop moves nothing between
    threads. BLOCK_K within one quantization block (one scale per row per step); split K
    so every SM holds several programs (the loads of a loop without tl.dot are not
    pipelined: programs in flight hide the latency). float32 x takes twice the registers
    of a 16-bit x: half the K step for several rows."""
    rows = pow2(m, 1, 16)  # the launch's BLOCK_M
    threads = 32 * gemv_warps(rows)
    block_k = min(blocksize, 64, threads // (2 * rows))
    if dtype == "float32" and rows > 1:
        block_k = max(block_k // 2, 8)
    block_n = threads // 2
    return Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": _split(-(-n // block_n), k, block_k, 16, waves=8)},
                  num_warps=gemv_warps(rows), num_stages=1)


def gemm_default(*, m: int, n: int, k: int, dtype: str, blocksize: int, **_) -> Config:
    """The matmul tutorial's Hopper tiles, with BLOCK_K within one quantization block;
    split-K only while the tiles alone leave SMs idle. float32 (its products are FMAs,
    not tensor-core MMAs) takes 64 x 64 tiles over 8 warps: larger ones, or 4 warps,
    spill on sm_90 and sm_80."""
    if dtype == "float32":
        block_m, block_n, block_k, warps = min(max(16, m), 64), 64, min(blocksize, 32), 8
    elif m <= 64:
        block_m, block_n, block_k, warps = max(16, m), 64, min(blocksize, 64), 4
    else:
        block_m, block_n, block_k, warps = 128, 128, min(blocksize, 64), 8
    tiles = -(-m // block_m) * -(-n // block_n)
    return Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
                   "SPLIT_K": _split(tiles, k, block_k, 4, waves=2)}, num_warps=warps, num_stages=3)
