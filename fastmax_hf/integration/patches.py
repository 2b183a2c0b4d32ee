"""What ``import fastmax_hf`` changes in transformers, each change small, named and revertible.

Three patches, for every model; no family needs a patch of its own in transformers 5.24 (the
per-family tables below refuse families or keep their key/value cache, and patch nothing):

    patch_attn_resolution / unpatch_attn_resolution
        ``PreTrainedModel.get_correct_attn_implementation``, where transformers turns the requested
        implementation (None when the caller named none) into the one the model uses. A model whose
        config carries fastmax options (``config.fastmax``, written by ``set_fastmax_config`` and saved
        in config.json) resolves None to "fastmax": ``from_pretrained(path)`` reloads a converted model
        as fastmax, ``from_pretrained(path, attn_implementation="sdpa")`` as sdpa. Whenever the result is
        "fastmax", the family is checked (``check_family``) and a config without fastmax options gets
        the defaults written into it (so that a model built with attn_implementation="fastmax" and
        saved reloads as fastmax too): a family whose attention does not go through
        ``ALL_ATTENTION_FUNCTIONS`` (Falcon's own dispatch, for example) or whose config asks for what
        fastmax cannot compute (logit soft-capping) is refused here, at from_config / from_pretrained,
        with an error naming the family and, where there is one, the config change that converts it.
    patch_generation / unpatch_generation
        ``GenerationMixin._prepare_cache_for_generation``: wherever transformers would build its default
        ``DynamicCache`` for a fastmax model, a ``FastmaxCache`` (constant size) is used instead;
        ``cache_implementation="static"`` gives a static ``FastmaxCache`` (state folded in place).
    patch_compiled_call / unpatch_compiled_call
        ``PreTrainedModel.get_compiled_call``, which generate() calls for its static-shape decoding
        steps when the cache is compileable: for a fastmax model it returns the model's
        ``DecodeGraphRunner`` (``graphs.py``: CUDA-graph replay of the eager step) instead of
        ``torch.compile(model.__call__)``.

The recurrent state itself needs no patch: ``FastmaxCache.update`` hands each layer over to the
attention function (see ``cache.py``), which every family calls through ``ALL_ATTENTION_FUNCTIONS``.
Every other attention implementation computes exactly what it computed before the patches.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable

import transformers

from ..notices import warn_once
from .attention import ATTN_IMPLEMENTATION
from .cache import FastmaxCache
from .config import CONFIG_ATTRIBUTE, set_fastmax_config

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")

# The model types that scripts/finetune.py converts (each tested end to end there). Every family
# that passes ``check_family`` runs with fastmax; the README's coverage table says which generate
# from the recurrent state (tests/test_families.py).
FAMILIES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


# ---------------------------------------------------------------------------------------------
# Which families fastmax can serve
# ---------------------------------------------------------------------------------------------


class FastmaxUnsupportedError(ValueError):
    """A model family or config that attn_implementation="fastmax" cannot serve.

    Attributes:
        family: the config's model_type.
        reason: what fastmax lacks, in a few words ("own attention dispatch", "attention sinks", ...).
        fix: config attributes that convert the model (e.g. ``{"attn_logit_softcapping": None}``),
            or None when no config change can.
    """

    def __init__(self, message: str, family: str, reason: str, fix: dict | None = None):
        super().__init__(message)
        self.family = family
        self.reason = reason
        self.fix = fix


_SINKS = (
    "attention sinks",
    "its attention adds learned attention sinks (`s_aux`) to the softmax denominator, which fastmax's "
    "normalised polynomial kernel has no counterpart for",
)
_POSITION_BIAS = (
    "position bias", "its attention adds a position bias to every score, which the factorised kernel never forms"
)
_OWN_MASK = (
    "own 4-D mask",
    "its attention reads the attention mask itself as a 4-D (B, H, Nq, Nk) tensor of scores, which fastmax's "
    "2-D padding mask is not",
)
_INDEXER = (
    "own 4-D mask",
    "its sparse-attention indexer reads the attention mask itself as a 4-D (B, 1, Nq, Nk) tensor, which "
    "fastmax's 2-D padding mask is not",
)
_NOT_CAUSAL = (
    "decoder not marked causal",
    "its decoder self-attention is not marked causal (is_causal=False) and relies on a materialised causal mask, "
    "which fastmax never builds (causality is a flag of its kernel)",
)
OWN_DISPATCH = "own attention dispatch"

# model_type -> (reason in a few words, why fastmax cannot serve it), for families that pass the
# generic checks of check_family but cannot work (found by tests/test_families.py on transformers 5.24).
REFUSED_FAMILIES: dict[str, tuple[str, str]] = {
    "git": (OWN_DISPATCH, "its self-attention picks its class from its own table (GIT_SELF_ATTENTION_CLASSES), "
                          "which has no 'fastmax' entry"),
    "deepseek_v4": _SINKS,
    "flint": _SINKS,
    "gpt_oss": _SINKS,
    "granite_swa": _SINKS,
    "granitemoe_swa": _SINKS,
    "mimo_v2_flash": _SINKS,
    "inkling_text": _POSITION_BIAS,
    "inkling2_text": _POSITION_BIAS,
    "inkling2_loop_text": _POSITION_BIAS,
    "doge": _OWN_MASK,
    "hy_v4": _OWN_MASK,
    "axk2": _INDEXER,
    "deepseek_v32": _INDEXER,
    "glm_moe_dsa": _INDEXER,
    "dots3_note": _INDEXER,
    "dots3_note_text": _INDEXER,
    "bigbird_pegasus": _NOT_CAUSAL,
}

# model_type -> why generate() keeps transformers' key/value cache for it (exact, through the fastmax
# attention function, but growing with the sequence) instead of a FastmaxCache.
KV_CACHE_FAMILIES: dict[str, str] = {
    "diffllama": "its attention splits the cached values in two halves and calls the attention function twice",
    "mllama_text_model": "its cross-attention layers keep the image's keys and values in the cache (Mllama)",
    "minimax": "it builds its own MiniMaxCache, which holds its lightning-attention states beside keys and values",
}

# Config attribute -> (what it asks for, the value that asks for nothing): any other value asks for a
# function of each score, which fastmax's factorised kernel never forms.
REFUSED_CONFIG_OPTIONS: dict[str, tuple[str, object]] = {
    "attn_logit_softcapping": ("logit soft-capping", None),
    # Falcon (since it moved onto the attention interface, transformers 5.25) adds its ALiBi bias to
    # the attention mask, which the fastmax mask function does not build
    "alibi": ("ALiBi position biases (a bias added to every score)", False),
}


def _dispatches_through_interface(model_class: type) -> bool:
    """Whether ``model_class``'s attention goes through ``ALL_ATTENTION_FUNCTIONS``.

    transformers answers this itself (``_can_set_attn_implementation``, a check of the modeling file's
    source); when that helper is missing (another transformers release) the same check is made here."""
    helper = getattr(model_class, "_can_set_attn_implementation", None)
    if helper is not None:
        return bool(helper())
    module = sys.modules.get(model_class.__module__)
    try:
        code = inspect.getsource(module)
    except (OSError, TypeError):
        return True  # no source to read: let transformers' own dispatch decide
    if re.search(r"^class \w*Attention\w*\(nn\.Module\):", code, re.MULTILINE):
        return "ALL_ATTENTION_FUNCTIONS" in code
    return True


def check_family(model_class: type, config) -> None:
    """Raise ``FastmaxUnsupportedError`` naming the family when fastmax cannot serve this model."""
    family = getattr(config, "model_type", None) or model_class.__name__
    name = f"{family!r} ({model_class.__name__})"
    if family in REFUSED_FAMILIES:
        reason, why = REFUSED_FAMILIES[family]
        raise FastmaxUnsupportedError(f"attn_implementation='fastmax' cannot serve model family {name}: {why}",
                                      family, reason)
    if not _dispatches_through_interface(model_class):
        raise FastmaxUnsupportedError(
            f"attn_implementation='fastmax' cannot serve model family {name}: its attention classes do not call "
            "transformers' ALL_ATTENTION_FUNCTIONS (they choose their own implementation), so no registered "
            "attention function is ever reached. Use attn_implementation='sdpa' or 'eager' for this family.",
            family,
            OWN_DISPATCH,
        )
    for attribute, (meaning, harmless) in REFUSED_CONFIG_OPTIONS.items():
        if getattr(config, attribute, harmless) != harmless:
            raise FastmaxUnsupportedError(
                f"attn_implementation='fastmax' cannot serve model family {name} as configured: "
                f"`config.{attribute} = {getattr(config, attribute)!r}` asks for {meaning} (a function of each "
                f"score), which the factorised kernel never forms. To convert the model, set "
                f"`config.{attribute} = {harmless!r}` before building it.",
                family,
                meaning,
                fix={attribute: harmless},
            )


# ---------------------------------------------------------------------------------------------
# Attention resolution: a model with fastmax options loads as fastmax
# ---------------------------------------------------------------------------------------------

_MISSING = object()
_ORIGINAL_RESOLUTION: object = _MISSING
_ORIGINAL_PREPARE_CACHE: object = _MISSING
_ORIGINAL_COMPILED_CALL: object = _MISSING
# The cache_implementation that gives a fastmax model a static FastmaxCache (CUDA-graph decoding).
STATIC_CACHE_IMPLEMENTATION = "static"
RESOLUTION_METHOD = "get_correct_attn_implementation"


def _pretrained_model_class() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel


def _resolution_method() -> Callable:
    """transformers' resolution method, checked to be the one this patch was written against."""
    original = _pretrained_model_class().__dict__.get(RESOLUTION_METHOD)
    if original is None or list(inspect.signature(original).parameters)[:2] != ["self", "requested_attention"]:
        raise RuntimeError(
            f"fastmax_hf reloads converted models as fastmax through PreTrainedModel.{RESOLUTION_METHOD}(self, "
            f"requested_attention, ...), which transformers {transformers.__version__} does not have in that form. "
            "Please report this; until it is fixed, pass attn_implementation='fastmax' explicitly."
        )
    return original


