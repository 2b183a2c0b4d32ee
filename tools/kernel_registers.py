"""Registers, stack (spills), shared memory and SASS instruction counts of the quadratic kernels compiled for Hopper, without a GPU.

Triton compiles for a named target (sm_90) on any Linux machine; its bundled cuobjdump reads
the registers and stack of the cubin. The kernels are specialised as a contiguous bf16 launch
(B=1, H=16, N a multiple of 16) would specialise them on the GPU: unit strides and GROUPS=1 as
constants, pointers and the other integers divisible by 16; block sizes, warps and stages are
the launchers' defaults (``kernels/ops.py``). The counts track the GPU's within a few
registers when Triton's version is the same, and show which change raises register pressure
before any device time is spent; they are not timings. The SASS counts are static (code size:
a loop body counts once), as a proxy for the element-wise work of code that runs few times, such
as the hybrid's band tiles.

    python tools/kernel_registers.py --dims 64,128 --out benchmarks/h200/quadratic/registers.json

``--hybrid`` also reports the hybrid window's quadratic kernels (kernels/window_quadratic.py) at
the same tiles, with dq in its own kernel (DQ_MODE 0, what every case but bf16 D=128 on Hopper
runs).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (before the kernels are defined)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastmax_hf.kernels import ops, quadratic, window_ops, window_quadratic  # noqa: E402

POINTERS = {"Q": "*bf16", "K": "*bf16", "KF": "*bf16", "V": "*bf16", "DO": "*bf16", "O": "*bf16", "DQ": "*bf16",
            "DK": "*bf16", "DV_OUT": "*bf16", "MASK": "*u8", "DEN": "*fp32", "INV_DEN": "*fp32", "CROW": "*fp32",
            "M": "*fp32", "GAIN": "*fp32", "INV_R": "*fp32", "CROW_R": "*fp32", "DQ_ACC": "*fp32"}
FLOATS = {"a0", "c1", "c2"}
UNIT = {"stride_qd", "stride_kd", "stride_kfd", "stride_vd", "stride_dod", "stride_od", "stride_mn", "GROUPS"}
KERNELS = {"fwd": quadratic.quadratic_fwd_kernel, "dq": quadratic.quadratic_bwd_dq_kernel,
           "dkdv": quadratic.quadratic_bwd_dkdv_kernel}
HYBRID_KERNELS = {"hybrid_fwd": window_quadratic.hybrid_quadratic_fwd_kernel,
                  "hybrid_dq": window_quadratic.hybrid_quadratic_bwd_dq_kernel,
                  "hybrid_dkdv": window_quadratic.hybrid_quadratic_bwd_dkdv_kernel}


def compile_report(fn, constexprs: dict, warps: int, stages: int, arch: int = 90) -> dict:
    """Registers per thread, stack bytes per thread and dynamic shared memory of one compiled kernel."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in constants:
            signature[name] = "constexpr"
        elif name in UNIT:
            signature[name], constants[name] = "constexpr", 1
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[-300:]}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)), "shared_bytes": compiled.metadata.shared,
            **sass_counts(sass)}


# SASS opcodes of element-wise work: float and integer arithmetic, comparisons, selects, conversions
ELEMENTWISE = {"FADD", "FMUL", "FFMA", "FSEL", "FSETP", "FMNMX", "ISETP", "IADD3", "IMAD", "LOP3", "PLOP3", "SEL",
               "SHF", "LEA", "PRMT", "F2FP", "MUFU", "VIADD", "VIMNMX", "IMNMX"}


def sass_counts(sass: str) -> dict:
    """Static instruction counts of a kernel's SASS (code size, not instructions executed): all
    of them, the element-wise ones (ELEMENTWISE), the ex2/rcp unit's (MUFU) and the wgmma ones."""
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return {"sass_instructions": len(opcodes), "sass_elementwise": sum(op in ELEMENTWISE for op in opcodes),
            "sass_mufu": opcodes.count("MUFU"), "sass_hgmma": opcodes.count("HGMMA")}


def default_report(D: int, causal: bool = True, hybrid: bool = False) -> dict:
    """Every quadratic kernel (and with ``hybrid`` the window's) at the launchers' default tiles
    for bf16, head dim D."""
    problem = ops._Problem(1, 16, 16, 16384, 16384, D, D, torch.bfloat16, False)
    rows = {}
    kernels = {**KERNELS, **(HYBRID_KERNELS if hybrid else {})}
    for name, fn in kernels.items():
        kind = name.removeprefix("hybrid_")
        cfg = (window_ops._hybrid_quad_config if name.startswith("hybrid_") else ops._quad_config)(problem, kind)
        constexprs = dict(P=2, HAS_MASK=False, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], **problem.flags())
        parameters = inspect.signature(fn.fn).parameters
        if "CAUSAL" in parameters:  # the hybrid is causal by construction
            constexprs["CAUSAL"] = causal
        if "DQ_MODE" in parameters:
            constexprs["DQ_MODE"] = 0
        if kind != "fwd":
            constexprs["OP_BF16"] = True
        rows[name] = {"tiles": cfg, **compile_report(fn, constexprs, cfg["warps"], cfg["stages"])}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="64,128", help="head dims (default: %(default)s)")
    parser.add_argument("--hybrid", action="store_true", help="also the hybrid window's quadratic kernels")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    args = parser.parse_args(argv)
    try:
        dims = [int(d) for d in args.dims.split(",")]
    except ValueError:
        parser.error(f"--dims must be comma-separated integers, got {args.dims!r}")
    results = {"meta": {"triton": triton.__version__, "target": "sm_90", "dtype": "bfloat16", "causal": True},
               "kernels": {str(D): default_report(D, hybrid=args.hybrid) for D in dims}}
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
