"""Launcher of the in-place decoding step (kernels/decode.py), and its custom operator.

``triton_decode_step_(q, k, v, S, z, options, key_valid=None)`` answers one new token per
sequence from the state and folds it in, writing S and z in place. It launches no more than
two kernels, allocates only its output (and the split partials), reads no value back to the
host: one call is a CUDA-graph-safe decoding step of one attention layer.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from .common import cdiv, next_power_of_2
from .decode import decode_finish_kernel, decode_step_kernel
from .ops import PAIR_TILE, _pair_tiles, check_kernel_dtypes, linear_layout

# Programs a step aims for: twice the SMs of the GPU, so that a batch-1 step still streams
# its state through every SM.
_PROGRAMS_PER_SM = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device_str: str) -> int:
    device = torch.device(device_str)
    if device.type != "cuda":
        return 4  # the interpreter: enough splits to exercise the partial sums
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_plan(batch: int, heads_kv: int, group: int, dim: int, dim_v: int, p: int, device,
                splits: int | None = None, sm_count: int | None = None) -> dict:
    """Block sizes, split count and rows per split of a step (``splits`` forces the split count;
    ``sm_count``, the device's SMs, is read from ``device`` when not given)."""
    block_d, n_tiles, f_rows = linear_layout(dim, p)
    block_g = next_power_of_2(group)
    block_dv = min(128, max(16, next_power_of_2(dim_v)))
    # the (BLOCK_G, ROWS, BLOCK_DV) product of a loop iteration stays within 16k fp32 values
    budget = max(1, 16384 // (block_g * block_dv))
    rows = max(16, min(64, 1 << (budget.bit_length() - 1)))
    value_blocks = cdiv(dim_v, block_dv)
    row_blocks = cdiv(f_rows, rows)
    if splits is None:
        wanted = _PROGRAMS_PER_SM * (sm_count or _sm_count(str(torch.device(device))))
        splits = cdiv(wanted, batch * heads_kv * value_blocks)
    rows_per_split = cdiv(row_blocks, max(1, min(int(splits), row_blocks))) * rows
    splits = cdiv(f_rows, rows_per_split)
    # one program per key/value head writes the output itself; more sum partials in a second kernel
    finish = splits > 1 or value_blocks > 1
    return dict(block_d=block_d, n_tiles=n_tiles, f_rows=f_rows, block_g=block_g, block_dv=block_dv, rows=rows,
                value_blocks=value_blocks, splits=splits, rows_per_split=rows_per_split, finish=finish)


def _check(q, k, v, S, z, key_valid, f_rows):
    check_kernel_dtypes(q, k, v)
    B, Hq, n, D = q.shape
    Hk = k.shape[1]
    if n != 1 or k.shape[2] != 1 or v.shape[2] != 1:
        raise ValueError(f"a decoding step takes one new token: `q`, `k`, `v` hold {n}, {k.shape[2]}, {v.shape[2]}")
    if Hq % Hk:
        raise ValueError(f"`q` has {Hq} heads, not a multiple of the {Hk} key/value heads of `k`")
    want_S = (B, Hk, f_rows, v.shape[-1])
    if tuple(S.shape) != want_S or S.dtype != torch.float32:
        raise ValueError(f"`S` must be a float32 {want_S} state (kernels.empty_state), got {S.dtype} "
                         f"{tuple(S.shape)}")
    if tuple(z.shape) != want_S[:3] or z.dtype != torch.float32:
        raise ValueError(f"`z` must be a float32 {want_S[:3]} state, got {z.dtype} {tuple(z.shape)}")
    if key_valid is not None and tuple(key_valid.shape) != (B,):
        raise ValueError(f"`key_valid` must be (B,) = ({B},), got {tuple(key_valid.shape)}")


def triton_decode_step_(q, k, v, S, z, options, *, key_valid=None, splits=None):
    """One decoding step in place: returns out (B, Hq, 1, Dv) in q's dtype; S, z become S', z'.

    Args:
        q: (B, Hq, 1, D); k, v: (B, Hk, 1, D), (B, Hk, 1, Dv), any strides.
        S, z: (B, Hk, F_ROWS, Dv), (B, Hk, F_ROWS) fp32 states in the linear kernels' layout.
        options: ``scale``, ``p``, ``a0``, ``a1``, ``a2``.
        key_valid: (B,) bool, False = this step's token is padding (it attends, joins nothing);
            any stride (a column of a (B, N) attention mask).
        splits: programs per key/value head and value block along the state rows (None: chosen).
    """
    B, Hq, _, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    plan = decode_plan(B, Hk, Hq // Hk, D, Dv, int(options.p), q.device, splits)
    _check(q, k, v, S, z, key_valid, plan["f_rows"])
    scale = float(options.scale)
    a0, c1, c2 = float(options.a0), float(options.a1) * scale, float(options.a2) * scale * scale
    out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
    splits = plan["splits"]
    if plan["finish"]:
        part_num = torch.empty(B * Hk * splits * plan["block_g"], Dv, dtype=torch.float32, device=q.device)
        part_den = torch.empty(B * Hk * splits * plan["block_g"], dtype=torch.float32, device=q.device)
    else:
        part_num = part_den = out
    valid = out if key_valid is None else key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
    tile_m, tile_n = _pair_tiles(plan["block_d"], str(q.device))
    grid = (B * Hk, plan["value_blocks"], splits)
    decode_step_kernel[grid](
        q, k, v, S, z, valid, out, part_num, part_den, tile_m, tile_n,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(3),
        v.stride(0), v.stride(1), v.stride(3),
        S.stride(0), S.stride(1), S.stride(2), S.stride(3),
        z.stride(0), z.stride(1), z.stride(2),
        out.stride(0), out.stride(1), out.stride(3), valid.stride(0) if key_valid is not None else 0,
        Hk, D, Dv, plan["f_rows"], plan["rows_per_split"], splits, a0, c1, c2,
        GROUP=Hq // Hk, BLOCK_G=plan["block_g"], BLOCK_D=plan["block_d"], BLOCK_DV=plan["block_dv"],
        BT=PAIR_TILE, N_TILES=plan["n_tiles"], ROWS=plan["rows"], FINISH=plan["finish"],
        HAS_VALID=key_valid is not None, num_warps=4,
    )
    if plan["finish"]:
        decode_finish_kernel[(B * Hk, plan["value_blocks"])](
            part_num, part_den, out, out.stride(0), out.stride(1), out.stride(3), Hk, Dv, splits,
            GROUP=Hq // Hk, BLOCK_G=plan["block_g"], BLOCK_DV=plan["block_dv"], num_warps=4,
        )
    return out


@torch.library.custom_op("fastmax_hf::decode_step_", mutates_args=("S", "z"), device_types=("cuda", "cpu"))
def fastmax_decode_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
    key_valid: torch.Tensor | None, scale: float, p: int, a0: float, a1: float, a2: float,
) -> torch.Tensor:
    """``triton_decode_step_`` as an operator that torch.compile keeps opaque (S and z mutated)."""
    options = SimpleNamespace(scale=scale, p=p, a0=a0, a1=a1, a2=a2)
    return triton_decode_step_(q, k, v, S, z, options, key_valid=key_valid)


@fastmax_decode_step_op.register_fake
def _(q, k, v, S, z, key_valid, scale, p, a0, a1, a2):
    B, Hq = q.shape[:2]
    return q.new_empty(B, Hq, 1, v.shape[-1])


def decode_step_(q, k, v, S, z, options, *, key_valid=None):
    """The entry point: the custom operator under torch.compile, the launcher otherwise."""
    if torch.compiler.is_compiling():
        return fastmax_decode_step_op(q, k, v, S, z, key_valid, float(options.scale), int(options.p),
                                      float(options.a0), float(options.a1), float(options.a2))
    return triton_decode_step_(q, k, v, S, z, options, key_valid=key_valid)