def _get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
    """``PreTrainedModel.get_correct_attn_implementation``: fastmax options in the config make fastmax the default.

    ``requested_attention`` is None exactly when the caller named no implementation (transformers
    would then choose sdpa or eager); an explicit name always wins. A "fastmax" result is checked
    against the family (``check_family``)."""
    if requested_attention is None and getattr(self.config, CONFIG_ATTRIBUTE, None) is not None:
        requested_attention = ATTN_IMPLEMENTATION
    resolved = _ORIGINAL_RESOLUTION(self, requested_attention, *args, **kwargs)
    if resolved == ATTN_IMPLEMENTATION:
        check_family(type(self), self.config)
        if getattr(self.config, CONFIG_ATTRIBUTE, None) is None:
            # record the (default) options, so that save_pretrained writes them and the saved
            # model reloads as fastmax: transformers itself does not save the implementation
            set_fastmax_config(self.config)
    return resolved


def patch_attn_resolution() -> None:
    """Models whose config carries fastmax options load with fastmax unless the caller names another."""
    global _ORIGINAL_RESOLUTION
    if _ORIGINAL_RESOLUTION is not _MISSING:
        return
    _ORIGINAL_RESOLUTION = _resolution_method()
    setattr(_pretrained_model_class(), RESOLUTION_METHOD, _get_correct_attn_implementation)


