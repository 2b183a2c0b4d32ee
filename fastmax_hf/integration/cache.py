"""A transformers ``Cache`` that keeps Fastmax's recurrent state instead of keys and values.

Per layer, ``FastmaxCacheLayer`` holds one ``FastmaxState``: S (B, Hk, F, Dv) and z (B, Hk, F) in
fp32 (float64 for float64 models), F = 1 + D + D(D+1)/2 for p = 2. Its size depends on the batch,
the heads and the head dim, never on the number of tokens: the prompt and every generated token
are folded in by the recurrent step (``fastmax_hf.recurrent``) and then forgotten. With a hybrid
``window`` W in the model's fastmax options the state also keeps the keys and values of the last
W positions (``FastmaxState.tail_k``/``tail_v``, B x Hk x W x D each): still constant in the number
of tokens. What it
cannot do follows from that: ``crop`` (assisted decoding, rollback) would need the states of
earlier positions, and is refused.

After the prompt every one-token step is folded into the state in place by one fused step
(``recurrent.decode_step_``): the state's tensors keep their addresses and nothing is read back
to the host. ``static=True`` (what ``generate(..., cache_implementation="static")`` builds for a
fastmax model) makes the cache compileable, so that generate() takes its static-shape path and
a decoding step is captured once as a CUDA graph and replayed (``integration.graphs``); its beam
reorders are in place too. With a hybrid window a static cache keeps the tail at all W
positions (the missing oldest marked as padding) and moves it up in place, so windowed models
replay too. There are no per-token slots to preallocate: the state has its final
size from the first token.

One mechanism for every family. Every attention class that goes through
``ALL_ATTENTION_FUNCTIONS`` does, in transformers' own code,

    key, value = cache.update(key, value, self.layer_idx, ...)     # (B, Hk, n, D): the n new tokens
    out, _ = attention_interface(self, query, key, value, attention_mask, ...)

``FastmaxCache.update`` keeps nothing: it returns the new tokens' key and value unchanged and
hands its layer over (``hand_over``) to the attention function that the same module calls next.
``fastmax_attention_forward`` takes the hand-over (``take_hand_over``: the next attention call,
whose key/value must hold the same batch and tokens as update()'s), continues that layer's state
with the new tokens and folds them in. A hand-over that no fastmax attention call takes (a
non-fastmax attention implementation) raises at the next update instead of computing attention
over the new tokens only.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, CacheLayerMixin

from ..options import FastmaxOptions
from ..recurrent import FastmaxState, decode_step_, step_with_options

_NO_KV = (
    "FastmaxCache keeps Fastmax's recurrent state, not keys and values, so {what}. It serves models built with "
    "attn_implementation='fastmax' only; use a DynamicCache for other attention implementations."
)

# The layer whose update() ran last in this thread, waiting for its attention call:
# _HAND_OVER.pending = (cache, layer_idx, layer, key (B, Hk, n, D), value (B, Hk, n, Dv)) or None.
_HAND_OVER = threading.local()


def hand_over(cache, layer_idx: int, layer: "FastmaxCacheLayer", key: torch.Tensor, value: torch.Tensor) -> None:
    """Record that ``layer`` of ``cache`` waits for the next fastmax attention call, with these key/value.

    A hand-over of the same cache still waiting means the attention call after the previous
    update() was not fastmax's: refused. One of another cache is what an exception between an
    update() and its attention call left behind: replaced."""
    pending = getattr(_HAND_OVER, "pending", None)
    _HAND_OVER.pending = None
    if pending is not None and pending[0] is cache:
        raise RuntimeError(
            f"FastmaxCache: layer {pending[1]}'s update() was not followed by a fastmax attention call (its new "
            f"tokens were never folded into the state) before layer {layer_idx}'s update(). " + _NO_KV.format(
                what="an attention implementation other than 'fastmax' would have attended to the new tokens only")
        )
    _HAND_OVER.pending = (cache, layer_idx, layer, key, value)


def take_hand_over(layer_idx, key: torch.Tensor, value: torch.Tensor) -> "FastmaxCacheLayer | None":
    """The FastmaxCacheLayer whose update() the model called just before this attention call, or None.

    The model may turn what update() returned into the attention's key/value by a function of each
    token alone (multi-head latent attention expands its cached latents into keys and values;
    mixture-of-attention repeats heads): the state then folds in what the attention function
    receives, exactly as a full recomputation would. It may not change which tokens they hold:
    a key/value whose batch or token count differs from update()'s is refused. A module may update
    the cache under another index than its own ``layer_idx`` (a layer run several times)."""
    pending = getattr(_HAND_OVER, "pending", None)
    if pending is None:
        return None
    _HAND_OVER.pending = None  # taken once, whatever happens next
    _, pending_idx, layer, pending_key, pending_value = pending
    # (B, n): batch and new tokens of update()'s key and value, and of the attention's
    handed = {tuple(pending_key.shape[:1]) + tuple(pending_key.shape[-2:-1]),
              tuple(pending_value.shape[:1]) + tuple(pending_value.shape[-2:-1])}
    received = {tuple(key.shape[:1]) + tuple(key.shape[-2:-1]), tuple(value.shape[:1]) + tuple(value.shape[-2:-1])}
    if handed != received or len(handed) != 1:
        raise RuntimeError(
            f"FastmaxCache: the update() of cache layer {pending_idx} was given (batch, tokens) {sorted(handed)}, but "
            f"the attention call of layer {layer_idx} received keys/values of {sorted(received)}. This model changes "
            "which tokens attention sees after the cache update, which a recurrent state cannot follow; generate "
            "with use_cache=False or a DynamicCache."
        )
    return layer


def _map_state(state: FastmaxState, fn) -> FastmaxState:
    """A new state with ``fn`` applied to each of its tensors (other fields are kept)."""
    tensors = {
        field.name: fn(getattr(state, field.name))
        for field in dataclasses.fields(state)
        if isinstance(getattr(state, field.name), torch.Tensor)
    }
    return dataclasses.replace(state, **tensors)


class FastmaxCacheLayer(CacheLayerMixin):
    """The recurrent state of one attention layer, and how many positions it has folded in."""

    is_compileable = False
    is_croppable = False

    def __init__(self, layer_type: str = "full_attention", sliding_window: int | None = None, static: bool = False,
                 **kwargs):
        """``sliding_window``: the window of a sliding/chunked layer, up to which full fastmax attention is
        what the layer computes; the attention function refuses to attend to more positions.
        ``static``: compileable, for CUDA-graph decoding (see the module's docstring)."""
        super().__init__()
        self.static = bool(static)
        self.is_compileable = self.static  # generate() then takes its static-shape (compiled-call) path
        # (B,) bool read by in-place steps that get no padding mask: whether each row's new token is
        # real. Set by the CUDA-graph runner, which captures its steps without the growing mask.
        self.decode_valid: torch.Tensor | None = None
        self.layer_type = layer_type
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.state: FastmaxState | None = None
        # Positions seen, padding included: transformers derives positions and mask sizes from it.
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(
            "FastmaxCacheLayer.update needs the layer index: call FastmaxCache.update(key, value, layer_idx)"
        )

    def step(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        options: FastmaxOptions,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Attend causally with n new tokens, continuing the state, and fold them in.

        Args:
            query: (B, Hq, n, D); key, value: (B, Hk, n, D), (B, Hk, n, Dv): the new tokens only.
            key_padding_mask: (B, n) bool, True = real token; padded keys never enter the state.
            options: the kernel's options (``FastmaxConfig.options_for``).
            backend: the configured backend, for the first step (``backends.choose_backend``).

        Returns:
            (B, Hq, n, Dv) in the query's dtype.
        """
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        if self.state is not None and self.state.S.shape[0] != query.shape[0]:
            raise ValueError(
                f"the FastmaxCache holds a batch of {self.state.S.shape[0]} sequences but this call has "
                f"{query.shape[0]}; use a new cache for a new batch"
            )
        in_place = self.state is not None and query.shape[2] == 1 and (self.state.window is None or self.static)
        if in_place:
            # one fused step, in place: the cache owns its state (a beam reorder or batch selection
            # gives it new tensors), and the state keeps its addresses for CUDA graphs. A hybrid
            # window's tail is moved up in place too, in static caches (whose tails have all W
            # positions from the prefill on); the default cache's tail grows to W by new tensors.
            key_valid = key_padding_mask[:, -1] if key_padding_mask is not None else self.decode_valid
            out = decode_step_(query, key, value, self.state, options, key_valid=key_valid)
        else:
            out, self.state = step_with_options(
                query, key, value, self.state, options, key_padding_mask=key_padding_mask, backend=backend
            )
            if self.static:
                self.state = self.state.with_full_tail()  # its addresses fixed from here on
        self.seen_tokens += query.shape[2]
        return out

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the padding mask of every position so far and of the new ones."""
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1  # no sequence dimension: any length fits

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the new state is row beam_idx[i] of the old one (in place when static)."""
        if self.state is not None and self.static:
            for held in self.state.tensors():
                held.copy_(held.index_select(0, beam_idx.to(held.device)))
        elif self.state is not None:
            self.state = self.state.index_select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        # crop(0) and keeping at least every seen token change nothing; anything else would need the
        # states of earlier positions, which were folded in and are gone.
        keeps_everything = tokens_to_remove == 0 or (tokens_to_remove > 0 and tokens_to_remove >= self.seen_tokens)
        if not keeps_everything:
            raise ValueError(
                "FastmaxCache cannot be cropped: it keeps one recurrent state per layer, not per-token keys and "
                "values, so earlier positions cannot be restored. Assisted decoding and other rollbacks are not "
                "supported with fastmax; generate without an assistant."
            )

    def offload(self) -> None:
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.state is not None and self.state.S.device != self.device:
            self.state = _map_state(self.state, lambda t: t.to(self.device, non_blocking=True))


def _layer_types(decoder_config) -> tuple[list[str], list[dict]]:
    """(layer type, kwargs) per decoder layer, as transformers' DynamicCache reads them from the config."""
    reader = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if reader is not None:
        types, kwargs = reader(decoder_config)
        if isinstance(kwargs, dict):  # transformers 5.17: one dict of kwargs for every layer
            kwargs = [dict(kwargs) for _ in types]
        return list(types), list(kwargs)
    n = decoder_config.num_hidden_layers
    types = list(getattr(decoder_config, "layer_types", None) or ["full_attention"] * n)
    window = getattr(decoder_config, "sliding_window", None)
    return types, [dict(sliding_window=window) if t == "sliding_attention" else {} for t in types]


# transformers' linear-attention (mamba) cache layer, for hybrid layers; older releases have none.
_LinearAttentionLayer = getattr(cache_utils, "LinearAttentionLayer", None)
_HYBRID_BASES = (FastmaxCacheLayer,) if _LinearAttentionLayer is None else (_LinearAttentionLayer, FastmaxCacheLayer)


class FastmaxHybridLayer(*_HYBRID_BASES):
    """A "hybrid" layer (Falcon-H1, Zamba): a mamba/linear-attention state beside a fastmax state.

    Mirrors transformers' LinearAttentionAndFullAttentionLayer with the key/value part replaced by
    FastmaxCacheLayer; both parts have a constant size. Built only where transformers has
    LinearAttentionLayer (a release without it has no hybrid layer types either)."""

    is_compileable = False

    def __init__(self, number_of_states: int = 1, layer_type: str = "hybrid", sliding_window: int | None = None,
                 **kwargs):
        FastmaxCacheLayer.__init__(self, layer_type=layer_type, sliding_window=sliding_window)
        _LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:  # the fastmax step: (key, value)
            FastmaxCacheLayer.lazy_initialization(self, *args)
        else:  # update_conv_state / update_recurrent_state: keyword states
            _LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def _both(name):
        def method(self, *args):
            getattr(_LinearAttentionLayer, name)(self, *args)
            getattr(FastmaxCacheLayer, name)(self, *args)
        method.__name__ = name
        return method

    offload = _both("offload")
    prefetch = _both("prefetch")
    reset = _both("reset")
    reorder_cache = _both("reorder_cache")
    batch_repeat_interleave = _both("batch_repeat_interleave")
    batch_select_indices = _both("batch_select_indices")
    crop = _both("crop")
    del _both

    def get_seq_length(self) -> int:
        return FastmaxCacheLayer.get_seq_length(self)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return FastmaxCacheLayer.get_mask_sizes(self, query_length)


# Layer types whose cache layer FastmaxCache builds. Attention layers keep a fastmax state (sliding
# and chunked ones are exact full attention up to their window, refused beyond it); hybrid layers
# keep a fastmax state beside their linear-attention state; layers without attention keep
# transformers' own constant-size layers. Any other type is refused by name.
FASTMAX_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
HYBRID_LAYER_TYPES = ("hybrid", "hybrid_sliding")
NON_ATTENTION_LAYER_TYPES = ("conv", "linear_attention", "dummy")


WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def _cache_layer(layer_type: str, kwargs: dict, model_type: str, static: bool = False):
    window = kwargs.get("sliding_window") if layer_type in WINDOWED_LAYER_TYPES else None
    if layer_type in FASTMAX_LAYER_TYPES:
        return FastmaxCacheLayer(layer_type=layer_type, sliding_window=window, static=static)
    if layer_type in HYBRID_LAYER_TYPES and _LinearAttentionLayer is not None:
        return FastmaxHybridLayer(number_of_states=kwargs.get("number_of_states", 1), layer_type=layer_type,
                                  sliding_window=window)
    own_layers = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})
    if layer_type in NON_ATTENTION_LAYER_TYPES and layer_type in own_layers:
        return own_layers[layer_type](**kwargs)
    raise ValueError(
        f"FastmaxCache cannot serve {model_type!r} layers of type {layer_type!r} (fastmax keeps a recurrent state "
        f"for {', '.join(FASTMAX_LAYER_TYPES + HYBRID_LAYER_TYPES)} layers only); generate with use_cache=False"
    )


