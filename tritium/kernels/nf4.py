"""NF4 (4-bit NormalFloat) weights in bitsandbytes' format: quantize, dequantize, and the
fused dequant-matmul that reads the packed weight once.

Format (ARCHITECTURE.md, "Semantics"): the weight flattened row-major, cut into blocks
of `blocksize` elements, each code the index of the nearest of 16 NF4 values to x / absmax(block); two
codes per byte, the earlier element in the high nibble. With double quantization the
float32 absmax become uint8 codes of the signed 8-bit dynamic map, blockwise (256) around
their mean: scale = code2[absmax[i]] * absmax2[i // 256] + offset.

`quantize` is plain PyTorch and reproduces bitsandbytes' own arithmetic bit for bit;
`dequantize` and `matmul` are Triton kernels that decode the (nested) scales inside and
look codes up in a register-resident table (a warp shuffle per code, no load).
`matmul` runs a split-K GEMV for few rows (decode) and a tiled tl.dot GEMM for many
(prefill), by the token-count table of `nf4_tuning`; its backward (w.r.t. x and bias,
the 4-bit weight stays frozen as in QLoRA) dequantizes and hands the product to cuBLAS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels import nf4_tuning as tuning
from tritium.kernels.split_k import IDENTITY, SOURCES, finish, k_span, launch_split_sum, partials, split_len
from tritium.kernels.tiles import INTERPRETED, dot, dot_precision, grouped_tile, rounded
from tritium.kernels.validation import FLOAT_DTYPES, as_rows, check_device, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, run_function

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1), scaled to [-1, 1], sorted.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # double quantization's block, fixed by bitsandbytes
_NESTED_BLOCKSIZE = tl.constexpr(NESTED_BLOCKSIZE)
PATHS = ("auto", "gemv", "gemm")


# ----------------------------------------------------------------------------- format


@dataclass(eq=False, repr=False, frozen=True)
class NF4Weight:
    """A weight of `shape` quantized to NF4, in bitsandbytes' layout. Frozen: a field is
    never reassigned; every tensor must be contiguous (the kernels read them flat), and
    each op checks the tensors' sizes again (host metadata, no sync), so one resized or
    restrided in place since (resize_, set_, as_strided_) is refused, never read past.

    packed: uint8 ((numel + 1) // 2, 1), two codes per byte, earlier element high.
    absmax: float32 (blocks,), blocks = ceil(numel / blocksize); with double quantization
        uint8 (blocks,) codes of `code2`.
    code: float32 (16,) the NF4 values (bitsandbytes' quant_map).
    absmax2, code2, offset: double quantization only: float32 (ceil(blocks / 256),) block
        scales, the float32 (256,) signed dynamic map and the float32 0-d mean.
    dtype: the dtype the weight was quantized from (what `dequantize` returns by default).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple
    dtype: torch.dtype
    code: torch.Tensor
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _check_state(self)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple:
        """(packed, code, absmax, absmax2, code2, offset): what the custom ops take."""
        return self.packed, self.code, self.absmax, self.absmax2, self.code2, self.offset

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.blocksize, self.shape, self.dtype,
                         move(self.code), move(self.absmax2), move(self.code2), move(self.offset))

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={self.shape}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")


def check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {BLOCKSIZES} (bitsandbytes' block sizes), got {blocksize!r}")


def _check_state(w: NF4Weight) -> None:
    """Every field consistent with shape and blocksize; all tensors on one device."""
    check_blocksize(w.blocksize)
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4Weight.dtype: expected float16, bfloat16 or float32, got {w.dtype}")
    if not w.shape or min(w.shape) < 0:
        raise ValueError(f"NF4Weight.shape: expected a shape of rank >= 1 and sizes >= 0, got {w.shape}")
    parts = (w.absmax2, w.code2, w.offset)
    if any(p is None for p in parts) and any(p is not None for p in parts):
        raise ValueError("NF4Weight: absmax2, code2 and offset come together (double quantization) or not at all")
    check_layout(w.tensors(), w.shape, w.blocksize)


# What each state tensor holds, for the error messages.
_HOLDS = {"packed": "two 4-bit codes per byte of a {shape} weight", "code": "the 16 NF4 values",
          "absmax": "one per {blocksize}-element block of a {shape} weight",
          "absmax2": f"one per {NESTED_BLOCKSIZE} absmax codes", "code2": "the signed 8-bit dynamic map",
          "offset": "the mean of absmax"}


def check_layout(state: tuple, shape: tuple, blocksize: int) -> None:
    """state (NF4Weight.tensors()) holds exactly what the kernels read for a weight of
    `shape`: each tensor of its dtype and size, contiguous (they are read flat), on
    packed's device. Host metadata only (no sync, a few microseconds): NF4Weight checks it
    when built and every launch again, so a tensor resized or restrided in place since
    (resize_, set_, as_strided_, .data) is refused rather than read past."""
    packed, code, absmax, absmax2, code2, offset = state
    numel = math.prod(shape)
    blocks = -(-numel // blocksize)
    expected = [("packed", packed, torch.uint8, (numel + 1) // 2), ("code", code, torch.float32, 16)]
    if absmax2 is None:
        expected.append(("absmax", absmax, torch.float32, blocks))
    else:
        expected += [("absmax", absmax, torch.uint8, blocks),
                     ("absmax2", absmax2, torch.float32, -(-blocks // NESTED_BLOCKSIZE)),
                     ("code2", code2, torch.float32, 256), ("offset", offset, torch.float32, 1)]
    for name, t, dtype, size in expected:
        if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != size or not t.is_contiguous()
                or t.device != packed.device):
            _refuse(name, t, dtype, size, _HOLDS[name].format(shape=shape, blocksize=blocksize), packed)


def _refuse(name: str, t, dtype: torch.dtype, numel: int, what: str, packed) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"NF4Weight.{name}: expected a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dtype != dtype or t.numel() != numel:
        raise ValueError(f"NF4Weight.{name}: expected {numel} {str(dtype)[6:]} values ({what}), "
                         f"got {str(t.dtype)[6:]} of shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"NF4Weight.{name}: expected a contiguous tensor (the kernels read it flat), got shape "
                         f"{tuple(t.shape)} with strides {t.stride()}; pass {name}.contiguous()")
    if t.device != packed.device:
        raise ValueError(f"NF4Weight.{name}: on {t.device}, packed on {packed.device}; they must match")


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, float32."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), float32
    (256,) sorted: for exponents 10^-6 .. 10^0, the midpoints of 2^i linear steps over
    [0.1, 1] of either sign, plus 0 and 1. Same float32 steps, so the same values."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- quantize


def _quantize_nf4(flat: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, absmax) of float32 `flat`, as bitsandbytes' quantize_4bit computes them:
    full blocks scale by x * (1 / absmax), the partial last block by x / absmax with its
    absmax floored at 1e-38 (and stored so); a value on a midpoint of two codes takes the
    lower one (bucketize). Kept verbatim so codes and absmax match bit for bit."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


@functools.lru_cache(maxsize=None)
def _dynamic_table(device: torch.device) -> torch.Tensor:
    """bitsandbytes' CPU rounding table for the dynamic map: [-1, 1] cut into 65536 steps,
    each mapped to the code whose midpoints bracket it (a midpoint itself goes low)."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    steps = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, steps).to(torch.uint8).to(device)


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, absmax2 float32) of `values` in blocks of 256 with the dynamic map,
    as bitsandbytes 0.50's quantize_blockwise rounds on the CPU (the test oracle): not to
    the nearest code but through `_dynamic_table`, index trunc(((v + 1) / 2) * 65535 + 0.5)
    in float32 steps; an all-zero block gets absmax 0 and code 0."""
    n = values.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(values, (0, blocks * NESTED_BLOCKSIZE - n)).view(blocks, NESTED_BLOCKSIZE)
    absmax2 = padded.abs().amax(dim=1)
    inverse = torch.where(absmax2 > 0, 1.0 / absmax2, torch.zeros_like(absmax2))
    normed = torch.clamp(padded * inverse[:, None], -1, 1)
    step = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int32)
    codes = _dynamic_table(values.device)[step.long()]
    codes = torch.where(absmax2[:, None] > 0, codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], absmax2


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """NF4-quantize `weight` (any shape, float16/bfloat16/float32), bit-identical to
    bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant) on the CPU. Plain PyTorch on weight's device. An
    empty weight gives an empty state (with double_quant its offset, the mean of no absmax,
    is NaN, as in bitsandbytes)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight: expected dtype float16, bfloat16 or float32, got {weight.dtype}")
    if weight.dim() == 0:
        raise ValueError("weight: expected a tensor of rank >= 1, got a 0-d tensor")
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected bool, got {type(double_quant).__name__}")
    code = nf4_code(weight.device)
    packed, absmax = _quantize_nf4(weight.detach().reshape(-1).float(), blocksize, code)
    if not double_quant:
        return NF4Weight(packed, absmax, blocksize, tuple(weight.shape), weight.dtype, code)
    offset = absmax.mean()
    codes, absmax2 = _quantize_dynamic(absmax - offset)
    return NF4Weight(packed, codes, blocksize, tuple(weight.shape), weight.dtype, code, absmax2,
                     dynamic_map(weight.device), offset)


# ----------------------------------------------------------------------------- kernels


# Compiled, the 16 values of Code live in registers, not behind a load per code: lane l of
# every warp holds Code[l % 16], and a code is looked up with one warp shuffle from the lane
# it names. shfl.sync.idx takes the low 5 bits of its lane operand, so a byte's low nibble
# needs no mask (bit 4 only picks one of the table's two copies) and its high nibble one
# shift. The interpreter has no inline PTX and reads Code directly: the same float32 values.
_LOOKUP = tl.constexpr(
    "{ .reg .b32 hi; shr.u32 hi, $2, 4; shfl.sync.idx.b32 $0, $3, hi, 0x1f, -1; "
    "shfl.sync.idx.b32 $1, $3, $2, 0x1f, -1; }"
)


@triton.jit
def _code_table(Code):
    """This thread's share of the NF4 table for `_decode`: Code[lane % 16], one float32
    register, read once per program (unused interpreted)."""
    if INTERPRETED:
        return 0.0
    else:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
        return tl.load(Code + (lane & 15))


@triton.jit
def _decode(codes, Code, table):
    """float32 (Code[codes >> 4], Code[codes & 15]) of int32 bytes `codes` (0..255, any
    shape): the values of a byte's high (earlier) and low nibble. Compiled, two warp
    shuffles of `table` (`_code_table`) and a shift per byte, no memory access; every lane
    of the warp runs it (Triton code is warp-uniform). Not declared pure, so that LLVM
    never moves a shuffle into a branch that some lanes skip."""
    if INTERPRETED:
        return tl.load(Code + (codes >> 4)), tl.load(Code + (codes & 15))
    else:
        return tl.inline_asm_elementwise(_LOOKUP, "=f,=f,r,f", [codes, table], dtype=(tl.float32, tl.float32),
                                         is_pure=False, pack=1)


@triton.jit
def _nested_offset(Offset, NESTED: tl.constexpr):
    """The double quantization's offset (read once per program), or 0.0 without it."""
    if NESTED:
        return tl.load(Offset)
    else:
        return 0.0


@triton.jit
def _mul_rn(a, b):
    """float32 a * b, rounded on its own even where the launch lets products fuse with sums
    into FMAs (the GEMV's does): PTX never contracts a mul with an explicit rounding mode."""
    if INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _scales(Absmax, Absmax2, Code2, offset, block, NESTED: tl.constexpr):
    """float32 scales of the 4-bit blocks `block` (int tensor, any shape, in range):
    absmax[block], or code2[absmax[block]] * absmax2[block // 256] + offset, rounded after
    the product as bitsandbytes does (no FMA, whatever the launch's fp fusion); offset
    from `_nested_offset`."""
    if NESTED:
        q = tl.load(Absmax + block).to(tl.int32)
        return _mul_rn(tl.load(Code2 + q), tl.load(Absmax2 + block // _NESTED_BLOCKSIZE)) + offset
    else:
        return tl.load(Absmax + block)


@triton.jit
def _weight_halves(P, Code, table, Absmax, Absmax2, Code2, offset, rows, k0, K, offs_j,
                   BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr):
    """float32 (hi, lo) tiles of W[rows, k0 + 2j] and W[rows, k0 + 2j + 1], j in offs_j:
    the two codes of one byte. rows (int64) and offs_j: index tensors that broadcast
    against each other (e.g. rows[:, None] and offs_j[None, :]), giving the tiles' shape;
    rows in range; K even, so rows start on a byte.

    ALIGNED (K % BLOCKSIZE == 0 and the K tile inside one block): one scale per row, and
    every row's bytes start 16-byte aligned (K / 2 is a multiple of 16), so the tile loads
    as 16-byte vectors along K. Else each byte gets its own scale (both of its codes share
    a block: block sizes are even) and bytes past K read code 0 (the caller's x is 0
    there)."""
    # The scales load before the codes: Triton gives the tile the layout of the last large
    # load in program order (RemoveLayoutConversions), and that must be the codes' own
    # (16 bytes along K per thread), not one that moves the decoded tile between threads.
    if ALIGNED:
        scale = _scales(Absmax, Absmax2, Code2, offset, rows * (K // BLOCKSIZE) + k0 // BLOCKSIZE, NESTED)
        # K // 2 written so the compiler sees a multiple of BLOCKSIZE // 2 (>= 16 bytes).
        codes = tl.load(P + rows * ((K // BLOCKSIZE) * (BLOCKSIZE // 2)) + k0 // 2 + offs_j).to(tl.int32)
    else:
        cols = k0 + 2 * offs_j
        scale = _scales(Absmax, Absmax2, Code2, offset, (rows * K + tl.minimum(cols, K - 2)) // BLOCKSIZE, NESTED)
        codes = tl.load(P + rows * (K // 2) + (k0 // 2 + offs_j), mask=cols < K, other=0).to(tl.int32)
    hi, lo = _decode(codes, Code, table)
    return hi * scale, lo * scale


@triton.jit
def _dequantize_kernel(P, Code, Absmax, Absmax2, Code2, Offset, Out, numel, nbytes,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """Out[i] = code[nibble i] * scale(i // BLOCKSIZE) for BLOCK consecutive elements
    (nbytes = ceil(numel / 2) packed bytes): each byte read once, its two values
    interleaved back into element order. The tile is (ROWS, SPAN) elements, each row
    inside one quantization block, so a scale is read once per row."""
    SPAN: tl.constexpr = BLOCK if BLOCK < BLOCKSIZE else BLOCKSIZE
    ROWS: tl.constexpr = BLOCK // SPAN
    pid = tl.program_id(0).to(tl.int64)
    row_first = pid * BLOCK + tl.arange(0, ROWS) * SPAN  # each row's first element
    block = tl.minimum(row_first // BLOCKSIZE, (numel - 1) // BLOCKSIZE)  # rows past the end: any block in range
    scale = _scales(Absmax, Absmax2, Code2, _nested_offset(Offset, NESTED), block, NESTED)[:, None]
    byte = row_first[:, None] // 2 + tl.arange(0, SPAN // 2)[None, :]
    codes = tl.load(P + byte, mask=byte < nbytes, other=0).to(tl.int32)
    hi, lo = _decode(codes, Code, _code_table(Code))
    offs = row_first[:, None] + tl.arange(0, SPAN)[None, :]
    values = tl.interleave(hi * scale, lo * scale)
    tl.store(Out + offs, rounded(values, Out.dtype.element_ty), mask=offs < numel)


@triton.jit
def _gemv_kernel(
    X, P, Code, Absmax, Absmax2, Code2, Offset, Bias, Out, Partial,
    M, N, K, split_len, stride_xm, stride_xk, stride_om, stride_on,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Out[rows, cols] = X[rows] @ W[cols]^T over K range [split * split_len, +split_len):
    each program dequantizes a (BLOCK_N, BLOCK_K) weight slab once per K step and
    multiplies it into BLOCK_M rows with float32 FMAs, even and odd columns apart so the
    packed bytes need no interleaving. The products accumulate elementwise in a
    (BLOCK_M, BLOCK_N, BLOCK_K / 2) tile, summed over K once at the end: the loop has no
    cross-lane traffic but the table lookups. For decode: no tl.dot padding rows up to 16."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    x_base = X + rows[:, None, None].to(tl.int64) * stride_xm
    x_ok = (rows < M)[:, None, None]
    w_rows = (cols % N).to(tl.int64)[None, :, None]
    table = _code_table(Code)
    offset = _nested_offset(Offset, NESTED)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    start, stop = k_span(split, split_len, K)
    start = tl.multiple_of(start, BLOCK_K)  # split_len is whole K steps: rows' bytes load 16-byte aligned
    for k0 in range(start, stop, BLOCK_K):
        # x read contiguously (vector loads), then split into its even and odd columns; read
        # before the weight tile so that the tile's layout rules (see _weight_halves).
        k = k0 + offs_k
        if ALIGNED:  # whole K steps
            x = tl.load(x_base + k[None, None, :] * stride_xk, mask=x_ok, other=0.0)
        else:
            x = tl.load(x_base + k[None, None, :] * stride_xk, mask=x_ok & (k < K)[None, None, :], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_M, 1, BLOCK_K // 2, 2)))
        hi, lo = _weight_halves(P, Code, table, Absmax, Absmax2, Code2, offset, w_rows, k0, K, offs_j[None, None, :],
                                BLOCKSIZE, NESTED, ALIGNED)
        acc += x_even * hi
        acc += x_odd * lo
    # No activation, so no pre-activation either: Out stands in for the unused Pre.
    finish(tl.sum(acc, axis=2), rows, cols, M, N, Bias, Out, Out, Partial, split, 1, stride_om, stride_on, 0, 0,
           IDENTITY, HAS_BIAS, False, SPLIT_K)


@triton.jit
def _gemm_kernel(
    X, P, Code, Absmax, Absmax2, Code2, Offset, Bias, Out, Partial,
    M, N, K, split_len, stride_xm, stride_xk, stride_om, stride_on,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of Out = X @ W^T over one K split: the packed tile is
    dequantized in registers, interleaved into column order, rounded to X's dtype (the
    weight bitsandbytes' dequantize-then-matmul multiplies) and fed to tl.dot."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    # Rows past the edge wrap around: their loads need no mask, the store drops them.
    x_base = X + (rows % M)[:, None].to(tl.int64) * stride_xm
    w_rows = (cols % N).to(tl.int64)[:, None]
    table = _code_table(Code)
    offset = _nested_offset(Offset, NESTED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, stop = k_span(split, split_len, K)
    start = tl.multiple_of(start, BLOCK_K)  # split_len is whole K steps: rows' bytes load 16-byte aligned
    for k0 in range(start, stop, BLOCK_K):
        x_ptrs = x_base + (k0 + offs_k)[None, :] * stride_xk
        if ALIGNED:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k0 + offs_k < K)[None, :], other=0.0)
        hi, lo = _weight_halves(P, Code, table, Absmax, Absmax2, Code2, offset, w_rows, k0, K, offs_j[None, :],
                                BLOCKSIZE, NESTED, ALIGNED)
        w = rounded(tl.interleave(hi, lo), X.dtype.element_ty)
        acc = dot(x, tl.trans(w), acc, PRECISION)
    finish(acc, rows, cols, M, N, Bias, Out, Out, Partial, split, 1, stride_om, stride_on, 0, 0,
           IDENTITY, HAS_BIAS, False, SPLIT_K)


_DECODE = (_code_table, _decode, _nested_offset, _mul_rn, _scales, _weight_halves, *SOURCES)
DEQUANTIZE = autotune.Kernel(
    "nf4_dequantize", space=tuning.DEQUANTIZE_SPACE, key=tuning.dequantize_bucket, default=tuning.dequantize_default,
    interpreter=tuning.DEQUANTIZE_INTERPRETER,
    sources=(_dequantize_kernel, _code_table, _decode, _nested_offset, _mul_rn, _scales, rounded),
)
GEMV = autotune.Kernel(
    "nf4_gemv", space=tuning.GEMV_SPACE, key=tuning.matmul_bucket, default=tuning.gemv_default,
    interpreter=tuning.GEMV_INTERPRETER, prune=tuning.gemv_fits, sources=(_gemv_kernel, *_DECODE),
)
GEMM = autotune.Kernel(
    "nf4_gemm", space=tuning.GEMM_SPACE, key=tuning.matmul_bucket, default=tuning.gemm_default,
    interpreter=tuning.GEMM_INTERPRETER, prune=tuning.gemm_fits,
    sources=(_gemm_kernel, grouped_tile, dot, rounded, *_DECODE),
)


# ----------------------------------------------------------------------------- launchers


def _pointers(packed, code, absmax, absmax2, code2, offset) -> tuple:
    """Kernel pointer arguments; without double quantization the nested ones are unused
    placeholders (NESTED=False never reads them)."""
    if absmax2 is None:
        return packed, code, absmax, absmax, code, absmax
    return packed, code, absmax, absmax2, code2, offset


def launch_dequantize(state: tuple, out: torch.Tensor, blocksize: int) -> None:
    """out (contiguous, numel of the weight) = the dequantized weight of `state`
    (NF4Weight.tensors()). Floating-point contraction is off: a fused multiply-add would
    round the nested scale differently from bitsandbytes."""
    numel = out.numel()
    if is_empty(numel):
        return
    check_layout(state, tuple(out.shape), blocksize)

    def launch(config):
        grid = (cdiv(numel, config.meta["BLOCK"]),)
        _dequantize_kernel[grid](*_pointers(*state), out, numel, (numel + 1) // 2, BLOCKSIZE=blocksize,
                                 NESTED=state[3] is not None, enable_fp_fusion=False, **config.launch_kwargs())

    launch(DEQUANTIZE.lookup(launch, numel=numel, dtype=out.dtype))


def launch_matmul(x: torch.Tensor, state: tuple, bias, out: torch.Tensor, blocksize: int, path: str) -> None:
    """out (M, N) = x (M, K) @ W^T + bias on `path` ("gemv" or "gemm"); W (N, K) given by
    `state` (NF4Weight.tensors()), K even; x and out any strides, bias contiguous. The
    state's and bias's sizes are checked here, at every launch (metadata, no sync)."""
    m, k = x.shape
    n = out.shape[1]
    if is_empty(m, n):
        return
    if k % 2 or (bias is not None and (bias.numel() != n or not bias.is_contiguous())):
        raise ValueError(f"nf4 matmul: expected an even in_features and a contiguous ({n},) bias, got x {tuple(x.shape)}"
                         f" and bias {None if bias is None else (tuple(bias.shape), bias.stride())}")
    check_layout(state, (n, k), blocksize)
    if state[0].device != x.device:
        raise ValueError(f"nf4 matmul: x on {x.device}, the weight on {state[0].device}; they must match")
    pointers = _pointers(*state)

    def launch(config):
        split, block_k = config.meta["SPLIT_K"], config.meta["BLOCK_K"]
        partial = partials(out, split)
        args = (x, *pointers, out if bias is None else bias, out, partial, m, n, k, split_len(k, block_k, split),
                *x.stride(), *out.stride())
        flags = dict(BLOCKSIZE=blocksize, NESTED=state[3] is not None, HAS_BIAS=bias is not None,
                     ALIGNED=k % blocksize == 0 and blocksize % block_k == 0)
        if path == "gemv":
            block_m = tuning.pow2(m, 1, 16)
            grid = (cdiv(n, config.meta["BLOCK_N"]), split, cdiv(m, block_m))
            _gemv_kernel[grid](*args, BLOCK_M=block_m, **flags, **config.launch_kwargs())
        else:
            grid = (cdiv(m, config.meta["BLOCK_M"]) * cdiv(n, config.meta["BLOCK_N"]), split)
            # No contraction: the dequantized tile equals dequantize()'s bit for bit (it costs
            # nothing here, where products accumulate in tl.dot; the GEMV's FMAs keep it).
            _gemm_kernel[grid](*args, PRECISION=dot_precision(x.dtype), **flags, enable_fp_fusion=False,
                               **config.launch_kwargs())
        if split > 1:
            launch_split_sum(partial, bias, out, None, None)

    kernel = GEMV if path == "gemv" else GEMM
    launch(kernel.lookup(launch, m=m, n=n, k=k, dtype=x.dtype, blocksize=blocksize))


# ----------------------------------------------------------------------------- custom ops and autograd


@custom_op("tritium::nf4_dequantize", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
    code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int, shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    launch_dequantize((packed, code, absmax, absmax2, code2, offset), out, blocksize)
    return out


@_dequantize_op.register_fake
def _(packed, code, absmax, absmax2, code2, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@custom_op("tritium::nf4_matmul", mutates_args=())
def _matmul_op(
    x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
    absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], blocksize: int, out_features: int, path: str,
) -> torch.Tensor:
    """x (M, K) @ W^T + bias -> (M, out_features) in x's dtype."""
    out = x.new_empty((x.shape[0], out_features))
    launch_matmul(x, (packed, code, absmax, absmax2, code2, offset), bias, out, blocksize, path)
    return out


@_matmul_op.register_fake
def _(x, packed, code, absmax, absmax2, code2, offset, bias, blocksize, out_features, path):
    return x.new_empty((x.shape[0], out_features))


class NF4MatmulFunction(torch.autograd.Function):
    """x (M, K) @ W^T + bias with W frozen in NF4; gradients for x and bias."""

    @staticmethod
    def forward(ctx, x, bias, shape, blocksize, path, *state):
        ctx.save_for_backward(*state)
        ctx.shape, ctx.blocksize = shape, blocksize
        return _matmul_op(x, *state, bias, blocksize, shape[0], path)

    @staticmethod
    def backward(ctx, dy):
        # dx = dy @ W: dequantize W once into dy's dtype and let cuBLAS multiply. Training
        # runs this at many tokens, where the GEMM is compute-bound and dequantizing
        # (0.5 byte read, 2 written per weight) costs a few percent of it; a fused kernel
        # would have to beat cuBLAS to win that back. bitsandbytes' QLoRA backward holds
        # the same transient 16-bit W.
        dx = dbias = None
        if ctx.needs_input_grad[0] and is_empty(*dy.shape):  # no W needed: dx is empty, or zeros
            dx = dy.new_zeros((dy.shape[0], ctx.shape[1]))
        elif ctx.needs_input_grad[0]:
            dx = dy @ _dequantize_op(*ctx.saved_tensors, ctx.blocksize, list(ctx.shape), dy.dtype)
        if ctx.needs_input_grad[1]:
            dbias = dy.sum(0)
        return dx, dbias, None, None, None, *([None] * len(ctx.saved_tensors))


# ----------------------------------------------------------------------------- public API


def _check_weight(w, device: torch.device | None = None) -> None:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w: expected an NF4Weight (from tritium.nf4.quantize), got {type(w).__name__}")
    check_device("w", w.packed)
    if device is not None and w.device != device:
        raise ValueError(f"w: on {w.device}, x on {device}; they must match")


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of `w` (its shape) in `dtype` (default: the dtype it was quantized from),
    equal to bitsandbytes' dequantize_4bit: code * scale in float32, bit for bit, then
    rounded to nearest-even into a 16-bit dtype."""
    _check_weight(w)
    dtype = w.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
    return _dequantize_op(*w.tensors(), w.blocksize, list(w.shape), dtype)


def matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, *, path: str = "auto") -> torch.Tensor:
    """x @ W^T + bias, W the NF4 weight (out_features, in_features) of `w` (nn.Linear's
    layout), read once in packed form; differentiable w.r.t. x and bias.

    x: (..., in_features) float16, bfloat16 or float32, any strides; in_features even
    (two codes share a byte). bias: None or (out_features,) in x's dtype. Returns
    (..., out_features) in x's dtype, accumulated in float32. path: "auto" (by token
    count, nf4_tuning.GEMV_BUCKETS), "gemv" or "gemm" to force one."""
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        raise ValueError("x: expected a tensor (..., in_features), got a 0-d tensor")
    check_tensor("x", x, shape="(..., in_features)", ndim=x.dim() if isinstance(x, torch.Tensor) else 2)
    _check_weight(w, x.device)
    if len(w.shape) != 2:
        raise ValueError(f"w: expected a 2-d (out_features, in_features) weight, got shape {w.shape}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} must equal w's in_features {k} (w is {w.shape})")
    if k % 2:
        raise ValueError(f"w: in_features = {k} is odd; two 4-bit codes share a byte, so rows must have an even "
                         "length for the matmul (dequantize handles any shape)")
    if bias is not None:
        check_tensor("bias", bias, shape="(out_features,)", ndim=1)
        if bias.shape[0] != n or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias: expected ({n},) {x.dtype} on {x.device}, got {tuple(bias.shape)} {bias.dtype} "
                             f"on {bias.device}")
        bias = bias.contiguous()
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    rows = as_rows(x)
    chosen = tuning.path(rows.shape[0]) if path == "auto" else path
    out = run_function(NF4MatmulFunction, rows, bias, w.shape, w.blocksize, chosen, *w.tensors())
    return out.reshape(*x.shape[:-1], n)
