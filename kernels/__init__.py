"""Triton kernels for Fastmax attention (shipped as ``fastmax_hf.kernels``).

They know nothing of transformers: plain tensors in, tensors out, and an options object
with the attributes ``scale``, ``p``, ``a0``, ``a1``, ``a2`` (``fastmax_hf.FastmaxOptions``).

- ``triton_attention``: forward and backward (autograd) in two regimes, quadratic
  (FlashAttention-like tiles) and linear (chunked fp32 state).
- ``triton_step``: causal attention of new tokens continued from a state (S, z), and the
  new state: prefill and token-by-token decoding.
- ``decode_step_``: one new token per sequence folded into (S, z) in place, for decoding
  that a CUDA graph replays.
- ``triton_window_attention``: the hybrid window (exp over the last W keys, Fastmax over
  the earlier ones, one normaliser; ``fastmax_hf.window`` defines it), forward and backward.
- ``triton_scale_by_peak`` / ``triton_scale_qk_by_peak``: normalize's scaling x * lim /
  max ||x_n|| of one tensor, or of q and k in the same launches (``normalize_scaler`` returns
  the latter where the setting ``fused_normalize`` asks for it).
- ``settings`` / ``current_settings``: launch parameters and scratch budgets.
"""

__all__ = ["HAS_TRITON", "triton_attention", "triton_step", "decode_step_", "triton_window_attention",
           "triton_scale_by_peak", "triton_scale_qk_by_peak", "normalize_scaler", "empty_state", "feature_rows",
           "choose_regime", "KernelSettings", "current_settings", "set_settings", "settings"]

if __name__ != "fastmax_hf.kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path, and transformers
    # imports the Hugging Face package of that name (a dependency since transformers 5.25)
    # whenever it is installed. Then that package takes the name, found on the rest of sys.path;
    # otherwise load nothing (a second copy would register the custom operators twice), and
    # without a version transformers' probe concludes that the package is not installed.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
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
        from .window_ops import triton_window_attention
        from .normalize_ops import normalize_scaler, triton_scale_by_peak, triton_scale_qk_by_peak
