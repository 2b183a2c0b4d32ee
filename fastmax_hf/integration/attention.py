"""Fastmax as a transformers attention implementation: ``attn_implementation="fastmax"``.

Two functions are registered under the name "fastmax":

* ``fastmax_attention_mask`` with ``AttentionMaskInterface``: what ``create_causal_mask`` and
  ``create_bidirectional_mask`` return for fastmax models. Fastmax never needs an N x N mask
  (causality is a flag of the kernel, bottom-right aligned), only which keys are padding: a 2-D
  (B, Nk) bool mask, True = attend, or None when nothing is padded. Without a registered mask
  function transformers would silently drop the padding mask; sdpa's would build an O(N^2) tensor.
* ``fastmax_attention_forward`` with ``AttentionInterface``: called by every model that goes
  through ``ALL_ATTENTION_FUNCTIONS`` with q (B, Hq, Nq, D) and k, v (B, Hk, Nk, D), K/V not
  repeated for grouped-query attention. It returns (output (B, Nq, Hq, Dv) contiguous, None).

The attention function never sees the cache. ``FastmaxCache.update``, which every attention
class calls just before its attention function, hands the layer over (``cache.take_hand_over``);
a caller can also pass a ``FastmaxCacheLayer`` in the keyword ``fastmax_cache_layer``. The
function then continues that layer's recurrent state with the new tokens instead of attending to
cached keys and values.
"""

from __future__ import annotations

import dataclasses

import torch

from ..functional import fastmax_with_options
from ..notices import warn_once
from ..options import FastmaxOptions
from ..stages import apply_dropout
from .cache import take_hand_over
from .config import get_fastmax_config
from .window_gain import learned_window_gain

ATTN_IMPLEMENTATION = "fastmax"
CACHE_LAYER_KWARG = "fastmax_cache_layer"

# ---------------------------------------------------------------------------------------------
# Mask function
# ---------------------------------------------------------------------------------------------


def fastmax_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The key padding mask of the keys an attention layer will see: (B, kv_length) bool, or None.

    transformers calls this with the user's 2-D ``attention_mask`` (B, seen + q_length) already cast
    to bool, and with the key window [kv_offset, kv_offset + kv_length) that the cache reports.
    ``mask_function`` (causal, bidirectional, packed-sequence overlays) is not materialised:
    causality is the kernel's ``causal`` flag, and packed sequences are read from ``position_ids``
    or ``cu_seq_lens_*`` by the attention function.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    # Like transformers' prepare_padding_mask: keys beyond the given mask are not attended.
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:
        mask = torch.nn.functional.pad(mask, (0, missing), value=False)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    if bool(mask.all()):
        return None
    return mask


# ---------------------------------------------------------------------------------------------
# Attention function
# ---------------------------------------------------------------------------------------------


def _layer_type(module, cache_layer) -> str:
    """The layer type of a windowed layer as the cache or the config names it, else "sliding_attention"."""
    if cache_layer is not None and getattr(cache_layer, "layer_type", None):
        return cache_layer.layer_type
    layer_types = getattr(getattr(module, "config", None), "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types is not None and isinstance(layer_idx, int) and layer_idx < len(layer_types):
        return str(layer_types[layer_idx])
    return "sliding_attention"


def _check_window(module, cache_layer, window: int | None, positions: int) -> None:
    """Sliding-window (and chunked) layers: exact while every position fits in the window, refused beyond.

    A query at position p of a sliding layer sees the keys p - window + 1 .. p; while the sequence
    has at most ``window`` positions that is every previous key, which is what fastmax attends to.
    Beyond it fastmax would attend to keys the layer must not see: refuse, naming the layer type."""
    if window is None or positions <= window:
        return
    raise ValueError(
        f"attn_implementation='fastmax' attends to every previous token, but layer {getattr(module, 'layer_idx', '?')} "
        f"({type(module).__name__}, layer type {_layer_type(module, cache_layer)!r}) has a sliding window of {window} tokens and "
        f"this call covers {positions} positions. Up to the window the two are the same; beyond it fastmax has no "
        "sliding window. To convert the model to full fastmax attention set, before building it, "
        "`config.sliding_window = None` (Mistral, Mixtral, Phi3, Starcoder2, ...), `config.use_sliding_window = False` "
        "(Qwen2, Qwen2-MoE), or `config.layer_types = ['full_attention'] * config.num_hidden_layers` (models with "
        "alternating layer types such as Gemma2/3, Cohere2, GPT-OSS)."
    )


def _refuse_unsupported(kwargs: dict) -> None:
    """Options of other attention implementations that Fastmax cannot honour: refuse, never ignore."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='fastmax' has no logit soft-capping (`softcap`); this model needs it")
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            "attn_implementation='fastmax' cannot add a `position_bias` to its scores: the factorised kernel "
            "never forms them"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='fastmax' has no attention sinks (`s_aux`); this model needs them")
    if kwargs.get("output_attentions"):
        warn_once(
            "output_attentions",
            "attn_implementation='fastmax' never forms attention weights: `output_attentions=True` returns None",
        )


def _padding_mask(attention_mask, batch: int, kv_length: int) -> torch.Tensor | None:
    """Check the mask the model passes and return it as a bool (B, kv_length) key padding mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attn_implementation='fastmax' takes a 2-D (B, Nk) padding mask, got a {type(attention_mask).__name__}"
        )
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation='fastmax' takes a 2-D (B, Nk) key padding mask, got shape "
            f"{tuple(attention_mask.shape)}. Fastmax's own mask function (registered by `import fastmax_hf`) "
            "produces it from the 2-D attention_mask; a custom 4-D mask cannot be applied in linear time."
        )
    if attention_mask.dtype.is_floating_point:
        raise TypeError(
            "attn_implementation='fastmax' takes a bool (or 0/1 integer) padding mask, True = attend; got a "
            f"{attention_mask.dtype} mask (an additive mask?)"
        )
    if tuple(attention_mask.shape) != (batch, kv_length):
        raise ValueError(
            f"the padding mask has shape {tuple(attention_mask.shape)}, expected (B, Nk) = ({batch}, {kv_length})"
        )
    return attention_mask.to(torch.bool)


