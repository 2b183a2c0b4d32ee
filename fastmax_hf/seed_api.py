"""The original Fastmax library's API, on top of ``fastmax_hf.fastmax``.

Code written against the seed keeps working by changing only its import:

    from fastmax_hf import FASTMultiHeadAttention, rpe_matrix_creator
    attn = FASTMultiHeadAttention(use_custom_gradient=True)
    o = attn(q, k, v, mask=True)

Differences from the seed, all lifted limits: any B*H (the seed needed > 32), float16,
bfloat16 and float32 (the seed: float32 only), any head dim (the seed: D <= 64), CPU as
well as GPU, grouped-query attention, and correct results for every shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import fastmax
from .validation import check_flag


def fastmax_function(
    q,
    k,
    v,
    drop_noise=None,
    rpe_matrix=None,
    mask=False,
    dropout=0.0,
    normalize=False,
    temperature=1.0,
    a0=1.0,
    a1=1.0,
    a2=0.5,
    lim=1.0,
    p=2,
    use_custom_gradient=True,
):
    """Seed-style call: s = q.k / temperature; ``mask`` is the causal flag.

    ``use_custom_gradient=True`` takes the fused kernels with their hand-written backward
    (Triton on a GPU, the chunked linear-memory PyTorch form elsewhere); False takes the
    plain differentiable PyTorch path (the direct O(N^2) form). The flags ``mask``, ``normalize``
    and ``use_custom_gradient`` take Python bools only (a TypeError naming the flag otherwise:
    the seed read ``mask="no"`` as causal).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature == 0:
        raise ValueError(f"`temperature` must be a non-zero number, got {temperature!r}")
    # flags are bools, nothing else (``mask="no"`` must not be causal): see validation.check_flag
    check_flag("mask", mask)
    check_flag("normalize", normalize)
    backend = "auto" if check_flag("use_custom_gradient", use_custom_gradient) else "reference"
    return fastmax(
        q, k, v,
        causal=mask,
        scale=1.0 / float(temperature),
        p=p, a0=a0, a1=a1, a2=a2,
        normalize=normalize, lim=lim,
        dropout=dropout, drop_noise=drop_noise,
        rpe_matrix=rpe_matrix,
        backend=backend,
    )


class FASTMultiHeadAttention(nn.Module):
    """The seed's attention module. Inputs (B*H, N, D) or (B, H, N, D); output shaped like q
    (with v's last dimension). Dropout is applied in training mode only."""

    def __init__(self, use_custom_gradient: bool = True):
        super().__init__()
        self.use_custom_gradient = check_flag("use_custom_gradient", use_custom_gradient)

    def forward(
        self,
        q,
        k,
        v,
        drop_noise=None,
        rpe_matrix=None,
        mask=False,
        dropout=0.0,
        normalize=False,
        temperature=1.0,
        a0=1.0,
        a1=1.0,
        a2=0.5,
        lim=1.0,
        p=2,
    ):
        return fastmax_function(
            q, k, v,
            drop_noise=drop_noise,
            rpe_matrix=rpe_matrix,
            mask=mask,
            dropout=dropout if self.training else 0.0,
            normalize=normalize,
            temperature=temperature,
            a0=a0, a1=a1, a2=a2, lim=lim, p=p,
            use_custom_gradient=self.use_custom_gradient,
        )


def rpe_matrix_creator(n, d, device, dtype, structured=False, is_zero=True):
    """Relative position vectors for offsets n-1 ... -(n-1): a (2n-1, d) matrix whose row
    (n-1) - t holds the vector of offset t = i - j (offset 0 at row n-1).

    ``structured``: sinusoidal vectors of the offset; otherwise zeros (``is_zero``) or
    standard normal noise, to be learned.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"`d` must be a positive int, got {d!r}")
    check_flag("structured", structured)
    check_flag("is_zero", is_zero)
    if structured:
        offsets = (n - 1) - torch.arange(2 * n - 1, dtype=torch.float64)  # t for each row
        freqs = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = offsets[:, None] * freqs[None, :]
        table = torch.zeros(2 * n - 1, d, dtype=torch.float64)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles[:, : d // 2])
        return table.to(device=device, dtype=dtype)
    if is_zero:
        return torch.zeros(2 * n - 1, d, device=device, dtype=dtype)
    return torch.randn(2 * n - 1, d, device=device, dtype=dtype)
