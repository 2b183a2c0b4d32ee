"""Launchers for the Fastmax kernels, registered as PyTorch custom operators.

``fastmax_hf::forward`` and ``fastmax_hf::backward`` are opaque to torch.compile (no
graph break: they have fake implementations for shape propagation), cast to bf16 under
autocast, and connect through ``register_autograd``.

Inputs are read through their strides: q (B, Hq, Nq, D) may be a transposed view of
the (B, Nq, Hq, D) memory that Hugging Face models produce. Block sizes, warps and
pipeline depths come from ``settings.current_settings()`` where set, else from the
defaults below (measured on an H200: BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton.language as tl

from .common import cdiv, next_power_of_2
from .linear import (
    chunk_states_kernel,
    linear_bwd_dkdv_kernel,
    linear_bwd_dq_kernel,
    linear_fwd_kernel,
    state_scan_kernel,
)
from .quadratic import backward_rows_kernel, quadratic_bwd_dkdv_kernel, quadratic_bwd_dq_kernel, quadratic_fwd_kernel
from .settings import current_settings

# Tiles of the (m, n) grid of second-order features: BT x BT pair products per tile.
PAIR_TILE = 16
# Registers and spills of the last compiled launch of each kernel (see ``compiled_stats``).
_KERNEL_STATS: dict[str, tuple[int, int]] = {}


def _pow2_at_least_16(n: int) -> int:
    return max(16, next_power_of_2(n))


def linear_layout(dim: int, p: int):
    """(BLOCK_D, number of pair tiles, state rows F_ROWS) of the linear kernels' state."""
    block_d = _pow2_at_least_16(dim)
    n_tiles = (block_d // PAIR_TILE) * (block_d // PAIR_TILE + 1) // 2 if p == 2 else 0
    return block_d, n_tiles, 1 + block_d + n_tiles * PAIR_TILE * PAIR_TILE


def feature_rows(dim: int, p: int) -> int:
    return linear_layout(dim, p)[2]


def crossover_length(dim: int, p: int, backward: bool = True) -> int:
    """Up to this many keys the quadratic kernel is cheaper (measured: BENCHMARKS.md).

    ``backward``: the crossover of forward+backward (training) rather than forward alone
    (inference)."""
    measured = CROSSOVER.get((p, _pow2_at_least_16(dim)))
    if measured is None:
        return 1 + dim + dim * (dim + 1) // 2 if p == 2 else 1 + dim
    return measured[1] if backward else measured[0]


# Crossovers in keys, (forward, forward+backward), bf16 with the causal mask, read off the
# timings of both regimes with the quadratic cost growing as N^2 and the linear one as N
# (BENCHMARKS.md). p = 1 has 1 + D features: the linear form is the cheaper one from short
# lengths on.
CROSSOVER: dict[tuple[int, int], tuple[int, int]] = {
    (2, 16): (22000, 10000),  # D = 16, 32: the earlier kernels on an H100 (not re-measured)
    (2, 32): (22000, 9500),
    # H200, with the forward's key states kept for the backward (ops.keeps_key_states):
    # benchmarks/h200/kernels/crossover.json (D=64: forward+backward 1.34 ms quadratic against
    # 1.51 linear at 8k, 2.92 against 2.22 at 12k; forward 1.07 / 1.09 at 16k, 3.97 / 2.06 at
    # 32k. D=128, whose states are not kept (larger than q, k, v, o and gradients):
    # forward+backward 9.22 / 19.3 at 16k, 37.1 / 35.1 at 32k; forward 8.64 / 10.1 at 32k); the
    # measurements before it:
    # crossover_2026-12-02.json (10.5k at D=64), crossover_2026-12-02_before_split.json
    (2, 64): (16800, 9300),
    (2, 128): (39000, 31200),  # forward: 8.54 / 10.1 at 32k, 34.0 / 20.2 at 64k (crossover_2026-12-02.json)
}


def choose_regime(len_k: int, dim: int, p: int, backward: bool = True) -> str:
    return "quadratic" if len_k <= crossover_length(dim, p, backward) else "linear"


def compiled_stats() -> dict[str, tuple[int, int]]:
    """(registers per thread, spilled registers) of the last compiled launch of each kernel."""
    return dict(_KERNEL_STATS)


def _record(name, compiled):
    n_regs = getattr(compiled, "n_regs", None)  # None in the interpreter
    if n_regs is not None:
        _KERNEL_STATS[name] = (n_regs, getattr(compiled, "n_spills", 0))


@functools.lru_cache(maxsize=None)
def _pair_tiles(block_d: int, device_str: str):
    """Tiles (mb, nb), nb >= mb, of the upper triangle of the (m, n) grid."""
    blocks = block_d // PAIR_TILE
    pairs = [(mb, nb) for mb in range(blocks) for nb in range(mb, blocks)]
    with torch.inference_mode(False):  # cached: never an inference tensor (see chunked._pair_index)
        tile_m = torch.tensor([p[0] for p in pairs] or [0], dtype=torch.int32, device=device_str)
        tile_n = torch.tensor([p[1] for p in pairs] or [0], dtype=torch.int32, device=device_str)
    return tile_m, tile_n


# ----------------------------------------------------------------------------------------
# what every launch derives from its inputs
# ----------------------------------------------------------------------------------------


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


@dataclass(frozen=True)
class _Problem:
    """Sizes, padded block widths and dtype flags of one call."""

    B: int
    Hq: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    dtype: torch.dtype
    i64: bool

    @classmethod
    def of(cls, q, k, v, *others):
        B, Hq, Nq, D = q.shape
        big = max(_max_offset(t) for t in (q, k, v, *others) if t is not None) >= 2**31 - 1
        big = big or max(B * Hq * Nq, 1) * max(D, v.shape[-1]) >= 2**31 - 1  # the contiguous outputs
        return cls(B, Hq, k.shape[1], Nq, k.shape[2], D, v.shape[-1], q.dtype, big)

    @property
    def groups(self) -> int:
        return self.Hq // self.Hk

    @property
    def block_d(self) -> int:
        return _pow2_at_least_16(self.D)

    @property
    def block_dv(self) -> int:
        return _pow2_at_least_16(self.Dv)

    @property
    def op_bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def precision(self) -> str:
        # fp32 inputs get exact fp32 products; fp16 ones accumulate through fp32 operands in
        # tf32 (fp16 would overflow the growing state and underflow the shrinking gradients)
        return "ieee" if self.dtype == torch.float32 else "tf32"

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32

    def flags(self, block_dv: int | None = None) -> dict:
        block_dv = self.block_dv if block_dv is None else block_dv
        return dict(BLOCK_D=self.block_d, BLOCK_DV=block_dv, EVEN_D=self.D == self.block_d,
                    EVEN_DV=self.Dv % block_dv == 0, PRECISION=self.precision, I64=self.i64)


def _mask_args(mask, like):
    if mask is None:
        return like, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def _chosen(defaults: dict, prefix: str) -> dict:
    """``defaults`` where the settings named ``prefix + key`` leave them open (None)."""
    s = current_settings()
    return {key: default if getattr(s, prefix + key) is None else getattr(s, prefix + key)
            for key, default in defaults.items()}


def _quad_wide(pb: _Problem, kernel: str) -> bool:
    """Whether the quadratic kernel's products take fp32 operands (fp32 inputs; fp16 backward)."""
    return pb.dtype == torch.float32 or (kernel != "fwd" and pb.dtype == torch.float16)


def _quad_settings_prefix(kernel: str) -> str:
    """The KernelSettings prefix of a quadratic kernel: the fused key-block kernel is set
    through the quad_dkdv_ settings."""
    return "quad_dkdv_" if kernel == "fused" else f"quad_{kernel}_"


def _quad_config(pb: _Problem, kernel: str) -> dict:
    """Block sizes, warps and stages of a quadratic kernel ("fwd", "dkdv", "dq", or "fused":
    the key-block kernel that also adds dq): measured defaults, then settings."""
    return _chosen(_quad_defaults(pb, kernel), _quad_settings_prefix(kernel))


def _quad_defaults(pb: _Problem, kernel: str) -> dict:
    """The measured default tiles of ``_quad_config``."""
    wide = _quad_wide(pb, kernel)
    if kernel == "fwd":
        if wide:
            defaults = dict(block_m=64, block_n=32, warps=4, stages=2 if pb.block_d <= 64 else 1)
        elif pb.block_d <= 64:
            defaults = dict(block_m=128, block_n=64, warps=4, stages=3)
        elif pb.block_d <= 128:
            defaults = dict(block_m=64, block_n=64, warps=4, stages=3)
        else:
            defaults = dict(block_m=64, block_n=32, warps=4, stages=1)
        return defaults
    # bf16 tiles from the H200 sweep of benchmarks/h200/kernels/lab4.jsonl (4k and 16k tokens,
    # causal, B=1, H=16): dk/dv 64 x 64 with 3 stages at D=64 (2.26 ms at 16k against 2.49 with
    # 2), 32 queries x 64 keys at D=128 (4.11 ms against 9.74 with 128 x 64 x 8 warps, 4 spilled
    # registers against 108); dq 64 x 64 with 4 warps at both (2.82 ms at D=128 against 3.49)
    if wide:
        defaults = dict(block_m=32, block_n=32, warps=4, stages=1)
    elif kernel == "fused":
        # the key-block kernel that also adds dq: 64 queries x 128 keys, 8 warps (H200, D=128,
        # 16k causal: 7.16 ms against 9.78 with 32 x 64 x 4 warps; benchmarks/h200/quadratic/
        # lab7_fused_dq.jsonl)
        defaults = dict(block_m=64, block_n=128, warps=8, stages=2)
    elif pb.block_d <= 64:
        defaults = dict(block_m=64, block_n=64, warps=4, stages=3 if kernel == "dkdv" else 2)
    elif pb.block_d <= 128:
        defaults = dict(block_m=32 if kernel == "dkdv" else 64, block_n=64, warps=4, stages=2)
    else:
        defaults = dict(block_m=32, block_n=32, warps=4, stages=1)
    return defaults


def _linear_config(pb: _Problem, p: int = 2) -> dict:
    """Chunk, block sizes, warps and stages of the linear kernels: measured defaults, then settings.

    p = 1 has a state of 1 + D rows: short chunks, where the chunk's own tile costs little."""
    wide = pb.dtype != torch.bfloat16  # fp32 operands (fp16 inputs included)
    # p = 2: 1024-token chunks at long sequences (fewer states to write and scan), 512 below
    # 32k keys (more chunks to run in parallel); measured on the H200 (BENCHMARKS.md)
    # Warps and stages per kernel from the H200 sweep at 64k tokens, bf16, p = 2
    # (benchmarks/h200/kernels/lab9_linear_kernels.jsonl): the state kernel with 4 warps
    # (1.84 -> 1.08 ms per pass at D=64, 10.3 -> 7.4 at D=128); at D=64 the forward and dq
    # readouts with 8 warps and 2 stages, the dk/dv readout with 4 warps (6.1 -> 4.4 ms); at
    # D=128 all three with 4 warps (15.4 -> 12.1, 21.5 -> 12.4, 27.5 -> 20.1 ms).
    narrow = pb.block_d <= 64
    defaults = dict(
        chunk=(1024 if max(pb.Nk, pb.Nq) >= 32768 else 512) if p == 2 else 128,
        state_block_k=32 if wide else 64,
        state_block_dv=min(64, pb.block_dv),
        state_warps=4 if not wide and p == 2 else 8,
        state_stages=1,
        block_m=32 if wide else (128 if narrow and p == 2 else 64),
        block_n=32 if wide else 64,
        warps=8 if pb.block_d == 64 or (wide and pb.block_d >= 64) else 4,
        stages=2 if not wide and narrow and p == 2 else 1,
    )
    config = _chosen(defaults, "linear_")
    # the backward readouts follow linear_warps / linear_stages unless their own are set
    s = current_settings()
    config.update(_chosen(dict(
        dq_warps=config["warps"], dq_stages=config["stages"],
        dkdv_warps=s.linear_warps if s.linear_warps is not None else (4 if not wide and p == 2 else config["warps"]),
        dkdv_stages=s.linear_stages if s.linear_stages is not None else 1,
        # 64-row diagonal tiles in the dk/dv readout: 134 -> 48 spilled registers, 4.28 -> 3.11 ms at
        # 64k, D=64 (benchmarks/h200/kernels/lab11/call_stdout.log)
        dkdv_block_m=min(64, config["block_m"]),
    ), "linear_"))
    config["readout_block_dv"] = pb.block_dv if not wide and pb.block_dv <= 128 else min(64, pb.block_dv)
    for name in ("state_block_k", "block_m", "block_n", "dkdv_block_m"):
        if config["chunk"] % config[name]:
            raise ValueError(f"kernel setting linear_chunk={config['chunk']} must be a multiple of "
                             f"linear_{name}={config[name]}")
    return config


# ----------------------------------------------------------------------------------------
# quadratic regime
# ----------------------------------------------------------------------------------------


def quadratic_forward(q, k, v, mask, causal, scale, p, a0, a1, a2):
    pb = _Problem.of(q, k, v)
    out = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=q.dtype, device=q.device)
    den = torch.empty(pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=q.device)
    m, smb, smn = _mask_args(mask, q)
    cfg = _quad_config(pb, "fwd")
    grid = (cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)
    compiled = quadratic_fwd_kernel[grid](
        q, k, v, m, out, den,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, a0, a1 * scale, a2 * scale * scale,
        P=p, CAUSAL=causal, HAS_MASK=mask is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        **pb.flags(), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    _record("quadratic_fwd", compiled)
    return out, den


def rows_block(pb: _Problem) -> int:
    """Query rows per program of the row-term kernels (a (rows, BLOCK_DV) tile of o and do)."""
    return 64 if pb.block_dv <= 128 else 16


def _backward_rows(out, den, grad_out, pb: _Problem):
    """1/d and c = (do . o)/d per query row: fp32 (B, Hq, Nq) contiguous, 0 where d = 0."""
    inv_den = torch.empty(pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=out.device)
    crow = torch.empty_like(inv_den)
    block_m = rows_block(pb)
    compiled = backward_rows_kernel[(cdiv(pb.Nq, block_m), pb.B * pb.Hq)](
        out, grad_out, den.contiguous(), inv_den, crow, *out.stride(), *grad_out.stride(), pb.Hq, pb.Nq, pb.Dv,
        BLOCK_M=block_m, BLOCK_DV=pb.block_dv, EVEN_DV=pb.Dv == pb.block_dv, I64=pb.i64, num_warps=4,
    )
    _record("backward_rows", compiled)
    return inv_den, crow


def finite_keys(k: torch.Tensor) -> torch.Tensor:
    """k with its inf and NaN entries set to 0: what the dq kernels multiply ds by on the causal
    diagonal, where a query before a non-finite key has ds = 0 and 0 * inf would be NaN. One
    elementwise pass over k (the kernels' register budget is worth more than it)."""
    return torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)