def _document_spans(kwargs: dict, batch: int, len_q: int, len_k: int, has_padding: bool):
    """Packed sequences: a list of (row, q0, q1, k0, k1) per document, or None for one document per row.

    ``cu_seq_lens_q``/``cu_seq_lens_k`` (padding-free batches, one row) give the boundaries
    directly. Otherwise, as transformers' own packed-sequence detection and flash-attention do,
    ``position_ids`` that do not increase by 1 start a new document; this is only read when there
    is no padding mask and queries and keys are the same tokens (no cache continuation).
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        cu_q = cu_q if cu_q is not None else cu_k
        cu_k = cu_k if cu_k is not None else cu_q
        if batch != 1:
            raise ValueError(
                f"`cu_seq_lens_q/k` describe one flattened row of packed documents, but the batch has {batch} rows"
            )
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        if len(bounds_q) != len(bounds_k) or bounds_q[-1] != len_q or bounds_k[-1] != len_k or bounds_q[0] != 0:
            raise ValueError(
                f"`cu_seq_lens_q` {bounds_q} / `cu_seq_lens_k` {bounds_k} do not cover the {len_q} queries and "
                f"{len_k} keys of this call"
            )
        return [(0, bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]) for i in range(len(bounds_q) - 1)]

    position_ids = kwargs.get("position_ids")
    if position_ids is None or has_padding or len_q != len_k or len_q < 2:
        return None
    if position_ids.dim() != 2 or position_ids.shape[-1] != len_q:
        return None  # e.g. multimodal (3, B, N) rotary positions: not a packing signal
    position_ids = position_ids.expand(batch, -1)
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (B, N - 1): token t + 1 starts a document
    if not bool(starts.any()):
        return None
    spans = []
    for row, row_starts in enumerate(starts.tolist()):
        bounds = [0] + [t + 1 for t, start in enumerate(row_starts) if start] + [len_q]
        spans.extend((row, bounds[i], bounds[i + 1], bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
    return spans


def _packed_fastmax(query, key, value, options, spans, key_padding_mask, **fastmax_kwargs) -> torch.Tensor:
    """One ``fastmax`` call per document; documents never see each other. Returns (B, Hq, Nq, Dv)."""
    rows: dict[int, list[torch.Tensor]] = {}
    for row, q0, q1, k0, k1 in spans:
        mask = None if key_padding_mask is None else key_padding_mask[row : row + 1, k0:k1]
        rows.setdefault(row, []).append(
            fastmax_with_options(
                query[row : row + 1, :, q0:q1],
                key[row : row + 1, :, k0:k1],
                value[row : row + 1, :, k0:k1],
                options,
                key_padding_mask=mask,
                **fastmax_kwargs,
            )
        )
    return torch.cat([torch.cat(rows[row], dim=2) for row in range(query.shape[0])], dim=0)


def _recurrent_step(
    module, cache_layer, query, key, value, key_padding_mask, is_causal, options: FastmaxOptions, backend: str
):
    """Continue a ``FastmaxCacheLayer``'s state with the n new tokens of this call (B, Hq, n, Dv).

    The step is inference only (its output carries no gradient): a module in training mode that
    would backpropagate through it is refused rather than silently cut from the graph.
    """
    if not is_causal:
        raise ValueError("a FastmaxCache serves causal self-attention only; this layer is not causal")
    if module.training and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        raise RuntimeError(
            "the recurrent-state path (FastmaxCache) does not propagate gradients; train without a cache "
            "(use_cache=False), which runs the differentiable fastmax kernels"
        )
    if options.can_vanish():
        raise ValueError(
            f"with p={options.p}, a0={options.a0}, a1={options.a1}, a2={options.a2} (normalize={options.normalize}) "
            "the kernel f(s) can reach 0, and the recurrent state cannot check its denominators: generate with "
            "use_cache=False (the stateless path checks them), or use normalize=True with a small enough lim"
        )
    new_tokens = query.shape[2]
    if key_padding_mask is not None:
        expected = cache_layer.get_seq_length() + new_tokens
        if key_padding_mask.shape[-1] != expected:
            raise ValueError(
                f"the attention_mask covers {key_padding_mask.shape[-1]} tokens, but the cache has seen "
                f"{cache_layer.get_seq_length()} and this call adds {new_tokens}: pass the mask of all tokens so far"
            )
        key_padding_mask = key_padding_mask[:, -new_tokens:]
    return cache_layer.step(query, key, value, key_padding_mask=key_padding_mask, options=options, backend=backend)


def fastmax_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Fastmax attention for transformers' ``ALL_ATTENTION_FUNCTIONS``.

    Args:
        module: the attention module; its ``config.fastmax`` holds the options and its
            ``is_causal`` the default causality.
        query: (B, Hq, Nq, D). key, value: (B, Hk, Nk, D), (B, Hk, Nk, Dv), Hq a multiple of Hk.
        attention_mask: the (B, Nk) bool padding mask from ``fastmax_attention_mask``, or None.
        dropout: the module's attention dropout, which it passes only in training (the output is
            multiplied by 1 + dropout * N(0, 1), the seed's dropout).
        scaling: the model's score scale (1/sqrt(D) when None); divided by the configured temperature.
        is_causal: overrides ``module.is_causal``.
        kwargs: ``position_ids`` / ``cu_seq_lens_q`` / ``cu_seq_lens_k`` mark packed documents;
            ``fastmax_cache_layer`` (a ``FastmaxCacheLayer``) continues that recurrent state; without it, the
            layer a ``FastmaxCache.update`` just handed over (``cache.take_hand_over``) is continued.

    Returns:
        (output (B, Nq, Hq, Dv) contiguous, None): fastmax never forms attention weights.
    """
    # First, whatever fails below: take the layer a FastmaxCache.update() handed over for these key/value.
    cache_layer = kwargs.get(CACHE_LAYER_KWARG)
    if cache_layer is None:
        cache_layer = take_hand_over(getattr(module, "layer_idx", None), key, value)
    config = get_fastmax_config(module.config)
    _refuse_unsupported(kwargs)
    options = config.options_for(scaling, head_dim=query.shape[-1], layer_idx=getattr(module, "layer_idx", None),
                                 heads_q=query.shape[1], device=query.device)
    learned = learned_window_gain(module)  # (Hq,) while window_gain.learn_window_gains trains them
    if learned is not None:
        options = dataclasses.replace(options, window_gain=learned)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    batch, len_q, len_k = query.shape[0], query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is None and cache_layer is not None:
        window = cache_layer.sliding_window

    if cache_layer is not None:
        _check_window(module, cache_layer, window, cache_layer.get_seq_length() + len_q)
        # The mask spans every token seen so far, the keys only the new ones.
        mask_length = attention_mask.shape[-1] if isinstance(attention_mask, torch.Tensor) else len_k
        key_padding_mask = _padding_mask(attention_mask, batch, mask_length)
        out = _recurrent_step(module, cache_layer, query, key, value, key_padding_mask, is_causal, options,
                              config.backend)
        out = apply_dropout(out, dropout)  # the step has no dropout of its own
        return out.transpose(1, 2).contiguous(), None

    _check_window(module, None, window, len_k)
    key_padding_mask = _padding_mask(attention_mask, batch, len_k)
    fastmax_kwargs = dict(causal=bool(is_causal), dropout=dropout, backend=config.backend)
    spans = _document_spans(kwargs, batch, len_q, len_k, has_padding=key_padding_mask is not None)
    if spans is None:
        # (B, Hq, Nq, Dv)
        out = fastmax_with_options(query, key, value, options, key_padding_mask=key_padding_mask, **fastmax_kwargs)
    else:
        out = _packed_fastmax(query, key, value, options, spans, key_padding_mask, **fastmax_kwargs)
    return out.transpose(1, 2).contiguous(), None


def register_fastmax() -> None:
    """Make "fastmax" a valid ``attn_implementation`` (attention function and mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fastmax_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastmax_attention_mask)
