"""Launchers for the Fastmax kernels, registered as PyTorch custom operators.

``fastmax_hf::forward`` and ``fastmax_hf::backward`` are opaque to torch.compile (no
graph break: they have fake implementations for shape propagation), cast to the
autocast dtype under autocast, and connect through ``register_autograd``.

Inputs are read through their strides: q (B, Hq, Nq, D) may be a transposed view of
the (B, Nq, Hq, D) memory that Hugging Face models produce.
"""

from __future__ import annotations

import functools

import torch
import triton

from .linear import linear_bwd_dkdv_kernel, linear_bwd_dq_kernel, linear_fwd_kernel
from .quadratic import quadratic_bwd_dkdv_kernel, quadratic_bwd_dq_kernel, quadratic_fwd_kernel
from .settings import current_settings

# Tiles of the (m, n) grid of second-order features: BT x BT products per program.
PAIR_TILE = 16
# Launch parameters of the linear kernels when the settings leave them open: tokens per
# chunk, state columns per program (Dv is split into blocks of this width), warps, pipeline
# stages. Measured on an H100: chunk 64, 8 warps, one stage. Two or more stages (Triton's
# software pipelining) gave wrong results in the forward kernel (5e-2 relative error with
# Triton 3.6), so the linear kernels stay at one stage.
LINEAR_DEFAULTS = {"chunk": 64, "block_dv": 64, "num_warps": 8, "num_stages": 1}
# Query/key block sizes of the quadratic kernels (None stages: 3 for D <= 64, else 2,
# the most that fits in shared memory).
QUAD_DEFAULTS = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": None}


def _linear_config() -> dict:
    s = current_settings()
    chosen = {"chunk": s.linear_chunk, "block_dv": s.linear_block_dv, "num_warps": s.linear_warps,
              "num_stages": s.linear_stages}
    return {key: LINEAR_DEFAULTS[key] if value is None else value for key, value in chosen.items()}


def _quad_config() -> dict:
    s = current_settings()
    chosen = {"block_m": s.quad_block_m, "block_n": s.quad_block_n, "num_warps": s.quad_warps,
              "num_stages": s.quad_stages}
    return {key: QUAD_DEFAULTS[key] if value is None else value for key, value in chosen.items()}
