"""Registers and spills of the Triton attention kernels compiled for sm_90a, without a GPU: triton.compile on an
ASTSource (target cuda 90), then ptxas -v on its PTX. For checking a kernel change's register cost on a CPU machine
before device time is spent; the configs are the first (SCALED_ROPE_AUTOTUNE=0) of each kernel at head_dim 128.

    python tools/triton_spills.py [--features xpos,logn,window] [--dtype bf16|fp16]

Needs ptxas on PATH (the CUDA toolkit). Internal: reads the kernels of scaled_rope.triton_kernels.attention.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from scaled_rope.triton_kernels import attention

POINTERS = ["Q", "K", "V", "Q_far", "K_far", "Out", "DO", "DK", "DK_far", "DV", "DQ", "DQ_far"]
FLOAT_POINTERS = ["Lse", "Lse2", "Delta", "XRate"]
FLOAT_SCALARS = ["sm_scale", "sm_scale_log2", "inv_ln_logn"]


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # under the autotuner
        kernel = kernel.fn
    return kernel


def ptxas_summary(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str) -> str:
    fn = jit_function(kernel)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in FLOAT_POINTERS:
            signature[name] = "*fp32"
        elif name in ("QPos", "KPos"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run(["ptxas", "-v", "-arch=sm_90a", str(ptx), "-o", "/dev/null"], capture_output=True,
                                text=True)
    lines = [line.split("info    :")[-1].strip() for line in result.stderr.splitlines() if "spill" in line or "Used" in line]
    return " | ".join(lines) or result.stderr.strip()[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default="", help="comma-separated: xpos, logn, window")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    if shutil.which("ptxas") is None:
        print("triton_spills: ptxas is not on PATH")
        return 1
    features = {f for f in args.features.split(",") if f}
    unknown = features - {"xpos", "logn", "window"}
    if unknown:
        print(f"triton_spills: unknown features {sorted(unknown)}")
        return 1
    common = dict(N_BUCKET=16384, BH_BUCKET=32, HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_WINDOW="window" in features,
                  REROPE=False, EXPLICIT=False, LOGN="logn" in features, XPOS="xpos" in features, DOT_PREC="tf32")
    print(f"triton {triton.__version__}, sm_90a, head_dim 128, {args.dtype}, features {sorted(features) or 'none'}")
    for name, kernel, configs in (("forward", attention._attn_fwd, attention._FWD_CONFIGS),
                                  ("dk/dv", attention._attn_bwd_dkdv, attention._DKDV_CONFIGS),
                                  ("dq", attention._attn_bwd_dq, attention._DQ_CONFIGS)):
        config = configs[0]
        summary = ptxas_summary(kernel, dict(common, **config.kwargs), config.num_warps, config.num_stages, args.dtype)
        print(f"{name} {config.kwargs} warps {config.num_warps} stages {config.num_stages}: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
