"""Triton kernels for Fastmax attention (shipped as ``fastmax_hf.kernels``).

They know nothing of transformers: plain tensors in, tensors out.

- ``triton_attention``: forward and backward (autograd) in two regimes, quadratic
  (FlashAttention-like tiles) and linear (chunked fp32 state kept on chip).
- ``triton_step``: causal attention of new tokens continued from a state (S, z), and the
  new state: prefill and token-by-token decoding.
"""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux dependency
    HAS_TRITON = False

if HAS_TRITON:
    from .ops import choose_regime, empty_state, feature_rows, triton_attention, triton_step

__all__ = ["HAS_TRITON", "triton_attention", "triton_step", "empty_state", "feature_rows", "choose_regime"]
