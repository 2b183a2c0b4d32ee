"""Constant-memory generation: patched attention classes and generate()'s cache choice.

The attention function never sees the cache, so the attention classes' ``forward`` is wrapped.
The wrapper is a pass-through (the original forward, called with the very same arguments) unless

    the module's config uses attn_implementation="fastmax"  and  its cache is a FastmaxCache.

Then it calls the original forward with the cache set to None and the module's
``FastmaxCacheLayer`` in the keyword ``fastmax_cache_layer``, which these forwards pass on to the
attention function: projections, q/k norms and RoPE run exactly as the model wrote them (RoPE is
applied before attention), and the attention function continues the layer's recurrent state with
the new tokens instead of attending to cached keys and values. sdpa, eager and every other
implementation take the first branch and compute exactly what they computed before the patch.

Families (one small function each, revertible):
    patch_llama / unpatch_llama       LlamaAttention
    patch_mistral / unpatch_mistral   MistralAttention
    patch_qwen2 / unpatch_qwen2       Qwen2Attention
    patch_qwen3 / unpatch_qwen3       Qwen3Attention
    patch_gpt2 / unpatch_gpt2         GPT2Attention (self-attention; cross-attention is untouched)
    patch_generation / unpatch_generation
                                      generate() builds a FastmaxCache for fastmax models

Both spellings of the cache argument are handled: ``past_key_values`` (transformers 5.17) and
``cache`` (5.24, which still accepts the old name).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

from ..notices import warn_once
from .attention import ATTN_IMPLEMENTATION, CACHE_LAYER_KWARG
from .cache import FastmaxCache

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")

FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": (("transformers.models.llama.modeling_llama", "LlamaAttention"),),
    "mistral": (("transformers.models.mistral.modeling_mistral", "MistralAttention"),),
    "qwen2": (("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),),
    "qwen3": (("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention"),),
    "gpt2": (("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"),),
}

_MISSING = object()
# class -> what its __dict__ held under "forward" before patching (_MISSING if inherited)
_ORIGINAL_FORWARDS: dict[type, object] = {}
_ORIGINAL_PREPARE_CACHE: object = _MISSING


# ---------------------------------------------------------------------------------------------
# Attention classes
# ---------------------------------------------------------------------------------------------


def _uses_fastmax(module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def _fastmax_self_cache(cache):
    """The FastmaxCache that serves self-attention, looking inside an EncoderDecoderCache; else None."""
    cache = getattr(cache, "self_attention_cache", cache)
    return cache if isinstance(cache, FastmaxCache) else None


def _stateful_forward(original: Callable) -> Callable:
    """Wrap an attention forward so fastmax modules with a FastmaxCache continue its recurrent state."""
    signature = inspect.signature(original)  # follows __wrapped__ past transformers' decorators
    extra_kwargs_name = next(
        (name for name, param in signature.parameters.items() if param.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    if extra_kwargs_name is None:
        raise TypeError(f"{original.__qualname__} takes no **kwargs: the attention function cannot receive the state")

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not _uses_fastmax(self) or getattr(self, "is_cross_attention", False):
            return original(self, *args, **kwargs)

        bound = signature.bind(self, *args, **kwargs)
        extra = bound.arguments.setdefault(extra_kwargs_name, {})
        # The cache may sit in a named parameter or, under the other version's name, in **kwargs.
        located = None
        for name in CACHE_ARGUMENT_NAMES:
            if name in signature.parameters and bound.arguments.get(name) is not None:
                located = (bound.arguments, name)
            elif extra.get(name) is not None:
                located = (extra, name)
            if located is not None:
                break
        cache = _fastmax_self_cache(located[0][located[1]]) if located is not None else None
        if cache is None:
            return original(self, *args, **kwargs)

        located[0][located[1]] = None  # the module must not call cache.update(): there are no K/V to keep
        extra[CACHE_LAYER_KWARG] = cache.layer(self.layer_idx)
        return original(*bound.args, **bound.kwargs)

    forward.__fastmax_original__ = original
    return forward


def _attention_classes(family: str) -> list[type]:
    classes = []
    for module_name, class_name in FAMILIES[family]:
        module = importlib.import_module(module_name)
        classes.append(getattr(module, class_name))
    return classes


def _patch_class(cls: type) -> None:
    if cls in _ORIGINAL_FORWARDS:
        return  # already patched: patching twice would wrap the wrapper
    _ORIGINAL_FORWARDS[cls] = cls.__dict__.get("forward", _MISSING)
    cls.forward = _stateful_forward(cls.forward)


def _unpatch_class(cls: type) -> None:
    original = _ORIGINAL_FORWARDS.pop(cls, None)
    if original is None:
        return
    if original is _MISSING:
        del cls.forward
    else:
        cls.forward = original


def patch_family(family: str) -> None:
    for cls in _attention_classes(family):
        _patch_class(cls)


def unpatch_family(family: str) -> None:
    for cls in _attention_classes(family):
        _unpatch_class(cls)


def patch_llama() -> None:
    """LlamaAttention keeps a FastmaxCache's recurrent state when the model uses "fastmax"."""
    patch_family("llama")