# Registers and spills of the last compiled launch of each kernel (for the benchmarks).
KERNEL_STATS: dict[str, tuple[int, int]] = {}


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; fp16 ones go through tf32 (fp16 would overflow
    # the growing state; tf32 keeps fp16's mantissa with fp32's range).
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _pair_tiles(block_d: int, device_str: str):
    """Tiles (mb, nb), nb >= mb, of the upper triangle of the (m, n) grid."""
    blocks = block_d // PAIR_TILE
    pairs = [(mb, nb) for mb in range(blocks) for nb in range(mb, blocks)]
    tile_m = torch.tensor([p[0] for p in pairs] or [0], dtype=torch.int32, device=device_str)
    tile_n = torch.tensor([p[1] for p in pairs] or [0], dtype=torch.int32, device=device_str)
    return tile_m, tile_n, len(pairs)


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
    (inference), which stays quadratic longer."""
    measured = CROSSOVER.get((p, _pow2_at_least_16(dim)))
    if measured is None:
        return 1 + dim + dim * (dim + 1) // 2 if p == 2 else 1 + dim
    return measured[1] if backward else measured[0]


# Crossovers in keys, (forward, forward+backward), measured on an H100 in bf16 with the
# causal mask (benchmarks/results/crossover_h100_v1.json), interpolating between the
# measured lengths with the quadratic cost growing as N^2 and the linear one as N.
# p = 1 has 1 + D features: the linear form is the cheaper one from short lengths on.
CROSSOVER: dict[tuple[int, int], tuple[int, int]] = {
    (2, 16): (22000, 10000),
    (2, 32): (22000, 9500),
    (2, 64): (40000, 19500),
    (2, 128): (88000, 50000),
}


def _mask_args(mask):
    if mask is None:
        return None, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def _block_dv(dv: int) -> int:
    return min(_linear_config()["block_dv"], _pow2_at_least_16(dv))


def _linear_warps(block_d: int, block_dv: int) -> int:
    if _linear_config()["num_warps"] is not None:
        return _linear_config()["num_warps"]
    return 8 if block_d * block_dv >= 64 * 64 else 4


def _quad_warps(block_d: int) -> int:
    if _quad_config()["num_warps"] is not None:
        return _quad_config()["num_warps"]
    return 4 if block_d <= 64 else 8


def _quad_blocks(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, stages) of the quadratic kernels for this element size and head dim.

    Shared memory holds `stages` copies of the streamed tiles: fp32 tiles at D > 64 with
    128-row blocks need 290 KB (seen on an H100, limit 227 KB), so fp32 takes 64-row blocks
    and, past D = 64, one stage."""
    config = _quad_config()
    block_m, block_n = config["block_m"], config["block_n"]
    stages = config["num_stages"] or (3 if block_d <= 64 else 2)
    if dtype == torch.float32:
        block_m = min(block_m, 64)
        block_n = min(block_n, 64)
        stages = stages if block_d <= 64 else 1
    return block_m, block_n, stages


def _record(name, compiled):
    """Keep the register count and spills of a compiled launch (None in the interpreter)."""
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is not None:
        KERNEL_STATS[name] = (n_regs, getattr(compiled, "n_spills", 0))


# ----------------------------------------------------------------------------------------
# raw launchers (no autograd)
# ----------------------------------------------------------------------------------------


def quadratic_forward(q, k, v, mask, causal, scale, p, a0, a1, a2):
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    den = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    m, smb, smn = _mask_args(mask)
    block_d, block_dv = _pow2_at_least_16(D), _pow2_at_least_16(Dv)
    block_m, block_n, stages = _quad_blocks(q.dtype, block_d)
    grid = (triton.cdiv(Nq, block_m), B * Hq)
    compiled = quadratic_fwd_kernel[grid](
        q, k, v, m if m is not None else q, out, den,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
        Hq, Hq // Hk, Nq, Nk, D, Dv, scale, a0, a1, a2,
        P=p, CAUSAL=causal, HAS_MASK=m is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=_precision(q.dtype), num_warps=_quad_warps(block_d), num_stages=stages,
    )
    _record("quadratic_fwd", compiled)
    return out, den


def _row_terms(out, den, grad_out):
    """1/d and c = (do . o)/d per query row, fp32 contiguous (B, Hq, Nq); 0 where d = 0."""
    inv_den = torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(den))
    B, H, N, Dv = out.shape
    crow = torch.empty(B, H, N, dtype=torch.float32, device=out.device)
    # a slice of heads at a time: whole-tensor fp32 copies of o and do were 12 GiB of
    # temporaries at 1M tokens and 16 heads, the peak of the whole backward pass
    heads = max(1, current_settings().row_terms_slice // max(1, B * N * Dv))
    for h0 in range(0, H, heads):
        h = slice(h0, h0 + heads)
        crow[:, h] = (grad_out[:, h].float() * out[:, h].float()).sum(-1)
    return inv_den.contiguous(), crow.mul_(inv_den)


def quadratic_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2):
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    inv_den, crow = _row_terms(out, den, grad_out)
    m, smb, smn = _mask_args(mask)
    block_d, block_dv = _pow2_at_least_16(D), _pow2_at_least_16(Dv)
    dq = torch.empty(B, Hq, Nq, D, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, Hk, Nk, D, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, Hk, Nk, Dv, dtype=torch.float32, device=q.device)
    bm, bn, stages = _quad_blocks(q.dtype, block_d)
    common = dict(P=p, CAUSAL=causal, HAS_MASK=m is not None, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, PRECISION=_precision(q.dtype),
                  num_warps=_quad_warps(block_d), num_stages=stages)
    mp = m if m is not None else q
    compiled = quadratic_bwd_dkdv_kernel[(triton.cdiv(Nk, bn), B * Hk)](
        q, k, v, mp, grad_out, inv_den, crow, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *grad_out.stride(),
        Hq, Hk, Hq // Hk, Nq, Nk, D, Dv, scale, a0, a1, a2, **common,
    )
    _record("quadratic_bwd_dkdv", compiled)
    compiled = quadratic_bwd_dq_kernel[(triton.cdiv(Nq, bm), B * Hq)](
        q, k, v, mp, grad_out, inv_den, crow, dq,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *grad_out.stride(),
        Hq, Hq // Hk, Nq, Nk, D, Dv, scale, a0, a1, a2, **common,
    )
    _record("quadratic_bwd_dq", compiled)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def linear_forward(q, k, v, mask, causal, scale, p, a0, a1, a2, state_in=None, return_state=False):
    """Returns (out, den) or (out, den, S, z). ``state_in`` = (S, z) continues a sequence."""
    B, Hq, Nq, D = q.shape
    # a decoding step has a token or a few: the smallest chunk the tensor cores take
    chunk = 16 if k.shape[2] <= 16 else _linear_config()["chunk"]
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    block_d, n_tiles, f_rows = linear_layout(D, p)
    block_dv = _block_dv(Dv)
    tile_m, tile_n, _ = _pair_tiles(block_d, str(q.device))
    o_acc = torch.zeros(B, Hq, Nq, Dv, dtype=torch.float32, device=q.device)
    den = torch.zeros(B, Hq, Nq, dtype=torch.float32, device=q.device)
    if return_state:
        S_out = torch.empty(B, Hk, f_rows, Dv, dtype=torch.float32, device=q.device)
        z_out = torch.empty(B, Hk, f_rows, dtype=torch.float32, device=q.device)  # every row is written
    else:
        S_out = z_out = o_acc
    S_in, z_in = state_in if state_in is not None else (o_acc, den)
    m, smb, smn = _mask_args(mask)
    grid = (n_tiles + 1, triton.cdiv(Dv, block_dv), B * Hk)
    compiled = linear_fwd_kernel[grid](
        q, k, v, m if m is not None else q, o_acc, den, S_in, z_in, S_out, z_out, tile_m, tile_n,
        *q.stride(), *k.stride(), *v.stride(), smb, smn,
        Hk, Hq // Hk, Nq, Nk, D, Dv, n_tiles, f_rows, scale, a0, a1, a2,
        P=p, CAUSAL=causal, HAS_MASK=m is not None,
        LOAD_STATE=state_in is not None, STORE_STATE=return_state,
        CHUNK=chunk, BLOCK_D=block_d, BLOCK_DV=block_dv, BT=PAIR_TILE,
        OP_BF16=q.dtype == torch.bfloat16, PRECISION=_precision(q.dtype),
        num_warps=_linear_warps(block_d, block_dv), num_stages=_linear_config()["num_stages"],
    )
    _record("linear_fwd", compiled)
    # in place: at 1M tokens each fp32 temporary of the output's size is 4 GiB per 16 heads
    empty = (den == 0).unsqueeze(-1)
    out = o_acc.div_(den.unsqueeze(-1)).masked_fill_(empty, 0.0).to(q.dtype)
    if return_state:
        return out, den, S_out, z_out
    return out, den


