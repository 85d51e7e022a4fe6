"""How the MLP GEMMs are tuned, as data: the problem bucket, the config space, the
predicate that prunes configs a GPU cannot run, and the heuristic defaults.

Two kernels share most of it: the linear GEMM (one weight tile and one accumulator per
program) and the gated GEMM (gate and up tiles, two accumulators), which is why the
predicates and defaults take the number of weight tiles. Only the linear GEMM can split
K (at few tokens, where its column tiles alone leave SMs idle).
"""

from __future__ import annotations

import dataclasses

import torch

from tritium.autotune import Config
from tritium.runtime import pow2

INTERPRETER = Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)
SPACE = {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128, 256), "BLOCK_K": (32, 64, 128), "GROUP_M": (8,),
    "num_warps": (4, 8), "num_stages": (3, 4),
}
LINEAR_SPACE = {**SPACE, "SPLIT_K": (1, 2, 4, 8)}
SPLIT_K_TOKENS = 64  # the most tokens (bucket m) at which the linear GEMM may split K
SHARED_MEMORY = 227 * 1024  # Hopper's per-block maximum; the tuner skips what fails anyway
ACC_REGISTERS = 128  # float32 accumulator values per thread before the kernel spills
DECODE_PROGRAMS = 128  # column tiles a few-token GEMM wants: about one per SM, each streaming its weights


def _one_split(config: Config) -> Config:
    """config for the linear GEMM, K not split."""
    return dataclasses.replace(config, meta={**config.meta, "SPLIT_K": 1})


LINEAR_INTERPRETER = _one_split(INTERPRETER)


def gemm_bucket(*, m: int, n: int, k: int, dtype: torch.dtype, activation: str | None) -> dict:
    """The bucket of an (m, k) x (k, n) problem: the token count m by powers of two, the
    weight's sizes exactly (a model has few), whether the epilogue applies an activation."""
    return {
        "m": pow2(m, 16, 1 << 16), "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
        "activation": activation is not None,
    }


def _fits(config: Config, bucket: dict, weights: int) -> bool:
    """Tiles no taller than the rows there are, nor much thinner; narrow column tiles only
    for few rows, 8 warps only for big tiles; the pipelined x and weight tiles in shared
    memory, the accumulators in registers."""
    block_m, block_n, block_k = (config.meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    m = bucket["m"]
    if block_m > m or block_m < min(m, 128) // 2:
        return False
    if (m <= 32 and block_n > 128) or (m > 32 and block_n < 32):
        return False
    if config.num_warps == 8 and block_m * block_n < 64 * 128:
        return False
    itemsize = 4 if bucket["dtype"] == "float32" else 2
    smem = config.num_stages * (block_m + weights * block_n) * block_k * itemsize
    return smem <= SHARED_MEMORY and weights * block_m * block_n <= ACC_REGISTERS * 32 * config.num_warps


def linear_fits(config: Config, bucket: dict) -> bool:
    """`_fits`, and K split only for few tokens, each split at least one K step."""
    split = config.meta["SPLIT_K"]
    if split > 1 and (bucket["m"] > SPLIT_K_TOKENS or split * config.meta["BLOCK_K"] > bucket["k"]):
        return False
    return _fits(config, bucket, weights=1)


def gate_up_fits(config: Config, bucket: dict) -> bool:
    return _fits(config, bucket, weights=2)


def _default(m: int, n: int, dtype: str, weights: int, activation: bool) -> Config:
    """Few tokens: the GEMM streams the weight, so column tiles narrow enough to give
    every SM a share, and long K steps to keep loads in flight (half as long with two
    weight tiles per step: the same bytes). Many tokens: Hopper's 128-row wgmma tiles over
    two warpgroups, 256 columns of one accumulator, or 128 columns when an activation
    epilogue needs registers too (with the pre-activation it stores for training, a
    256-column tile spills on sm_90), halved again when gate and up share the registers:
    spill-free on Triton 3.6 and 3.9 (`python -m benchmarks.compile_check`)."""
    wide = dtype == "float32"
    if m <= 16:
        block_n = next((b for b in (64, 32) if n // b >= DECODE_PROGRAMS), 16)
        block_k = 64 if wide or weights == 2 else 128
        return Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}, num_warps=4, num_stages=4)
    if m <= 64 or wide:
        return Config({"BLOCK_M": min(m, 64), "BLOCK_N": 64, "BLOCK_K": 32 if wide else 64, "GROUP_M": 8},
                      num_warps=4, num_stages=4 if m <= 64 else 3)
    block_n = (128 if activation else 256) // weights
    return Config({"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)


def linear_default(*, m: int, n: int, dtype: str, activation: bool, **_) -> Config:
    """`_default` with one split: split-K has not been timed on a GPU yet, so only the
    tuner picks it."""
    return _one_split(_default(m, n, dtype, weights=1, activation=activation))


def gate_up_default(*, m: int, n: int, dtype: str, **_) -> Config:
    return _default(m, n, dtype, weights=2, activation=True)
