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

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritium.kernels import attention, block_sparse
from tritium.kernels import attention_backward as backward
from tritium.kernels import attention_tuning as tuning

SCALARS_I32 = {"seqlen_q", "seqlen_k", "window_left", "window_right", "split_len", "heads_q", "heads_kv", "group",
               "heads", "seqlen_new", "max_seqlen", "num_splits", "width"}
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
    return f"{label:90s} registers {regs:>4}  stack {stack:>5} B  shared {kernel.metadata.shared:>6} B"


def _defaults(head_dim: int, softcap: bool) -> tuple:
    """The heuristic default configs of the three attention kernels for a bf16 causal 4k problem."""
    bucket = tuning.attention_bucket(head_dim=head_dim, dtype=torch.bfloat16, seqlen_q=4096, seqlen_k=4096,
                                     window_left=-1, window_right=0, softcap=50.0 if softcap else 0.0, group=1)
    return tuning.fwd_default(**bucket), tuning.dq_default(**bucket), tuning.dkdv_default(**bucket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    arch = parser.parse_args().arch
    print(f"triton {triton.__version__}, sm_{arch}, the heuristic default config of each kernel")
    kernels = (("fwd", attention._attn_fwd_kernel), ("bwd dq", backward._attn_bwd_dq_kernel),
               ("bwd dkdv", backward._attn_bwd_dkdv_kernel))
    for head_dim in (64, 128, 256):
        for softcap in (False, True):
            for (name, fn), config in zip(kernels, _defaults(head_dim, softcap)):
                constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, SOFTCAP=softcap, HAS_KEY_MASK=False,
                                 PRECISION="tf32", **config.meta)
                if name == "fwd":
                    constants.update(PACK=1, HAS_SEQLENS=False)
                print(report(fn, constants, config.num_warps, config.num_stages,
                             f"attention {name} d{head_dim} softcap={softcap} [{config}]", arch))
    constants = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK=64, HAS_KEY_MASK=True, PRECISION="tf32")
    print(report(block_sparse._bs_fwd_kernel, constants, 4, 2, "block-sparse fwd b64 d64", arch))
    print(report(block_sparse._bs_bwd_dq_kernel, constants, 4, 2, "block-sparse bwd dq b64 d64", arch))
    print(report(block_sparse._bs_bwd_dkdv_kernel, {**constants, "WIDTH": 64}, 4, 2, "block-sparse bwd dkdv", arch))


if __name__ == "__main__":
    main()