def unpatch_attn_resolution() -> None:
    global _ORIGINAL_RESOLUTION
    if _ORIGINAL_RESOLUTION is _MISSING:
        return
    setattr(_pretrained_model_class(), RESOLUTION_METHOD, _ORIGINAL_RESOLUTION)
    _ORIGINAL_RESOLUTION = _MISSING


# ---------------------------------------------------------------------------------------------
# generate(): a FastmaxCache instead of a DynamicCache
# ---------------------------------------------------------------------------------------------


def _uses_fastmax(config) -> bool:
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def uses_recurrent_state(model) -> bool:
    """Whether generate() gives ``model`` a FastmaxCache: its decoder uses fastmax, generation is patched and
    the family is not one that keeps a key/value cache (``KV_CACHE_FAMILIES``)."""
    text_config = model.config.get_text_config(decoder=True)
    return (_ORIGINAL_PREPARE_CACHE is not _MISSING and _uses_fastmax(text_config)
            and not {model.config.model_type, text_config.model_type} & set(KV_CACHE_FAMILIES))


def _is_assisted(generation_config, generation_mode) -> bool:
    mode = getattr(generation_mode, "value", generation_mode)
    return mode == "assisted_generation" or bool(getattr(generation_config, "is_assistant", False))


def _static_kv_implementations() -> tuple:
    from transformers.generation import configuration_utils

    return tuple(getattr(configuration_utils, "ALL_STATIC_CACHE_IMPLEMENTATIONS", ("static", "offloaded_static")))