# The linear backward accumulates dq, dk, dv in fp32 scratch (its tile programs add into
# the same rows). Scratch for every head at once costs up to 1.5x the size of q, k, v, o and
# their gradients; past scratch_min_bytes the heads are cut into groups whose scratch stays
# under scratch_fraction of those tensors, so that 1M-token training peaks near 1.2x their
# size. Fewer heads per launch leave SMs idle (an H100 measured 3.7 s instead of 0.72 s at 1M
# tokens, D = 64, with one head per launch), so groups are as large as the budget allows and
# of equal size. The budget is the settings' scratch_fraction and scratch_min_bytes.


def heads_per_launch(q, k, v) -> int:
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scratch_per_head = 4 * B * ((Hq // Hk) * Nq * D + Nk * (D + Dv))
    tensors = 2 * q.element_size() * B * (Hq * Nq * (D + Dv) + Hk * Nk * (D + Dv))  # q, o, k, v and gradients
    budget = max(current_settings().scratch_min_bytes, current_settings().scratch_fraction * tensors)
    most = max(1, min(Hk, int(budget // scratch_per_head)))
    launches = -(-Hk // most)
    return -(-Hk // launches)


def linear_backward(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2):
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = Hq // Hk
    inv_den, crow = _row_terms(out, den, grad_out)
    group = heads_per_launch(q, k, v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for h0 in range(0, Hk, group):
        h1 = min(Hk, h0 + group)
        qs = slice(h0 * groups, h1 * groups)
        _linear_backward_heads(
            q[:, qs], k[:, h0:h1], v[:, h0:h1], mask, grad_out[:, qs],
            inv_den[:, qs].contiguous(), crow[:, qs].contiguous(), causal, scale, p, a0, a1, a2,
            grads=(dq[:, qs], dk[:, h0:h1], dv[:, h0:h1]))
    return dq, dk, dv


def _linear_backward_heads(q, k, v, mask, grad_out, inv_den, crow, causal, scale, p, a0, a1, a2, grads):
    """Writes dq, dk, dv of these heads into ``grads`` (views of the whole gradients, in the
    inputs' dtypes), so that no second copy of a head group's gradients is made."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    block_d, n_tiles, _ = linear_layout(D, p)
    block_dv = _block_dv(Dv)
    tile_m, tile_n, _ = _pair_tiles(block_d, str(q.device))
    m, smb, smn = _mask_args(mask)
    mp = m if m is not None else q
    dq = torch.zeros(B, Hq, Nq, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, Hk, Nk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, Hk, Nk, Dv, dtype=torch.float32, device=q.device)
    grid = (n_tiles + 1, triton.cdiv(Dv, block_dv), B * Hk)
    strides = (*q.stride(), *k.stride(), *v.stride(), smb, smn, *grad_out.stride())
    common = dict(CAUSAL=causal, HAS_MASK=m is not None, CHUNK=_linear_config()["chunk"], BLOCK_D=block_d,
                  BLOCK_DV=block_dv, BT=PAIR_TILE, OP_BF16=q.dtype == torch.bfloat16,
                  PRECISION=_precision(q.dtype), num_warps=_linear_warps(block_d, block_dv),
                  num_stages=_linear_config()["num_stages"])
    compiled = linear_bwd_dq_kernel[grid](
        q, k, v, mp, grad_out, inv_den, crow, dq, dk, dv, tile_m, tile_n, *strides,
        Hk, Hq // Hk, Nq, Nk, D, Dv, n_tiles, scale, a0, a1, a2, P=p, **common,
    )
    _record("linear_bwd_dq", compiled)
    grads[0].copy_(dq)
    del dq  # finished: release the fp32 scratch before the second sweep
    compiled = linear_bwd_dkdv_kernel[grid](
        q, k, v, mp, grad_out, inv_den, crow, dk, dv, tile_m, tile_n, *strides,
        Hk, Hq // Hk, Nq, Nk, D, Dv, n_tiles, scale, a0, a1, a2, **common,
    )
    _record("linear_bwd_dkdv", compiled)
    grads[1].copy_(dk)
    grads[2].copy_(dv)


# ----------------------------------------------------------------------------------------
# custom operators
# ----------------------------------------------------------------------------------------


def choose_regime(len_k: int, dim: int, p: int, backward: bool = True) -> str:
    return "quadratic" if len_k <= crossover_length(dim, p, backward) else "linear"


@torch.library.custom_op("fastmax_hf::forward", mutates_args=(), device_types=("cuda", "cpu"))
def fastmax_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    causal: bool, scale: float, p: int, a0: float, a1: float, a2: float, regime: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if regime == "quadratic":
        return quadratic_forward(q, k, v, mask, causal, scale, p, a0, a1, a2)
    return linear_forward(q, k, v, mask, causal, scale, p, a0, a1, a2)


@fastmax_forward_op.register_fake
def _(q, k, v, mask, causal, scale, p, a0, a1, a2, regime):
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)


@torch.library.custom_op("fastmax_hf::backward", mutates_args=(), device_types=("cuda", "cpu"))
def fastmax_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    out: torch.Tensor, den: torch.Tensor, grad_out: torch.Tensor,
    causal: bool, scale: float, p: int, a0: float, a1: float, a2: float, regime: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = quadratic_backward if regime == "quadratic" else linear_backward
    return impl(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2)


@fastmax_backward_op.register_fake
def _(q, k, v, mask, out, den, grad_out, causal, scale, p, a0, a1, a2, regime):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, p, a0, a1, a2, regime = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, mask, out, den)
    ctx.options = (causal, scale, p, a0, a1, a2, regime)


def _backward(ctx, grad_out, _grad_den):
    q, k, v, mask, out, den = ctx.saved_tensors
    causal, scale, p, a0, a1, a2, regime = ctx.options
    dq, dk, dv = fastmax_backward_op(q, k, v, mask, out, den, grad_out.contiguous(),
                                     causal, scale, p, a0, a1, a2, regime)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastmax_hf::forward", _backward, setup_context=_setup_context)
torch.library.register_autocast("fastmax_hf::forward", "cuda", torch.bfloat16)


def triton_attention(q, k, v, options, *, causal=False, key_padding_mask=None, regime="auto"):
    """Fastmax core on the Triton kernels: (out in q's dtype, fp32 denominator (B, Hq, Nq)).

    ``options``: the kernel's coefficients, any object with attributes ``scale``, ``p``,
    ``a0``, ``a1``, ``a2`` (``fastmax_hf.FastmaxOptions``). ``regime``: "auto" (quadratic
    while Nk is below the measured crossover), "quadratic" or "linear". Arguments are
    assumed validated (``fastmax_hf.fastmax`` does that).
    """
    if regime == "auto":
        backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        regime = choose_regime(k.shape[2], q.shape[-1], options.p, backward)
    if regime not in ("quadratic", "linear"):
        raise ValueError(f"`regime` must be 'auto', 'quadratic' or 'linear', got {regime!r}")
    return fastmax_forward_op(q, k, v, key_padding_mask, bool(causal), float(options.scale), int(options.p),
                              float(options.a0), float(options.a1), float(options.a2), regime)


@torch.no_grad()
def triton_step(q, k, v, S, z, options, *, key_padding_mask=None):
    """n new tokens attend causally to themselves and the state (S, z); returns (out, S', z').

    The state layout is the linear kernels' (see ``linear_layout``); S, z are not modified.
    """
    out, _, S_new, z_new = linear_forward(q, k, v, key_padding_mask, True, options.scale, options.p,
                                          options.a0, options.a1, options.a2,
                                          state_in=(S, z), return_state=True)
    return out, S_new, z_new


def empty_state(batch, heads_kv, dim, dim_v, p, device):
    rows = feature_rows(dim, p)
    return (torch.zeros(batch, heads_kv, rows, dim_v, dtype=torch.float32, device=device),
            torch.zeros(batch, heads_kv, rows, dtype=torch.float32, device=device))


__all__ = ["triton_attention", "triton_step", "empty_state", "feature_rows", "choose_regime"]
