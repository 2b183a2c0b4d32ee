"""Triton kernels for Fastmax attention (shipped as ``fastmax_hf.kernels``).

They know nothing of transformers: plain tensors in, tensors out, and an options object
with the attributes ``scale``, ``p``, ``a0``, ``a1``, ``a2`` (``fastmax_hf.FastmaxOptions``).

- ``triton_attention``: forward and backward (autograd) in two regimes, quadratic
  (FlashAttention-like tiles) and linear (chunked fp32 state).
- ``triton_step``: causal attention of new tokens continued from a state (S, z), and the
  new state: prefill and token-by-token decoding.
- ``decode_step_``: one new token per sequence folded into (S, z) in place, for decoding
  that a CUDA graph replays.
- ``window_parts``: the two parts of the hybrid window (exp over the last W keys, Fastmax
  over the earlier ones), which ``fastmax_hf.window`` combines.
- ``settings`` / ``current_settings``: launch parameters and scratch budgets.
"""

__all__ = ["HAS_TRITON", "triton_attention", "triton_step", "decode_step_", "window_parts", "empty_state", "feature_rows",
           "choose_regime", "KernelSettings", "current_settings", "set_settings", "settings"]

if __name__ != "fastmax_hf.kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path and transformers,
    # probing for the Hugging Face ``kernels`` package, imports whatever answers to that name.
    # Load nothing (a second copy would register the custom operators twice); without a version
    # the probe concludes that the Hugging Face package is not installed.
    __all__ = []
    HAS_TRITON = False
else:
    from .settings import KernelSettings, current_settings, set_settings, settings

    try:
        import triton  # noqa: F401

        HAS_TRITON = True
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        HAS_TRITON = False

    if HAS_TRITON:
        from .ops import choose_regime, empty_state, feature_rows, triton_attention, triton_step
        from .decode_ops import decode_step_
        from .window_ops import window_parts