def _prepare_cache_for_generation(
    self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
):
    """GenerationMixin._prepare_cache_for_generation, choosing a FastmaxCache for fastmax models.

    Models without fastmax take the original unchanged. For fastmax models, wherever transformers
    would have built its default DynamicCache a FastmaxCache is used instead; requests that a
    recurrent state cannot serve (a static/offloaded/quantized cache, assisted decoding) are refused.
    A cache of another class that the model builds for itself is kept.
    """
    original = _ORIGINAL_PREPARE_CACHE
    text_config = self.config.get_text_config(decoder=True)
    if not _uses_fastmax(text_config):
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    family = next((t for t in (self.config.model_type, text_config.model_type) if t in KV_CACHE_FAMILIES), None)
    if family is not None and generation_config.cache_implementation in _static_kv_implementations():
        raise ValueError(
            f"cache_implementation={generation_config.cache_implementation!r} preallocates key/value slots, which "
            f"fastmax attention cannot mask: its causal mask is aligned to the last key, so a {family!r} model's "
            "prompt would attend to the empty slots' positions. Leave cache_implementation unset (a key/value "
            "cache that grows with the sequence)."
        )
    if family is not None:
        warn_once(
            f"kv-cache:{family}",
            f"fastmax_hf keeps transformers' key/value cache for {family!r}: {KV_CACHE_FAMILIES[family]}. "
            "Generation is exact (the attention function sees every cached key), but its memory grows with the sequence.",
        )
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    if _is_assisted(generation_config, generation_mode):
        raise ValueError(
            "assisted decoding (assistant_model, prompt_lookup_num_tokens, or this model as an assistant) rolls the "
            "cache back with crop(), which fastmax's recurrent state cannot do: generate without an assistant"
        )
    user_cache = next((model_kwargs[n] for n in CACHE_ARGUMENT_NAMES if model_kwargs.get(n) is not None), None)
    implementation = generation_config.cache_implementation
    static = implementation == STATIC_CACHE_IMPLEMENTATION
    if user_cache is None and generation_config.use_cache is not False:
        if implementation not in (None, "dynamic", STATIC_CACHE_IMPLEMENTATION):
            raise ValueError(
                f"cache_implementation={implementation!r} is a key/value cache; a fastmax model generates from a "
                "constant-size recurrent state (FastmaxCache) instead. Leave cache_implementation unset, or set "
                f"it to {STATIC_CACHE_IMPLEMENTATION!r} for decoding steps replayed as CUDA graphs."
            )

    # transformers would preallocate a static key/value cache: have it build its default one
    # (replaced below) and give the model a static FastmaxCache instead
    if static:
        generation_config.cache_implementation = None
    try:
        result = original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    finally:
        if static:
            generation_config.cache_implementation = implementation

    if user_cache is None:
        from transformers.cache_utils import DynamicCache

        for name in CACHE_ARGUMENT_NAMES:
            built = model_kwargs.get(name)
            if type(built) is DynamicCache:
                model_kwargs[name] = FastmaxCache(config=text_config, static=static)
            elif built is not None and not isinstance(built, FastmaxCache):
                warn_once(
                    f"own-cache:{type(built).__name__}",
                    f"{type(self).__name__} builds its own {type(built).__name__}: generate() keeps it (exact, but a "
                    "key/value cache grows with the sequence) instead of a constant-size FastmaxCache",
                )
    return result