def _tma_reduce_available(device: torch.device) -> bool:
    """Whether this Triton and GPU add a whole tile to global memory in one TMA reduction
    (Hopper or newer, compiled kernels, a Triton with tensor-descriptor atomics)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _tma_reduce_on(index)


@functools.lru_cache(maxsize=None)
def _tma_reduce_on(device_index: int) -> bool:
    descriptor = getattr(tl, "tensor_descriptor", None)
    if descriptor is None or not hasattr(descriptor, "atomic_add"):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _dq_fused(pb: _Problem, device: torch.device) -> bool:
    """Whether the key-block kernel also computes dq (the setting, else the measured default)."""
    chosen = current_settings().quad_dq_fused
    if chosen is not None:
        return chosen
    # measured on the H200 (lab7_fused_dq.jsonl, bf16, causal, 16k): at D=128 the fused kernel
    # takes 7.16 ms where the split takes 4.71 (dq) + 3.91 (dk, dv); at D=64 it takes 4.00
    # where the split takes 1.51 + 2.36, the extra (1, BLOCK_M, 64) fp32 reduction per tile
    # costing more than the two products it saves. fp16/fp32 inputs: not measured, split.
    return pb.op_bf16 and pb.block_d == 128 and _tma_reduce_available(device)


def _dq_accumulator(pb: _Problem, block_m: int, device: torch.device):
    """The fp32 (B * Hq, Nq, BLOCK_D) zeros the fused key-block kernel adds dq into, what it
    is handed (a TMA descriptor, or the tensor for pointer atomics) and its DQ_MODE."""
    acc = torch.zeros(pb.B * pb.Hq, pb.Nq, pb.block_d, dtype=torch.float32, device=device)
    if _tma_reduce_available(device):
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor(acc, list(acc.shape), list(acc.stride()), [1, block_m, pb.block_d])
        return acc, desc, 2
    return acc, acc, 1


def dq_from_accumulator(acc: torch.Tensor, pb: _Problem, dtype: torch.dtype) -> torch.Tensor:
    """dq (B, Hq, Nq, D) in ``dtype`` from the fused kernels' fp32 (B * Hq, Nq, BLOCK_D) accumulator."""
    return acc[..., :pb.D].to(dtype).view(pb.B, pb.Hq, pb.Nq, pb.D)