def unpatch_llama() -> None:
    unpatch_family("llama")


def patch_mistral() -> None:
    """MistralAttention (same structure as Llama; sliding windows are refused by the attention function)."""
    patch_family("mistral")


def unpatch_mistral() -> None:
    unpatch_family("mistral")


def patch_qwen2() -> None:
    """Qwen2Attention (same structure as Llama, with q/k/v biases)."""
    patch_family("qwen2")


def unpatch_qwen2() -> None:
    unpatch_family("qwen2")


def patch_qwen3() -> None:
    """Qwen3Attention (Llama structure plus q/k RMSNorm, which the original forward still applies)."""
    patch_family("qwen3")


def unpatch_qwen3() -> None:
    unpatch_family("qwen3")


def patch_gpt2() -> None:
    """GPT2Attention (self-attention; no RoPE, ``scaling`` already holds scale_attn_by_inverse_layer_idx)."""
    patch_family("gpt2")


def unpatch_gpt2() -> None:
    unpatch_family("gpt2")


def patched_classes() -> tuple[type, ...]:
    return tuple(_ORIGINAL_FORWARDS)


def uses_recurrent_state(model) -> bool:
    """Whether ``model`` has attention modules that keep a FastmaxCache's state (patched and fastmax)."""
    classes = patched_classes()
    return any(isinstance(m, classes) and _uses_fastmax(m) for m in model.modules()) if classes else False


# ---------------------------------------------------------------------------------------------
# generate(): a FastmaxCache instead of a DynamicCache
# ---------------------------------------------------------------------------------------------


def _is_assisted(generation_config, generation_mode) -> bool:
    mode = getattr(generation_mode, "value", generation_mode)
    return mode == "assisted_generation" or bool(getattr(generation_config, "is_assistant", False))


def _prepare_cache_for_generation(
    self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
):
    """GenerationMixin._prepare_cache_for_generation, choosing a FastmaxCache for fastmax models.

    Models without fastmax take the original unchanged. Fastmax models whose attention classes are
    patched get a FastmaxCache wherever transformers would have built its default DynamicCache;
    requests that a recurrent state cannot serve (a static/offloaded/quantized cache, assisted
    decoding) are refused. Fastmax models of other families keep the DynamicCache, which is
    exact through the attention function (it sees every cached key) but grows with the sequence.
    """
    original = _ORIGINAL_PREPARE_CACHE
    text_config = self.config.get_text_config(decoder=True)
    if getattr(text_config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    if not uses_recurrent_state(self):
        warn_once(
            f"no-state:{type(self).__name__}",
            f"fastmax_hf has no recurrent-state patch for {type(self).__name__}'s attention: generate() keeps "
            "transformers' key/value cache and runs fastmax over all cached keys (exact, but its memory grows "
            "with the sequence). Patched families: " + ", ".join(sorted(FAMILIES)),
        )
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    if _is_assisted(generation_config, generation_mode):
        raise ValueError(
            "assisted decoding (assistant_model, prompt_lookup_num_tokens, or this model as an assistant) rolls the "
            "cache back with crop(), which fastmax's recurrent state cannot do: generate without an assistant"
        )
    user_cache = next((model_kwargs[n] for n in CACHE_ARGUMENT_NAMES if model_kwargs.get(n) is not None), None)
    if user_cache is None and generation_config.use_cache is not False:
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={implementation!r} is a key/value cache; a fastmax model generates from a "
                "constant-size recurrent state (FastmaxCache) instead. Leave cache_implementation unset."
            )

    result = original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    if user_cache is None:
        from transformers.cache_utils import DynamicCache

        for name in CACHE_ARGUMENT_NAMES:
            if type(model_kwargs.get(name)) is DynamicCache:
                model_kwargs[name] = FastmaxCache(config=text_config)
    return result


def patch_generation() -> None:
    """Make generate() build a FastmaxCache for fastmax models (others: unchanged)."""
    global _ORIGINAL_PREPARE_CACHE
    from transformers.generation.utils import GenerationMixin

    if _ORIGINAL_PREPARE_CACHE is not _MISSING:
        return
    _ORIGINAL_PREPARE_CACHE = GenerationMixin.__dict__["_prepare_cache_for_generation"]
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


def unpatch_generation() -> None:
    global _ORIGINAL_PREPARE_CACHE
    from transformers.generation.utils import GenerationMixin

    if _ORIGINAL_PREPARE_CACHE is _MISSING:
        return
    GenerationMixin._prepare_cache_for_generation = _ORIGINAL_PREPARE_CACHE
    _ORIGINAL_PREPARE_CACHE = _MISSING


def patch_all() -> None:
    """Every family and generate(); what ``import fastmax_hf`` does."""
    for family in FAMILIES:
        patch_family(family)
    patch_generation()


def unpatch_all() -> None:
    for family in FAMILIES:
        unpatch_family(family)
    unpatch_generation()
