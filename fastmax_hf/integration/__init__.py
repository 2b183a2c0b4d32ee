"""Hugging Face Transformers integration: ``attn_implementation="fastmax"``.

``import fastmax_hf`` calls ``enable()``: it registers the attention and mask functions under
"fastmax" and patches the Llama-family and GPT-2 attention classes and generate() so that fastmax
models generate from a constant-size recurrent state (``FastmaxCache``). Every other attention
implementation computes exactly what it did before; ``disable()`` reverts the patches.
"""

from .attention import ATTN_IMPLEMENTATION, fastmax_attention_forward, fastmax_attention_mask, register_fastmax
from .cache import FastmaxCache, FastmaxCacheLayer
from .config import FastmaxConfig, get_fastmax_config, set_fastmax_config
from .patches import (
    FAMILIES,
    patch_all,
    patch_generation,
    patch_gpt2,
    patch_llama,
    patch_mistral,
    patch_qwen2,
    patch_qwen3,
    uses_recurrent_state,
    unpatch_all,
    unpatch_generation,
    unpatch_gpt2,
    unpatch_llama,
    unpatch_mistral,
    unpatch_qwen2,
    unpatch_qwen3,
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
    "FAMILIES",
    "FastmaxCache",
    "FastmaxCacheLayer",
    "FastmaxConfig",
    "disable",
    "enable",
    "fastmax_attention_forward",
    "fastmax_attention_mask",
    "get_fastmax_config",
    "patch_all",
    "patch_generation",
    "patch_gpt2",
    "patch_llama",
    "patch_mistral",
    "patch_qwen2",
    "patch_qwen3",
    "register_fastmax",
    "set_fastmax_config",
    "unpatch_all",
    "unpatch_generation",
    "unpatch_gpt2",
    "unpatch_llama",
    "unpatch_mistral",
    "unpatch_qwen2",
    "unpatch_qwen3",
    "uses_recurrent_state",
]
