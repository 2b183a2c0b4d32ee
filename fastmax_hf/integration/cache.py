"""A transformers ``Cache`` that keeps Fastmax's recurrent state instead of keys and values.

Per layer, ``FastmaxCacheLayer`` holds one ``FastmaxState``: S (B, Hk, F, Dv) and z (B, Hk, F) in
fp32 (float64 for float64 models), F = 1 + D + D(D+1)/2 for p = 2. Its size depends on the batch,
the heads and the head dim, never on the number of tokens: the prompt and every generated token
are folded in by the recurrent step (``fastmax_hf.recurrent``) and then forgotten. What it
cannot do follows from that: ``crop`` (assisted decoding, rollback) would need the states of
earlier positions, and a static cache preallocates per-token slots that fastmax never uses.
Both are refused.

The layers are filled by the patched attention classes (``patches.py``) through the attention
function; ``update(key_states, value_states)``, the K/V interface every other attention
implementation uses, raises rather than silently storing nothing.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..options import FastmaxOptions
from ..recurrent import FastmaxState, step_with_options

_NO_KV = (
    "FastmaxCache keeps Fastmax's recurrent state, not keys and values, so `{method}` is not available. "
    "It is filled by the attention classes that `fastmax_hf` patches (Llama family, GPT-2) when the model "
    "uses attn_implementation='fastmax'; use a DynamicCache for other models or attention implementations."
)


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
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: FastmaxState | None = None
        # Positions seen, padding included: transformers derives positions and mask sizes from it.
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError(_NO_KV.format(method="update(key_states, value_states)"))

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
        out, self.state = step_with_options(
            query, key, value, self.state, options, key_padding_mask=key_padding_mask, backend=backend
        )
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
        """Beam search: row i of the new state is row beam_idx[i] of the old one."""
        if self.state is not None:
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


class FastmaxCache(Cache):
    """One ``FastmaxCacheLayer`` per decoder layer; what ``generate()`` uses for fastmax models.

    Args:
        config: the model config (its decoder's ``num_hidden_layers`` sizes the layer list). Without
            it, layers are added as they are first used.

    Example:

        cache = FastmaxCache(config=model.config)
        out = model(input_ids, past_key_values=cache, use_cache=True)   # transformers 5.17
        out = model(input_ids, cache=cache, use_cache=True)             # transformers >= 5.24
    """

    def __init__(self, config=None, num_hidden_layers: int | None = None):
        if num_hidden_layers is None and config is not None:
            num_hidden_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_hidden_layers is None:
            super().__init__(layer_class_to_replicate=FastmaxCacheLayer)
        else:
            super().__init__(layers=[FastmaxCacheLayer() for _ in range(num_hidden_layers)])

    def layer(self, layer_idx: int) -> FastmaxCacheLayer:
        """The layer ``layer_idx``, created on first use when the cache was built without a config."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        if layer_idx >= len(self.layers):
            raise IndexError(f"FastmaxCache has {len(self.layers)} layers, layer {layer_idx} was asked for")
        return self.layers[layer_idx]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        raise RuntimeError(_NO_KV.format(method="update(key_states, value_states, layer_idx)"))

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes held by the recurrent states of every layer."""
        return sum(layer.nbytes() for layer in self.layers)
