"""Compile the attention and block-sparse kernels for a GPU target without a GPU, and print
what ptxas reports: registers, spill bytes, shared memory. A check for sessions without a
GPU that a kernel still builds for sm_90 on the installed Triton, and where it spills.

    python -m benchmarks.compile_check [--arch 90]

Run it without TRITON_INTERPRET (the kernels must be decorated for compilation).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritium.kernels import attention, block_sparse
from tritium.kernels import attention_backward as backward

SCALARS_I32 = {"seqlen_q", "seqlen_k", "window_left", "window_right", "split_len", "heads_q", "heads_kv", "group",
               "heads", "seqlen_new", "max_seqlen", "num_splits"}
SCALARS_F32 = {"qk_scale", "cap_log2", "sm_scale"}
POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "KeyMask": "*u8", "SeqlensK": "*i32", "Lists": "*i32", "Counts": "*i32"}
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def _signature(fn, constants: dict, dtype: str) -> dict:
    def kind(name):
        if name in constants:
            return "constexpr"
        if name.startswith("stride") or name in SCALARS_I32:
            return "i32"
        if name in SCALARS_F32:
            return "fp32"
        return POINTERS.get(name, f"*{dtype}")

    return {name: kind(name) for name in fn.arg_names}


def _resource_usage(kernel) -> tuple[str, str]:
    """(registers, spill-store bytes) of the compiled cubin, from the cuobjdump bundled with
    Triton (the CUDA toolkit's ptxas may be older than the PTX this Triton writes)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        log = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    except OSError:
        log = ""
    finally:
        os.unlink(f.name)
    regs = re.findall(r"REG:(\d+)", log)
    spill = re.findall(r"STACK:(\d+)", log)
    return (regs[0] if regs else "?"), (spill[0] if spill else "?")


def report(fn, constants: dict, warps: int, stages: int, label: str, arch: int, dtype: str = "bf16") -> str:
    """Compile `fn` for sm_<arch>; one line: registers, stack (spill) bytes, shared memory."""
    constants = {**{s: 1 for s in UNIT_STRIDES if s in fn.arg_names}, **constants}
    kernel = triton.compile(ASTSource(fn, _signature(fn, constants, dtype), constants),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    regs, stack = _resource_usage(kernel)
    return f"{label:48s} registers {regs:>4}  stack {stack:>5} B  shared {kernel.metadata.shared:>6} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    arch = parser.parse_args().arch
    print(f"triton {triton.__version__}, sm_{arch}")
    for head_dim, (bm, bn, warps, stages) in ((64, (128, 64, 8, 3)), (128, (128, 64, 8, 3)), (256, (64, 32, 8, 2))):
        for softcap in (False, True):
            constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=bm, BLOCK_N=bn, PACK=1, SOFTCAP=softcap,
                             HAS_KEY_MASK=False, HAS_SEQLENS=False, PRECISION="tf32")
            print(report(attention._attn_fwd_kernel, constants, warps, stages,
                         f"attention fwd d{head_dim} softcap={softcap}", arch))
    for head_dim, (bm, bn, warps, stages) in ((64, (32, 128, 8, 2)), (128, (64, 64, 8, 1)), (256, (32, 32, 8, 1))):
        constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=bm, BLOCK_N=bn, SOFTCAP=False,
                         HAS_KEY_MASK=False, PRECISION="tf32")
        print(report(backward._attn_bwd_dq_kernel, constants, warps, stages, f"attention bwd dq d{head_dim}", arch))
        print(report(backward._attn_bwd_dkdv_kernel, constants, warps, stages, f"attention bwd dkdv d{head_dim}", arch))
    constants = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK=64, HAS_KEY_MASK=True, PRECISION="tf32")
    print(report(block_sparse._bs_fwd_kernel, constants, 4, 2, "block-sparse fwd b64 d64", arch))
    print(report(block_sparse._bs_bwd_dq_kernel, constants, 4, 2, "block-sparse bwd dq b64 d64", arch))
    print(report(block_sparse._bs_bwd_dkdv_kernel, {**constants, "WIDTH": 64}, 4, 2, "block-sparse bwd dkdv", arch))


if __name__ == "__main__":
    main()
