"""Hugging Face Transformers integration: ``attn_implementation="fastmax"``.

``import fastmax_hf`` calls ``enable()``: it registers the attention and mask functions under
"fastmax" and applies the patches of ``patches.py`` (a model whose config carries fastmax options
loads as fastmax; generate() gives fastmax models a constant-size ``FastmaxCache``, which every
family fills through ``FastmaxCache.update``; with ``cache_implementation="static"`` its decoding
steps are replayed as CUDA graphs, ``graphs.py``). Every other attention implementation computes
exactly what it did before; ``disable()`` reverts the patches.
"""

from .attention import ATTN_IMPLEMENTATION, fastmax_attention_forward, fastmax_attention_mask, register_fastmax
from .cache import FastmaxCache, FastmaxCacheLayer
from .config import FastmaxConfig, get_fastmax_config, model_card, set_fastmax_config
from .graphs import DecodeGraphRunner, decode_graph_runner
from .window_gain import learn_window_gains, store_window_gains
from .patches import (
    FAMILIES,
    KV_CACHE_FAMILIES,
    REFUSED_CONFIG_OPTIONS,
    REFUSED_FAMILIES,
    FastmaxUnsupportedError,
    check_family,
    patch_all,
    patch_attn_resolution,
    patch_compiled_call,
    patch_generation,
    unpatch_all,
    unpatch_attn_resolution,
    unpatch_compiled_call,
    unpatch_generation,
    uses_recurrent_state,
)


def enable() -> None:
    """Register "fastmax" with transformers and apply every patch (idempotent)."""
    register_fastmax()
    patch_all()


def disable() -> None:
    """Revert every patch. "fastmax" stays registered (transformers has no unregister)."""
    unpatch_all()


__all__ = [
    "ATTN_IMPLEMENTATION",
    "DecodeGraphRunner",
    "FAMILIES",
    "KV_CACHE_FAMILIES",
    "FastmaxCache",
    "FastmaxCacheLayer",
    "FastmaxConfig",
    "FastmaxUnsupportedError",
    "REFUSED_CONFIG_OPTIONS",
    "REFUSED_FAMILIES",
    "check_family",
    "decode_graph_runner",
    "disable",
    "enable",
    "fastmax_attention_forward",
    "fastmax_attention_mask",
    "get_fastmax_config",
    "model_card",
    "patch_all",
    "patch_attn_resolution",
    "patch_compiled_call",
    "patch_generation",
    "register_fastmax",
    "set_fastmax_config",
    "unpatch_all",
    "unpatch_attn_resolution",
    "unpatch_compiled_call",
    "unpatch_generation",
    "uses_recurrent_state",
]