def quadratic_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2):
    """dq, dk, dv. Split: the dq kernel first (it also writes the row terms 1/d and c), then
    the key-block kernel, which reads them. Fused: the row terms, then the key-block kernel,
    which also adds every tile's dq to an fp32 accumulator."""
    return _quadratic_backward(q, k, v, mask, grad_out, causal, scale, p, a0, a1, a2, out=out, den=den)


def quadratic_backward_terms(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2):
    """``linear_backward_terms`` for the quadratic kernels: the row terms are given."""
    return _quadratic_backward(q, k, v, mask, grad_out, causal, scale, p, a0, a1, a2, terms=(inv_den, crow))


def _quadratic_backward(q, k, v, mask, grad_out, causal, scale, p, a0, a1, a2, *, out=None, den=None, terms=None):
    pb = _Problem.of(q, k, v, grad_out)
    m, smb, smn = _mask_args(mask, q)
    dk = torch.empty(pb.B, pb.Hk, pb.Nk, pb.D, dtype=k.dtype, device=q.device)
    dv = torch.empty(pb.B, pb.Hk, pb.Nk, pb.Dv, dtype=v.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), smb, smn, *grad_out.stride())
    c1, c2 = a1 * scale, a2 * scale * scale
    # the dq products read the keys with inf and NaN set to 0 (``finite_keys``)
    k_finite = finite_keys(k) if causal else k

    def launch_options(cfg):
        return dict(P=p, CAUSAL=causal, HAS_MASK=mask is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                    OP_BF16=pb.op_bf16, **pb.flags(), num_warps=cfg["warps"], num_stages=cfg["stages"])

    if _dq_fused(pb, q.device):
        inv_den, crow = terms if terms is not None else _backward_rows(out, den, grad_out, pb)
        cfg = _quad_config(pb, "fused")
        dq_acc, dq_arg, dq_mode = _dq_accumulator(pb, cfg["block_m"], q.device)
    else:
        if terms is not None:  # the dq kernel reads them; out and den are not needed
            (inv_den, crow), out, den = terms, grad_out, terms[0]
        else:
            inv_den = torch.empty(pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=q.device)
            crow = torch.empty_like(inv_den)
        dq = torch.empty(pb.B, pb.Hq, pb.Nq, pb.D, dtype=q.dtype, device=q.device)
        cfg = _quad_config(pb, "dq")
        compiled = quadratic_bwd_dq_kernel[(cdiv(pb.Nq, cfg["block_m"]), pb.B * pb.Hq)](
            q, k, k_finite, v, m, grad_out, out, den.contiguous(), inv_den, crow, dq, *strides[:8], *k_finite.stride(),
            *strides[8:], *out.stride(),
            pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, c1, c2, **launch_options(cfg), ROWS_GIVEN=terms is not None,
        )
        _record("quadratic_bwd_dq", compiled)
        cfg = _quad_config(pb, "dkdv")
        dq_acc, dq_arg, dq_mode = None, inv_den, 0
    compiled = quadratic_bwd_dkdv_kernel[(cdiv(pb.Nk, cfg["block_n"]), pb.B * pb.Hk)](
        q, k, k_finite, v, m, grad_out, inv_den, crow, dk, dv, dq_arg, *strides[:8], *k_finite.stride(), *strides[8:],
        pb.Hq, pb.Hk, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, a0, c1, c2, **launch_options(cfg), DQ_MODE=dq_mode,
    )
    _record("quadratic_bwd_dkdv" if dq_mode == 0 else "quadratic_bwd_fused", compiled)
    if dq_acc is not None:
        dq = dq_from_accumulator(dq_acc, pb, q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# linear regime
# ----------------------------------------------------------------------------------------


def _state_bytes_per_head(pb: _Problem, n_rows: int, p: int, chunk: int) -> int:
    f_rows = feature_rows(pb.D, p)
    n_chunks = cdiv(max(n_rows, 1), chunk)
    return n_chunks * f_rows * (pb.Dv * pb.state_dtype.itemsize + 4)


def _scratch_budget(pb: _Problem) -> float:
    s = current_settings()
    # q, k, v, o and their gradients
    tensors = 2 * pb.dtype.itemsize * pb.B * (
        pb.Hq * pb.Nq * (pb.D + pb.Dv) + pb.Hk * pb.Nk * (pb.D + pb.Dv))
    return max(s.scratch_min_bytes, s.scratch_fraction * tensors)


def linear_plan(pb: _Problem, p: int, causal: bool) -> tuple[int, int]:
    """(chunk, key/value heads per launch): the per-chunk states of a launch stay within the
    scratch budget. Longer chunks first (fewer states, more work in each chunk's own tile, up
    to 4096 tokens), then fewer heads per launch, in groups of equal size."""
    cfg = _linear_config(pb, p)
    chunk = cfg["chunk"]
    n_rows = max(pb.Nk, pb.Nq)
    budget = _scratch_budget(pb)
    per_head = lambda c: pb.B * _state_bytes_per_head(pb, n_rows, p, c)  # noqa: E731
    while current_settings().linear_chunk is None and chunk < 4096 and per_head(chunk) * 2 > budget:
        chunk *= 2
    most = max(1, min(pb.Hk, int(budget // per_head(chunk))))
    launches = -(-pb.Hk // most)
    return chunk, -(-pb.Hk // launches)


def heads_per_launch(q, k, v, p: int = 2) -> int:
    """Key/value heads per launch of the linear kernels for these inputs (the scratch budget)."""
    return linear_plan(_Problem.of(q, k, v), p, True)[1]


def _chunk_states(x, val, mask, inv_den, crow, pb: _Problem, cfg, p, a0, c1, c2, *, is_query, chunk, n_chunks,
                  row_shift):
    """Per-chunk states H (B*Hk, n_chunks, F_ROWS, Dv) in the state dtype and Z (.., F_ROWS) fp32."""
    block_d, n_tiles, f_rows = linear_layout(pb.D, p)
    H = torch.empty(pb.B * pb.Hk, n_chunks, f_rows, pb.Dv, dtype=pb.state_dtype, device=x.device)
    Z = torch.empty(pb.B * pb.Hk, n_chunks, f_rows, dtype=torch.float32, device=x.device)
    tile_m, tile_n = _pair_tiles(block_d, str(x.device))
    m, smb, smn = _mask_args(mask, x)
    block_dv = cfg["state_block_dv"]
    n_dv = cdiv(pb.Dv, block_dv)
    dummy = Z
    compiled = chunk_states_kernel[(n_tiles + 2, n_chunks * n_dv, pb.B * pb.Hk)](
        x, val, m, inv_den if is_query else dummy, crow if is_query else dummy, H, Z, tile_m, tile_n,
        *x.stride(), *val.stride(), smb, smn,
        x.shape[1], pb.groups if is_query else 1, x.shape[2], row_shift, n_chunks, n_dv, pb.D, pb.Dv, f_rows,
        n_tiles, a0, c1, c2,
        IS_QUERY=is_query, HAS_MASK=mask is not None and not is_query, PAIRS=n_tiles > 0, CHUNK=chunk,
        BLOCK_K=cfg["state_block_k"], BT=PAIR_TILE, OP_BF16=pb.op_bf16, **pb.flags(block_dv),
        num_warps=cfg["state_warps"], num_stages=cfg["state_stages"],
    )
    _record("chunk_states_query" if is_query else "chunk_states", compiled)
    return H, Z


def _scan(H, Z, mode: int, state_in=None, state_out=None):
    """In place over chunks: exclusive prefix (0), exclusive suffix (1) or total into chunk 0 (2)."""
    BH, n_chunks, f_rows, dv = H.shape
    # 1024 elements over 4 warps, 8 chunks at a time: each thread holds its columns of all 8
    # chunks, so the scan across them stays in registers (no shared memory round trip)
    block_e = 1024
    n_s_blocks = cdiv(f_rows * dv, block_e)
    S_in, z_in = state_in if state_in is not None else (Z, Z)
    S_out, z_out = state_out if state_out is not None else (Z, Z)
    compiled = state_scan_kernel[(n_s_blocks + cdiv(f_rows, block_e), BH)](
        H, Z, S_in, z_in, S_out, z_out, n_chunks, f_rows, dv, n_s_blocks,
        MODE=mode, LOAD_STATE=state_in is not None, STORE_STATE=state_out is not None, BLOCK_E=block_e,
        BLOCK_C=min(8, max(2, next_power_of_2(n_chunks))), num_warps=4,
    )
    _record("state_scan", compiled)


@dataclass(frozen=True)
class KeyStates:
    """The scanned key states of a forward, kept for its backward's dq readout: H (B*Hk,
    n_chunks, F_ROWS, Dv) in the state dtype, Z (B*Hk, n_chunks, F_ROWS) fp32, and the chunk
    length they were computed with. Without a causal mask only the total (n_chunks = 1)."""

    H: torch.Tensor
    Z: torch.Tensor
    chunk: int

    @property
    def nbytes(self) -> int:
        return self.H.numel() * self.H.element_size() + self.Z.numel() * self.Z.element_size()


def keeps_key_states(pb: _Problem, p: int, causal: bool, chunk: int) -> bool:
    """Whether a forward that will be differentiated keeps its key states for the backward
    (the setting ``linear_keep_states``, else: without a causal mask always, one total state
    per head; with it, when the per-chunk states take no more memory than q, k, v, o and
    their gradients, which the backward allocates anyway: at most twice what autograd saves
    for the call without them. D=64 at 16k-256k keys keeps them, D=128 past 16k does not
    (2.5 GB of states at 64k against 2.1 GB): there ``linear_keep_states=True`` trades
    that memory for one state pass, BENCHMARKS.md)."""
    chosen = current_settings().linear_keep_states
    if chosen is not None:
        return chosen
    if not causal:
        return True
    states = pb.B * pb.Hk * _state_bytes_per_head(pb, pb.Nk, p, chunk)
    saved = pb.dtype.itemsize * pb.B * (pb.Hq * pb.Nq * (pb.D + pb.Dv) + pb.Hk * pb.Nk * (pb.D + pb.Dv))
    return states <= 2 * saved


def _linear_forward_heads(q, k, v, mask, causal, scale, p, a0, a1, a2, chunk, state_in=None, state_out=None,
                          out=None, keep=False):
    """Forward of one group of heads: (out (B, Hq, Nq, Dv), den (B, Hq, Nq) fp32 contiguous,
    the ``KeyStates`` when ``keep``, else None).

    ``out``: where to write the output (any strides: a view of the whole output)."""
    pb = _Problem.of(q, k, v)
    cfg = _linear_config(pb, p)
    block_d, n_tiles, f_rows = linear_layout(pb.D, p)
    c1, c2 = a1 * scale, a2 * scale * scale
    n_chunks = cdiv(max(pb.Nk, 1), chunk)
    H, Z = _chunk_states(k, v, mask, None, None, pb, cfg, p, a0, c1, c2, is_query=False, chunk=chunk,
                         n_chunks=n_chunks, row_shift=0)
    _scan(H, Z, 0 if causal else 2, state_in, state_out)
    if out is None:
        out = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=q.dtype, device=q.device)
    den = torch.empty(pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=q.device)
    m, smb, smn = _mask_args(mask, q)
    tile_m, tile_n = _pair_tiles(block_d, str(q.device))
    block_m, block_dv = cfg["block_m"], cfg["readout_block_dv"]
    pos0 = (pb.Nk - pb.Nq) // block_m * block_m  # the block of query 0 on the key timeline (floor)
    n_blocks = cdiv(pb.Nk - pos0, block_m) if causal else cdiv(pb.Nq, block_m)
    compiled = linear_fwd_kernel[(n_blocks, cdiv(pb.Dv, block_dv), pb.B * pb.Hq)](
        q, k, v, m, H, Z, out, den, tile_m, tile_n,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, H.shape[1], f_rows, n_tiles, pos0, a0, c1, c2,
        P=p, CAUSAL=causal, HAS_MASK=mask is not None, CHUNK=chunk, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        BT=PAIR_TILE, OP_BF16=pb.op_bf16, **pb.flags(block_dv), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    _record("linear_fwd", compiled)
    if not keep:
        return out, den, None
    if not causal:  # the scan left the total in chunk 0: keep only that
        H, Z = H[:, :1].clone(), Z[:, :1].clone()
    return out, den, KeyStates(H, Z, chunk)


def _head_groups(pb: _Problem, heads: int):
    """Slices (query heads, key/value heads) of each launch."""
    for h0 in range(0, pb.Hk, heads):
        h1 = min(pb.Hk, h0 + heads)
        yield slice(h0 * pb.groups, h1 * pb.groups), slice(h0, h1)


def key_states_chunk(q, k, v, p: int, causal: bool) -> int:
    """The chunk length of the key states a differentiated linear forward of these inputs
    keeps for its backward, 0 where it keeps none (``keeps_key_states``, and every head in one
    launch): what both the eager Function and the custom operator decide by."""
    pb = _Problem.of(q, k, v)
    return _keep_chunk(pb, p, causal, *linear_plan(pb, p, causal))


def _keep_chunk(pb: _Problem, p: int, causal: bool, chunk: int, heads: int) -> int:
    return chunk if heads == pb.Hk and keeps_key_states(pb, p, causal, chunk) else 0


def _key_states_shapes(pb: _Problem, p: int, causal: bool, chunk: int):
    """Shapes of the kept H and Z (``KeyStates``)."""
    f_rows = feature_rows(pb.D, p)
    n_chunks = cdiv(max(pb.Nk, 1), chunk) if causal else 1
    return (pb.B * pb.Hk, n_chunks, f_rows, pb.Dv), (pb.B * pb.Hk, n_chunks, f_rows)


def linear_forward(q, k, v, mask, causal, scale, p, a0, a1, a2):
    """(out, den) of the linear kernels."""
    return linear_forward_keeping(q, k, v, mask, causal, scale, p, a0, a1, a2, keep=False)[:2]


def linear_forward_keeping(q, k, v, mask, causal, scale, p, a0, a1, a2, keep=True):
    """(out, den, KeyStates or None): with ``keep``, the key states for the backward where
    ``keeps_key_states`` allows it and the heads run in one launch (a launch per group of
    heads means the states did not fit the scratch budget at once)."""
    pb = _Problem.of(q, k, v)
    chunk, heads = linear_plan(pb, p, causal)
    if heads == pb.Hk:
        keep = keep and _keep_chunk(pb, p, causal, chunk, heads) > 0
        return _linear_forward_heads(q, k, v, mask, causal, scale, p, a0, a1, a2, chunk, keep=keep)
    out = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=q.dtype, device=q.device)
    den = torch.empty(pb.B, pb.Hq, pb.Nq, dtype=torch.float32, device=q.device)
    for qs, ks in _head_groups(pb, heads):
        # the output is written through its strides straight into the whole tensor
        _, den[:, qs], _ = _linear_forward_heads(q[:, qs], k[:, ks], v[:, ks], mask, causal, scale, p, a0, a1, a2,
                                                 chunk, out=out[:, qs])
    return out, den, None


def _linear_backward_heads(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2, chunk, grads=None,
                           key_states: KeyStates | None = None, accumulate: bool = False, k_finite=None):
    """dq, dk, dv of one group of heads in the inputs' dtype; written into ``grads`` (views of
    the whole gradients, any strides) when given, so that no group is copied, and added to what
    they hold with ``accumulate``. ``key_states``: the forward's (``KeyStates``), read instead of
    recomputed; ``k_finite``: ``finite_keys(k)`` where the caller has it already."""
    pb = _Problem.of(q, k, v, grad_out)
    cfg = _linear_config(pb, p)
    block_d, n_tiles, f_rows = linear_layout(pb.D, p)
    c1, c2 = a1 * scale, a2 * scale * scale
    m, smb, smn = _mask_args(mask, q)
    tile_m, tile_n = _pair_tiles(block_d, str(q.device))
    common = dict(P=p, CAUSAL=causal, HAS_MASK=mask is not None, CHUNK=chunk, BLOCK_M=cfg["block_m"],
                  BLOCK_N=cfg["block_n"], BT=PAIR_TILE, OP_BF16=pb.op_bf16, **pb.flags())
    strides = (*q.stride(), *k.stride(), *v.stride(), smb, smn, *grad_out.stride())

    # dq from the prefix states of the keys: the forward's where it kept them, else recomputed
    if key_states is not None:
        H, Z = key_states.H, key_states.Z
    else:
        n_chunks = cdiv(max(pb.Nk, 1), chunk)
        H, Z = _chunk_states(k, v, mask, None, None, pb, cfg, p, a0, c1, c2, is_query=False, chunk=chunk,
                             n_chunks=n_chunks, row_shift=0)
        _scan(H, Z, 0 if causal else 2)
    if grads is None:
        grads = (torch.empty(pb.B, pb.Hq, pb.Nq, pb.D, dtype=q.dtype, device=q.device),
                 torch.empty(pb.B, pb.Hk, pb.Nk, pb.D, dtype=k.dtype, device=q.device),
                 torch.empty(pb.B, pb.Hk, pb.Nk, pb.Dv, dtype=v.dtype, device=q.device))
    dq, dk, dv = grads
    block_m = cfg["block_m"]
    pos0 = (pb.Nk - pb.Nq) // block_m * block_m
    n_blocks = cdiv(pb.Nk - pos0, block_m) if causal else cdiv(pb.Nq, block_m)
    if k_finite is None:
        k_finite = finite_keys(k) if causal else k
    compiled = linear_bwd_dq_kernel[(n_blocks, pb.B * pb.Hq)](
        q, k, k_finite, v, m, grad_out, inv_den, crow, H, Z, dq, tile_m, tile_n, *strides[:8], *k_finite.stride(),
        *strides[8:], *dq.stride(),
        pb.Hq, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, H.shape[1], f_rows, n_tiles, pos0, c1, c2, **common,
        ACCUMULATE=accumulate, num_warps=cfg["dq_warps"], num_stages=cfg["dq_stages"],
    )
    _record("linear_bwd_dq", compiled)
    del H, Z, k_finite  # before the query-side states are allocated

    # dk, dv from the query-side states: the chunks after each key (all of them without a causal mask)
    offset = pb.Nk - pb.Nq
    if causal:
        n_chunks, row_shift = cdiv(max(pb.Nk, 1), chunk), offset
    else:
        n_chunks, row_shift = cdiv(max(pb.Nq, 1), chunk), 0
    H, Z = _chunk_states(q, grad_out, None, inv_den, crow, pb, cfg, p, a0, c1, c2, is_query=True, chunk=chunk,
                         n_chunks=n_chunks, row_shift=row_shift)
    _scan(H, Z, 1 if causal else 2)
    compiled = linear_bwd_dkdv_kernel[(cdiv(pb.Nk, cfg["block_n"]), pb.B * pb.Hk)](
        q, k, v, m, grad_out, inv_den, crow, H, Z, dk, dv, tile_m, tile_n, *strides, *dk.stride(), *dv.stride(),
        pb.Hq, pb.Hk, pb.groups, pb.Nq, pb.Nk, pb.D, pb.Dv, H.shape[1], f_rows, n_tiles, a0, c1, c2,
        **{**common, "BLOCK_M": cfg["dkdv_block_m"]}, ACCUMULATE=accumulate,
        num_warps=cfg["dkdv_warps"], num_stages=cfg["dkdv_stages"],
    )
    _record("linear_bwd_dkdv", compiled)
    return dq, dk, dv


def linear_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2, key_states=None):
    pb = _Problem.of(q, k, v, grad_out)
    inv_den, crow = _backward_rows(out, den, grad_out, pb)
    return linear_backward_terms(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2,
                                 key_states=key_states)


def linear_backward_terms(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2, key_states=None,
                          grads=None, accumulate: bool = False, k_finite=None):
    """dq, dk, dv of the surrogate sum_ij f(s_ij) (g_i . v_j - c_i) with g = grad_out * inv_den
    and c = crow (fp32 (B, Hq, Nq) contiguous): the backward of Fastmax for the row terms of
    ``_backward_rows``, or of any function of (sum_j f v_j, sum_j f) given those terms.
    ``key_states``: what ``linear_forward_keeping`` kept (its chunk length is used).
    ``grads``: (dq, dk, dv) tensors of those shapes (any strides: views of larger gradients) to
    write into, or with ``accumulate`` to add to, instead of new ones; ``k_finite``:
    ``finite_keys(k)`` where the caller has it."""
    pb = _Problem.of(q, k, v, grad_out)
    if grads is None:
        if accumulate:
            raise ValueError("`accumulate` needs `grads`: the tensors to add the gradients to")
        grads = (torch.empty(pb.B, pb.Hq, pb.Nq, pb.D, dtype=q.dtype, device=q.device),
                 torch.empty(pb.B, pb.Hk, pb.Nk, pb.D, dtype=k.dtype, device=q.device),
                 torch.empty(pb.B, pb.Hk, pb.Nk, pb.Dv, dtype=v.dtype, device=q.device))
    if key_states is not None:
        return _linear_backward_heads(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2,
                                      key_states.chunk, grads=grads, key_states=key_states, accumulate=accumulate,
                                      k_finite=k_finite)
    chunk, heads = linear_plan(pb, p, causal)
    if heads == pb.Hk:
        return _linear_backward_heads(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2, chunk,
                                      grads=grads, accumulate=accumulate, k_finite=k_finite)
    dq, dk, dv = grads
    for qs, ks in _head_groups(pb, heads):
        _linear_backward_heads(
            q[:, qs], k[:, ks], v[:, ks], mask, grad_out[:, qs], inv_den[:, qs].contiguous(),
            crow[:, qs].contiguous(), causal, scale, p, a0, a1, a2, chunk, grads=(dq[:, qs], dk[:, ks], dv[:, ks]),
            accumulate=accumulate, k_finite=None if k_finite is None else k_finite[:, ks])
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# prefill and decoding from a state
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def triton_step(q, k, v, S, z, options, *, key_padding_mask=None):
    """n new tokens attend causally to themselves and the state (S, z); returns (out, S', z').

    The state layout is the linear kernels' (see ``linear_layout`` and kernels/linear.py);
    S (B, Hk, F_ROWS, Dv) and z (B, Hk, F_ROWS) are fp32 and are not modified. Under
    torch.compile the call goes through the custom operator ``fastmax_hf::step`` (opaque to
    the compiler, no graph break), so that a compiled decoding step holds no Python launch."""
    check_kernel_dtypes(q, k, v)
    coefficients = (float(options.scale), int(options.p), float(options.a0), float(options.a1), float(options.a2))
    if torch.compiler.is_compiling():
        return fastmax_step_op(q, k, v, S, z, key_padding_mask, *coefficients)
    return _triton_step(q, k, v, S, z, *coefficients, key_padding_mask=key_padding_mask)


def _triton_step(q, k, v, S, z, scale, p, a0, a1, a2, *, key_padding_mask=None):
    pb = _Problem.of(q, k, v)
    chunk, heads = linear_plan(pb, p, True)  # a long prompt's states fit the scratch budget
    S_out, z_out = torch.empty_like(S), torch.empty_like(z)
    out = torch.empty(pb.B, pb.Hq, pb.Nq, pb.Dv, dtype=q.dtype, device=q.device)
    for qs, ks in _head_groups(pb, heads):
        state_in = (S[:, ks].contiguous(), z[:, ks].contiguous())
        # the scan writes the new state contiguously: straight into S', z' where their slices are
        # (one group, or B = 1: every decoding step), else through a copy
        views = (S_out[:, ks], z_out[:, ks])
        direct = all(view.is_contiguous() for view in views)
        state_out = views if direct else (torch.empty_like(state_in[0]), torch.empty_like(state_in[1]))
        _linear_forward_heads(q[:, qs], k[:, ks], v[:, ks], key_padding_mask, True, scale, p, a0, a1, a2, chunk,
                              state_in=state_in, state_out=state_out, out=out[:, qs])
        if not direct:
            views[0].copy_(state_out[0])
            views[1].copy_(state_out[1])
    return out, S_out, z_out


def empty_state(batch, heads_kv, dim, dim_v, p, device):
    rows = feature_rows(dim, p)
    return (torch.zeros(batch, heads_kv, rows, dim_v, dtype=torch.float32, device=device),
            torch.zeros(batch, heads_kv, rows, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------------
# custom operators
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastmax_hf::forward", mutates_args=(), device_types=("cuda", "cpu"))
def fastmax_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    causal: bool, scale: float, p: int, a0: float, a1: float, a2: float, regime: str, keep_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, den, H, Z): H and Z the key states kept for the backward when ``keep_chunk`` (the
    chunk length ``key_states_chunk`` chose when the call was traced) is not 0, else empty."""
    if regime == "quadratic" or not keep_chunk:
        impl = quadratic_forward if regime == "quadratic" else linear_forward
        out, den = impl(q, k, v, mask, causal, scale, p, a0, a1, a2)
        return out, den, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    out, den, states = _linear_forward_heads(q, k, v, mask, causal, scale, p, a0, a1, a2, keep_chunk, keep=True)
    return out, den, states.H, states.Z


@fastmax_forward_op.register_fake
def _(q, k, v, mask, causal, scale, p, a0, a1, a2, regime, keep_chunk=0):
    B, Hq, Nq, _ = q.shape
    out, den = q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)
    if regime == "quadratic" or not keep_chunk:
        return out, den, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    pb = _Problem.of(q, k, v)
    h_shape, z_shape = _key_states_shapes(pb, p, causal, keep_chunk)
    return out, den, q.new_empty(h_shape, dtype=pb.state_dtype), q.new_empty(z_shape, dtype=torch.float32)


@torch.library.custom_op("fastmax_hf::backward", mutates_args=(), device_types=("cuda", "cpu"))
def fastmax_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    out: torch.Tensor, den: torch.Tensor, grad_out: torch.Tensor,
    causal: bool, scale: float, p: int, a0: float, a1: float, a2: float, regime: str,
    H: torch.Tensor | None = None, Z: torch.Tensor | None = None, keep_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if regime == "quadratic":
        return quadratic_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2)
    states = KeyStates(H, Z, keep_chunk) if keep_chunk else None
    return linear_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2, key_states=states)


@fastmax_backward_op.register_fake
def _(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2, regime, H=None, Z=None, keep_chunk=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, p, a0, a1, a2, regime, keep_chunk = inputs
    out, den, H, Z = output
    ctx.save_for_backward(q, k, v, mask, out, den, H, Z)
    ctx.options = (causal, scale, p, a0, a1, a2, regime)
    ctx.keep_chunk = keep_chunk


def _backward(ctx, grad_out, _grad_den, _grad_H, _grad_Z):
    q, k, v, mask, out, den, H, Z = ctx.saved_tensors
    causal, scale, p, a0, a1, a2, regime = ctx.options
    dq, dk, dv = fastmax_backward_op(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2, regime,
                                     H, Z, ctx.keep_chunk)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastmax_hf::forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("fastmax_hf::step", mutates_args=(), device_types=("cuda", "cpu"))
def fastmax_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None,
    scale: float, p: int, a0: float, a1: float, a2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_step(q, k, v, S, z, scale, p, a0, a1, a2, key_padding_mask=mask)


@fastmax_step_op.register_fake
def _(q, k, v, S, z, mask, scale, p, a0, a1, a2):
    B, Hq, n, _ = q.shape
    return q.new_empty(B, Hq, n, v.shape[-1]), torch.empty_like(S), torch.empty_like(z)
torch.library.register_autocast("fastmax_hf::forward", "cuda", torch.bfloat16)


class _FastmaxFunction(torch.autograd.Function):
    """The same forward and backward as the custom operators, for eager mode: the custom
    operators' dispatch costs several hundred microseconds of host time per training step
    (measured on the H200 machine: BENCHMARKS.md), more than the kernels take at 1k tokens."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, p, a0, a1, a2, regime):
        kept, ctx.chunk = (None, None), None
        if regime == "quadratic":
            out, den = quadratic_forward(q, k, v, mask, causal, scale, p, a0, a1, a2)
        else:  # the key states are kept for the backward where ``keeps_key_states`` allows it
            out, den, states = linear_forward_keeping(q, k, v, mask, causal, scale, p, a0, a1, a2,
                                                      keep=any(ctx.needs_input_grad[:3]))
            if states is not None:
                kept, ctx.chunk = (states.H, states.Z), states.chunk
        ctx.save_for_backward(q, k, v, mask, out, den, *kept)
        ctx.options = (causal, scale, p, a0, a1, a2, regime)
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    def backward(ctx, grad_out, _grad_den):
        q, k, v, mask, out, den, H, Z = ctx.saved_tensors
        causal, scale, p, a0, a1, a2, regime = ctx.options
        if regime == "quadratic":
            dq, dk, dv = quadratic_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2)
        else:
            states = KeyStates(H, Z, ctx.chunk) if ctx.chunk is not None else None
            dq, dk, dv = linear_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2,
                                         key_states=states)
        return dq, dk, dv, None, None, None, None, None, None, None, None


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_dtypes(q, k, v):
    """The kernels compute in fp32 from fp16, bf16 or fp32 inputs of one dtype; anything else
    (float64 among them) is a TypeError naming the argument, never a silently wrong result."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 `{name}`, got {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"`q`, `k` and `v` must share one dtype for the Triton kernels, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")


def triton_attention(q, k, v, options, *, causal=False, key_padding_mask=None, regime="auto"):
    """Fastmax core on the Triton kernels: (out in q's dtype, fp32 denominator (B, Hq, Nq)).

    ``options``: the kernel's coefficients, any object with attributes ``scale``, ``p``,
    ``a0``, ``a1``, ``a2`` (``fastmax_hf.FastmaxOptions``). ``regime``: "auto" (quadratic
    while Nk is below the measured crossover), "quadratic" or "linear". Arguments are
    assumed validated (``fastmax_hf.fastmax`` does that).

    Under torch.compile the call goes through the custom operator ``fastmax_hf::forward``
    (opaque to the compiler); in eager mode through an autograd Function with the same
    kernels and less host overhead. Under CUDA autocast both take bf16 inputs. The eager
    Function and the custom operator keep the linear forward's key states for the backward
    where ``keeps_key_states`` allows it (one state pass fewer); the operator's choice is made
    when the call is traced (``key_states_chunk``) and passed to it.
    """
    if regime == "auto":
        backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        regime = choose_regime(k.shape[2], q.shape[-1], options.p, backward)
    if regime not in ("quadratic", "linear"):
        raise ValueError(f"`regime` must be 'auto', 'quadratic' or 'linear', got {regime!r}")
    check_kernel_dtypes(q, k, v)
    args = (key_padding_mask, bool(causal), float(options.scale), int(options.p),
            float(options.a0), float(options.a1), float(options.a2), regime)
    if torch.compiler.is_compiling():
        differentiated = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        keep_chunk = key_states_chunk(q, k, v, int(options.p), bool(causal)) if (
            regime == "linear" and differentiated) else 0
        return fastmax_forward_op(q, k, v, *args, keep_chunk)[:2]
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        with torch.autocast("cuda", enabled=False):
            return _FastmaxFunction.apply(q, k, v, *args)
    return _FastmaxFunction.apply(q, k, v, *args)


__all__ = ["triton_attention", "triton_step", "empty_state", "feature_rows", "choose_regime", "compiled_stats",
           "heads_per_launch"]