class FastmaxCache(Cache):
    """One cache layer per decoder layer; what ``generate()`` uses for fastmax models.

    Args:
        config: the model config. Its decoder's layer types size and shape the layer list: a
            ``FastmaxCacheLayer`` per attention layer, transformers' own layer for conv / linear
            attention / attention-free layers. It is also checked at every update: a cache built for a
            config whose ``_attn_implementation`` is not "fastmax" refuses to be filled. Without a
            config, fastmax layers are added as they are first used.

    Example:

        cache = FastmaxCache(config=model.config)
        out = model(input_ids, past_key_values=cache, use_cache=True)   # transformers 5.17
        out = model(input_ids, cache=cache, use_cache=True)             # transformers >= 5.24
    """

    def __init__(self, config=None, num_hidden_layers: int | None = None, static: bool = False):
        self.config = None if config is None else config.get_text_config(decoder=True)
        self.static = bool(static)
        if self.config is not None and num_hidden_layers is None:
            types, kwargs = _layer_types(self.config)
            model_type = getattr(self.config, "model_type", "?")
            super().__init__(layers=[_cache_layer(t, kw, model_type, static) for t, kw in zip(types, kwargs)])
        elif num_hidden_layers is not None:
            super().__init__(layers=[FastmaxCacheLayer(static=static) for _ in range(num_hidden_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(FastmaxCacheLayer, static=static))

    @property
    def is_compileable(self) -> bool:
        """Static caches only: generate() then takes its static-shape path (``graphs.py``)."""
        return self.static and bool(self.layers) and all(layer.is_compileable for layer in self.layers)

    def layer(self, layer_idx: int) -> FastmaxCacheLayer:
        """The fastmax layer ``layer_idx``, created on first use when the cache was built without a config."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        if layer_idx >= len(self.layers):
            raise IndexError(f"FastmaxCache has {len(self.layers)} layers, layer {layer_idx} was asked for")
        layer = self.layers[layer_idx]
        if not isinstance(layer, FastmaxCacheLayer):
            raise RuntimeError(f"layer {layer_idx} of this FastmaxCache is a {type(layer).__name__}, not an attention layer")
        return layer

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hand layer ``layer_idx`` over to the attention call that follows; return the new key/value unchanged.

        key_states (B, Hk, n, D), value_states (B, Hk, n, Dv): the n new tokens (after RoPE). Nothing
        is stored here: ``fastmax_attention_forward`` folds them into the state after attending.
        """
        implementation = getattr(self.config, "_attn_implementation", None)
        if self.config is not None and implementation != "fastmax":
            raise RuntimeError(_NO_KV.format(what=f"a model using attn_implementation={implementation!r} cannot fill it"))
        hand_over(self, layer_idx, self.layer(layer_idx), key_states, value_states)
        return key_states, value_states

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes held by the cache's layers (recurrent states, and the constant-size states of conv/linear layers)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, FastmaxCacheLayer):
                total += layer.nbytes()
            for name in ("conv_states", "recurrent_states"):  # linear-attention parts: {state_idx: tensor}
                held = getattr(layer, name, None) or {}
                total += sum(t.numel() * t.element_size() for t in held.values() if isinstance(t, torch.Tensor))
        return total