def patch_generation() -> None:
    """Make generate() build a FastmaxCache for fastmax models (others: unchanged)."""
    global _ORIGINAL_PREPARE_CACHE
    from transformers.generation.utils import GenerationMixin

    if _ORIGINAL_PREPARE_CACHE is not _MISSING:
        return
    original = GenerationMixin.__dict__.get("_prepare_cache_for_generation")
    if original is None:
        raise RuntimeError(
            "fastmax_hf gives generate() a FastmaxCache through GenerationMixin._prepare_cache_for_generation, which "
            f"transformers {transformers.__version__} does not have. Please report this; until it is fixed, pass "
            "cache=FastmaxCache(config=model.config) to generate() yourself."
        )
    _ORIGINAL_PREPARE_CACHE = original
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


def unpatch_generation() -> None:
    global _ORIGINAL_PREPARE_CACHE
    from transformers.generation.utils import GenerationMixin

    if _ORIGINAL_PREPARE_CACHE is _MISSING:
        return
    GenerationMixin._prepare_cache_for_generation = _ORIGINAL_PREPARE_CACHE
    _ORIGINAL_PREPARE_CACHE = _MISSING


def _get_compiled_call(self, compile_config=None):
    """PreTrainedModel.get_compiled_call, answering with CUDA-graph replay for fastmax models.

    generate() asks for it when the cache is compileable (a static FastmaxCache), for every
    decoding step. The runner replays captured graphs of the eager step; a call it cannot
    replay runs the model as it is."""
    if not uses_recurrent_state(self):
        return _ORIGINAL_COMPILED_CALL(self, compile_config)
    from .graphs import decode_graph_runner

    if compile_config is not None and getattr(compile_config, "mode", None) not in (None, "reduce-overhead"):
        warn_once(
            "compile-config",
            f"fastmax_hf: a fastmax model decodes its static-cache steps as CUDA graphs of the eager step; the "
            f"compile_config (mode={compile_config.mode!r}) is not used",
        )
    return decode_graph_runner(self)


def patch_compiled_call() -> None:
    """Make generate()'s static-shape decoding replay CUDA graphs for fastmax models (others: unchanged)."""
    global _ORIGINAL_COMPILED_CALL
    from transformers import PreTrainedModel

    if _ORIGINAL_COMPILED_CALL is not _MISSING:
        return
    original = PreTrainedModel.__dict__.get("get_compiled_call")
    if original is None:  # a transformers without a static-shape path: static caches decode eagerly
        return
    _ORIGINAL_COMPILED_CALL = original
    PreTrainedModel.get_compiled_call = _get_compiled_call


def unpatch_compiled_call() -> None:
    global _ORIGINAL_COMPILED_CALL
    from transformers import PreTrainedModel

    if _ORIGINAL_COMPILED_CALL is _MISSING:
        return
    PreTrainedModel.get_compiled_call = _ORIGINAL_COMPILED_CALL
    _ORIGINAL_COMPILED_CALL = _MISSING


def patch_all() -> None:
    """Every patch; what ``import fastmax_hf`` does (idempotent)."""
    patch_attn_resolution()
    patch_generation()
    patch_compiled_call()


def unpatch_all() -> None:
    unpatch_compiled_call()
    unpatch_generation()
    unpatch_attn_resolution()
